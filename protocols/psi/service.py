"""The ``psi`` microservice: private set intersection, its size, and set union.

Every function is one party's side of a protocol among n >= 2 servers (the
session's ``parties``, in the order every party was given). Each party's
input is a column of its own dataset (``data`` and ``column``); the items are
the column's distinct ids, by the one rule of every join
(:mod:`fdrtd_server.sdk.ids`): integers exactly, whole floats up to 2^53 as
integers (``1 == 1.0``), text as text; NaN and empty text are dropped, other
floats refused; text and numbers never match (``1 != "1"``). Semi-honest
servers are assumed: they follow the protocol and may try to learn more from
what they see.

Functions
    ``intersection``
        The sorted items that every party holds; every party returns the same.
    ``intersection_size``
        Only the number of such items; no party learns which they are.
    ``union``
        The sorted distinct items of all parties, without revealing which
        party holds which item.

Policy
    ``intersection`` runs only where the server's policy sets
    ``allow_set_intersection`` and ``union`` only where it sets
    ``allow_set_union`` (both off by default): their results are the parties'
    items. If any party's policy says no, that party refuses and every other
    party ends with "party '...' ended the computation" and the same 403.
    ``intersection`` and ``intersection_size`` obey the minimum cohort twice:
    each server refuses any party's set smaller than its own policy's
    ``min_cohort`` (``SETUP``), and every party refuses, alike and without a
    result, an intersection of fewer items than the strictest ``min_cohort``
    among the parties, an empty one included (after ``JOINT``). The empty
    one too, because otherwise "refused" against "0" would answer whether an
    item padded with junk is in the others' sets. What the rule cannot stop:
    two runs that differ in one item (a padded set of known members with and
    without a target) still tell whether the target is held.

Intersection (stages, a la Meadows 1986 and Huberman, Franklin, Hogg 1999)
    ``SETUP``: the parties exchange the function, the protocol version, their
    set sizes and their policies' minimum cohorts; each server refuses if any
    set is smaller than its policy's minimum cohort (a tiny set would turn
    the intersection into a membership test on the other parties' data).
    ``RING``: party ``i`` draws a fresh scalar ``a_i``, shuffles its items
    (secretly, so that positions mean nothing) and sends ``X25519(a_i, H(x))``
    for each to the next party of its list's route (:func:`route`); each party
    on the route applies its own scalar and keeps the order, in messages of
    8192 points (256 KiB). All lists travel at once, chunk by chunk, so every
    server is busy all the time. Party 0's list goes around the whole ring.
    With three or more parties, every other list goes around the ring
    *without* party 0, so it ends under the scalars of parties 1 to n-1 only
    (``K'``); with two, both lists go around the whole ring. The last party
    on a route holds that list fully blinded, in its owner's (shuffled)
    order; no route ends at its owner. ``FINAL``: every holder sends the
    lists it holds, sorted, to party 0, the intersector. Party 0 intersects
    the lists under ``K'`` (the candidates: the items of parties 1 to n-1
    in common), applies its own scalar to the candidates only, and intersects
    them with its own list under all scalars: ``I``. ``JOINT``: party 0
    sends ``I`` to every holder, as points of the lists it holds (under
    ``K'`` or under all scalars); each checks that ``I`` lies in what it
    holds, and all refuse if ``|I|`` is below the strictest minimum cohort.
    ``HITS`` (``intersection`` only): each holder tells each owner which
    positions of its list are in ``I``, and the owner maps them to its
    items.

    Why the candidates: a list must be under every scalar to be compared
    with party 0's, and with n parties that costs n X25519 operations an
    item. Only the items that parties 1 to n-1 have in common can be in
    ``I``, so party 0 blinds those alone: a three-party intersection of
    100,000 items each costs about 710,000 X25519 operations instead of
    900,000. Party 0 learns nothing it could not learn before: the sizes of
    the sub-intersections (those with its own set by taking its scalar off
    its own list, which it receives sorted), and ``I``.

    This differs from the textbook flow, where the owner gets its list back
    in order and maps the intersection itself: an owner that held its own
    ordered list *and* the others' could tell, for every one of its items,
    exactly which other parties hold it. Here only the holder has a list in
    order, and it does not know the owner's shuffle. Likewise only party 0
    sees the lists as sets: the others learn ``I`` and nothing of the
    sub-intersections.

Union (a decryption mix-net, Chaum 1981)
    ``SETUP`` also carries each party's fresh X25519 key and the common input
    ``max_item_bytes``, which all parties must give alike (default 256). Every
    party pads every item to the same ``max_item_bytes + 2`` bytes, whatever
    its own items are, so that no onion size (and no setup message) says
    anything about the party's items; an item longer than ``max_item_bytes``
    travels as an empty "too long" marker. Each padded item is wrapped in one
    sealed box per party, party 0's layer outermost. ``COLLECT``: everyone
    sends its onions to party 0. ``MIX``: party ``k`` peels its layer,
    shuffles with ``secrets.SystemRandom`` and passes the batch to ``k+1``;
    the last party removes the last layer, unpads, deduplicates and
    broadcasts the union (``UNION``), or, if it found a marker, that the
    union is refused: every party then fails alike with the same 400, and
    nobody learns whose item was too long. Every party checks that its own
    items are in the union.

What is revealed (threat model, message counts, cost: ``docs/protocols.md``)
    To the client: the result, or that it was refused. To every party: the
    result and every party's set size, and ``|I|`` even when the result is
    refused. With ``intersection`` and ``intersection_size`` and n > 2,
    party 0 (the intersector) also learns the sizes of the sub-intersections
    (``|S_1 & S_2|``, ... from the lists it sees as sets; ``|S_0 & S_1|``, ...
    by taking its scalar off its own list), which the minimum cohort does not
    bound, but not which items they contain. ``union``: the last party
    learns how many parties hold each item (for n = 2 that is the
    intersection); party 0 learns how many items each party sent (the set
    sizes, public anyway).

Timeouts
    Every wait is for one message, within the session timeout. In the ring a
    wait covers about one chunk of the sender's work (8192 items, under a
    second of CPU); the wait for ``JOINT`` covers the rest of the slowest
    party's ring, so with very unequal set sizes (millions against
    thousands) the session timeout must be raised.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import numpy as np
from nacl import bindings as sodium

from fdrtd_server.sdk import (
    COLUMN,
    DATA,
    BadRequest,
    CohortTooSmall,
    ComputationFailed,
    FdrtdError,
    Forbidden,
    Input,
    JobContext,
    Microservice,
    Namespace,
    Output,
    PeerSession,
    canonical_ids,
    curve,
    declare,
    distribution_version,
    receive_bytes,
    send_bytes,
    vet_inputs,
)
from fdrtd_server.sdk import stages as staged
from fdrtd_server.sdk.stages import Message

__all__ = [
    "CHUNK_POINTS",
    "DEFAULT_MAX_ITEM_BYTES",
    "MAX_ITEMS",
    "MAX_ITEM_BYTES",
    "PROTOCOL_VERSION",
    "IntersectionTooSmall",
    "Item",
    "Stage",
    "check_result_cohort",
    "column_items",
    "item_bytes",
    "pad_union_items",
    "parse_points",
    "route",
    "secret_shuffle",
    "service",
    "sort_key",
    "union_max_item_bytes",
]

Item = str | int | float | bytes
T = TypeVar("T")

PROTOCOL_VERSION = 3
"""Sent in the setup round; parties running different versions refuse to start."""

CHUNK_POINTS = 8192
"""Points per peer message: 256 KiB.

Well below the 1 MiB bus limit, and small enough to pipeline: the next party
starts on a chunk after about 0.6 s of CPU (8192 hashes), not after the
whole list.
"""

MAX_ITEMS = 2_000_000
"""Largest set a party may announce; bounds the memory a peer can make us use."""

MAX_ITEM_BYTES = 1024
"""Largest ``max_item_bytes`` a ``union`` may use (items travel, encrypted, in the mix-net)."""

DEFAULT_MAX_ITEM_BYTES = 256
"""``max_item_bytes`` of a ``union`` when the input does not give it.

Every party's onions are ``max_item_bytes + 2 + 48 n`` bytes, so a smaller
value (e.g. 32 for identifiers) makes a large union cheaper.
"""

_CHUNK_BYTES = 1024 * 1024
_TOO_LONG = b""  # the "too long" marker: no item encodes to the empty string
_INT_RANGE = (-(2**63), 2**64)  # integers msgpack carries; integral floats inside become int

service = Microservice(
    "psi",
    distribution_version("fdrtd", "0.1.0"),
    "Private set intersection, intersection size and union (commutative encryption, mix-net).",
    multiparty=True,
)
service.add_cleanup(curve.shutdown_pool)


class Stage(Namespace):
    """Names of the protocol stages; message tags start with them."""

    SETUP = "setup"
    RING = "ring"
    FINAL = "final"
    JOINT = "joint"
    HITS = "hits"
    COLLECT = "onion"
    MIX = "mix"
    UNION = "union"


_POINTS = Message.bytes(size="size")
"""Curve points, as many as the receiver expects (``size`` is their bytes)."""
_UNION_CHUNK = Message.map({"items": Message.list_of(Message.bytes()), "more": Message.flag()})


class Checked(Namespace):
    """The stages whose messages' forms are declared, checked on receipt (``sdk.stages``).

    Each has the tag of its :class:`Stage`; the onions of ``COLLECT`` and
    ``MIX`` travel by ``receive_bytes``, which knows their size.
    """

    SETUP = staged.Stage(
        Stage.SETUP,
        Message.map(
            {
                "size": Message.count(maximum=MAX_ITEMS),
                "min_cohort": Message.count(minimum=1),
            },
            open=True,  # function, version and what a function declares besides
        ),
        title="setup message",
    )
    UNION_SETUP = staged.Stage(
        Stage.SETUP,
        Message.map(
            {
                "key": Message.bytes(size=curve.POINT_BYTES),
                "max_item_bytes": Message.count(),
            },
            open=True,  # the setup's other keys, checked by SETUP
        ),
        title="union setup message",
    )
    RING = staged.Stage(Stage.RING, Message.map({"points": _POINTS}))
    FINAL = staged.Stage(Stage.FINAL, Message.map({"points": _POINTS, "more": Message.flag()}))
    JOINT_SIZE = staged.Stage(
        "joint size",
        Message.map({"size": Message.count(maximum="most")}),
        tag=Stage.JOINT,
        title="intersection size",
    )
    JOINT = staged.Stage(
        Stage.JOINT,
        Message.map(
            {
                "points": Message.bytes(
                    multiple=curve.POINT_BYTES, most=CHUNK_POINTS * curve.POINT_BYTES
                ),
                "more": Message.flag(),
            }
        ),
        title="intersection message",
    )
    HITS = staged.Stage(
        Stage.HITS,
        Message.map({"positions": Message.array(np.uint32, length="size")}),
        title="list of intersection positions",
    )
    UNION_FIRST = staged.Stage(
        Stage.UNION,
        Message.one_of(_UNION_CHUNK, Message.map({"too_long": Message.constant(True)})),
        title="union message",
    )
    UNION = staged.Stage(Stage.UNION, _UNION_CHUNK, title="union message")


# --- inputs -------------------------------------------------------------------------------


def column_items(values: np.ndarray[Any, Any], name: str = "column") -> list[Item]:
    """The distinct items of a column: its ids by the rule of every join (``canonical_ids``).

    Integers stay exact, whole floats up to 2^53 become ``int`` (so ``2.0``
    from a CSV file meets ``2`` from an integer array), text stays text;
    NaN and empty text are dropped. The same rule as the vertical joins of
    ``smpc``, so a set operation and a join of one column find the same matches.

    Args:
        values: A one-dimensional column.
        name: The column's name, for the error message.

    Returns:
        The distinct items, in no particular order.

    Raises:
        BadRequest: If the column is not one-dimensional integers, whole
            floats of magnitude at most 2^53, or text.
    """
    if values.ndim != 1:
        raise BadRequest("set operations need a column of single values, not a matrix")
    ids, _ = canonical_ids(values, name)
    return list(set(ids))


def sort_key(item: Item) -> tuple[int, Any]:
    """Sort numbers first (by value), then text, then bytes."""
    if isinstance(item, str):
        return (1, item)
    if isinstance(item, bytes):
        return (2, item)
    return (0, item)


async def _load_items(ctx: JobContext, inputs: dict[str, Any]) -> tuple[list[Item], list[bytes]]:
    """The party's distinct items in a secret random order, and their encodings."""
    dataset = await ctx.load_dataset(inputs.get("data"))
    name = inputs.get("column")
    column = dataset.column(name)
    return await asyncio.to_thread(_prepare_items, column, str(name))  # 0.3 s for 100k items


def _prepare_items(column: np.ndarray[Any, Any], name: str) -> tuple[list[Item], list[bytes]]:
    items = column_items(column, name)
    if len(items) > MAX_ITEMS:
        raise BadRequest(f"a set may hold at most {MAX_ITEMS} distinct items")
    items = secret_shuffle(items)  # positions must say nothing about items
    return items, [curve.encode_item(item) for item in items]


def secret_shuffle(items: list[T]) -> list[T]:
    """``items`` in a uniformly random order that nobody can predict.

    The items are sorted by fresh 128-bit keys from the operating system's
    CSPRNG, drawn in one call (``SystemRandom().shuffle`` makes one call per
    item: 0.2 s for 100,000 items). Two keys tie with probability below
    ``len(items)**2 / 2**129``; tied items keep their order, a bias far
    below any that could be observed.
    """
    keys = np.frombuffer(secrets.token_bytes(16 * len(items)), dtype=np.uint64).reshape(-1, 2)
    order = np.lexsort((keys[:, 1], keys[:, 0])) if len(items) else np.zeros(0, np.intp)
    return [items[k] for k in order.tolist()]


def _session(ctx: JobContext) -> PeerSession:
    spec = ctx.session
    if not spec:
        raise BadRequest(
            "this is a multi-party protocol: give a 'session' with an 'id' and the 'parties'"
        )
    parties = spec.get("parties")
    if (
        not isinstance(parties, list)
        or len(parties) < 2
        or len(set(map(str, parties))) != len(parties)
    ):
        raise BadRequest("the session's 'parties' must name at least two different servers")
    return PeerSession(
        ctx.bus, str(spec.get("id", "")), parties, ctx.env.server, ctx.env.session_timeout
    )


# --- messages -----------------------------------------------------------------------------


def parse_points(
    message: Any, count: int, sender: str, stage: staged.Stage = Checked.RING
) -> list[bytes]:
    """Check a ``{"points": bytes}`` message of ``stage``; split it into ``count`` 32-byte points.

    Only the shape is checked here (by the stage's form); :func:`curve.validate_points`
    or :func:`curve.reblind` check the points themselves.

    Args:
        message: The message as received.
        count: How many points the protocol expects in it.
        sender: The sending party, for the error message.
        stage: The message's stage (``RING`` or ``FINAL``).

    Returns:
        The points.

    Raises:
        ComputationFailed: If the message is not a map with ``count`` points.
    """
    checked = stage.check(sender, message, {"size": count * curve.POINT_BYTES})
    return _split_points(checked["points"])


def _split_points(blob: bytes) -> list[bytes]:
    size = curve.POINT_BYTES
    return [blob[k : k + size] for k in range(0, len(blob), size)]


def _chunk_counts(total: int, per_chunk: int = CHUNK_POINTS) -> list[int]:
    return [min(per_chunk, total - start) for start in range(0, total, per_chunk)]


async def _crypto(sender: str, function: Callable[..., T], *args: Any) -> T:
    """Run a blocking curve function in a thread; a bad point is the sender's fault."""
    try:
        return await asyncio.to_thread(function, *args)
    except ValueError as error:
        raise ComputationFailed(f"party '{sender}' sent invalid data: {error}") from None


async def _all(*jobs: Coroutine[Any, Any, None]) -> None:
    """Run jobs concurrently; on failure cancel the rest and raise the first real error."""
    try:
        async with asyncio.TaskGroup() as group:
            for job in jobs:
                group.create_task(job)
    except BaseExceptionGroup as failures:
        raise _first_error(failures) from None


def _first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        else:
            leaves.append(error)

    walk(group)
    # An abort from another party explains more than our own follow-up errors.
    for leaf in leaves:
        if isinstance(leaf, FdrtdError):
            return leaf
    return leaves[0]


async def _setup(
    ctx: JobContext, peers: PeerSession, function: str, size: int, extra: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Stage SETUP: agree on function and version, learn sizes and minimum cohorts.

    Every party declares its policy's ``min_cohort`` (as the ``smpc`` functions
    do), so that all of them apply the same, strictest, minimum to the result
    (:func:`check_result_cohort`). Each server also refuses any party's set
    that is smaller than its own policy's minimum.
    """
    if size < ctx.env.min_cohort:
        raise CohortTooSmall(ctx.env.min_cohort)
    mine = declare(ctx, function=function, version=PROTOCOL_VERSION, size=size, **extra)
    received = await staged.StagedPeers(peers).exchange(Checked.SETUP, mine)
    for message in received.values():
        if message.get("function") != function or message.get("version") != PROTOCOL_VERSION:
            raise ComputationFailed(
                "the parties disagree on the function or protocol version; every party "
                "must run the same psi function of the same fdrtd version"
            )
    vet_inputs(received)  # before anything but the setup: every party alike
    for party in peers.others:
        if received[party]["size"] < ctx.env.min_cohort:
            raise Forbidden(
                f"party '{party}' brings fewer items than the minimum cohort of "
                f"{ctx.env.min_cohort} that this server's policy requires; a set that small "
                "would reveal whether single items are in this server's data"
            )
    return received


class IntersectionTooSmall(CohortTooSmall):
    """An intersection holds fewer items than the strictest party's minimum cohort (403)."""

    def __init__(self, minimum: int, holder: str) -> None:
        Forbidden.__init__(
            self,
            f"the intersection holds fewer items than the minimum cohort of {minimum} "
            f"(set by party '{holder}', the strictest policy among the parties), so no "
            "party returns it: a result that small would tell whether single items are in "
            "the parties' data",
        )
        self.minimum = minimum


def check_result_cohort(received: dict[str, dict[str, Any]], size: int) -> None:
    """Refuse an intersection smaller than the strictest party's minimum cohort.

    Every party has the same declarations (from :func:`_setup`) and the same
    ``size``, so every party refuses by itself, at the same point, and no
    party returns anything. An empty intersection is refused too: if it were
    returned, a set of junk items plus one target would answer "is the target
    held?" by a refusal against a 0.

    Args:
        received: Every party's setup message, ours included (each holds the
            ``min_cohort`` its policy sets, checked by :func:`_setup`).
        size: The number of items in the intersection.

    Raises:
        CohortTooSmall: If ``size`` is below the largest declared minimum.
    """
    # The first party (in session order) with the largest minimum is named, the
    # same on every party.
    declared = {party: int(message["min_cohort"]) for party, message in received.items()}
    strictest = max(declared.values())
    if size >= strictest:
        return
    holder = next(party for party, m in declared.items() if m == strictest)
    error = IntersectionTooSmall(strictest, holder)
    error.collective = True  # every party sees the same size and policies: no abort needed
    raise error


# --- intersection -------------------------------------------------------------------------


def _domain(peers: PeerSession) -> bytes:
    return b"fdrtd-psi/v1/" + peers.id.encode()


def route(n: int, owner: int) -> list[int]:
    """The parties that blind ``owner``'s list, in order, the owner first.

    Party 0's list goes around the whole ring. With three or more parties,
    every other list goes around the ring *without* party 0 (the
    intersector): it ends under the scalars of parties 1 to n-1 only, and
    party 0 applies its scalar only to the items in every one of those lists
    (the candidates), never to the rest. With two parties that would leave
    party 1 holding its own list in its own order, so both lists go around
    the whole ring.
    """
    if n < 3 or owner == 0:
        return [(owner + k) % n for k in range(n)]
    others = list(range(1, n))
    start = others.index(owner)
    return others[start:] + others[:start]


def _holder(n: int, owner: int) -> int:
    """The party that applies the last scalar to ``owner``'s list and so holds it."""
    return route(n, owner)[-1]


async def _ring(
    peers: PeerSession, scalar: bytes, encoded: list[bytes], sizes: list[int]
) -> dict[int, list[bytes]]:
    """Stage RING; returns the lists this party holds fully blinded, by owner, in their order."""
    n, me = len(peers.parties), peers.index
    domain = _domain(peers)
    held: dict[int, list[bytes]] = {}

    async def forward(owner: int, applied: int, k: int, points: list[bytes]) -> None:
        path = route(n, owner)
        if applied == len(path):  # the last scalar: this party holds owner's list
            held.setdefault(owner, []).extend(points)
        else:
            tag = f"{Stage.RING}.{owner}.{applied}.{k}"
            await peers.send(peers.parties[path[applied]], tag, {"points": b"".join(points)})

    async def own() -> None:
        for k, start in enumerate(range(0, len(encoded), CHUNK_POINTS)):
            chunk = encoded[start : start + CHUNK_POINTS]
            points = await asyncio.to_thread(curve.hash_and_blind, chunk, scalar, domain)
            await forward(me, 1, k, points)

    async def relay(owner: int) -> None:
        path = route(n, owner)
        applied = path.index(me)  # scalars on the list when it reaches us
        before = peers.parties[path[applied - 1]]
        seen: set[bytes] = set()
        for k, count in enumerate(_chunk_counts(sizes[owner])):
            message = await peers.recv(before, f"{Stage.RING}.{owner}.{applied}.{k}")
            points = parse_points(message, count, before)
            # a set's items blind to distinct points: a repeat would shrink the result
            seen.update(points)
            if len(seen) != k * CHUNK_POINTS + len(points):
                raise ComputationFailed(f"party '{before}' sent the same blinded item twice")
            await forward(
                owner, applied + 1, k, await _crypto(before, curve.reblind, points, scalar)
            )

    relayed = [owner for owner in range(n) if owner != me and me in route(n, owner)]
    await _all(own(), *(relay(owner) for owner in relayed))
    return held


async def _send_sorted(peers: PeerSession, to: str, tag: str, points: list[bytes]) -> None:
    """Send points sorted, in chunks, with a flag on each saying whether more follow."""
    ordered = sorted(points)
    chunks = range(0, max(1, len(ordered)), CHUNK_POINTS)
    for k, start in enumerate(chunks):
        blob = b"".join(ordered[start : start + CHUNK_POINTS])
        await peers.send(to, f"{tag}.{k}", {"points": blob, "more": k < len(chunks) - 1})


async def _final(
    peers: PeerSession,
    held: dict[int, list[bytes]],
    sizes: list[int],
    scalar: bytes,
    *,
    reveal: bool,
) -> tuple[int, dict[int, set[bytes]]]:
    """Stage FINAL: the held lists go sorted to party 0, which intersects; JOINT: ``I`` back.

    Returns ``|I|`` and, for each list this party holds, the intersection as
    points of that list (only if ``reveal``: ``intersection_size`` sends the
    size alone, so that no holder can mark the points of ``I`` in the list it
    holds). Only party 0 sees the lists (as sets), and so the sizes of the
    sub-intersections among the lists it sees; every other party gets the
    intersection alone, and checks that it lies in what it holds.
    """
    n, me = len(peers.parties), peers.index
    intersector = peers.parties[0]
    if me != 0:
        for owner, points in held.items():
            await _send_sorted(peers, intersector, f"{Stage.FINAL}.{owner}", points)
        if not reveal:
            message = await staged.StagedPeers(peers).recv(
                intersector, Checked.JOINT_SIZE, most=min(sizes)
            )
            return int(message["size"]), {}
        joint: dict[int, set[bytes]] = {}
        for owner, points in sorted(held.items()):
            received = await _receive_joint(peers, intersector, owner, sizes[owner])
            if not received <= set(points):
                raise ComputationFailed(
                    f"party '{intersector}' sent an intersection that is not in every party's set"
                )
            joint[owner] = received
        sizes_seen = {len(points) for points in joint.values()}
        if len(sizes_seen) != 1:
            raise ComputationFailed(f"party '{intersector}' sent intersections of different sizes")
        return sizes_seen.pop(), joint

    lists: dict[int, set[bytes]] = {owner: set(points) for owner, points in held.items()}

    async def collect(owner: int) -> None:
        sender = peers.parties[_holder(n, owner)]
        points: list[bytes] = []
        for k, count in enumerate(_chunk_counts(sizes[owner])):
            message = await peers.recv(sender, f"{Stage.FINAL}.{owner}.{k}")
            points.extend(parse_points(message, count, sender, Checked.FINAL))
        await _crypto(sender, curve.validate_points, points)
        # Sorted and distinct: positions carry nothing, and no point counts twice.
        if any(a >= b for a, b in itertools.pairwise(points)):
            raise ComputationFailed(f"party '{sender}' sent a blinded set that is not sorted")
        lists[owner] = set(points)

    await _all(*(collect(owner) for owner in range(n) if _holder(n, owner) != 0))
    full = [owner for owner in range(n) if len(route(n, owner)) == n]  # under every scalar
    partial = sorted(set(range(n)) - set(full), key=lambda owner: len(lists[owner]))
    by_owner: dict[int, set[bytes]] = {}
    if partial:
        # the lists without our scalar: only the items in all of them get it
        candidates = sorted(lists[partial[0]].intersection(*(lists[o] for o in partial[1:])))
        blinded = await _crypto(intersector, curve.reblind, candidates, scalar)
        back = dict(zip(blinded, candidates, strict=True))
        common = set(back).intersection(*(lists[o] for o in full))
        for owner in partial:
            by_owner[owner] = {back[point] for point in common}
    else:
        ordered_full = sorted(full, key=lambda owner: len(lists[owner]))
        common = lists[ordered_full[0]].intersection(*(lists[o] for o in ordered_full[1:]))
    for owner in full:
        by_owner[owner] = common
    if not reveal:
        await peers.broadcast(Stage.JOINT, {"size": len(common)})
        return len(common), {}
    sends = [
        _send_sorted(
            peers, peers.parties[_holder(n, owner)], f"{Stage.JOINT}.{owner}", list(points)
        )
        for owner, points in by_owner.items()
        if _holder(n, owner) != 0
    ]
    await _all(*sends)
    return len(common), {owner: by_owner[owner] for owner in held}


async def _receive_joint(peers: PeerSession, sender: str, owner: int, most: int) -> set[bytes]:
    """Stage JOINT on the receiving side: ``I``, sorted, at most ``most`` points."""
    points: list[bytes] = []
    k, more = 0, True
    while more:
        if k > most // CHUNK_POINTS:  # more chunks than an intersection of `most` needs
            raise ComputationFailed(f"party '{sender}' sent more points than the intersection has")
        message = await staged.StagedPeers(peers).recv(sender, Checked.JOINT, owner, k)
        blob, flag = message["points"], message["more"]
        # every chunk but the last is full
        if flag and len(blob) != CHUNK_POINTS * curve.POINT_BYTES:
            raise ComputationFailed(f"party '{sender}' sent a malformed intersection message")
        points.extend(_split_points(blob))
        if len(points) > most:
            raise ComputationFailed(f"party '{sender}' sent more points than the intersection has")
        more, k = flag, k + 1
    if any(a >= b for a, b in itertools.pairwise(points)):
        raise ComputationFailed(f"party '{sender}' sent an intersection that is not sorted")
    return set(points)


async def _hits(
    peers: PeerSession,
    held: dict[int, list[bytes]],
    joint: dict[int, set[bytes]],
    size: int,
    items: list[Item],
) -> list[Item]:
    """Stage HITS: tell each owner of a list we hold its positions in ``I``; learn ours."""
    n, me = len(peers.parties), peers.index
    for owner, points in held.items():
        common = joint[owner]
        positions = np.array([k for k, p in enumerate(points) if p in common], dtype=np.uint32)
        await peers.send(peers.parties[owner], Stage.HITS, {"positions": positions})
    before = peers.parties[_holder(n, me)]
    message = await staged.StagedPeers(peers).recv(before, Checked.HITS, size=size)
    ours = message["positions"]
    if (ours.size and int(ours.max()) >= len(items)) or np.unique(ours).size != ours.size:
        raise ComputationFailed(f"party '{before}' sent malformed intersection positions")
    return sorted((items[int(k)] for k in ours), key=sort_key)


async def _run_intersection(
    ctx: JobContext, inputs: dict[str, Any], *, reveal_items: bool
) -> dict[str, Any]:
    function = "intersection" if reveal_items else "intersection_size"
    async with _session(ctx) as peers:
        # Inside the session: if our input is refused, the others hear it at once.
        if reveal_items:
            ctx.env.require(
                "allow_set_intersection",
                "set intersections",
                "an intersection discloses the items that every party holds",
            )
        items, encoded = await _load_items(ctx, inputs)
        received = await _setup(ctx, peers, function, len(items), {})
        sizes = [received[party]["size"] for party in peers.parties]
        await ctx.progress(0.05)
        scalar = curve.random_scalar()
        held = await _ring(peers, scalar, encoded, sizes)
        await ctx.progress(0.8)
        size, joint = await _final(peers, held, sizes, scalar, reveal=reveal_items)
        # Before HITS: a refused intersection must not reach its owners' items.
        check_result_cohort(received, size)
        if not reveal_items:
            return {"size": size}
        await ctx.progress(0.95)
        found = await _hits(peers, held, joint, size, items)
    return {"intersection": found, "size": len(found)}


_SIZE = Output("size", "integer", "the number of items in the result")


@service.job(
    "intersection",
    inputs=[DATA, COLUMN],
    outputs=[Output("intersection", "array", "the items every party holds, sorted"), _SIZE],
    policy=["allow_set_intersection"],
)
async def intersection(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """The items that every party holds, sorted (numbers first, then text).

    Runs only where the server's policy sets ``allow_set_intersection``.
    Inputs: ``data``; ``column`` (optional if the dataset has one column).
    Returns ``{"intersection": [...], "size": k}``; every party returns the same.
    Every party refuses if ``k`` is below the strictest minimum cohort.
    """
    return await _run_intersection(ctx, inputs, reveal_items=True)


@service.job("intersection_size", inputs=[DATA, COLUMN], outputs=[_SIZE])
async def intersection_size(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """How many items every party holds; no party learns which.

    Inputs: ``data``; ``column``. Returns ``{"size": k}``. Every party refuses
    if ``k`` is below the strictest minimum cohort.
    """
    return await _run_intersection(ctx, inputs, reveal_items=False)


# --- union --------------------------------------------------------------------------------


def item_bytes(encoded: bytes) -> int:
    """The size of an item that ``max_item_bytes`` bounds, from its encoding.

    Text counts its UTF-8 bytes, integers their decimal digits (and sign),
    floats 8: the encoding of :func:`curve.encode_item` without its type tag.
    """
    return len(encoded) - 1


def union_max_item_bytes(inputs: dict[str, Any]) -> int:
    """The ``max_item_bytes`` input of a ``union``, checked; the default if not given.

    Raises:
        BadRequest: If it is not an integer from 1 to :data:`MAX_ITEM_BYTES`.
    """
    value = inputs.get("max_item_bytes", DEFAULT_MAX_ITEM_BYTES)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_ITEM_BYTES:
        raise BadRequest(f"'max_item_bytes' must be an integer from 1 to {MAX_ITEM_BYTES}")
    return value


def pad_union_items(encoded: Sequence[bytes], max_item_bytes: int) -> list[bytes]:
    """Pad every encoded item to ``max_item_bytes + 2`` bytes: one length for every party.

    The length depends on the common input only, never on this party's items,
    so nobody can link an item's length to the party that sent it. An item
    longer than ``max_item_bytes`` is replaced by the "too long" marker (the
    empty string, which no item encodes to); the last mix-net party finds the
    marker, without knowing whose it was, and every party then refuses.

    Args:
        encoded: Items encoded by :func:`curve.encode_item`.
        max_item_bytes: The common bound (see :func:`item_bytes`).

    Returns:
        The padded items (or markers), in the input order.
    """
    length = max_item_bytes + 2  # the type tag and the padding mark
    return [
        curve.pad_item(_TOO_LONG if item_bytes(e) > max_item_bytes else e, length) for e in encoded
    ]


def _too_long(max_item_bytes: int) -> BadRequest:
    error = BadRequest(
        f"an item of some party is longer than 'max_item_bytes' ({max_item_bytes}; text "
        "counts its UTF-8 bytes, integers their digits, floats 8), so every party refuses "
        "the union; which party holds it stays hidden. Give every party the same larger "
        f"'max_item_bytes' (at most {MAX_ITEM_BYTES})"
    )
    error.collective = True  # every party hears it from the last party: no abort needed
    return error


def _valid_key(key: bytes) -> bool:
    try:
        curve.validate_points([key], workers=1)
    except ValueError:
        return False
    return True


async def _send_onions(peers: PeerSession, to: str, tag: str, onions: list[bytes]) -> None:
    await send_bytes(peers, to, tag, b"".join(onions))


async def _recv_onions(
    peers: PeerSession, sender: str, tag: str, count: int, size: int
) -> list[bytes]:
    """``count`` onions of ``size`` bytes each; the receiver knows both."""
    blob = await receive_bytes(peers, sender, tag, size=count * size)
    return [blob[k : k + size] for k in range(0, len(blob), size)]


def _decode_union_item(encoded: bytes) -> Item:
    value = curve.decode_item(encoded)
    if isinstance(value, int) and not _INT_RANGE[0] <= value < _INT_RANGE[1]:
        raise ValueError("an integer item is outside the 64-bit range")
    if not isinstance(value, int | str) or isinstance(value, bool):
        raise ValueError("an item is neither an integer nor text")
    return value


@service.job(
    "union",
    inputs=[
        DATA,
        COLUMN,
        Input(
            "max_item_bytes",
            "integer",
            "the longest item allowed, in bytes (every item travels padded to it); must agree",
            default=DEFAULT_MAX_ITEM_BYTES,
            minimum=1,
            maximum=MAX_ITEM_BYTES,
        ),
    ],
    outputs=[Output("union", "array", "the distinct items of all parties, sorted"), _SIZE],
    policy=["allow_set_union"],
)
async def union(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """The distinct items of all parties, sorted, hiding who holds which.

    Runs only where the server's policy sets ``allow_set_union``. Inputs:
    ``data``; ``column``; ``max_item_bytes`` (default 256, at most 1024; every
    party must give the same): the longest item allowed (see
    :func:`item_bytes`); every item travels padded to this length, and if any
    party's item is longer, every party refuses without saying whose it is.
    Returns ``{"union": [...], "size": k}``; every party returns the same. The
    last party of the session learns how many parties hold each item (see the
    module docstring).
    """
    async with _session(ctx) as peers:
        # Inside the session: if our input is refused, the others hear it at once.
        ctx.env.require(
            "allow_set_union", "set unions", "a union discloses every item of every party"
        )
        max_item_bytes = union_max_item_bytes(inputs)
        items, encoded = await _load_items(ctx, inputs)
        private_key = curve.random_scalar()  # an ephemeral X25519 key for this session only
        public_key = sodium.crypto_scalarmult_base(private_key)
        n, me = len(peers.parties), peers.index
        extra = {"key": public_key, "max_item_bytes": max_item_bytes}
        received = await _setup(ctx, peers, "union", len(items), extra)
        keys = []
        for party in peers.parties:
            key = Checked.UNION_SETUP.check(party, received[party], {})["key"]
            if not _valid_key(key):
                raise ComputationFailed(f"party '{party}' sent an invalid union key")
            keys.append(key)
        if any(received[party]["max_item_bytes"] != max_item_bytes for party in peers.parties):
            error = ComputationFailed(
                "the parties disagree on 'max_item_bytes'; every party must give the same "
                f"(default {DEFAULT_MAX_ITEM_BYTES})"
            )
            error.collective = True  # every party sees the same declarations: no abort needed
            raise error
        sizes = [received[party]["size"] for party in peers.parties]
        total, length = sum(sizes), max_item_bytes + 2
        await ctx.progress(0.05)

        # COLLECT: everyone's onions go to party 0; all of them have one size.
        padded = pad_union_items(encoded, max_item_bytes)
        onions = await asyncio.to_thread(curve.seal_onions, padded, keys)
        onion_size = length + n * curve.ONION_LAYER_BYTES
        collector = peers.parties[0]
        if me != 0:
            await _send_onions(peers, collector, Stage.COLLECT, onions)
        else:
            batches = [onions]
            for j in range(1, n):
                sender = peers.parties[j]
                batches.append(
                    await _recv_onions(peers, sender, Stage.COLLECT, sizes[j], onion_size)
                )
            onions = [onion for batch in batches for onion in batch]
        await ctx.progress(0.3)

        # MIX: party k peels, shuffles and passes on; the last one gets the items.
        last = peers.parties[n - 1]
        if me > 0:
            sender = peers.parties[me - 1]
            size = length + (n - me) * curve.ONION_LAYER_BYTES
            onions = await _recv_onions(peers, sender, f"{Stage.MIX}.{me}", total, size)
        try:
            inner = await asyncio.to_thread(_peel_and_shuffle, onions, private_key)
        except ValueError:
            # After party 0's shuffle nobody can tell whose onion it was.
            raise ComputationFailed("an onion in the mix-net does not decrypt") from None
        await ctx.progress(0.6)
        if me < n - 1:
            await _send_onions(peers, peers.parties[me + 1], f"{Stage.MIX}.{me + 1}", inner)
            found = await _receive_union(peers, last, total, max_item_bytes)
        else:
            try:
                distinct = {curve.unpad_item(p) for p in inner}
                if _TOO_LONG in distinct:
                    await peers.broadcast(f"{Stage.UNION}.0", {"too_long": True})
                    raise _too_long(max_item_bytes)
                values = sorted((_decode_union_item(e) for e in distinct), key=sort_key)
            except ValueError as error:
                raise ComputationFailed(f"an item in the mix-net is malformed: {error}") from None
            await _broadcast_union(peers, values)
            found = values
        if not set(items) <= set(found):
            raise ComputationFailed("the union misses items of this party; a party misbehaved")
    return {"union": found, "size": len(found)}


def _peel_and_shuffle(onions: list[bytes], private_key: bytes) -> list[bytes]:
    return secret_shuffle(curve.peel_onions(onions, private_key))


async def _broadcast_union(peers: PeerSession, values: list[Item]) -> None:
    encoded = [curve.encode_item(v) for v in values]
    chunks: list[list[bytes]] = [[]]
    used = 0
    for item in encoded:
        if chunks[-1] and used + len(item) + 8 > _CHUNK_BYTES:
            chunks.append([])
            used = 0
        chunks[-1].append(item)
        used += len(item) + 8
    for k, chunk in enumerate(chunks):
        await peers.broadcast(f"{Stage.UNION}.{k}", {"items": chunk, "more": k < len(chunks) - 1})


async def _receive_union(
    peers: PeerSession, sender: str, total: int, max_item_bytes: int
) -> list[Item]:
    values: list[Item] = []
    k, more = 0, True
    while more:
        stage = Checked.UNION_FIRST if k == 0 else Checked.UNION
        message = await staged.StagedPeers(peers).recv(sender, stage, k)
        if "too_long" in message:
            raise _too_long(max_item_bytes)
        chunk, more = message["items"], message["more"]
        try:
            values.extend(_decode_union_item(e) for e in chunk)
        except (ValueError, TypeError):
            raise ComputationFailed(f"party '{sender}' sent a malformed union item") from None
        if len(values) > total:
            raise ComputationFailed(f"party '{sender}' sent more union items than were sent in")
        k += 1
    if len(set(values)) != len(values):
        raise ComputationFailed(f"party '{sender}' sent a union with repeated items")
    return sorted(values, key=sort_key)
