"""``fdrtd-server demo``: three parties on this machine compute joint results.

Three real servers start on 127.0.0.1, each with its own embedded NATS and
its own synthetic private data: the patients of three hospitals (an id, age,
age band, systolic blood pressure, smoker or not; some patients are treated
at all three), a matrix of admissions per quarter and ward at each hospital,
and two matrices A (at alpha) and B (at beta). The analyst runs the whole
catalogue of protocols between the three servers:

* ``smpc``: ``count``; ``secure_sum`` (of a column, and elementwise of the
  admissions matrices); ``minimum_maximum``; ``univariate`` (a selection of
  its 22 statistics); ``bivariate`` (covariance, correlation, regression
  line); ``frequency_table``, ``histogram`` and ``contingency_table``;
  ``contingency_table_vertical`` (alpha's smoker status against beta's age
  band for the patients both treat); ``linear_regression``,
  ``linear_regression_vertical`` (gamma's blood pressure on alpha's smoker
  status and beta's age, joined on the patient id) and
  ``logistic_regression``; ``matrix_product`` (alpha's A times beta's B,
  gamma dealing); ``median``, ``quantiles`` and ``kth_smallest``;
* ``psi``: ``intersection``, ``intersection_size`` and ``union`` of the
  patient ids.

The hospitals keep custody of their data, as institutions do: alpha's
patients are read in place from PostgreSQL (when ``FDRTD_DEMO_POSTGRES_DSN``
names a database that answers) or else a SQLite file, beta's from a directory
of CSV files, and gamma's owner uploads and publishes them. The admins
register the sources, each owner grants the analyst the dataset
``patients``; the analyst, who holds none of it, finds it through the
federation directory (kept by alpha) and computes on it as one dataset of
three fragments, and is refused a dataset she has no grant for.

The servers compute each result by secure multiparty computation through
their peer gateways, so no server sees another's records. The demo servers
allow ``matrix_product``, ``linear_regression_vertical`` and ``union``, which
can reveal inputs and are off by default. The demo prints every joint result
beside the answer computed in plain text from all the data at once, which
only a demo can do. A computation that fails (a server refuses it, a party
times out...) shows one ``FAILED`` line with the client's error message and
counts as a failure; the demo goes on with the next one.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fdrtd_client import Client, Federation, receipts
from fdrtd_client.errors import FdrtdClientError, NotFound
from fdrtd_server.custody import RECORD_LEVEL
from fdrtd_server.local import LocalFederation

__all__ = ["run_demo", "synthetic_arrays", "synthetic_data"]

Table = dict[str, Any]
Floats = npt.NDArray[np.float64]

HOSPITALS = ("alpha", "beta", "gamma")
AGE_BANDS = ("under 45", "45 to 64", "65 and over")
SMOKER = ("no", "yes")
PRESSURE_BINS = (60.0, 120.0, 140.0, 160.0, 250.0)
QUANTILES = (0.1, 0.25, 0.75, 0.9)
KTH = 10
MIN_COHORT = 3
"""The servers' minimum cohort (their default, set explicitly for the demo)."""
SETTINGS = {
    "FDRTD_MIN_COHORT": str(MIN_COHORT),
    "FDRTD_ALLOW_MATRIX_PRODUCT": "true",
    "FDRTD_ALLOW_VERTICAL_REGRESSION": "true",
    "FDRTD_ALLOW_SET_UNION": "true",
    "FDRTD_ALLOW_SET_INTERSECTION": "true",
}
TIMEOUT = 120.0


def _band(age: float) -> str:
    return AGE_BANDS[0] if age < 45 else AGE_BANDS[1] if age < 65 else AGE_BANDS[2]


def synthetic_data(rows: int, seed: int = 7) -> dict[str, Table]:
    """Each hospital's private patients: id, age, age band, blood pressure, smoker.

    A fifth of ``rows`` patients are treated at all three hospitals; each
    hospital records the same age and smoker status for them (its own blood
    pressure). Every hospital's rows come in its own order.
    """
    rng = np.random.default_rng(seed)
    shared = max(3, rows // 5)
    sizes = [max(shared, size) for size in (rows, rows + rows // 3, rows // 2 + 7)]
    ids = rng.choice(10**9, size=shared + sum(sizes) - 3 * shared, replace=False) + 10**9
    shared_age = rng.uniform(20, 85, shared).round()
    shared_smoker = rng.random(shared) < 0.25
    hospitals: dict[str, Table] = {}
    start = shared
    for name, size, base in zip(HOSPITALS, sizes, (118.0, 112.0, 124.0), strict=True):
        own = size - shared
        age = np.concatenate([shared_age, rng.uniform(20, 85, own).round()])
        smoker = np.concatenate([shared_smoker, rng.random(own) < 0.25])
        pressure = (base + 0.45 * age + 9.0 * smoker + rng.normal(0, 11, size)).round(1)
        keys = np.concatenate([ids[:shared], ids[start : start + own]])
        start += own
        order = rng.permutation(size)
        hospitals[name] = {
            "id": [f"p{i}" for i in keys[order]],
            "age": age[order],
            "age_band": [_band(a) for a in age[order]],
            "pressure": pressure[order],
            "smoker": [SMOKER[int(s)] for s in smoker[order]],
            "smoker01": smoker[order].astype(float),
        }
    return hospitals


def synthetic_arrays(seed: int = 7) -> dict[str, dict[str, Floats]]:
    """Arrays beside the patient tables, by kind and hospital.

    ``admissions``: each hospital's admissions per quarter (rows) and ward
    (columns), to be summed elementwise; ``matrices``: alpha's A (3 x 5) and
    beta's B (5 x 2), whose product only the three together compute.
    """
    rng = np.random.default_rng([seed, 1])
    admissions = {
        name: rng.poisson(lam, size=(4, 3)).astype(float)
        for name, lam in zip(HOSPITALS, (120, 160, 60), strict=True)
    }
    matrices = {
        "alpha": rng.normal(0, 2, (3, 5)).round(2),
        "beta": rng.normal(1, 1, (5, 2)).round(2),
    }
    return {"admissions": admissions, "matrices": matrices}


GRANTED = ("*", *sorted(RECORD_LEVEL))
"""What the demo's owners grant the analyst: every function, the record-level ones
(order statistics, PSI, the matrix product, vertical joins) named one by one."""


def _patients_source(table: Table, root: Path) -> dict[str, Any]:
    """Alpha's patients in PostgreSQL (``FDRTD_DEMO_POSTGRES_DSN``, if it answers), else SQLite."""
    columns = list(table)
    rows = list(zip(*(np.asarray(table[c]).tolist() for c in columns), strict=True))
    kinds = {c: "text" if isinstance(table[c][0], str) else "float8" for c in columns}
    dsn = os.environ.get("FDRTD_DEMO_POSTGRES_DSN", "")
    if dsn:
        try:
            import psycopg

            with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                conn.execute("DROP TABLE IF EXISTS fdrtd_demo_patients")
                conn.execute(
                    "CREATE TABLE fdrtd_demo_patients ("
                    + ", ".join(f"{c} {kinds[c]}" for c in columns)
                    + ")"
                )
                with conn.cursor().copy(
                    "COPY fdrtd_demo_patients (" + ", ".join(columns) + ") FROM STDIN"
                ) as copy:
                    for row in rows:
                        copy.write_row(row)
            print("  alpha keeps its patients in PostgreSQL (FDRTD_DEMO_POSTGRES_DSN)")
            return {
                "kind": "postgresql",
                "dsn_env": "FDRTD_DEMO_POSTGRES_DSN",
                "table": "fdrtd_demo_patients",
            }
        except Exception as error:  # the demo goes on with SQLite
            print(f"  PostgreSQL at FDRTD_DEMO_POSTGRES_DSN not usable ({type(error).__name__})")
    path = root / "alpha-patients.db"
    path.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(path)) as lite, lite:
        sqlite_kinds = {"text": "TEXT", "float8": "REAL"}
        lite.execute(
            "CREATE TABLE patients ("
            + ", ".join(f"{c} {sqlite_kinds[kinds[c]]}" for c in columns)
            + ")"
        )
        lite.executemany(
            "INSERT INTO patients VALUES (" + ", ".join("?" * len(columns)) + ")", rows
        )
    print(f"  alpha keeps its patients in a SQLite database ({path.name})")
    return {"kind": "sqlite", "path": str(path), "table": "patients"}


def _csv_directory(table: Table, directory: Path) -> dict[str, Any]:
    """Beta's patients as a directory of two CSV files."""
    directory.mkdir(parents=True, exist_ok=True)
    columns = list(table)
    size = len(table[columns[0]])
    for part, (start, stop) in enumerate(((0, size // 2), (size // 2, size))):
        lines = [",".join(columns)] + [
            ",".join(str(table[c][i]) for c in columns) for i in range(start, stop)
        ]
        (directory / f"patients-{part}.csv").write_text("\n".join(lines) + "\n", "utf-8")
    print(f"  beta keeps its patients in a directory of CSV files ({directory.name}/)")
    return {"kind": "csv", "path": str(directory)}


POLICY = """\
# each owner's policy file (DIR/policy.toml); see docs/policy.md
version = "demo-1"

# the hospitals agreed to release exact aggregates of their patients to the study
[datasets.patients.privacy]
dp = false
[datasets.admissions.privacy]
dp = false
[datasets.matrix.privacy]
dp = false

# the registry keeps the default, differential privacy, with the bounds it needs
[datasets.registry.privacy]
epsilon = 0.5
analyst_epsilon = 2.0
[datasets.registry.bounds]
pressure = [60, 250]
"""
"""The demo owners' policy: exact releases for the study's datasets, DP for the registry."""
DP_DEVIATIONS = 6.0
"""How many standard deviations of its noise a private mean may lie from the plaintext one."""


def _custody(
    local: LocalFederation, data: dict[str, Table], arrays: dict[str, Any], root: Path
) -> None:
    """The owners' side: sources registered by the admins, uploads published, grants made."""
    print("\ncustody: each hospital's owner keeps its data; the analyst holds none of it")
    clients = {
        name: (
            Client(server.url, server.admin_token, timeout=TIMEOUT),
            Client(server.url, server.owner_token, timeout=TIMEOUT),
        )
        for name, server in local.servers.items()
    }
    sources = {
        "alpha": _patients_source(data["alpha"], root),
        "beta": _csv_directory(data["beta"], root / "beta-patients"),
    }
    for name, source in sources.items():
        admin, _ = clients[name]
        admin.add_source("patients", "owner", source, f"{name}'s patients, read in place")
    _, gamma = clients["gamma"]
    gamma.publish(gamma.upload(data["gamma"]), "patients", "gamma's patients, uploaded")
    print("  gamma's owner uploaded its patients and published them as 'patients'")
    for name, (_, owner) in clients.items():
        owner.publish(owner.upload(arrays["admissions"][name]), "admissions")
        if name in arrays["matrices"]:
            owner.publish(owner.upload(arrays["matrices"][name]), "matrix")
            owner.grant("matrix", "analyst", functions=["smpc.matrix_product"])
        owner.grant("patients", "analyst", functions=GRANTED)
        owner.grant("admissions", "analyst")
        registry = {"pressure": data[name]["pressure"]}
        owner.publish(owner.upload(registry), "registry", f"{name}'s blood pressure registry")
        owner.grant("registry", "analyst")
    _, alpha = clients["alpha"]
    alpha.publish(alpha.upload([41.0, 52.0, 38.0, 60.0]), "staff", "not granted to anyone")
    print("  each owner granted the analyst 'patients' and 'admissions' (alpha's 'staff': no)")


def _analyst(federation: Federation) -> dict[str, dict[str, Any]]:
    """The analyst's side: the directory, the catalogue, one dataset of three fragments."""
    deadline = time.monotonic() + TIMEOUT
    while {m["name"] for m in federation.directory()} != set(HOSPITALS):
        if time.monotonic() > deadline:
            raise _Failed("the directory did not list every hospital")
        time.sleep(0.1)
    print("\nthe analyst finds the datasets through the directory (kept by alpha):")
    for entry in federation.catalogue():
        version = (entry.get("version") or {}).get("id") or "-"
        print(
            f"  {entry['server']:<6} {entry['name']:<11} {entry['kind']:<10} "
            f"rows ~{entry['rows']!s:<6} version {str(version)[:12]}"
        )
    try:
        federation.clients["alpha"].compute("map", "aggregate", data="staff").result(TIMEOUT)
        print("  alpha's 'staff' was NOT refused: custody is broken")
        raise _Failed("a dataset without a grant was used")
    except NotFound as error:
        print(f"  alpha's 'staff' (no grant) is refused: {error.detail}")
    patients = federation.dataset("patients")
    parts = ", ".join(patients.parties)
    print(f"  'patients' is one dataset of {len(patients.parties)} fragments: {parts}")
    return patients.inputs()


def _suppressed(cells: Sequence[int], minimum: int = MIN_COHORT) -> list[float]:
    """A table's cells as released, with the servers' complementary suppression as NaN.

    The tables are of the owners' named datasets: empty cells are hidden like small ones.
    """
    # imported here: the demo otherwise needs nothing of the protocols
    from fdrtd_server.sdk import suppress

    hidden = suppress(cells, minimum, empty=True).tolist()
    return [np.nan if h else float(c) for c, h in zip(cells, hidden, strict=True)]


def _cells(counts: Sequence[Any]) -> list[float]:
    """A released table's cells, flattened, with suppressed cells (null) as NaN."""
    flat = [c for row in counts for c in row] if counts and isinstance(counts[0], list) else counts
    return [np.nan if c is None else float(c) for c in flat]


def _logistic(design: Floats, y: Floats, tolerance: float = 1e-8) -> Floats:
    """Newton's method (IRLS) from zero, as the servers iterate."""
    beta = np.zeros(design.shape[1])
    for _ in range(25):
        prob = 1 / (1 + np.exp(-(design @ beta)))
        hessian = (design * (prob * (1 - prob))[:, None]).T @ design
        step = np.linalg.solve(hessian, design.T @ (y - prob))
        beta = beta + step
        if np.max(np.abs(step)) < tolerance:
            break
    return beta


def _close(joint: Any, plain: Any, rtol: float = 1e-6, atol: float = 1e-6) -> bool:
    left, right = np.asarray(joint), np.asarray(plain)
    if left.shape != right.shape:
        return False
    if left.dtype.kind in "biuf" and right.dtype.kind in "biuf":
        return bool(
            np.allclose(left.astype(float), right.astype(float), rtol, atol, equal_nan=True)
        )
    return bool(np.all(left == right))


def _line(
    label: str, joint: Any, plain: Any, ms: float | None = None, rtol: float = 1e-6
) -> tuple[str, bool]:
    ok = _close(joint, plain, rtol=rtol)
    verdict = "ok" if ok else "DIFFERENT"
    took = "" if ms is None else f"{ms:.0f}"
    return f"  {label:<50}{took:>6}{_fmt(joint):>30}{_fmt(plain):>30}   {verdict}", ok


class _Failed(Exception):
    """A joint computation failed; the message is the client error's own."""


def _fmt(value: Any, width: int = 29) -> str:
    array = np.asarray(value)
    numeric = array.dtype.kind in "biuf"
    if array.ndim == 0:
        return f"{float(array):.6g}" if numeric else str(array)
    items = [f"{v:.5g}" if numeric else str(v) for v in array.ravel().tolist()]
    text = "[" + ", ".join(items) + "]"
    if len(text) <= width:
        return text
    rest = f"... ({len(items)})]"
    shown: list[str] = []
    for item in items:
        if len("[" + ", ".join([*shown, item, rest])) > width:
            break
        shown.append(item)
    return "[" + ", ".join([*shown, rest])


def _dp_tolerance(result: Mapping[str, Any], plain: float) -> float:
    """The relative tolerance of a private mean: :data:`DP_DEVIATIONS` of its noise.

    Each hospital adds Laplace noise of the stated scale to its sum and its count
    (variance 2 scale^2 each); the mean's error is about the sum's noise plus the
    mean times the count's, over the count.
    """
    noise = result["privacy"]["registry"]["noise"]
    parties = len(HOSPITALS)
    sum_sd = (2 * parties) ** 0.5 * noise["sum"]["scale"]
    count_sd = (2 * parties) ** 0.5 * noise["count"]["scale"]
    error = (sum_sd**2 + (plain * count_sd) ** 2) ** 0.5 / result["count"]
    return float(DP_DEVIATIONS * error / abs(plain))


def _privacy(federation: Federation, result: Mapping[str, Any]) -> None:
    """What the differentially private mean spent, and what the analyst has left."""
    spent = result.get("privacy", {}).get("registry", {})
    print(
        f"  {'':<50}each server added its own Laplace noise before sharing; "
        f"epsilon {spent.get('epsilon')} spent per server"
    )
    for name, client in federation.clients.items():
        for entry in client.budget():
            if entry.get("name") == "registry":
                left = entry["remaining"]["analyst"]["epsilon"]
                print(f"  {'':<50}{name}: the analyst has epsilon {left:g} of 'registry' left")


def _receipt(receipt: Mapping[str, Any] | None, path: Path, home: Path) -> None:
    """The receipt the client verified: who signed what; saved, and verified again offline.

    The offline check is what ``fdrtd-server receipt verify FILE --home HOME`` does,
    with the federation file of ``home`` (alpha's).
    """
    from fdrtd_server.receipts import verify_file  # the server's side, as the CLI runs it

    if receipt is None:
        raise _Failed("the result came without a receipt")
    receipts.save(receipt, path)
    versions = ", ".join(
        f"{name} {entry['statement']['policy_version']}"
        for name, entry in sorted(receipt["statements"].items())
    )
    print(
        f"  {'':<50}receipt verified: {len(receipt['statements'])} signed statements, "
        f"{len(receipt['cosignatures'])} cosignatures, joint sha256 "
        f"{str(receipt['joint_sha256'])[:12]}"
    )
    print(f"  {'':<50}policy versions: {versions}")
    try:
        checked = verify_file(path, federation=None, home=home)
    except FdrtdClientError as error:
        raise _Failed(f"the saved receipt does not verify offline: {error}") from error
    print(f"  {'':<50}fdrtd-server receipt verify {path.name} --home alpha: {checked}")


def run_demo(
    rows: int = 5000, keep: Path | None = None, settings: Mapping[str, str] | None = None
) -> int:
    """Run the demo; returns 0 when every joint result equals the plaintext answer.

    Args:
        rows: Patient records of the first hospital (the others hold more or fewer).
        keep: Keep the server homes in this directory (else a temporary one).
        settings: Server settings (``FDRTD_*`` environment variables) that
            override the demo's ``SETTINGS``, e.g. ``{"FDRTD_ALLOW_SET_UNION": "false"}``.

    Returns:
        0 if every computation succeeded and equals the plaintext answer, else 1.
    """
    data = synthetic_data(rows)
    arrays = synthetic_arrays()
    every = {
        key: np.concatenate([np.asarray(t[key]) for t in data.values()]) for key in data["alpha"]
    }
    bp, age = every["pressure"].astype(float), every["age"].astype(float)
    smoker01 = every["smoker01"].astype(float)
    by_id = {name: dict(zip(t["id"], range(len(t["id"])), strict=True)) for name, t in data.items()}
    at_all = sorted(by_id["alpha"].keys() & by_id["beta"].keys() & by_id["gamma"].keys())
    failures = 0
    with tempfile.TemporaryDirectory(prefix="fdrtd-demo-") as scratch:
        root = keep or Path(scratch)
        print("starting three servers (alpha, beta, gamma) on 127.0.0.1 ...")
        started = time.perf_counter()
        env = {**SETTINGS, **(settings or {})}
        with LocalFederation(
            root, names=HOSPITALS, env=env, directories=("alpha",), policy=POLICY
        ) as local:
            for server in local.servers.values():
                print(f"  {server.name:<6} {server.url}   home {server.home}")
            print(f"ready in {time.perf_counter() - started:.1f} s")
            switches = {
                "matrix_product": "FDRTD_ALLOW_MATRIX_PRODUCT",
                "linear_regression_vertical": "FDRTD_ALLOW_VERTICAL_REGRESSION",
                "psi intersection": "FDRTD_ALLOW_SET_INTERSECTION",
                "psi union": "FDRTD_ALLOW_SET_UNION",
            }
            allowed = [f for f, key in switches.items() if env[key].lower() in ("true", "1", "yes")]
            if allowed:
                print(
                    f"  the demo servers allow {', '.join(allowed)}, which can reveal inputs"
                    " and are off by default\n"
                )
            _custody(local, data, arrays, root)
            federation: Federation = local.federation(timeout=TIMEOUT)
            a, b = arrays["matrices"]["alpha"], arrays["matrices"]["beta"]
            mine = _analyst(federation)
            handles = dict.fromkeys(HOSPITALS, "patients")
            admissions = dict.fromkeys(HOSPITALS, "admissions")
            matrices = dict.fromkeys(("alpha", "beta"), "matrix")
            heading = "joint result (computed by SMPC)"
            print(f"\n  {heading:<50}{'ms':>6}{'joint':>30}{'plaintext':>30}")

            jobs: list[Any] = []

            def run(
                function: str,
                common: dict[str, Any],
                inputs: dict[str, dict[str, Any]] | None = None,
                microservice: str = "smpc",
            ) -> tuple[Any, float]:
                began = time.perf_counter()
                try:
                    job = federation.compute(
                        microservice, function, mine if inputs is None else inputs, **common
                    )
                    result = job.result(timeout=TIMEOUT, progress=False)
                    jobs.append(job)
                except FdrtdClientError as error:
                    raise _Failed(str(error)) from error
                return result, (time.perf_counter() - began) * 1000

            @contextlib.contextmanager
            def step(label: str) -> Iterator[str]:
                """One computation and its line(s) under ``label``; one FAILED line if it fails."""
                nonlocal failures
                try:
                    yield label
                except _Failed as error:
                    failures += 1
                    print(f"  {label:<50} FAILED: {error}")

            def show(
                label: str, joint: Any, plain: Any, ms: float | None = None, rtol: float = 1e-6
            ) -> None:
                nonlocal failures
                line, ok = _line(label, joint, plain, ms, rtol)
                failures += not ok
                print(line)

            def show_fit(
                label: str, result: Any, names: str, plain: Any, ms: float, rtol: float = 1e-6
            ) -> None:
                coefficients = result["coefficients"]
                show(label, [coefficients[k] for k in names.split()], plain, ms, rtol)

            # -- counts, sums, extremes ------------------------------------------------------
            with step("count: patient records") as label:
                result, ms = run("count", {})
                show(label, result["count"], bp.size, ms)
            with step("secure_sum: age") as label:
                result, ms = run("secure_sum", {"column": "age"})
                show(label, result["sum"], age.sum(), ms)
            inputs: dict[str, dict[str, Any]]
            inputs = {name: {"data": handle} for name, handle in admissions.items()}
            with step("secure_sum: admissions 4x3, elementwise") as label:
                result, ms = run("secure_sum", {"elementwise": True}, inputs)
                plain_admissions = np.sum(list(arrays["admissions"].values()), axis=0)
                show(label, result["sum"], plain_admissions, ms)
            with step("minimum_maximum: age") as label:
                result, ms = run("minimum_maximum", {"column": "age"})
                show(label, [result["minimum"], result["maximum"]], [age.min(), age.max()], ms)

            # -- univariate and bivariate statistics -----------------------------------------
            with step("univariate: pressure"):
                stats, ms = run("univariate", {"column": "pressure"})
                mean, sd = bp.mean(), bp.std(ddof=1)
                plain_stats = {
                    "samples": bp.size,
                    "mean": mean,
                    "standard_deviation": sd,
                    "minimum": bp.min(),
                    "maximum": bp.max(),
                    "skewness": ((bp - mean) ** 3).mean() / bp.std() ** 3,
                    "kurtosis": ((bp - mean) ** 4).mean() / bp.var() ** 2,
                    "harmonic_mean": bp.size / np.sum(1 / bp),
                    "geometric_mean": np.exp(np.log(bp).mean()),
                    "coefficient_of_variation": sd / mean,
                    "root_mean_square": np.sqrt(np.mean(bp**2)),
                }
                took: float | None = ms
                for key, plain in plain_stats.items():
                    show(f"univariate: pressure {key}", stats[key], plain, took)
                    took = None
                jobs[-1].results(timeout=TIMEOUT, progress=False)  # each server's view
                read = [
                    f"{name} {job.versions['patients']['id'][:12]}"
                    for name, job in zip(HOSPITALS, jobs[-1].jobs, strict=True)
                ]
                print(f"  {'(the versions of patients it read)':<50}{', '.join(read):>66}")
            with step("bivariate: age, pressure"):
                pair, ms = run("bivariate", {"x": "age", "y": "pressure"})
                slope = np.cov(age, bp)[0, 1] / age.var(ddof=1)
                show(
                    "bivariate: age, pressure covariance",
                    pair["covariance"],
                    np.cov(age, bp)[0, 1],
                    ms,
                )
                show(
                    "bivariate: age, pressure correlation",
                    pair["correlation_coefficient"],
                    np.corrcoef(age, bp)[0, 1],
                )
                show(
                    "bivariate: pressure ~ age slope, intercept",
                    [pair["regression_slope"], pair["regression_intercept"]],
                    [slope, bp.mean() - slope * age.mean()],
                )

            # -- tables ----------------------------------------------------------------------
            with step("frequency_table: smoker (no, yes, other)") as label:
                result, ms = run(
                    "frequency_table", {"column": "smoker", "categories": list(SMOKER)}
                )
                tally = Counter(every["smoker"].tolist())
                show(
                    label,
                    _cells([*result["counts"], result["other"]]),
                    _suppressed([tally.pop(s, 0) for s in SMOKER] + [sum(tally.values())]),
                    ms,
                )
            with step("histogram: pressure, 4 bins and other") as label:
                result, ms = run("histogram", {"column": "pressure", "bins": list(PRESSURE_BINS)})
                cells = np.histogram(bp, bins=PRESSURE_BINS)[0].tolist()
                outside = int(np.sum((bp < PRESSURE_BINS[0]) | (bp > PRESSURE_BINS[-1])))
                show(
                    label,
                    _cells([*result["counts"], result["other"]]),
                    _suppressed([*cells, outside]),
                    ms,
                )
            bands = {"x_categories": list(SMOKER), "y_categories": list(AGE_BANDS)}
            with step("contingency_table: smoker x age band") as label:
                result, ms = run("contingency_table", {"x": "smoker", "y": "age_band", **bands})
                pairs = Counter(
                    zip(every["smoker"].tolist(), every["age_band"].tolist(), strict=True)
                )
                show(
                    label,
                    _cells(result["counts"]),
                    _suppressed([pairs[(s, g)] for s in SMOKER for g in AGE_BANDS]),
                    ms,
                )
            inputs = {
                "alpha": {"data": handles["alpha"], "id": "id", "column": "smoker"},
                "beta": {"data": handles["beta"], "id": "id", "column": "age_band"},
                "gamma": {},
            }
            with step("contingency_table_vertical: smoker x age band") as label:
                result, ms = run(
                    "contingency_table_vertical", {"holders": ["alpha", "beta"], **bands}, inputs
                )
                both = sorted(by_id["alpha"].keys() & by_id["beta"].keys())
                pairs = Counter(
                    (
                        data["alpha"]["smoker"][by_id["alpha"][i]],
                        data["beta"]["age_band"][by_id["beta"][i]],
                    )
                    for i in both
                )
                show(
                    label,
                    _cells(result["counts"]),
                    _suppressed([pairs[(s, g)] for s in SMOKER for g in AGE_BANDS]),
                    ms,
                )

            # -- regressions and the matrix product ------------------------------------------
            ones = np.ones_like(age)
            with step("linear_regression: pressure ~ age + smoker") as label:
                result, ms = run("linear_regression", {"x": ["age", "smoker01"], "y": "pressure"})
                beta = np.linalg.lstsq(np.column_stack([ones, age, smoker01]), bp, rcond=None)[0]
                show_fit(label, result, "intercept age smoker01", beta, ms)
            inputs = {
                "alpha": {"data": handles["alpha"], "id": "id", "x": ["smoker01"]},
                "beta": {"data": handles["beta"], "id": "id", "x": ["age"]},
                "gamma": {"data": handles["gamma"], "id": "id", "y": "pressure"},
            }

            def column(name: str, key: str) -> Floats:
                values = np.asarray(data[name][key], dtype=float)
                return values[[by_id[name][i] for i in at_all]]

            with step("linear_regression_vertical: pressure ~ smoker, age") as label:
                result, ms = run("linear_regression_vertical", {"target_holder": "gamma"}, inputs)
                design = np.column_stack(
                    [np.ones(len(at_all)), column("alpha", "smoker01"), column("beta", "age")]
                )
                beta = np.linalg.lstsq(design, column("gamma", "pressure"), rcond=None)[0]
                show_fit(label, result, "intercept smoker01 age", beta, ms)
            with step("logistic_regression: smoker ~ age + pressure") as label:
                result, ms = run("logistic_regression", {"x": ["age", "pressure"], "y": "smoker01"})
                beta = _logistic(np.column_stack([ones, age, bp]), smoker01)
                show_fit(label, result, "intercept age pressure", beta, ms, rtol=1e-8)
            inputs = {name: {"data": handle} for name, handle in matrices.items()}
            with step("matrix_product: alpha's A @ beta's B") as label:
                result, ms = run(
                    "matrix_product", {"left": "alpha", "right": "beta"}, {**inputs, "gamma": {}}
                )
                show(label, result["product"], a @ b, ms)

            # -- private set intersection and union ------------------------------------------
            ids = {name: {"data": handle, "column": "id"} for name, handle in handles.items()}
            with step("psi intersection: patients at all three") as label:
                result, ms = run("intersection", {}, ids, "psi")
                show(label, result["intersection"], at_all, ms)
            with step("psi intersection_size: patients at all three") as label:
                result, ms = run("intersection_size", {}, ids, "psi")
                show(label, result["size"], len(at_all), ms)
            with step("psi union: patients at any hospital") as label:
                result, ms = run("union", {}, ids, "psi")
                union = sorted(by_id["alpha"].keys() | by_id["beta"].keys() | by_id["gamma"].keys())
                show(label, result["union"], union, ms)

            # -- order statistics ------------------------------------------------------------
            with step("median: pressure") as label:
                result, ms = run("median", {"column": "pressure"})
                show(label, result["median"], np.median(bp), ms)
            with step("quantiles: pressure at 10, 25, 75, 90 %") as label:
                result, ms = run(
                    "quantiles", {"column": "pressure", "probabilities": list(QUANTILES)}
                )
                show(label, result["quantiles"], np.quantile(bp, QUANTILES), ms)
            with step(f"kth_smallest: pressure, k = {KTH}") as label:
                result, ms = run("kth_smallest", {"column": "pressure", "k": KTH})
                show(label, result["value"], np.sort(bp)[KTH - 1], ms)
            # -- differential privacy: the registry's default policy -------------------------
            registry = {name: {"data": "registry", "column": "pressure"} for name in HOSPITALS}
            with step("mean: pressure, differentially private") as label:
                result, ms = run("mean", {}, registry)
                show(label, result["mean"], bp.mean(), ms, rtol=_dp_tolerance(result, bp.mean()))
                _privacy(federation, result)
                _receipt(jobs[-1].receipt, root / "receipt.json", local.servers["alpha"].home)
            print(
                "\nno server saw another's records; the analyst, who uploaded nothing, saw "
                "only the joint results."
            )
        print("servers stopped.")
    if failures:
        print(f"{failures} result(s) failed or differ from the plaintext answer")
        return 1
    return 0
