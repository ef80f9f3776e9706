"""Differentially private linear regression without servers: noisy sufficient statistics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from fdrtd_server.errors import ComputationFailed, Forbidden, OutOfRange
from fdrtd_server.microservice import Dataset
from fdrtd_server.policy import DatasetPolicy, Privacy
from fdrtd_server.privacy import Ledger, MemoryStore, terms_for
from fdrtd_server.sdk.smpc import SmpcSession
from fdrtd_server.sdk.testing import MemoryFederation
from protocols.smpc import regression
from protocols.smpc.service import service

BOUNDS = {"x1": (0.0, 10.0), "x2": (0.0, 10.0), "y": (-20.0, 40.0)}
POLICY = DatasetPolicy(bounds=BOUNDS, privacy=Privacy(epsilon=1.0, analyst_epsilon=100.0))
PARTIES = ("alpha", "beta", "gamma")
TRUTH = {"intercept": 1.0, "x1": 2.0, "x2": -0.5}


def _data(rows: int, seed: int) -> dict[str, np.ndarray[Any, Any]]:
    generator = np.random.default_rng(seed)
    x1, x2 = generator.uniform(0, 10, rows), generator.uniform(0, 10, rows)
    y = TRUTH["intercept"] + TRUTH["x1"] * x1 + TRUTH["x2"] * x2 + generator.normal(0, 1, rows)
    return {"x1": x1, "x2": x2, "y": y}


def _federation(rows: int, dp: Sequence[str], policy: DatasetPolicy = POLICY) -> MemoryFederation:
    return MemoryFederation(
        datasets={p: {"d": _data(rows, k)} for k, p in enumerate(PARTIES)},
        policies={p: {"d": policy} for p in dp},
    )


def _exact_local(data: dict[str, np.ndarray[Any, Any]]) -> list[float]:
    x = np.column_stack([np.ones(data["y"].size), data["x1"], data["x2"]])
    y = data["y"]
    return [float(y @ y), *map(float, x.T @ y), *(x.T @ x)[np.triu_indices(3)]]


def test_a_dp_partys_sufficient_statistics_are_noisy_before_they_are_shared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # what each party puts into the secure sum, recorded on its way in
    shared: dict[str, list[list[float]]] = {}
    original = SmpcSession.sum_big

    async def recording(self: SmpcSession, values: Sequence[float]) -> list[float]:
        shared.setdefault(self.peers.me, []).append(list(values))
        return await original(self, values)

    monkeypatch.setattr(SmpcSession, "sum_big", recording)
    fed = _federation(5000, ["alpha"])  # enough rows that the noisy X'X stays positive definite
    result = fed.run_sync(service, "linear_regression", data="d", x=["x1", "x2"], y="y")
    statement = result["alpha"]["privacy"]["d"]
    assert set(statement["noise"]) == {"count", "gram"}
    assert statement["bounds"] == {k: list(v) for k, v in BOUNDS.items()}
    assert statement["noise"]["gram"]["sensitivity"] == 10.0  # K = 10 statistics, each at most 1
    assert "privacy" not in result["beta"]
    count, sums = shared["alpha"]
    exact = _exact_local(fed.tables["alpha"]["d"])
    assert count != [5000.0] or sums != pytest.approx(exact)
    assert sums != pytest.approx(exact, rel=1e-9)  # every element carries noise
    assert sum(s != pytest.approx(e, rel=1e-12) for s, e in zip(sums, exact, strict=True)) >= 8
    # the parties computing on their own uploads share their exact statistics
    assert shared["beta"] == [[5000.0], pytest.approx(_exact_local(fed.tables["beta"]["d"]))]
    assert result["alpha"]["coefficients"] == result["beta"]["coefficients"]


def test_coefficients_of_a_large_dp_regression_are_near_the_truth() -> None:
    fed = _federation(50_000, PARTIES)
    result = fed.run_sync(
        service, "linear_regression", data="d", x=["x1", "x2"], y="y", epsilon=2.0
    )
    fitted = result["alpha"]["coefficients"]
    # each party's noise has scale 10 in units of the bounds' products (l1 sensitivity 10,
    # epsilon 1 for the statistics) against sums of about 150,000 of them: measured over
    # 20 runs, the intercept strays by about 0.075 (1 sd; y's bound of 40 weighs on it)
    # and the slopes by about 0.01; the margins are eight and ten of those
    assert fitted["intercept"] == pytest.approx(TRUTH["intercept"], abs=0.6)
    assert fitted["x1"] == pytest.approx(TRUTH["x1"], abs=0.1)
    assert fitted["x2"] == pytest.approx(TRUTH["x2"], abs=0.1)
    assert abs(result["alpha"]["samples"] - 150_000) < 500
    for party in PARTIES:
        assert result[party]["privacy"]["d"]["epsilon"] == 2.0
        assert fed.ledgers[party].store.entries  # type: ignore[attr-defined]


def test_a_column_without_bounds_is_refused_before_the_spend() -> None:
    unbounded = DatasetPolicy(
        bounds={"x1": (0.0, 10.0), "y": (-20.0, 40.0)},
        privacy=Privacy(epsilon=1.0, analyst_epsilon=100.0),
    )
    fed = _federation(50, PARTIES, unbounded)
    with pytest.raises(Forbidden, match="column 'x2' of dataset 'd' has no declared bounds"):
        fed.run_sync(service, "linear_regression", data="d", x=["x1", "x2"], y="y")
    assert all(ledger.store.entries == {} for ledger in fed.ledgers.values())  # type: ignore[attr-defined]


def test_logistic_and_vertical_regression_stay_refused_under_dp() -> None:
    fed = _federation(50, PARTIES)
    with pytest.raises(Forbidden, match="requires differential privacy"):
        fed.run_sync(service, "logistic_regression", data="d", x=["x1"], y="y")
    assert all(ledger.store.entries == {} for ledger in fed.ledgers.values())  # type: ignore[attr-defined]


def test_a_tiny_epsilon_gets_coarser_units_and_beyond_them_a_refusal_before_the_spend() -> None:
    low = DatasetPolicy(
        bounds=BOUNDS, privacy=Privacy(epsilon=1.0, min_epsilon=1e-30, analyst_epsilon=100.0)
    )
    fed = _federation(50, PARTIES, low)
    with pytest.raises(OutOfRange, match="above 2\\^50") as refused:
        fed.run_sync(service, "linear_regression", data="d", x=["x1", "x2"], y="y", epsilon=1e-24)
    assert "nothing was spent" in str(refused.value) and "frac_bits" not in str(refused.value)
    assert all(ledger.store.entries == {} for ledger in fed.ledgers.values())  # type: ignore[attr-defined]
    # an epsilon the 16-bit units cannot serve runs at fewer bits, noisily
    gram = regression._private_plan(
        _dp_dataset(low), {"y": "y", "epsilon": 1e-9}, ["intercept", "x1", "x2"], True
    )
    assert gram is not None and gram.frac_bits < regression.DP_FRAC_BITS


def _dp_dataset(policy: DatasetPolicy) -> Dataset:
    terms = terms_for("d", policy, "ann", True, lambda: Ledger(MemoryStore()))
    return Dataset({"y": np.zeros(3)}, 3, privacy=terms)


def test_a_noisy_gram_that_is_not_positive_definite_is_a_clear_422() -> None:
    xtx = np.array([[10.0, 20.0], [20.0, 5.0]])
    with pytest.raises(ComputationFailed, match="not positive definite") as failed:
        regression._solve_private(xtx, np.array([1.0, 2.0]), 9.0, 10, ["intercept", "x"], True)
    assert failed.value.status == 422 and "'epsilon'" in str(failed.value)
