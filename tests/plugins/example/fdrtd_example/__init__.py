"""An example fdrtd microservice: the one docs/plugins.md walks through.

``example.rows`` counts the records of a dataset (refusing datasets under
the minimum cohort); ``example.scaled_sum`` sums a column times a factor and
reports progress on the way; ``example.version`` answers directly.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from fdrtd_server.errors import BadRequest
from fdrtd_server.microservice import CallContext, JobContext, Microservice, distribution_version

service = Microservice(
    "example",
    distribution_version("fdrtd-example-plugin", "1.2.0"),
    "An example plugin: counts rows and sums scaled columns.",
)


@service.job("rows")
async def rows(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, int]:
    """Number of records in a dataset the caller owns."""
    dataset = await ctx.load_dataset(inputs.get("data"))
    ctx.check_cohort(dataset.rows)
    return {"rows": dataset.rows}


@service.job("scaled_sum")
async def scaled_sum(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, float]:
    """Sum of a column times ``factor``, in ``steps`` reported steps."""
    factor = inputs.get("factor", 1.0)
    if not isinstance(factor, int | float) or isinstance(factor, bool):
        raise BadRequest("'factor' must be a number")
    steps = inputs.get("steps", 1)
    if not isinstance(steps, int) or not 1 <= steps <= 100:
        raise BadRequest("'steps' must be an integer from 1 to 100")
    dataset = await ctx.load_dataset(inputs.get("data"))
    column = dataset.column(inputs.get("column"))
    if column.dtype.kind not in "biuf":
        raise BadRequest("the column must be numeric")
    values = np.asarray(column, dtype=np.float64)
    ctx.check_cohort(dataset.rows)
    total = 0.0
    for step, part in enumerate(np.array_split(values, steps), start=1):
        total += float(part.sum()) * factor
        await ctx.progress(step / steps)
        await asyncio.sleep(float(inputs.get("delay", 0.0)) if step < steps else 0)
    return {"sum": total}


@service.call("version")
async def version(ctx: CallContext, inputs: dict[str, Any]) -> dict[str, str]:
    """The plugin's version, answered directly."""
    return {"version": service.version}
