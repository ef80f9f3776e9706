"""The id join of ``linear_regression_vertical``: DH-PSI around the ring of data parties.

The parties run in one event loop and talk through the in-memory peers of
``memory_peers``, which record every message a party receives, so that a
test can take a party's place afterwards and try what it could do with its
view: above all, test a guessed id of another party (which the earlier HMAC
join, with a key every data party held, allowed).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import numpy as np
import pytest
from memory_peers import SESSION, Peers, Wire, run_tasks

from fdrtd_server.errors import BadRequest, ComputationFailed
from fdrtd_server.sdk import curve
from fdrtd_server.sdk.join import join_ids

DOMAIN = b"fdrtd/join/test/" + hashlib.sha256(SESSION.encode()).hexdigest().encode()


def _keys(ids: list[str]) -> list[bytes]:
    return [curve.encode_item(i) for i in ids]


async def _join(
    peers: Any, holders: list[str], keys: list[bytes] | None, sizes: dict[str, int] | None = None
) -> tuple[int, Any]:
    """The SDK's join as the vertical regression runs it (minimum cohort 0)."""
    known = sizes or ({p: len(keys or []) for p in holders})
    return await join_ids(peers, holders, keys, sizes=known, min_cohort=0, domain=DOMAIN)


def _run(
    ids: dict[str, list[str] | None], holders: list[str]
) -> tuple[dict[str, tuple[int, Any]], dict[str, Peers], dict[str, bytes]]:
    """Run the join for every party; (results, the parties' views, their scalars)."""
    parties = list(ids)
    wire = Wire()
    peers = {name: Peers(wire, name, parties) for name in parties}
    scalars: dict[str, bytes] = {}
    draw = curve.random_scalar

    def recorded() -> bytes:
        task = asyncio.current_task()
        assert task is not None
        scalar = scalars[task.get_name()] = draw()
        return scalar

    async def one(name: str) -> tuple[int, Any]:
        keys = ids[name]
        sizes = {p: len(ids[p] or []) for p in holders}
        return await _join(peers[name], holders, None if keys is None else _keys(keys), sizes)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(curve, "random_scalar", recorded)
        results = run_tasks(parties, one)
    for outcome in results.values():
        if isinstance(outcome, BaseException):
            raise outcome
    return results, peers, scalars


IDS = {
    "alpha": [f"p{i}" for i in range(0, 60)],
    "beta": [f"p{i}" for i in range(20, 90)][::-1],
    "gamma": [f"p{i}" for i in range(10, 50)] + ["p95", "p97"],
}


def test_every_data_party_gets_its_rows_of_the_common_ids_in_one_order() -> None:
    results, _, _ = _run({**IDS, "helper": None}, ["alpha", "beta", "gamma"])
    common = set(IDS["alpha"]) & set(IDS["beta"]) & set(IDS["gamma"])
    assert {n for n, _ in results.values()} == {len(common)}
    assert results["helper"][1] is None  # a helper learns the count only
    joined = {
        name: [IDS[name][row] for row in rows]
        for name, (_, rows) in results.items()
        if rows is not None
    }
    assert set(joined["alpha"]) == common
    assert joined["alpha"] == joined["beta"] == joined["gamma"]  # the same records, same order


def test_two_data_parties_and_no_common_id() -> None:
    results, _, _ = _run({"a": ["x", "y", "z"], "b": ["y", "z", "w"]}, ["a", "b"])
    for name, ids in (("a", ["x", "y", "z"]), ("b", ["y", "z", "w"])):
        n, rows = results[name]
        assert n == 2 and sorted(ids[r] for r in rows) == ["y", "z"]
    results, _, _ = _run({"a": ["x"], "b": ["w"]}, ["a", "b"])
    assert results["a"][0] == results["b"][0] == 0


@pytest.mark.parametrize("party", ["alpha", "beta", "gamma"])
def test_no_party_can_test_a_guessed_id_of_another(party: str) -> None:
    """Everything a party can compute from a guess alone is absent from its view.

    From a guess g a party can compute H(g) and its own blinding of it; the
    tag of g needs every data party's scalar. (With the earlier HMAC join a
    party held the key, computed HMAC(key, g), and found it in the others'
    tag lists.)
    """
    _, peers, scalars = _run(dict(IDS), ["alpha", "beta", "gamma"])
    seen: set[bytes] = set()
    for _, _, value in peers[party].received:
        data = value.get("data", b"") if isinstance(value, dict) else b""
        seen.update(data[k : k + 32] for k in range(0, len(data), 32))
    assert seen, "the party received points"
    guesses = sorted(set().union(*IDS.values()) - set(IDS[party]))
    hashed = [curve.hash_to_point(curve.encode_item(g), DOMAIN) for g in guesses]
    computable = set(hashed) | set(curve.blind(hashed, scalars[party]))
    assert computable.isdisjoint(seen)
    # the guesses' full tags are there (for the ids in others' lists): the
    # party just cannot compute them
    full = hashed
    for name in ("alpha", "beta", "gamma"):
        full = curve.blind(full, scalars[name])
    if party == "alpha":  # the first holder receives every other holder's tags
        assert set(full) & seen


def test_a_repeated_id_is_refused_and_a_bad_point_names_its_sender() -> None:
    with pytest.raises(BadRequest, match="must not repeat"):
        asyncio.run(_join(Peers(Wire(), "a", ["a", "b"]), ["a", "b"], [b"x", b"x"]))  # type: ignore[arg-type]

    async def forged() -> None:
        wire = Wire()
        a = Peers(wire, "a", ["a", "b"])
        wire.boxes[("a", "b", "join.ring.1.0")].put_nowait({"data": b"\xff" * 32, "of": 1})
        await _join(a, ["a", "b"], [b"x"])  # type: ignore[arg-type]

    with pytest.raises(ComputationFailed, match="party 'b' sent invalid curve points"):
        asyncio.run(forged())


def test_rows_are_indices_into_the_callers_list() -> None:
    results, _, _ = _run({"a": ["k", "j", "i"], "b": ["i", "k"]}, ["a", "b"])
    _, rows = results["a"]
    assert isinstance(rows, np.ndarray) and rows.dtype == np.intp
    assert sorted(rows.tolist()) == [0, 2]


@pytest.mark.parametrize(
    "bad",
    [{"n": -1}, {"n": True}, {"refused": False}, {"n": 3, "refused": True}, [3], {}],
    ids=["negative", "bool", "refused false", "both", "not a map", "empty"],
)
def test_a_malformed_count_is_refused_naming_its_stage_and_sender(bad: Any) -> None:
    async def told() -> None:
        wire = Wire()
        wire.boxes[("c", "a", "join.count")].put_nowait(bad)
        listener = Peers(wire, "c", ["a", "b", "c"])
        await _join(listener, ["a", "b"], None, sizes={"a": 1, "b": 1})

    with pytest.raises(
        ComputationFailed, match=r"party 'a' sent a malformed record count \(stage 'join.count'\)"
    ):
        asyncio.run(told())
