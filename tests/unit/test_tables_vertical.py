"""``contingency_table_vertical``: sizes, in-category count and join checked before anything opens.

The parties run the real protocol (``protocols.smpc.tables._vertical``) in one
event loop and talk through the in-memory peers of ``memory_peers``, which
keep every message a party receives, so that a test can see what each party
was shown before a refusal.
The two-party (Paillier) runs use a 1024-bit key, built here directly: the
service itself refuses anything below 2048 bits.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np
import pytest
from memory_peers import Context, Peers, Wire, run_tasks

from fdrtd_server.errors import BadRequest, CohortTooSmall
from fdrtd_server.sdk import canonical_ids, curve, ring
from protocols.smpc.common import PAILLIER_BITS
from protocols.smpc.tables import (
    _Holding,
    _holding,
    _labels,
    _Vertical,
    _vertical,
    category_index,
)

TEST_BITS = 1024
"""Paillier key size for these in-process runs only (fast key generation)."""

OPENING = ("vt.join", "vt.triple", "vt.masked", "vt.share", "vt.table", "vt.he")
"""Tags of messages that carry anything of the join or of the table."""


def run(
    holdings: dict[str, _Holding | None],
    holders: list[str],
    shape: tuple[int, int],
    minimum: int,
) -> tuple[dict[str, Any], dict[str, Peers]]:
    """Every party's outcome (``(n, total, table)`` or the exception) and its view."""
    parties = list(holdings)
    wire = Wire()
    contexts = {name: Context(name, parties, wire) for name in parties}

    async def one(name: str) -> Any:
        ctx = contexts[name]
        v = _Vertical(ctx, ctx.peers, holders, shape, minimum, TEST_BITS)  # type: ignore[arg-type]
        return await _vertical(v, holdings[name])

    return run_tasks(parties, one), {name: ctx.peers for name, ctx in contexts.items()}


def tags(view: Peers) -> set[str]:
    return {tag.rsplit(".", 1)[0] if tag[-1].isdigit() else tag for _, tag, _ in view.received}


def data(seed: int, x_cats: list[str], y_cats: list[str]) -> tuple[Any, Any, Counter[Any]]:
    """Two holders' columns over partly overlapping ids; the plaintext table."""
    rng = random.Random(seed)
    x_ids = rng.sample(range(100), 70)
    y_ids = rng.sample(range(30, 130), 70)
    x_value = {i: rng.choice([*x_cats, "none"]) for i in x_ids}
    y_value = {i: rng.choice([*y_cats, "none"]) for i in y_ids}
    x = _holding(np.array(x_ids), np.array([x_value[i] for i in x_ids]), list(x_cats))
    y = _holding(np.array(y_ids, dtype=float), np.array([y_value[i] for i in y_ids]), y_cats)
    pairs = Counter(
        (x_value[i], y_value[i])
        for i in set(x_ids) & set(y_ids)
        if x_value[i] in x_cats and y_value[i] in y_cats
    )
    return x, y, pairs


@pytest.mark.parametrize("bystanders", [[], ["dealer"], ["dealer", "watcher"]])
def test_the_table_matches_plaintext(bystanders: list[str]) -> None:
    x_cats, y_cats = ["u", "v", "w"], ["k", "l"]
    x, y, pairs = data(len(bystanders), x_cats, y_cats)
    holdings: dict[str, _Holding | None] = {"x": x, "y": y} | dict.fromkeys(bystanders)
    outcomes, _ = run(holdings, ["x", "y"], (3, 2), minimum=3)
    expected = [[pairs[(a, b)] for b in y_cats] for a in x_cats]
    total = sum(pairs.values())
    for name, outcome in outcomes.items():
        assert not isinstance(outcome, BaseException), (name, outcome)
        n, joint, table = outcome
        assert ring.decode_int(table).tolist() == expected
        assert joint == total and n >= total


@pytest.mark.parametrize("bystanders", [[], ["dealer"]])
def test_few_in_category_records_are_refused_before_the_join(bystanders: list[str]) -> None:
    # 40 joined ids, but only 2 of them have an x value among the categories: the
    # table would show those 2 records' y values to every server
    ids = list(range(40))
    x = _holding(np.array(ids), np.array(["rare"] * 2 + ["common"] * 38), ["rare"])
    y = _holding(np.array(ids[::-1]), np.array(["a", "b"] * 20), ["a", "b"])
    holdings: dict[str, _Holding | None] = {"x": x, "y": y} | dict.fromkeys(bystanders)
    outcomes, views = run(holdings, ["x", "y"], (1, 2), minimum=5)
    for name, outcome in outcomes.items():
        assert isinstance(outcome, CohortTooSmall), (name, outcome)
        assert "minimum cohort of 5" in str(outcome)
        assert not any(tag.startswith(OPENING) for tag in tags(views[name])), tags(views[name])
    if not bystanders:
        # two parties: the holders count the matches themselves, so they learn c
        assert tags(views["x"]) == {"vt.ids", "vt.count.blinded", "vt.count.reblinded"}
        return
    # with a third party, it counts: the holders learn only that c is too small
    dealer, *rest = bystanders
    for holder in ("x", "y"):
        assert tags(views[holder]) == {"vt.ids", "vt.count.blinded", "vt.count.verdict"}
        verdicts = [v for _, t, v in views[holder].received if t == "vt.count.verdict"]
        assert verdicts == [{"ok": False}]  # not the count, 2
    assert tags(views[dealer]) == {"vt.sizes", "vt.count.size", "vt.count.list", "vt.go"}
    for name in rest:
        assert [value for _, _, value in views[name].received] == [{"ok": False}]


def test_a_small_id_set_is_refused_before_any_point_is_sent() -> None:
    x = _holding(np.array([1, 2, 3, 4]), np.array(["u"] * 4), ["u"])
    y = _holding(np.arange(100), np.array(["k"] * 100), ["k"])
    outcomes, views = run({"x": x, "y": y, "dealer": None}, ["x", "y"], (1, 1), minimum=5)
    assert all(isinstance(o, CohortTooSmall) for o in outcomes.values()), outcomes
    assert tags(views["x"]) == tags(views["y"]) == {"vt.ids"}
    assert tags(views["dealer"]) == {"vt.sizes"}  # the x-holder's refusal, nothing else


def test_the_count_stage_pads_and_shuffles() -> None:
    # 50 ids each, 10 of them in the categories: the other holder gets 50 points,
    # and its own points come back sorted (not in the order it sent them)
    ids = np.arange(50)
    values = np.array(["in"] * 10 + ["out"] * 40)
    x = _holding(ids, values, ["in"])
    y = _holding(ids, values[::-1].copy(), ["in"])
    outcomes, views = run({"x": x, "y": y}, ["x", "y"], (1, 1), minimum=1)
    assert isinstance(outcomes["x"], CohortTooSmall)  # no record is in both categories
    sent = b"".join(
        v["data"] for _, t, v in views["y"].received if t.startswith("vt.count.blinded")
    )
    back = b"".join(v["data"] for _, t, v in views["x"].received if t.startswith("vt.count.reb"))
    assert len(sent) == len(back) == 50 * curve.POINT_BYTES
    points = [back[k : k + 32] for k in range(0, len(back), 32)]
    assert points == sorted(points)


def test_large_integer_ids_and_categories_stay_exact() -> None:
    big = 2**60
    x_ids = np.array([big + k for k in range(8)], dtype=np.int64)
    y_ids = np.array([big + k for k in range(1, 9)][::-1], dtype=np.int64)
    x = _holding(x_ids, np.array([big, big + 1] * 4, dtype=np.int64), [big, big + 1])
    y = _holding(y_ids, np.array([7] * 8), [7])
    assert len(set(x.ids)) == 8 and x.index.tolist() == [0, 1] * 4
    outcomes, _ = run({"x": x, "y": y, "dealer": None}, ["x", "y"], (2, 1), minimum=3)
    for outcome in outcomes.values():
        n, joint, table = outcome
        assert (n, joint) == (7, 7)
        assert ring.decode_int(table).tolist() == [[3], [4]]  # ids big+1..big+7


def test_canonical_ids_and_category_index_are_exact() -> None:
    assert canonical_ids(np.array([2**60, 2**60 + 1]), "id")[0] == [2**60, 2**60 + 1]
    top = np.array([2**64 - 1, 2**63], dtype=np.uint64)
    assert canonical_ids(top, "id")[0] == [2**64 - 1, 2**63]
    ids, present = canonical_ids(np.array([7.0, np.nan, 2.0**53]), "id")
    assert ids == [7, 2**53] and present.tolist() == [True, False, True]
    column = np.array([2**60, 2**60 + 1, 3, -1], dtype=np.int64)
    assert category_index(column, [2**60 + 1, 2**60, 3.0, 1.5]).tolist() == [1, 0, 2, -1]
    assert category_index(top, [2**64 - 1, -1]).tolist() == [0, -1]
    floats = np.array([2.0**60, 1.5, np.nan])
    assert category_index(floats, [2**60 + 1, 2**60, 1.5]).tolist() == [1, 2, -2]
    assert category_index(np.array([True, False]), [1]).tolist() == [0, -1]
    assert _labels([2**60, 2**60 + 1], "x_categories") == [2**60, 2**60 + 1]
    with pytest.raises(BadRequest, match="distinct"):
        _labels([2, 2.0], "x_categories")
    with pytest.raises(BadRequest, match="duplicate"):
        _holding(np.array([2**60, 2**60]), np.array([1, 2]), [1])


def test_keys_below_2048_bits_are_not_offered() -> None:
    assert min(PAILLIER_BITS) == 2048


@pytest.mark.parametrize("held", [True, False])
def test_with_a_dealer_a_holder_cannot_tell_whether_a_targeted_id_is_held(held: bool) -> None:
    # the analyst's x-categories match one id of the x-holder (7): without a
    # third party, c (1 or 0) would tell the x-holder whether the y-holder has it
    ids = np.arange(100)
    x_values = np.array(["target" if i == 7 else "other" for i in ids])
    x = _holding(ids, x_values, ["target"])
    y_ids = ids if held else np.append(ids[ids != 7], 1000)  # same size either way
    y = _holding(y_ids, np.array(["k"] * y_ids.size), ["k"])
    outcomes, views = run({"x": x, "y": y, "dealer": None}, ["x", "y"], (1, 1), minimum=5)
    assert all(isinstance(o, CohortTooSmall) for o in outcomes.values()), outcomes
    seen = [(t, v) for _, t, v in views["x"].received if t == "vt.count.verdict"]
    assert seen == [("vt.count.verdict", {"ok": False})]
