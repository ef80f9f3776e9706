"""A protocol's view of its computation session: send to and receive from parties.

A :class:`PeerSession` is what a protocol microservice uses to talk to the
other parties of one computation. Outgoing messages go to the local peer
gateway: over NATS (``fdrtd.peer.out``), or by a direct call when the gateway
runs in the same process (the embedded default; see :class:`GatewayLink`).
Incoming ones reach the session through one :class:`PeerInbox` per process,
which the gateway feeds directly when the session is open in its own process
and otherwise over core NATS (``fdrtd.peer.in.<session>``), and which holds a
message that arrives before this party has even joined its session instead of
losing it.

Every wait has a deadline: :meth:`PeerSession.recv` raises
:class:`~fdrtd_server.errors.PartyTimeout` naming the party that did not
send in time. A party that is busy (blinding a million items, say) is told
apart from a dead one by its heartbeat: every open session sends a small
``alive`` message to each other party every :data:`HEARTBEAT` seconds, and
a wait runs out only after a whole timeout without any sign of life from
the party waited for (or after :data:`BUSY_TIMEOUTS` timeouts in all). When a party
fails, it tells the others (``abort``) so that they stop at once with a
message that names it, instead of waiting out their own timeouts.

A computation ends the same way on every party: a party that has its result
says so to every other (``end``) and keeps the result only once every other
party has said the same (see :meth:`PeerSession._confirm`).

When several processes run protocols for one server (``fdrtd-server worker``),
every one of them hears every peer message of the server, and only the one
that runs the session may keep it. Each learns from the record a session
leaves in the ``fdrtd_sessions`` bucket (see :meth:`PeerInbox._from_store`)
that a session runs elsewhere, or has ended, and then drops its messages
instead of holding them for a session it will never open.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import heapq
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import nats.errors
from nats.aio.msg import Msg
from nats.js.errors import KeyWrongLastSequenceError

from fdrtd_client import wire
from fdrtd_server.bus import (
    PEER_IN_PREFIX,
    PEER_OUT_SUBJECT,
    PEER_SEEDS_SUBJECT,
    SESSIONS_BUCKET,
    Bus,
)
from fdrtd_server.errors import (
    BadRequest,
    ComputationFailed,
    Conflict,
    FdrtdError,
    PartyTimeout,
    error_for_status,
)

__all__ = [
    "ABORT_TAG",
    "ALIVE_TAG",
    "END_TAG",
    "GatewayLink",
    "Incoming",
    "PeerInbox",
    "PeerSession",
    "both",
    "read_session_record",
    "session_record",
    "stop_reasons",
    "written_session_record",
]

log = logging.getLogger("fdrtd.peers")

A = TypeVar("A")
B = TypeVar("B")


_background: set[asyncio.Future[Any]] = set()
"""Tasks nobody waits for, kept referenced until they finish."""


def _log_failure(task: asyncio.Future[Any]) -> None:
    """Log the failure of a background write that nobody waits for."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not mark a peer session ended: %s", task.exception())


def _consume(task: asyncio.Future[Any]) -> None:
    """Collect a background task's outcome, so that nothing is logged as never retrieved."""
    if not task.cancelled():
        task.exception()


async def both(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Run two awaitables concurrently; the first failure cancels the other and is raised.

    Protocols send and receive in the same round: waiting for our messages to
    be delivered before listening for the others' would add a network round
    trip to every round, and a failed send must not wait for a receive timeout.
    """
    one = asyncio.ensure_future(first)
    two = asyncio.ensure_future(second)
    try:
        done, _ = await asyncio.wait({one, two}, return_when=asyncio.FIRST_EXCEPTION)
        for task in (one, two):
            if task in done and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return await one, await two
    finally:
        pending = {task for task in (one, two) if not task.done()}
        for task in pending:
            task.cancel()
            task.add_done_callback(_consume)
        if pending:
            # a NATS request may take a moment to notice its cancellation: never wait long
            await asyncio.wait(pending, timeout=1.0)


_STOP_REASONS: contextvars.ContextVar[list[FdrtdError] | None] = contextvars.ContextVar(
    "fdrtd_stop_reasons", default=None
)


def stop_reasons() -> list[FdrtdError]:
    """A list of reasons to stop, for this task and the tasks it starts from now on.

    An error put in it before the task is cancelled (a whole-job timeout, say)
    is what a session left by that cancellation tells the other parties
    (``abort``), so that they fail with it instead of waiting for this one.
    """
    reasons: list[FdrtdError] = []
    _STOP_REASONS.set(reasons)
    return reasons


ABORT_TAG = "abort"
ALIVE_TAG = "alive"
"""A session's heartbeat: the sending party is still working on the session."""
END_TAG = "end"
"""The last message of a session: the sending party has its result."""
RESERVED_TAGS = frozenset({ABORT_TAG, ALIVE_TAG, END_TAG})
"""Tags the session uses itself; a protocol cannot send them."""
ABORT_WAIT = 3.0
"""Seconds a failing party spends telling the others."""
HEARTBEAT = 5.0
"""Longest pause, in seconds, between two heartbeats of an open session (a third of
the session timeout when that is shorter)."""
BUSY_TIMEOUTS = 20
"""Session timeouts a wait lasts at most, heartbeats or not (10 minutes by default): a
party that keeps signalling life but never sends what is waited for (a hung job whose
event loop still runs, or a member that stalls on purpose) is given up after this long."""
GONE_KEEP = 600.0
"""Seconds an inbox remembers that a session runs in another process or has ended, after
the last message of it that it dropped (a running session's heartbeats keep it known)."""
GONE_LIMIT = 100_000
"""At most this many such sessions are remembered (the oldest are forgotten first)."""
INBOX_HOLD = 120.0
"""Seconds a message for a session not (yet) open in this process is kept."""
HOLD_MESSAGES_PER_SENDER = 1024
"""At most this many such messages are kept from any one sender."""
HOLD_BYTES_PER_SENDER = 128 * 1024 * 1024
"""At most this many bytes of such messages are kept from any one sender (each message
counts :data:`HOLD_OVERHEAD` bytes more than its payload); room for two of the largest
messages the gateway accepts."""
HOLD_SESSIONS_PER_SENDER = 64
"""Such messages are kept for at most this many distinct sessions of any one sender."""
HOLD_OVERHEAD = 512
"""Bytes each held message is counted for beyond its payload (its bookkeeping), so that
empty messages cannot be held without bound."""


class GatewayLink(Protocol):
    """The peer gateway as a protocol in the same process calls it, without NATS.

    Both methods take and return exactly the maps that travel on
    ``fdrtd.peer.out`` and ``fdrtd.peer.seeds`` (see
    :class:`fdrtd_server.gateway.Gateway`), so that the two ways are the same
    protocol; a direct call only saves the two bus hops of each message.
    """

    async def outgoing(self, request: dict[str, Any]) -> dict[str, Any]:
        """Seal and deliver one message; ``{"status", "detail"}``."""
        ...

    def seeds(self, request: dict[str, Any]) -> dict[str, Any]:
        """The pairwise seeds of a session; ``{"status", "seeds"}``."""
        ...


def session_record(parties: Sequence[str], worker: str, *, ended: bool = False) -> bytes:
    """The value a session leaves under its id in the ``fdrtd_sessions`` bucket.

    ``worker`` is the id of the :class:`PeerInbox` (one per process) that runs
    the session; ``ended`` is set once the session is over, so that messages
    for it are refused from then on, also after a restart.
    """
    record: dict[str, Any] = {"parties": list(parties), "worker": worker}
    if ended:
        record["ended"] = True
    return wire.packb(record)


def read_session_record(value: bytes) -> dict[str, Any] | None:
    """A record :func:`session_record` wrote, or None if ``value`` is not one."""
    try:
        record = wire.unpackb(value)
    except wire.WireError:
        return None
    return record if isinstance(record, dict) else None


def written_session_record(msg: Msg) -> tuple[str, dict[str, Any]] | None:
    """The (session id, record) a ``$KV.fdrtd_sessions.<id>`` message writes.

    None for a deletion, a purge, or anything that is not a record.
    """
    if msg.headers and msg.headers.get("KV-Operation"):
        return None
    record = read_session_record(msg.data)
    if record is None:
        return None
    return msg.subject[len(SESSIONS_BUCKET) + 5 :], record


@dataclass(frozen=True, slots=True)
class Incoming:
    """One verified peer message, as the gateway hands it on."""

    session: str
    sender: str
    tag: str
    seq: int
    payload: bytes
    ts: float = 0.0
    """When the sender sealed it (its envelope's timestamp, Unix time); 0 if unknown."""

    @classmethod
    def from_msg(cls, msg: Msg) -> Incoming:
        """Rebuild from a ``fdrtd.peer.in.<session>`` message (headers set by the gateway)."""
        headers = msg.headers or {}
        seq = headers.get("fdrtd-seq", "")
        try:
            ts = float(headers.get("fdrtd-ts", "0"))
        except ValueError:
            ts = 0.0
        return cls(
            session=msg.subject[len(PEER_IN_PREFIX) + 1 :],
            sender=headers.get("fdrtd-from", ""),
            tag=headers.get("fdrtd-tag", ""),
            seq=int(seq) if seq.isdigit() else -1,
            payload=msg.data,
            ts=ts,
        )

    def headers(self) -> dict[str, str]:
        """The NATS headers that carry everything but the payload and session."""
        return {
            "fdrtd-from": self.sender,
            "fdrtd-tag": self.tag,
            "fdrtd-seq": str(self.seq),
            "fdrtd-ts": repr(self.ts),
        }


@dataclass(slots=True, eq=False)
class _Held:
    """One message held for a session that is not open yet."""

    at: float
    message: Incoming
    size: int
    live: bool = True
    order: int = 0


@dataclass(slots=True)
class _Quota:
    """What one sender has in the holding area: messages, bytes, and per session."""

    messages: int = 0
    size: int = 0
    sessions: dict[str, int] = field(default_factory=dict)
    oldest: list[tuple[float, int, _Held]] = field(default_factory=list)
    """A heap of the sender's held messages by seal time (then arrival), lazily pruned."""


class PeerInbox:
    """Routes verified peer messages to the open sessions of this process.

    The gateway of the same process calls :meth:`route` itself for a session
    open here; every other message arrives on core NATS (``fdrtd.peer.in.>``,
    one plain subscription per process, made when the microservices start).

    Messages for sessions that are not open here yet (a fast party's first
    message can arrive before this party's own request) are held for
    :data:`INBOX_HOLD` seconds. Each sender has its own quota in the holding
    area (:data:`HOLD_MESSAGES_PER_SENDER`, :data:`HOLD_BYTES_PER_SENDER`,
    :data:`HOLD_SESSIONS_PER_SENDER`). When a sender's quota is full, its
    message sealed longest ago (by the sender's own clock, so skew between
    servers does not matter) gives way to a newer one: a replay of recorded
    messages, however many, can never push out what the sender sends now,
    and nothing held from another sender is ever pushed out, so a member that
    floods messages for made-up sessions loses only its own. Held messages
    are indexed by session, so opening a session touches only its own
    messages.

    Messages for a session that runs in another process of this server, or
    that has ended, are dropped at once: every process watches the session
    records of the ``fdrtd_sessions`` bucket (:meth:`_from_store`).

    A session id is routed to one session at a time: :meth:`open` refuses an
    id that is already open, and :meth:`close` removes only the session that
    opened it.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.id = secrets.token_hex(8)
        """This process's name in session records (random on every start)."""
        self.sessions: dict[str, PeerSession] = {}
        self.held: dict[str, deque[_Held]] = {}
        """Messages waiting for their session, by session id, oldest first."""
        self.dropped = 0
        """Messages dropped because their sender's holding quota was full."""
        self.discarded = 0
        """Messages dropped because their session runs elsewhere or has ended."""
        self.gateway: GatewayLink | None = None
        """The gateway of this process, if the microservices share its process."""
        self._arrivals: deque[_Held] = deque()
        self._quotas: dict[str, _Quota] = {}
        self._live = 0
        self._order = 0
        self._gone: dict[str, float] = {}
        """Sessions running elsewhere or ended, with when last heard of, oldest first."""
        self._warned: dict[str, float] = {}
        self._subscriptions: list[Any] = []
        self._started = asyncio.Lock()

    @classmethod
    async def of(cls, bus: Bus) -> PeerInbox:
        """The inbox of ``bus``, started on first use."""
        inbox: PeerInbox | None = getattr(bus, "_peer_inbox", None)
        if inbox is None:
            inbox = cls(bus)
            bus._peer_inbox = inbox  # type: ignore[attr-defined]
        await inbox.start()
        return inbox

    async def start(self) -> None:
        """Subscribe once: to peer messages, and to the session records."""
        async with self._started:
            if not self._subscriptions:
                self._subscriptions = [
                    await self.bus.nc.subscribe(f"{PEER_IN_PREFIX}.>", cb=self._from_bus),
                    await self.bus.nc.subscribe(f"$KV.{SESSIONS_BUCKET}.>", cb=self._from_store),
                ]

    async def _from_bus(self, msg: Msg) -> None:
        await self.route(Incoming.from_msg(msg))

    async def _from_store(self, msg: Msg) -> None:
        """A session record was written: forget sessions that run elsewhere or have ended."""
        written = written_session_record(msg)
        if written is None:
            return
        session_id, record = written
        worker = record.get("worker")
        if record.get("ended") is True or (isinstance(worker, str) and worker != self.id):
            self.forget(session_id)

    def forget(self, session_id: str) -> None:
        """Drop what is held for a session that runs in another process or has ended.

        Its later messages are dropped on arrival, until none has come for
        :data:`GONE_KEEP` seconds. A session open in this process is never
        forgotten.
        """
        if session_id in self.sessions:
            return
        self._note_gone(session_id)
        waiting = self.held.pop(session_id, None)
        for entry in waiting or ():
            self._release(entry)
            self.discarded += 1

    def _note_gone(self, session_id: str) -> None:
        """Remember (or renew) a session as gone; forget the stalest beyond the bounds."""
        now = time.monotonic()
        self._gone.pop(session_id, None)
        self._gone[session_id] = now
        while self._gone:
            first = next(iter(self._gone))
            if len(self._gone) <= GONE_LIMIT and self._gone[first] >= now - GONE_KEEP:
                break
            del self._gone[first]

    def is_open(self, session_id: str) -> bool:
        """Whether a session with this id runs in this process now."""
        return session_id in self.sessions

    def held_from(self, sender: str) -> tuple[int, int, int]:
        """(messages, bytes counted, sessions) held from ``sender`` now."""
        quota = self._quotas.get(sender)
        if quota is None:
            return 0, 0, 0
        return quota.messages, quota.size, len(quota.sessions)

    async def route(self, message: Incoming) -> None:
        """Deliver to the open session, or hold the message for a while."""
        session = self.sessions.get(message.session)
        if session is not None:
            await session.deliver(message)
            return
        if message.session in self._gone:
            self._note_gone(message.session)  # still in use elsewhere: keep knowing it
            self.discarded += 1
            return
        if message.tag == ALIVE_TAG:
            # a heartbeat only matters to an open session: holding one would only
            # push out the sender's real early messages
            return
        now = time.monotonic()
        self._expire(now)
        size = len(message.payload) + HOLD_OVERHEAD
        quota = self._quotas.get(message.sender)
        if quota is None:
            quota = self._quotas[message.sender] = _Quota()
        if not self._make_room(quota, message, size):
            self._drop(message, now)
            if not quota.messages:
                del self._quotas[message.sender]
            return
        # pushing out the sender's last message took its quota off the books: put it back
        self._quotas[message.sender] = quota
        self._order += 1
        entry = _Held(now, message, size, order=self._order)
        quota.messages += 1
        quota.size += size
        quota.sessions[message.session] = quota.sessions.get(message.session, 0) + 1
        heapq.heappush(quota.oldest, (message.ts, entry.order, entry))
        self.held.setdefault(message.session, deque()).append(entry)
        self._arrivals.append(entry)
        self._live += 1

    @staticmethod
    def _fits(quota: _Quota, message: Incoming, size: int) -> bool:
        return (
            quota.messages < HOLD_MESSAGES_PER_SENDER
            and quota.size + size <= HOLD_BYTES_PER_SENDER
            and (
                message.session in quota.sessions or len(quota.sessions) < HOLD_SESSIONS_PER_SENDER
            )
        )

    def _make_room(self, quota: _Quota, message: Incoming, size: int) -> bool:
        """Push out the sender's messages sealed before ``message`` until it fits.

        Returns False, pushing out nothing, if it cannot fit that way (it is
        larger than the quota, or older than what it would push out).
        """
        if size > HOLD_BYTES_PER_SENDER:
            return False
        if self._fits(quota, message, size):
            return True
        oldest = quota.oldest
        while oldest and not oldest[0][2].live:
            heapq.heappop(oldest)
        if not oldest or oldest[0][0] > message.ts:
            return False  # older than all the sender has here (a replay): nothing to push out
        # find the victims first, so that nothing is pushed out for a message that is dropped
        victims: list[_Held] = []
        messages, size_used, sessions = quota.messages, quota.size, dict(quota.sessions)
        for ts, _, entry in sorted(e for e in quota.oldest if e[2].live):
            if ts > message.ts:
                return False
            victims.append(entry)
            messages -= 1
            size_used -= entry.size
            left = sessions[entry.message.session] - 1
            if left:
                sessions[entry.message.session] = left
            else:
                del sessions[entry.message.session]
            if (
                messages < HOLD_MESSAGES_PER_SENDER
                and size_used + size <= HOLD_BYTES_PER_SENDER
                and (message.session in sessions or len(sessions) < HOLD_SESSIONS_PER_SENDER)
            ):
                break
        else:
            return False
        now = time.monotonic()
        for entry in victims:
            waiting = self.held[entry.message.session]
            waiting.remove(entry)
            if not waiting:
                del self.held[entry.message.session]
            self._release(entry)
            self._drop(entry.message, now)
        return True

    def _drop(self, message: Incoming, now: float) -> None:
        """Drop a message over its sender's quota; say so in the log, once a minute a sender."""
        self.dropped += 1
        if len(self._warned) > 1024:
            self._warned.clear()  # senders are members, but never let this table grow
        if self._warned.get(message.sender, -INBOX_HOLD) < now - 60.0:
            self._warned[message.sender] = now
            log.warning(
                "dropped a peer message from '%s' for session '%s', which is not open on "
                "this server: the sender has %d newer "
                "messages (%d bytes, %d sessions) waiting for sessions not open here",
                message.sender,
                message.session,
                *self.held_from(message.sender),
            )

    def _release(self, entry: _Held) -> None:
        """Give an entry's share of its sender's quota back."""
        entry.live = False
        self._live -= 1
        sender, session_id = entry.message.sender, entry.message.session
        quota = self._quotas[sender]
        quota.messages -= 1
        quota.size -= entry.size
        left = quota.sessions[session_id] - 1
        if left:
            quota.sessions[session_id] = left
        else:
            del quota.sessions[session_id]
        if not quota.messages:
            del self._quotas[sender]
        elif len(quota.oldest) > 2 * quota.messages + 64:
            quota.oldest = [item for item in quota.oldest if item[2].live]
            heapq.heapify(quota.oldest)

    def _expire(self, now: float) -> None:
        """Drop held messages older than :data:`INBOX_HOLD`, oldest first."""
        limit = now - INBOX_HOLD
        arrivals = self._arrivals
        while arrivals and (not arrivals[0].live or arrivals[0].at < limit):
            entry = arrivals.popleft()
            if not entry.live:
                continue  # taken by its session already
            # a session's messages arrived in the same order, so this one is its first
            waiting = self.held[entry.message.session]
            waiting.popleft()
            if not waiting:
                del self.held[entry.message.session]
            self._release(entry)
        if len(arrivals) > 2 * self._live + 1024:
            # entries taken by sessions linger here until they reach the front: compact
            self._arrivals = deque(entry for entry in arrivals if entry.live)

    async def open(self, session: PeerSession) -> None:
        """Route the session's messages to it, those held so far first.

        Raises:
            Conflict: If another session with the same id is open in this process.
        """
        current = self.sessions.get(session.id)
        if current is not None and current is not session:
            raise Conflict(
                f"session '{session.id}' is already running on this server; "
                "start every computation with a new session id"
            )
        self.sessions[session.id] = session
        self._gone.pop(session.id, None)
        self._expire(time.monotonic())
        waiting = self.held.pop(session.id, None)
        if waiting is None:
            return
        for entry in waiting:
            self._release(entry)
        for entry in waiting:
            await session.deliver(entry.message)

    def close(self, session: PeerSession) -> None:
        """Stop routing to the session (only if it is the one that opened its id)."""
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]


class PeerSession:
    """One party's end of a multi-party computation session.

    Args:
        bus: The microservice's bus connection.
        session_id: Shared by all parties of the computation.
        parties: The server names taking part, in an order all parties agree on.
        me: This server's name; must be in ``parties``.
        timeout: Seconds without any sign of life from a party before a wait
            for its message gives up (see :meth:`recv`).
    """

    def __init__(
        self, bus: Bus, session_id: str, parties: Sequence[str], me: str, timeout: float
    ) -> None:
        if me not in parties:
            raise BadRequest(f"this server ('{me}') is not one of the session's parties")
        self.bus = bus
        self.id = session_id
        self.parties = list(parties)
        self.me = me
        self.index = self.parties.index(me)
        self.others = [p for p in self.parties if p != me]
        self.timeout = timeout
        self._seq = 0
        self._inbox: dict[tuple[str, str], Any] = {}
        self._seen: set[tuple[str, int]] = set()
        self._arrived = asyncio.Condition()
        self._router: PeerInbox | None = None
        self._registered: asyncio.Future[None] | None = None
        self._closed = False
        self._aborted: tuple[str, str, int] | None = None
        self._heard: dict[str, float] = {}
        """When each party's last message (of any tag) arrived, monotonic time."""
        self._sent_to: dict[str, int] = {}
        """Messages each party's gateway has accepted from this one (heartbeats aside)."""
        self._received: dict[str, int] = {}
        """Messages taken from each party (heartbeats aside)."""
        self._claimed: dict[str, deque[int]] = {}
        """How many messages each party's last two heartbeats said it had sent to this one."""
        self._lost: dict[str, tuple[int, int]] = {}
        """Parties whose messages were lost on the way: (sent, received)."""
        self._pulse: asyncio.Task[None] | None = None
        self._record_made = False

    async def _register(self) -> None:
        """Record the session id as used, then open the session for its messages.

        Only the session that made the record is routed its id's messages: one
        that finds the id taken never touches the routing of the session that
        took it. Messages arriving in between are held by the inbox and handed
        over when the session opens.
        """
        try:
            worker = self._router.id if self._router is not None else ""
            try:
                await self.bus.sessions.create(self.id, session_record(self.parties, worker))
            except KeyWrongLastSequenceError:
                raise Conflict(
                    f"session '{self.id}' was already used on this server; "
                    "start every computation with a new session id"
                ) from None
            self._record_made = True
            if self._router is not None and not self._closed:
                await self._router.open(self)
        finally:
            # wake a receiver, so that a refusal ends its wait at once
            async with self._arrived:
                self._arrived.notify_all()

    async def __aenter__(self) -> PeerSession:
        # A session id is used once per server: masks are derived from it, so a
        # reused id would reuse masks. The id is recorded while the protocol
        # loads its data and derives its seeds; nothing is sent before the record
        # is made (see send), so a reused id can never put a masked value on the wire.
        self._router = await PeerInbox.of(self.bus)
        self._registered = asyncio.ensure_future(self._register())
        self._pulse = asyncio.ensure_future(self._heartbeat())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        try:
            await self._exit(exc)
        finally:
            # also when the exit itself is cancelled: a registration still under
            # way then never opens the session (see _register)
            self._closed = True
            self._stop_pulse()
            if self._router is not None:
                self._router.close(self)
            if self._record_made:
                self._record_end()

    def _stop_pulse(self) -> None:
        if self._pulse is not None:
            self._pulse.cancel()
            self._pulse.add_done_callback(_consume)
            self._pulse = None

    def _record_end(self) -> None:
        """Mark the session's record ended, in the background.

        From then on this server's gateway refuses the session's messages, also
        after a restart.
        """
        worker = self._router.id if self._router is not None else ""
        value = session_record(self.parties, worker, ended=True)
        task = asyncio.ensure_future(self.bus.sessions.put(self.id, value))
        _background.add(task)
        task.add_done_callback(_background.discard)
        task.add_done_callback(_log_failure)

    async def _heartbeat(self) -> None:
        """Tell every other party, now and then, that this session is still at work.

        The first heartbeat goes out only after a pause, so that the short
        computations, nearly all of them, send none.
        """
        pause = min(HEARTBEAT, self.timeout / 3)
        while self.others:
            await asyncio.sleep(pause)
            # each heartbeat says how many messages reached the receiver's gateway:
            # a receiver that took fewer knows that one was lost (see deliver)
            beats = [
                asyncio.ensure_future(
                    self._send(
                        party, ALIVE_TAG, {"sent": self._sent_to.get(party, 0)}, timeout=pause
                    )
                )
                for party in self.others
            ]
            for beat in beats:
                # a party that cannot be reached is named by the waits, not here
                beat.add_done_callback(_consume)
            await asyncio.wait(beats)

    async def _confirm(self) -> None:
        """The last round: tell every other party this one has its result, and hear theirs.

        Each ``end`` is delivered before :meth:`send` returns, so a party
        that keeps its result knows that every other party had its own and
        heard of this one's. A party that failed before this round tells the
        others (``abort``) instead, and they fail too: no party keeps a result
        that another party failed to compute. (A failure within this round
        itself, when a party can reach some parties and not others, can still
        split the outcome: no protocol of finitely many messages avoids that.)
        """
        await both(self._broadcast(END_TAG, None), self.gather(END_TAG))

    async def _exit(self, exc: BaseException | None) -> None:
        refused = None
        if self._registered is not None:
            await asyncio.wait([self._registered])
            if not self._registered.cancelled():
                refused = self._registered.exception()
        if refused is not None:
            # a reused session id: nothing was sent, and whatever happened since
            # is explained by the refusal, which is what every party reports
            raise refused from None
        failure: Exception | None = None
        if exc is None:
            try:
                await self._confirm()
            except Exception as error:
                exc = failure = error
        self._stop_pulse()
        reasons = _STOP_REASONS.get()
        if isinstance(exc, asyncio.CancelledError) and reasons:
            exc = reasons[0]  # stopped on purpose (a timeout): the others are told why
        # an error every party reaches by itself from the same public data
        # (a disagreement, a cohort too small) needs no abort message
        collective = getattr(exc, "collective", False)
        if (
            exc is not None
            and not isinstance(exc, asyncio.CancelledError)
            and self._aborted is None
            and not collective
        ):
            reason = getattr(exc, "message", None) or "internal error"
            status = getattr(exc, "status", 422)
            abort = {"reason": reason[:300], "status": status}
            # best effort, to every party independently, for at most ABORT_WAIT
            # seconds; a send still under way then is left to finish on its own
            sends = [
                asyncio.ensure_future(self._send(party, ABORT_TAG, abort, timeout=ABORT_WAIT))
                for party in self.others
            ]
            if sends:
                await asyncio.wait(sends, timeout=ABORT_WAIT)
            for sending in sends:
                sending.add_done_callback(_consume)
        if failure is not None:
            raise failure

    async def deliver(self, message: Incoming) -> None:
        """Take one message of this session from the inbox router.

        A message whose (sender, sequence number) this session has already
        taken is dropped: a replay can never feed a protocol twice, even one
        that the gateway no longer remembers (after a restart).
        """
        sender, tag = message.sender, message.tag
        if sender not in self.parties or sender == self.me:
            return
        if (sender, message.seq) in self._seen:
            return
        self._seen.add((sender, message.seq))
        # any message is a sign of life
        self._heard[sender] = time.monotonic()
        try:
            value = wire.unpackb(message.payload)
        except wire.WireError:
            value = {"reason": "a malformed message"}
            tag = ABORT_TAG
        if tag == ALIVE_TAG:
            self._check_heartbeat(sender, value)
            if sender in self._lost:
                async with self._arrived:
                    self._arrived.notify_all()
            return
        self._received[sender] = self._received.get(sender, 0) + 1
        async with self._arrived:
            if tag == ABORT_TAG:
                value = value if isinstance(value, dict) else {}
                # a policy refusal (403) or a timeout (504) means the same for
                # every party; anything else is this computation failing (422)
                status = value.get("status")
                status = status if status in (403, 504) else 422
                self._aborted = (sender, str(value.get("reason", "")), status)
            else:
                self._inbox.setdefault((sender, tag), value)
            self._arrived.notify_all()

    def _abort_error(self) -> FdrtdError:
        """The error of the party that aborted the session (its status: 403, 422, 504...)."""
        assert self._aborted is not None
        party, reason, status = self._aborted
        return error_for_status(status, f"party '{party}' ended the computation: {reason}")

    async def _ended_by(self, party: str, detail: str) -> FdrtdError:
        """The error to report when ``party`` refuses a message because its session ended.

        A party that fails tells the others why before it closes the session,
        so its ``abort`` is here already or about to be: that reason, the
        same every party reports, is the one to give.
        """
        async with self._arrived:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._arrived.wait_for(lambda: self._aborted is not None), ABORT_WAIT
                )
        if self._aborted is not None:
            return self._abort_error()
        return ComputationFailed(detail or f"party '{party}' has ended the computation")

    def _check_heartbeat(self, sender: str, beat: Any) -> None:
        """Note a message lost on its way from ``sender``, as its heartbeats tell.

        A heartbeat says how many messages the sender's gateway had delivered
        to this server when it was sent. Messages of one sender reach the
        session in the order they were delivered, so by the time the heartbeat
        after the next arrives, every message a heartbeat counted must have
        arrived too. Two heartbeats' grace covers a message still on its way
        through the bus (one that took the NATS path while the session was
        opening, overtaken by later ones delivered in-process). A lost message
        would otherwise keep the wait going for as long as the sender's
        heartbeats do.
        """
        claimed = beat.get("sent") if isinstance(beat, dict) else None
        if isinstance(claimed, bool) or not isinstance(claimed, int):
            return
        received = self._received.get(sender, 0)
        claims = self._claimed.setdefault(sender, deque(maxlen=2))
        if len(claims) == 2 and claims[0] > received and sender not in self._lost:
            self._lost[sender] = (claims[0], received)
        claims.append(claimed)

    async def send(self, to: str, tag: str, value: Any, *, timeout: float | None = None) -> None:
        """Send ``value`` to party ``to`` under ``tag`` (each tag once per pair).

        Args:
            to: The receiving party.
            tag: Names the message within the session.
            value: Plain data (see :mod:`fdrtd_client.wire`).
            timeout: Seconds to wait for the delivery; the session timeout by default.

        Raises:
            ComputationFailed: If the gateway or the receiving server refuses it.
            PartyTimeout: If the gateway does not answer in time.
            ValueError: If ``tag`` is one the session uses itself (``abort``,
                ``alive``, ``end``).
        """
        if tag in RESERVED_TAGS:
            raise ValueError(f"the tag '{tag}' is reserved for the session itself")
        await self._send(to, tag, value, timeout=timeout)

    async def _send(self, to: str, tag: str, value: Any, *, timeout: float | None = None) -> None:
        if self._registered is not None:
            await self._registered  # the session id is recorded as used before anything leaves
        self._seq += 1
        request = {
            "to": to,
            "session": self.id,
            "seq": self._seq,
            "tag": tag,
            "payload": wire.packb(value),
        }
        link = self._router.gateway if self._router is not None else None
        if link is not None:
            # shielded: a send we stop waiting for finishes (or fails) on its own,
            # as it would in a gateway behind NATS, and never leaves a half-written
            # request on a connection the gateway reuses
            sending = asyncio.ensure_future(link.outgoing(request))
            sending.add_done_callback(_consume)
            try:
                answer = await asyncio.wait_for(asyncio.shield(sending), timeout or self.timeout)
            except TimeoutError:
                raise PartyTimeout(
                    f"sending to party '{to}' timed out after {timeout or self.timeout:g} s"
                ) from None
        else:
            answer = await self._bus_request(PEER_OUT_SUBJECT, request, timeout, to)
        status = int(answer.get("status", 500))
        if status >= 300:
            if status == 410:  # the receiver has ended this session
                raise await self._ended_by(to, str(answer.get("detail", "")))
            if status in (503, 504):
                raise PartyTimeout(str(answer.get("detail", "")))
            raise error_for_status(status if status < 500 else 422, str(answer.get("detail", "")))
        if tag != ALIVE_TAG:
            self._sent_to[to] = self._sent_to.get(to, 0) + 1

    async def _bus_request(
        self, subject: str, request: dict[str, Any], timeout: float | None, to: str | None
    ) -> dict[str, Any]:
        """One request to the gateway over NATS (when it runs in another process)."""
        try:
            reply = await self.bus.nc.request(
                subject, wire.packb(request), timeout=timeout or self.timeout
            )
        except nats.errors.NoRespondersError:
            raise ComputationFailed("no peer gateway is running on this server") from None
        except nats.errors.TimeoutError:
            what = f"sending to party '{to}'" if to else "asking the peer gateway"
            raise PartyTimeout(f"{what} timed out after {timeout or self.timeout:g} s") from None
        answer: dict[str, Any] = wire.unpackb(reply.data)
        return answer

    async def pair_seeds(self) -> dict[str, bytes]:
        """32-byte seeds shared with each other party, from key agreement (no message).

        The local gateway derives them from this server's X25519 key and each
        peer's, bound to this session id (see ``Gateway.handle_seeds``).
        """
        request = {"session": self.id, "parties": self.others}
        link = self._router.gateway if self._router is not None else None
        if link is not None:
            answer = link.seeds(request)
        else:
            answer = await self._bus_request(PEER_SEEDS_SUBJECT, request, None, None)
        if answer.get("status") != 200:
            raise ComputationFailed(
                str(answer.get("detail", "the gateway refused to derive seeds"))
            )
        seeds: dict[str, bytes] = answer["seeds"]
        return seeds

    async def broadcast(self, tag: str, value: Any, to: Iterable[str] | None = None) -> None:
        """Send the same ``value`` to every other party (concurrently)."""
        if tag in RESERVED_TAGS:
            raise ValueError(f"the tag '{tag}' is reserved for the session itself")
        await self._broadcast(tag, value, to)

    async def _broadcast(self, tag: str, value: Any, to: Iterable[str] | None = None) -> None:
        targets = list(self.others if to is None else to)
        try:
            async with asyncio.TaskGroup() as group:
                for party in targets:
                    group.create_task(self._send(party, tag, value))
        except BaseExceptionGroup as group_error:
            # report the first party's failure itself (it names the party)
            raise group_error.exceptions[0] from None

    async def recv(self, sender: str, tag: str, *, patience: float = 1.0) -> Any:
        """Wait for the message ``tag`` from ``sender``.

        The wait ends with an error once ``sender`` has given no sign of life
        (no message of any tag, heartbeats included) for ``patience`` session
        timeouts: a party that is busy computing keeps the wait alive with its
        heartbeats, one that is gone does not. No wait lasts longer than
        :data:`BUSY_TIMEOUTS` session timeouts (or ``patience`` of them, if more).

        Args:
            sender: The party that sends it.
            tag: The message's tag.
            patience: How many session timeouts to wait. A party whose message
                depends on another party's (a relay) should be waited for
                longer than that other party, so that when one party drops out
                the relay's own timeout, which names the right party, ends the
                computation first.

        Raises:
            PartyTimeout: Naming ``sender`` if it gives no sign of life within the timeout.
            ComputationFailed: If any party aborted the session.
        """
        wait = self.timeout * patience
        start = time.monotonic()
        limit = start + max(BUSY_TIMEOUTS * self.timeout, wait)
        async with self._arrived:
            while True:
                # a message that arrived before an abort is still delivered
                if (sender, tag) in self._inbox:
                    return self._inbox.pop((sender, tag))
                if self._registered is not None and self._registered.done():
                    refused = None if self._registered.cancelled() else self._registered.exception()
                    if refused is not None:
                        # this server refused the session id: nothing can arrive
                        raise refused
                if self._aborted is not None:
                    # the other party's own error, with its status (403, 422, 504...)
                    raise self._abort_error()
                if sender in self._lost:
                    sent, received = self._lost[sender]
                    raise ComputationFailed(
                        f"a message from party '{sender}' was lost on its way to this "
                        f"server: it delivered {sent} messages of session '{self.id}' "
                        f"here, and {received} arrived"
                    )
                now = time.monotonic()
                deadline = min(limit, max(start, self._heard.get(sender, start)) + wait)
                remaining = deadline - now
                if remaining <= 0 and deadline == limit:
                    raise PartyTimeout(
                        f"party '{sender}' did not send its '{tag}' message within "
                        f"{limit - start:g} s, though it kept signalling that it was "
                        f"still at work on session '{self.id}'"
                    )
                if remaining <= 0:
                    raise PartyTimeout(
                        f"party '{sender}' did not send its '{tag}' message: no sign of "
                        f"life from it for {wait:g} s; it may not have joined session "
                        f"'{self.id}' or dropped out"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)

    async def gather(self, tag: str, senders: Iterable[str] | None = None) -> dict[str, Any]:
        """Receive ``tag`` from every other party (or from ``senders``)."""
        names = list(self.others if senders is None else senders)
        values = await asyncio.gather(*(self.recv(name, tag) for name in names))
        return dict(zip(names, values, strict=True))

    async def exchange(self, tag: str, value: Any) -> dict[str, Any]:
        """Broadcast ``value`` and gather everyone's; includes our own under our name."""
        _, received = await both(self.broadcast(tag, value), self.gather(tag))
        received[self.me] = value
        return {party: received[party] for party in self.parties}
