"""What governance costs: receipts, differential privacy and identity, measured side by side.

    python bench/governance.py            # writes bench/GOVERNANCE.md
    python bench/governance.py --quick    # fewer repetitions

Three servers on 127.0.0.1, as in ``bench/run.py``. Each row times the same
computation with and without one governance feature, end to end from the
client's call:

* a scalar secure sum whose receipt the client verifies and has every party
  cosign (the default), against one with ``verify_receipt=False``;
* a count and a sum of a named dataset released with differential privacy
  (OpenDP noise, calibrated per query, and the budget spent by
  compare-and-set), against the same dataset with ``dp = false``;
* calibrating a noise scale by bisection on OpenDP's privacy map (the first
  query at new parameters), against the remembered scale (a query repeated);
* a request authenticated by a JWT of an identity provider (a local key set),
  against one with a local token.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from jwts import Provider, identity_table

from fdrtd_client import Client, Federation
from fdrtd_server.local import LocalFederation

ROWS = 10_000
POLICY = """\
version = "bench"
[defaults]
max_concurrent = 64
analyst_inputs = true
[defaults.privacy]
dp = false
[datasets.private.privacy]
dp = true
epsilon = 0.001
min_epsilon = 0.0001
analyst_epsilon = 1000000
total_epsilon = 1000000
[datasets.private.bounds]
value = [0, 100]
"""


def timed(action: Callable[[], object], repeat: int) -> float:
    """The median seconds of ``repeat`` calls, after two warm-up calls."""
    for _ in range(2):
        action()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("GOVERNANCE.md"))
    args = parser.parse_args()
    repeat = 10 if args.quick else 40
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        provider = Provider()
        keys = provider.write_jwks(root / "keys.json")
        local = LocalFederation(root / "fed", policy=POLICY)
        for server in local.servers.values():  # the homes exist before the servers start
            with (server.home / "fdrtd.toml").open("a", encoding="utf-8") as config:
                config.write(identity_table(f'jwks_file = "{keys}"'))
        with local:
            fed: Federation = local.federation()
            names = fed.parties
            handles = fed.upload({n: np.array([float(i + 1)]) for i, n in enumerate(names)})
            scalars = {n: {"data": h} for n, h in handles.items()}
            values = np.random.default_rng(7).uniform(0, 100, ROWS)
            for server in local.servers.values():
                owner = Client(server.url, server.owner_token)
                for name in ("private", "exact"):
                    owner.publish(owner.upload(values), name)
                    owner.grant(name, "analyst")

            def scalar(verify: bool) -> Callable[[], object]:
                return lambda: fed.compute("smpc", "secure_sum", scalars).result(
                    timeout=60, verify_receipt=verify
                )

            rows.append(
                (
                    "scalar secure sum, receipt verified and cosigned vs not",
                    timed(scalar(True), repeat),
                    timed(scalar(False), repeat),
                )
            )
            for function in ("count", "secure_sum"):

                def run(name: str, function: str = function) -> Callable[[], object]:
                    inputs = {n: {"data": name, "column": "value"} for n in names}
                    if function == "count":
                        inputs = {n: {"data": name} for n in names}
                    return lambda: fed.compute("smpc", function, inputs).result(
                        timeout=60, verify_receipt=False
                    )

                rows.append(
                    (
                        f"smpc.{function} of {ROWS} rows per party, DP vs exact",
                        timed(run("private"), repeat),
                        timed(run("exact"), repeat),
                    )
                )
            from fractions import Fraction

            from fdrtd_server.sdk import privacy

            search = privacy._bisect.__wrapped__
            terms = ("laplace", 100 << 20, Fraction(1, 2000), Fraction(0))
            rows.append(
                (
                    "calibrating one noise scale: first query at new parameters vs remembered",
                    timed(lambda: search(*terms), repeat),
                    timed(lambda: privacy.calibrate(*terms), repeat),
                )
            )
            alpha = local.servers["alpha"]
            jwt = provider.token()  # an analyst of the provider (group "researchers")
            url = alpha.url + "/v1/catalogue"
            session = requests.Session()

            def listing(token: str) -> Callable[[], object]:
                headers = {"authorization": f"Bearer {token}"}
                return lambda: session.get(url, headers=headers, timeout=30).raise_for_status()

            rows.append(
                (
                    "GET /v1/catalogue, JWT vs local token",
                    timed(listing(jwt), repeat * 10),
                    timed(listing(alpha.token), repeat * 10),
                )
            )
            fed.close()
    lines = [
        "# What governance costs",
        "",
        f"Recorded by `python bench/governance.py{' --quick' if args.quick else ''}` on "
        f"{datetime.date.today().isoformat()}; {platform.machine()}, "
        f"Python {platform.python_version()}, three servers on 127.0.0.1 sharing the cores.",
        "Medians of end-to-end calls from the client.",
        "",
        "| measurement | with | without | cost |",
        "|---|---|---|---|",
    ]
    for name, with_, without in rows:
        lines.append(
            f"| {name} | {with_ * 1000:.1f} ms | {without * 1000:.1f} ms | "
            f"{(with_ - without) * 1000:+.1f} ms |"
        )
    args.output.write_text("\n".join(lines) + "\n", "utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
