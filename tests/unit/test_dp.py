"""Differential privacy without servers: calibration, integer noise, the ledger, the protocols."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Coroutine
from fractions import Fraction
from typing import Any, TypeVar

import numpy as np
import pytest

from fdrtd_server.errors import BadRequest, Forbidden, OutOfRange
from fdrtd_server.microservice import Dataset
from fdrtd_server.policy import DatasetPolicy, Privacy
from fdrtd_server.privacy import Budget, Ledger, MemoryStore, PrivateTerms, Spent, exact
from fdrtd_server.sdk import privacy
from fdrtd_server.sdk.testing import MemoryFederation
from microservices.compute import _histogram
from protocols.smpc.service import service

CASES = [
    ("laplace", 1, Fraction(1, 3), Fraction(0)),
    ("laplace", 50 << 20, Fraction(1, 10), Fraction(0)),
    ("laplace", 7, Fraction(3, 2), Fraction(0)),
    ("gaussian", 1, Fraction(1, 2), Fraction(1, 10**6)),
    ("gaussian", 120 << 20, Fraction(1, 10), Fraction(1, 10**7)),
]


@pytest.mark.parametrize(("mechanism", "sensitivity", "epsilon", "delta"), CASES)
def test_the_epsilon_opendp_reports_for_the_scale_is_at_most_the_charge(
    mechanism: str, sensitivity: int, epsilon: Fraction, delta: Fraction
) -> None:
    scale = privacy.calibrate(mechanism, sensitivity, epsilon, delta)
    assert privacy.privacy_loss(mechanism, scale, sensitivity, delta) <= epsilon
    # and it is tight: a scale a little smaller would cost more than was charged
    smaller = scale * (1 - 1e-9)
    assert privacy.privacy_loss(mechanism, smaller, sensitivity, delta) > epsilon


@pytest.mark.parametrize(("mechanism", "sensitivity", "epsilon", "delta"), CASES)
def test_a_remembered_calibration_is_the_search_s_own_answer(
    mechanism: str, sensitivity: int, epsilon: Fraction, delta: Fraction
) -> None:
    searched = privacy._bisect.__wrapped__(mechanism, sensitivity, epsilon, delta)
    first = privacy.calibrate(mechanism, sensitivity, epsilon, delta)
    hits = privacy._bisect.cache_info().hits
    again = privacy.calibrate(mechanism, sensitivity, epsilon, delta)
    assert first == again == searched
    assert privacy._bisect.cache_info().hits == hits + 1  # the second came from the cache


def test_calibration_refuses_what_cannot_be_calibrated() -> None:
    with pytest.raises(BadRequest):
        privacy.calibrate("laplace", 1, Fraction(0), Fraction(0))
    with pytest.raises(BadRequest):
        privacy.calibrate("gaussian", 1, Fraction(1), Fraction(0))


@pytest.mark.parametrize("mechanism", ["laplace", "gaussian"])
def test_noise_is_integer_not_the_identity_and_about_as_wide_as_its_scale(mechanism: str) -> None:
    drawn = privacy.noise(mechanism, 10.0, 4000, Fraction(1, 10**6))
    assert all(isinstance(v, int) for v in drawn)
    assert len(set(drawn)) > 10
    variance = statistics.pvariance(drawn)
    expected = 2 * 10.0**2 if mechanism == "laplace" else 10.0**2
    # 4,000 draws: the sample variance is within a factor of 1.5 with overwhelming odds
    assert expected / 1.5 < variance < expected * 1.5
    assert abs(statistics.fmean(drawn)) < 2.0


def test_fixed_point_units_and_sensitivity_are_exact_integers() -> None:
    values = privacy.clamped([-5.0, 0.5, 200.0], (0.0, 120.0))
    assert list(values) == [0.0, 0.5, 120.0]
    units = privacy.fixed_units(values, 20)
    assert units.dtype == np.int64 and list(units) == [0, 1 << 19, 120 << 20]
    assert privacy.fixed_sensitivity((-3.0, 2.0), 20) == 3 << 20


T = TypeVar("T")


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def test_three_spends_of_a_third_fit_in_one_and_a_fourth_is_refused() -> None:
    ledger = Ledger(MemoryStore())
    terms = Privacy(analyst_epsilon=1.0, total_epsilon=10.0)
    third = Spent(Fraction(1, 3))
    for _ in range(3):
        _run(ledger.spend("d", "ann", terms, third))
    with pytest.raises(Forbidden) as refused:
        _run(ledger.spend("d", "ann", terms, Spent(Fraction(1, 10**9))))
    assert "'d'" in str(refused.value) and "remains for you is epsilon 0 " in str(refused.value)
    budget = _run(ledger.budget("d", "ann", terms))
    assert budget.analyst.epsilon == 1 and budget.total.epsilon == 1


def test_ten_spends_of_a_tenth_as_floats_fit_exactly() -> None:
    ledger = Ledger(MemoryStore())
    terms = Privacy(analyst_epsilon=1.0)
    for _ in range(10):
        _run(ledger.spend("d", "ann", terms, Spent(exact(0.1))))
    assert _run(ledger.budget("d", "ann", terms)).analyst.epsilon == 1


def test_the_total_caps_every_analyst_together() -> None:
    ledger = Ledger(MemoryStore())
    terms = Privacy(analyst_epsilon=1.0, total_epsilon=1.5)
    _run(ledger.spend("d", "ann", terms, Spent(Fraction(1))))
    with pytest.raises(Forbidden) as refused:
        _run(ledger.spend("d", "bob", terms, Spent(Fraction(1))))
    assert "epsilon 0.5 and delta" in str(refused.value)  # what the total leaves
    _run(ledger.spend("d", "bob", terms, Spent(Fraction(1, 2))))


def test_concurrent_spends_never_overspend() -> None:
    ledger = Ledger(MemoryStore())
    terms = Privacy(analyst_epsilon=100.0, total_epsilon=2.0)

    async def race() -> list[object]:
        spends = [ledger.spend("d", f"analyst{i}", terms, Spent(Fraction(1, 2))) for i in range(10)]
        return await asyncio.gather(*spends, return_exceptions=True)

    outcomes = _run(race())
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 4
    assert all(isinstance(o, Forbidden) for o in outcomes if isinstance(o, BaseException))


POLICY = DatasetPolicy(
    bounds={"x": (0.0, 10.0)}, privacy=Privacy(epsilon=1.0, analyst_epsilon=100.0)
)
ROWS = {
    "alpha": [1.0, 2.0, 3.0, 4.0, 5.0],
    "beta": [2.0, 4.0, 6.0, 8.0, 10.0, 12.0],
    "gamma": [0.5, 1.5, 2.5, 3.5],
}


def test_what_colluding_parties_learn_of_a_dp_party_is_already_noisy() -> None:
    # alpha's dataset needs DP; beta and gamma compute on their own data (no noise),
    # so the opened sum minus theirs is exactly what alpha put into the secret sharing
    fed = MemoryFederation(
        datasets={p: {"d": {"x": v}} for p, v in ROWS.items()},
        policies={"alpha": {"d": POLICY}},
    )
    exact_alpha = sum(ROWS["alpha"])  # within the bounds: clamping changes nothing
    shared = []
    for _ in range(4):
        result = fed.run_sync(service, "secure_sum", data="d", column="x")
        others = sum(ROWS["beta"]) + sum(ROWS["gamma"])
        shared.append(result["beta"]["sum"] - others)
        assert "privacy" in result["alpha"] and "privacy" not in result["beta"]
        assert result["alpha"]["privacy"]["d"]["noise"]["sum"]["scale"] == pytest.approx(20.0)
    assert all(s != pytest.approx(exact_alpha, abs=1e-6) for s in shared)
    assert len(set(shared)) == 4  # fresh noise each run


def test_three_dp_parties_open_a_noisy_sum_and_count() -> None:
    # ten copies of each party's rows: a noisy joint count under the cohort of 3 (from
    # 150 records, noise of scale 2 from each party) never happens in practice
    fed = MemoryFederation(
        datasets={p: {"d": {"x": v * 10}} for p, v in ROWS.items()},
        policies={p: {"d": POLICY} for p in ROWS},
    )
    exact = 10 * sum(sum(v) for v in ROWS.values())
    results = [fed.run_sync(service, "secure_sum", data="d", column="x") for _ in range(3)]
    for result in results:
        assert result["alpha"]["sum"] == result["beta"]["sum"] == result["gamma"]["sum"]
    assert all(r["alpha"]["sum"] != pytest.approx(exact, abs=1e-6) for r in results)


def test_a_column_without_bounds_is_refused_for_a_sum_but_not_for_a_count() -> None:
    unbounded = DatasetPolicy(privacy=Privacy(epsilon=1.0, analyst_epsilon=100.0))
    fed = MemoryFederation(
        ("alpha", "beta"),
        datasets={p: {"d": {"x": ROWS[p] * 2}} for p in ("alpha", "beta")},
        policies={p: {"d": unbounded} for p in ("alpha", "beta")},
    )
    with pytest.raises(Forbidden, match="column 'x' of dataset 'd' has no declared bounds"):
        fed.run_sync(service, "secure_sum", data="d", column="x")
    # nothing was spent by the refused sum; a count needs no bounds
    assert fed.ledgers["alpha"].store.entries == {}  # type: ignore[attr-defined]
    counted = fed.run_sync(service, "count", data="d")
    assert "privacy" in counted["alpha"]


def test_functions_without_dp_are_refused_before_anything_is_spent() -> None:
    fed = MemoryFederation(
        ("alpha", "beta"),
        datasets={p: {"d": {"x": ROWS[p] * 2}} for p in ("alpha", "beta")},
        policies={p: {"d": POLICY} for p in ("alpha", "beta")},
    )
    for function in ("univariate", "minimum_maximum"):
        with pytest.raises(Forbidden, match="requires differential privacy"):
            fed.run_sync(service, function, data="d", column="x")
    assert fed.ledgers["alpha"].store.entries == {}  # type: ignore[attr-defined]


# --- the attacks of the first review: saturated noise, probes by refusal, repeated parts ---


@pytest.mark.parametrize("scale", [1e300, float(1 << 64)])
def test_noise_that_saturates_the_sampler_is_refused_never_returned(scale: float) -> None:
    # OpenDP's i64 output saturates at 2^63 - 1: every draw would be one constant
    with pytest.raises(OutOfRange, match="'epsilon'"):
        privacy.noise("laplace", scale, 16)


def test_calibration_turns_opendp_overflows_into_a_refusal() -> None:
    with pytest.raises(OutOfRange, match="'epsilon'"):
        privacy.calibrate("gaussian", 1, Fraction(10**6), Fraction(1, 10**7))


LOW_FLOOR = DatasetPolicy(
    bounds={"x": (0.0, 10.0)},
    privacy=Privacy(epsilon=1.0, min_epsilon=1e-30, analyst_epsilon=100.0),
)


@pytest.mark.parametrize("function", ["count", "secure_sum", "mean"])
def test_a_scale_beyond_the_sampler_is_refused_before_the_spend(function: str) -> None:
    fed = MemoryFederation(
        ("alpha", "beta"),
        datasets={p: {"d": {"x": ROWS[p]}} for p in ("alpha", "beta")},
        policies={p: {"d": LOW_FLOOR} for p in ("alpha", "beta")},
    )
    column = {} if function == "count" else {"column": "x"}
    with pytest.raises(OutOfRange, match="above 2\\^50") as refused:
        fed.run_sync(service, function, data="d", epsilon=1e-24, **column)
    assert "nothing was spent" in str(refused.value)
    assert all(ledger.store.entries == {} for ledger in fed.ledgers.values())  # type: ignore[attr-defined]


def test_an_epsilon_below_the_owners_floor_is_a_bad_request_before_the_spend() -> None:
    fed = MemoryFederation(
        ("alpha", "beta"),
        datasets={p: {"d": {"x": ROWS[p]}} for p in ("alpha", "beta")},
        policies={p: {"d": POLICY} for p in ("alpha", "beta")},  # min_epsilon 0.001
    )
    with pytest.raises(BadRequest, match="min_epsilon"):
        fed.run_sync(service, "count", data="d", epsilon=1e-24)
    assert all(ledger.store.entries == {} for ledger in fed.ledgers.values())  # type: ignore[attr-defined]


@pytest.mark.parametrize("rows", [4, 5])
def test_whether_a_sum_fits_the_ring_is_decided_before_the_spend_on_public_terms(
    rows: int,
) -> None:
    # bounds [0, 1e6] at frac_bits 40: 4 records fit in 2^62, 5 do not; the answer must
    # not depend on which (the first release refused 5 after the spend, served 4)
    wide = DatasetPolicy(
        bounds={"x": (0.0, 1e6)}, privacy=Privacy(epsilon=1.0, analyst_epsilon=100.0)
    )
    fed = MemoryFederation(
        ("alpha", "beta"),
        datasets={
            "alpha": {"d": {"x": np.arange(1.0, rows + 1)}},
            "beta": {"d": {"x": np.zeros(9)}},
        },
        policies={"alpha": {"d": wide}},
    )
    details = []
    for frac_bits in (40, 25):
        with pytest.raises(OutOfRange) as refused:
            fed.run_sync(service, "secure_sum", data="d", column="x", frac_bits=frac_bits)
        details.append(str(refused.value))
    assert "fewer 'frac_bits'" in details[0] and "ask for at most 22 'frac_bits'" in details[1]
    assert fed.ledgers["alpha"].store.entries == {}  # type: ignore[attr-defined]


def _release(parts: list[privacy.Statistic]) -> privacy.Release:
    ledger = Ledger(MemoryStore())
    terms = PrivateTerms(
        "d",
        Privacy(epsilon=1.0, analyst_epsilon=10.0),
        {"x": (0.0, 10.0)},
        "ann",
        lambda d, a, p, w, n: ledger.spend(d, a, p, w, needs=n),
    )
    dataset = Dataset({"x": np.zeros(3)}, 3)
    dataset.privacy = terms
    plan = privacy.plan_release(dataset, None, parts, "'test'")
    assert plan is not None
    return _run(plan.spend())


def test_a_release_noises_each_declared_statistic_once() -> None:
    release = _release([privacy.Statistic("sum", 1), privacy.Statistic("count", 1)])
    release.noisy("sum", [10])
    with pytest.raises(RuntimeError):  # a second sum would spend what was paid for once
        release.noisy("sum", [10])
    with pytest.raises(RuntimeError):  # and the count can no longer be drawn either
        release.noisy("count", [3])
    with pytest.raises(RuntimeError):
        _release([privacy.Statistic("sum", 1)]).noisy("other", [1])
    with pytest.raises(ValueError):
        _release([privacy.Statistic("sum", 1), privacy.Statistic("sum", 1)])


def test_an_analyst_is_shown_her_own_budget_and_the_smaller_remainder() -> None:
    budget = Budget(
        "d",
        analyst=Spent(Fraction(1, 4)),
        total=Spent(Fraction(9, 10)),
        analyst_cap=Spent(Fraction(1)),
        total_cap=Spent(Fraction(1)),
        analysts={"ann": Spent(Fraction(1, 4)), "bob": Spent(Fraction(13, 20))},
    )
    own = budget.own()
    assert own["spent"] == {"analyst": {"epsilon": 0.25, "delta": 0.0}}
    assert own["remaining"] == {"analyst": {"epsilon": pytest.approx(0.1), "delta": 0.0}}
    assert "total" not in str(own) and "bob" not in str(own)
    assert budget.to_dict()["spent"]["total"]["epsilon"] == pytest.approx(0.9)  # the owner's


def test_noisy_histogram_cells_beyond_int64_are_shown_not_a_500() -> None:
    edges = np.array([0.0, 1.0, 2.0])
    shown = _histogram(np.array([0.5]), edges, 3, True, [2**70, 2**64, 1])
    visible = [c for c in shown["counts"] if c is not None]
    assert visible and set(visible) <= {2**70, 2**64} and shown["other"] is None
