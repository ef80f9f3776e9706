"""What the ``psi`` protocols let out: every party's real side, on an in-memory network.

Each test runs the real job functions of :mod:`protocols.psi.service` for all
parties in one event loop, through ``memory_peers.run_job``. Their wire
records every message, so a test can check not only the results but what each
party *sent*: that onions have one length whatever the items, that setup
messages carry nothing about the items, that a refused intersection sends no
positions.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from memory_peers import Wire, run_job

from fdrtd_server.errors import BadRequest, CohortTooSmall, ComputationFailed, FdrtdError
from fdrtd_server.sdk import curve
from protocols.psi import service


@pytest.fixture(autouse=True)
def in_memory_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The job functions open the in-memory session of their context."""
    monkeypatch.setattr(service, "_session", lambda ctx: ctx.peers)


def run_parties(
    function: str,
    sets: Mapping[str, Sequence[Any]],
    envs: Mapping[str, Mapping[str, Any]] | None = None,
    inputs: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[dict[str, Any], Wire]:
    """Run ``psi.<function>`` for every party; each party's result or error, and the wire.

    An error that is not an :class:`FdrtdError` is a bug, and raised here.
    """
    job = {
        "intersection": service.intersection,
        "intersection_size": service.intersection_size,
        "union": service.union,
    }[function]
    own = {
        name: {"data": {"v": items}, "column": "v", **(inputs or {}).get(name, {})}
        for name, items in sets.items()
    }
    results, views = run_job(job, own, envs=envs)
    for outcome in results.values():
        if isinstance(outcome, BaseException) and not isinstance(outcome, FdrtdError):
            raise outcome
    return results, views[next(iter(sets))].wire


def onion_lengths(net: Wire) -> dict[str, set[int]]:
    """Per sender, the lengths of the onions it sent to the collector."""
    lengths: dict[str, set[int]] = {}
    for sent in net.sent:
        if sent.tag.startswith(service.Stage.COLLECT + "."):
            blob = sent.value["data"]
            lengths.setdefault(sent.sender, set()).add(len(blob))
    return lengths


# --- union: padding that says nothing about who sent what --------------------------------


def test_onions_have_one_length_whatever_the_items() -> None:
    # b1 holds items of 1 byte, b2 of 100 bytes, b3 a mix: the old padding class
    # (a power of two above each party's longest item) told b2's items apart.
    sets = {
        "b0": ["p", "q", "r"],
        "b1": ["a", "b", "c"],
        "b2": ["x" * 100, "y" * 100, "z" * 100],
        "b3": ["m", "n" * 100, "o" * 50],
    }
    results, net = run_parties("union", sets)
    expected = sorted(set().union(*map(set, sets.values())))
    assert all(r == {"union": expected, "size": 12} for r in results.values()), results
    n = len(sets)
    onion = service.DEFAULT_MAX_ITEM_BYTES + 2 + n * curve.ONION_LAYER_BYTES
    # Every sender's batch (3 onions each) has the same length, fixed by the common input.
    assert onion_lengths(net) == {name: {3 * onion} for name in ("b1", "b2", "b3")}
    # Every mix step passes onions of the length its layer count gives, for everyone's items.
    for sent in net.sent:
        if sent.tag.startswith(service.Stage.MIX + "."):
            layers = n - int(sent.tag.split(".")[1])
            per = service.DEFAULT_MAX_ITEM_BYTES + 2 + layers * curve.ONION_LAYER_BYTES
            assert len(sent.value["data"]) == 12 * per
    # The setup messages differ only by the fresh key: nothing about item lengths.
    setups = [s.value for s in net.sent if s.tag == service.Stage.SETUP]
    assert {frozenset(v) for v in setups} == {
        frozenset(
            {"function", "version", "size", "min_cohort", "provenance", "key", "max_item_bytes"}
        )
    }
    assert {(v["size"], v["max_item_bytes"]) for v in setups} == {(3, 256)}


def test_padded_items_have_the_common_length() -> None:
    encoded = [curve.encode_item(v) for v in ("a", "é" * 50, 7, 2.5, "x" * 300)]
    padded = service.pad_union_items(encoded, 100)
    assert {len(p) for p in padded} == {102}
    assert [curve.unpad_item(p) for p in padded[:4]] == encoded[:4]
    assert curve.unpad_item(padded[4]) == b""  # too long: the marker, not the item
    # The bound counts the item (UTF-8 bytes, digits), not the type tag.
    assert service.pad_union_items([curve.encode_item("x" * 100)], 100) == [
        curve.pad_item(curve.encode_item("x" * 100), 102)
    ]


def test_a_too_long_item_is_refused_by_everyone_without_naming_its_holder() -> None:
    sets = {"c0": ["a", "b", "c"], "c1": ["d", "e", "x" * 65], "c2": ["f", "g", "h"]}
    inputs = {name: {"max_item_bytes": 64} for name in sets}
    results, net = run_parties("union", sets, inputs=inputs)
    errors = list(results.values())
    assert all(isinstance(e, BadRequest) and e.collective for e in errors), errors
    assert len({e.message for e in errors}) == 1
    assert "longer than 'max_item_bytes' (64" in errors[0].message
    assert not any(name in errors[0].message for name in sets)
    # c1 sent onions as long as everyone else's, and nobody aborted on its own.
    assert len({length for lengths in onion_lengths(net).values() for length in lengths}) == 1
    assert net.aborted == {}
    # No item was broadcast.
    union_messages = [s.value for s in net.sent if s.tag.startswith(service.Stage.UNION)]
    assert union_messages == [{"too_long": True}] * 2


@pytest.mark.parametrize("bad", [0, 1025, 2.5, "256", True])
def test_max_item_bytes_must_be_a_sensible_integer(bad: Any) -> None:
    with pytest.raises(BadRequest, match="'max_item_bytes' must be an integer from 1 to 1024"):
        service.union_max_item_bytes({"max_item_bytes": bad})
    assert service.union_max_item_bytes({}) == 256


def test_parties_must_agree_on_max_item_bytes() -> None:
    sets = {"d0": ["a", "b", "c"], "d1": ["a", "b", "c"]}
    results, net = run_parties("union", sets, inputs={"d0": {"max_item_bytes": 32}})
    for error in results.values():
        assert isinstance(error, ComputationFailed) and error.collective
        assert "disagree on 'max_item_bytes'" in error.message
    assert [s.tag for s in net.sent] == [service.Stage.SETUP] * 2  # no onion left anyone


# --- intersection: the minimum cohort on the result ---------------------------------------


@pytest.mark.parametrize("function", ["intersection", "intersection_size"])
def test_a_small_intersection_is_refused_by_every_party_before_any_hit(function: str) -> None:
    # One common item; e0 allows 1, e1 3, e2 2: e1's minimum applies, on all three.
    sets = {"e0": ["t", "a", "b"], "e1": ["t", "c", "d"], "e2": ["t", "e", "f"]}
    envs = {name: {"min_cohort": k} for name, k in (("e0", 1), ("e1", 3), ("e2", 2))}
    results, net = run_parties(function, sets, envs)
    for error in results.values():
        assert isinstance(error, service.IntersectionTooSmall) and error.collective
        assert isinstance(error, CohortTooSmall) and error.status == 403
        assert error.minimum == 3
        assert "party 'e1'" in error.message
    assert len({e.message for e in results.values()}) == 1
    assert not any(s.tag == service.Stage.HITS for s in net.sent)
    assert net.aborted == {}


def test_padding_with_junk_is_no_membership_test() -> None:
    # Junk plus one target: "refused" when the target is held would tell it apart
    # from "0" when not; both are refused alike.
    probe = ["junk-1", "junk-2", "target"]
    outcomes = []
    for other in (["target", "x", "y"], ["other", "x", "y"]):
        results, _ = run_parties("intersection_size", {"f0": probe, "f1": other})
        outcomes.append({name: (type(r), str(r)) for name, r in results.items()})
    assert outcomes[0] == outcomes[1]
    assert all(kind is service.IntersectionTooSmall for kind, _ in outcomes[0].values())


def test_an_intersection_at_the_minimum_is_returned() -> None:
    sets = {"g0": ["a", "b", "c", "x"], "g1": ["c", "b", "a", "y"]}
    results, net = run_parties("intersection", sets)
    assert all(r == {"intersection": ["a", "b", "c"], "size": 3} for r in results.values())
    assert sum(s.tag == service.Stage.HITS for s in net.sent) == 2


def test_intersection_is_refused_where_the_policy_says_no() -> None:
    sets = {"h0": ["a", "b", "c"], "h1": ["a", "b", "c"]}
    envs = {"h1": {"allow_set_intersection": False}}
    results, net = run_parties("intersection", sets, envs)
    refusal = results["h1"]
    assert isinstance(refusal, FdrtdError) and refusal.status == 403
    assert "allow_set_intersection = true" in refusal.message
    assert "party 'h1' ended the computation" in str(results["h0"])
    assert all(s.sender != "h1" for s in net.sent)  # h1 sent nothing at all
    # The size needs no switch.
    results, _ = run_parties("intersection_size", sets, envs)
    assert results == {"h0": {"size": 3}, "h1": {"size": 3}}


def test_only_the_intersector_sees_every_blinded_set() -> None:
    # With n > 2, whoever holds every F_j learns the sub-intersection sizes: here
    # that k1 and k2 share one item ("w") besides I. Only party 0 may get them.
    sets = {"k0": ["a", "b", "c", "u"], "k1": ["a", "b", "c", "w"], "k2": ["a", "b", "c", "w"]}
    results, net = run_parties("intersection", sets)
    assert all(r == {"intersection": ["a", "b", "c"], "size": 3} for r in results.values())
    final = [s for s in net.sent if s.tag.startswith(service.Stage.FINAL + ".")]
    assert {(s.sender, s.to) for s in final} == {("k1", "k0"), ("k2", "k0")}
    joint = [s for s in net.sent if s.tag.startswith(service.Stage.JOINT + ".")]
    assert {(s.sender, s.to) for s in joint} == {("k0", "k1"), ("k0", "k2")}
    assert all(len(s.value["points"]) == 3 * curve.POINT_BYTES for s in joint)


def test_the_intersection_size_goes_back_as_a_number_not_as_points() -> None:
    # holders get |I| alone: no holder can mark the points of I in the list it
    # holds, which an owner colluding with the holder of its list would map to items
    sets = {"k0": ["a", "b", "c", "u"], "k1": ["a", "b", "c", "w"], "k2": ["a", "b", "c", "w"]}
    results, net = run_parties("intersection_size", sets)
    assert all(r == {"size": 3} for r in results.values())
    joint = [s for s in net.sent if s.tag.startswith(service.Stage.JOINT)]
    assert {(s.sender, s.to) for s in joint} == {("k0", "k1"), ("k0", "k2")}
    assert all(s.value == {"size": 3} for s in joint)


@pytest.mark.parametrize("parties", [2, 3, 4, 5])
def test_the_intersection_matches_python_sets(parties: int) -> None:
    rng = random.Random(parties)
    common = [f"c{k}" for k in range(4)]
    # overlaps of every kind: all, some pairs, only one party
    sets = {
        f"q{j}": common
        + rng.sample([f"x{k}" for k in range(30)], 12)
        + [f"own{j}-{k}" for k in range(3)]
        for j in range(parties)
    }
    expected = sorted(set.intersection(*map(set, sets.values())))
    results, _ = run_parties("intersection", sets)
    assert all(r == {"intersection": expected, "size": len(expected)} for r in results.values())
    sizes, _ = run_parties("intersection_size", sets)
    assert all(r == {"size": len(expected)} for r in sizes.values())


def test_with_three_parties_the_intersector_blinds_only_the_candidates() -> None:
    # q1 and q2 share 4 items, of which 3 are also q0's: party 0 relays no list and
    # applies its scalar to the 4 candidates only, never to the rest of q1's or q2's items
    sets = {
        "q0": ["a", "b", "c", "u", "v"],
        "q1": ["a", "b", "c", "w", "y1", "z1"],
        "q2": ["a", "b", "c", "w", "y2", "z2", "t2"],
    }
    results, net = run_parties("intersection", sets)
    assert all(r == {"intersection": ["a", "b", "c"], "size": 3} for r in results.values())
    ring = [s for s in net.sent if s.tag.startswith(service.Stage.RING + ".")]
    assert not [s for s in ring if s.to == "q0"]  # q0 never blinds another's list whole
    assert {(s.sender, s.to) for s in ring} == {("q0", "q1"), ("q1", "q2"), ("q2", "q1")}
    # the lists of q1 and q2 carry only their scalars when they reach q0
    final = {s.tag.split(".")[1]: s for s in net.sent if s.tag.startswith(service.Stage.FINAL)}
    assert {
        tag: (s.sender, len(s.value["points"]) // curve.POINT_BYTES) for tag, s in final.items()
    } == {
        "0": ("q2", 5),
        "1": ("q2", 6),
        "2": ("q1", 7),
    }
    # each holder gets the intersection in the points of the lists it holds
    joint = {(s.to, s.tag.split(".")[1]) for s in net.sent if s.tag.startswith(service.Stage.JOINT)}
    assert joint == {("q2", "0"), ("q2", "1"), ("q1", "2")}


def test_routes_leave_party_zero_out_of_the_others_lists_only_from_three_parties() -> None:
    assert service.route(2, 0) == [0, 1] and service.route(2, 1) == [1, 0]
    assert service.route(3, 0) == [0, 1, 2]
    assert service.route(3, 1) == [1, 2] and service.route(3, 2) == [2, 1]
    assert service.route(5, 3) == [3, 4, 1, 2]
    for n in range(2, 8):
        for owner in range(n):
            path = service.route(n, owner)
            assert path[0] == owner and len(set(path)) == len(path)
            # nobody holds its own list, so no owner sees its blinded items in order
            assert path[-1] != owner


@pytest.mark.parametrize("parties", [2, 3])
def test_a_repeated_blinded_item_is_refused_naming_its_sender(parties: int) -> None:
    # a repeat used to shrink the result (n = 2) or blame an honest holder (n = 3)
    sets = {f"d{j}": ["a", "b", "c", "d", "e"] for j in range(parties)}
    cheat = "d1"

    def tamper(sender: str, to: str, tag: str, value: Any) -> Any:
        if sender == cheat and tag.startswith(service.Stage.RING + "."):
            blob = value["points"]
            return {"points": blob[:32] + blob[:32] + blob[64:]}
        return value

    own = {name: {"data": {"v": items}, "column": "v"} for name, items in sets.items()}
    results, _ = run_job(service.intersection, own, tamper=tamper)
    assert not [r for r in results.values() if not isinstance(r, BaseException)], results
    assert any(
        f"party '{cheat}' sent the same blinded item twice" in str(r) for r in results.values()
    )


def test_an_intersection_sent_in_endless_empty_chunks_is_refused() -> None:
    sets = {"e0": ["a", "b", "c"], "e1": ["a", "b", "c"]}

    def tamper(sender: str, to: str, tag: str, value: Any) -> Any:
        if tag.startswith(service.Stage.JOINT + "."):
            return {"points": b"", "more": True}
        return value

    own = {name: {"data": {"v": items}, "column": "v"} for name, items in sets.items()}
    results, _ = run_job(service.intersection, own, tamper=tamper)
    assert isinstance(results["e1"], ComputationFailed)
    assert "party 'e0' sent a malformed intersection message" in str(results["e1"])


@pytest.mark.parametrize("bad", [{"size": -1}, {"size": 99}, {"size": True}, "3"])
def test_a_malformed_intersection_size_names_the_intersector(bad: Any) -> None:
    sets = {"m0": ["a", "b", "c"], "m1": ["a", "b", "c"]}

    def tamper(sender: str, to: str, tag: str, value: Any) -> Any:
        return bad if tag == service.Stage.JOINT else value

    own = {name: {"data": {"v": items}, "column": "v"} for name, items in sets.items()}
    results, _ = run_job(service.intersection_size, own, tamper=tamper)
    assert isinstance(results["m1"], ComputationFailed)
    assert "party 'm0' sent a malformed intersection size" in str(results["m1"])


@pytest.mark.parametrize(
    ("function", "stage", "bad", "title"),
    [
        ("intersection", "hits", {"positions": np.zeros(1, np.int64)}, "list of intersection"),
        ("intersection", "hits", {"positions": np.zeros(3, np.uint32), "x": 1}, "list of"),
        ("intersection", "setup", {"size": 3}, "setup message"),
        ("intersection", "ring", {"points": b"\0" * 31}, "message"),
        ("union", "union", {"items": [b"\x01"], "more": "no"}, "union message"),
        ("union", "union", {"too_long": 1}, "union message"),
    ],
    ids=["hits dtype", "hits extra key", "setup missing key", "ring size", "union", "too long"],
)
def test_a_malformed_message_is_refused_naming_its_stage(
    function: str, stage: str, bad: Any, title: str
) -> None:
    sets = {"s0": ["a", "b", "c"], "s1": ["a", "b", "c"]}
    # the union goes out from the last party, every other message from the first here
    cheat, honest = ("s1", "s0") if stage == "union" else ("s0", "s1")

    def tamper(sender: str, to: str, tag: str, value: Any) -> Any:
        return bad if sender == cheat and tag.split(".")[0] == stage else value

    own = {name: {"data": {"v": items}, "column": "v"} for name, items in sets.items()}
    results, _ = run_job(getattr(service, function), own, tamper=tamper)
    assert isinstance(results[honest], ComputationFailed), results
    assert f"party '{cheat}' sent a malformed {title}" in str(results[honest])
    assert f"(stage '{stage}')" in str(results[honest])
