"""Byte transfer between the parties of a session: long messages in pieces, sizes refused.

A peer message must stay below the bus payload limit, so a long byte string
(a list of curve points, a packed matrix, a batch of onions) travels in
pieces of :data:`PIECE_BYTES` under the tags ``<tag>.0``, ``<tag>.1``, ...;
every piece says how many pieces there are (``{"of": pieces, "data": part}``).

The receiver never lets the sender decide how much it reads. It gives the
``size`` it expects, when the protocol fixes it (a matrix of a known shape,
a list of as many points as the sender declared items), and then the number
of pieces and every piece's length follow from it; or a ``limit`` when only
a bound is known, and then the sender's announced count of pieces is refused
if the bound cannot hold that many, before any further piece is waited for.
A piece of another length, another announced count, or a missing piece
(which ends in the session's timeout, naming the sender) is refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from fdrtd_server.errors import ComputationFailed
from fdrtd_server.peers import PeerSession

__all__ = ["MAX_BYTES", "PIECE_BYTES", "receive_bytes", "send_bytes"]

PIECE_BYTES = 1 << 20
"""Bytes of data per peer message (1 MiB, well below the bus payload limit)."""
MAX_BYTES = 1 << 32
"""The default ``limit`` of :func:`receive_bytes` when the size is not known (4 GiB)."""
SEND_WINDOW = 4
"""Pieces of one transfer in flight at once, so that sealing, HTTP and storage overlap."""


def pieces_for(size: int) -> int:
    """How many pieces ``size`` bytes travel in (one, if empty)."""
    return max(1, -(-size // PIECE_BYTES))


async def send_bytes(peers: PeerSession, to: str | Sequence[str], tag: str, data: bytes) -> None:
    """Send ``data`` to one party (or each of several) in pieces of :data:`PIECE_BYTES`.

    Args:
        peers: The session.
        to: The receiving party, or a list of them.
        tag: The message tag; the pieces go under ``<tag>.<k>``.
        data: The bytes; the receiver reads them with :func:`receive_bytes`.
    """
    receivers = [to] if isinstance(to, str) else list(to)
    pieces = pieces_for(len(data))
    window = asyncio.Semaphore(SEND_WINDOW)

    async def send_piece(k: int) -> None:
        part = data[k * PIECE_BYTES : (k + 1) * PIECE_BYTES]
        async with window:
            await peers.broadcast(f"{tag}.{k}", {"of": pieces, "data": part}, to=receivers)

    await asyncio.gather(*(send_piece(k) for k in range(pieces)))


async def receive_bytes(
    peers: PeerSession,
    sender: str,
    tag: str,
    *,
    size: int | None = None,
    limit: int = MAX_BYTES,
) -> bytes:
    """Receive what :func:`send_bytes` sent: exactly ``size`` bytes, or at most ``limit``.

    Args:
        peers: The session.
        sender: The sending party.
        tag: The tag the sender used.
        size: The number of bytes the protocol expects, if it fixes it.
        limit: Otherwise, the most bytes to accept.

    Returns:
        The bytes.

    Raises:
        ComputationFailed: Naming ``sender`` and ``tag``, if it announces another
            number of pieces than ``size`` needs (or more than ``limit`` holds),
            or a piece is not bytes of the expected length; a piece that never
            comes ends in the session's timeout (``PartyTimeout``).
    """
    if size is not None and size < 0:
        raise ValueError("size must not be negative")

    def refuse(why: str) -> ComputationFailed:
        return ComputationFailed(f"party '{sender}' sent a malformed '{tag}' message: {why}")

    bound = size if size is not None else limit
    parts: list[bytes] = []
    received = 0
    pieces = pieces_for(size) if size is not None else None
    k = 0
    while pieces is None or k < pieces:
        message = await peers.recv(sender, f"{tag}.{k}")
        of = message.get("of") if isinstance(message, dict) else None
        data = message.get("data") if isinstance(message, dict) else None
        if not isinstance(of, int) or isinstance(of, bool) or not isinstance(data, bytes):
            raise refuse("not a piece of bytes")
        if pieces is None:
            # the sender's count, believed only as far as the limit allows
            if not 1 <= of <= pieces_for(limit):
                raise refuse(f"{of} pieces announced, more than {limit} bytes allow")
            pieces = of
        if of != pieces:
            raise refuse(f"{of} pieces announced instead of {pieces}")
        last = k == pieces - 1
        if size is not None:
            expected_ok = len(data) == min(PIECE_BYTES, size - k * PIECE_BYTES)
        else:
            expected_ok = len(data) == PIECE_BYTES or (last and len(data) < PIECE_BYTES)
        received += len(data)
        if not expected_ok or received > bound:
            raise refuse("a piece of the wrong length")
        parts.append(data)
        k += 1
    return b"".join(parts)
