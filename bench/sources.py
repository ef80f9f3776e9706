"""Univariate statistics over sources read in place: Parquet, CSV and PostgreSQL, end to end.

    python bench/sources.py                 # 10,000,000 rows per party; writes bench/SOURCES.md
    python bench/sources.py --rows 200000   # a quick check (write it elsewhere with --output)

Three parties on this machine, each a real server (``LocalFederation``, with
its own ``nats-server``) reading its own source in place. For each kind the
admin registers the dataset ``visits`` on every server (owner ``owner``),
the owner grants ``analyst``, and the analyst runs
``fed.compute("smpc", "univariate", fed.dataset("visits"), column="x")``.
Recorded: the wall time of the first run (the catalogue call inside
``fed.dataset`` observes the source, which hashes a file; the computation
then releases the first version) and of later runs, each server's peak RSS
growth during a run (``clear_refs`` 5, then ``VmHWM`` minus the RSS before,
summed over the server process and its children), and a breakdown of the
source's own operations timed in this process. The result is checked against
numpy over the concatenated data.

PostgreSQL: a private cluster (``tests/postgres.py``) on 127.0.0.1 with
Debian's server binaries, one table per party loaded with ``COPY FROM STDIN``
and ``VACUUM ANALYZE``, read by a read-only role whose connection string the
servers find in an environment variable (``dsn_env``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

# tests/postgres.py (tests/ is no package); mypy finds it only with tests on its path
from postgres import (  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
    PostgresCluster,
    find_bin_dir,
)

from fdrtd_client import Client  # noqa: E402
from fdrtd_server.local import LocalFederation  # noqa: E402
from fdrtd_server.sources import SourceSpec, open_source  # noqa: E402
from fdrtd_server.sources import files as source_files  # noqa: E402

KINDS = ("parquet", "csv", "postgresql")
TARGET_SECONDS = {"parquet": 1.0, "csv": 5.0, "postgresql": 4.0}
TARGET_GROWTH_MB = 200.0
DSN_ENV = "FDRTD_BENCH_SOURCES_DSN"
DATASET = "visits"
CATEGORIES = np.array(["north", "south", "east", "west", "centre"])


# -- memory of the server processes ----------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    """The ``Vm*`` lines of /proc/PID/status, in kB (empty if the process is gone)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm"):
            out[key] = int(value.split()[0])
    return out


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (through /proc/PID/task/*/children)."""
    found, index = [pid], 0
    while index < len(found):
        current = found[index]
        index += 1
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


class PeakWatch:
    """Peak RSS growth of each server's process tree during one measured call."""

    def __init__(self, roots: Mapping[str, int]) -> None:
        self.roots = dict(roots)
        self.before: dict[str, dict[int, tuple[str, int]]] = {}

    def start(self) -> None:
        for name, root in self.roots.items():
            self.before[name] = {}
            for pid in _tree(root):
                with contextlib.suppress(OSError):
                    Path(f"/proc/{pid}/clear_refs").write_text("5")
                rss = _status(pid).get("VmRSS")
                if rss is not None:
                    self.before[name][pid] = (_comm(pid), rss)

    def stop(self) -> dict[str, dict[str, float]]:
        """MB of growth by server, then by process kind (``server``, ``nats-server``...)."""
        out: dict[str, dict[str, float]] = {}
        for name, root in self.roots.items():
            parts: dict[str, float] = {}
            pids = set(_tree(root)) | set(self.before[name])
            for pid in pids:
                peak = _status(pid).get("VmHWM")
                if peak is None:
                    continue
                comm, rss = self.before[name].get(pid, (_comm(pid), 0))
                label = "server" if pid == root else comm
                parts[label] = parts.get(label, 0.0) + max(0, peak - rss) / 1024
            parts["total"] = sum(parts.values())
            out[name] = parts
        return out


# -- data ---------------------------------------------------------------------------------


def make_table(rows: int, seed: int) -> pa.Table:
    """Three float64 columns, one int64 and a short text category."""
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "x": rng.normal(120.0, 15.0, rows),
            "y": rng.exponential(3.0, rows),
            "z": rng.uniform(-1.0, 1.0, rows),
            "n": rng.integers(0, 1_000_000, rows, dtype=np.int64),
            "category": pa.array(CATEGORIES[rng.integers(0, len(CATEGORIES), rows)]),
        }
    )


def load_postgres(cluster: PostgresCluster, csv_files: Mapping[str, Path]) -> str:
    """One table per party (``visits_<party>``) from its CSV file; the reader's DSN."""
    import psycopg

    admin = cluster.dsn()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("CREATE ROLE bench_reader LOGIN")
        for party, path in csv_files.items():
            table = f"visits_{party}"
            conn.execute(
                f"CREATE TABLE {table} (x float8, y float8, z float8, n int8, category text)"
            )
            with (
                conn.cursor() as cursor,
                cursor.copy(f"COPY {table} FROM STDIN (FORMAT csv, HEADER true)") as copy,
                path.open("rb") as source,
            ):
                while chunk := source.read(1 << 20):
                    copy.write(chunk)
            # VACUUM sets the hint bits a first read would otherwise write; it includes ANALYZE
            conn.execute(f"VACUUM ANALYZE {table}")
            conn.execute(f"GRANT SELECT ON {table} TO bench_reader")
    return str(cluster.dsn(user="bench_reader"))


def postgres_version(cluster: PostgresCluster) -> str:
    import psycopg

    with psycopg.connect(cluster.dsn()) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]).split()[0] if row else "?"


# -- the measurement ----------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    catalogue: float
    growth: dict[str, dict[str, float]]


@dataclass
class KindResult:
    kind: str
    runs: list[Run] = field(default_factory=list)
    parts: dict[str, dict[str, float]] = field(default_factory=dict)
    """Source operations timed in this process: by step, ``alone`` and ``three``."""


def check_result(result: Mapping[str, Any], values: np.ndarray[Any, Any]) -> None:
    """Refuse a wrong answer: count, mean, extremes and standard deviation against numpy."""
    problems = []
    if int(result["samples"]) != values.size:
        problems.append(f"samples {result['samples']} != {values.size}")
    for key, expected, tolerance in (
        ("mean", float(values.mean()), 1e-9),
        ("minimum", float(values.min()), 0.0),
        ("maximum", float(values.max()), 0.0),
        ("standard_deviation", float(values.std(ddof=1)), 1e-6),
    ):
        got = float(result[key])
        if abs(got - expected) > tolerance * abs(expected):
            problems.append(f"{key} {got!r} != {expected!r}")
    if problems:
        raise AssertionError("wrong univariate result: " + "; ".join(problems))


def end_to_end(
    kind: str,
    specs: Mapping[str, Mapping[str, Any]],
    expected: np.ndarray[Any, Any],
    root: Path,
    env: Mapping[str, str],
    repeat: int,
) -> list[Run]:
    """Three servers, the source registered and granted on each, then the analyst's runs."""
    runs: list[Run] = []
    with LocalFederation(root / f"federation-{kind}", names=tuple(specs), env=dict(env)) as local:
        for name, server in local.servers.items():
            Client(server.url, server.admin_token).add_source(
                DATASET, "owner", specs[name], f"{kind} benchmark data"
            )
            Client(server.url, server.owner_token).grant(DATASET, "analyst")
        pids = {}
        for name, server in local.servers.items():
            assert server.process is not None
            pids[name] = server.process.pid
        fed = local.federation(timeout=900)
        watch = PeakWatch(pids)
        dataset = None
        for index in range(1 + repeat):
            watch.start()
            start = time.perf_counter()
            if dataset is None:
                dataset = fed.dataset(DATASET)  # the catalogue: each server observes its source
            catalogue = time.perf_counter() - start
            job = fed.compute("smpc", "univariate", dataset, column="x")
            result = job.result(timeout=900, progress=False)
            seconds = time.perf_counter() - start
            growth = watch.stop()
            check_result(result, expected)
            runs.append(Run(seconds, catalogue if index == 0 else 0.0, growth))
            grown = ", ".join(f"{n} {g['total']:.0f} MB" for n, g in growth.items())
            print(
                f"  {kind} run {index + 1}: {seconds:.2f} s (catalogue {catalogue:.2f} s), "
                f"growth {grown}",
                flush=True,
            )
    return runs


def source_parts(
    specs: Mapping[str, Mapping[str, Any]], expected_mean: float, minimum: float
) -> dict[str, dict[str, float]]:
    """The source's own steps, as the univariate job calls them, timed in this process.

    ``alone``: the first party's source by itself; ``three``: the three
    parties' sources at once, in three threads. File hashes are cached per
    process: the cache is emptied before each first observation.
    """
    sources = [open_source(SourceSpec.from_dict(spec)) for spec in specs.values()]
    steps: dict[str, Callable[[Any], Any]] = {
        "observe (first)": lambda s: asyncio.run(s.observe()),
        "observe (again)": lambda s: asyncio.run(s.observe()),
        "moments, degree 1": lambda s: asyncio.run(s.moments("x", degree=1)),
        "moments, degree 6": lambda s: asyncio.run(
            s.moments("x", shift=expected_mean, degree=6, positive_minimum=minimum)
        ),
    }
    parts: dict[str, dict[str, float]] = {step: {} for step in steps}
    for mode, group in (("alone", sources[:1]), ("three", sources)):
        source_files._cache.clear()
        with ThreadPoolExecutor(len(group)) as pool:
            for step, function in steps.items():
                start = time.perf_counter()
                list(pool.map(function, group))
                parts[step][mode] = time.perf_counter() - start
    return parts


_PANDAS_PROBE = """
import sys, time
import numpy as np, pyarrow as pa
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
# from buffers: pa.array() itself would import pandas (it checks for a Series)
column = pa.Array.from_buffers(pa.float64(), 10, [None, pa.py_buffer(np.arange(10.0).tobytes())])
assert "pandas" not in sys.modules
before, start = rss(), time.perf_counter()
column.to_numpy(zero_copy_only=False)
print(time.perf_counter() - start, rss() - before, "pandas" in sys.modules)
"""


def pandas_import() -> tuple[float, float] | None:
    """Seconds and MB of a process's first ``pyarrow.Array.to_numpy``, if it imports pandas.

    pyarrow imports pandas, when it is installed, on the first conversion to
    numpy; a server does so in its first computation over a file source.
    """
    done = subprocess.run(
        [sys.executable, "-c", _PANDAS_PROBE], capture_output=True, text=True, check=True
    )
    seconds, megabytes, imported = done.stdout.split()
    return (float(seconds), float(megabytes)) if imported == "True" else None


# -- the report ---------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def commit() -> str:
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    changed = [line for line in git("status", "--porcelain").splitlines() if line.strip()]
    changed = [line for line in changed if not line.endswith("bench/SOURCES.md")]
    return head + (" (with uncommitted changes)" if changed else "")


def _seconds(value: float) -> str:
    return f"{value:.2f} s"


def write_report(
    results: Sequence[KindResult],
    args: argparse.Namespace,
    versions: Mapping[str, str],
    pandas: tuple[float, float] | None,
) -> str:
    info = machine()
    lines = [
        "# Sources read in place: univariate statistics end to end",
        "",
        f"Recorded by `python bench/sources.py"
        f"{'' if args.rows == 10_000_000 else f' --rows {args.rows}'}"
        f"{'' if args.repeat == 1 else f' --repeat {args.repeat}'}` on "
        f"{datetime.date.today().isoformat()}, commit {commit()}.",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram']} RAM, {info['system']}, "
        f"Python {info['python']}; "
        + ", ".join(f"{name} {version}" for name, version in versions.items())
        + ".",
        "",
        f"Three parties, {args.rows:,} rows per party (x, y, z float64; n int64; category "
        "text), each a real server with its own `nats-server` on 127.0.0.1, all on this "
        "machine's cores together with the client (and, for PostgreSQL, the database). "
        "The analyst runs "
        '`fed.compute("smpc", "univariate", fed.dataset("visits"), column="x")`; each '
        "result is checked against numpy over the three parties' values (count, mean, "
        "minimum, maximum, standard deviation).",
        "",
        "## End to end",
        "",
        "The first run includes `fed.dataset` (the catalogue: each server observes its "
        "source, which for files hashes them) and the computation that releases the "
        "first version; later runs reuse the dataset and compute only. Memory: each "
        "server's peak RSS growth during the run (`clear_refs` 5 before, `VmHWM` minus "
        "`VmRSS` before after), the largest of the three servers, summed over the server "
        "process and its children; the `nats-server` part in brackets.",
        "",
        "| source | first run (catalogue part) | later runs | time target | "
        "memory growth, first run | later runs | memory target |",
        "|---|---|---|---|---|---|---|",
    ]

    def memory(run: Run) -> tuple[float, str]:
        worst = max(run.growth.values(), key=lambda parts: parts["total"])
        return worst["total"], f"{worst['total']:.0f} MB ({worst.get('nats-server', 0.0):.0f})"

    for result in results:
        first, later = result.runs[0], result.runs[1:]
        target = TARGET_SECONDS[result.kind]
        met_first = "met" if first.seconds <= target else "missed"
        met_later = "met" if later and max(r.seconds for r in later) <= target else "missed"
        grown = [memory(r)[0] for r in result.runs]
        mem_met = "met" if max(grown) <= TARGET_GROWTH_MB else "missed"
        lines.append(
            f"| {result.kind} | {_seconds(first.seconds)} ({_seconds(first.catalogue)}) | "
            + " / ".join(_seconds(r.seconds) for r in later)
            + f" | ≤ {target:g} s: first {met_first}, later {met_later} | {memory(first)[1]} | "
            + " / ".join(memory(r)[1] for r in later)
            + f" | ≤ {TARGET_GROWTH_MB:g} MB: {mem_met} |"
        )
    servers = list(results[0].runs[0].growth) if results else []
    lines += [
        "",
        "Memory growth by server (MB, server process + `nats-server`, first run / later runs):",
        "",
        "| source | " + " | ".join(servers) + " |",
        "|---|" + "---|" * len(servers),
    ]
    for result in results:
        cells = []
        for name in result.runs[0].growth:
            cells.append(
                " / ".join(
                    f"{r.growth[name].get('server', 0.0):.0f} + "
                    f"{r.growth[name].get('nats-server', 0.0):.0f}"
                    for r in result.runs
                )
            )
        lines.append(f"| {result.kind} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## The source's own steps",
        "",
        "What the univariate job asks of each party's source, timed in the benchmark "
        "process with the servers stopped: `observe` (the version; for files the SHA-256 "
        "of the file, cached per process by path, size, mtime and inode, and for CSV the "
        "row count, parsed in the same pass; for PostgreSQL one aggregate over a hash of "
        "every exposed column, not cached), then `moments` of degree 1 (stage 1: count, "
        "sum, extremes) and of degree 6 with the reciprocal and log sums (stage 3). Each "
        "univariate request observes once in the job, and `fed.dataset` once more in the "
        "catalogue. *alone*: one party's source by itself; *three*: the three at once "
        "in three threads.",
        "",
        "| source | step | alone | three at once |",
        "|---|---|---|---|",
    ]
    for result in results:
        for step, modes in result.parts.items():
            lines.append(
                f"| {result.kind} | {step} | {_seconds(modes['alone'])} | "
                f"{_seconds(modes['three'])} |"
            )
    lines.append("")
    if pandas is not None:
        lines += [
            f"pandas {versions.get('pandas', '')} is installed here (the `test` extra), so "
            "pyarrow imports it on a process's first conversion of an Arrow array to numpy: "
            f"{pandas[0]:.2f} s and {pandas[1]:.0f} MB of RSS in a process by itself. Each "
            "server pays it in its first computation over a file source.",
            "",
        ]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------


@contextlib.contextmanager
def terminated_cleanly() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that servers, files and the cluster are cleaned up."""

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows per party")
    parser.add_argument("--repeat", type=int, default=1, help="runs after the first (default 1)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"a subset of {','.join(KINDS)}")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("SOURCES.md"))
    args = parser.parse_args()
    kinds = [kind for kind in args.kinds.split(",") if kind]
    if not kinds or any(kind not in KINDS for kind in kinds):
        parser.error(f"--kinds takes a subset of {','.join(KINDS)}")
    if args.rows < 10 or args.repeat < 1:
        parser.error("--rows must be at least 10 and --repeat at least 1")
    parties = ("alpha", "beta", "gamma")
    versions = {"numpy": np.__version__, "pyarrow": pa.__version__}
    results: list[KindResult] = []
    with terminated_cleanly(), contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fdrtd-sources-")))
        bin_dir = find_bin_dir()
        if "postgresql" in kinds and bin_dir is None:
            parser.error("no PostgreSQL server binaries: apt-get install postgresql")
        paths = {kind: {p: scratch / f"{p}.{kind}" for p in parties} for kind in ("parquet", "csv")}
        values = []
        start = time.perf_counter()
        for seed, party in enumerate(parties, start=1):
            table = make_table(args.rows, seed)
            values.append(table.column("x").to_numpy())
            if "parquet" in kinds:
                pq.write_table(table, paths["parquet"][party])
            if "csv" in kinds or "postgresql" in kinds:
                pa_csv.write_csv(table, paths["csv"][party])
            del table
        expected = np.concatenate(values)
        del values
        os.sync()  # else the kernel writes the new files back while the first runs are timed
        print(f"data written in {time.perf_counter() - start:.1f} s", flush=True)
        mean, minimum = float(expected.mean()), float(expected.min())
        for kind in kinds:
            env: dict[str, str] = {}
            if kind == "postgresql":
                assert bin_dir is not None
                cluster = stack.enter_context(PostgresCluster(bin_dir))
                start = time.perf_counter()
                dsn = load_postgres(cluster, paths["csv"])
                os.sync()
                print(f"PostgreSQL loaded in {time.perf_counter() - start:.1f} s", flush=True)
                versions["PostgreSQL"] = postgres_version(cluster)
                env[DSN_ENV] = dsn
                os.environ[DSN_ENV] = dsn  # for the steps timed in this process
                specs: dict[str, dict[str, Any]] = {
                    p: {"kind": "postgresql", "dsn_env": DSN_ENV, "table": f"visits_{p}"}
                    for p in parties
                }
            else:
                specs = {p: {"kind": kind, "path": str(paths[kind][p])} for p in parties}
            result = KindResult(kind)
            result.runs = end_to_end(kind, specs, expected, scratch, env, args.repeat)
            result.parts = source_parts(specs, mean, minimum)
            for step, modes in result.parts.items():
                print(
                    f"  {kind} {step}: alone {modes['alone']:.2f} s, three {modes['three']:.2f} s",
                    flush=True,
                )
            results.append(result)
    pandas = pandas_import()
    for package in ("psycopg", "pandas"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    report = write_report(results, args, versions, pandas)
    args.output.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
