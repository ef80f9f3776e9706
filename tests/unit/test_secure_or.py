"""``SmpcSession.any_true`` and the secure maximum built on it, on the real engine.

The secure OR must reveal whether any party holds True and nothing else: not
to a party that holds True itself (the flaw of an OR that adds ``r_i * b_i``
to a secure sum, which such a party undoes by subtracting its own term), and
not to the evaluator, which adds the masked bits. The parties talk through
the in-memory peers of ``memory_peers``, which keep every message a party
receives, so the tests can take a party's place.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import numpy as np
import pytest
from memory_peers import Peers, run_parties, seed

from fdrtd_server.errors import ComputationFailed
from fdrtd_server.sdk import curve, ring
from fdrtd_server.sdk.smpc import SEARCH_ROUNDS, SmpcSession

NAMES = ["a", "b", "c", "d", "e"]


def any_true(bits: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Peers]]:
    """Run ``any_true`` for every party in ``bits``; outcomes and views."""

    async def step(smpc: SmpcSession, name: str) -> Any:
        return await smpc.any_true(bits[name])

    return run_parties(list(bits), step)


@pytest.mark.parametrize("parties", [2, 3, 5])
def test_the_or_of_random_bits_matches_numpy_on_every_party(parties: int) -> None:
    rng = np.random.default_rng(parties)
    # sparse bits, so that all-False elements occur as often as the others
    bits = {name: rng.random((6, 9)) < 0.2 for name in NAMES[:parties]}
    outcomes, _ = any_true(bits)
    expected = np.logical_or.reduce(list(bits.values()))
    assert expected.any() and not expected.all()
    for name, found in outcomes.items():
        assert not isinstance(found, BaseException), (name, found)
        np.testing.assert_array_equal(found, expected)
        assert found.shape == (6, 9) and found.dtype == bool


def test_all_false_all_true_and_a_single_true_anywhere() -> None:
    for holder in [None, *NAMES[:3]]:
        bits = {name: np.array([name == holder, True, False]) for name in NAMES[:3]}
        outcomes, _ = any_true(bits)
        for found in outcomes.values():
            np.testing.assert_array_equal(found, [holder is not None, True, False])


def test_a_party_without_a_role_receives_only_the_result() -> None:
    bits = {name: np.array([True, False]) for name in NAMES[:3]}
    _, views = any_true(bits)
    received = [(sender, tag) for sender, tag, _ in views["b"].received if tag != "seeds"]
    assert received == [("a", "or.1.bits")]


def evaluator_residues(parties: int, others: bool, size: int = 2000) -> np.ndarray[Any, Any]:
    """What the evaluator opens when it holds True and every other party holds ``others``."""
    names = NAMES[:parties]
    evaluator = names[-1]
    bits = {name: np.full(size, True if name == evaluator else others) for name in names}
    outcomes, views = any_true(bits)
    assert all(np.array_equal(found, np.ones(size, dtype=bool)) for found in outcomes.values())
    total = np.zeros(size, dtype=np.uint64)
    for _, tag, message in views[evaluator].received:
        if tag.endswith(".count"):
            total += message["v"]
    # add its own masked share as the engine does: recompute it from the same masks
    smpc = SmpcSession(views[evaluator])  # type: ignore[arg-type]
    smpc._give = smpc._take = {party: seed(evaluator, party) for party in names[:-1]}
    total += smpc.masked("or.1.count", np.ones(size, dtype=np.uint64))
    modulus = 1 << parties.bit_length()
    return np.asarray(total % np.uint64(modulus))


@pytest.mark.parametrize("parties", [2, 3])
def test_the_evaluator_sees_uniform_residues_whatever_the_others_hold(parties: int) -> None:
    # the old OR let a party holding True learn the others' OR; here the
    # evaluator's opened residues are uniform whether the others hold True or not
    modulus = 1 << parties.bit_length()
    for others in (False, True):
        residues = evaluator_residues(parties, others)
        counts = np.bincount(residues.astype(np.int64), minlength=modulus)
        expected = residues.size / modulus
        chi_square = float(((counts - expected) ** 2 / expected).sum())
        # 3 or 7 degrees of freedom: 40 is beyond the 1e-6 tail of either
        assert chi_square < 40, (others, counts)


def test_scalars_are_fresh_per_element_so_equal_residues_never_give_equal_points() -> None:
    size = 64  # 4 residues for 2 parties: many elements share one
    bits = {name: np.zeros(size, dtype=bool) for name in NAMES[:2]}
    _, views = any_true(bits)
    (offer,) = [m["offer"] for _, tag, m in views["b"].received if tag == "or.1.count"]
    (query,) = [m for _, tag, m in views["a"].received if tag == "or.1.query"]
    for blob in (offer, query):
        points = [blob[k : k + 32] for k in range(0, len(blob), 32)]
        assert len(set(points)) == len(points)


def test_the_secure_or_takes_three_hops_and_two_n_minus_one_messages() -> None:
    bits = {name: np.array([False]) for name in NAMES[:5]}
    _, views = any_true(bits)
    messages = [
        (name, sender, tag)
        for name, view in views.items()
        for sender, tag, _ in view.received
        if tag.startswith("or.")
    ]
    assert len(messages) == 2 * 5 - 1
    assert {tag.rsplit(".", 1)[1] for _, _, tag in messages} == {"count", "query", "bits"}


# -- malformed messages name their sender -------------------------------------------


def lone(me: str, parties: list[str], injected: dict[tuple[str, str], Any]) -> Any:
    """Run ``any_true`` for party ``me`` alone, the others' messages injected."""
    boxes: defaultdict[Any, asyncio.Queue[Any]] = defaultdict(asyncio.Queue)
    peers = Peers(boxes, me, parties)
    for other in peers.others:
        boxes[(me, other, "seeds")].put_nowait({"parties": parties})
    for (sender, tag), message in injected.items():
        boxes[(me, sender, tag)].put_nowait(message)

    async def main() -> Any:
        smpc = SmpcSession(peers)  # type: ignore[arg-type]
        await smpc.setup({}, defer=True)
        return await smpc.any_true(np.array([True, False]))

    return asyncio.run(main())


def valid_points(count: int) -> bytes:
    return b"".join(curve.hash_to_point(bytes([k]), b"test") for k in range(count))


@pytest.mark.parametrize(
    ("me", "injected", "blamed"),
    [
        ("a", {("b", "or.1.query"): b"short"}, "b"),
        ("a", {("b", "or.1.query"): "not bytes"}, "b"),
        ("a", {("b", "or.1.query"): b"\xff" * 128}, "b"),  # 4 points, none canonical
        ("b", {("a", "or.1.count"): {"v": np.zeros(3, np.uint64), "offer": b""}}, "a"),
        ("b", {("a", "or.1.count"): "garbage"}, "a"),
        ("b", {("a", "or.1.count"): {"v": np.zeros(2, np.uint64), "offer": b"\xff" * 64}}, "a"),
        ("b", {("a", "or.1.count"): {"v": np.zeros(2, np.uint64), "offer": b""}}, "a"),
        (
            "b",
            {
                ("a", "or.1.count"): {"v": np.zeros(2, np.uint64), "offer": valid_points(2)},
                ("a", "or.1.bits"): np.zeros(3, np.uint8),
            },
            "a",
        ),
    ],
    ids=[
        "short query",
        "query not bytes",
        "invalid query points",
        "share of another length",
        "share not a map",
        "invalid offer points",
        "no offer",
        "result of another length",
    ],
)
def test_a_malformed_message_names_its_sender(
    me: str, injected: dict[tuple[str, str], Any], blamed: str
) -> None:
    with pytest.raises(ComputationFailed, match=rf"party '{blamed}' sent"):
        lone(me, ["a", "b"], injected)


def test_a_third_party_refuses_a_malformed_result() -> None:
    with pytest.raises(ComputationFailed, match=r"party 'a' sent a malformed result"):
        lone("b", ["a", "b", "c"], {("a", "or.1.bits"): [1, 0]})


def test_parties_listed_in_another_order_are_refused_before_any_role_is_taken() -> None:
    boxes: defaultdict[Any, asyncio.Queue[Any]] = defaultdict(asyncio.Queue)
    peers = Peers(boxes, "a", ["a", "b"])
    boxes[("a", "b", "seeds")].put_nowait({"parties": ["b", "a"]})

    async def main() -> Any:
        smpc = SmpcSession(peers)  # type: ignore[arg-type]
        await smpc.setup({}, defer=True)
        return await smpc.any_true(np.array([True]))

    with pytest.raises(ComputationFailed, match=r"party 'b' lists the session's parties"):
        asyncio.run(main())
    assert not [key for key in boxes if key[0] == "b" and key[2].startswith("or.")]


# -- the secure maximum -------------------------------------------------------------


@pytest.mark.parametrize("parties", [2, 3, 5])
def test_minimum_and_maximum_match_numpy(parties: int) -> None:
    rng = np.random.default_rng(10 + parties)
    columns = {name: rng.normal(0, 1e6, (rng.integers(1, 6), 3)) for name in NAMES[:parties]}
    columns[NAMES[0]][0, 1] = -np.inf
    columns[NAMES[parties - 1]][0, 2] = 5e-300  # tiny positives and negatives order correctly

    async def step(smpc: SmpcSession, name: str) -> Any:
        values = columns[name]
        return await smpc.minimum_maximum(values.min(axis=0), values.max(axis=0), True)

    outcomes, views = run_parties(list(columns), step)
    pooled = np.concatenate(list(columns.values()))
    for lo, hi in outcomes.values():
        np.testing.assert_array_equal(lo, pooled.min(axis=0))
        np.testing.assert_array_equal(hi, pooled.max(axis=0))
    ors = {tag.split(".")[1] for _, tag, _ in views[NAMES[0]].received if tag.startswith("or.")}
    assert len(ors) == SEARCH_ROUNDS


def test_a_party_without_data_does_not_change_the_extremes() -> None:
    values = {"a": np.array([3.5, -2.0]), "b": np.array([]), "c": np.array([7.25])}

    async def step(smpc: SmpcSession, name: str) -> Any:
        mine = values[name]
        present = mine.size > 0
        return await smpc.minimum_maximum(
            mine.min() if present else 0.0, mine.max() if present else 0.0, present
        )

    outcomes, _ = run_parties(list(values), step)
    for lo, hi in outcomes.values():
        assert (float(lo), float(hi)) == (-2.0, 7.25)


def test_order_keys_of_extreme_floats_survive_the_search() -> None:
    extremes = np.array([-np.inf, -1.7976931348623157e308, -0.0, 0.0, 5e-324, np.inf])
    keys = ring.float_order_key(extremes)

    async def step(smpc: SmpcSession, name: str) -> Any:
        mine = keys if name == "a" else keys[::-1]
        return await smpc.maximum_keys(mine, np.ones(keys.size, dtype=bool))

    outcomes, _ = run_parties(["a", "b"], step)
    for found in outcomes.values():
        np.testing.assert_array_equal(found, np.maximum(keys, keys[::-1]))
