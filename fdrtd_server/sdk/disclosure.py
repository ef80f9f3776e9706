"""Disclosure rules: what a result may show of the records behind it.

A function checks its inputs (:func:`numeric`, :func:`finite_rows`) before
anything leaves the server, and its result (:func:`finite_result`) before it
is stored; a table hides its small cells, and the cells that would let a
reader work a small cell out from the released total (:func:`suppress`). The
minimum cohort itself is checked jointly by
:func:`fdrtd_server.sdk.parties.check_joint_cohort`, or by
:meth:`~fdrtd_server.microservice.JobContext.check_cohort` for one server.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from fdrtd_server.errors import BadRequest, ComputationFailed

__all__ = ["finite_result", "finite_rows", "numeric", "suppress"]


def numeric(values: npt.NDArray[Any], name: str = "column") -> npt.NDArray[np.float64]:
    """The column as float64; refuses text columns with a message naming ``name``."""
    if values.dtype.kind not in "biuf":
        raise BadRequest(f"the {name} must be numeric")
    return np.asarray(values, dtype=np.float64)


def finite_rows(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The rows without NaN or infinity (in any element, for vector rows)."""
    if values.ndim == 1:
        keep = np.isfinite(values)
        return values if keep.all() else values[keep]
    flat = values.reshape(values.shape[0], -1)
    return values[np.isfinite(flat).all(axis=1)]


def _infinite(value: Any) -> bool:
    """Whether ``value`` (a result's value, nested lists and maps included) holds ±inf."""
    if isinstance(value, np.ndarray):
        return value.dtype.kind == "f" and bool(np.any(np.isinf(value)))
    if isinstance(value, float | np.floating):
        return bool(np.isinf(value))
    if isinstance(value, dict):
        return any(_infinite(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(_infinite(item) for item in value)
    return False


def finite_result(result: dict[str, Any], function: str) -> dict[str, Any]:
    """Return ``result`` unless one of its values overflowed to infinity.

    A sum, mean or interpolation of finite float64 data can pass the largest
    float (about 1.8e308); the result would then say nothing, and JSON cannot
    carry it. Every party of a protocol sees the same joint result, so every
    one refuses alike. NaN is let through: it is how a statistic says it is
    undefined (the variance of one record), and reads as ``null`` in JSON.

    Raises:
        ComputationFailed: (422) naming the key, the cause and the fix.
    """
    for key, value in result.items():
        if _infinite(value):
            error = ComputationFailed(
                f"the '{key}' of {function} overflowed the float64 range (about 1.8e308) "
                "to infinity; scale the data down (divide it by a power of 10)"
            )
            error.collective = True  # every party computed the same result
            raise error
    return result


def suppress(counts: npt.ArrayLike, minimum: int, *, empty: bool = False) -> npt.NDArray[np.bool_]:
    """Which cells of a table to hide, so that the released total pins none of them down.

    Every cell with ``0 < count < minimum`` is hidden. The total is released
    and zero cells are shown, so a reader knows the sum ``S`` of the ``h``
    hidden cells and that each is at least 1, hence at most ``S - (h - 1)``.
    While that bound is below ``minimum`` (which covers one hidden cell, and
    hidden cells that sum to less than ``minimum``: ``[1, 1, 100]`` with a
    minimum of 5 hides all three; ``[1, 1, 1, 1, 1, 50]`` hides the 50 too,
    as five hidden cells summing to 5 would all be 1), the smallest visible
    non-zero cell is hidden as well (the first one on ties, in row-major
    order). So at least two cells end up hidden, with a sum of at least
    ``minimum``, and none of them is known to be below ``minimum``. If no
    non-zero cell is left to hide, every cell is hidden, zeros included (a
    hidden cell may then be 0), and only the total remains.

    With ``empty`` (a table of an owner's named dataset), empty cells are
    hidden like small ones, so that a reader cannot tell "nobody" from "a
    few" (and so cannot narrow bins down to where one record lies). A hidden
    cell may then be 0, so the bound on one is the whole hidden sum: cells
    are added, smallest first, until that sum reaches ``minimum``.

    Args:
        counts: The table (any shape) of non-negative counts.
        minimum: The small-cell threshold (the minimum cohort size, or the
            owner's ``small_cell``).
        empty: Hide empty cells too.

    Returns:
        A boolean mask of the shape of ``counts``.
    """
    cells = np.asarray(counts, dtype=np.int64)
    flat = cells.reshape(-1)
    hidden = (flat < minimum) if empty else (flat > 0) & (flat < minimum)

    def safe() -> bool:
        count = int(hidden.sum())
        # the most one hidden cell can hold, as a reader of the total works it out
        most = int(flat[hidden].sum()) - (0 if empty else count - 1)
        return count == 0 or (count >= 2 and most >= minimum)

    # visible non-zero cells, smallest first (a stable sort keeps row-major order on ties)
    candidates = [int(k) for k in np.argsort(flat, kind="stable") if flat[k] > 0 and not hidden[k]]
    for k in candidates:
        if safe():
            break
        hidden[k] = True
    if not safe():
        hidden[:] = True
    return hidden.reshape(cells.shape)
