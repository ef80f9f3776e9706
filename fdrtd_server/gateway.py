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
One HTTP port per server, so a reverse proxy with TLS in front of it is all a
deployment needs.

Replays are refused at three levels:

1. The gateway remembers the triple sender/session/sequence number of every
   message it accepted (:class:`ReplayGuard`) for as long as the envelope's
   timestamp is fresh, and answers a repeat with 409; later the envelope is
   refused as stale anyway (403).
2. A session drops any (sender, sequence number) it has already taken, so a
   replay cannot feed a protocol twice even if the gateway forgot it (its
   memory does not survive a restart).
3. Session ids are single use on every server (recorded in JetStream), so a
   message of a finished session never reaches a protocol again.

When the gateway runs in the same process as the protocol microservices, they
call it directly (:class:`fdrtd_server.peers.GatewayLink`) instead of through
``fdrtd.peer.out``: the same requests and answers without two bus hops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import OrderedDict
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nats.aio.msg import Msg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from fdrtd_client import wire
from fdrtd_server._http import HttpError, PeerHttpClient
from fdrtd_server.app import State, internal_error, problem, read_limited
from fdrtd_server.bus import PEER_IN_PREFIX, PEER_OUT_SUBJECT, PEER_SEEDS_SUBJECT
from fdrtd_server.envelope import (
    SESSION_PATTERN as SESSION_RULE,
)
from fdrtd_server.envelope import (
    OpenedMessage,
    PeerMessageRejected,
    open_envelope,
    replay_key,
    seal,
)
from fdrtd_server.errors import Conflict, FdrtdError, ServiceUnavailable
from fdrtd_server.identity import Identity, PeerEntry, load_federation
from fdrtd_server.peers import Incoming, PeerInbox

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
REPLAY_KEYS = 250_000
"""At most this many accepted messages are remembered (about 55 MB at most; 830 messages
a second for the 5 minutes an envelope stays fresh); beyond, the oldest are forgotten,
and a session still drops a message it has already taken."""


class ReplayGuard:
    """The messages accepted while their timestamps are fresh, to refuse a second copy."""

    def __init__(self, max_age: float = MAX_AGE, limit: int = REPLAY_KEYS) -> None:
        self.max_age = max_age
        self.limit = limit
        self._until: OrderedDict[str, float] = OrderedDict()

    def first_time(self, message: OpenedMessage, now: float | None = None) -> bool:
        """Record ``message``; False if it was recorded before (a replay)."""
        clock = time.time() if now is None else now
        while self._until and (
            len(self._until) >= self.limit or next(iter(self._until.values())) < clock
        ):
            self._until.popitem(last=False)
        key = replay_key(message)
        if key in self._until:
            return False
        # after this the envelope is stale (refused anyway); the margin covers rounding
        self._until[key] = max(clock, message.ts) + self.max_age + 1.0
        return True


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
        self.http = PeerHttpClient(timeout=SEND_TIMEOUT)
        self.replays = ReplayGuard()
        self._shared: dict[bytes, bytes] = {}
        self.sending: set[asyncio.Task[None]] = set()
        self.local: PeerInbox | None = None
        """The inbox of the microservices in this process, if they run here."""
        self.subscription: Any = None
        self.seed_subscription: Any = None

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
        try:
            status, answer, retried = await self.http.post(peer.url, "/v1/peer", body, wire.MSGPACK)
        except (HttpError, TimeoutError) as error:
            return 503, f"cannot reach party '{peer.name}': {type(error).__name__}"
        if retried and status == 409:
            # the first attempt reached the peer before its connection failed:
            # this very envelope was delivered, and its second copy refused
            return 202, ""
        if status >= 300:
            try:
                detail = str(json.loads(answer).get("detail", ""))
            except (ValueError, AttributeError):
                detail = ""
            return status, f"party '{peer.name}' refused the message: {detail}"
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
        """``fdrtd.peer.out``: :meth:`outgoing` for microservices in other processes."""
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

    async def hand_on(self, message: OpenedMessage) -> None:
        """Give a verified message to its session: here if it runs here, else over NATS."""
        incoming = Incoming(
            message.session, message.sender, message.tag, message.seq, message.payload
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


async def stop(state: State) -> None:
    """Stop serving outgoing messages."""
    gateway: Gateway | None = state.extra.pop("gateway", None)
    if gateway is None:
        return
    with contextlib.suppress(Exception):
        await gateway.subscription.unsubscribe()
        await gateway.seed_subscription.unsubscribe()
    for task in list(gateway.sending):
        task.cancel()
    if gateway.sending:
        await asyncio.wait(gateway.sending, timeout=5.0)
    await gateway.http.close()


async def receive(request: Request) -> Response:
    """``POST /v1/peer``: verify, refuse replays, hand on to the session."""
    state: State = request.app.state.fdrtd
    gateway: Gateway | None = state.extra.get("gateway")
    if gateway is None:
        raise ServiceUnavailable("the peer gateway is not running yet; retry shortly")
    settings = state.settings
    limit = max(settings.max_body_bytes, MAX_PEER_MESSAGE)
    body = await read_limited(request, limit, "peer message")
    gateway.reload_members()
    try:
        message = open_envelope(gateway.identity, gateway.members, bytes(body), max_age=MAX_AGE)
    except PeerMessageRejected as error:
        state.audit.write("peer", "peer-message", "", f"rejected {error.reason}")
        return problem(403, "Peer message rejected", str(error))
    if not gateway.replays.first_time(message):
        state.audit.write(message.sender, "peer-message", message.session, "rejected replay")
        raise Conflict("this peer message was already received (replay)")
    await gateway.hand_on(message)
    return Response(_ACCEPTED, status_code=202, media_type="application/json")


_ACCEPTED = json.dumps({"accepted": True}).encode()


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
