"""The basic SMPC functions against plaintext numpy, with 2, 3 and 5 real servers.

Every test runs the protocol end to end: each party's data is uploaded to its
own ``fdrtd-server`` process, the same function is started on every server
with one session, the servers run the protocol through their peer gateways,
and every party's result is fetched and compared with the answer numpy
computes from the pooled plaintext. Every party must return the same result.

The 3-party federation is the session-wide ``trio``; the 2- and 5-party ones
are built once for this module.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import requests

from fdrtd_client import Federation, Handle
from fdrtd_client.errors import ComputationFailed, Forbidden, ServerError
from fdrtd_client.errors import PartyTimeout as ClientPartyTimeout
from fdrtd_server.local import LocalFederation
from protocols.smpc.stats_math import BIVARIATE_KEYS, UNIVARIATE_KEYS

F64 = npt.NDArray[np.float64]
FRACTION = 2.0**-20
"""Resolution of the default fixed point (``frac_bits = 20``)."""
MIN_COHORT = 3
"""The servers' default minimum cohort (``min_cohort``)."""
RESULT_TIMEOUT = 45.0
"""Longest wait for any job: the default session timeout (30 s) plus a margin."""
SIZES = (2, 3, 5)


def start_federation(root: Path, names: tuple[str, ...]) -> LocalFederation:
    """Start servers and check that each URL answers with its own server.

    Ports are chosen before the servers bind them, so on a busy machine
    another process may take one in between; such a federation is rebuilt.
    """
    for attempt in range(3):
        federation = LocalFederation(root / f"try{attempt}", names=names)
        try:
            federation.start()
        except RuntimeError:
            federation.stop()
            continue
        if all(
            server.process is not None
            and server.process.poll() is None
            and requests.get(server.url + "/v1/identity", timeout=5).json()["name"] == name
            for name, server in federation.servers.items()
        ):
            return federation
        federation.stop()
    raise RuntimeError(f"could not start the federation {names} on free ports")


@pytest.fixture(scope="module")
def duo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    federation = start_federation(tmp_path_factory.mktemp("duo"), ("p1", "p2"))
    yield federation
    federation.stop()


@pytest.fixture(scope="module")
def quintet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    names = ("a1", "a2", "a3", "a4", "a5")
    federation = start_federation(tmp_path_factory.mktemp("quintet"), names)
    yield federation
    federation.stop()


@pytest.fixture(params=SIZES, ids=[f"{n}-parties" for n in SIZES])
def local(request: pytest.FixtureRequest) -> LocalFederation:
    fixture = {2: "duo", 3: "trio", 5: "quintet"}[request.param]
    federation: LocalFederation = request.getfixturevalue(fixture)
    assert len(federation.servers) == request.param
    return federation


@pytest.fixture
def fed(local: LocalFederation) -> Federation:
    return local.federation(timeout=30)


def rng(*salt: int) -> np.random.Generator:
    return np.random.default_rng([20240917, *salt])


def outcomes(
    fed: Federation,
    function: str,
    data: Mapping[str, Any],
    timeout: float = RESULT_TIMEOUT,
    **common: Any,
) -> list[Any]:
    """Upload each party's data, run ``smpc.<function>``; each party's value or error."""
    handles = fed.upload(data)
    job = fed.compute("smpc", function, {n: {"data": h} for n, h in handles.items()}, **common)

    def one(index: int) -> Any:
        try:
            return job.jobs[index].result(timeout, progress=False)
        except ServerError as error:
            return error

    with ThreadPoolExecutor(len(job.jobs)) as pool:
        return list(pool.map(one, range(len(job.jobs))))


def assert_same(results: Sequence[Any]) -> Any:
    """Every party returned the same value (a dict, arrays compared exactly)."""
    for result in results:
        assert not isinstance(result, Exception), result
    first = results[0]
    assert isinstance(first, dict)
    for other in results[1:]:
        assert isinstance(other, dict) and list(other) == list(first)
        for key, value in first.items():
            np.testing.assert_array_equal(np.asarray(other[key]), np.asarray(value), err_msg=key)
    return first


def run(fed: Federation, function: str, data: Mapping[str, Any], **common: Any) -> dict[str, Any]:
    """Run and return the common result, after checking that no party failed."""
    value: dict[str, Any] = assert_same(outcomes(fed, function, data, **common))
    return value


def all_failed(results: Sequence[Any], kind: type[ServerError], status: int) -> list[str]:
    """Every party's job failed with ``kind``; returns the details."""
    for result in results:
        assert isinstance(result, kind), result
        assert result.status == status
    return [result.detail for result in results]


def assert_cohort_refused(results: Sequence[Any]) -> None:
    """Every party refused: fewer records than the minimum cohort."""
    for detail in all_failed(results, Forbidden, 403):
        assert f"minimum cohort of {MIN_COHORT}" in detail


def pooled(data: Mapping[str, Any]) -> F64:
    return np.concatenate([np.asarray(v, dtype=np.float64) for v in data.values()])


def finite(x: F64) -> F64:
    if x.ndim == 1:
        return x[np.isfinite(x)]
    return x[np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)]


# -- secure_sum ----------------------------------------------------------------------


def test_secure_sum_one_number_per_party(fed: Federation) -> None:
    data = {name: [float(3 * i) - 4.25] for i, name in enumerate(fed.parties)}
    n = len(fed.parties)
    if n < MIN_COHORT:  # fewer records than the minimum cohort
        assert_cohort_refused(outcomes(fed, "secure_sum", data))
        return
    result = run(fed, "secure_sum", data)
    assert result == {"sum": sum(3 * i - 4.25 for i in range(n)), "count": n}
    assert isinstance(result["sum"], float)


def test_secure_sum_of_a_column(fed: Federation) -> None:
    data = {
        name: rng(1, i).normal(-3.0, 50.0, size=40 + 13 * i) for i, name in enumerate(fed.parties)
    }
    result = run(fed, "secure_sum", data)
    x = pooled(data)
    assert result["count"] == x.size
    assert isinstance(result["sum"], float)
    # each party's local sum is rounded once to 2^-20
    assert result["sum"] == pytest.approx(float(x.sum()), abs=len(data) * FRACTION / 2 + 1e-9)


def test_secure_sum_of_a_matrix_column(fed: Federation) -> None:
    data = {
        name: {
            "m": rng(2, i).uniform(-100, 100, size=(20 + i, 4)),
            "x": np.arange(20.0 + i),
        }
        for i, name in enumerate(fed.parties)
    }
    result = run(fed, "secure_sum", data, column="m")
    expected = np.concatenate([d["m"] for d in data.values()]).sum(axis=0)
    assert result["count"] == sum(20 + i for i in range(len(data)))
    total = np.asarray(result["sum"])
    assert total.shape == (4,) and total.dtype == np.float64
    np.testing.assert_allclose(total, expected, rtol=0, atol=len(data) * FRACTION / 2 + 1e-9)


def test_secure_sum_of_a_raw_matrix(fed: Federation) -> None:
    """An uploaded n x k array: its only column is summed over the rows into a k-vector."""
    data = {
        name: rng(3, i).integers(-1000, 1000, size=(7, 3)) * 1.0
        for i, name in enumerate(fed.parties)
    }
    result = run(fed, "secure_sum", data)
    np.testing.assert_array_equal(result["sum"], sum(d.sum(axis=0) for d in data.values()))
    assert result["count"] == 7 * len(data)


def test_secure_sum_elementwise_needs_a_cohort_of_parties(fed: Federation) -> None:
    """Each element of an elementwise sum describes one record per party."""
    data = {name: np.full(4, float(i)) for i, name in enumerate(fed.parties)}
    results = outcomes(fed, "secure_sum", data, elementwise=True)
    if len(fed.parties) < MIN_COHORT:
        assert_cohort_refused(results)
    else:
        value = assert_same(results)
        np.testing.assert_array_equal(value["sum"], np.full(4, float(sum(range(len(data))))))


def test_secure_sum_elementwise_large_vector(fed: Federation) -> None:
    if len(fed.parties) < MIN_COHORT:
        return  # refused, see test_secure_sum_elementwise_needs_a_cohort_of_parties
    size = 200_000  # more than one peer message (128 Ki elements) per party
    data = {name: rng(4, i).normal(0.0, 1000.0, size=size) for i, name in enumerate(fed.parties)}
    data[fed.parties[0]][:10] = [-1e6, -0.5, 0.0, -0.0, 1e-9, -1e-9, 123.456, -7.0, 5e5, -(2**-21)]
    result = run(fed, "secure_sum", data, elementwise=True)
    total = np.asarray(result["sum"])
    assert total.shape == (size,) and total.dtype == np.float64
    expected = np.sum(list(data.values()), axis=0)
    assert (expected < 0).sum() > size // 3  # the test really covers negative values
    # each party's element is rounded once to the nearest multiple of 2^-20
    np.testing.assert_allclose(total, expected, rtol=0, atol=len(data) * FRACTION / 2 + 1e-9)
    assert result["count"] == size * len(data)


def test_secure_sum_elementwise_matrices(fed: Federation) -> None:
    data = {
        name: (rng(5, i).integers(-500, 500, size=(6, 5)) / 8.0)
        for i, name in enumerate(fed.parties)
    }
    if len(fed.parties) < MIN_COHORT:
        assert_cohort_refused(outcomes(fed, "secure_sum", data, elementwise=True))
        return
    result = run(fed, "secure_sum", data, elementwise=True)
    # multiples of 1/8 are exact in fixed point
    np.testing.assert_array_equal(result["sum"], np.sum(list(data.values()), axis=0))
    assert np.asarray(result["sum"]).shape == (6, 5)


def test_secure_sum_drops_records_with_nan(fed: Federation) -> None:
    data = {name: np.arange(1.0, 6.0) * (i + 1) for i, name in enumerate(fed.parties)}
    data[fed.parties[-1]] = np.array([np.nan, 10.0, np.nan, 20.0, np.inf])
    result = run(fed, "secure_sum", data)
    x = finite(pooled(data))
    assert result == {"sum": float(x.sum()), "count": x.size}


def test_secure_sum_matrix_drops_rows_with_nan(fed: Federation) -> None:
    data = {name: np.ones((4, 2)) * (i + 1) for i, name in enumerate(fed.parties)}
    data[fed.parties[0]][1, 0] = np.nan
    result = run(fed, "secure_sum", data)
    x = finite(pooled(data))
    assert x.shape[0] == 4 * len(data) - 1
    np.testing.assert_array_equal(result["sum"], x.sum(axis=0))
    assert result["count"] == 4 * len(data) - 1


@pytest.mark.parametrize("elementwise", [False, True], ids=["rows", "elementwise"])
def test_secure_sum_shape_mismatch_fails_everywhere(fed: Federation, elementwise: bool) -> None:
    data = {name: np.ones((5, 3)) for name in fed.parties}
    data[fed.parties[-1]] = np.ones((5, 4))
    results = outcomes(fed, "secure_sum", data, elementwise=elementwise)
    if elementwise and len(fed.parties) < MIN_COHORT:
        assert_cohort_refused(results)  # refused before the shapes are compared
        return
    for detail in all_failed(results, ComputationFailed, 422):
        assert "disagree" in detail and "'shape'" in detail


def test_secure_sum_option_mismatch_fails_everywhere(trio: LocalFederation) -> None:
    fed = trio.federation()
    handles = fed.upload({name: np.arange(4.0) for name in fed.parties})
    inputs = {name: {"data": h, "frac_bits": 20} for name, h in handles.items()}
    inputs["gamma"]["frac_bits"] = 16
    job = fed.compute("smpc", "secure_sum", inputs)
    for one in job.jobs:
        with pytest.raises(ComputationFailed) as caught:
            one.result(RESULT_TIMEOUT, progress=False)
        assert "disagree" in caught.value.detail and "frac_bits" in caught.value.detail


# -- minimum_maximum -------------------------------------------------------------------


def test_minimum_maximum_extremes(fed: Federation) -> None:
    data = {name: rng(6, i).uniform(-1e3, 1e3, size=30 + i) for i, name in enumerate(fed.parties)}
    first, last = fed.parties[0], fed.parties[-1]
    data[first][3] = -1.7976931348623157e308  # most negative float64
    data[last][7] = 5e-324  # smallest subnormal
    data[last][8] = 8.98846567431158e307
    data[first][0] = np.nan  # dropped
    result = run(fed, "minimum_maximum", data)
    x = finite(pooled(data))
    assert result == {"minimum": x.min(), "maximum": x.max(), "count": x.size}
    assert result["minimum"] == -1.7976931348623157e308
    assert result["maximum"] == 8.98846567431158e307


def test_minimum_maximum_negative_and_signed_zero(fed: Federation) -> None:
    # every value negative: the maximum is -0.0 and keeps its sign
    data = {name: -np.arange(1.0, 4.0) * (i + 2) for i, name in enumerate(fed.parties)}
    data[fed.parties[-1]] = np.array([-0.0, -1e-300, -12.5])
    result = run(fed, "minimum_maximum", data)
    x = pooled(data)
    assert result["minimum"] == x.min() < -5.0
    assert result["maximum"] == 0.0 and math.copysign(1.0, result["maximum"]) == -1.0
    assert result["count"] == x.size


def test_minimum_maximum_tiny_magnitudes(fed: Federation) -> None:
    data = {
        name: np.array([1e-300, 2e-300, 3e-300]) * (i + 1) for i, name in enumerate(fed.parties)
    }
    data[fed.parties[0]][0] = -5e-324
    result = run(fed, "minimum_maximum", data)
    assert result["minimum"] == -5e-324
    assert result["maximum"] == 3e-300 * len(data)


def test_minimum_maximum_of_vectors_is_elementwise(fed: Federation) -> None:
    data = {
        name: rng(7, i).normal(0, 10, size=(12, 3)) * [1.0, 1e6, 1e-6]
        for i, name in enumerate(fed.parties)
    }
    result = run(fed, "minimum_maximum", data)
    x = pooled(data)
    assert np.asarray(result["minimum"]).shape == (3,)
    np.testing.assert_array_equal(result["minimum"], x.min(axis=0))
    np.testing.assert_array_equal(result["maximum"], x.max(axis=0))
    assert result["count"] == x.shape[0]


def test_minimum_maximum_with_an_empty_party(trio: LocalFederation) -> None:
    fed = trio.federation()
    data = {"alpha": np.array([4.0, -2.0]), "beta": np.array([]), "gamma": np.array([9.5])}
    result = run(fed, "minimum_maximum", data)
    assert result == {"minimum": -2.0, "maximum": 9.5, "count": 3}


# -- univariate ------------------------------------------------------------------------


def expected_univariate(x: F64) -> dict[str, float]:
    """The 22 statistics straight from the records (accurate two-pass central moments)."""
    n = x.size
    mean = math.fsum(x) / n
    d = x - mean
    d = d - math.fsum(d) / n  # corrects the rounding of the mean
    m = {k: math.fsum(d**k) / n for k in range(2, 7)}
    variance = m[2] * n / (n - 1)
    positive = bool(np.all(x > 0))
    return {
        "samples": float(n),
        "minimum": x.min(),
        "maximum": x.max(),
        "sum": math.fsum(x),
        "mean": mean,
        "harmonic_mean": n / np.sum(1.0 / x) if positive else math.nan,
        "geometric_mean": math.exp(np.mean(np.log(x))) if positive else math.nan,
        "variance": variance,
        "variance_mle": m[2],
        "variance_of_sample_mean": variance / n,
        "standard_deviation": math.sqrt(variance),
        "standard_deviation_mle": math.sqrt(m[2]),
        "standard_error_of_mean": math.sqrt(variance / n),
        "coefficient_of_variation": math.sqrt(variance) / mean,
        "coefficient_of_variation_mle": math.sqrt(m[2]) / mean,
        "root_mean_square": math.sqrt(math.fsum(x**2) / n),
        "root_mean_square_deviation": math.sqrt(m[2]),
        "skewness": m[3] / m[2] ** 1.5,
        "kurtosis": m[4] / m[2] ** 2,
        "excess_kurtosis": m[4] / m[2] ** 2 - 3.0,
        "hyper_skewness": m[5] / m[2] ** 2.5,
        "hyper_flatness": m[6] / m[2] ** 3,
    }


def assert_univariate(result: Mapping[str, Any], x: F64) -> None:
    assert list(result) == list(UNIVARIATE_KEYS) and len(result) == 22
    expected = expected_univariate(x)
    for key in UNIVARIATE_KEYS:
        got, want = result[key], expected[key]
        assert isinstance(got, float), key
        if math.isnan(want):
            assert math.isnan(got), key
        else:
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12), key
    assert result["samples"] == x.size
    assert result["minimum"] == x.min() and result["maximum"] == x.max()


def test_univariate_positive_data(fed: Federation) -> None:
    data = {
        name: rng(8, i).gamma(2.0 + i, 3.0, size=50 + 11 * i) for i, name in enumerate(fed.parties)
    }
    result = run(fed, "univariate", data)
    assert_univariate(result, pooled(data))
    assert not math.isnan(result["harmonic_mean"])
    assert not math.isnan(result["geometric_mean"])


def test_univariate_far_from_zero(fed: Federation) -> None:
    """Data with a large offset: the shifted power sums keep the moments accurate."""
    data = {name: 1e6 + rng(9, i).normal(0, 2.0, size=40) for i, name in enumerate(fed.parties)}
    assert_univariate(run(fed, "univariate", data), pooled(data))


@pytest.mark.parametrize("bad", [0.0, -3.5], ids=["zero", "negative"])
def test_univariate_non_positive_value_gives_nan_means(fed: Federation, bad: float) -> None:
    data = {name: rng(10, i).uniform(1.0, 9.0, size=25) for i, name in enumerate(fed.parties)}
    data[fed.parties[-1]][4] = bad
    result = run(fed, "univariate", data)
    assert math.isnan(result["harmonic_mean"]) and math.isnan(result["geometric_mean"])
    assert_univariate(result, pooled(data))


def test_univariate_drops_nan(fed: Federation) -> None:
    data = {name: rng(11, i).normal(5, 1, size=20) for i, name in enumerate(fed.parties)}
    data[fed.parties[0]][[0, 5, 6]] = [np.nan, np.inf, -np.inf]
    result = run(fed, "univariate", data)
    x = finite(pooled(data))
    assert x.size == 20 * len(data) - 3
    assert_univariate(result, x)


def test_univariate_refuses_a_matrix_column(trio: LocalFederation) -> None:
    fed = trio.federation()
    results = outcomes(fed, "univariate", {name: np.ones((4, 2)) for name in fed.parties})
    for detail in all_failed(results, ServerError, 400):
        assert "single numbers" in detail


# -- bivariate -------------------------------------------------------------------------


def test_bivariate_against_numpy(fed: Federation) -> None:
    data = {}
    for i, name in enumerate(fed.parties):
        x = rng(12, i).normal(10 + i, 3, size=30 + 5 * i)
        y = 2.5 * x - 7 + rng(13, i).normal(0, 4, size=x.size)
        data[name] = {"x": x, "y": y}
    data[fed.parties[0]]["x"][2] = np.nan  # the record is dropped
    data[fed.parties[-1]]["y"][0] = np.nan
    result = run(fed, "bivariate", data, x="x", y="y")
    x = np.concatenate([d["x"] for d in data.values()])
    y = np.concatenate([d["y"] for d in data.values()])
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    slope, intercept = np.polyfit(x, y, 1)
    expected = {
        "samples": float(x.size),
        "covariance": np.cov(x, y)[0, 1],
        "covariance_mle": np.cov(x, y, bias=True)[0, 1],
        "correlation_coefficient": np.corrcoef(x, y)[0, 1],
        "regression_slope": slope,
        "regression_intercept": intercept,
        "regression_slope_through_origin": np.sum(x * y) / np.sum(x * x),
    }
    assert list(result) == list(BIVARIATE_KEYS)
    assert result["samples"] == sum(len(d["x"]) for d in data.values()) - 2
    for key in BIVARIATE_KEYS:
        assert result[key] == pytest.approx(expected[key], rel=1e-9), key


def test_statistics_with_parties_below_their_own_cohort(fed: Federation) -> None:
    # only the first party meets the minimum cohort alone: it sends its sums with
    # its count; the others send theirs once the joint count has passed
    values: dict[str, Any] = {name: np.array([]) for name in fed.parties}
    values[fed.parties[0]] = rng(21).gamma(3.0, 2.0, size=6)
    values[fed.parties[-1]] = np.array([4.5])
    assert_univariate(run(fed, "univariate", values), pooled(values))
    pairs = {name: {"x": v, "y": 3.0 * v + 1.0} for name, v in values.items()}
    result = run(fed, "bivariate", pairs, x="x", y="y")
    x = pooled(values)
    assert result["samples"] == x.size
    assert result["covariance"] == pytest.approx(3.0 * np.var(x, ddof=1), rel=1e-9)
    assert result["regression_slope"] == pytest.approx(3.0, rel=1e-9)


# -- count -----------------------------------------------------------------------------


def test_count(fed: Federation) -> None:
    data = {name: np.arange(3.0 + 2 * i) for i, name in enumerate(fed.parties)}
    data[fed.parties[0]][0] = np.nan  # a record with a missing value is still a record
    result = run(fed, "count", data)
    assert result == {"count": sum(3 + 2 * i for i in range(len(data)))}


def test_count_of_a_table(fed: Federation) -> None:
    data = {name: {"a": np.arange(4.0), "b": ["x", "y", "z", "w"]} for name in fed.parties}
    assert run(fed, "count", data) == {"count": 4 * len(data)}


# -- minimum cohort --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "inputs"),
    [
        ("count", {}),
        ("secure_sum", {}),
        ("minimum_maximum", {}),
        ("univariate", {}),
        ("bivariate", {"x": "value", "y": "value"}),
    ],
)
def test_minimum_cohort_refused_on_every_party(
    fed: Federation, function: str, inputs: dict[str, Any]
) -> None:
    # two records in all (the default minimum cohort is 3), spread over the parties
    data: dict[str, Any] = {name: {"value": np.array([])} for name in fed.parties}
    data[fed.parties[0]] = {"value": np.array([1.5])}
    data[fed.parties[-1]] = {"value": np.array([2.5])}
    assert_cohort_refused(outcomes(fed, function, data, **inputs))


def test_minimum_cohort_counts_only_finite_records(trio: LocalFederation) -> None:
    fed = trio.federation()
    data = {"alpha": [1.0, np.nan], "beta": [np.nan], "gamma": [np.nan, 2.0, np.nan]}
    details = all_failed(outcomes(fed, "univariate", data), Forbidden, 403)
    assert all("minimum cohort" in detail for detail in details)


def test_exactly_the_minimum_cohort_is_allowed(fed: Federation) -> None:
    data: dict[str, Any] = {name: [] for name in fed.parties}
    data[fed.parties[0]] = [1.0, 2.0]
    data[fed.parties[1]] = [4.0]
    assert run(fed, "secure_sum", data) == {"sum": 7.0, "count": 3}


def test_secure_sum_with_parties_below_their_own_cohort(fed: Federation) -> None:
    # the first party meets the minimum cohort alone and sends its sum with its
    # count; the others hold theirs back until the joint count has passed
    data: dict[str, Any] = {name: [] for name in fed.parties}
    data[fed.parties[0]] = [1.0, 2.0, 3.0]
    data[fed.parties[-1]] = [10.0]
    assert run(fed, "secure_sum", data) == {"sum": 16.0, "count": 4}


# -- sessions naming a server outside the federation -------------------------------------


def test_unknown_party_in_session_fails_fast(local: LocalFederation) -> None:
    """A session listing a server nobody knows ends at once, naming that server."""
    fed = local.federation()
    handles = fed.upload({name: np.arange(5.0) for name in fed.parties})
    session = {"id": secrets.token_hex(16), "parties": [*fed.parties, "zeta"]}
    jobs = [
        fed.clients[name].compute("smpc", "secure_sum", session=session, data=handles[name])
        for name in fed.parties
    ]
    for job in jobs:
        with pytest.raises(ServerError) as caught:
            job.result(20, progress=False)
        assert not isinstance(caught.value, ClientPartyTimeout)
        assert "'zeta'" in caught.value.detail
        # refused for naming 'zeta' (a 4xx), not after waiting for it (a PartyTimeout, 504)
        assert caught.value.status in (400, 404, 422)


def test_session_without_this_server_is_refused(trio: LocalFederation) -> None:
    client = trio.servers["alpha"].client()
    handle: Handle = client.upload(np.arange(5.0))
    job = client.compute(
        "smpc",
        "count",
        session={"id": secrets.token_hex(16), "parties": ["beta", "gamma"]},
        data=handle,
    )
    with pytest.raises(ServerError) as caught:
        job.result(20, progress=False)
    assert caught.value.status == 400
    assert "'alpha'" in caught.value.detail
