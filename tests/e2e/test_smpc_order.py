"""End to end: k-th smallest, median and quantiles by SMPC, checked against numpy.

Every protocol run goes through real servers (2, 3 and 5 parties) and its
result must equal numpy's on the pooled data exactly, on every party. Each
search costs 64 comparison rounds, so the runs are chosen to cover the cases
with few calls: a quantile whose virtual index is an integer is the order
statistic itself, which checks several ranks in one run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from fdrtd_client.errors import BadRequest, ComputationFailed, Forbidden
from fdrtd_server.local import LocalFederation
from fdrtd_server.sdk import ring
from protocols.smpc.order import dyadic_cover, interpolate, quantile_ranks

TIMEOUT = 90.0
PROBABILITIES = [0.0, 0.1, 0.25, 0.5, 0.9, 1.0]


@dataclass
class Joint:
    """Datasets uploaded to a federation, and the pooled values numpy sees."""

    federation: LocalFederation
    handles: Mapping[str, str]
    pooled: np.ndarray[Any, np.dtype[np.float64]]


def _upload(federation: LocalFederation, data: Mapping[str, list[float]]) -> Joint:
    handles = federation.federation().upload({name: np.array(v) for name, v in data.items()})
    values = np.concatenate([np.array(v, dtype=np.float64) for v in data.values()])
    return Joint(federation, handles, values[~np.isnan(values)])


def _run(joint: Joint, function: str, **common: Any) -> dict[str, Any]:
    """Run ``function`` on every party; assert that all return the same, return it."""
    job = joint.federation.federation(timeout=30).compute(
        "smpc", function, {name: {"data": h} for name, h in joint.handles.items()}, **common
    )
    results = job.results(timeout=TIMEOUT)
    assert len(results) == len(joint.handles)
    for other in results[1:]:
        assert other == results[0]
    result: dict[str, Any] = results[0]
    return result


def _expect_everywhere(joint: Joint, error: type[Exception], function: str, **common: Any) -> None:
    try:
        job = joint.federation.federation(timeout=30).compute(
            "smpc", function, {name: {"data": h} for name, h in joint.handles.items()}, **common
        )
    except error:
        return  # refused at the start: an input its declaration does not allow
    for each in job.jobs:
        with pytest.raises(error):
            each.result(timeout=TIMEOUT)


def _sorted(values: np.ndarray[Any, np.dtype[np.float64]]) -> np.ndarray[Any, Any]:
    """Sort by IEEE totalOrder (-0.0 before 0.0), the order the protocol uses."""
    return values[np.argsort(ring.float_order_key(values), kind="stable")]


# -- federations and data ------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    with LocalFederation(tmp_path_factory.mktemp("order-pair"), names=("p1", "p2")) as fed:
        yield fed


@pytest.fixture(scope="module")
def five(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    names = tuple(f"a{i}" for i in range(1, 6))
    with LocalFederation(tmp_path_factory.mktemp("order-five"), names=names) as fed:
        yield fed


@pytest.fixture(scope="module")
def pair_odd(pair: LocalFederation) -> Joint:
    """21 values: reals with ties and NaNs at p1, small integers (many duplicates) at p2."""
    rng = np.random.default_rng(2)
    first = [*np.round(rng.normal(0, 3, 12), 1).tolist(), math.nan, math.nan]
    second = rng.integers(-4, 5, 9).astype(float).tolist()
    joint = _upload(pair, {"p1": first, "p2": second})
    assert joint.pooled.size == 21
    return joint


@pytest.fixture(scope="module")
def pair_even(pair: LocalFederation) -> Joint:
    """16 values, negative and positive, with a duplicate at p2; distinct middle pair."""
    return _upload(
        pair,
        {
            "p1": [-7.5, 3.25, -0.5, 1e6, 2.0, 1.0, -1e-3, 8.0],
            "p2": [-2.0, 5.0, -100.0, 0.75, 4.5, -2.0, 2.5, 6.0],
        },
    )


@pytest.fixture(scope="module")
def trio_data(trio: LocalFederation) -> Joint:
    """30 values over three parties, one value repeated 5 times across parties."""
    rng = np.random.default_rng(3)
    return _upload(
        trio,
        {
            "alpha": [*rng.normal(10, 5, 11).tolist(), 1.5, 1.5, math.nan],
            "beta": [1.5, -4.0, 1.5, 1.5, 7.0, -12.25, 0.0],
            "gamma": [*rng.exponential(3, 9).tolist(), -1.0],
        },
    )


@pytest.fixture(scope="module")
def five_data(five: LocalFederation) -> Joint:
    """24 values over five parties (even count); a4 has only NaN, i.e. no rows."""
    rng = np.random.default_rng(5)
    return _upload(
        five,
        {
            "a1": rng.normal(-3, 2, 6).tolist(),
            "a2": rng.integers(-3, 3, 7).astype(float).tolist(),
            "a3": rng.uniform(-1, 1, 5).tolist(),
            "a4": [math.nan, math.nan],
            "a5": rng.normal(0, 50, 6).tolist(),
        },
    )


# -- helpers of the protocol (no servers) -----------------------------------------------


def test_dyadic_cover_is_an_exact_disjoint_cover_with_at_most_l_blocks() -> None:
    for bits in range(1, 8):
        size = 1 << bits
        for start in range(size):
            blocks = dyadic_cover(start, bits)
            assert 1 <= len(blocks) <= bits
            inside = [
                x for level, prefix in blocks for x in range(prefix << level, (prefix + 1) << level)
            ]
            assert sorted(inside) == sorted((start + i) % size for i in range(size // 2))
            for z in range(size):
                prefixes = {(level, z >> level) for level in range(bits)}
                matches = len(prefixes & set(blocks))
                assert matches == (1 if (z - start) % size < size // 2 else 0)


@pytest.mark.parametrize("count", [1, 2, 3, 10, 21, 24, 30, 101])
def test_quantile_ranks_and_interpolation_match_numpy(count: int) -> None:
    values = np.sort(np.random.default_rng(count).normal(size=count))
    for p in [*PROBABILITIES, 1 / 3, 0.75, 0.99, 0.5001]:
        lower, upper, gamma = quantile_ranks(count, p)
        assert 1 <= lower <= upper <= count and upper - lower <= 1
        ours = (
            values[lower - 1]
            if lower == upper
            else interpolate(values[lower - 1], values[upper - 1], gamma)
        )
        assert ours == np.quantile(values, p)


# -- two parties -------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 8, 21])
def test_pair_kth_smallest(pair_odd: Joint, k: int) -> None:
    result = _run(pair_odd, "kth_smallest", k=k)
    assert result == {"value": np.sort(pair_odd.pooled)[k - 1], "k": k, "count": 21}


def test_pair_median_odd_count(pair_odd: Joint) -> None:
    result = _run(pair_odd, "median")
    assert result == {"median": np.median(pair_odd.pooled), "convention": "average", "count": 21}


def test_pair_quantiles(pair_odd: Joint) -> None:
    result = _run(pair_odd, "quantiles", probabilities=PROBABILITIES)
    assert result["quantiles"] == np.quantile(pair_odd.pooled, PROBABILITIES).tolist()
    assert result["probabilities"] == PROBABILITIES
    assert result["method"] == "linear" and result["count"] == 21


@pytest.mark.parametrize("convention", ["average", "lower", "upper"])
def test_pair_median_even_count(pair_even: Joint, convention: str) -> None:
    ordered = np.sort(pair_even.pooled)
    expected = {
        "average": np.median(pair_even.pooled),
        "lower": ordered[7],
        "upper": ordered[8],
    }[convention]
    result = _run(pair_even, "median", convention=convention)
    assert result == {"median": expected, "convention": convention, "count": 16}
    assert ordered[7] != ordered[8]  # the conventions really differ here


# -- three parties (the shared trio) ------------------------------------------------------


@pytest.mark.parametrize("k", [2, 17])
def test_trio_kth_smallest(trio_data: Joint, k: int) -> None:
    result = _run(trio_data, "kth_smallest", k=k)
    assert result == {"value": np.sort(trio_data.pooled)[k - 1], "k": k, "count": 30}


def test_trio_median_and_quantiles(trio_data: Joint) -> None:
    assert trio_data.pooled.size == 30
    assert _run(trio_data, "median")["median"] == np.median(trio_data.pooled)
    result = _run(trio_data, "quantiles", probabilities=PROBABILITIES)
    assert result["quantiles"] == np.quantile(trio_data.pooled, PROBABILITIES).tolist()


def test_trio_duplicates_signed_zeros_and_an_empty_party(trio: LocalFederation) -> None:
    joint = _upload(
        trio,
        {
            "alpha": [0.0, -0.0, 2.0, -0.0, -1.0],
            "beta": [2.0, 0.0, -1.0, 2.0],
            "gamma": [math.nan],
        },
    )
    ordered = _sorted(joint.pooled)  # -1 -1 -0 -0 0 0 2 2 2
    # with n = 9 every probability k/8 hits rank k + 1 exactly: nine order statistics at once
    probabilities = [rank / 8 for rank in range(9)]
    result = _run(joint, "quantiles", probabilities=probabilities)
    assert result["count"] == 9
    assert result["quantiles"] == ordered.tolist()
    assert [math.copysign(1, v) for v in result["quantiles"]] == [
        math.copysign(1, v) for v in ordered
    ]
    assert np.signbit(result["quantiles"][2]) and not np.signbit(result["quantiles"][4])


def test_k_out_of_range_is_refused_by_every_party(trio_data: Joint) -> None:
    for k in (0, -3, 2.5, True, "3", 2**62):
        _expect_everywhere(trio_data, BadRequest, "kth_smallest", k=k)
    _expect_everywhere(trio_data, BadRequest, "kth_smallest", k=31)


def test_bad_options_are_refused(trio_data: Joint) -> None:
    _expect_everywhere(trio_data, BadRequest, "median", convention="middle")
    for probabilities in ([], [0.5, 1.5], [-0.1], 0.5, [True], [math.nan]):
        _expect_everywhere(trio_data, BadRequest, "quantiles", probabilities=probabilities)


def test_parties_must_agree_on_k(trio_data: Joint) -> None:
    inputs = {
        name: {"data": h, "k": 3 + i} for i, (name, h) in enumerate(trio_data.handles.items())
    }
    job = trio_data.federation.federation(timeout=30).compute("smpc", "kth_smallest", inputs)
    for each in job.jobs:
        with pytest.raises(ComputationFailed) as failed:
            each.result(timeout=TIMEOUT)
        assert "disagree on 'k'" in failed.value.detail


def test_a_party_whose_input_is_refused_ends_the_computation_for_all_at_once(
    trio_data: Joint,
) -> None:
    # beta's column is refused (no such column): the others hear it at once,
    # well before the session timeout, and name beta
    inputs = {name: {"data": h} for name, h in trio_data.handles.items()}
    inputs["beta"]["column"] = "no such column"
    job = trio_data.federation.federation(timeout=30).compute("smpc", "median", inputs)
    names = list(inputs)
    for name, each in zip(names, job.jobs, strict=True):
        if name == "beta":
            with pytest.raises(BadRequest):
                each.result(timeout=TIMEOUT)
        else:
            # beta's refusal ends it, named; a session timeout would be a PartyTimeout
            with pytest.raises(ComputationFailed, match="party 'beta' ended the computation"):
                each.result(timeout=TIMEOUT)


def test_cohort_is_checked_first(trio: LocalFederation) -> None:
    joint = _upload(trio, {"alpha": [1.0], "beta": [2.0, math.nan], "gamma": [math.nan]})
    _expect_everywhere(joint, Forbidden, "kth_smallest", k=5)
    _expect_everywhere(joint, Forbidden, "median")


# -- five parties --------------------------------------------------------------------------


def test_five_parties(five_data: Joint) -> None:
    pooled = five_data.pooled
    assert pooled.size == 24
    kth = _run(five_data, "kth_smallest", k=5)
    assert kth == {"value": np.sort(pooled)[4], "k": 5, "count": 24}
    assert _run(five_data, "median")["median"] == np.median(pooled)
    result = _run(five_data, "quantiles", probabilities=PROBABILITIES)
    assert result["quantiles"] == np.quantile(pooled, PROBABILITIES).tolist()
