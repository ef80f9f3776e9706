"""Statistics from aggregated power sums: the local half and the final formulas.

Secure univariate and bivariate statistics follow one pattern. Each party
computes a short vector of local aggregates over its own records (the count
and the power sums ``sum(x^k)``), the parties add these vectors securely
(:mod:`fdrtd_server.sdk.ring`), and the statistics are then computed from the
totals alone. This module holds the two pure ends of that pipeline:
:func:`local_power_sums` / :func:`local_cross_sums` run on each party's data,
and :func:`univariate` / :func:`bivariate` turn the summed vectors into
results. Nothing here sees more than one party's records or does any I/O.

Shift
    Raw power sums lose precision when the data sit far from zero: the
    central moments are recovered as differences of large, nearly equal
    numbers. Every function therefore takes a public ``shift`` ``c`` (for
    instance a rough center that the analyst supplies) and works with
    ``d = x - c``. All parties must use the same shift, and the final
    function must be given that shift too. The results do not depend on the
    shift except for rounding; with a good shift the power sums also stay
    small, which keeps them inside the fixed-point range.

Moments
    With ``n`` the count and ``a_k = sum(d^k) / n`` the raw moments of the
    shifted data, the mean is ``c + a_1`` and the population (maximum
    likelihood) central moments are, by binomial expansion,
    ``m_k = sum_{j=0..k} C(k, j) * a_j * (-a_1)^(k-j)`` (with ``a_0 = 1``).
    The formulas for each statistic are listed in :func:`univariate`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

__all__ = [
    "BIVARIATE_KEYS",
    "CROSS_SUM_KEYS",
    "POWER_SUM_KEYS",
    "UNIVARIATE_KEYS",
    "all_positive",
    "bivariate",
    "local_cross_sums",
    "local_power_sums",
    "univariate",
]

POWER_SUM_KEYS: tuple[str, ...] = (
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
"""Names of the local aggregates, in the order of :func:`local_power_sums`.

``count`` is the number of records, ``sum_k`` is ``sum((x - shift)^k)``,
``sum_reciprocal`` is ``sum(1/x)`` and ``sum_log`` is ``sum(log x)`` (both on
the unshifted data, and only meaningful when every ``x > 0``).
"""

UNIVARIATE_KEYS: tuple[str, ...] = (
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
)
"""The 22 keys returned by :func:`univariate`, in order."""

CROSS_SUM_KEYS: tuple[str, ...] = ("count", "sum_x", "sum_y", "sum_xx", "sum_yy", "sum_xy")
"""Names of the local aggregates, in the order of :func:`local_cross_sums`.

All sums are over the shifted values ``x - shift_x`` and ``y - shift_y``.
"""

BIVARIATE_KEYS: tuple[str, ...] = (
    "samples",
    "covariance",
    "covariance_mle",
    "correlation_coefficient",
    "regression_slope",
    "regression_intercept",
    "regression_slope_through_origin",
)
"""The keys returned by :func:`bivariate`, in order."""

_MAX_POWER = 6
_PIECE = 1 << 18
"""Values summed at a time: bounds the temporary arrays of a long column (2 MiB each)."""
F64Array = npt.NDArray[np.float64]


def _as_finite_vector(x: npt.ArrayLike, name: str) -> F64Array:
    values = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"`{name}` contains NaN or infinity; remove or impute missing values first"
        )
    return values


def all_positive(x: npt.ArrayLike) -> bool:
    """Tell whether every value is strictly positive.

    The harmonic and geometric means are only defined for such data. A
    protocol combines the parties' answers with a logical AND.

    Args:
        x: The party's values (any shape).

    Returns:
        ``True`` if ``x`` is non-empty and all its values are ``> 0``.
    """
    values = np.asarray(x, dtype=np.float64)
    return bool(values.size > 0 and np.all(values > 0))


def local_power_sums(
    x: npt.ArrayLike, *, shift: float = 0.0, positive_minimum: float | None = None
) -> F64Array:
    """Compute one party's aggregates for :func:`univariate`.

    Args:
        x: The party's values (any shape; flattened).
        shift: Public shift ``c``; the power sums are of ``x - c``.
        positive_minimum: The *joint* minimum ``l`` of all parties' values,
            if it is positive (public); else None.

    Returns:
        A float64 vector in :data:`POWER_SUM_KEYS` order:
        ``[n, sum(d), ..., sum(d^6), sum(l/x), sum(log x)]`` with ``d = x - c``.
        The last two entries are ``0.0`` unless ``positive_minimum`` is
        given: whether they are summed must depend on public data only, else
        a party with all-positive values would reveal its own sums whenever
        another party's values are not (the result then hides them, but the
        opened sums would not). ``l/x`` lies in ``(0, 1]``, so the sum stays
        finite even for subnormal values.

    Raises:
        ValueError: If ``x`` contains NaN or infinity, ``shift`` is not
            finite, or ``(x - shift)^6`` overflows float64.
    """
    values = _as_finite_vector(x, "x")
    if not math.isfinite(shift):
        raise ValueError("`shift` must be a finite number")
    sums = np.zeros(len(POWER_SUM_KEYS), dtype=np.float64)
    sums[0] = values.size
    # in pieces: a column of millions of values needs no copies of its size
    for start in range(0, values.size, _PIECE):
        deltas = values[start : start + _PIECE] - shift
        power = deltas.copy()
        with np.errstate(over="ignore"):  # an overflow shows up as inf, checked below
            for k in range(1, _MAX_POWER + 1):
                if k > 1:
                    np.multiply(power, deltas, out=power)
                sums[k] += np.sum(power)
    if not np.all(np.isfinite(sums)):
        raise ValueError(
            "the values are too large for power sums up to the 6th power; "
            "scale the data down or pass a `shift` near their center"
        )
    if positive_minimum is not None:
        if not positive_minimum > 0 or (values.size and values.min() < positive_minimum):
            raise ValueError("`positive_minimum` must be positive and at most every value")
        for start in range(0, values.size, _PIECE):
            piece = values[start : start + _PIECE]
            sums[_MAX_POWER + 1] += np.sum(positive_minimum / piece)
            sums[_MAX_POWER + 2] += np.sum(np.log(piece))
    return sums


def _ratio(numerator: float, denominator: float) -> float:
    # NaN rather than ZeroDivisionError or a huge quotient of rounding noise.
    if denominator == 0.0 or math.isnan(denominator):
        return math.nan
    return numerator / denominator


def _power(base: float, exponent: float) -> float:
    # math.pow raises OverflowError where numpy would return inf.
    try:
        return math.pow(base, exponent)
    except OverflowError:
        return math.inf


def _sqrt(value: float) -> float:
    return math.sqrt(value) if value >= 0.0 else math.nan


def _central_moments(raw: list[float]) -> list[float]:
    """Turn raw moments ``a_0 .. a_K`` into central moments ``m_0 .. m_K``."""
    mean = raw[1]
    central = []
    for k in range(len(raw)):
        moment = math.fsum(math.comb(k, j) * raw[j] * (-mean) ** (k - j) for j in range(k + 1))
        # Even central moments are non-negative; rounding can push them below zero.
        central.append(max(moment, 0.0) if k % 2 == 0 else moment)
    return central


def _check_sums(sums: npt.ArrayLike, keys: tuple[str, ...]) -> list[float]:
    values = np.asarray(sums, dtype=np.float64).reshape(-1)
    if values.size != len(keys):
        raise ValueError(f"`sums` must hold {len(keys)} values in the order {', '.join(keys)}")
    if values[0] < 0:
        raise ValueError("the count in `sums` must not be negative")
    return [float(value) for value in values]


def univariate(
    sums: npt.ArrayLike,
    minimum: float,
    maximum: float,
    *,
    all_positive: bool,
    shift: float = 0.0,
    reciprocal_scale: float = 1.0,
) -> dict[str, float]:
    """Compute the 22 univariate statistics of SIMON from summed aggregates.

    Notation: ``n`` count, ``c`` shift, ``a_k = sum((x-c)^k) / n``, mean
    ``mu = c + a_1``, population central moments ``m_k`` (module docstring).

    * ``samples = n``; ``sum = n*c + sum(x-c)``; ``mean = mu``.
    * ``harmonic_mean = n / sum(1/x) = n * l / sum(l/x)`` with ``l`` the
      ``reciprocal_scale``; ``geometric_mean = exp(sum(log x) / n)``; both
      NaN unless ``all_positive``.
    * ``variance_mle = m_2``; ``variance = m_2 * n / (n-1)`` (sample variance);
      ``variance_of_sample_mean = variance / n``.
    * ``standard_deviation = sqrt(variance)``; ``standard_deviation_mle =
      sqrt(m_2)``; ``standard_error_of_mean = sqrt(variance / n)``.
    * ``coefficient_of_variation = standard_deviation / mu`` and
      ``coefficient_of_variation_mle = standard_deviation_mle / mu``.
    * ``root_mean_square = sqrt(sum(x^2) / n) = sqrt(m_2 + mu^2)``.
    * ``root_mean_square_deviation = sqrt(sum((x - mu)^2) / n) = sqrt(m_2)``,
      the root mean square deviation from the mean (equal to
      ``standard_deviation_mle``, as in SIMON).
    * ``skewness = m_3 / m_2^1.5``; ``kurtosis = m_4 / m_2^2``;
      ``excess_kurtosis = kurtosis - 3``; ``hyper_skewness = m_5 / m_2^2.5``;
      ``hyper_flatness = m_6 / m_2^3`` (population standardized moments).

    A statistic whose formula divides by zero (``n = 0``, ``n = 1`` for the
    sample variance, ``m_2 = 0`` for constant data, ``mu = 0`` for the
    coefficients of variation) is NaN. Constant data whose sums carry
    fixed-point rounding may give a tiny ``m_2 > 0`` and meaningless shape
    statistics; the protocol should treat ``minimum == maximum`` specially.

    Args:
        sums: Element-wise sum of all parties' :func:`local_power_sums`, in
            :data:`POWER_SUM_KEYS` order.
        minimum: Global minimum (computed by a separate protocol).
        maximum: Global maximum.
        all_positive: Whether every party reported :func:`all_positive`.
        shift: The shift all parties used for their power sums.
        reciprocal_scale: The ``positive_minimum`` all parties passed to
            :func:`local_power_sums` (1.0 if the sums are of ``1/x``).

    Returns:
        A dict with exactly the keys of :data:`UNIVARIATE_KEYS`, in that order.

    Raises:
        ValueError: If ``sums`` has the wrong length or a negative count.
    """
    values = _check_sums(sums, POWER_SUM_KEYS)
    count = values[0]
    shifted_sums = values[1 : _MAX_POWER + 1]
    total = count * shift + shifted_sums[0]
    nan = math.nan
    if count == 0:
        central = [nan] * (_MAX_POWER + 1)
        mean = nan
    else:
        raw = [1.0] + [power_sum / count for power_sum in shifted_sums]
        central = _central_moments(raw)
        mean = shift + raw[1]
    variance_mle = central[2]
    variance = _ratio(variance_mle * count, count - 1.0) if count > 1 else nan
    variance_of_sample_mean = _ratio(variance, count)
    standard_deviation = _sqrt(variance)
    standard_deviation_mle = _sqrt(variance_mle)
    kurtosis = _ratio(central[4], _power(variance_mle, 2))
    if all_positive and count > 0:
        harmonic_mean = _ratio(count * reciprocal_scale, values[_MAX_POWER + 1])
        geometric_mean = math.exp(values[_MAX_POWER + 2] / count)
    else:
        harmonic_mean = geometric_mean = nan
    result = {
        "samples": count,
        "minimum": float(minimum),
        "maximum": float(maximum),
        "sum": total,
        "mean": mean,
        "harmonic_mean": harmonic_mean,
        "geometric_mean": geometric_mean,
        "variance": variance,
        "variance_mle": variance_mle,
        "variance_of_sample_mean": variance_of_sample_mean,
        "standard_deviation": standard_deviation,
        "standard_deviation_mle": standard_deviation_mle,
        "standard_error_of_mean": _sqrt(variance_of_sample_mean),
        "coefficient_of_variation": _ratio(standard_deviation, mean),
        "coefficient_of_variation_mle": _ratio(standard_deviation_mle, mean),
        "root_mean_square": _sqrt(variance_mle + _power(mean, 2)),
        "root_mean_square_deviation": standard_deviation_mle,
        "skewness": _ratio(central[3], _power(variance_mle, 1.5)),
        "kurtosis": kurtosis,
        "excess_kurtosis": kurtosis - 3.0,
        "hyper_skewness": _ratio(central[5], _power(variance_mle, 2.5)),
        "hyper_flatness": _ratio(central[6], _power(variance_mle, 3)),
    }
    return result


def local_cross_sums(
    x: npt.ArrayLike, y: npt.ArrayLike, *, shift_x: float = 0.0, shift_y: float = 0.0
) -> F64Array:
    """Compute one party's aggregates for :func:`bivariate`.

    Args:
        x: The party's first variable (flattened).
        y: The party's second variable, paired with ``x`` record by record.
        shift_x: Public shift of ``x``.
        shift_y: Public shift of ``y``.

    Returns:
        A float64 vector in :data:`CROSS_SUM_KEYS` order:
        ``[n, sum(u), sum(v), sum(u^2), sum(v^2), sum(u*v)]`` with
        ``u = x - shift_x`` and ``v = y - shift_y``.

    Raises:
        ValueError: If ``x`` and ``y`` differ in length, contain NaN or
            infinity, or a shift is not finite.
    """
    first = _as_finite_vector(x, "x")
    second = _as_finite_vector(y, "y")
    if first.size != second.size:
        raise ValueError("`x` and `y` must have the same number of records")
    if not (math.isfinite(shift_x) and math.isfinite(shift_y)):
        raise ValueError("`shift_x` and `shift_y` must be finite numbers")
    u = first - shift_x
    v = second - shift_y
    return np.array(
        [first.size, np.sum(u), np.sum(v), np.sum(u * u), np.sum(v * v), np.sum(u * v)],
        dtype=np.float64,
    )


def bivariate(
    sums: npt.ArrayLike | Mapping[str, float],
    *,
    shift_x: float = 0.0,
    shift_y: float = 0.0,
) -> dict[str, float]:
    """Compute covariance, correlation and simple regression from summed aggregates.

    Notation: ``n`` count, ``u = x - shift_x``, ``v = y - shift_y``, means
    ``mu_x``, ``mu_y``, population (MLE) moments ``s_xx``, ``s_yy``, ``s_xy``:

    * ``covariance_mle = s_xy = sum(u*v)/n - (sum(u)/n) * (sum(v)/n)``;
      ``covariance = s_xy * n / (n-1)``.
    * ``correlation_coefficient = s_xy / sqrt(s_xx * s_yy)`` (Pearson).
    * ``regression_slope = s_xy / s_xx`` and ``regression_intercept =
      mu_y - slope * mu_x``: least squares for ``y = intercept + slope * x``.
    * ``regression_slope_through_origin = sum(x*y) / sum(x^2)
      = (s_xy + mu_x*mu_y) / (s_xx + mu_x^2)``: least squares for
      ``y = slope * x`` (SIMON's ``regression_slope_only``).

    Statistics that would divide by zero are NaN.

    Args:
        sums: Element-wise sum of all parties' :func:`local_cross_sums`, as a
            vector in :data:`CROSS_SUM_KEYS` order or a mapping with those keys.
        shift_x: The shift all parties used for ``x``.
        shift_y: The shift all parties used for ``y``.

    Returns:
        A dict with exactly the keys of :data:`BIVARIATE_KEYS`, in that order.

    Raises:
        ValueError: If ``sums`` is incomplete or has a negative count.
    """
    if isinstance(sums, Mapping):
        missing = [key for key in CROSS_SUM_KEYS if key not in sums]
        if missing:
            raise ValueError(f"`sums` lacks the keys {', '.join(missing)}")
        sums = [float(sums[key]) for key in CROSS_SUM_KEYS]
    count, sum_u, sum_v, sum_uu, sum_vv, sum_uv = _check_sums(sums, CROSS_SUM_KEYS)
    nan = math.nan
    if count == 0:
        mean_u = mean_v = var_x = var_y = cov = nan
    else:
        mean_u = sum_u / count
        mean_v = sum_v / count
        var_x = max(sum_uu / count - mean_u**2, 0.0)
        var_y = max(sum_vv / count - mean_v**2, 0.0)
        cov = sum_uv / count - mean_u * mean_v
    mean_x = shift_x + mean_u
    mean_y = shift_y + mean_v
    slope = _ratio(cov, var_x)
    result = {
        "samples": count,
        "covariance": _ratio(cov * count, count - 1.0) if count > 1 else nan,
        "covariance_mle": cov,
        "correlation_coefficient": _ratio(cov, _sqrt(var_x * var_y)),
        "regression_slope": slope,
        "regression_intercept": mean_y - slope * mean_x,
        "regression_slope_through_origin": _ratio(cov + mean_x * mean_y, var_x + _power(mean_x, 2)),
    }
    return result
