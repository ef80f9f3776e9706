"""One id rule for every join and set operation: the vertical regression, the vertical
contingency table and PSI take the same ids from one column and refuse the same bad ones."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import protocols.smpc.service  # noqa: F401  (first: it imports the function modules)
from fdrtd_server.errors import BadRequest
from fdrtd_server.sdk import canonical_ids, id_bytes
from protocols.psi import service as psi
from protocols.smpc.tables import _holding


def _regression(column: Any) -> set[Any]:
    # linear_regression_vertical takes canonical_ids of its id column as they are
    return set(canonical_ids(column, "id")[0])


def _table(column: Any) -> set[Any]:
    return set(_holding(column, np.zeros(column.shape[0]), [0.0], "id").ids)


def _psi(column: Any) -> set[Any]:
    return set(psi.column_items(column, "id"))


COLUMNS = [
    np.array([7, 2**60 + 1, 2**60, -3], dtype=np.int64),
    np.array([2**64 - 1, 2**63], dtype=np.uint64),
    np.array([7.0, -3.0, math.nan, 2.0**53, -0.0]),
    np.array(["7", "a", "", "  ", "ü"]),
]


@pytest.mark.parametrize("column", COLUMNS)
def test_the_three_protocols_take_the_same_ids(column: Any) -> None:
    assert _regression(column) == _table(column) == _psi(column)


def test_the_ids_are_exact_and_typed() -> None:
    assert _psi(COLUMNS[0]) == {7, 2**60 + 1, 2**60, -3}
    assert _psi(COLUMNS[2]) == {7, -3, 2**53, 0}
    assert _psi(COLUMNS[3]) == {"7", "a", "ü"}
    # 7.0 meets 7; "7" is another id, as it is another item of a set
    assert id_bytes([7])[0] == id_bytes([int(7.0)])[0] != id_bytes(["7"])[0]


@pytest.mark.parametrize("bad", [[1.0, math.inf], [2.0**53 + 2], [-(2.0**60)], [True, False]])
def test_the_three_protocols_refuse_the_same_bad_ids(bad: list[Any]) -> None:
    column = np.array(bad)
    messages = set()
    for take in (_regression, _table, _psi):
        with pytest.raises(BadRequest, match="the id column 'id'") as refused:
            take(column)
        messages.add(refused.value.message)
    assert len(messages) == 1
