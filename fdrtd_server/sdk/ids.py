"""Record ids: one rule for every join and set operation, so two joins of one column agree.

A vertical join (``linear_regression_vertical``, ``contingency_table_vertical``)
and a set operation (``psi``) compare the ids of several parties exactly.
Every one of them turns a column into ids with :func:`canonical_ids`:

* integers (any integer column) are ids as they are, exactly: ``2**60 + 1``
  is not ``2**60``;
* a float of magnitude at most :data:`EXACT_FLOAT_IDS` (``2**53``) that is a
  whole number is that integer, so ``7.0`` from a CSV file meets ``7`` from
  an integer array; a fraction (``2.5``, a measured value intersected by
  PSI) is that exact float; above ``2**53`` a float stands for several
  integers (``2.0**53 + 1 == 2.0**53``), so two ids could silently become
  one: refused, as are infinities;
* text is an id as its exact characters (UTF-8, no normalisation);
* a missing value (NaN, or text that is empty or blank) is no id: its row
  takes no part.

Ids keep their type: ``7`` and ``"7"`` are different ids, as they are
different items of a set. :func:`id_bytes` gives the canonical bytes that are
hashed onto the curve (:func:`fdrtd_server.sdk.curve.encode_item`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from fdrtd_server.errors import BadRequest
from fdrtd_server.sdk import curve

__all__ = ["EXACT_FLOAT_IDS", "Id", "canonical_ids", "id_bytes"]

Id = int | float | str
"""A canonical id: an exact integer, an exact fraction, or a text."""

EXACT_FLOAT_IDS = 1 << 53
"""Largest magnitude up to which every whole number has a float64 (ids given as floats)."""


def canonical_ids(column: npt.NDArray[Any], name: str) -> tuple[list[Id], npt.NDArray[np.bool_]]:
    """The ids of a column's rows that have one, and which rows those are.

    Args:
        column: A one-dimensional column of integers, floats or text.
        name: The column's name, for the error message.

    Returns:
        The ids, in row order, of the rows that have one, and a mask of those rows.

    Raises:
        BadRequest: Naming the column, if it is not one-dimensional integers,
            floats or text, or holds a float that is infinite or above 2^53
            in magnitude.
    """
    if column.ndim != 1:
        raise BadRequest(f"the id column '{name}' must hold single values, not vectors")
    kind = column.dtype.kind
    if kind in "iu":
        return [int(v) for v in column.tolist()], np.ones(column.shape[0], dtype=np.bool_)
    if kind == "f":
        floats = column.astype(np.float64, copy=False)
        present = ~np.isnan(floats)
        ids: list[Id] = []
        for value in floats[present].tolist():
            if not math.isfinite(value) or abs(value) > EXACT_FLOAT_IDS:
                raise BadRequest(
                    f"the id column '{name}' holds numbers that are infinite or above 2^53 "
                    "in magnitude, which floating point cannot store exactly; upload the "
                    "ids as integers or as text"
                )
            ids.append(int(value) if value.is_integer() else value)
        return ids, present
    if kind in "US":
        texts = [v.decode() if isinstance(v, bytes) else str(v) for v in column.tolist()]
        present = np.array([bool(t.strip()) for t in texts], dtype=np.bool_)
        return [t for t, kept in zip(texts, present.tolist(), strict=True) if kept], present
    raise BadRequest(f"the id column '{name}' must hold integers or text (not booleans)")


def id_bytes(ids: list[Id]) -> list[bytes]:
    """The canonical bytes of each id, as hashed onto the curve (typed: ``7`` is not ``"7"``)."""
    return [curve.encode_item(i) for i in ids]
