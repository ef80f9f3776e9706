from __future__ import annotations

import subprocess
import sys

CATALOGUE = (
    "count:",
    "secure_sum: age",
    "secure_sum: admissions 4x3, elementwise",
    "minimum_maximum:",
    "univariate: pressure mean",
    "univariate: pressure geometric_mean",
    "bivariate: age, pressure covariance",
    "bivariate: age, pressure correlation",
    "bivariate: pressure ~ age slope, intercept",
    "frequency_table:",
    "histogram:",
    "contingency_table:",
    "contingency_table_vertical:",
    "linear_regression:",
    "linear_regression_vertical:",
    "logistic_regression:",
    "matrix_product:",
    "psi intersection:",
    "psi intersection_size:",
    "psi union:",
    "median:",
    "quantiles:",
    "kth_smallest:",
)
"""A label fragment of every function of the catalogue (each line starts with its name)."""


def test_demo_prints_joint_results_equal_to_plaintext() -> None:
    """`fdrtd-server demo`: three servers, SMPC results beside the plaintext answers."""
    run = subprocess.run(
        [sys.executable, "-m", "fdrtd_server", "demo", "--rows", "400"],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    lines = [line.strip() for line in run.stdout.splitlines() if line.rstrip().endswith(" ok")]
    assert len(lines) == 32, run.stdout
    assert "DIFFERENT" not in run.stdout
    assert "off by default" in run.stdout
    assert "servers stopped." in run.stdout
    for label in CATALOGUE:
        assert any(line.startswith(label) for line in lines), label
