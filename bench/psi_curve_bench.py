"""Benchmark the DH-PSI curve primitives: hash_and_blind and reblind.

Run from the project root:

    python bench/psi_curve_bench.py [--items 100000] [--workers 1 2]

Prints items per second for each step and worker count. The process pool is
started and warmed before timing; its start-up cost is printed separately.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protocols.psi import curve

DOMAIN = b"fdrtd-psi-bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    n: int = args.items
    items = [curve.encode_item(f"customer-{i:09d}") for i in range(n)]
    a, b = curve.random_scalar(), curve.random_scalar()
    print(f"items={n} cpus_available={curve.default_workers()} os.cpu_count={os.cpu_count()}")

    reference: list[bytes] | None = None
    try:
        for workers in args.workers:
            if workers > 1:
                warm = items[: curve.PARALLEL_THRESHOLD]
                t0 = time.perf_counter()
                curve.hash_and_blind(warm, a, DOMAIN, workers=workers)
                t1 = time.perf_counter()
                print(f"workers={workers} pool start + first {len(warm)} items: {t1 - t0:.2f} s")

            t0 = time.perf_counter()
            blinded = curve.hash_and_blind(items, a, DOMAIN, workers=workers)
            t1 = time.perf_counter()
            double = curve.reblind(blinded, b, workers=workers)
            t2 = time.perf_counter()

            if reference is None:
                reference = double
            elif double != reference:
                raise SystemExit(f"workers={workers}: result differs from the first run")

            print(
                f"workers={workers} hash_and_blind: {t1 - t0:6.2f} s {n / (t1 - t0):8.0f} items/s"
                f" | reblind: {t2 - t1:6.2f} s {n / (t2 - t1):8.0f} items/s"
                f" | both: {t2 - t0:6.2f} s {n / (t2 - t0):8.0f} items/s"
            )
    finally:
        curve.shutdown_pool()


if __name__ == "__main__":
    main()
