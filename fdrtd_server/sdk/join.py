"""The private join of record ids: Diffie-Hellman PSI around the ring of the parties that hold data.

Used by every vertical protocol (``linear_regression_vertical``,
``contingency_table_vertical``) to line up the records that several parties
hold different columns of, without showing any party an id it does not hold.
The ids are made canonical first (:mod:`fdrtd_server.sdk.ids`), so every
protocol joins the same column to the same records.

After Meadows (1986) and Huberman, Franklin and Hogg (1999): each holder
hashes its ids onto Curve25519 and blinds them with a secret scalar of its
own (:mod:`fdrtd_server.sdk.curve`), sorted so that the list hides the order
of its rows. The lists travel the ring of holders at the same time, each
holder blinding what it receives and passing it on, until every list comes
back to its owner blinded by every holder's scalar. The fully blinded tags
are equal exactly where the ids are; nobody can compute the tag of an id
without every holder's scalar, so no holder can test a guessed id. The other
holders send their tags (sorted) to the first, which intersects them with its
own and tells the other parties the size of the intersection, or only that
it is below the minimum cohort (then every party refuses). Only then, and
only if the cohort holds, does it send the common tags, sorted, to the other
holders: the common order of the joint records. So a holder learns which of
its ids are shared only when at least ``min_cohort`` are, and the first
holder alone learns which of its ids each other holder has (with three or
more holders, also the sizes of the overlaps among the others).

Every list a party receives has a size it knows in advance (each holder's
number of ids is declared before the join), so a peer cannot make it read
more (:func:`fdrtd_server.sdk.transfer.receive_bytes`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from fdrtd_server.errors import BadRequest, CohortTooSmall, ComputationFailed
from fdrtd_server.peers import PeerSession
from fdrtd_server.sdk import curve
from fdrtd_server.sdk.smpc import points_from
from fdrtd_server.sdk.stages import Message, Stage, StagedPeers
from fdrtd_server.sdk.transfer import receive_bytes, send_bytes

__all__ = ["MAX_IDS", "join_domain", "join_ids"]

MAX_IDS = 10_000_000
"""Most ids of one holder in a join (bounds what a peer can make another party read)."""


def join_domain(peers: PeerSession, what: str) -> bytes:
    """The hash-to-curve domain of one join, bound to the session and to ``what`` it joins."""
    return f"fdrtd/join/{what}/".encode() + hashlib.sha256(peers.id.encode()).hexdigest().encode()


def _collective(minimum: int) -> CohortTooSmall:
    error = CohortTooSmall(minimum)
    error.collective = True  # every party hears the same count: no abort needed
    return error


async def _points(peers: PeerSession, sender: str, tag: str, count: int) -> list[bytes]:
    blob = await receive_bytes(peers, sender, tag, size=count * curve.POINT_BYTES)
    return points_from(blob, sender, count)


_COUNT = Message.one_of(
    Message.map({"n": Message.count()}), Message.map({"refused": Message.constant(True)})
)
"""The first holder's count of common ids, or its refusal (too few)."""


async def _common_count(peers: PeerSession, sender: str, min_cohort: int, tag: str) -> int:
    """The first holder's count of common ids; its refusal becomes everyone's."""
    stage = Stage(f"{tag}.count", _COUNT, title="record count")  # under the join's own prefix
    checked = await StagedPeers(peers).recv(sender, stage)
    if "refused" in checked:
        raise _collective(min_cohort)
    count = int(checked["n"])
    if count < min_cohort:
        raise ComputationFailed(
            f"party '{sender}' sent a record count below the minimum cohort instead of refusing"
        )
    return count


async def join_ids(
    peers: PeerSession,
    holders: Sequence[str],
    items: Sequence[bytes] | None,
    *,
    sizes: Mapping[str, int],
    min_cohort: int,
    domain: bytes,
    tag: str = "join",
    tell: Sequence[str] | None = None,
) -> tuple[int, npt.NDArray[np.intp] | None]:
    """Join the holders' ids privately; the common records, in an order common to all holders.

    Every party in ``tell`` (and every holder) calls it alike; a party without
    data gives ``items=None`` and only hears the count.

    Args:
        peers: The session.
        holders: The parties that hold ids, in the same order on every party.
        items: This party's ids as canonical bytes
            (:func:`fdrtd_server.sdk.ids.id_bytes`), distinct; None at a
            party without data.
        sizes: Every holder's number of ids, declared before the join.
        min_cohort: The strictest minimum cohort: fewer common ids are refused.
        domain: The hash-to-curve domain (:func:`join_domain`).
        tag: The prefix of the join's message tags.
        tell: The parties besides the holders that hear the count (default: all).

    Returns:
        The number of common records and, at a holder, the indices of its own
        rows (into ``items``) for them in the common order; None elsewhere.

    Raises:
        BadRequest: If ``items`` repeats an id.
        CohortTooSmall: On every party alike, if fewer than ``min_cohort`` ids
            are common.
        ComputationFailed: Naming the sender, if a message is malformed.
    """
    me, first = peers.me, holders[0]
    for holder in holders:
        size = sizes.get(holder)
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_IDS:
            raise ComputationFailed(f"party '{holder}' declared a malformed number of ids")
    if items is None:
        return await _common_count(peers, first, min_cohort, tag), None
    if len(set(items)) != len(items):
        raise BadRequest("the id column must not repeat an id")
    if len(items) != sizes[me]:
        raise ValueError("sizes must give this party's own number of ids")
    ring_size, place = len(holders), holders.index(me)
    successor, predecessor = holders[(place + 1) % ring_size], holders[place - 1]
    scalar = curve.random_scalar()
    mine = await asyncio.to_thread(curve.hash_and_blind, list(items), scalar, domain)
    order = sorted(range(len(mine)), key=mine.__getitem__)  # hides the order of my rows
    await send_bytes(peers, successor, f"{tag}.ring.1", b"".join(mine[k] for k in order))
    for step in range(1, ring_size):
        # the list of holder (place - step), blinded by the holders in between
        owner = holders[(place - step) % ring_size]
        points = await _points(peers, predecessor, f"{tag}.ring.{step}", sizes[owner])
        try:
            points = await asyncio.to_thread(curve.reblind, points, scalar)
        except ValueError:
            raise ComputationFailed(f"party '{predecessor}' sent invalid curve points") from None
        await send_bytes(peers, successor, f"{tag}.ring.{step + 1}", b"".join(points))
    # my own list, back from the ring, blinded by every holder's scalar
    tags = await _points(peers, predecessor, f"{tag}.ring.{ring_size}", len(order))
    row_of = {point: order[k] for k, point in enumerate(tags)}
    if len(row_of) != len(tags):
        raise ComputationFailed(f"party '{predecessor}' sent a malformed list of points")
    others = [p for p in holders if p != me]
    if me == first:
        common = set(row_of)
        for party in others:
            common &= set(await _points(peers, party, f"{tag}.tags", sizes[party]))
        audience = [p for p in peers.others if tell is None or p in tell or p in holders]
        # the count (or a refusal) goes out before any common tag does
        if len(common) < min_cohort:
            await peers.broadcast(f"{tag}.count", {"refused": True}, to=audience)
            raise _collective(min_cohort)
        await peers.broadcast(f"{tag}.count", {"n": len(common)}, to=audience)
        ordered = sorted(common)
        await send_bytes(peers, others, f"{tag}.common", b"".join(ordered))
    else:
        await send_bytes(peers, first, f"{tag}.tags", b"".join(sorted(row_of)))
        count = await _common_count(peers, first, min_cohort, tag)
        ordered = await _points(peers, first, f"{tag}.common", count)
        if ordered != sorted(set(ordered)) or not set(ordered) <= row_of.keys():
            raise ComputationFailed(f"party '{first}' sent a malformed list of common ids")
    return len(ordered), np.array([row_of[point] for point in ordered], dtype=np.intp)
