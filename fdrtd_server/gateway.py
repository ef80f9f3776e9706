"""The peer gateway: the only place where servers of different parties talk.

Protocol microservices never speak HTTP. To send a message to another party
they make a NATS request on ``fdrtd.peer.out``; the gateway (running in the
controller, which holds the server's identity keys) seals it — encrypted for
the receiver, signed by us, bound to session, sequence number and tag (see
:mod:`fdrtd_server.envelope`) — and POSTs it to the receiver's ``/v1/peer``.

The receiving gateway opens and verifies the envelope against its federation
file, refuses replays, and hands the payload to the protocol: directly when
the session runs in its own process (the embedded default), else on core
NATS as ``fdrtd.peer.in.<session>`` for the worker that runs it. Peer
messages are masked values of one live session, so they are never stored.
One kind is not a computation's: heartbeats for the federation directory
(session :data:`fdrtd_server.directory.SESSION`) go, once verified and
checked for replays like every message, to :mod:`fdrtd_server.directory`.
One HTTP port per server, so a reverse proxy with TLS in front of it is all a
deployment needs; or the server serves TLS itself, and the gateway verifies
``https://`` peers against the federation's CA (:mod:`fdrtd_server.tls`).

What one peer can make ``POST /v1/peer`` spend is bounded: at most
:data:`MAX_PEER_READS` messages and :data:`PEER_READ_BYTES` bytes are read at
once (more are answered 503, and a sending gateway tries again after a short
pause, :data:`SEND_RETRIES`); the claimed sender and receiver are checked as
soon as the envelope's header has arrived, so a non-member's body is neither
read whole nor hashed; and rejections are audited one by one only up to a
rate, beyond which they are counted and summed up (:class:`_RejectionAudit`).

Replays are refused at three levels:

1. The gateway remembers the triple sender/session/sequence number of every
   message it accepted (:class:`ReplayGuard`) for as long as the envelope's
   timestamp is fresh, and answers a repeat with 409; later the envelope is
   refused as stale anyway (403). It never forgets a fresh one to make room:
   a member with :data:`REPLAY_KEYS_PER_SENDER` fresh messages is answered
   503 (retry shortly) until its oldest expire.
2. A session drops any (sender, sequence number) it has already taken, so a
   replay cannot feed a protocol twice even if the gateway forgot it (its
   memory does not survive a restart).
3. Session ids are single use on every server (recorded in JetStream), so a
   message of a finished session never reaches a protocol again. A session
   that has ended is marked so in its record, and the gateway answers its
   messages 410 (gone) instead of holding them for a session that will never
   open again; so it does for a message of a session it has no record of,
   sealed before the gateway started (see :meth:`Gateway.refusal`). After a
   restart, when the replay memory of level 1 is empty, recorded messages of
   past sessions cannot fill a member's holding quota (see
   :class:`~fdrtd_server.peers.PeerInbox`), which in any case gives way to
   the member's newer messages.

When the gateway runs in the same process as the protocol microservices, they
call it directly (:class:`fdrtd_server.peers.GatewayLink`) instead of through
``fdrtd.peer.out``: the same requests and answers without two bus hops.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import os
import time
import uuid
from typing import Any

import msgpack
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from fdrtd_client import wire
from fdrtd_server import directory, tls
from fdrtd_server._http import HttpError, PeerHttpClient, TlsRefused
from fdrtd_server.app import internal_error
from fdrtd_server.audit import AuditLog
from fdrtd_server.bus import (
    PEER_IN_PREFIX,
    PEER_OUT_SUBJECT,
    PEER_SEEDS_SUBJECT,
    SESSIONS_BUCKET,
)
from fdrtd_server.envelope import (
    MAX_HEADER_BYTES,
    OpenedMessage,
    PeerMessageRejected,
    check_addressing,
    open_envelope,
    replay_key,
    seal,
)
from fdrtd_server.envelope import (
    SESSION_PATTERN as SESSION_RULE,
)
from fdrtd_server.errors import Conflict, FdrtdError, PayloadTooLarge, ServiceUnavailable
from fdrtd_server.http_common import State, problem
from fdrtd_server.identity import Identity, PeerEntry, load_federation
from fdrtd_server.peers import (
    ALIVE_TAG,
    Incoming,
    PeerInbox,
    read_session_record,
    written_session_record,
)

__all__ = [
    "FEDERATION_FILE",
    "PEER_PATH",
    "Gateway",
    "PeerFastPath",
    "ReplayGuard",
    "routes",
    "start",
    "stop",
]

log = logging.getLogger("fdrtd.gateway")
FEDERATION_FILE = "federation.toml"
PEER_PATH = "/v1/peer"
SEND_TIMEOUT = 10.0
MAX_PEER_MESSAGE = 64 * 1024 * 1024
MAX_AGE = 300.0
"""Seconds an envelope's timestamp may be off this server's clock (transit and skew)."""
REPLAY_KEYS_PER_SENDER = 150_000
"""At most this many accepted messages of one member are remembered at once (about
500 messages a second, sustained, for the 5 minutes an envelope stays fresh; some 30 MB).
A key is never forgotten while its envelope is fresh: a member over its quota is
answered 503 (retry shortly) until its oldest keys expire."""
MAX_PEER_READS = 64
"""At most this many peer messages are read at once; more are answered 503 (retry)."""
PEER_READ_BYTES = 256 * 1024 * 1024
"""At most this many bytes of peer messages are read into memory at once."""
SEND_RETRIES = (0.2, 0.5, 1.0)
"""Seconds to wait before sending again a message a peer answered with 503 (busy)."""
RECORDS_KEPT = 100_000
"""Session records whose state the gateway keeps in memory (the newest)."""
RECORD_LOOKUP_WAIT = 1.0
STARTED_MARGIN = 30.0
"""Seconds a message for a session this server has not run may have been sealed before
the gateway started (a sender's retries, its clock running behind) and still be held."""
"""Seconds to wait for a session record before holding the message as before."""
DETAIL_CHARS = 200
"""A peer's refusal is passed on to our side truncated to this many characters."""
AUDIT_BURST = 50
AUDIT_RATE = 10.0
"""Rejected peer messages are audited one by one up to AUDIT_BURST at once and
AUDIT_RATE a second; beyond, they are counted and summed up in one record a second."""


class ReplayGuard:
    """The messages accepted while their timestamps are fresh, to refuse a second copy.

    Keys are kept per sender. A key is forgotten only once its envelope is
    stale (refused at :func:`~fdrtd_server.envelope.open_envelope` anyway), so
    a fresh replay is always caught here; when a member has :attr:`limit` fresh
    keys, its further messages are refused as busy (503) rather than
    forgetting a fresh key. Only verified members reach the guard, so the
    memory is at most the number of members times :attr:`limit` keys.
    """

    def __init__(self, max_age: float = MAX_AGE, limit: int = REPLAY_KEYS_PER_SENDER) -> None:
        self.max_age = max_age
        self.limit = limit
        self._until: dict[str, dict[str, float]] = {}
        self._expiry: dict[str, list[tuple[float, str]]] = {}

    def __len__(self) -> int:
        """The number of keys remembered, over all senders."""
        return sum(len(keys) for keys in self._until.values())

    def first_time(self, message: OpenedMessage, now: float | None = None) -> bool:
        """Record ``message``; False if it was recorded before (a replay).

        Raises:
            ServiceUnavailable: If the sender has :attr:`limit` fresh messages
                recorded already; it may send again once older ones expire.
        """
        clock = time.time() if now is None else now
        sender = message.sender
        keys = self._until.setdefault(sender, {})
        expiry = self._expiry.setdefault(sender, [])
        while expiry and expiry[0][0] < clock:
            _, old = heapq.heappop(expiry)
            del keys[old]
        key = replay_key(message)
        if key in keys:
            return False
        if len(keys) >= self.limit:
            raise ServiceUnavailable(
                f"this server has accepted {self.limit} messages from '{sender}' within "
                f"{self.max_age:g} s, as many as it can check for replays; retry shortly"
            )
        # after this the envelope is stale (refused anyway); the margin covers rounding
        until = max(clock, message.ts) + self.max_age + 1.0
        keys[key] = until
        heapq.heappush(expiry, (until, key))
        return True


class _RejectionAudit:
    """Audits rejected peer messages, summing up a flood instead of writing each one.

    Each rejection is one audit record while they come at most
    :data:`AUDIT_BURST` at once and :data:`AUDIT_RATE` a second (a token
    bucket). Beyond, they are counted by reason, and one record a second says
    how many were not recorded one by one; nothing goes unaccounted.
    """

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self.tokens = float(AUDIT_BURST)
        self.refilled = time.monotonic()
        self.suppressed: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None

    def rejected(self, principal: str, target: str, reason: str) -> None:
        """Audit one rejection (``reason`` is a short code such as ``replay``)."""
        now = time.monotonic()
        self.tokens = min(float(AUDIT_BURST), self.tokens + (now - self.refilled) * AUDIT_RATE)
        self.refilled = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.flush()
            self.audit.write(principal, "peer-message", target, f"rejected {reason}")
            return
        self.suppressed[reason] = self.suppressed.get(reason, 0) + 1
        if self._timer is None:
            with contextlib.suppress(RuntimeError):  # no running loop: the next call flushes
                self._timer = asyncio.get_running_loop().call_later(1.0, self.flush)

    def flush(self) -> None:
        """Write the summary of the rejections not recorded one by one, if any."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.suppressed:
            return
        counts, self.suppressed = self.suppressed, {}
        self.audit.write(
            "peer",
            "peer-message",
            "",
            f"rejected {sum(counts.values())} more peer messages, too many to record one by one",
            reasons=counts,
        )


class Gateway:
    """The state of a running gateway: keys, members, HTTP sessions."""

    def __init__(self, state: State) -> None:
        self.state = state
        home = state.settings.home
        self.identity = Identity.load(home / "identity", state.settings.name)
        self.members: dict[str, PeerEntry] = {}
        self.federation_path = home / FEDERATION_FILE
        self._federation_file = os.fspath(self.federation_path)
        self._federation_mtime = -1
        self.reload_members()
        self.http = PeerHttpClient(
            timeout=SEND_TIMEOUT,
            ssl_context=tls.files_of(state.settings).peer_context(),
            https_only=tls.wants_https(state.settings),
        )
        urls = {name: member.url for name, member in self.members.items()}
        for warning in tls.plain_members(state.settings, urls):
            log.warning("%s", warning)
        self.replays = ReplayGuard()
        self.rejections = _RejectionAudit(state.audit)
        self.reading = 0
        """Peer messages being read now."""
        self.reading_bytes = 0
        """Bytes of peer messages read into memory (or announced) now."""
        self._shared: dict[bytes, bytes] = {}
        self.sending: set[asyncio.Task[None]] = set()
        self.local: PeerInbox | None = None
        """The inbox of the microservices in this process, if they run here."""
        self.subscription: Any = None
        self.seed_subscription: Any = None
        self.record_subscription: Any = None
        self._records: dict[str, bool] = {}
        """Whether each session recorded on this server has ended, as the records
        say when they are written (newest last, at most :data:`RECORDS_KEPT`)."""
        self._recorded_before: set[str] | None = None
        """The sessions recorded before this gateway watched the records (None until
        they are listed): only these need their record read."""
        self.listing: asyncio.Task[None] | None = None
        self.started = time.time()
        """When this gateway started (Unix time, as envelopes carry it)."""

    async def attach(self, inbox: PeerInbox) -> None:
        """Serve the protocol microservices of this process directly (no bus hops)."""
        self.local = inbox
        inbox.gateway = self

    def reload_members(self) -> None:
        """Re-read the federation file if it changed (one ``stat`` per peer message)."""
        try:
            mtime = os.stat(self._federation_file).st_mtime_ns
        except FileNotFoundError:
            self.members = {}
            return
        if mtime != self._federation_mtime:
            self.members = load_federation(self.federation_path)
            self._federation_mtime = mtime

    async def _post(self, peer: PeerEntry, body: bytes) -> tuple[int, str]:
        """Deliver one sealed message; (status, detail for a person) of the outcome.

        A peer that answers 503 (busy, or its gateway starting) has not taken
        the message, so it is sent again after :data:`SEND_RETRIES` pauses.
        """
        for pause in (*SEND_RETRIES, None):
            try:
                status, answer, retried = await self.http.post(
                    peer.url, PEER_PATH, body, wire.MSGPACK
                )
            except TlsRefused as error:
                # no passing trouble: the parties fail at once, saying why (not as a timeout)
                return 502, f"cannot reach party '{peer.name}': {error}"
            except HttpError as error:
                return 503, f"cannot reach party '{peer.name}': {error}"
            except TimeoutError:
                return 503, (
                    f"cannot reach party '{peer.name}': no answer within {self.http.timeout:g} s"
                )
            if status == 503 and pause is not None:
                await asyncio.sleep(pause)
                continue
            break
        if retried and status in (409, 410):
            # the first attempt reached the peer before its connection failed:
            # this very envelope was delivered, and its second copy refused (as a
            # replay, or because the message let the peer end its session)
            return 202, ""
        if status >= 300:
            return status, f"party '{peer.name}' refused the message: {_peer_detail(answer)}"
        return status, ""

    async def outgoing(self, request: dict[str, Any]) -> dict[str, Any]:
        """Seal one outgoing message and deliver it; ``{"status", "detail"}``."""
        try:
            to = str(request["to"])
            self.reload_members()
            peer = self.members.get(to)
            if peer is None:
                return {"status": 404, "detail": f"party '{to}' is not in this server's federation"}
            body = seal(
                self.identity,
                peer,
                session=str(request["session"]),
                seq=int(request["seq"]),
                tag=str(request["tag"]),
                payload=bytes(request["payload"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            return {
                "status": 400,
                "detail": f"malformed outgoing peer message: {type(error).__name__}",
            }
        status, detail = await self._post(peer, body)
        return {"status": status, "detail": detail}

    def _shared_secret(self, peer_box_public: bytes) -> bytes:
        """The X25519 secret shared with a peer, computed once per peer key (it never changes)."""
        shared = self._shared.get(peer_box_public)
        if shared is None:
            shared = self._shared[peer_box_public] = self.identity.exchange(peer_box_public)
        return shared

    def seeds(self, request: dict[str, Any]) -> dict[str, Any]:
        """Derive this server's pairwise seeds with the named parties for one session.

        ``seed = HKDF-SHA256(X25519(our key, their key), salt="fdrtd pair seed v1",
        info=session | low name | high name)``: both servers of a pair derive
        the same 32 bytes without a message, and every session gets fresh
        seeds. Protocol microservices then expand them into pairwise masks.
        The seeds never leave this party's bus.
        """
        try:
            session = str(request["session"])
            if not SESSION_RULE.match(session):
                raise ValueError("session")
            self.reload_members()
            seeds: dict[str, bytes] = {}
            for name in request["parties"]:
                peer = self.members.get(str(name))
                if peer is None:
                    return {
                        "status": 404,
                        "detail": f"party '{name}' is not in this server's federation",
                    }
                low, high = sorted((self.identity.name, peer.name))
                info = b"\x00".join((session.encode(), low.encode(), high.encode()))
                shared = self._shared_secret(peer.box_public)
                seeds[peer.name] = HKDF(
                    algorithm=hashes.SHA256(), length=32, salt=b"fdrtd pair seed v1", info=info
                ).derive(shared)
        except (KeyError, TypeError, ValueError):
            return {"status": 400, "detail": "malformed seed request"}
        return {"status": 200, "seeds": seeds}

    async def dispatch_outgoing(self, msg: Msg) -> None:
        """Handle each ``fdrtd.peer.out`` request in a task of its own.

        NATS runs a subscription's callback for one message at a time, so a
        send to a slow or unreachable party (up to ``SEND_TIMEOUT``) would
        otherwise hold up every other worker's messages to every party.
        """
        task = asyncio.create_task(self.handle_outgoing(msg))
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    async def handle_outgoing(self, msg: Msg) -> None:
        """``fdrtd.peer.out``: :meth:`outgoing` for microservices in other processes.

        Every request is answered, an unexpected failure included (500 with an
        incident id in the log), so that no worker waits out its timeout.
        """
        try:
            request = wire.unpackb(msg.data)
            if not isinstance(request, dict):
                raise TypeError("not a map")
            answer = await self.outgoing(request)
        except (TypeError, wire.WireError) as error:
            answer = {
                "status": 400,
                "detail": f"malformed outgoing peer message: {type(error).__name__}",
            }
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("sending a peer message failed (incident %s)", incident)
            answer = {"status": 500, "detail": f"internal error (incident {incident})"}
        if msg.reply:
            await self.state.bus.nc.publish(msg.reply, wire.packb(answer))

    async def handle_seeds(self, msg: Msg) -> None:
        """``fdrtd.peer.seeds``: :meth:`seeds` for microservices in other processes."""
        try:
            request = wire.unpackb(msg.data)
            if not isinstance(request, dict):
                raise TypeError("not a map")
            answer = self.seeds(request)
        except (TypeError, wire.WireError):
            answer = {"status": 400, "detail": "malformed seed request"}
        if msg.reply:
            await self.state.bus.nc.publish(msg.reply, wire.packb(answer))

    async def record_written(self, msg: Msg) -> None:
        """A session record was written (``$KV.fdrtd_sessions.<id>``): note whether it ended."""
        written = written_session_record(msg)
        if written is None:
            return
        session_id, record = written
        self._records.pop(session_id, None)
        self._records[session_id] = record.get("ended") is True
        if len(self._records) > RECORDS_KEPT:
            del self._records[next(iter(self._records))]

    async def refusal(self, message: OpenedMessage) -> str | None:
        """Why a message's session will never take it on this server (410), or None.

        Asked only for a verified, fresh, first-time message. A session open in
        this process takes it. Otherwise the message is refused if

        * its session has ended here (its record says so); the records written
          since this gateway started answer at once, older ones (from before a
          restart) are read from the bucket, which outlives a restart; or
        * its session is not recorded here at all (this server has not run it)
          and it was sealed more than :data:`STARTED_MARGIN` seconds before this
          gateway started: it was sent to this server's previous run, which
          alone could have taken it, so now it can only be a replay.

        Anything else is a message ahead of this server's own request (or of a
        session another process runs) and is handed on, to be held.
        """
        session_id = message.session
        if self.local is not None and self.local.is_open(session_id):
            return None
        known = self._records.get(session_id)
        if known is not None:
            return _ENDED if known else None
        before = self._recorded_before
        if before is None or session_id in before:
            try:
                entry = await asyncio.wait_for(
                    self.state.bus.sessions.get(session_id), RECORD_LOOKUP_WAIT
                )
            except KeyNotFoundError:
                entry = None
            except Exception as error:  # the bus is slow or down: held, as before
                log.warning("could not read the record of a peer session: %r", error)
                return None
            if entry is not None:
                record = read_session_record(entry.value or b"")
                ended = record is not None and record.get("ended") is True
                if ended:
                    self._records[session_id] = True
                return _ENDED if ended else None
        # not recorded here, before the start or since
        if message.ts < self.started - STARTED_MARGIN:
            return _BEFORE_START
        return None

    async def list_records(self) -> None:
        """List the sessions recorded before the watch began (in the background).

        Until the list is made, every message for a session that is neither
        open here nor recorded since the start costs a read of its record;
        afterwards only the sessions of the list do (after a restart: those
        that ran before it). The watch begins before the listing, so no
        session falls between the two.
        """
        listed: set[str] = set()
        try:
            watcher = await self.state.bus.sessions.watchall(ignore_deletes=True, meta_only=True)
            try:
                async for entry in watcher:
                    if entry is None:
                        break  # every record made before the watch began has been listed
                    listed.add(entry.key)
                    if len(listed) > RECORDS_KEPT:
                        # too many to keep in memory: every such message reads its record
                        log.info(
                            "more than %d peer sessions are recorded: messages of sessions "
                            "not recorded since the start read their record",
                            RECORDS_KEPT,
                        )
                        return
            finally:
                await watcher.stop()  # type: ignore[no-untyped-call]
        except Exception as error:
            log.warning("could not list the recorded peer sessions: %r", error)
            return
        self._recorded_before = listed

    async def hand_on(self, message: OpenedMessage) -> None:
        """Give a verified message to its session: here if it runs here, else over NATS."""
        incoming = Incoming(
            message.session, message.sender, message.tag, message.seq, message.payload, message.ts
        )
        if self.local is not None and self.local.is_open(message.session):
            await self.local.route(incoming)
            return
        await self.state.bus.nc.publish(
            f"{PEER_IN_PREFIX}.{message.session}", message.payload, headers=incoming.headers()
        )


async def start(state: State, nats_url: str) -> None:
    """Load keys and members, serve ``fdrtd.peer.out``."""
    gateway = Gateway(state)
    state.extra["gateway"] = gateway
    state.extra["public_entry"] = gateway.identity.public_entry(state.settings.url).to_dict()
    gateway.subscription = await state.bus.nc.subscribe(
        PEER_OUT_SUBJECT, queue="fdrtd-gateway", cb=gateway.dispatch_outgoing
    )
    gateway.seed_subscription = await state.bus.nc.subscribe(
        PEER_SEEDS_SUBJECT, queue="fdrtd-gateway", cb=gateway.handle_seeds
    )
    gateway.record_subscription = await state.bus.nc.subscribe(
        f"$KV.{SESSIONS_BUCKET}.>", cb=gateway.record_written
    )
    await state.bus.nc.flush()  # the watch is in place before the listing starts
    gateway.listing = asyncio.create_task(gateway.list_records())


async def stop(state: State) -> None:
    """Stop serving outgoing messages."""
    gateway: Gateway | None = state.extra.pop("gateway", None)
    if gateway is None:
        return
    with contextlib.suppress(Exception):
        await gateway.subscription.unsubscribe()
        await gateway.seed_subscription.unsubscribe()
        await gateway.record_subscription.unsubscribe()
    if gateway.listing is not None:
        gateway.listing.cancel()
        await asyncio.wait([gateway.listing], timeout=1.0)
    for task in list(gateway.sending):
        task.cancel()
    if gateway.sending:
        await asyncio.wait(gateway.sending, timeout=5.0)
    gateway.rejections.flush()
    await gateway.http.close()


def _peer_detail(answer: bytes) -> str:
    """The ``detail`` of a peer's problem document, as a short printable string.

    A peer's answer is not authenticated: only a bounded, printable excerpt of
    it may reach our client's error message.
    """
    try:
        detail = str(json.loads(answer).get("detail", ""))
    except (ValueError, AttributeError, RecursionError):
        return "(no readable reason given)"
    detail = "".join(char if char.isprintable() else "?" for char in detail[: DETAIL_CHARS + 1])
    if len(detail) > DETAIL_CHARS:
        detail = detail[: DETAIL_CHARS - 3] + "..."
    return detail or "(no reason given)"


_MORE = "more"


def _claimed(prefix: bytes) -> tuple[str, str] | str | None:
    """The ``from`` and ``to`` an envelope claims, read from its first bytes.

    :func:`~fdrtd_server.envelope.seal` writes the header first, so about a
    kilobyte tells who claims to send a message and to whom, before the rest
    is read. Returns :data:`_MORE` while the prefix is too short to tell, and
    None when the layout is another (the full check then decides).
    """
    # fixmap of 3, the key "h", then bin 8 or bin 16 holding the header
    if len(prefix) < 5:
        return _MORE
    if prefix[:3] != b"\x83\xa1h":
        return None
    if prefix[3] == 0xC4:
        start, size = 5, prefix[4]
    elif prefix[3] == 0xC5:
        if len(prefix) < 6:
            return _MORE
        start, size = 6, int.from_bytes(prefix[4:6], "big")
    else:
        return None
    if size > MAX_HEADER_BYTES:
        return None
    if len(prefix) < start + size:
        return _MORE
    try:
        header = msgpack.unpackb(
            prefix[start : start + size],
            raw=False,
            max_str_len=128,
            max_bin_len=64,
            max_array_len=0,
            max_map_len=16,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    if not isinstance(header, dict):
        return None
    sender, receiver = header.get("from"), header.get("to")
    if not isinstance(sender, str) or not isinstance(receiver, str):
        return None
    return sender, receiver


def _check_claim(gateway: Gateway, claim: tuple[str, str]) -> None:
    """Refuse a message from a non-member or for another server before reading it all.

    Raises:
        NotAMember, WrongRecipient: As :func:`~fdrtd_server.envelope.open_envelope` would.
    """
    sender, receiver = claim
    check_addressing(gateway.members, gateway.identity.name, sender, receiver)


def _busy(detail: str) -> Response:
    response = problem(503, "Service unavailable", detail)
    response.headers["retry-after"] = "1"
    return response


async def _read(request: Request, gateway: Gateway, limit: int) -> bytes | Response:
    """Read a peer message within ``limit`` and the gateway's read budget.

    The claimed sender and receiver are checked as soon as the header has
    arrived (see :func:`_claimed`). Returns the body, or a 503 answer when
    the budget of bytes being read at once is spent.

    Raises:
        PayloadTooLarge: If the body is larger than ``limit``.
        PeerMessageRejected: If the header names a non-member or another server.
    """
    too_large = f"peer message is larger than the limit of {limit} bytes"
    declared = request.headers.get("content-length", "")
    reserved = int(declared) if declared.isdigit() else 0
    if reserved > limit:
        raise PayloadTooLarge(too_large)
    busy = "this server is receiving too many peer messages at once; retry shortly"
    if gateway.reading_bytes + reserved > PEER_READ_BYTES:
        return _busy(busy)
    gateway.reading_bytes += reserved
    try:
        body = bytearray()
        claim: tuple[str, str] | str | None = _MORE
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise PayloadTooLarge(too_large)
            if len(body) > reserved:
                if gateway.reading_bytes + len(body) - reserved > PEER_READ_BYTES:
                    return _busy(busy)
                gateway.reading_bytes += len(body) - reserved
                reserved = len(body)
            if claim == _MORE:
                claim = _claimed(bytes(body[: MAX_HEADER_BYTES + 6]))
                if isinstance(claim, tuple):
                    _check_claim(gateway, claim)
        return bytes(body)
    finally:
        gateway.reading_bytes -= reserved


async def receive(request: Request) -> Response:
    """``POST /v1/peer``: verify, refuse replays, hand on to the session."""
    state: State = request.app.state.fdrtd
    gateway: Gateway | None = state.extra.get("gateway")
    if gateway is None:
        raise ServiceUnavailable("the peer gateway is not running yet; retry shortly")
    if gateway.reading >= MAX_PEER_READS:
        return _busy("this server is receiving too many peer messages at once; retry shortly")
    gateway.reading += 1
    try:
        gateway.reload_members()
        limit = max(state.settings.max_body_bytes, MAX_PEER_MESSAGE)
        body = await _read(request, gateway, limit)
        if isinstance(body, Response):
            return body
        message = open_envelope(gateway.identity, gateway.members, body, max_age=MAX_AGE)
    except PeerMessageRejected as error:
        gateway.rejections.rejected("peer", "", error.reason)
        return problem(403, "Peer message rejected", str(error))
    finally:
        gateway.reading -= 1
    try:
        first = gateway.replays.first_time(message)
    except ServiceUnavailable as error:
        gateway.rejections.rejected(message.sender, message.session, "busy")
        return _busy(error.message)
    if not first:
        gateway.rejections.rejected(message.sender, message.session, "replay")
        raise Conflict("this peer message was already received (replay)")
    if message.session == directory.SESSION:
        # a heartbeat for the federation directory: no computation's session
        return await directory.received(state, gateway, message)
    refusal = await gateway.refusal(message)
    if refusal is not None:
        if message.tag != ALIVE_TAG:  # a heartbeat crossing the end is routine
            gateway.rejections.rejected(message.sender, message.session, "gone")
        return problem(410, "Gone", f"session '{message.session}' {refusal}")
    await gateway.hand_on(message)
    return Response(_ACCEPTED, status_code=202, media_type="application/json")


_ACCEPTED = json.dumps({"accepted": True}).encode()
_ENDED = "has ended on this server; its messages are no longer accepted"
_BEFORE_START = (
    "is not run by this server, and this message was sealed before the server started: "
    "only its previous run could have taken it"
)


class PeerFastPath:
    """The controller app, with ``POST /v1/peer`` served ahead of its routing.

    Peer messages are the most frequent requests of a computation (a secure sum
    of three parties takes four per server). Starlette's middleware stack and
    its route matching cost about 70 microseconds of CPU per request here, so
    this ASGI wrapper hands that one route straight to :func:`receive`, with the
    same error answers the app gives (problem documents, 500 with an incident
    id). Everything else, ``/v1/peer`` with other methods included, goes to the
    app unchanged.
    """

    def __init__(self, app: Starlette) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive_: Receive, send: Send) -> None:
        """Serve one ASGI connection scope."""
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] != scope.get("root_path", "") + PEER_PATH
        ):
            await self.app(scope, receive_, send)
            return
        scope["app"] = self.app  # what Starlette sets, for request.app
        request = Request(scope, receive_)
        try:
            response = await receive(request)
        except FdrtdError as error:
            response = problem(error.status, error.title, error.message)
        except Exception as error:  # answered as the app's own handler does
            response = await internal_error(request, error)
        await response(scope, receive_, send)


def routes() -> list[Route]:
    """The gateway's HTTP route."""
    return [Route(PEER_PATH, receive, methods=["POST"])]
