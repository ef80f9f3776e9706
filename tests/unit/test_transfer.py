"""The one byte transfer of the SDK: the receiver knows or caps the size; a lying sender is refused.

The parties talk through the in-memory :class:`memory_peers.Wire`; a test
that plays a lying sender puts its pieces in the receiver's mailboxes by hand.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from memory_peers import Peers, Wire

from fdrtd_server.errors import ComputationFailed, PartyTimeout
from fdrtd_server.sdk import receive_bytes, send_bytes
from fdrtd_server.sdk.transfer import PIECE_BYTES

SIZES = [0, 1, PIECE_BYTES - 1, PIECE_BYTES, PIECE_BYTES + 1, 3 * PIECE_BYTES + 5]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("known", [True, False])
def test_what_is_sent_is_received(size: int, known: bool) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)

    async def go() -> bytes:
        wire = Wire()
        a, b = Peers(wire, "a", ["a", "b"]), Peers(wire, "b", ["a", "b"])
        await send_bytes(a, "b", "t", data)  # type: ignore[arg-type]
        if known:
            return await receive_bytes(b, "a", "t", size=size)  # type: ignore[arg-type]
        return await receive_bytes(b, "a", "t", limit=size)  # type: ignore[arg-type]

    assert asyncio.run(go()) == data


def test_one_transfer_reaches_several_parties() -> None:
    async def go() -> list[bytes]:
        wire = Wire()
        parties = ["a", "b", "c"]
        a = Peers(wire, "a", parties)
        await send_bytes(a, ["b", "c"], "t", b"xyz")  # type: ignore[arg-type]
        return [
            await receive_bytes(Peers(wire, p, parties), "a", "t", size=3)  # type: ignore[arg-type]
            for p in ("b", "c")
        ]

    assert asyncio.run(go()) == [b"xyz", b"xyz"]


def _received(pieces: list[Any], **expect: int) -> bytes:
    """What ``a`` reads of ``pieces`` that ``b`` put in its mailboxes under ``t.0``, ``t.1``..."""

    async def go() -> bytes:
        wire = Wire(wait=0.2)
        for k, piece in enumerate(pieces):
            wire.boxes[("a", "b", f"t.{k}")].put_nowait(piece)
        return await receive_bytes(Peers(wire, "a", ["a", "b"]), "b", "t", **expect)  # type: ignore[arg-type]

    return asyncio.run(go())


FULL = b"x" * PIECE_BYTES


@pytest.mark.parametrize(
    ("pieces", "expect", "why"),
    [
        # a sender announcing more pieces than the known size needs
        ([{"of": 9, "data": b"x" * 10}], {"size": 10}, "9 pieces announced instead of 1"),
        # ... or than the cap allows, refused before any further piece is waited for
        ([{"of": 1 << 20, "data": FULL}], {"limit": 2 * PIECE_BYTES}, "more than"),
        # a piece longer than the size, or too many bytes under the cap
        ([{"of": 1, "data": b"x" * 11}], {"size": 10}, "wrong length"),
        (
            [{"of": 2, "data": FULL}, {"of": 2, "data": b"x" * 2}],
            {"limit": PIECE_BYTES + 1},
            "wrong length",
        ),
        # a short piece in the middle, a count that changes, no bytes at all
        (
            [{"of": 2, "data": b"x"}, {"of": 2, "data": b"x"}],
            {"limit": 3 * PIECE_BYTES},
            "wrong length",
        ),
        (
            [{"of": 2, "data": FULL}, {"of": 3, "data": b"x"}],
            {"limit": 3 * PIECE_BYTES},
            "3 pieces",
        ),
        ([{"of": 1, "data": "text"}], {"size": 4}, "not a piece of bytes"),
        (["garbage"], {"limit": 10}, "not a piece of bytes"),
    ],
)
def test_a_lying_sender_is_refused(pieces: list[Any], expect: dict[str, int], why: str) -> None:
    with pytest.raises(ComputationFailed, match=f"party 'b' sent a malformed 't' message: .*{why}"):
        _received(pieces, **expect)


def test_a_missing_piece_ends_in_a_timeout_naming_the_sender() -> None:
    with pytest.raises(PartyTimeout, match="'b'"):
        _received([{"of": 2, "data": FULL}], size=PIECE_BYTES + 1)
