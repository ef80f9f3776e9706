"""The ``smpc`` microservice: joint statistics by secure multiparty computation.

Every function here is one party's side of a multi-party protocol. Each
party's client (or one analyst through ``fdrtd_client.Federation``) starts
the same function with the same session ``{"id", "parties"}`` on every
server; each server then computes on its own data, exchanges only masked
values with the others through the peer gateways (see
:mod:`fdrtd_server.sdk.smpc`), and stores the joint result under its own
result handle. Inputs that every party must agree on (column names are not
among them; options such as ``frac_bits`` are) are compared in the setup
round, and a mismatch fails the computation on every server.

Threat model, what each party learns, and round counts: ``docs/protocols.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fdrtd_server.sdk import (
    COLUMN,
    DATA,
    EPSILON,
    PRIVACY,
    BadRequest,
    ComputationFailed,
    Conflict,
    Dataset,
    Forbidden,
    Input,
    JobContext,
    OutOfRange,
    Output,
    SmpcSession,
    agree,
    check_joint_cohort,
    curve,
    declare,
    finite_result,
    finite_rows,
    joint_count,
    numeric,
    privacy,
    private_release,
    ring,
    session_for,
    vet_declared,
)

# The other protocol families register their functions on the same service
# when imported; they import the shared helpers from the SDK and
# protocols.smpc.common, never from here, so the imports have no cycle.
from protocols.smpc import order, product, regression, stats_math, tables  # noqa: F401
from protocols.smpc.common import COUNT, VALUE, service

__all__ = [
    "bivariate",
    "count",
    "mean",
    "minimum_maximum",
    "secure_sum",
    "service",
    "univariate",
]


@service.job("count", inputs=[DATA, EPSILON], outputs=[COUNT, PRIVACY])
async def count(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Total number of records over all parties; nothing else is revealed.

    On a named dataset whose owner requires differential privacy, this
    party's count gets its own noise before it is shared (``epsilon``).
    """
    async with session_for(ctx) as peers:
        # inside the session: if this party's input is refused, the others hear it at once
        dataset = await ctx.load_dataset(inputs.get("data"), columns=[], private=True)
        rows = dataset.rows
        counted = [privacy.Statistic("count", 1)]
        release = await private_release(dataset, inputs.get("epsilon"), counted, "'smpc.count'")
        if release is not None:
            (rows,) = release.noisy("count", [rows])
        smpc = SmpcSession(peers)
        await smpc.setup(declare(ctx, function="count"), defer=True)
        total = await joint_count(ctx, smpc, rows)
        agree(smpc, "function")
    return _stated({"count": total}, release)


def _stated(result: dict[str, Any], release: Any, columns: tuple[str, ...] = ()) -> dict[str, Any]:
    """``result`` with the statement of a differentially private release, if there was one."""
    if release is None:
        return result
    return {**result, "privacy": {release.terms.dataset: release.statement(columns)}}


_FRAC_BITS = Input(
    "frac_bits",
    "integer",
    "fixed-point fractional bits (precision 2^-frac_bits; each bit less doubles the "
    "largest value allowed); must agree",
    default=ring.DEFAULT_FRAC_BITS,
    minimum=0,
    maximum=40,
)


def _column_name(dataset: Dataset, column: Any) -> str:
    """The name of the column ``column`` picks (None: the only one)."""
    dataset.column(column)  # refuses a missing column, or None among several
    return str(column) if column is not None else next(iter(dataset.columns))


RING_ROWS = 1 << 20
"""The records per party a differentially private sum must have room for in the 64-bit ring.

Checked before the spend (:func:`_ring_room`) against public terms only: the
owner's bounds, ``frac_bits``, the number of parties and the noise scale. A
party with more records, whose noisy sum then does not fit, is refused by the
ring's own check, which sees only the noisy sum (post-processing)."""
_NOISE_TAILS = 64
"""Noise scales kept free in the ring beside the sum: Laplace noise exceeds 64 scales
with probability exp(-64), Gaussian noise far less."""


def _ring_room(
    plan: privacy.Plan, bounds: tuple[float, float], frac_bits: int, parties: int
) -> None:
    """Refuse, before the spend, a DP sum whose bounds and noise leave the ring too little room.

    Only public terms enter (never the row count): the refusal tells the
    analyst nothing she did not know.

    Raises:
        OutOfRange: Naming the most ``frac_bits`` that would fit.
    """
    limit = ((1 << 63) - 1) // parties
    scale = plan.scale("sum")

    def fits(bits: int) -> bool:
        sensitivity = privacy.fixed_sensitivity(bounds, bits)
        return RING_ROWS * sensitivity + _NOISE_TAILS * scale * 2.0 ** (bits - frac_bits) < limit

    if fits(frac_bits):
        return
    smaller = next((bits for bits in range(frac_bits - 1, -1, -1) if fits(bits)), None)
    ask = (
        f"ask for at most {smaller} 'frac_bits'"
        if smaller is not None
        else "ask the dataset's owner for narrower bounds"
    )
    raise OutOfRange(
        f"at frac_bits {frac_bits}, the bounds {list(bounds)} of this column with their noise "
        f"leave room in the 64-bit ring for fewer than {RING_ROWS} records per party at "
        f"{parties} parties; {ask} (or a larger 'epsilon', for less noise); nothing was spent"
    )


def _private_sum(
    release: privacy.Release,
    values: npt.NDArray[np.float64],
    bounds: tuple[float, float],
    frac_bits: int,
) -> tuple[int, npt.NDArray[Any]]:
    """This party's noisy record count and noisy sum (integer fixed-point units) of ``values``.

    The values are clamped to the owner's declared bounds and encoded record
    by record (the bounds were checked to fit before the spend, so every
    clamped value does), and summed in Python integers, so the sum is exact
    and cannot overflow before the noise; each gets its own noise share (one
    part of the query's epsilon each) before anything is secret-shared.
    Nothing here refuses on the exact values: the ring's own check
    (``ring.encode_int``) sees only the noisy sum.
    """
    finite = finite_rows(values)
    units = privacy.fixed_units(privacy.clamped(finite, bounds), frac_bits)
    (rows,) = release.noisy("count", [int(finite.shape[0])])
    summed = units.sum(axis=0, dtype=object)  # Python integers
    noisy = release.noisy("sum", np.asarray(summed, dtype=object))
    # int64 where every noisy element fits, else objects (which the ring refuses)
    return rows, np.array(noisy).reshape(np.shape(summed))


async def _summed(ctx: JobContext, inputs: dict[str, Any], function: str) -> dict[str, Any]:
    """The joint sum and count of a column (``secure_sum`` and ``mean``)."""
    column = inputs.get("column")
    async with session_for(ctx) as peers:
        # inside the session: if this party's input is refused, the others hear it at once
        dataset = await ctx.load_dataset(inputs.get("data"), columns=[column], private=True)
        values = numeric(dataset.column(column))
        elementwise = bool(inputs.get("elementwise", False))
        frac_bits = inputs.get("frac_bits", ring.DEFAULT_FRAC_BITS)  # declared: 0 to 40
        name = _column_name(dataset, column)
        smpc = SmpcSession(peers)
        release: privacy.Release | None = None
        bounds = (0.0, 0.0)
        if dataset.privacy is not None:  # everything that can refuse, before the spend
            bounds = dataset.privacy.bound(name, "a sum")
            if elementwise:
                raise Forbidden(
                    f"the owner of dataset '{dataset.privacy.dataset}' requires differential "
                    "privacy, and an elementwise sum adds single records of each party; sum "
                    "the records (elementwise = false)"
                )
            statistics = [
                privacy.Statistic("count", 1),
                privacy.Statistic(
                    "sum",
                    privacy.fixed_sensitivity(bounds, frac_bits),  # refuses bounds that overflow
                    size=int(np.prod(values.shape[1:], dtype=np.int64)),
                    unit=2.0**-frac_bits,
                ),
            ]
            needs = f"'smpc.{function}'"
            plan = privacy.plan_release(dataset, inputs.get("epsilon"), statistics, needs)
            if plan is not None:
                _ring_room(plan, bounds, frac_bits, smpc.parties)
                release = await plan.spend()
        if release is not None:
            rows, noisy = _private_sum(release, values, bounds, frac_bits)
            public = declare(ctx, shape=list(noisy.shape), elementwise=False, frac_bits=frac_bits)
            await smpc.setup(public, defer=True)
            encoded = ring.encode_int(noisy, parties=smpc.parties)
            described, ready = rows, False  # whether to send early would tell the exact count
        else:
            if elementwise:
                local, rows = values, dataset.rows
            else:
                finite = finite_rows(values)
                local, rows = finite.sum(axis=0), int(finite.shape[0])
            public = declare(
                ctx, shape=list(np.shape(local)), elementwise=elementwise, frac_bits=frac_bits
            )
            await smpc.setup(public, defer=True)
            encoded = ring.encode_fixed(
                np.asarray(local, dtype=np.float64), frac_bits=frac_bits, parties=smpc.parties
            )
            # each element of an elementwise sum describes one record per party
            described = min(rows, smpc.parties) if elementwise else rows
            ready = described >= ctx.env.min_cohort

        def vet(total: int) -> None:
            check_joint_cohort(ctx, smpc, total)
            if elementwise:
                check_joint_cohort(ctx, smpc, smpc.parties)
            agree(smpc, "elementwise")
            agree(smpc, "frac_bits")
            agree(smpc, "shape")

        # the count and the sum share one round when this party's own records
        # meet its minimum cohort (the joint count then does too)
        total_rows, summed = await smpc.count_and_sum(rows, encoded, ready=ready, vet=vet)
        total = ring.decode_fixed(summed, frac_bits=frac_bits)
    value: Any = float(total) if total.ndim == 0 else total
    result: dict[str, Any] = {"sum": value, "count": total_rows}
    if function == "mean":
        result = {"mean": value / total_rows if total_rows > 0 else None, **result}
    return _stated(result, release, (name,))


@service.job(
    "secure_sum",
    inputs=[
        DATA,
        COLUMN,
        Input(
            "elementwise",
            "boolean",
            "add each party's whole array elementwise (same shape everywhere) instead of "
            "summing its records first; must agree",
            default=False,
        ),
        _FRAC_BITS,
        EPSILON,
    ],
    outputs=[Output("sum", "any", f"the joint sum: {VALUE}"), COUNT, PRIVACY],
)
async def secure_sum(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Sum of a column over all records of all parties (scalars, vectors, matrices).

    Inputs: ``data``; ``column`` (optional); ``elementwise`` (default False):
    if True, each party's whole array is added elementwise to the others'
    (all parties must have the same shape; e.g. model updates), else each
    party first sums its records; ``frac_bits`` (default 20) fixed-point
    precision; ``epsilon``: on a named dataset whose owner requires
    differential privacy, what this query spends (the records are clamped to
    the owner's bounds, and this party's count and sum get their own noise
    before they are shared; elementwise sums are refused there).
    """
    return await _summed(ctx, inputs, "secure_sum")


@service.job(
    "mean",
    inputs=[DATA, COLUMN, _FRAC_BITS, EPSILON],
    outputs=[
        Output("mean", "any", f"the joint mean: {VALUE}"),
        Output("sum", "any", f"the joint sum: {VALUE}"),
        COUNT,
        PRIVACY,
    ],
)
async def mean(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Mean of a column over all records of all parties: the joint sum over the joint count.

    Under differential privacy both are noisy (each with half of the query's
    epsilon) and the mean is their quotient, as :func:`secure_sum` releases them.
    """
    return await _summed(ctx, inputs, "mean")


@service.job(
    "minimum_maximum",
    inputs=[DATA, COLUMN],
    outputs=[
        Output("minimum", "any", f"the joint minimum: {VALUE}"),
        Output("maximum", "any", f"the joint maximum: {VALUE}"),
        COUNT,
    ],
)
async def minimum_maximum(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Joint minimum and maximum of a column; no party's own extremes are revealed."""
    async with session_for(ctx) as peers:
        # inside the session: if this party's input is refused, the others hear it at once
        dataset = await ctx.load_dataset(inputs.get("data"))
        values = finite_rows(numeric(dataset.column(inputs.get("column"))))
        smpc = SmpcSession(peers)
        await smpc.setup(
            declare(ctx, function="minimum_maximum", shape=list(values.shape[1:])), defer=True
        )
        total = await joint_count(ctx, smpc, int(values.shape[0]))
        agree(smpc, "shape")
        present = values.shape[0] > 0
        zeros = np.zeros(values.shape[1:])
        lo, hi = await smpc.minimum_maximum(
            values.min(axis=0) if present else zeros,
            values.max(axis=0) if present else zeros,
            present,
        )

    def plain(a: npt.NDArray[np.float64]) -> Any:
        return float(a) if a.ndim == 0 else a

    return {"minimum": plain(lo), "maximum": plain(hi), "count": total}


_TOO_LARGE = (
    "the values are too large for power sums up to the 6th power (they overflow a "
    "float64); scale the data down"
)


@dataclass
class _UnivariateData:
    """One party's column for :func:`univariate`: in memory, or a source read in place.

    A source read in place (``load_dataset(..., pushdown=True)``) is never read
    into memory: PostgreSQL computes each stage's sums in SQL, files and
    SQLite stream the column through them. Both give what
    :func:`stats_math.local_power_sums` gives for the values in memory.
    """

    size: int
    total: float
    low: float
    high: float
    values: npt.NDArray[np.float64] | None = None
    source: Any = None
    column: str = ""
    limit: int | None = None

    @classmethod
    async def of(cls, dataset: Dataset, column: Any) -> _UnivariateData:
        if dataset.source is not None:
            name = await dataset.source_column(column)
            first = await dataset.source.moments(name, dataset.limit, degree=1)
            return cls(
                first.count,
                first.sums[0],
                first.minimum,
                first.maximum,
                source=dataset.source,
                column=name,
                limit=dataset.limit,
            )
        values = numeric(dataset.column(column))
        if values.ndim != 1:
            raise BadRequest("univariate statistics need a column of single numbers")
        values = finite_rows(values)
        present = values.size > 0
        return cls(
            int(values.size),
            float(values.sum()),
            float(values.min()) if present else 0.0,
            float(values.max()) if present else 0.0,
            values,
        )

    async def power_sums(self, shift: float, scale: float | None) -> npt.NDArray[np.float64]:
        """What :func:`stats_math.local_power_sums` gives, wherever the values are."""
        if self.values is not None:
            try:
                return stats_math.local_power_sums(self.values, shift=shift, positive_minimum=scale)
            except ValueError:
                raise ComputationFailed(_TOO_LARGE) from None
        found = await self.source.moments(
            self.column, self.limit, shift=shift, degree=6, positive_minimum=scale
        )
        if found.count != self.size:
            # rows came or went between the two passes over a source read in place
            raise Conflict(
                "the dataset changed while the computation read it; run the computation again"
            )
        sums = np.array([found.count, *found.sums, found.reciprocal, found.log], dtype=np.float64)
        if not np.all(np.isfinite(sums)):
            raise ComputationFailed(_TOO_LARGE)
        return sums


@service.job(
    "univariate",
    inputs=[DATA, COLUMN],
    outputs=[Output(key, "number", key.replace("_", " ")) for key in stats_math.UNIVARIATE_KEYS],
)
async def univariate(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """The 22 univariate statistics of a column, jointly over all parties.

    Revealed to all parties and the client: the statistics themselves (the
    count, the power sums behind them, minimum and maximum); nothing of any
    party's own data. Rows with NaN or infinite values are left out.
    """
    async with session_for(ctx) as peers:
        # inside the session: if this party's input is refused, the others hear it at once
        dataset = await ctx.load_dataset(
            inputs.get("data"), columns=[inputs.get("column")], pushdown=True
        )
        local_data = await _UnivariateData.of(dataset, inputs.get("column"))
        smpc = SmpcSession(peers)
        await smpc.setup(declare(ctx, function="univariate"), defer=True)
        # stage 1: the count, checked before any sum is opened, and the sum
        # give the mean, the public shift for stage 3
        n, (total,) = await smpc.count_and_sum_big(
            local_data.size,
            [local_data.total],
            ready=local_data.size >= ctx.env.min_cohort,
            vet=lambda joint: vet_declared(ctx, smpc, joint, "function"),
        )
        await ctx.progress(0.1)
        shift = total / n
        # stage 2: the extremes; whether every value of every party is
        # positive follows from the minimum, which is public from here on
        present = local_data.size > 0
        lo, hi = await smpc.minimum_maximum(local_data.low, local_data.high, present)
        await ctx.progress(0.8)
        # stage 3: centred power sums, and the sums behind the harmonic and
        # geometric means only if the joint minimum is positive (public), so
        # that no party's own sums of 1/x and log x are opened when they are not
        positive = float(lo) > 0
        scale = float(lo) if positive else None
        local = await local_data.power_sums(shift, scale)
        sums = await smpc.sum_big(list(local))
    result = stats_math.univariate(
        sums,
        float(lo),
        float(hi),
        all_positive=positive,
        shift=shift,
        reciprocal_scale=scale or 1.0,
    )
    return finite_result(result, "'smpc.univariate'")


@service.job(
    "bivariate",
    inputs=[
        DATA,
        Input("x", "string", "the first column", required=True),
        Input("y", "string", "the second column", required=True),
    ],
    outputs=[Output(key, "number", key.replace("_", " ")) for key in stats_math.BIVARIATE_KEYS],
)
async def bivariate(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Covariance, Pearson correlation and simple regression of two columns.

    Inputs: ``data``, ``x`` and ``y`` (column names).
    """
    async with session_for(ctx) as peers:
        # inside the session: if this party's input is refused, the others hear it at once
        dataset = await ctx.load_dataset(inputs.get("data"), columns=[inputs["x"], inputs["y"]])
        x = numeric(dataset.column(inputs.get("x")), "column 'x'")
        y = numeric(dataset.column(inputs.get("y")), "column 'y'")
        if x.ndim != 1 or y.ndim != 1:
            raise BadRequest("bivariate statistics need two columns of single numbers")
        keep = np.isfinite(x) & np.isfinite(y)
        x, y = x[keep], y[keep]
        smpc = SmpcSession(peers)
        await smpc.setup(declare(ctx, function="bivariate"), defer=True)
        n, (sx, sy) = await smpc.count_and_sum_big(
            x.size,
            [float(x.sum()), float(y.sum())],
            ready=x.size >= ctx.env.min_cohort,
            vet=lambda joint: vet_declared(ctx, smpc, joint, "function"),
        )
        shift_x, shift_y = sx / n, sy / n
        sums = await smpc.sum_big(
            list(stats_math.local_cross_sums(x, y, shift_x=shift_x, shift_y=shift_y))
        )
    return finite_result(
        stats_math.bivariate(sums, shift_x=shift_x, shift_y=shift_y), "'smpc.bivariate'"
    )


# The vertical join and the PSI functions share the curve's process pool.
service.add_cleanup(curve.shutdown_pool)
