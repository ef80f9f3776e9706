"""A secure mean of a vector column: the multi-party example plugin of ``docs/plugins.md``.

``vector_mean.mean`` is one party's side of a protocol that every party of
a session runs at once, each on its own server and its own data. Each
party's records are vectors: the rows of a column of vectors, or the rows
of several numeric columns side by side. The parties learn the mean vector
over all their records and the joint number of records, and nothing else:

1. Each party keeps its finite rows only (a row with a NaN or an infinity
   in any element is left out, on every party alike) and sums them.
2. It encodes the sum in 64-bit fixed point (``frac_bits`` fractional
   bits, 20 by default). A sum too large for the ring is refused (422,
   ``OutOfRange``) before anything is sent: the ring would wrap silently.
3. One round (:meth:`SmpcSession.count_and_sum`): every party sends its
   record count and, if its own records already meet its minimum cohort,
   its sum, both under pairwise masks that cancel only in the total. The
   joint count is opened first; every party checks that all declared the
   same dimension and ``frac_bits`` and that the count meets the strictest
   minimum cohort of any party, and refuses otherwise. Only then are the
   sums opened (a party below its own minimum sends its sum in a second
   round, after the check).

Written against the SDK only (``fdrtd_server.sdk``), as a plugin must be.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from fdrtd_server.sdk import (
    DATA,
    BadRequest,
    Dataset,
    Input,
    JobContext,
    Microservice,
    OutOfRange,
    Output,
    SmpcSession,
    agree,
    check_joint_cohort,
    declare,
    distribution_version,
    finite_result,
    finite_rows,
    numeric,
    ring,
    session_for,
)

__all__ = ["service"]

NAME = "vector_mean"
MAX_DIMENSION = 10_000
"""Largest vector this plugin sums: 80 KB of ring elements in one message."""

service = Microservice(
    NAME,
    distribution_version("fdrtd-vector-mean", "0.1.0"),
    "A secure mean of a vector column over all parties' records.",
    multiparty=True,
)

ALLOW_TWO = service.switch(
    "allow_two_parties",
    False,
    "vector means of two parties: each party learns the other's sum and count (it knows "
    "its own), so the owner allows them in fdrtd.toml, [policy.vector_mean]",
)


@service.job(
    "mean",
    inputs=[
        DATA,
        Input(
            "column",
            ("string", "array"),
            "a column of vectors, or a list of numeric columns that form each record's vector "
            "(in the same order on every party); the only column by default",
            items="string",
            minimum=1,
            maximum=MAX_DIMENSION,
        ),
        Input(
            "frac_bits",
            "integer",
            "fixed-point fractional bits (precision 2^-frac_bits; each bit less doubles the "
            "largest sum allowed); must agree",
            default=ring.DEFAULT_FRAC_BITS,
            minimum=0,
            maximum=40,
        ),
    ],
    outputs=[
        Output("mean", "array", "the mean vector over all records of all parties"),
        Output("count", "integer", "the number of records of all parties the mean is over"),
    ],
    policy=[ALLOW_TWO],
)
async def mean(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """The mean vector of a column of vectors (or of several columns) over all parties.

    With two parties each would learn the other's sum and count: the owner must
    allow that (``allow_two_parties``).
    """
    frac_bits: int = inputs.get("frac_bits", ring.DEFAULT_FRAC_BITS)  # declared: 0 to 40
    if ctx.session is not None and len(ctx.session.get("parties", ())) < 3:
        ctx.require(
            ALLOW_TWO, "vector means of two parties", "each party learns the other's sum and count"
        )
    async with session_for(ctx) as peers:
        # inside the session: if this party refuses its input, the others hear it at once
        wanted = inputs.get("column")
        names = wanted if isinstance(wanted, list) else [wanted]
        dataset = await ctx.load_dataset(inputs["data"], columns=names)
        rows = finite_rows(vectors(dataset, wanted))
        local = rows.sum(axis=0)
        if not np.all(np.isfinite(local)):
            raise OutOfRange(
                "the sum of this party's records overflows the float64 range; "
                "scale the data down (divide it by a power of 10)"
            )
        smpc = SmpcSession(peers)
        await smpc.setup(
            declare(ctx, function=f"{NAME}.mean", dimension=rows.shape[1], frac_bits=frac_bits),
            defer=True,
        )
        # refused here, before anything is sent, if the sum could wrap the ring
        encoded = ring.encode_fixed(local, frac_bits=frac_bits, parties=smpc.parties)

        def vet(count: int) -> None:
            # every party sees the same declarations and count: all refuse alike
            agree(smpc, "function")
            agree(smpc, "dimension")
            agree(smpc, "frac_bits")
            check_joint_cohort(ctx, smpc, count)

        count, summed = await smpc.count_and_sum(
            int(rows.shape[0]), encoded, ready=rows.shape[0] >= ctx.env.min_cohort, vet=vet
        )
    total = ring.decode_fixed(summed, frac_bits=frac_bits)
    return finite_result({"mean": total / count, "count": count}, f"'{NAME}.mean'")


def vectors(dataset: Dataset, column: str | list[str] | None) -> npt.NDArray[np.float64]:
    """This party's records as rows of one 2-D float64 array.

    Args:
        dataset: The party's dataset, with the columns asked for.
        column: A column of vectors (or of numbers: vectors of one), a list
            of numeric columns side by side, or None for the only column.

    Raises:
        BadRequest: If a column is not numeric, or not of single numbers
            where several columns are asked for, or holds matrices.
    """
    if isinstance(column, list):
        parts = [numeric(dataset.column(name), f"column '{name}'") for name in column]
        if any(part.ndim != 1 for part in parts):
            raise BadRequest("each of several columns must hold single numbers, not vectors")
        return np.column_stack(parts) if parts else np.empty((dataset.rows, 0))
    values = numeric(dataset.column(column))
    if values.ndim == 1:
        return values.reshape(-1, 1)
    if values.ndim != 2:
        raise BadRequest("the column must hold numbers or vectors, not matrices")
    if values.shape[1] > MAX_DIMENSION:
        raise BadRequest(f"the vectors must have at most {MAX_DIMENSION} elements")
    return values
