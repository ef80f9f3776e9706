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
2. declares each statistic it will release (:class:`Statistic`: its name,
   sensitivity and size, all data-independent) and spends the query's
   epsilon (and delta) from the dataset's budget, atomically, before any
   noise is drawn (:func:`plan_release` then :meth:`Plan.spend`, or
   :func:`private_release` for both). Every check that can refuse the query
   without looking at the data runs *before* the spend: the owner's epsilon
   floor, the noise scale of every statistic (refused above
   :data:`MAX_SCALE`, where OpenDP's i64 output would saturate), the
   fixed-point encoding of the bounds. What can still fail after the spend
   depends only on the noise or on noisy values, so a failure is no probe
   of the data;
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

import functools
import math
from collections.abc import Sequence
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
    "MAX_NOISE",
    "MAX_SCALE",
    "MECHANISMS",
    "PRIVACY",
    "Plan",
    "Release",
    "Statistic",
    "calibrate",
    "clamped",
    "fixed_sensitivity",
    "fixed_units",
    "noise",
    "plan_release",
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

MAX_SCALE = float(1 << 50)
"""The largest noise scale (in integer units) a release may use; a larger one is refused
before the spend. OpenDP draws into i64 and saturates at its edge: at a scale near 2^63
every draw would be the same constant, and the noisy value minus that constant the exact
one. Below 2^50, a draw reaches :data:`MAX_NOISE` with probability below exp(-2^12)."""
MAX_NOISE = 1 << 62
"""A drawn noise value of this magnitude or more is refused (:func:`noise`), never released."""

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
    try:
        return _bisect(mechanism, sensitivity, epsilon, delta)
    except (OverflowError, ZeroDivisionError, ValueError, _dp().OpenDPException):
        # OpenDP's map overflows at extreme parameters (a Gaussian at a huge epsilon, say)
        raise OutOfRange(
            f"no {mechanism} noise scale can be calibrated to epsilon {float(epsilon):g} "
            f"at sensitivity {sensitivity}; ask for an 'epsilon' nearer the dataset's "
            "per-query epsilon"
        ) from None


@functools.lru_cache(maxsize=4096)
def _bisect(mechanism: str, sensitivity: int, epsilon: Fraction, delta: Fraction) -> float:
    """:func:`calibrate`'s search (may raise OpenDP's errors at extreme parameters).

    Kept per process for the parameters seen (a query repeated at the owner's
    per-query epsilon is calibrated once): the search asks OpenDP's privacy map
    about two hundred times, some 20 ms, and its answer depends on nothing else.
    """

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

    The measurement is applied to zeros, so what it returns is the noise
    itself; the caller adds it to its aggregate in Python integers. OpenDP
    saturates at the edge of i64 (it does not wrap): a saturated draw would
    be a constant, and the noisy value minus it the exact one. So any draw of
    magnitude :data:`MAX_NOISE` or more is refused, never returned (at a
    scale within :data:`MAX_SCALE`, which :func:`plan_release` enforces
    before the spend, that has probability below exp(-2^12)). The refusal
    depends on the noise alone, never on the data.

    Raises:
        OutOfRange: If the scale is not finite and positive, OpenDP refuses
            it, or a draw reaches :data:`MAX_NOISE`.
    """
    if size == 0:
        return []
    refused = OutOfRange(
        "the noise drawn for this release is too large to be added safely (its scale is "
        "beyond what the 64-bit sampler holds); ask for a larger 'epsilon'"
    )
    if not (math.isfinite(scale) and scale > 0):
        raise refused
    try:
        drawn = _measurement(mechanism, scale, delta if mechanism == "gaussian" else Fraction(0))
        values = [int(v) for v in drawn([0] * size)]
    except (OverflowError, ValueError, _dp().OpenDPException):
        raise refused from None
    if any(abs(v) >= MAX_NOISE for v in values):
        raise refused
    return values


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


@dataclass(frozen=True)
class Statistic:
    """One statistic a release noises, declared before the spend.

    Nothing here may depend on the data: the sensitivity follows from the
    owner's bounds and the encoding, the size from the schema and the inputs
    (a histogram's number of cells), so that every refusal it leads to
    (:func:`plan_release`) is one the analyst could have predicted.

    Attributes:
        what: Its name in the result's statement ("count"); noised once.
        sensitivity: How much one record changes one element (or, with
            ``per_element=False``, the whole vector in l1 *and* l2: a
            histogram's one cell by one), in integer units.
        size: How many elements it has.
        unit: What one integer unit is in the released value (``2^-f``).
        per_element: Whether every element may change by ``sensitivity``.
    """

    what: str
    sensitivity: int
    size: int = 1
    unit: float = 1.0
    per_element: bool = True

    def norm(self, mechanism: str) -> int:
        """The sensitivity the mechanism is calibrated to: l1 (Laplace) or l2 (Gaussian)."""
        if not self.per_element:
            return self.sensitivity
        if mechanism == "laplace":
            return self.size * self.sensitivity
        return _l2(self.size, self.sensitivity)


def _too_noisy(statistic: Statistic, scale: float, epsilon: Fraction, needs: str) -> str:
    """The refusal of a statistic whose noise scale is above :data:`MAX_SCALE`."""
    needed = float(epsilon) * scale / MAX_SCALE * 1.01 if math.isfinite(scale) else math.inf
    hint = (
        f"an 'epsilon' of at least about {needed:.3g}"
        if math.isfinite(needed)
        else ("a larger 'epsilon'")
    )
    fixed = " fewer 'frac_bits', or" if statistic.unit != 1.0 else ""
    return (
        f"at epsilon {float(epsilon):g}, the noise of the {statistic.what} of {needs} would "
        f"need a scale of {scale:.3g} integer units, above 2^50, where the 64-bit noise "
        f"sampler saturates and would give the exact value away; ask for {hint}, or{fixed} "
        "the dataset's owner for narrower bounds of the column; nothing was spent"
    )


@dataclass
class Plan:
    """A release checked and calibrated, not yet spent (:func:`plan_release`).

    Between the plan and :meth:`spend` a function may make further checks
    that need the noise scales (:meth:`scale`), e.g. whether a ring holds the
    noisy sum; those must not look at the data either.
    """

    terms: PrivateTerms
    wanted: Spent
    statistics: dict[str, Statistic]
    scales: dict[str, float]
    needs: str

    @property
    def parts(self) -> int:
        """How many statistics share the query's epsilon."""
        return len(self.statistics)

    def scale(self, what: str) -> float:
        """The noise scale of the statistic ``what``, in its integer units."""
        return self.scales[what]

    async def spend(self) -> Release:
        """Spend the query's budget (see :meth:`PrivateTerms.spend`); then noise may be drawn.

        Raises:
            Forbidden: If the budget does not allow the query (nothing is spent).
        """
        budget = await self.terms.spend(self.wanted, self.needs)
        return Release(self, budget)


def plan_release(
    dataset: Dataset, epsilon: Any, statistics: Sequence[Statistic], needs: str
) -> Plan | None:
    """Check and calibrate a query's release before anything is spent; None if it needs no DP.

    Every statistic gets an equal part of the query's epsilon (and delta);
    its noise scale is calibrated now, and a scale above :data:`MAX_SCALE`
    is refused, so that OpenDP's saturating i64 sampler is never asked for
    noise it cannot draw. Nothing here reads the data.

    Args:
        dataset: Loaded with ``load_dataset(..., private=True)``.
        epsilon: The analyst's ``epsilon`` input (None: the policy's per-query epsilon).
        statistics: What the query releases (distinct names).
        needs: The query, for a refusal ("'smpc.count'").

    Raises:
        BadRequest: If ``epsilon`` is not a positive number, or below the
            owner's floor (``min_epsilon``).
        OutOfRange: If a statistic's noise scale is above :data:`MAX_SCALE`,
            or cannot be calibrated.
        Forbidden: If the owner's terms name no usable mechanism.
    """
    terms = dataset.privacy
    if terms is None:  # the caller's own upload, or dp = false: no noise, nothing spent
        return None
    names = [s.what for s in statistics]
    if not names or len(set(names)) != len(names):
        raise ValueError("a release declares one or more statistics, each name once")
    wanted = terms.wanted(epsilon)
    mechanism = terms.privacy.mechanism
    epsilon_part, delta_part = wanted.epsilon / len(names), wanted.delta / len(names)
    scales: dict[str, float] = {}
    for statistic in statistics:
        scale = calibrate(mechanism, statistic.norm(mechanism), epsilon_part, delta_part)
        if not scale <= MAX_SCALE:
            raise OutOfRange(_too_noisy(statistic, scale, wanted.epsilon, needs))
        scales[statistic.what] = scale
    return Plan(terms, wanted, {s.what: s for s in statistics}, scales, needs)


@dataclass
class Release:
    """One query's spend on one dataset, and the noise of each statistic it releases.

    The query's epsilon (and delta) is split evenly over the statistics of
    its :class:`Plan`, exactly; each :meth:`noisy` call uses one of them, once.
    """

    plan: Plan
    budget: Budget
    calls: int = 0
    """How many times :meth:`noisy` was called (never more than the plan's statistics)."""
    noised: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def terms(self) -> PrivateTerms:
        """The dataset's privacy terms."""
        return self.plan.terms

    @property
    def spent(self) -> Spent:
        """What the query spent."""
        return self.plan.wanted

    @property
    def mechanism(self) -> str:
        """The owner's mechanism for the dataset."""
        return self.terms.privacy.mechanism

    def noisy(self, what: str, values: list[int] | npt.NDArray[Any]) -> list[int]:
        """``values`` (exact integers, as Python integers) with the noise of statistic ``what``.

        Raises:
            RuntimeError: If ``what`` was not declared, was noised already, or
                has another size than declared: the function is wrong, and no
                noise is drawn beyond what was spent for.
        """
        self.calls += 1
        statistic = self.plan.statistics.get(what)
        if self.calls > self.plan.parts or statistic is None or what in self.noised:
            raise RuntimeError(f"a release noised '{what[:32]}', which it did not spend for")
        exact_values = [int(v) for v in np.asarray(values, dtype=object).reshape(-1)]
        if len(exact_values) != statistic.size:
            raise RuntimeError(f"a release noised '{what[:32]}' with another size than declared")
        mechanism = self.mechanism
        epsilon = self.spent.epsilon / self.plan.parts
        delta = self.spent.delta / self.plan.parts
        scale = self.plan.scale(what)
        drawn = noise(mechanism, scale, statistic.size, delta)
        self.noised[what] = {
            "scale": scale * statistic.unit,
            "sensitivity": statistic.norm(mechanism) * statistic.unit,
            "epsilon": show(epsilon),
            "delta": show(delta),
        }
        return [v + n for v, n in zip(exact_values, drawn, strict=True)]

    def statement(self, columns: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
        """What the result states for the dataset: spend, noise, bounds, what remains.

        The budget is the caller's own (:meth:`Budget.own`): her spend and
        what she may still spend, never what the others spent.
        """
        remaining = self.budget.remaining
        return {
            "mechanism": self.mechanism,
            "epsilon": show(self.spent.epsilon),
            "delta": show(self.spent.delta),
            "noise": dict(self.noised),
            "bounds": {c: list(self.terms.bounds[c]) for c in columns if c in self.terms.bounds},
            "remaining": {"epsilon": show(remaining.epsilon), "delta": show(remaining.delta)},
            "budget": self.budget.own(),
        }


async def private_release(
    dataset: Dataset, epsilon: Any, statistics: Sequence[Statistic], needs: str
) -> Release | None:
    """Check, calibrate and spend a query's release (:func:`plan_release`, :meth:`Plan.spend`).

    Returns:
        The release to noise each statistic with, or None if the dataset
        needs no differential privacy.

    Raises:
        BadRequest, OutOfRange, Forbidden: See :func:`plan_release`; nothing is spent.
        Forbidden: If the budget does not allow the query (nothing is spent).
    """
    plan = plan_release(dataset, epsilon, statistics, needs)
    return None if plan is None else await plan.spend()
