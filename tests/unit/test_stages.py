"""The stage table: each message form refuses what is not its form, naming stage and sender.

A protocol receives through :class:`StagedPeers`, so a malformed message is
refused there with one error, before any protocol code sees it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from fdrtd_server.errors import ComputationFailed
from fdrtd_server.sdk.stages import Malformed, Message, Stage, StagedPeers

VECTOR = Message.uint64_vector(length="length")
MAP = Message.map({"v": VECTOR, "n": Message.count()}, optional={"note": Message.text()})
CASES: list[tuple[str, Message, dict[str, Any], Any, Any, str]] = [
    # name, form, expected sizes, a good value, a bad value, words of the refusal
    ("dtype", VECTOR, {"length": 2}, np.zeros(2, np.uint64), np.zeros(2, np.int64), "uint64"),
    ("length", VECTOR, {"length": 2}, np.zeros(2, np.uint64), np.zeros(3, np.uint64), "2 uint64"),
    (
        "matrix",
        VECTOR,
        {"length": 4},
        np.zeros(4, np.uint64),
        np.zeros((2, 2), np.uint64),
        "2 dimensions",
    ),
    ("not array", VECTOR, {"length": 1}, np.zeros(1, np.uint64), [0], "got list"),
    ("missing key", MAP, {"length": 1}, {"v": np.zeros(1, np.uint64), "n": 3}, {"n": 3}, "'v'"),
    (
        "extra key",
        MAP,
        {"length": 1},
        {"v": np.zeros(1, np.uint64), "n": 3, "note": "ok"},
        {"v": np.zeros(1, np.uint64), "n": 3, "x": 1},
        "unexpected key 'x'",
    ),
    (
        "wrong value",
        MAP,
        {"length": 1},
        {"v": np.zeros(1, np.uint64), "n": 0},
        {"v": np.zeros(1, np.uint64), "n": -1},
        "key 'n'",
    ),
    ("map type", MAP, {"length": 1}, {"v": np.zeros(1, np.uint64), "n": 0}, [1], "a map"),
    ("bytes size", Message.bytes(size="size"), {"size": 4}, b"abcd", b"abc", "4 bytes"),
    ("bytes type", Message.bytes(), {}, b"", "text", "expected bytes"),
    ("bytes most", Message.bytes(most="most"), {"most": 2}, b"ab", b"abc", "at most 2 bytes"),
    ("bytes multiple", Message.bytes(multiple=32), {}, b"\0" * 64, b"\0" * 33, "multiple of 32"),
    ("count bool", Message.count(), {}, 0, True, "an integer, got bool"),
    ("count float", Message.count(), {}, 7, 7.0, "an integer, got float"),
    ("count negative", Message.count(), {}, 0, -1, "at least 0"),
    ("count minimum", Message.count(minimum=1), {}, 1, 0, "at least 1"),
    ("count maximum", Message.count(maximum=3), {}, 3, 4, "at most 3"),
    ("flag", Message.flag(), {}, False, 0, "a bool"),
    ("list length", Message.list_of(Message.text(), length=2), {}, ["a", "b"], ["a"], "2 items"),
    ("list item", Message.list_of(Message.text()), {}, ["a"], ["a", 1], "item 1"),
    ("constant", Message.constant(True), {}, True, 1, "constant True"),
    (
        "one of",
        Message.one_of(Message.text(), Message.count()),
        {},
        3,
        b"x",
        "none of its 2 forms",
    ),
    (
        "required",
        Message.optional(Message.text(), required="needed"),
        {"needed": True},
        "x",
        None,
        "got none",
    ),
]


@pytest.mark.parametrize(
    ("form", "expected", "good", "bad", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_each_form_takes_its_form_and_refuses_another(
    form: Message, expected: dict[str, Any], good: Any, bad: Any, words: str
) -> None:
    form.check(good, expected)
    with pytest.raises(Malformed, match=words):
        form.check(bad, expected)


def test_an_optional_value_may_be_none_unless_required() -> None:
    form = Message.optional(Message.text(), required="needed")
    form.check(None, {"needed": False})
    Message.optional(Message.text()).check(None, {})


def test_a_size_not_given_when_receiving_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="'length='"):
        VECTOR.check(np.zeros(1, np.uint64), {})


def test_the_tag_is_the_prefix_and_the_suffix() -> None:
    assert Stage("sum", VECTOR).tag_for(7, 0) == "sum.7.0"
    assert Stage("sum with metadata", MAP, tag="sum").tag_for(7) == "sum.7"
    assert Stage("seeds", MAP).tag_for() == "seeds"


class Inbox:
    """A peer session holding one message per (sender, tag)."""

    me = "a"
    parties = ["a", "b", "c"]
    others = ["b", "c"]

    def __init__(self, messages: dict[tuple[str, str], Any]) -> None:
        self.messages = messages
        self.sent: list[tuple[str, str, Any]] = []

    async def send(self, to: str, tag: str, value: Any) -> None:
        self.sent.append((to, tag, value))

    async def broadcast(self, tag: str, value: Any, to: Any = None) -> None:
        for party in self.others if to is None else to:
            self.sent.append((party, tag, value))

    async def recv(self, sender: str, tag: str, *, patience: float = 1.0) -> Any:
        return self.messages[(sender, tag)]

    async def gather(self, tag: str, senders: Any = None) -> dict[str, Any]:
        return {s: self.messages[(s, tag)] for s in (self.others if senders is None else senders)}


STAGE = Stage("share", VECTOR, title="masked share")


def test_a_malformed_message_is_refused_naming_the_stage_and_the_sender() -> None:
    inbox = Inbox({("b", "share.3"): np.zeros(2, np.uint64), ("c", "share.3"): b"junk"})
    staged = StagedPeers(inbox)  # type: ignore[arg-type]
    assert asyncio.run(staged.recv("b", STAGE, 3, length=2)).size == 2
    with pytest.raises(ComputationFailed) as refused:
        asyncio.run(staged.exchange(STAGE, np.ones(2, np.uint64), 3, length=2))
    text = refused.value.message
    assert "party 'c' sent a malformed masked share (stage 'share')" in text
    assert "got bytes" in text and "junk" not in text


def test_exchange_checks_the_others_and_includes_ours() -> None:
    good = np.zeros(2, np.uint64)
    inbox = Inbox({("b", "share.1"): good, ("c", "share.1"): good})
    received = asyncio.run(
        StagedPeers(inbox).exchange(STAGE, np.ones(2, np.uint64), 1, length=2)  # type: ignore[arg-type]
    )
    assert list(received) == ["a", "b", "c"]
    assert [(to, tag) for to, tag, _ in inbox.sent] == [("b", "share.1"), ("c", "share.1")]
