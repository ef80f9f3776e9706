"""The map microservice: local aggregates over one dataset, for map-reduce.

Map-reduce (as in FedMed and Exareme) is the cheap path for data that a
server's policy allows to release as aggregates: each server computes
count, sum, sum of squares, minimum, maximum and a histogram over its own
data, and the client combines them (``fdrtd_client.Federation.map_reduce``).
Each server's aggregates are disclosed to the client, which is why the
server owner must allow it (``allow_map_reduce``) and why the minimum
cohort and small-cell suppression apply here just as to secure protocols.
When the aggregates of one server must stay secret, use the SMPC protocols.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fdrtd_server.errors import BadRequest, Forbidden
from fdrtd_server.microservice import JobContext, Microservice, distribution_version

service = Microservice(
    "map",
    distribution_version("fdrtd", "0.1.0"),
    "Local aggregates (count, sum, sum of squares, min, max, histogram) for map-reduce.",
)

MAX_BINS = 10_000


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


def aggregate_values(
    values: np.ndarray[Any, Any], edges: np.ndarray[Any, Any] | None, min_cohort: int
) -> dict[str, Any]:
    """Count, sum, sum of squares, min, max (and histogram) over the rows of ``values``.

    Rows holding NaN are left out. Histogram cells with fewer than
    ``min_cohort`` records are suppressed (reported as -1).
    """
    if values.dtype.kind not in "biuf":
        raise BadRequest("the column must be numeric for aggregates")
    data = values.astype(np.float64, copy=False)
    if data.ndim > 1:
        data = data.reshape(data.shape[0], -1)
        data = data[~np.isnan(data).any(axis=1)]
    else:
        data = data[~np.isnan(data)]
    count = int(data.shape[0])
    result: dict[str, Any] = {
        "count": count,
        "sum": data.sum(axis=0),
        "sum_squares": np.square(data).sum(axis=0),
        "minimum": data.min(axis=0) if count else np.nan,
        "maximum": data.max(axis=0) if count else np.nan,
    }
    if data.ndim == 1:
        result = {
            k: (float(v) if isinstance(v, np.floating | np.ndarray) and np.ndim(v) == 0 else v)
            for k, v in result.items()
        }
    if edges is not None:
        if data.ndim != 1:
            raise BadRequest("histograms need a column of single numbers")
        counts, _ = np.histogram(data, bins=edges)
        counts = np.where(counts < min_cohort, -1, counts)
        result["histogram"] = {"edges": edges, "counts": counts.astype(np.int64)}
    return result


@service.job("aggregate")
async def aggregate(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Local aggregates over one column of a dataset the caller owns.

    Inputs: ``data`` (data handle), ``column`` (optional), ``bins`` (optional
    histogram edges).
    """
    if not ctx.env.allow_map_reduce:
        raise Forbidden(
            "this server's policy does not allow map-reduce aggregates; use a secure protocol"
        )
    edges = _edges(inputs.get("bins"))
    dataset = await ctx.load_dataset(inputs.get("data"))
    values = dataset.column(inputs.get("column"))
    result = aggregate_values(values, edges, ctx.env.min_cohort)
    ctx.check_cohort(result["count"])
    return result
