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
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import nats.errors
from nats.aio.msg import Msg
from nats.js.errors import KeyWrongLastSequenceError

from fdrtd_client import wire
from fdrtd_server.bus import PEER_IN_PREFIX, PEER_OUT_SUBJECT, PEER_SEEDS_SUBJECT, Bus
from fdrtd_server.errors import (
    BadRequest,
    ComputationFailed,
    Conflict,
    PartyTimeout,
    error_for_status,
)

__all__ = ["ABORT_TAG", "GatewayLink", "Incoming", "PeerInbox", "PeerSession", "both"]

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


@dataclass(frozen=True, slots=True)
class Incoming:
    """One verified peer message, as the gateway hands it on."""

    session: str
    sender: str
    tag: str
    seq: int
    payload: bytes

    @classmethod
    def from_msg(cls, msg: Msg) -> Incoming:
        """Rebuild from a ``fdrtd.peer.in.<session>`` message (headers set by the gateway)."""
        headers = msg.headers or {}
        seq = headers.get("fdrtd-seq", "")
        return cls(
            session=msg.subject[len(PEER_IN_PREFIX) + 1 :],
            sender=headers.get("fdrtd-from", ""),
            tag=headers.get("fdrtd-tag", ""),
            seq=int(seq) if seq.isdigit() else -1,
            payload=msg.data,
        )

    def headers(self) -> dict[str, str]:
        """The NATS headers that carry everything but the payload and session."""
        return {"fdrtd-from": self.sender, "fdrtd-tag": self.tag, "fdrtd-seq": str(self.seq)}


class PeerInbox:
    """Routes verified peer messages to the open sessions of this process.

    The gateway of the same process calls :meth:`route` itself for a session
    open here; every other message arrives on core NATS (``fdrtd.peer.in.>``,
    one plain subscription per process, made when the microservices start).
    Messages for sessions that are not open here yet (a fast party's first
    message can arrive before this party's own request) are held for
    :data:`INBOX_HOLD` seconds, or until the memory bound pushes them out.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.sessions: dict[str, PeerSession] = {}
        self.held: OrderedDict[int, tuple[float, Incoming]] = OrderedDict()
        self.held_bytes = 0
        self.gateway: GatewayLink | None = None
        """The gateway of this process, if the microservices share its process."""
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
            if self._subscription is None:
                self._subscription = await self.bus.nc.subscribe(
                    f"{PEER_IN_PREFIX}.>", cb=self._from_bus
                )

    async def _from_bus(self, msg: Msg) -> None:
        await self.route(Incoming.from_msg(msg))

    def is_open(self, session_id: str) -> bool:
        """Whether a session with this id runs in this process now."""
        return session_id in self.sessions

    async def route(self, message: Incoming) -> None:
        """Deliver to the open session, or hold the message for a while."""
        session = self.sessions.get(message.session)
        if session is not None:
            await session.deliver(message)
            return
        now = time.monotonic()
        self.held[id(message)] = (now, message)
        self.held_bytes += len(message.payload)
        while self.held and (
            self.held_bytes > INBOX_BYTES or next(iter(self.held.values()))[0] < now - INBOX_HOLD
        ):
            _, (_, old) = self.held.popitem(last=False)
            self.held_bytes -= len(old.payload)

    async def open(self, session: PeerSession) -> None:
        """Route the session's messages to it, those held so far first."""
        self.sessions[session.id] = session
        for key, (_, message) in list(self.held.items()):
            if message.session == session.id:
                del self.held[key]
                self.held_bytes -= len(message.payload)
                await session.deliver(message)

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
        self._seen: set[tuple[str, int]] = set()
        self._arrived = asyncio.Condition()
        self._router: PeerInbox | None = None
        self._registered: asyncio.Future[None] | None = None
        self._aborted: tuple[str, str, int] | None = None

    async def _register(self) -> None:
        try:
            await self.bus.sessions.create(self.id, wire.packb({"parties": self.parties}))
        except KeyWrongLastSequenceError:
            raise Conflict(
                f"session '{self.id}' was already used on this server; "
                "start every computation with a new session id"
            ) from None

    async def __aenter__(self) -> PeerSession:
        # A session id is used once per server: masks are derived from it, so a
        # reused id would reuse masks. The id is recorded while the protocol
        # loads its data and derives its seeds; nothing is sent before the record
        # is made (see send), so a reused id can never put a masked value on the wire.
        self._registered = asyncio.ensure_future(self._register())
        self._router = await PeerInbox.of(self.bus)
        await self._router.open(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        refused = None
        if self._registered is not None:
            await asyncio.wait([self._registered])
            if not self._registered.cancelled():
                refused = self._registered.exception()
        if refused is not None:
            # a reused session id: nothing was sent, and whatever happened since
            # is explained by the refusal, which is what every party reports
            if self._router is not None:
                self._router.close(self)
            raise refused from None
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
        try:
            value = wire.unpackb(message.payload)
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
            if status in (503, 504):
                raise PartyTimeout(str(answer.get("detail", "")))
            raise error_for_status(status if status < 500 else 422, str(answer.get("detail", "")))

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
