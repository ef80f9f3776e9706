"""A protocol's view of its computation session: send to and receive from parties.

A :class:`PeerSession` is what a protocol microservice uses to talk to the
other parties of one computation. Outgoing messages go to the local peer
gateway over NATS (``fdrtd.peer.out``); incoming ones are read from the
JetStream stream where the gateway put them after verification, by one
:class:`PeerInbox` per process, which holds a message that arrives before this
party has even joined its session instead of losing it.

Every wait has a deadline: :meth:`PeerSession.recv` raises
:class:`~fdrtd_server.errors.PartyTimeout` naming the party that did not
send in time. When a party fails, it tells the others (``abort``) so that
they stop at once with a message that names it, instead of waiting out
their own timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import nats.errors
from nats.aio.msg import Msg
from nats.js import api as js_api
from nats.js.errors import KeyWrongLastSequenceError

from fdrtd_client import wire
from fdrtd_server.bus import PEER_IN_PREFIX, PEER_OUT_SUBJECT, PEER_SEEDS_SUBJECT, PEER_STREAM, Bus
from fdrtd_server.errors import (
    BadRequest,
    ComputationFailed,
    Conflict,
    PartyTimeout,
    error_for_status,
)

__all__ = ["ABORT_TAG", "PeerInbox", "PeerSession", "both"]

A = TypeVar("A")
B = TypeVar("B")


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


ABORT_TAG = "abort"
ABORT_WAIT = 3.0
"""Seconds a failing party spends telling the others."""
INBOX_HOLD = 120.0
"""Seconds a message for a session not (yet) open in this process is kept."""
INBOX_BYTES = 256 * 1024 * 1024
"""At most this many bytes of such messages are kept; the oldest go first."""


class PeerInbox:
    """Routes verified peer messages from JetStream to the open sessions of this process.

    One ordered consumer per bus connection reads ``fdrtd.peer.in.>`` (from
    :data:`INBOX_HOLD` seconds before it starts), instead of one consumer per
    session: a session then opens without a JetStream round trip. Messages
    for sessions that are not open here yet (a fast party's first message
    can arrive before this party's own request) are held for
    :data:`INBOX_HOLD` seconds, or until the memory bound pushes them out.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.sessions: dict[str, PeerSession] = {}
        self.held: OrderedDict[int, tuple[float, str, Msg]] = OrderedDict()
        self.held_bytes = 0
        self._subscription: Any = None
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
        """Subscribe once."""
        async with self._started:
            if self._subscription is not None:
                return
            since = datetime.now(UTC) - timedelta(seconds=INBOX_HOLD)
            self._subscription = await self.bus.js.subscribe(
                f"{PEER_IN_PREFIX}.>",
                stream=PEER_STREAM,
                ordered_consumer=True,
                deliver_policy=js_api.DeliverPolicy.BY_START_TIME,
                config=js_api.ConsumerConfig(opt_start_time=since),
                cb=self._route,
            )

    async def _route(self, msg: Msg) -> None:
        session_id = msg.subject[len(PEER_IN_PREFIX) + 1 :]
        session = self.sessions.get(session_id)
        if session is not None:
            await session.deliver(msg)
            return
        now = time.monotonic()
        key = id(msg)
        self.held[key] = (now, session_id, msg)
        self.held_bytes += len(msg.data)
        while self.held and (
            self.held_bytes > INBOX_BYTES or next(iter(self.held.values()))[0] < now - INBOX_HOLD
        ):
            _, (_, _, old) = self.held.popitem(last=False)
            self.held_bytes -= len(old.data)

    async def open(self, session: PeerSession) -> None:
        """Route the session's messages to it, those held so far first."""
        self.sessions[session.id] = session
        for key, (_, session_id, msg) in list(self.held.items()):
            if session_id == session.id:
                del self.held[key]
                self.held_bytes -= len(msg.data)
                await session.deliver(msg)

    def close(self, session: PeerSession) -> None:
        """Stop routing to the session."""
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]


class PeerSession:
    """One party's end of a multi-party computation session.

    Args:
        bus: The microservice's bus connection.
        session_id: Shared by all parties of the computation.
        parties: The server names taking part, in an order all parties agree on.
        me: This server's name; must be in ``parties``.
        timeout: Seconds to wait for any one message before giving up.
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
        self._arrived = asyncio.Condition()
        self._router: PeerInbox | None = None
        self._aborted: tuple[str, str, int] | None = None

    async def __aenter__(self) -> PeerSession:
        # A session id is used once per server: masks are derived from it, so a
        # reused id would reuse masks.
        try:
            await self.bus.sessions.create(self.id, wire.packb({"parties": self.parties}))
        except KeyWrongLastSequenceError:
            raise Conflict(
                f"session '{self.id}' was already used on this server; "
                "start every computation with a new session id"
            ) from None
        self._router = await PeerInbox.of(self.bus)
        await self._router.open(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
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
                asyncio.ensure_future(self.send(party, ABORT_TAG, abort, timeout=ABORT_WAIT))
                for party in self.others
            ]
            await asyncio.wait(sends, timeout=ABORT_WAIT)
            for sending in sends:
                sending.add_done_callback(_consume)
        if self._router is not None:
            self._router.close(self)
        # the session's messages are masked values: remove them from disk now,
        # in the background (the stream's max age would remove them within the hour)
        purge = self.bus.js.purge_stream(PEER_STREAM, subject=f"{PEER_IN_PREFIX}.{self.id}")
        asyncio.ensure_future(purge).add_done_callback(_consume)

    async def deliver(self, msg: Msg) -> None:
        """Take one message of this session from the inbox router."""
        headers = msg.headers or {}
        sender, tag = headers.get("fdrtd-from", ""), headers.get("fdrtd-tag", "")
        if sender not in self.parties or sender == self.me:
            return
        try:
            value = wire.unpackb(msg.data)
        except wire.WireError:
            value = {"reason": "a malformed message"}
            tag = ABORT_TAG
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
        """
        self._seq += 1
        request = {
            "to": to,
            "session": self.id,
            "seq": self._seq,
            "tag": tag,
            "payload": wire.packb(value),
        }
        try:
            reply = await self.bus.nc.request(
                PEER_OUT_SUBJECT, wire.packb(request), timeout=timeout or self.timeout
            )
        except nats.errors.NoRespondersError:
            raise ComputationFailed("no peer gateway is running on this server") from None
        except nats.errors.TimeoutError:
            raise PartyTimeout(
                f"sending to party '{to}' timed out after {self.timeout:g} s"
            ) from None
        answer = wire.unpackb(reply.data)
        status = int(answer.get("status", 500))
        if status >= 300:
            if status in (503, 504):
                raise PartyTimeout(str(answer.get("detail", "")))
            raise error_for_status(status if status < 500 else 422, str(answer.get("detail", "")))

    async def pair_seeds(self) -> dict[str, bytes]:
        """32-byte seeds shared with each other party, from key agreement (no message).

        The local gateway derives them from this server's X25519 key and each
        peer's, bound to this session id (see ``Gateway.handle_seeds``).
        """
        request = {"session": self.id, "parties": self.others}
        try:
            reply = await self.bus.nc.request(
                PEER_SEEDS_SUBJECT, wire.packb(request), timeout=self.timeout
            )
        except nats.errors.NoRespondersError:
            raise ComputationFailed("no peer gateway is running on this server") from None
        except nats.errors.TimeoutError:
            raise PartyTimeout("the peer gateway did not answer in time") from None
        answer = wire.unpackb(reply.data)
        if answer.get("status") != 200:
            raise ComputationFailed(
                str(answer.get("detail", "the gateway refused to derive seeds"))
            )
        seeds: dict[str, bytes] = answer["seeds"]
        return seeds

    async def broadcast(self, tag: str, value: Any, to: Iterable[str] | None = None) -> None:
        """Send the same ``value`` to every other party (concurrently)."""
        targets = list(self.others if to is None else to)
        try:
            async with asyncio.TaskGroup() as group:
                for party in targets:
                    group.create_task(self.send(party, tag, value))
        except BaseExceptionGroup as group_error:
            # report the first party's failure itself (it names the party)
            raise group_error.exceptions[0] from None

    async def recv(self, sender: str, tag: str) -> Any:
        """Wait for the message ``tag`` from ``sender``.

        Raises:
            PartyTimeout: Naming ``sender`` if nothing arrives within the timeout.
            ComputationFailed: If any party aborted the session.
        """
        deadline = time.monotonic() + self.timeout
        async with self._arrived:
            while True:
                # a message that arrived before an abort is still delivered
                if (sender, tag) in self._inbox:
                    return self._inbox.pop((sender, tag))
                if self._aborted is not None:
                    # the other party's own error, with its status (403, 422, 504...)
                    party, reason, status = self._aborted
                    raise error_for_status(
                        status, f"party '{party}' ended the computation: {reason}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PartyTimeout(
                        f"party '{sender}' did not send its '{tag}' message within "
                        f"{self.timeout:g} s; it may not have joined session '{self.id}' "
                        "or dropped out"
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
