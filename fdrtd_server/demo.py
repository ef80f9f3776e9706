"""``fdrtd-server demo``: three parties on this machine compute a joint result.

Three real servers start on 127.0.0.1, each with its own embedded NATS and
its own synthetic private data (patients' systolic blood pressure at three
hospitals). The analyst asks for joint statistics; the servers compute them
by secure multiparty computation through their peer gateways, so no server
sees another's records. The demo prints the joint result beside the answer
computed in plain text from all the data at once, which only a demo can do.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from fdrtd_server.local import LocalFederation

__all__ = ["run_demo"]


def synthetic_data(rows: int, seed: int = 7) -> dict[str, np.ndarray]:
    """Each hospital's private blood pressure readings (mmHg)."""
    rng = np.random.default_rng(seed)
    return {
        "alpha": rng.normal(128.0, 15.0, rows).round(1),
        "beta": rng.normal(121.0, 12.0, rows + rows // 3).round(1),
        "gamma": rng.normal(135.0, 18.0, rows // 2 + 7).round(1),
    }


def _row(label: str, joint: float, plain: float) -> str:
    verdict = "ok" if np.isclose(joint, plain, rtol=1e-6, atol=1e-6) else "DIFFERENT"
    return f"  {label:<22}{joint:>16.6f}{plain:>16.6f}   {verdict}"


def run_demo(rows: int = 5000, keep: Path | None = None) -> int:
    """Run the demo; returns 0 when the joint result equals the plaintext answer."""
    data = synthetic_data(rows)
    everything = np.concatenate(list(data.values()))
    with tempfile.TemporaryDirectory(prefix="fdrtd-demo-") as scratch:
        root = keep or Path(scratch)
        print("starting three servers (alpha, beta, gamma) on 127.0.0.1 ...")
        started = time.perf_counter()
        with LocalFederation(root) as local:
            for server in local.servers.values():
                print(f"  {server.name:<6} {server.url}   home {server.home}")
            print(f"ready in {time.perf_counter() - started:.1f} s")
            federation = local.federation()
            handles = federation.upload(data)
            for name, handle in handles.items():
                print(
                    f"  {name} uploaded {data[name].size} private records"
                    f" -> handle {handle[:10]}..."
                )
            began = time.perf_counter()
            job = federation.compute(
                "smpc", "univariate", {name: {"data": h} for name, h in handles.items()}
            )
            joint = job.result(timeout=120)
            elapsed = time.perf_counter() - began
            print(
                f"\nsecure multiparty univariate statistics ({elapsed * 1000:.0f} ms, 3 parties):"
            )
            print(f"  {'statistic':<22}{'joint (SMPC)':>16}{'plaintext':>16}")
            plain = {
                "samples": float(everything.size),
                "mean": float(everything.mean()),
                "standard_deviation": float(everything.std(ddof=1)),
                "minimum": float(everything.min()),
                "maximum": float(everything.max()),
                "skewness": float(
                    ((everything - everything.mean()) ** 3).mean() / everything.std() ** 3
                ),
            }
            failures = 0
            for key, value in plain.items():
                line = _row(key, float(joint[key]), value)
                failures += "DIFFERENT" in line
                print(line)
            total = federation.compute(
                "smpc", "secure_sum", {name: {"data": h} for name, h in handles.items()}
            ).result(timeout=60)
            line = _row("secure sum", float(np.asarray(total["sum"])), float(everything.sum()))
            failures += "DIFFERENT" in line
            print(line)
            print("\nno server saw another's records; the analyst saw only the joint result.")
        print("servers stopped.")
    if failures:
        print(f"{failures} statistic(s) differ from the plaintext answer")
        return 1
    return 0
