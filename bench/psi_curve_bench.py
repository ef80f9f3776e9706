"""Benchmark the PSI primitives and, optionally, the whole ``psi`` protocol.

Run from the project root:

    python bench/psi_curve_bench.py [--items 100000] [--workers 1 2]
    python bench/psi_curve_bench.py --protocol --items 100000 [--parties 3]

The first form prints, per step and worker count, the wall time and items per
second of hash_and_blind (hash onto the curve + first X25519), reblind
(validation + X25519), validate_points, and a three-layer seal/peel of the
union's mix-net (on ``--onion-items`` items); with ``--workers 1`` it also
prints the CPU microseconds per item, which do not depend on what else the
machine is doing. The process pool is started and warmed before timing.

The second form starts a LocalFederation of ``--parties`` real servers on
this machine (sharing its cores), uploads ``--items`` text items per party
(half of them common to all), and times ``intersection`` and
``intersection_size`` end to end as the client sees them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nacl import bindings as sodium

from fdrtd_server.sdk import curve

DOMAIN = b"fdrtd-psi-bench"
T = TypeVar("T")


def timed(label: str, count: int, workers: int, call: Callable[[], T]) -> T:
    """Run ``call`` once; print its wall time, items/s and (one worker) CPU us/item."""
    c0, t0 = time.process_time(), time.perf_counter()
    result = call()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    line = f"workers={workers} {label:15s} {wall:7.2f} s {count / wall:9.0f} items/s"
    if workers == 1:
        line += f"  {cpu / count * 1e6:6.1f} us CPU/item"
    print(line)
    return result


def primitives(n: int, workers_list: list[int], onion_items: int) -> None:
    items = [curve.encode_item(f"customer-{i:09d}") for i in range(n)]
    a, b = curve.random_scalar(), curve.random_scalar()
    keys = [sodium.crypto_box_keypair() for _ in range(3)]
    publics = [public for public, _ in keys]
    padded = [curve.pad_item(x, 32) for x in items[:onion_items]]
    print(f"items={n} cpus_available={curve.default_workers()} os.cpu_count={os.cpu_count()}")
    reference: list[bytes] | None = None
    try:
        for w in workers_list:
            if w > 1:
                warm = items[: curve.PARALLEL_THRESHOLD]
                t0 = time.perf_counter()
                curve.hash_and_blind(warm, a, DOMAIN, workers=w)
                print(
                    f"workers={w} pool start + first {len(warm)}: {time.perf_counter() - t0:.2f} s"
                )
            blinded = timed(
                "hash_and_blind", n, w, partial(curve.hash_and_blind, items, a, DOMAIN, workers=w)
            )
            double = timed("reblind", n, w, partial(curve.reblind, blinded, b, workers=w))
            timed("validate", n, w, partial(curve.validate_points, double, workers=w))
            onions = timed(
                "seal x3", onion_items, w, partial(curve.seal_onions, padded, publics, workers=w)
            )
            for index, (_, secret) in enumerate(keys):
                onions = timed(
                    f"peel layer {index}",
                    onion_items,
                    w,
                    partial(curve.peel_onions, onions, secret, workers=w),
                )
            if onions != padded:
                raise SystemExit("onions did not peel back to the items")
            if reference is None:
                reference = double
            elif double != reference:
                raise SystemExit(f"workers={w}: result differs from the first run")
    finally:
        curve.shutdown_pool()


def protocol(n: int, parties: int) -> None:
    from fdrtd_server.local import LocalFederation

    names = tuple(f"party{i}" for i in range(1, parties + 1))
    shared = [f"customer-{i:09d}" for i in range(n // 2)]
    sets = {name: shared + [f"{name}-{i:09d}" for i in range(n - len(shared))] for name in names}
    with (
        tempfile.TemporaryDirectory() as root,
        LocalFederation(
            Path(root) / "fed", names=names, env={"FDRTD_ALLOW_SET_INTERSECTION": "true"}
        ) as federation,
    ):
        clients = federation.federation(timeout=120)
        handles = clients.upload({name: {"v": values} for name, values in sets.items()})
        inputs = {name: {"data": handles[name], "column": "v"} for name in names}
        for function in ("intersection", "intersection_size"):
            t0 = time.perf_counter()
            results = clients.compute("psi", function, inputs).results(900)
            wall = time.perf_counter() - t0
            sizes = {result["size"] for result in results}
            if sizes != {len(shared)}:
                raise SystemExit(f"{function}: wrong size {sizes}")
            print(
                f"{function:18s} {parties} parties x {n} items: {wall:6.2f} s "
                f"({parties * n / wall:8.0f} items/s over all parties)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--onion-items", type=int, default=10_000)
    parser.add_argument("--protocol", action="store_true", help="time the whole protocol")
    parser.add_argument("--parties", type=int, default=3)
    args = parser.parse_args()
    if args.protocol:
        protocol(args.items, args.parties)
    else:
        primitives(args.items, args.workers, min(args.onion_items, args.items))


if __name__ == "__main__":
    main()
