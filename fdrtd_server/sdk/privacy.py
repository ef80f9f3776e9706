"""Differentially private releases: clamping, calibration and integer noise through OpenDP.

A function with a differentially private release loads its dataset with
``ctx.load_dataset(ref, ..., private=True)``. For a named dataset whose owner
requires differential privacy the :class:`~fdrtd_server.microservice.Dataset`
then carries its privacy terms (``dataset.privacy``); for the caller's own
upload, or a dataset with ``dp = false``, ``dataset.privacy`` is None and
nothing here applies. The function then

1. clamps the columns it uses to the owner's declared bounds
   (:func:`clamped`, :func:`fixed_units`: every record becomes an integer in
   the fixed-point units of the SMPC ring, so sums are exact integer sums and
   the sensitivity is an exact integer, :func:`fixed_sensitivity`);
2. spends the query's epsilon (and delta) from the dataset's budget,
   atomically, before any noise is drawn (:func:`private_release`);
3. adds noise to each released statistic (:meth:`Release.noisy`): integer
   (discrete) Laplace or discrete Gaussian noise drawn by OpenDP's exact
   samplers, calibrated with OpenDP's own privacy map so that the epsilon the
   mechanism reports is at most the part of the query's epsilon charged for
   it. Never numpy or :mod:`random` noise: the values and the noise are
   integers, so no floating-point attack (Mironov 2012) applies.

In a multi-party protocol each party adds its own full noise to its own
clamped aggregate *before* it is secret-shared: the opened value is already
noisy, and each party's data is protected by its own noise even if every
other party colludes (``docs/protocols.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import numpy.typing as npt

from fdrtd_server.errors import BadRequest, OutOfRange
from fdrtd_server.inputs import Input, Output
from fdrtd_server.microservice import Dataset
from fdrtd_server.privacy import Budget, PrivateTerms, Spent, show

__all__ = [
    "EPSILON",
    "MECHANISMS",
    "PRIVACY",
    "Release",
    "calibrate",
    "clamped",
    "fixed_sensitivity",
    "fixed_units",
    "noise",
    "privacy_loss",
    "private_release",
]

MECHANISMS = ("laplace", "gaussian")
"""``laplace``: discrete Laplace, pure epsilon-DP over the l1 sensitivity;
``gaussian``: discrete Gaussian, zero-concentrated DP over the l2 sensitivity,
converted to (epsilon, delta)."""

EPSILON = Input(
    "epsilon",
    "number",
    "the privacy budget this query spends on each named dataset whose owner requires "
    "differential privacy (at most what remains; default: the owner's per-query epsilon); "
    "ignored for the caller's own uploads",
    minimum=0,
    exclusive=True,
)
"""The ``epsilon`` input of every function with a differentially private release."""
PRIVACY = Output(
    "privacy",
    "object",
    "per named dataset with differential privacy: {mechanism, epsilon, delta, noise (scale "
    "and sensitivity of each noised statistic, in its units), bounds, remaining, budget}",
)
"""The ``privacy`` output: what the query spent and how it was noised, per dataset."""

_FEATURES: list[bool] = []


def _dp() -> Any:
    """OpenDP, with only the ``contrib`` feature enabled (once per process)."""
    import opendp.prelude as dp

    if not _FEATURES:
        dp.enable_features("contrib")
        _FEATURES.append(True)
    return dp


def _measurement(mechanism: str, scale: float, delta: Fraction) -> Any:
    """The OpenDP measurement adding ``mechanism`` noise of ``scale`` to an i64 vector.

    For ``gaussian`` its privacy map gives (epsilon, delta) at ``delta``.
    """
    dp = _dp()
    domain = dp.vector_domain(dp.atom_domain(T="i64"))
    if mechanism == "laplace":
        return dp.m.make_laplace(domain, dp.l1_distance(T="i64"), scale=scale)
    if mechanism == "gaussian":
        zcdp = dp.m.make_gaussian(domain, dp.l2_distance(T="i64"), scale=scale)
        return dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(zcdp), delta=float(delta))
    raise BadRequest(f"unknown mechanism '{mechanism[:32]}'; one of {', '.join(MECHANISMS)}")


def privacy_loss(mechanism: str, scale: float, sensitivity: int, delta: Fraction) -> Fraction:
    """The epsilon OpenDP's privacy map reports for ``mechanism`` noise of ``scale``.

    Args:
        mechanism: One of :data:`MECHANISMS`.
        scale: The noise scale, in integer units.
        sensitivity: The l1 (Laplace) or l2 (Gaussian) sensitivity, in integer units.
        delta: The delta of a Gaussian release (ignored for Laplace).
    """
    reported = _measurement(mechanism, scale, delta).map(int(sensitivity))
    epsilon = reported[0] if isinstance(reported, tuple) else reported
    return Fraction(float(epsilon))


def calibrate(mechanism: str, sensitivity: int, epsilon: Fraction, delta: Fraction) -> float:
    """The smallest noise scale (to float precision) whose reported epsilon is at most ``epsilon``.

    A bisection on OpenDP's own privacy map (:func:`privacy_loss`), compared
    exactly: the epsilon OpenDP reports for the scale returned is never above
    ``epsilon``, however the map rounds.

    Raises:
        BadRequest: If ``epsilon`` is not positive, or a Gaussian has no delta.
    """
    if epsilon <= 0:
        raise BadRequest("'epsilon' must be greater than 0")
    if mechanism == "gaussian" and not 0 < delta < 1:
        raise BadRequest("a Gaussian release needs a delta between 0 and 1")
    sensitivity = max(int(sensitivity), 1)

    def fits(scale: float) -> bool:
        return privacy_loss(mechanism, scale, sensitivity, delta) <= epsilon

    high = sensitivity / float(epsilon)
    while not fits(high):
        high *= 2.0
        if not math.isfinite(high):
            raise OutOfRange("no noise scale gives so small an epsilon; ask for a larger one")
    low = high / 2.0
    while fits(low) and low > 1e-300:
        high, low = low, low / 2.0
    for _ in range(200):  # bisect to float precision: low never fits, high always does
        middle = (low + high) / 2.0
        if middle in (low, high):
            break
        if fits(middle):
            high = middle
        else:
            low = middle
    return high


def noise(mechanism: str, scale: float, size: int, delta: Fraction = Fraction(0)) -> list[int]:
    """``size`` integers of ``mechanism`` noise of ``scale``, drawn by OpenDP in one call.

    The measurement is applied to zeros (OpenDP saturates at the edge of i64,
    it does not wrap), so what it returns is the noise itself; the caller
    adds it to its aggregate in Python integers.
    """
    if size == 0:
        return []
    drawn = _measurement(mechanism, scale, delta if mechanism == "gaussian" else Fraction(0))
    return [int(v) for v in drawn([0] * size)]


def clamped(values: npt.ArrayLike, bounds: tuple[float, float]) -> npt.NDArray[np.float64]:
    """``values`` clamped to the declared ``[lower, upper]`` (NaN rows must be gone already)."""
    return np.clip(np.asarray(values, dtype=np.float64), bounds[0], bounds[1])


def fixed_units(values: npt.NDArray[np.float64], frac_bits: int) -> npt.NDArray[np.int64]:
    """Clamped values as integers in the fixed-point units of the ring: ``round(x * 2^f)``.

    Raises:
        OutOfRange: If a value does not fit in 63 bits at ``frac_bits``.
    """
    scaled = np.rint(np.ldexp(np.asarray(values, dtype=np.float64), frac_bits))
    if scaled.size and not float(np.max(np.abs(scaled))) < 2.0**62:
        raise OutOfRange(
            "the declared bounds are too large for the fixed-point encoding at this "
            "precision; ask for fewer 'frac_bits', or the owner for narrower bounds"
        )
    return np.asarray(scaled.astype(np.int64))


def fixed_sensitivity(bounds: tuple[float, float], frac_bits: int) -> int:
    """The most one clamped record adds to a sum, in the ring's fixed-point units."""
    ends = fixed_units(np.asarray(bounds, dtype=np.float64), frac_bits)
    return max(int(abs(ends[0])), int(abs(ends[1])), 1)


def _l2(size: int, per_element: int) -> int:
    """The l2 norm of ``size`` elements of ``per_element``, rounded up to an integer."""
    square = size * per_element * per_element
    root = math.isqrt(square)
    return root if root * root == square else root + 1


@dataclass
class Release:
    """One query's spend on one dataset, and the noise of each statistic it releases.

    The query's epsilon (and delta) is split evenly over its ``parts``
    statistics, exactly; each :meth:`noisy` call uses one part.
    """

    terms: PrivateTerms
    spent: Spent
    budget: Budget
    parts: int
    needs: str
    noised: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def mechanism(self) -> str:
        """The owner's mechanism for the dataset."""
        return self.terms.privacy.mechanism

    def noisy(
        self,
        what: str,
        values: list[int] | npt.NDArray[np.int64],
        sensitivity: int,
        *,
        unit: float = 1.0,
        per_element: bool = True,
    ) -> list[int]:
        """``values`` (integers) with noise for one part of the spend.

        Args:
            what: The statistic's name in the result's statement ("count").
            values: The exact aggregate in integer units (one or more elements).
            sensitivity: How much one record changes one element (or, with
                ``per_element=False``, the whole vector in l1 *and* l2: a
                histogram's one cell by one), in integer units.
            unit: What one integer unit is in the released value (``2^-f``).
            per_element: Whether every element may change by ``sensitivity``.
        """
        if len(self.noised) >= self.parts:
            raise RuntimeError("a release noised more statistics than it spent for")
        exact_values = [int(v) for v in np.asarray(values).reshape(-1)]
        size = len(exact_values)
        mechanism = self.mechanism
        if per_element:
            l1, l2 = size * sensitivity, _l2(size, sensitivity)
        else:
            l1 = l2 = sensitivity
        chosen = l1 if mechanism == "laplace" else l2
        epsilon = self.spent.epsilon / self.parts
        delta = self.spent.delta / self.parts
        scale = calibrate(mechanism, chosen, epsilon, delta)
        drawn = noise(mechanism, scale, size, delta)
        self.noised[what] = {
            "scale": scale * unit,
            "sensitivity": chosen * unit,
            "epsilon": show(epsilon),
            "delta": show(delta),
        }
        return [v + n for v, n in zip(exact_values, drawn, strict=True)]

    def statement(self, columns: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
        """What the result states for the dataset: spend, noise, bounds, what remains."""
        remaining = self.budget.remaining
        return {
            "mechanism": self.mechanism,
            "epsilon": show(self.spent.epsilon),
            "delta": show(self.spent.delta),
            "noise": dict(self.noised),
            "bounds": {c: list(self.terms.bounds[c]) for c in columns if c in self.terms.bounds},
            "remaining": {"epsilon": show(remaining.epsilon), "delta": show(remaining.delta)},
            "budget": self.budget.to_dict(),
        }


async def private_release(dataset: Dataset, epsilon: Any, parts: int, needs: str) -> Release | None:
    """Spend a query's budget on ``dataset`` before its noise is drawn; None if it needs no DP.

    Args:
        dataset: Loaded with ``load_dataset(..., private=True)``.
        epsilon: The analyst's ``epsilon`` input (None: the policy's per-query epsilon).
        parts: How many statistics the query releases (each gets an equal part).
        needs: The query, for a refusal ("'smpc.count'").

    Raises:
        Forbidden: If the budget does not allow the query (nothing is spent).
        BadRequest: If ``epsilon`` is not a positive number.
    """
    terms = dataset.privacy
    if terms is None:  # the caller's own upload, or dp = false: no noise, nothing spent
        return None
    wanted = terms.wanted(epsilon)
    budget = await terms.spend(wanted, needs)
    return Release(terms, wanted, budget, parts, needs)
