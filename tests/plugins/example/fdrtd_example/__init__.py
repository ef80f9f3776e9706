"""An example fdrtd microservice: the one docs/plugins.md walks through.

``example.rows`` counts the records of a dataset (refusing datasets under
the minimum cohort); ``example.scaled_sum`` sums a column times a factor and
reports progress on the way; ``example.version`` answers directly.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np

from fdrtd_server.errors import BadRequest, ComputationFailed
from fdrtd_server.inputs import COLUMN, DATA, Input, Output
from fdrtd_server.microservice import CallContext, JobContext, Microservice, distribution_version

service = Microservice(
    "example",
    distribution_version("fdrtd-example-plugin", "1.2.0"),
    "An example plugin: counts rows and sums scaled columns.",
)


@service.job("rows", inputs=[DATA], outputs=[Output("rows", "integer", "the number of records")])
async def rows(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, int]:
    """Number of records in a dataset the caller owns."""
    dataset = await ctx.load_dataset(inputs.get("data"))
    ctx.check_cohort(dataset.rows)
    return {"rows": dataset.rows}


@service.job(
    "scaled_sum",
    inputs=[
        DATA,
        COLUMN,
        Input("factor", "number", "multiplies every value", default=1.0),
        Input("steps", "integer", "progress steps", default=1, minimum=1, maximum=100),
        Input(
            "delay", "number", "seconds to wait between steps", default=0.0, minimum=0, maximum=60
        ),
    ],
    outputs=[Output("sum", "number", "the sum of the column times factor")],
)
async def scaled_sum(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, float]:
    """Sum of a column times ``factor``, in ``steps`` reported steps."""
    # declared above: the server has checked presence, types and ranges
    factor = inputs.get("factor", 1.0)
    steps = inputs.get("steps", 1)
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
    if not math.isfinite(total):
        # a result must be a finite number: JSON cannot carry an infinity
        raise ComputationFailed(
            "the 'sum' of 'example.scaled_sum' overflowed the float64 range; "
            "use a smaller 'factor' or scale the data down"
        )
    return {"sum": total}


@service.call("version", inputs=[], outputs=[Output("version", "string", "the plugin's version")])
async def version(ctx: CallContext, inputs: dict[str, Any]) -> dict[str, str]:
    """The plugin's version, answered directly."""
    return {"version": service.version}
