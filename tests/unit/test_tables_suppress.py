"""Complementary suppression, and the map-reduce aggregates that reuse it.

A released table shows its total, its zero cells and its visible cells, so a
reader knows the sum of the hidden cells and that each is at least 1. The
tests take the reader's place: they enumerate every filling of the hidden
cells that agrees with the release and check that no hidden cell is pinned
down, nor known to be below the minimum. (A reader who also uses the rule's
choice of complements, "the smallest visible cell", can sometimes narrow a
cell further; ``docs/protocols.md`` says so.)
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from fdrtd_client import combine_aggregates
from fdrtd_server.sdk import suppress
from microservices.compute import aggregate_values


def released(cells: Sequence[int], minimum: int) -> tuple[list[int | None], int]:
    hidden = suppress(cells, minimum).tolist()
    return [None if h else c for c, h in zip(cells, hidden, strict=True)], sum(cells)


def explanations(shown: list[int | None], total: int) -> list[tuple[int, ...]]:
    """Every filling of the hidden cells that agrees with the release.

    The reader knows the visible cells and the total; a hidden cell is at
    least 1 (zeros are shown), unless every cell is hidden (then zeros may be).
    """
    hidden = [k for k, c in enumerate(shown) if c is None]
    rest = total - sum(c for c in shown if c is not None)
    low = 0 if len(hidden) == len(shown) else 1
    return [
        values
        for values in itertools.product(range(low, rest + 1), repeat=len(hidden))
        if sum(values) == rest
    ]


def test_the_reviews_examples() -> None:
    # both 1s hidden alone: 102 - 100 = 2 would pin them; the 100 goes too
    assert suppress([1, 1, 100], 5).tolist() == [True, True, True]
    assert suppress([1, 1, 1, 1, 1], 5).tolist() == [True] * 5
    # five hidden cells summing to 5 would all be 1: the 50 goes too
    assert suppress([1, 1, 1, 1, 1, 50], 5).tolist() == [True] * 6
    # a zero shown beside hidden cells that must all be 1: zeros are hidden as well
    assert suppress([1, 1, 1, 1, 1, 0], 5).tolist() == [True] * 6


def test_small_cells_and_complements() -> None:
    assert suppress([5, 2, 0, 7], 3).tolist() == [True, True, False, False]
    assert suppress([0, 3, 4], 3).tolist() == [False, False, False]
    assert suppress([4, 2, 4], 3).tolist() == [True, True, False]  # first on ties
    assert suppress([[1, 4], [2, 9]], 3).tolist() == [[True, True], [True, False]]
    assert suppress([2, 2, 9, 0], 3).tolist() == [True, True, False, False]
    assert suppress([0, 0], 3).tolist() == [False, False]


@pytest.mark.parametrize("seed", range(6))
def test_no_hidden_cell_is_pinned_down(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(150):
        minimum = rng.choice([2, 3, 5])
        cells = [rng.choice([0, 1, 1, 2, 3, 4, 6, 9]) for _ in range(rng.randint(1, 4))]
        if sum(cells) < minimum:
            continue  # refused before any table is opened
        shown, total = released(cells, minimum)
        hidden = [k for k, c in enumerate(shown) if c is None]
        assert all(shown[k] is None for k, c in enumerate(cells) if 0 < c < minimum)
        if not hidden:
            continue
        assert len(hidden) >= 2 or len(cells) == 1, (cells, shown)
        assert sum(cells[k] for k in hidden) >= minimum or len(hidden) == len(cells)
        options = explanations(shown, total)
        assert tuple(cells[k] for k in hidden) in options
        if len(cells) == 1:
            continue  # the total is the only cell; it passed the cohort check
        for position in range(len(hidden)):
            values = {option[position] for option in options}
            assert len(values) >= 2, (cells, minimum, shown)
            if len(hidden) < len(cells):  # (with all hidden, only the total is released)
                assert max(values) >= minimum, (cells, minimum, shown)


# --- map-reduce ----------------------------------------------------------------------------


def test_aggregates_have_no_minimum_or_maximum_and_skip_non_finite_rows() -> None:
    values = np.array([1.0, 2.0, np.inf, 4.0, -np.inf, np.nan, 5.0])
    result = aggregate_values(values, None, 3)
    assert result == {"count": 4, "sum": 12.0, "sum_squares": 46.0}
    matrix = np.array([[1.0, 2.0], [np.inf, 0.0], [3.0, 4.0], [5.0, 6.0]])
    result = aggregate_values(matrix, None, 3)
    assert set(result) == {"count", "sum", "sum_squares"} and result["count"] == 3
    assert result["sum"].tolist() == [9.0, 12.0]


def test_histogram_suppression_survives_the_released_count() -> None:
    # 10 + 10 + one hidden cell of 1: the count (21) would give the 1 away
    values = np.array([0.5] * 10 + [1.5] * 10 + [2.5])
    histogram = aggregate_values(values, np.array([0.0, 1.0, 2.0, 3.0, 4.0]), 3)["histogram"]
    assert histogram["counts"] == [None, 10, None, 0] and histogram["other"] == 0
    assert histogram["suppressed"] == [0, 2]
    visible = sum(c for c in [*histogram["counts"], histogram["other"]] if c is not None)
    assert 21 - visible == 11  # the hidden sum: a 1 and a 10, or any other split


def test_values_outside_the_edges_are_an_other_cell() -> None:
    values = np.array([-5.0] * 4 + [0.5] * 6 + [9.0] * 2 + [np.inf])
    result = aggregate_values(values, np.array([0.0, 1.0, 2.0]), 3)
    assert result["count"] == 12
    histogram = result["histogram"]
    # cells [6, 0] and other 6 (4 below, 2 above): nothing small, zeros shown as 0
    assert (histogram["counts"], histogram["other"], histogram["suppressed"]) == ([6, 0], 6, [])


def part(count: int, counts: list[Any], other: Any) -> dict[str, Any]:
    hidden = [k for k, c in enumerate([*counts, other]) if c is None]
    return {
        "count": count,
        "sum": float(count),
        "sum_squares": float(count),
        "histogram": {
            "edges": [0.0, 1.0, 2.0],
            "counts": counts,
            "other": other,
            "suppressed": hidden,
        },
    }


def test_combined_histogram_keeps_every_servers_suppression() -> None:
    combined = combine_aggregates([part(12, [None, 8], None), part(9, [4, 5], 0)])
    assert "minimum" not in combined and "maximum" not in combined
    assert combined["count"] == 21 and combined["mean"] == 1.0
    histogram = combined["histogram"]
    assert histogram["counts"] == [None, 13] and histogram["other"] is None
    assert histogram["suppressed"] == [0, 2]
    # an earlier server's -1 also stands for a suppressed cell
    old = combine_aggregates([part(12, [-1, 8], 4), part(9, [4, 5], 0)])["histogram"]
    assert old["counts"] == [None, 13] and old["other"] == 4
