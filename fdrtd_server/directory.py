"""The federation directory: which members are up, and where to reach them.

One member server, or several, keep a directory (``[server] directory =
true``); every member names them (``directories = ["alpha"]``) and sends each
a *heartbeat* every ``directory_interval`` seconds (10 s by default). An
analyst asks a directory ``GET /v1/directory`` for the live members, then asks
each member's own catalogue what she may use there: the directory lists
servers, never datasets, because each server decides per caller what that
caller may see.

Heartbeats travel through the signed peer channel, like protocol messages:
an envelope (:mod:`fdrtd_server.envelope`) of the reserved session
:data:`SESSION` with the tag :data:`TAG`, sealed for the directory, signed by
the member and POSTed to the directory's ``/v1/peer``. So a heartbeat is
accepted only from a member of the directory's federation file, with a valid
signature, fresh, and once (the gateway's
:class:`~fdrtd_server.gateway.ReplayGuard`); anything else is refused and
audited by the gateway as any peer message is. The session id is shorter than
any computation's (clients must choose at least 22 characters), so no
computation can ever share it. The sequence number is the sender's clock in
nanoseconds (made strictly increasing), so that heartbeats of a member that
restarted are never taken for replays of its earlier run.

Payload (msgpack)::

    {"name": str, "url": str, "datasets": int | None, "interval": float}

``name`` must be the envelope's signer; ``url`` is the member's public URL
(its own, signed word, as ``public_url`` sets it); ``datasets`` is None: fdrtd
servers do not tell how many datasets they hold (to anyone without a grant,
a dataset does not exist), the field is kept for the wire format; ``interval`` is
its heartbeat interval, so that the directory drops it after
:data:`SILENT_INTERVALS` of *its* intervals without a heartbeat.

The directory keeps the listing in the memory of its controller process, not
in JetStream: it is soft state that every member sends again every interval,
so after a restart of the directory the listing is whole again within one
interval; a key-value bucket's TTL is one for the whole bucket (nats-py has
no per-key TTL) and could not follow each member's own interval; and only the
controller, which verifies the heartbeats, reads it. A directory lists itself
(without a message to itself) as long as its own heartbeat task runs.

A member's first heartbeat into the listing, and its return after it dropped
out, are audited (``directory-register``); the heartbeats in between are not,
so that a member sending one every few seconds does not fill the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgpack
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fdrtd_server.envelope import OpenedMessage, seal
from fdrtd_server.errors import NotFound
from fdrtd_server.http_common import State, authenticate, problem, respond
from fdrtd_server.identity import Identity, PeerEntry, _check_url

if TYPE_CHECKING:
    from fdrtd_server.gateway import Gateway

__all__ = [
    "PATH",
    "SESSION",
    "SILENT_INTERVALS",
    "TAG",
    "Directory",
    "heartbeat_envelope",
    "received",
    "routes",
    "start",
    "stop",
]

log = logging.getLogger("fdrtd.directory")

PATH = "/v1/directory"
SESSION = "directory"
"""The session id of every directory message: shorter than any computation's (at least 22)."""
TAG = "directory.heartbeat"
"""The tag of a heartbeat (a registration is a member's first heartbeat)."""
SILENT_INTERVALS = 3
"""A member silent for this many of its heartbeat intervals drops out of the listing."""
MAX_INTERVAL = 3600.0
"""The longest heartbeat interval a directory accepts (the setting's own bound)."""
MAX_DATASETS = 2**31 - 1
DATASET_COUNT_WAIT = 2.0
"""Seconds a heartbeat waits for the count of published datasets before it goes without."""
_PAYLOAD_KEYS = frozenset({"name", "url", "datasets", "interval"})


class HeartbeatRefused(ValueError):
    """A verified heartbeat whose payload breaks the format (answered 400)."""


@dataclass
class Listing:
    """One member as the directory last heard of it.

    Attributes:
        name: The member's name (the heartbeat's verified signer).
        url: The public URL the member gave.
        datasets: How many datasets it publishes, if it said.
        interval: Its heartbeat interval, in seconds.
        seen: When its last heartbeat arrived (``time.monotonic()``).
        seen_at: The same moment as an ISO 8601 time (UTC).
        sent: The sender's timestamp of that heartbeat (a late, older one changes nothing).
    """

    name: str
    url: str
    datasets: int | None
    interval: float
    seen: float
    seen_at: str
    sent: float

    def alive(self, now: float) -> bool:
        """Whether the member has sent a heartbeat within :data:`SILENT_INTERVALS` intervals."""
        return now - self.seen <= SILENT_INTERVALS * self.interval

    def to_dict(self) -> dict[str, Any]:
        """The listing as ``GET /v1/directory`` shows it."""
        return {
            "name": self.name,
            "url": self.url,
            "last_seen": self.seen_at,
            "datasets": self.datasets,
        }


class Directory:
    """The listing a directory server keeps: members and their last heartbeats.

    Args:
        name: This (the directory) server's name.
        audit: Where joins are recorded; anything with the audit log's ``write``.
    """

    def __init__(self, name: str, audit: Any) -> None:
        self.name = name
        self.audit = audit
        self.entries: dict[str, Listing] = {}

    def record(
        self,
        name: str,
        url: str,
        datasets: int | None,
        interval: float,
        sent: float,
        now: float | None = None,
    ) -> None:
        """Note a heartbeat of ``name`` (already verified); audit it if the member (re)joins."""
        clock = time.monotonic() if now is None else now
        entry = self.entries.get(name)
        joined = entry is None or not entry.alive(clock)
        if entry is not None and sent < entry.sent and not joined:
            # an older heartbeat that arrived late (a sender's retry): it says the
            # member was alive, but its URL and count are not the newest
            entry.seen = max(entry.seen, clock)
            return
        self.entries[name] = Listing(
            name=name,
            url=url,
            datasets=datasets,
            interval=interval,
            seen=clock,
            seen_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
            sent=sent,
        )
        if joined:
            self.audit.write(name, "directory-register", name, "joined", url=url)

    def live(self, members: Collection[str], now: float | None = None) -> list[dict[str, Any]]:
        """The members heard from lately, by name; those no longer in ``members`` are left out.

        Entries silent for long are forgotten here, so the listing never grows
        beyond the federation.
        """
        clock = time.monotonic() if now is None else now
        listed = []
        for name in sorted(self.entries):
            entry = self.entries[name]
            if name not in members:
                del self.entries[name]  # removed from the federation file
            elif entry.alive(clock):
                listed.append(entry.to_dict())
            elif clock - entry.seen > 10 * SILENT_INTERVALS * entry.interval:
                del self.entries[name]
        return listed


def heartbeat_payload(name: str, url: str, datasets: int | None, interval: float) -> bytes:
    """The msgpack payload of a heartbeat (see the module's docstring)."""
    packed: bytes = msgpack.packb(
        {"name": name, "url": url, "datasets": datasets, "interval": float(interval)}
    )
    return packed


def heartbeat_envelope(
    identity: Identity,
    directory: PeerEntry,
    *,
    url: str,
    seq: int,
    datasets: int | None = None,
    interval: float = 10.0,
    now: float | None = None,
) -> bytes:
    """Seal one heartbeat of ``identity`` for the directory ``directory``.

    Args:
        identity: The member sending it.
        directory: The directory's federation entry.
        url: The member's public URL.
        seq: A number never used before by this member for :data:`SESSION`.
        datasets: How many datasets the member publishes, if it says.
        interval: The member's heartbeat interval, in seconds.
        now: The timestamp to seal with (default: now).

    Returns:
        The envelope, for the directory's ``POST /v1/peer``.
    """
    payload = heartbeat_payload(identity.name, url, datasets, interval)
    return seal(identity, directory, session=SESSION, seq=seq, tag=TAG, payload=payload, now=now)


def parse_heartbeat(message: OpenedMessage) -> tuple[str, int | None, float]:
    """The ``(url, datasets, interval)`` of a verified heartbeat.

    Raises:
        HeartbeatRefused: If the tag or the payload breaks the format, or the
            payload names another member than the one that signed it.
    """
    if message.tag != TAG:
        raise HeartbeatRefused(f"a directory message must have the tag '{TAG}'")
    try:
        payload = msgpack.unpackb(
            message.payload,
            raw=False,
            strict_map_key=True,
            max_str_len=4096,
            max_bin_len=0,
            max_array_len=0,
            max_map_len=16,  # a few more than the fields, to name the rule below
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException):
        raise HeartbeatRefused("a heartbeat's payload must be a msgpack map") from None
    if not isinstance(payload, dict) or payload.keys() != _PAYLOAD_KEYS:
        raise HeartbeatRefused(
            "a heartbeat's payload must have exactly the fields " + ", ".join(sorted(_PAYLOAD_KEYS))
        )
    if payload["name"] != message.sender:
        raise HeartbeatRefused("a heartbeat must name the member that signed it")
    try:
        url = _check_url(payload["url"])
    except ValueError as error:
        raise HeartbeatRefused(f"a heartbeat's {error}") from None
    datasets = payload["datasets"]
    if datasets is not None and (
        not isinstance(datasets, int)
        or isinstance(datasets, bool)
        or not 0 <= datasets <= MAX_DATASETS
    ):
        raise HeartbeatRefused(
            f"a heartbeat's `datasets` must be null or an integer from 0 to {MAX_DATASETS}"
        )
    interval = payload["interval"]
    if (
        not isinstance(interval, int | float)
        or isinstance(interval, bool)
        or not math.isfinite(interval)
        or not 0 < interval <= MAX_INTERVAL
    ):
        raise HeartbeatRefused(
            f"a heartbeat's `interval` must be a number of seconds, above 0 and at most "
            f"{MAX_INTERVAL:g}"
        )
    return url, datasets, float(interval)


async def received(state: State, gateway: Gateway, message: OpenedMessage) -> Response:
    """Take a verified, fresh, first-time directory message (``POST /v1/peer``).

    Returns:
        202 when it is recorded; 404 (a problem document) on a server that
        keeps no directory; 400 when the payload breaks the format. Refusals
        are audited as the gateway audits any rejected peer message.
    """
    directory: Directory | None = state.extra.get("directory")
    if directory is None:
        gateway.rejections.rejected(message.sender, message.session, "not_a_directory")
        return problem(
            404,
            "Not found",
            f"server '{state.settings.name}' is not a directory; its 'directory' setting is false",
        )
    try:
        url, datasets, interval = parse_heartbeat(message)
    except HeartbeatRefused as error:
        gateway.rejections.rejected(message.sender, message.session, "malformed_heartbeat")
        return problem(400, "Bad request", str(error))
    directory.record(message.sender, url, datasets, interval, message.ts)
    return Response(b'{"accepted":true}', status_code=202, media_type="application/json")


async def list_directory(request: Request) -> Response:
    """``GET /v1/directory``: the live members (any authenticated caller).

    Raises:
        Unauthorized: Without a valid token.
        NotFound: On a server that keeps no directory.
    """
    principal = authenticate(request)
    state: State = request.app.state.fdrtd
    directory: Directory | None = state.extra.get("directory")
    if directory is None:
        state.audit.write(principal.name, "directory", "", "refused 404")
        raise NotFound(
            f"server '{state.settings.name}' is not a directory (its 'directory' setting is "
            "false); ask a server whose 'directory' setting is true"
        )
    gateway: Gateway | None = state.extra.get("gateway")
    members: set[str] = {state.settings.name}
    if gateway is not None:
        gateway.reload_members()
        members.update(gateway.members)
    listed = directory.live(members)
    state.audit.write(principal.name, "directory", "", "ok", members=len(listed))
    return respond(request, {"directory": state.settings.name, "members": listed})


def routes() -> list[Route]:
    """The directory's HTTP route (on every server; a non-directory answers 404)."""
    return [Route(PATH, list_directory, methods=["GET"])]


# -- the member's side: heartbeats ----------------------------------------------


DatasetCount = Callable[[], Awaitable[int | None]]
"""What ``state.extra["dataset_count"]`` may hold: how many datasets this server publishes."""


class Heartbeats:
    """The task that sends this server's heartbeats to each directory it names.

    One loop per directory, so a directory that does not answer (up to the
    gateway's send timeout) delays no other's heartbeats. Each loop beats at
    a fixed rate; a beat that took longer than an interval skips the slots it
    missed. Failing heartbeats are logged once two in a row have failed (the
    first is often only a directory that is starting too), and once more when
    they reach it again, not on every beat.
    """

    def __init__(self, state: State) -> None:
        self.state = state
        self.settings = state.settings
        self.tasks: list[asyncio.Task[None]] = []
        self._last_seq = 0

    def start(self) -> None:
        """Start one loop per directory (this server's own listing included, if it keeps one)."""
        targets = list(dict.fromkeys(self.settings.directories))
        if self.settings.directory and self.settings.name not in targets:
            targets.append(self.settings.name)
        for target in targets:
            self.tasks.append(asyncio.create_task(self._loop(target), name=f"heartbeat-{target}"))

    async def stop(self) -> None:
        """Stop every loop."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()

    def _next_seq(self) -> int:
        """A sequence number above every one used before, by this run or (by the clock) earlier."""
        self._last_seq = max(time.time_ns(), self._last_seq + 1)
        return self._last_seq

    async def _datasets(self) -> int | None:
        count: DatasetCount | None = self.state.extra.get("dataset_count")
        if count is None:
            return None
        try:
            async with asyncio.timeout(DATASET_COUNT_WAIT):
                value = await count()
        except Exception as error:  # the count is optional: the heartbeat goes without it
            log.warning("could not count the published datasets: %s", type(error).__name__)
            return None
        return value if isinstance(value, int) and 0 <= value <= MAX_DATASETS else None

    async def beat(self, target: str) -> tuple[int, str]:
        """Send one heartbeat to ``target``; ``(status, detail for a person)``."""
        datasets = await self._datasets()
        url = self.settings.url
        interval = self.settings.directory_interval
        if target == self.settings.name:
            directory: Directory | None = self.state.extra.get("directory")
            if directory is None:
                return 404, f"this server ('{target}') is not a directory"
            directory.record(target, url, datasets, interval, time.time())
            return 202, ""
        gateway: Gateway | None = self.state.extra.get("gateway")
        if gateway is None:
            return 503, "the peer gateway is not running"
        answer = await gateway.outgoing(
            {
                "to": target,
                "session": SESSION,
                "seq": self._next_seq(),
                "tag": TAG,
                "payload": heartbeat_payload(self.settings.name, url, datasets, interval),
            }
        )
        return int(answer["status"]), str(answer.get("detail", ""))

    async def _loop(self, target: str) -> None:
        interval = self.settings.directory_interval
        failures = 0
        warned: str | None = None
        next_beat = time.monotonic()
        while True:
            try:
                status, detail = await self.beat(target)
            except Exception as error:  # never end the loop: the next beat may succeed
                log.exception("a heartbeat to directory '%s' failed", target)
                status, detail = 500, type(error).__name__
            if status < 300:
                if warned is not None:
                    log.warning("heartbeats reach directory '%s' again", target)
                failures, warned = 0, None
            else:
                failures += 1
                # the first one is often only the directory still starting, as we are
                if failures >= 2 and detail != warned:
                    log.warning("heartbeats to directory '%s' fail: %s", target, detail)
                    warned = detail
            next_beat += interval
            now = time.monotonic()
            if next_beat < now:  # the beat took longer than an interval
                next_beat = now + interval - (now - next_beat) % interval
            await asyncio.sleep(next_beat - now)


async def start(state: State) -> None:
    """Keep a directory if this server is one, and start heartbeating to every directory."""
    if state.settings.directory:
        state.extra["directory"] = Directory(state.settings.name, state.audit)
    if state.settings.directory or state.settings.directories:
        heartbeats = Heartbeats(state)
        state.extra["heartbeats"] = heartbeats
        heartbeats.start()


async def stop(state: State) -> None:
    """Stop the heartbeats (before the gateway stops)."""
    heartbeats: Heartbeats | None = state.extra.pop("heartbeats", None)
    if heartbeats is not None:
        with contextlib.suppress(Exception):
            await heartbeats.stop()
