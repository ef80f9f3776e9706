from __future__ import annotations

import subprocess
import sys

import pytest
from postgres import PostgresDsn

from fdrtd_server.demo import run_demo

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
    "mean: pressure, differentially private",
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
    assert len(lines) == 33, run.stdout
    assert "DIFFERENT" not in run.stdout
    assert "off by default" in run.stdout
    assert "servers stopped." in run.stdout
    # custody: sources read in place, found through the directory, a refusal, versions
    assert "alpha keeps its patients in a SQLite database" in run.stdout
    assert "beta keeps its patients in a directory of CSV files" in run.stdout
    assert "'staff' (no grant) is refused: no dataset named 'staff'" in run.stdout
    assert "'patients' is one dataset of 3 fragments: alpha, beta, gamma" in run.stdout
    assert "(the versions of patients it read)" in run.stdout
    assert "the analyst, who uploaded nothing" in run.stdout
    assert "alpha: the analyst has epsilon 1.5 of 'registry' left" in run.stdout
    assert "receipt verified: 3 signed statements, 3 cosignatures" in run.stdout
    assert "receipt verify receipt.json --home alpha: receipt of smpc.mean signed by" in run.stdout
    for label in CATALOGUE:
        assert any(line.startswith(label) for line in lines), label


def test_demo_reports_a_refused_computation_and_goes_on(capsys: pytest.CaptureFixture[str]) -> None:
    """A computation the servers refuse shows one FAILED line; the others still run."""
    code = run_demo(rows=100, settings={"FDRTD_ALLOW_SET_UNION": "false"})
    out, err = capsys.readouterr()
    assert code == 1, out + err
    lines = out.splitlines()
    failed = [line for line in lines if "FAILED" in line]
    assert len(failed) == 1, out
    assert failed[0].lstrip().startswith("psi union: patients at any hospital"), out
    assert "FAILED: 403 from http://127.0.0.1:" in failed[0], out
    assert "does not allow set unions" in failed[0], out
    assert "allow_set_union = true" in failed[0], out
    oks = [line.strip() for line in lines if line.rstrip().endswith(" ok")]
    assert len(oks) == 32, out  # every line but the union's
    for label in ("median:", "quantiles:", "kth_smallest:"):  # after the union
        assert any(line.startswith(label) for line in oks), label
    assert "DIFFERENT" not in out
    # the introduction names only the switches that are on
    assert (
        "allow matrix_product, linear_regression_vertical, psi intersection, which can reveal"
        in out
    )
    assert "servers stopped." in out
    assert "1 result(s) failed or differ from the plaintext answer" in out
    assert "Traceback" not in out + err


def test_demo_reads_alpha_from_postgresql_when_one_answers(
    postgres_dsn: PostgresDsn, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With FDRTD_DEMO_POSTGRES_DSN, alpha's patients live in a real PostgreSQL table."""
    monkeypatch.setenv("FDRTD_DEMO_POSTGRES_DSN", postgres_dsn.owner)
    code = run_demo(rows=60)
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "alpha keeps its patients in PostgreSQL" in out
    assert "alpha  patients    postgresql" in out
