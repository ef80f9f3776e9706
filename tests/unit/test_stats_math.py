"""Unit tests for protocols.smpc.stats_math: power sums to statistics."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fdrtd_server.sdk import ring
from protocols.smpc import stats_math as sm

EXPECTED_UNIVARIATE_KEYS = [
    "samples",
    "minimum",
    "maximum",
    "sum",
    "mean",
    "harmonic_mean",
    "geometric_mean",
    "variance",
    "variance_mle",
    "variance_of_sample_mean",
    "standard_deviation",
    "standard_deviation_mle",
    "standard_error_of_mean",
    "coefficient_of_variation",
    "coefficient_of_variation_mle",
    "root_mean_square",
    "root_mean_square_deviation",
    "skewness",
    "kurtosis",
    "excess_kurtosis",
    "hyper_skewness",
    "hyper_flatness",
]

# The expected table of plugin-simon tests/test_simon.py (data 1..10 split over two
# parties), re-derived here: every entry is checked again by direct_univariate below.
SIMON_ONE_TO_TEN = {
    "samples": 10,
    "minimum": 1.0,
    "maximum": 10.0,
    "sum": 55.0,
    "mean": 5.5,
    "harmonic_mean": 3.4141715214740550061,
    "geometric_mean": 4.5287286881167647622,
    "variance": 9.1666666666666666667,
    "variance_mle": 8.25,
    "variance_of_sample_mean": 0.91666666666666666667,
    "standard_deviation": 3.0276503540974916654,
    "standard_deviation_mle": 2.8722813232690143299,
    "standard_error_of_mean": 0.95742710775633810998,
    "coefficient_of_variation": 0.55048188256318030280,
    "coefficient_of_variation_mle": 0.52223296786709351453,
    "root_mean_square": 6.2048368229954282981,
    "root_mean_square_deviation": 2.8722813232690143299,
    "skewness": 0.0,
    "kurtosis": 1.7757575757575757576,
    "excess_kurtosis": -1.2242424242424242424,
    "hyper_skewness": 0.0,
    "hyper_flatness": 3.7033976124885215794,
}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def direct_univariate(x: np.ndarray) -> dict[str, float]:
    """Two-pass textbook computation on the pooled data, for comparison."""
    n = x.size
    mean = float(np.mean(x))
    deviations = x - mean
    m = {k: float(np.mean(deviations**k)) for k in range(2, 7)}
    variance = float(np.var(x, ddof=1))
    positive = bool(np.all(x > 0))
    return {
        "samples": n,
        "minimum": float(np.min(x)),
        "maximum": float(np.max(x)),
        "sum": float(np.sum(x)),
        "mean": mean,
        "harmonic_mean": n / float(np.sum(1.0 / x)) if positive else math.nan,
        "geometric_mean": float(np.exp(np.mean(np.log(x)))) if positive else math.nan,
        "variance": variance,
        "variance_mle": float(np.var(x)),
        "variance_of_sample_mean": variance / n,
        "standard_deviation": float(np.std(x, ddof=1)),
        "standard_deviation_mle": float(np.std(x)),
        "standard_error_of_mean": float(np.std(x, ddof=1)) / math.sqrt(n),
        "coefficient_of_variation": float(np.std(x, ddof=1)) / mean,
        "coefficient_of_variation_mle": float(np.std(x)) / mean,
        "root_mean_square": math.sqrt(float(np.mean(x**2))),
        "root_mean_square_deviation": math.sqrt(float(np.mean(deviations**2))),
        "skewness": m[3] / m[2] ** 1.5,
        "kurtosis": m[4] / m[2] ** 2,
        "excess_kurtosis": m[4] / m[2] ** 2 - 3.0,
        "hyper_skewness": m[5] / m[2] ** 2.5,
        "hyper_flatness": m[6] / m[2] ** 3,
    }


def pooled_univariate(parts: list[np.ndarray], *, shift: float = 0.0) -> dict[str, float]:
    """What a protocol computes: per-party sums, added, then the formulas.

    As the protocol does, the sums behind the harmonic and geometric means
    depend on the joint minimum only (public), never on a party's own data.
    """
    everything = np.concatenate(parts)
    low = float(np.min(everything))
    scale = low if low > 0 else None
    total = np.sum(
        [sm.local_power_sums(part, shift=shift, positive_minimum=scale) for part in parts], axis=0
    )
    return sm.univariate(
        total,
        low,
        float(np.max(everything)),
        all_positive=scale is not None,
        shift=shift,
        reciprocal_scale=scale or 1.0,
    )


def assert_stats_close(
    actual: dict[str, float], expected: dict[str, float], *, rtol: float, atol: float = 0.0
) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(actual[key]), key
        else:
            assert actual[key] == pytest.approx(value, rel=rtol, abs=atol), key


# --- keys and local sums ----------------------------------------------------------------


def test_key_tuples() -> None:
    assert list(sm.UNIVARIATE_KEYS) == EXPECTED_UNIVARIATE_KEYS
    assert len(sm.UNIVARIATE_KEYS) == 22
    assert sm.POWER_SUM_KEYS == (
        "count",
        "sum_1",
        "sum_2",
        "sum_3",
        "sum_4",
        "sum_5",
        "sum_6",
        "sum_reciprocal",
        "sum_log",
    )
    assert sm.CROSS_SUM_KEYS == ("count", "sum_x", "sum_y", "sum_xx", "sum_yy", "sum_xy")
    assert len(sm.BIVARIATE_KEYS) == 7


def test_local_power_sums_values() -> None:
    x = np.array([1.0, 2.0, 4.0])
    sums = sm.local_power_sums(x, positive_minimum=1.0)
    assert sums.dtype == np.float64
    assert sums.shape == (9,)
    expected = [3.0, 7.0, 21.0, 73.0, 273.0, 1057.0, 4161.0, 1.75, math.log(8.0)]
    np.testing.assert_allclose(sums, expected, rtol=1e-15)


def test_local_power_sums_shift() -> None:
    x = np.array([[1.0, 2.0], [4.0, 5.0]])
    sums = sm.local_power_sums(x, shift=3.0, positive_minimum=0.5)
    deltas = np.array([-2.0, -1.0, 1.0, 2.0])
    expected = [4.0] + [float(np.sum(deltas**k)) for k in range(1, 7)]
    # l/x with the joint minimum l = 0.5, and log x; neither uses the shift
    expected += [0.5 * (1.0 + 0.5 + 0.25 + 0.2), math.log(40.0)]
    np.testing.assert_allclose(sums, expected, rtol=1e-15)


def test_reciprocal_and_log_sums_depend_on_the_public_minimum_only() -> None:
    # a party with all-positive values sends zeros there unless the *joint*
    # minimum is positive: else its own sums of 1/x and log x would be opened
    # (and readable by the others) while the result shows NaN
    own = np.array([4.0, 5.0, 8.0])
    hidden = sm.local_power_sums(own)
    assert hidden[7] == 0.0 and hidden[8] == 0.0
    assert hidden[1] == 17.0
    shown = sm.local_power_sums(own, positive_minimum=2.0)
    assert shown[7] == pytest.approx(2.0 * (1 / 4 + 1 / 5 + 1 / 8))
    with pytest.raises(ValueError, match="positive_minimum"):
        sm.local_power_sums(own, positive_minimum=5.0)  # above a value: not a minimum
    with pytest.raises(ValueError, match="positive_minimum"):
        sm.local_power_sums(np.array([0.0, 1.0]), positive_minimum=0.0)


def test_subnormal_values_keep_a_finite_harmonic_mean() -> None:
    values = np.array([5e-324, 1.0, 2.0])
    result = pooled_univariate([values[:1], values[1:]])
    assert result["harmonic_mean"] == pytest.approx(3 / (2e323 + 1.5), rel=1e-12)
    assert result["geometric_mean"] == pytest.approx(math.exp(np.log(values).mean()))


def test_local_power_sums_empty() -> None:
    np.testing.assert_array_equal(sm.local_power_sums(np.array([])), np.zeros(9))


def test_local_power_sums_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN or infinity"):
        sm.local_power_sums(np.array([1.0, math.nan]))
    with pytest.raises(ValueError, match="shift"):
        sm.local_power_sums(np.array([1.0]), shift=math.inf)
    with pytest.raises(ValueError, match="6th power"):
        sm.local_power_sums(np.array([1e60]))


def test_all_positive() -> None:
    assert sm.all_positive(np.array([0.1, 3.0]))
    assert not sm.all_positive(np.array([0.0, 3.0]))
    assert not sm.all_positive(np.array([-1.0, 3.0]))
    assert not sm.all_positive(np.array([]))


# --- univariate -------------------------------------------------------------------------


def test_univariate_simon_reference_table() -> None:
    x = np.arange(1.0, 11.0)
    result = pooled_univariate([x[:5], x[5:]])
    assert_stats_close(result, SIMON_ONE_TO_TEN, rtol=1e-13, atol=1e-13)
    assert_stats_close(direct_univariate(x), SIMON_ONE_TO_TEN, rtol=1e-13, atol=1e-13)


def test_univariate_matches_direct_computation(rng: np.random.Generator) -> None:
    parts = [rng.gamma(2.0, 3.0, size=size) + 0.1 for size in (500, 1, 2000)]
    result = pooled_univariate(parts)
    expected = direct_univariate(np.concatenate(parts))
    assert_stats_close(result, expected, rtol=1e-9)
    assert result["skewness"] > 0.5  # gamma(2) is clearly right-skewed
    assert result["excess_kurtosis"] > 1.0


def test_univariate_mixed_signs(rng: np.random.Generator) -> None:
    parts = [rng.normal(-2.0, 5.0, size=300), rng.normal(1.0, 1.0, size=700)]
    result = pooled_univariate(parts)
    expected = direct_univariate(np.concatenate(parts))
    assert math.isnan(result["harmonic_mean"])
    assert math.isnan(result["geometric_mean"])
    assert_stats_close(result, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shift", [-7.0, 3.0, 10.5, 25.0])
def test_shift_gives_the_same_results(rng: np.random.Generator, shift: float) -> None:
    parts = [rng.normal(3.0, 2.0, size=400) + 5.0, rng.uniform(1.0, 20.0, size=600)]
    assert_stats_close(
        pooled_univariate(parts, shift=shift), pooled_univariate(parts), rtol=1e-7, atol=1e-9
    )


def test_shift_rescues_data_far_from_zero(rng: np.random.Generator) -> None:
    parts = [1e6 + rng.normal(size=1000), 1e6 + rng.normal(size=1000)]
    expected = direct_univariate(np.concatenate(parts))
    result = pooled_univariate(parts, shift=1e6)
    assert_stats_close(result, expected, rtol=1e-8)


def test_univariate_small_samples() -> None:
    empty = sm.univariate(np.zeros(9), math.nan, math.nan, all_positive=False)
    assert list(empty) == EXPECTED_UNIVARIATE_KEYS
    assert empty["samples"] == 0
    assert empty["sum"] == 0.0
    assert all(math.isnan(empty[key]) for key in EXPECTED_UNIVARIATE_KEYS[4:])

    single = pooled_univariate([np.array([4.0])])
    assert single["samples"] == 1
    assert single["mean"] == 4.0
    assert single["variance_mle"] == 0.0
    assert single["harmonic_mean"] == pytest.approx(4.0)
    assert single["geometric_mean"] == pytest.approx(4.0)
    assert single["root_mean_square"] == 4.0
    for key in ("variance", "standard_deviation", "variance_of_sample_mean", "skewness"):
        assert math.isnan(single[key]), key


def test_univariate_constant_and_zero_mean() -> None:
    constant = pooled_univariate([np.full(5, 2.0), np.full(3, 2.0)])
    assert constant["variance"] == 0.0
    assert constant["coefficient_of_variation"] == 0.0
    for key in ("skewness", "kurtosis", "excess_kurtosis", "hyper_skewness", "hyper_flatness"):
        assert math.isnan(constant[key]), key

    symmetric = pooled_univariate([np.array([-1.0, 1.0]), np.array([-2.0, 2.0])])
    assert symmetric["mean"] == 0.0
    assert math.isnan(symmetric["coefficient_of_variation"])
    assert symmetric["skewness"] == 0.0
    assert symmetric["kurtosis"] == pytest.approx((1 + 1 + 16 + 16) / 4 / 2.5**2)


def test_univariate_rejects_bad_sums() -> None:
    with pytest.raises(ValueError, match="9 values"):
        sm.univariate(np.zeros(8), 0.0, 0.0, all_positive=False)
    bad = np.zeros(9)
    bad[0] = -1.0
    with pytest.raises(ValueError, match="count"):
        sm.univariate(bad, 0.0, 0.0, all_positive=False)


def test_univariate_through_the_big_ring(rng: np.random.Generator) -> None:
    # The full pipeline: local sums -> exact 256-bit fixed point -> shares -> statistics.
    parts = [rng.normal(50.0, 10.0, size=size) for size in (100, 250, 40)]
    parties = len(parts)
    low = float(min(p.min() for p in parts))
    encoded = [
        ring.encode_big(sm.local_power_sums(p, shift=50.0, positive_minimum=low), parties=parties)
        for p in parts
    ]
    shares = [ring.split_big(values, parties) for values in encoded]
    partial = [ring.combine_big([s[j] for s in shares]) for j in range(parties)]
    total = ring.decode_big(ring.combine_big(partial))
    everything = np.concatenate(parts)
    result = sm.univariate(
        total,
        float(np.min(everything)),
        float(np.max(everything)),
        all_positive=True,
        shift=50.0,
        reciprocal_scale=low,
    )
    assert_stats_close(result, direct_univariate(everything), rtol=1e-9)


# a spread of 1e-10 around 1.0 leaves the data itself about 6 significant digits
@pytest.mark.parametrize(("spread", "rel"), [(1e-6, 1e-6), (1e-10, 1e-3), (1e9, 1e-6)])
def test_the_exact_ring_keeps_every_statistic_whatever_the_scale(
    rng: np.random.Generator, spread: float, rel: float
) -> None:
    # the 256-bit ring rounds to 2^-64 and overflows at 2^191: kurtosis of data
    # with a standard deviation of 1e-6 came out 0.0, and 1e9 was refused
    parts = [rng.normal(1.0 if spread < 1 else 1e12, spread, size=size) for size in (150, 150)]
    everything = np.concatenate(parts)
    shift = float(everything.mean())
    low = float(everything.min())
    bits, frac = ring.EXACT_RING_BITS, ring.EXACT_FRAC_BITS
    encoded = [
        ring.encode_big(
            sm.local_power_sums(p, shift=shift, positive_minimum=low),
            parties=2,
            frac_bits=frac,
            ring_bits=bits,
        )
        for p in parts
    ]
    modulus = 1 << bits
    total = ring.decode_big(
        [(a + b) % modulus for a, b in zip(*encoded, strict=True)], frac_bits=frac, ring_bits=bits
    )
    result = sm.univariate(
        total,
        low,
        float(everything.max()),
        all_positive=True,
        shift=shift,
        reciprocal_scale=low,
    )
    expected = direct_univariate(everything)
    for key in ("variance", "skewness", "kurtosis", "hyper_skewness", "hyper_flatness"):
        assert result[key] == pytest.approx(expected[key], rel=rel), key
    assert result["kurtosis"] > 2


# --- bivariate --------------------------------------------------------------------------


def test_bivariate_simon_example() -> None:
    total = sm.local_cross_sums([1.0], [2.0]) + sm.local_cross_sums([2.0], [3.0])
    result = sm.bivariate(total)
    assert result == {
        "samples": 2,
        "covariance": 0.5,
        "covariance_mle": 0.25,
        "correlation_coefficient": 1.0,
        "regression_slope": 1.0,
        "regression_intercept": 1.0,
        "regression_slope_through_origin": 1.6,
    }


def test_local_cross_sums_values() -> None:
    sums = sm.local_cross_sums(np.array([1.0, 2.0, 3.0]), np.array([4.0, 0.0, -1.0]))
    np.testing.assert_array_equal(sums, [3.0, 6.0, 3.0, 14.0, 17.0, 1.0])
    shifted = sm.local_cross_sums(np.array([1.0, 3.0]), np.array([2.0, 2.0]), shift_x=2, shift_y=1)
    np.testing.assert_array_equal(shifted, [2.0, 0.0, 2.0, 2.0, 2.0, 0.0])


@pytest.mark.parametrize(("shift_x", "shift_y"), [(0.0, 0.0), (10.0, -30.0), (-4.0, 2.5)])
def test_bivariate_matches_numpy(rng: np.random.Generator, shift_x: float, shift_y: float) -> None:
    x = rng.normal(10.0, 3.0, size=1500)
    y = -30.0 + 2.0 * x + rng.normal(0.0, 4.0, size=1500)
    cuts = [0, 400, 401, 1500]
    total = np.sum(
        [
            sm.local_cross_sums(x[a:b], y[a:b], shift_x=shift_x, shift_y=shift_y)
            for a, b in itertools.pairwise(cuts)
        ],
        axis=0,
    )
    result = sm.bivariate(total, shift_x=shift_x, shift_y=shift_y)
    assert list(result) == list(sm.BIVARIATE_KEYS)
    slope, intercept = np.polyfit(x, y, 1)
    assert result["samples"] == 1500
    assert result["covariance"] == pytest.approx(float(np.cov(x, y)[0, 1]), rel=1e-9)
    assert result["covariance_mle"] == pytest.approx(float(np.cov(x, y, bias=True)[0, 1]), rel=1e-9)
    assert result["correlation_coefficient"] == pytest.approx(
        float(np.corrcoef(x, y)[0, 1]), rel=1e-9
    )
    assert result["regression_slope"] == pytest.approx(float(slope), rel=1e-9)
    assert result["regression_intercept"] == pytest.approx(float(intercept), rel=1e-9)
    through_origin = float(np.sum(x * y) / np.sum(x * x))
    assert result["regression_slope_through_origin"] == pytest.approx(through_origin, rel=1e-9)


def test_bivariate_accepts_mapping() -> None:
    total = sm.local_cross_sums([1.0, 2.0, 4.0], [1.0, 3.0, 2.0])
    as_mapping = dict(zip(sm.CROSS_SUM_KEYS, (float(v) for v in total), strict=True))
    assert sm.bivariate(as_mapping) == sm.bivariate(total)
    del as_mapping["sum_xy"]
    with pytest.raises(ValueError, match="sum_xy"):
        sm.bivariate(as_mapping)


def test_bivariate_degenerate() -> None:
    constant_x = sm.bivariate(sm.local_cross_sums([2.0, 2.0, 2.0], [1.0, 5.0, 3.0]))
    assert constant_x["covariance"] == 0.0
    assert math.isnan(constant_x["correlation_coefficient"])
    assert math.isnan(constant_x["regression_slope"])
    assert math.isnan(constant_x["regression_intercept"])
    assert constant_x["regression_slope_through_origin"] == pytest.approx(1.5)
    single = sm.bivariate(sm.local_cross_sums([1.0], [2.0]))
    assert math.isnan(single["covariance"])
    assert single["covariance_mle"] == 0.0
    empty = sm.bivariate(np.zeros(6))
    assert empty["samples"] == 0
    assert all(math.isnan(empty[key]) for key in sm.BIVARIATE_KEYS[1:])


def test_cross_sums_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="same number"):
        sm.local_cross_sums([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN or infinity"):
        sm.local_cross_sums([1.0, math.inf], [1.0, 2.0])
    with pytest.raises(ValueError, match="6 values"):
        sm.bivariate(np.zeros(5))
