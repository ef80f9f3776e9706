from __future__ import annotations

import subprocess
import sys


def test_demo_prints_joint_results_equal_to_plaintext() -> None:
    """`fdrtd-server demo`: three servers, SMPC results beside the plaintext answers."""
    run = subprocess.run(
        [sys.executable, "-m", "fdrtd_server", "demo", "--rows", "400"],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if line.rstrip().endswith(" ok")]
    assert len(lines) == 13, run.stdout
    assert "DIFFERENT" not in run.stdout
    assert "servers stopped." in run.stdout
    for label in ("mean", "median blood pressure", "patients at all three hospitals (PSI)"):
        assert any(label in line for line in lines), label
