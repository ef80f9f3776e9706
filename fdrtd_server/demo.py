"""``fdrtd-server demo``: three parties on this machine compute joint results.

Three real servers start on 127.0.0.1, each with its own embedded NATS and
its own synthetic private data: the patients of three hospitals (an id, age,
systolic blood pressure, smoker or not). The analyst asks for joint
statistics, a table, a regression, a median and the number of patients
treated at all three hospitals; the servers compute each by secure
multiparty computation through their peer gateways, so no server sees
another's records. The demo prints every joint result beside the answer
computed in plain text from all the data at once, which only a demo can do.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fdrtd_client import Federation
from fdrtd_server.local import LocalFederation

__all__ = ["run_demo", "synthetic_data"]

Table = dict[str, Any]


def synthetic_data(rows: int, seed: int = 7) -> dict[str, Table]:
    """Each hospital's private patients: id, age, blood pressure, smoker."""
    rng = np.random.default_rng(seed)
    shared_ids = rng.choice(10**9, size=max(3, rows // 10), replace=False)
    hospitals: dict[str, Table] = {}
    for name, size, base in (
        ("alpha", rows, 118.0),
        ("beta", rows + rows // 3, 112.0),
        ("gamma", rows // 2 + 7, 124.0),
    ):
        age = rng.uniform(20, 85, size).round()
        smoker = rng.random(size) < 0.25
        pressure = (base + 0.45 * age + 9.0 * smoker + rng.normal(0, 11, size)).round(1)
        own_ids = rng.choice(10**9, size=size - shared_ids.size, replace=False) + 10**9
        hospitals[name] = {
            "id": [f"p{i}" for i in np.concatenate([shared_ids, own_ids])],
            "age": age,
            "pressure": pressure,
            "smoker": ["yes" if s else "no" for s in smoker],
        }
    return hospitals


def _close(joint: Any, plain: Any) -> bool:
    return bool(
        np.allclose(
            np.asarray(joint, dtype=float), np.asarray(plain, dtype=float), rtol=1e-6, atol=1e-6
        )
    )


def _line(label: str, joint: Any, plain: Any) -> tuple[str, bool]:
    ok = _close(joint, plain)
    verdict = "ok" if ok else "DIFFERENT"
    return f"  {label:<48}{_fmt(joint):>30}{_fmt(plain):>30}   {verdict}", ok


def _fmt(value: Any) -> str:
    array = np.asarray(value, dtype=float)
    if array.ndim == 0:
        return f"{float(array):.6g}"
    return "[" + ", ".join(f"{v:.6g}" for v in array.ravel()) + "]"


def run_demo(rows: int = 5000, keep: Path | None = None) -> int:
    """Run the demo; returns 0 when every joint result equals the plaintext answer."""
    data = synthetic_data(rows)
    every = {
        key: np.concatenate([np.asarray(t[key]) for t in data.values()])
        for key in ("age", "pressure", "smoker")
    }
    bp, age = every["pressure"].astype(float), every["age"].astype(float)
    smoker = every["smoker"]
    failures = 0
    with tempfile.TemporaryDirectory(prefix="fdrtd-demo-") as scratch:
        root = keep or Path(scratch)
        print("starting three servers (alpha, beta, gamma) on 127.0.0.1 ...")
        started = time.perf_counter()
        with LocalFederation(root) as local:
            for server in local.servers.values():
                print(f"  {server.name:<6} {server.url}   home {server.home}")
            print(f"ready in {time.perf_counter() - started:.1f} s\n")
            federation: Federation = local.federation(timeout=120)
            handles = federation.upload(data)
            for name, handle in handles.items():
                count = len(data[name]["id"])
                print(f"  {name} uploaded {count} private patient records -> {handle[:12]}...")
            mine = {name: {"data": handle} for name, handle in handles.items()}
            print(f"\n  {'joint result (computed by SMPC)':<48}{'joint':>30}{'plaintext':>30}")

            def show(
                label: str,
                function: str,
                common: dict[str, Any],
                pick: Callable[[Any], Any],
                plain: Any,
            ) -> None:
                nonlocal failures
                began = time.perf_counter()
                result = federation.compute(
                    "smpc" if function != "intersection_size" else "psi", function, mine, **common
                ).result(timeout=120, progress=False)
                elapsed = (time.perf_counter() - began) * 1000
                line, ok = _line(f"{label} ({elapsed:.0f} ms)", pick(result), plain)
                failures += not ok
                print(line)

            stats = federation.compute("smpc", "univariate", mine, column="pressure").result(
                timeout=120, progress=False
            )
            mean, sd = bp.mean(), bp.std(ddof=1)
            plain_stats = {
                "samples": bp.size,
                "mean": mean,
                "standard_deviation": sd,
                "minimum": bp.min(),
                "maximum": bp.max(),
                "skewness": ((bp - mean) ** 3).mean() / bp.std() ** 3,
                "kurtosis": ((bp - mean) ** 4).mean() / bp.var() ** 2,
            }
            for key, plain in plain_stats.items():
                line, ok = _line(f"blood pressure: {key}", stats[key], plain)
                failures += not ok
                print(line)
            show(
                "secure sum of ages", "secure_sum", {"column": "age"}, lambda r: r["sum"], age.sum()
            )
            show(
                "correlation age ~ pressure",
                "bivariate",
                {"x": "age", "y": "pressure"},
                lambda r: r["correlation_coefficient"],
                np.corrcoef(age, bp)[0, 1],
            )
            design = np.column_stack([np.ones_like(age), age, (smoker == "yes").astype(float)])
            smoker_data = {
                n: {**t, "smoker01": [1.0 if s == "yes" else 0.0 for s in t["smoker"]]}
                for n, t in data.items()
            }
            handles2 = federation.upload(smoker_data)
            mine2 = {name: {"data": handle} for name, handle in handles2.items()}
            began = time.perf_counter()
            ols = federation.compute(
                "smpc", "linear_regression", mine2, x=["age", "smoker01"], y="pressure"
            ).result(timeout=120, progress=False)
            beta = np.linalg.lstsq(design, bp, rcond=None)[0]
            joint_beta = [ols["coefficients"][k] for k in ols["coefficients"]]
            elapsed = (time.perf_counter() - began) * 1000
            line, ok = _line(f"pressure ~ age + smoker ({elapsed:.0f} ms)", joint_beta, beta)
            failures += not ok
            print(line)
            show(
                "smokers (frequency table)",
                "frequency_table",
                {"column": "smoker", "categories": ["no", "yes"]},
                lambda r: r["counts"],
                [np.sum(smoker == "no"), np.sum(smoker == "yes")],
            )
            show(
                "median blood pressure",
                "median",
                {"column": "pressure"},
                lambda r: r["median"],
                np.median(bp),
            )
            common_ids = (
                set(data["alpha"]["id"]) & set(data["beta"]["id"]) & set(data["gamma"]["id"])
            )
            show(
                "patients at all three hospitals (PSI)",
                "intersection_size",
                {"column": "id"},
                lambda r: r["size"],
                len(common_ids),
            )
            print("\nno server saw another's records; the analyst saw only the joint results.")
        print("servers stopped.")
    if failures:
        print(f"{failures} result(s) differ from the plaintext answer")
        return 1
    return 0
