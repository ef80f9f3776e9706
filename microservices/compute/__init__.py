"""The map microservice: local aggregates over one dataset, for map-reduce.

Map-reduce (as in FedMed and Exareme) is the cheap path for data that a
server's policy allows to release as aggregates: each server computes the
count, sum, sum of squares and, if asked, a histogram over its own data, and
the client combines them (``fdrtd_client.Federation.map_reduce``). Each
server's aggregates are disclosed to the client, which is why the server
owner must allow it (``allow_map_reduce``) and why the same disclosure
checks apply here as to the SMPC protocols:

* no aggregate over fewer records than the minimum cohort;
* no minimum or maximum: each is a single record's value (the flaw of the
  reference system); the SMPC ``minimum_maximum`` gives the joint ones;
* histogram cells are suppressed as in SMPC tables
  (:func:`protocols.smpc.tables.suppress`, complementary, hidden cells
  ``None``, below the owner's ``small_cell``; of a named dataset, empty
  cells are hidden too), counting the values outside the bin edges in an ``other`` cell
  so that the released count gives no hidden cell away;
* rows holding NaN or infinity are left out, as the SMPC protocols do
  (:func:`protocols.smpc.service.finite_rows`).

When the aggregates of one server must stay secret, use the SMPC protocols.

On a named dataset whose owner requires differential privacy, every released
aggregate is noisy (:func:`private_aggregates`): the values are clamped to the
owner's declared bounds, the query's ``epsilon`` is spent from the dataset's
budget and split evenly over the count, the sum, the sum of squares and the
histogram, and each gets integer noise from OpenDP (the histogram with
sensitivity 1 per record: a record is in exactly one cell, ``other`` included).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fdrtd_server.sdk import (
    COLUMN,
    DATA,
    EPSILON,
    PRIVACY,
    BadRequest,
    Forbidden,
    Input,
    JobContext,
    Microservice,
    Output,
    distribution_version,
    finite_result,
    finite_rows,
    numeric,
    privacy,
    private_release,
    ring,
    suppress,
)

service = Microservice(
    "map",
    distribution_version("fdrtd", "0.1.0"),
    "Local aggregates (count, sum, sum of squares, histogram) for map-reduce.",
)

MAX_BINS = 10_000
_CAP = 1 << 40
"""Cell counts above this are suppressed as if they were this (their sum still fits int64)."""


def _edges(bins: Any) -> np.ndarray[Any, Any] | None:
    if bins is None:
        return None
    try:
        edges = np.asarray(bins, dtype=np.float64) if isinstance(bins, list | np.ndarray) else None
    except (TypeError, ValueError):
        edges = None
    if (
        edges is None
        or edges.ndim != 1
        or not 2 <= edges.size <= MAX_BINS + 1
        or not np.all(np.isfinite(edges))
        or not np.all(np.diff(edges) > 0)
    ):
        raise BadRequest(
            f"'bins' must be a list of 2 to {MAX_BINS + 1} finite, increasing bin edges"
        )
    return edges


def _cells(data: np.ndarray[Any, Any], edges: np.ndarray[Any, Any]) -> Any:
    """Counts per bin (``[e_i, e_{i+1})``, the last closed), and outside them last."""
    inside = (data >= edges[0]) & (data <= edges[-1])
    return np.append(np.histogram(data[inside], bins=edges)[0], int((~inside).sum()))


def _histogram(
    data: np.ndarray[Any, Any],
    edges: np.ndarray[Any, Any],
    minimum: int,
    empty: bool,
    cells: Any = None,
) -> Any:
    """Counts per bin and outside (:func:`_cells`, or ``cells`` if given); small cells hidden.

    With ``empty`` (an owner's named dataset) empty cells are hidden like small ones.
    """
    found = [int(c) for c in (_cells(data, edges) if cells is None else cells)]  # Python ints
    # which to hide depends only on how each compares to the threshold and to the others:
    # capped, the counts fit int64 whatever noise they carry
    capped = np.asarray([min(c, _CAP) for c in found], dtype=np.int64)
    hidden = suppress(capped, minimum, empty=empty)
    shown: list[int | None] = [None if h else c for c, h in zip(found, hidden, strict=True)]
    return {
        "edges": edges,
        "counts": shown[:-1],
        "other": shown[-1],
        "suppressed": [int(k) for k in np.flatnonzero(hidden)],
    }


def aggregate_values(
    values: np.ndarray[Any, Any],
    edges: np.ndarray[Any, Any] | None,
    small_cell: int,
    *,
    empty: bool = False,
) -> dict[str, Any]:
    """Count, sum, sum of squares (and a histogram) over the finite rows of ``values``.

    Rows holding NaN or infinity (in any element) are left out, as in SMPC.
    The histogram has one cell per bin plus ``other`` (values outside the
    edges), so its cells add up to ``count``; cells are suppressed as in SMPC
    tables (``None``, listed in ``suppressed``, ``len(counts)`` standing for
    ``other``) below ``small_cell``. Zero cells are shown as 0, unless
    ``empty`` (an owner's named dataset): then they are hidden like small
    ones, so that "none" and "a few" look alike.

    Raises:
        BadRequest: If the column is not numeric, or a histogram is asked of
            a column of vectors.
    """
    if values.dtype.kind not in "biuf":
        raise BadRequest("the column must be numeric for aggregates")
    data = finite_rows(values.astype(np.float64, copy=False))
    count = int(data.shape[0])
    result: dict[str, Any] = {
        "count": count,
        "sum": data.sum(axis=0),
        "sum_squares": np.square(data).sum(axis=0),
    }
    if data.ndim == 1:
        result = {
            k: (float(v) if isinstance(v, np.floating | np.ndarray) and np.ndim(v) == 0 else v)
            for k, v in result.items()
        }
    if edges is not None:
        if data.ndim != 1:
            raise BadRequest("histograms need a column of single numbers")
        result["histogram"] = _histogram(data, edges, small_cell, empty)
    return result


def _squares_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    """The bounds of the square of a value within ``bounds``."""
    low, high = bounds
    ends = (low * low, high * high)
    return (0.0 if low <= 0.0 <= high else min(ends), max(ends))


_SENSITIVITY_BITS = 32
"""One record adds at most about 2^32 fixed-point units to a DP sum of ``map.aggregate``."""


def _frac_bits(bounds: tuple[float, float]) -> int:
    """The fixed-point precision of a DP sum over ``bounds``: 2^-20, coarser if they are wide.

    Coarse enough that one record adds at most about 2^32 units, so that the
    noise scale stays far within the 64-bit sampler (squares of realistic
    bounds, 1e10 for [0, 1e5], would otherwise need more than 2^50 units).
    The rounding, half a unit per record, stays far below the noise, whose
    scale is at least the bound over epsilon.
    """
    largest = max(abs(bounds[0]), abs(bounds[1]))
    if largest < 1.0:
        return ring.DEFAULT_FRAC_BITS
    wanted = _SENSITIVITY_BITS - math.ceil(math.log2(largest))
    return max(0, min(ring.DEFAULT_FRAC_BITS, wanted))


async def private_aggregates(
    dataset: Any,
    column: Any,
    edges: np.ndarray[Any, Any] | None,
    epsilon: Any,
    minimum: int,
    *,
    empty: bool = False,
) -> dict[str, Any] | None:
    """The aggregates with differential privacy, if ``dataset`` needs it (else None).

    Values are clamped to the owner's bounds and encoded record by record in
    fixed point (2^-20, coarser for wide bounds: :func:`_frac_bits`), so every
    sum is an exact integer sum with an exact integer sensitivity; the query's
    epsilon is spent before any noise is drawn and split evenly over the
    released statistics.

    Raises:
        Forbidden: If the column has no declared bounds, or the budget is spent.
    """
    terms = dataset.privacy
    if terms is None:
        return None
    name = str(column) if column is not None else next(iter(dataset.columns), "")
    values = numeric(dataset.column(column))
    if values.ndim != 1:
        raise BadRequest("aggregates with differential privacy need a column of single numbers")
    # everything that can refuse, before the spend: the bounds, their fixed-point
    # encoding (and their squares'), every noise scale; none of it reads the values
    bounds = terms.bound(name, "a sum")
    squares = _squares_bounds(bounds)
    frac_bits, square_bits = _frac_bits(bounds), _frac_bits(squares)
    statistics = [
        privacy.Statistic("count", 1),
        privacy.Statistic(
            "sum", privacy.fixed_sensitivity(bounds, frac_bits), unit=2.0**-frac_bits
        ),
        privacy.Statistic(
            "sum_squares",
            privacy.fixed_sensitivity(squares, square_bits),
            unit=2.0**-square_bits,
        ),
    ]
    if edges is not None:
        # one record is in exactly one cell (``other`` included): l1 and l2 sensitivity 1
        statistics.append(privacy.Statistic("histogram", 1, size=edges.size, per_element=False))
    release = await private_release(dataset, epsilon, statistics, "'map.aggregate'")
    assert release is not None  # the dataset has privacy terms
    # after the spend nothing refuses on the values: they are clamped to bounds that
    # fit, summed in Python integers, and only noisy values leave
    data = finite_rows(values.astype(np.float64, copy=False))
    clamped = privacy.clamped(data, bounds)
    (count,) = release.noisy("count", [int(data.shape[0])])
    (total,) = release.noisy(
        "sum", [int(privacy.fixed_units(clamped, frac_bits).sum(dtype=object))]
    )
    (sum_squares,) = release.noisy(
        "sum_squares",
        [int(privacy.fixed_units(np.square(clamped), square_bits).sum(dtype=object))],
    )
    result: dict[str, Any] = {
        "count": count,
        "sum": total * 2.0**-frac_bits,
        "sum_squares": sum_squares * 2.0**-square_bits,
    }
    if edges is not None:
        noisy = release.noisy("histogram", _cells(data, edges))
        # noisy cells below 0 are shown as 0 (post-processing), then hidden as any small cell
        result["histogram"] = _histogram(data, edges, minimum, empty, [max(c, 0) for c in noisy])
    result["privacy"] = {terms.dataset: release.statement((name,))}
    return result


@service.job(
    "aggregate",
    inputs=[
        DATA,
        COLUMN,
        Input(
            "bins",
            "array",
            "histogram bin edges, finite and increasing; bin i is [e_i, e_(i+1)), the last closed",
            minimum=2,
            maximum=MAX_BINS + 1,
            items="number",
        ),
        EPSILON,
    ],
    outputs=[
        Output("count", "integer", "the number of finite rows"),
        Output("sum", "any", "their sum: a number, or a typed array for vectors"),
        Output("sum_squares", "any", "their sum of squares, likewise"),
        Output("histogram", "object", "with bins: {edges, counts, other, suppressed}"),
        PRIVACY,
    ],
    policy=["allow_map_reduce"],
)
async def aggregate(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Local aggregates over one column of a dataset the caller owns.

    Inputs: ``data`` (data handle or dataset name), ``column`` (optional),
    ``bins`` (optional histogram edges), ``epsilon`` (on a dataset with
    differential privacy: what this query spends; :func:`private_aggregates`).

    Returns:
        ``{"count", "sum", "sum_squares"}`` and, with ``bins``, ``"histogram"``:
        ``{"edges", "counts", "other", "suppressed"}`` (see :func:`aggregate_values`).

    Raises:
        Forbidden: If this server's policy does not allow map-reduce.
        CohortTooSmall: If fewer finite rows than the minimum cohort remain.
    """
    if not ctx.env.allow_map_reduce:
        raise Forbidden(
            "this server's policy does not allow map-reduce aggregates; use a secure protocol"
        )
    edges = _edges(inputs.get("bins"))
    column = inputs.get("column")
    dataset = await ctx.load_dataset(inputs.get("data"), columns=[column], private=True)
    # cells below the owner's small-cell threshold are hidden, and of a named dataset empty ones too
    small_cell, empty = ctx.env.small_cell, bool(ctx.versions)
    found = await private_aggregates(
        dataset, column, edges, inputs.get("epsilon"), small_cell, empty=empty
    )
    result = found or aggregate_values(dataset.column(column), edges, small_cell, empty=empty)
    ctx.check_cohort(result["count"])
    # the sum of finite values can pass the float64 range: refused, not sent as infinity
    return finite_result(result, "'map.aggregate'")
