"""PSI at scale: a 3-party set intersection size at 100k, 300k and 1M items per party.

    python bench/psi_scale.py                      # 100k, 300k, 1M; writes bench/PSI_SCALE.md
    python bench/psi_scale.py --sizes 100000       # one size

Three real servers on this machine (``LocalFederation``), the default session
timeout (30 s), so that a party busy blinding a million items must be told
apart from a dead one by its heartbeats (issue 11, item 12). For each size it
records the wall time of ``psi.intersection_size`` end to end and the peak
memory of each server: the high-water mark (``VmHWM``) of the server process
and of everything it started (nats-server, the forkserver and the pool
workers), summed, read from ``/proc`` after the run. The servers are started
afresh for each size, so that each peak is that size's own.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from fdrtd_server.local import LocalFederation


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(_children(current))
    return out


def _hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_size(items: int, seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    common = rng.choice(10 * items, items // 10, replace=False)
    with (
        tempfile.TemporaryDirectory(prefix="fdrtd-psi-") as scratch,
        LocalFederation(Path(scratch) / "fed") as local,
    ):
        fed = local.federation(timeout=600)
        data = {}
        for number, name in enumerate(local.servers):
            own = rng.choice(10 * items, items - len(common), replace=False) + (number + 1) * (
                100 * items
            )
            data[name] = {"item": np.concatenate([common, own]).astype(np.int64)}
        handles = fed.upload(data)
        expected = len(set.intersection(*(set(d["item"].tolist()) for d in data.values())))
        inputs = {n: {"data": h, "column": "item"} for n, h in handles.items()}
        start = time.perf_counter()
        result = fed.compute("psi", "intersection_size", inputs).result(timeout=3600)
        elapsed = time.perf_counter() - start
        assert result["size"] == expected, (result, expected)
        peaks = {}
        for name, server in local.servers.items():
            assert server.process is not None
            tree = _tree(server.process.pid)
            peaks[name] = (_hwm_mb(server.process.pid), sum(_hwm_mb(pid) for pid in tree))
    return {"items": items, "seconds": elapsed, "size": expected, "peaks": peaks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("PSI_SCALE.md"))
    args = parser.parse_args()
    rows = []
    for items in args.sizes:
        row = run_size(items, seed=items)
        print(row, flush=True)
        rows.append(row)
    lines = [
        "# PSI at scale: 3-party intersection size",
        "",
        f"Recorded {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on "
        f"{platform.node()} ({os.cpu_count()} cores, {platform.machine()}, "
        f"Python {platform.python_version()}), by `python bench/psi_scale.py`. "
        "Three servers on this one machine, default session timeout (30 s). Peak memory "
        "is the high-water mark (VmHWM) of each server process, and of it and every "
        "process it started (nats-server, forkserver, pool workers) summed.",
        "",
        "| items per party | intersection | wall time | peak per server process | "
        "peak per server with its children (summed) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        peaks = row["peaks"]
        assert isinstance(peaks, dict)
        own = ", ".join(f"{name} {p[0]:.0f} MB" for name, p in peaks.items())
        tree = ", ".join(f"{name} {p[1]:.0f} MB" for name, p in peaks.items())
        lines.append(
            f"| {row['items']:,} | {row['size']:,} | {row['seconds']:.1f} s | {own} | {tree} |"
        )
    lines.append("")
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
