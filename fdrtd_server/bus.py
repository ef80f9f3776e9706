"""The bus: subject names, handles, and the JetStream buckets we keep state in.

Everything a server remembers lives in JetStream with file storage, so that
uploaded data and finished results survive a restart and any number of
controllers and workers on the same NATS see the same state:

================  =============  ===========================================
bucket            kind           holds
================  =============  ===========================================
``fdrtd_data``    object store   uploaded datasets, by data handle
``fdrtd_sets``    key-value      dataset descriptions (owner, format, columns)
``fdrtd_jobs``    key-value      computation state, progress, results up to 16 MiB
``fdrtd_sessions`` key-value     computation session ids already used (never reused)
``fdrtd_results`` object store   results too large for a key-value entry
``fdrtd_running`` key-value      jobs running on past their start request, by runner
``fdrtd_runners`` key-value      liveness keys of the processes running jobs (expire)
``fdrtd_budgets`` key-value      privacy budget spent per named dataset, exactly
================  =============  ===========================================

Every bucket is bounded (``max_bytes``, with JetStream's "discard new"
policy): a full bucket refuses new writes, which the client sees as
``507 Insufficient Storage`` (:class:`InsufficientStorage`), and never drops
what it holds nor fills the disk that the other buckets (and the other
servers on the machine) need. :class:`StoreLimits` says how the bytes are
shared out.

Peer messages are deliberately *not* kept: they are masked values of one live
session, which exists only in the memory of the process running it, so the
gateway hands them to that process directly or over core NATS
(``fdrtd.peer.in.<session>``) and nothing of them ever reaches a disk.

Subjects follow ``fdrtd.<area>.<name>``; they are constants here so that a
name is written once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import sha256
from typing import TYPE_CHECKING, Any

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from fdrtd_client import wire
from fdrtd_server.errors import (
    BadRequest,
    FdrtdError,
    InsufficientStorage,
    NotFound,
    ServiceUnavailable,
)

if TYPE_CHECKING:
    from fdrtd_server.config import Settings

__all__ = [
    "DATA_BUCKET",
    "JOBS_BUCKET",
    "PEER_IN_PREFIX",
    "PEER_OUT_SUBJECT",
    "PEER_SEEDS_SUBJECT",
    "SERVICE_PREFIX",
    "Bus",
    "InsufficientStorage",
    "JobRecord",
    "RecordChanged",
    "StoreLimits",
    "new_handle",
    "parse_handle",
]

SERVICE_PREFIX = "fdrtd.svc"
"""Microservice endpoints listen on ``fdrtd.svc.<microservice>.<function>``."""
QUEUE_GROUP = "fdrtd"
PEER_OUT_SUBJECT = "fdrtd.peer.out"
"""Protocols request here to send a message to another party's server."""
PEER_SEEDS_SUBJECT = "fdrtd.peer.seeds"
"""Protocols request here the pairwise seeds of a session (key agreement)."""
PEER_IN_PREFIX = "fdrtd.peer.in"
"""Verified incoming peer messages: ``fdrtd.peer.in.<session>``."""
LEGACY_PEER_STREAM = "FDRTD_PEER"
"""Where earlier versions kept peer messages on disk; removed when found."""
DATA_BUCKET = "fdrtd_data"
SETS_BUCKET = "fdrtd_sets"
SESSIONS_BUCKET = "fdrtd_sessions"
JOBS_BUCKET = "fdrtd_jobs"
RESULTS_BUCKET = "fdrtd_results"
RUNNING_BUCKET = "fdrtd_running"
RUNNERS_BUCKET = "fdrtd_runners"
VERSIONS_BUCKET = "fdrtd_versions"
"""The released version of each named dataset (see :mod:`fdrtd_server.custody`)."""
BUDGETS_BUCKET = "fdrtd_budgets"
"""The differential privacy budget spent on each named dataset (:mod:`fdrtd_server.privacy`)."""
_VERSION_KEY = "_key"
"""The entry of the versions bucket holding :meth:`Bus.version_key` (no dataset name
starts with ``_``)."""
RUNNER_TTL = 20.0
"""Seconds a runner's liveness key lives after its last write (see :mod:`fdrtd_server.runners`)."""
OBJECT_CACHE_BYTES = 256 * 1024 * 1024
OBJECT_CACHE_ITEM = 16 * 1024 * 1024
REREAD = 0.5
"""Seconds a long poll waits for an update before it reads the job record again."""
INLINE_RESULT_LIMIT = 16 * 1024 * 1024
"""Results up to this size live in the job's key-value entry (one fast read); larger
ones go to the results object store. An external NATS needs ``max_payload`` above it."""
SET_CACHE_SIZE = 10_000
CHUNK_SIZE = 1024 * 1024
HANDLE_KINDS = {"data": "d", "result": "r"}
_HANDLE_RULE = re.compile(r"^([dr])-([0-9a-f]{40})$")
GiB = 1024**3
MIN_STORE_BYTES = 1 * GiB
"""The smallest store :meth:`StoreLimits.from_settings` derives."""
ACK_TIMEOUT = 30.0
"""Seconds an upload waits for JetStream to acknowledge a chunk before it gives up."""
ACK_WINDOW = 64
"""Upload chunks (of :data:`CHUNK_SIZE`) sent ahead of their acknowledgements."""
_STORE_FULL = frozenset({10077, 10047})
"""JetStream ``err_code`` of "maximum bytes exceeded" (the bucket is full) and of
"insufficient storage resources available" (the server's disk budget is)."""
_SMALLEST_BUCKET = 1024 * 1024
_PROBE_STREAM = "FDRTD_PROBE"
"""A stream made and deleted at once, to learn how much JetStream can reserve."""
"""Never create a bucket smaller than this, however little JetStream can reserve."""

log = logging.getLogger("fdrtd.bus")


@dataclass(frozen=True)
class StoreLimits:
    """How many bytes each JetStream bucket may hold.

    The data object store gets most of the total; results, job records,
    dataset descriptions and session ids share the rest. Every number is a
    JetStream ``max_bytes``, which the server *reserves* when it creates the
    bucket: if it cannot (an embedded nats-server allows 75 % of the disk
    space free at its start), :meth:`Bus.connect` first shares out what
    JetStream can reserve (derived limits), and then halves any bucket that
    still does not fit until it does, and logs what it got.

    Attributes:
        data: ``fdrtd_data``, the uploaded datasets.
        results: ``fdrtd_results``, results too large for a key-value entry.
        jobs: ``fdrtd_jobs``, job records with results up to 16 MiB inline.
        records: ``fdrtd_sets``, ``fdrtd_sessions`` and ``fdrtd_running``, each.
        explicit: True when the server's owner set the total: an existing
            bucket is then re-bounded to it. Derived limits only bound a
            bucket that has no bound (one made by an earlier version).
    """

    data: int
    results: int
    jobs: int
    records: int
    explicit: bool = False

    @property
    def total(self) -> int:
        """The bytes all buckets reserve together."""
        return self.data + self.results + self.jobs + 3 * self.records + 3 * _SMALLEST_BUCKET

    @classmethod
    def of_total(cls, total: int, *, explicit: bool = False) -> StoreLimits:
        """Share ``total`` bytes out among the buckets.

        5/8 for datasets, 1/8 each for results and jobs, 1/32 each for
        descriptions, session ids and the list of running jobs: 31/32 in all,
        of which 1 MiB goes to the liveness keys of runners, the rest is headroom.

        Raises:
            ValueError: If ``total`` is below 32 MiB.
        """
        if total < 32 * _SMALLEST_BUCKET:
            raise ValueError(
                f"a JetStream store of {total} bytes is too small; give 32 MiB or more"
            )
        return cls(total * 5 // 8, total // 8, total // 8, total // 32, explicit)

    @classmethod
    def from_settings(cls, settings: Settings) -> StoreLimits:
        """The limits for a server's settings.

        ``max_store_bytes`` (the whole JetStream store of this server), when
        it is positive; otherwise a bound derived from the upload limit: room
        for eight of the largest uploads (64 GiB with the default
        ``max_upload_bytes``), at least :data:`MIN_STORE_BYTES`.
        """
        if settings.max_store_bytes > 0:
            return cls.of_total(settings.max_store_bytes, explicit=True)
        return cls.of_total(max(8 * settings.max_upload_bytes, MIN_STORE_BYTES))


DEFAULT_LIMITS = StoreLimits.of_total(64 * GiB)
"""The limits of a :class:`Bus` opened without any (those of the default settings)."""


class RecordChanged(Exception):
    """A job record was not at the revision a compare-and-set write expected.

    Someone else wrote it since: the sweep of orphaned jobs ended the job (its
    runner's liveness key had lapsed), or its owner released it.
    """

    def __init__(self, handle: str) -> None:
        super().__init__("the job record changed since this process last wrote it")
        self.handle = handle


def _store_error(error: APIError, what: str) -> FdrtdError:
    """The error a client sees when JetStream refuses to store ``what``."""
    if error.err_code in _STORE_FULL:
        return InsufficientStorage(
            f"this server's storage for {what} is full; release datasets and results "
            "that are no longer needed, or ask the server's owner to raise max_store_bytes"
        )
    return ServiceUnavailable(f"the bus refused to store {what} (JetStream error {error.err_code})")


async def _settled(make: Callable[[], Awaitable[Any]]) -> Any:
    """Run a stream creation, again after a pause while JetStream answers 10049.

    "error creating store for stream" (``err_code`` 10049) is what a stream
    creation can get right after another stream was deleted, while its store
    is still being removed; a moment later the same creation succeeds.
    """
    for pause in (0.05, 0.1, 0.2, 0.5, 1.0):
        try:
            return await make()
        except APIError as error:
            if error.err_code != 10049:
                raise
        await asyncio.sleep(pause)
    return await make()


def new_handle(kind: str) -> str:
    """Return a fresh, unguessable handle (160 random bits) of ``kind``."""
    return f"{HANDLE_KINDS[kind]}-{secrets.token_hex(20)}"


def parse_handle(text: Any, kind: str, field: str = "handle") -> str:
    """Check that ``text`` is a handle of ``kind``.

    Raises:
        BadRequest: Naming ``field`` if it is not one (the value is never echoed).
    """
    if not isinstance(text, str) or not (match := _HANDLE_RULE.fullmatch(text)):
        raise BadRequest(f"'{field}' must be a {kind} handle as returned by the server")
    if match.group(1) != HANDLE_KINDS[kind]:
        raise BadRequest(f"'{field}' must be a {kind} handle, not another kind of handle")
    return text


def now_iso() -> str:
    """The current time in ISO 8601, UTC."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class JobRecord:
    """The state of one computation, stored under its result handle."""

    owner: str
    microservice: str
    function: str
    status: str = "queued"  # queued -> running -> done | failed
    progress: float = 0.0
    created: str = ""
    updated: str = ""
    error_status: int = 0
    error: str = ""
    result: Any = None
    result_in_store: bool = False
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The inputs as the job's receipt states them (:func:`fdrtd_server.receipts.parameters_of`)."""
    session: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The multi-party session (``id``, ``parties``); empty for a job of this server alone."""
    output_sha256: str = ""
    """SHA-256 of the result's canonical bytes (:func:`fdrtd_client.receipts.output_sha256`)."""
    joint_sha256: str = ""
    """SHA-256 of the result without this party's own fields (``receipts.joint_sha256``)."""
    runner: str = ""
    """The id of the process running the job (see :mod:`fdrtd_server.runners`)."""
    datasets: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The version of each named dataset the job read, by name."""
    policy_version: str = ""
    """The version of this server's policy file the job ran under (stated in its result)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for msgpack."""
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        """Rebuild from :meth:`to_dict` output (keys of another version are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    @property
    def finished(self) -> bool:
        """True once the job is done or failed."""
        return self.status in ("done", "failed")


class Bus:
    """One NATS connection with the JetStream buckets fdrtd uses."""

    def __init__(self, nc: NatsClient, js: JetStreamContext) -> None:
        self.nc = nc
        self.js = js
        self.data: ObjectStore
        self.results: ObjectStore
        self.sets: KeyValue
        self.jobs: KeyValue
        self.sessions: KeyValue
        self.running: KeyValue
        self.runners: KeyValue
        self.versions: KeyValue
        self.budgets: KeyValue
        self._version_key: bytes | None = None
        self._object_cache: OrderedDict[str, bytes] = OrderedDict()
        self._object_cache_bytes = 0
        self._set_cache: OrderedDict[str, dict[str, Any]] | None = None

    @classmethod
    async def connect(
        cls, url: str, *, name: str = "fdrtd", limits: StoreLimits | None = None
    ) -> Bus:
        """Connect to NATS at ``url`` and open (or create) every bucket.

        Args:
            url: The NATS URL, with credentials if the server needs them (the
                embedded one always does). It is never logged.
            name: The connection's name, as NATS monitoring shows it.
            limits: How large each bucket may grow; :data:`DEFAULT_LIMITS` if
                not given.

        Raises:
            ServiceUnavailable: If NATS refuses the connection (wrong or missing
                credentials) or cannot be reached; the message names no secret.
        """
        from fdrtd_server._embedded_nats import redact_url

        refusals: list[str] = []

        async def refused(error: Exception) -> None:
            # nats-py's default callback logs whole tracebacks, once per retry;
            # the class name and the server's verdict are enough, and name no secret
            denied = "Authorization" in str(error)
            if denied:
                refusals.append("authorization refused")
            log.warning(
                "NATS connection error: %s%s",
                type(error).__name__,
                " (authorization refused)" if denied else "",
            )

        # (nats-py annotates reconnect_time_wait as int, but takes seconds as float)
        options: dict[str, Any] = {"reconnect_time_wait": 0.5}
        nc = NatsClient()
        try:
            await nc.connect(
                url,
                name=name,
                max_reconnect_attempts=5,
                connect_timeout=5,
                error_cb=refused,
                **options,
            )
        except (nats.errors.Error, OSError) as error:
            await nc.close()  # a refused connection leaves its socket open otherwise
            if "Authorization" in str(error):
                refusals.append("authorization refused")
            reason = refusals[-1] if refusals else "no answer"
            raise ServiceUnavailable(
                f"cannot connect to NATS at {redact_url(url)} ({reason}); check the NATS URL "
                "and its credentials"
            ) from None
        bus = cls(nc, nc.jetstream(timeout=10))
        try:
            await bus._open(limits or DEFAULT_LIMITS)
        except BaseException:
            await nc.close()
            raise
        return bus

    async def _bounded(
        self, bucket: str, stream: str, max_bytes: int, explicit: bool, create: Any
    ) -> None:
        """Bound an existing bucket's stream, or create it with the largest bound that fits.

        ``create(max_bytes)`` creates the bucket. JetStream reserves a stream's
        ``max_bytes`` when it is created and refuses what it cannot reserve
        (``err_code`` 10047), so the bound is halved until it fits.
        """
        try:
            info = await self.js.stream_info(stream)
        except NotFoundError:
            info = None
        if info is None:
            wanted = max_bytes
            while True:
                try:
                    await _settled(functools.partial(create, max_bytes))
                    break
                except APIError as error:
                    if error.err_code == 10058:  # another process created it just now
                        return
                    if error.err_code != 10047 or max_bytes // 2 < _SMALLEST_BUCKET:
                        raise
                    max_bytes //= 2
            if max_bytes != wanted:
                # derived limits are a ceiling nobody asked for: a smaller bucket is the
                # expected outcome on a small disk, not a problem; an owner's own
                # max_store_bytes that does not fit is one
                log.log(
                    logging.WARNING if explicit else logging.INFO,
                    "JetStream could not reserve %d bytes for '%s' (max_store_bytes); it is "
                    "bounded to %d bytes: free disk space, or lower max_store_bytes",
                    wanted,
                    bucket,
                    max_bytes,
                )
            return
        config = info.config
        current = config.max_bytes if config.max_bytes is not None else -1
        if current == max_bytes or (current > 0 and not explicit):
            return
        used = info.state.bytes
        if config.discard != js_api.DiscardPolicy.NEW or used > max_bytes:
            log.warning(
                "bucket '%s' keeps its bound of %d bytes: it holds %d bytes (or drops old "
                "entries when full), and a bound of %d bytes could lose data",
                bucket,
                current,
                used,
                max_bytes,
            )
            return
        try:
            await self.js.update_stream(dataclasses.replace(config, max_bytes=max_bytes))
        except APIError as error:
            log.warning(
                "bucket '%s' keeps its bound of %d bytes: JetStream refused %d bytes (%s)",
                bucket,
                current,
                max_bytes,
                error.description,
            )

    async def _kv(
        self, bucket: str, max_bytes: int, explicit: bool, ttl: float | None = None
    ) -> KeyValue:
        async def create(size: int) -> None:
            await self.js.create_key_value(
                js_api.KeyValueConfig(
                    bucket=bucket,
                    history=1,
                    direct=True,
                    max_bytes=size,
                    storage=js_api.StorageType.FILE,
                    ttl=ttl,
                )
            )

        await self._bounded(bucket, f"KV_{bucket}", max_bytes, explicit, create)
        return await self.js.key_value(bucket)

    async def _obs(self, bucket: str, max_bytes: int, explicit: bool) -> ObjectStore:
        async def create(size: int) -> None:
            await self.js.create_object_store(
                bucket,
                config=js_api.ObjectStoreConfig(
                    bucket=bucket, max_bytes=size, storage=js_api.StorageType.FILE
                ),
            )

        await self._bounded(bucket, f"OBJ_{bucket}", max_bytes, explicit, create)
        return await self.js.object_store(bucket)

    async def _open(self, limits: StoreLimits) -> None:
        explicit = limits.explicit
        if not explicit and not await self._all_buckets_exist():
            # derived limits are a ceiling: where JetStream cannot reserve them all
            # (less free disk than they need), share out what it can, so that every
            # bucket gets its part instead of the first ones taking everything
            try:
                room = await self._reservable(limits.total)
            except APIError as error:  # the probe itself failed: halve bucket by bucket
                log.info("could not learn what JetStream can reserve: %s", error)
                room = limits.total
            if room < limits.total:
                limits = StoreLimits.of_total(max(room * 15 // 16, 32 * _SMALLEST_BUCKET))
                log.info(
                    "JetStream can reserve %d bytes on this disk: the buckets share that",
                    room,
                )
        # smallest first: should a bucket still not fit, it is halved until it does,
        # and the datasets, last, take what is left
        self.runners = await self._kv(RUNNERS_BUCKET, _SMALLEST_BUCKET, explicit, RUNNER_TTL)
        self.versions = await self._kv(VERSIONS_BUCKET, _SMALLEST_BUCKET, explicit)
        self.budgets = await self._kv(BUDGETS_BUCKET, _SMALLEST_BUCKET, explicit)
        self.sets = await self._kv(SETS_BUCKET, limits.records, explicit)
        self.sessions = await self._kv(SESSIONS_BUCKET, limits.records, explicit)
        self.running = await self._kv(RUNNING_BUCKET, limits.records, explicit)
        self.jobs = await self._kv(JOBS_BUCKET, limits.jobs, explicit)
        self.results = await self._obs(RESULTS_BUCKET, limits.results, explicit)
        self.data = await self._obs(DATA_BUCKET, limits.data, explicit)
        # a stream on fdrtd.peer.in.> would capture (and write to disk) every
        # peer message published on the bus: remove one left by an old version
        with contextlib.suppress(NotFoundError):
            await self.js.delete_stream(LEGACY_PEER_STREAM)

    async def _all_buckets_exist(self) -> bool:
        names = {
            f"KV_{RUNNERS_BUCKET}",
            f"KV_{VERSIONS_BUCKET}",
            f"KV_{BUDGETS_BUCKET}",
            f"KV_{SETS_BUCKET}",
            f"KV_{SESSIONS_BUCKET}",
            f"KV_{RUNNING_BUCKET}",
            f"KV_{JOBS_BUCKET}",
            f"OBJ_{RESULTS_BUCKET}",
            f"OBJ_{DATA_BUCKET}",
        }
        for name in names:
            try:
                await self.js.stream_info(name)
            except NotFoundError:
                return False
        return True

    async def _reservable(self, wanted: int) -> int:
        """The most JetStream reserves for one more stream now, up to ``wanted`` bytes.

        Found by creating (and deleting) a probe stream: its bound is halved
        while JetStream refuses it (``err_code`` 10047), then bisected between
        the last refused and the first accepted bound, to within 1/64.
        """
        if await self._fits(wanted):
            return wanted
        low, high = 0, wanted
        while high // 2 >= _SMALLEST_BUCKET and not low:
            high //= 2
            if await self._fits(high):
                low, high = high, high * 2
        while low and high - low > low // 64:
            middle = (low + high) // 2
            if await self._fits(middle):
                low = middle
            else:
                high = middle
        return low

    async def _fits(self, size: int) -> bool:
        """Whether JetStream reserves ``size`` bytes for a new stream (tried and undone)."""
        # a name of its own each time: a stream deleted a moment ago may still be
        # being removed, and a new one of the same name then fails (err_code 10049)
        name = f"{_PROBE_STREAM}_{secrets.token_hex(8).upper()}"
        config = js_api.StreamConfig(
            name=name,
            subjects=[name.lower()],
            max_bytes=size,
            storage=js_api.StorageType.FILE,
        )
        try:
            await _settled(lambda: self.js.add_stream(config))
        except APIError as error:
            if error.err_code != 10047:
                raise
            return False
        with contextlib.suppress(NotFoundError):
            await self.js.delete_stream(name)
        return True

    @property
    def lost(self) -> bool:
        """True once the connection is closed for good (nats-py gave up reconnecting)."""
        return self.nc.is_closed

    def keep_reconnecting(self) -> None:
        """Try a lost connection again without end; the caller decides when to give up.

        A connection is opened to give up after a few attempts within seconds
        (what a short-lived tool wants). A server's own connections are watched
        instead, and given up after ``nats_reconnect_seconds`` (see
        :mod:`fdrtd_server.server`), long enough for an external NATS to restart.
        """
        self.nc.options["max_reconnect_attempts"] = -1

    @property
    def connected(self) -> bool:
        """True while the connection is up (False while reconnecting, and once closed)."""
        return bool(self.nc.is_connected)

    async def close(self) -> None:
        """Drain and close the connection; just close it if NATS is not reachable."""
        if self.nc.is_closed:
            return
        try:
            await self.nc.drain()
        except (nats.errors.ConnectionReconnectingError, nats.errors.ConnectionClosedError):
            # NATS went away: nothing can be drained, and reconnecting would only delay us
            await self.nc.close()

    async def abandon(self) -> None:
        """Close at once, for a NATS that is gone: fail the requests still waiting; never raises.

        nats-py's close leaves the futures of requests in flight pending, so a
        request sent while it was reconnecting would wait out its whole
        timeout; they fail here with ``ConnectionClosedError`` instead.
        """
        try:
            await self.nc.close()
        except Exception as error:
            # e.g. writing what was buffered to the dead socket: it is closed all the same
            log.debug("closing a NATS connection that is gone: %r", error)
        finally:
            waiting: dict[Any, asyncio.Future[Any]] = getattr(self.nc, "_resp_map", {})
            for future in list(waiting.values()):
                if not future.done():
                    future.set_exception(nats.errors.ConnectionClosedError())
            waiting.clear()

    # -- jobs running on past their start request -----------------------------

    async def list_running(self, handle: str, runner: str) -> None:
        """List ``handle`` as running on ``runner``.

        Raises:
            InsufficientStorage: If the bucket is full.
        """
        try:
            await self.running.put(handle, runner.encode())
        except APIError as error:
            raise _store_error(error, "running computations") from None

    async def unlist_running(self, handle: str) -> None:
        """Take ``handle`` off the list of running jobs.

        A purge of the key's subject, which (unlike a key-value delete) leaves no
        marker behind: a server that ran millions of jobs keeps an empty list.
        """
        with contextlib.suppress(APIError, NotFoundError):
            await self.js.purge_stream(
                f"KV_{RUNNING_BUCKET}", subject=f"$KV.{RUNNING_BUCKET}.{handle}"
            )

    # -- datasets --------------------------------------------------------------

    async def put_stream(self, name: str, chunks: AsyncIterator[bytes], limit: int) -> int:
        """Stream ``chunks`` into the data object store under ``name``.

        Compatible with the NATS object store format (``$O.<bucket>.C.<nuid>``
        chunks, then a meta message), but fed from an async iterator and with
        pipelined acknowledgements, so that an HTTP body goes to disk at bus
        speed while at most a few chunks sit in memory. The acknowledgements
        are read here rather than through nats-py's ``publish_async``, whose
        futures never complete when JetStream answers with an error (a full
        bucket): that would hang the upload instead of refusing it.

        Returns:
            The number of bytes stored.

        Raises:
            PayloadTooLarge: If more than ``limit`` bytes arrive (nothing is kept).
            InsufficientStorage: If the data bucket is full (nothing is kept).
            ServiceUnavailable: If JetStream does not acknowledge a chunk within
                :data:`ACK_TIMEOUT` or refuses it otherwise (nothing is kept).
        """
        from fdrtd_server.errors import PayloadTooLarge

        bucket = DATA_BUCKET
        nuid = self.nc._nuid.next().decode()
        chunk_subject = f"$O.{bucket}.C.{nuid}"
        digest = sha256()
        total = sent = 0
        buffer = bytearray()
        loop = asyncio.get_running_loop()
        pending: dict[str, asyncio.Future[None]] = {}
        failure: list[FdrtdError] = []
        inbox = self.nc.new_inbox()

        async def acknowledged(msg: Msg) -> None:
            future = pending.get(msg.subject)
            if future is None or future.done():
                return
            if msg.headers and msg.headers.get("Status") == "503":
                error: FdrtdError | None = ServiceUnavailable("JetStream is not available")
            else:
                try:
                    answer = json.loads(msg.data)
                except ValueError:
                    answer = {"error": {"code": 500, "err_code": 0}}
                problem = answer.get("error") if isinstance(answer, dict) else None
                error = None
                if problem:
                    fields = {k: problem.get(k) for k in ("code", "err_code", "description")}
                    error = _store_error(APIError(**fields), "uploaded data")
            if error is None:
                future.set_result(None)
            else:
                failure.append(error)
                future.set_exception(error)

        async def settle(count: int) -> None:
            """Wait for the acknowledgements of the ``count`` oldest chunks in flight."""
            replies = list(pending)[:count]
            try:
                async with asyncio.timeout(ACK_TIMEOUT):
                    await asyncio.gather(*(pending[reply] for reply in replies))
            except TimeoutError:
                raise ServiceUnavailable(
                    f"JetStream did not store an upload chunk within {ACK_TIMEOUT:g} s"
                ) from None
            for reply in replies:
                del pending[reply]

        async def flush(payload: bytes) -> None:
            nonlocal sent
            if failure:
                raise failure[0]
            reply = f"{inbox}.{sent}"
            pending[reply] = loop.create_future()
            await self.nc.publish(chunk_subject, payload, reply=reply)
            sent += 1
            if len(pending) >= ACK_WINDOW:
                await settle(ACK_WINDOW // 2)

        subscription = await self.nc.subscribe(f"{inbox}.*", cb=acknowledged)
        try:
            async for piece in chunks:
                total += len(piece)
                if total > limit:
                    raise PayloadTooLarge(
                        f"upload is larger than this server's limit of {limit} bytes"
                    )
                digest.update(piece)
                buffer += piece
                while len(buffer) >= CHUNK_SIZE:
                    await flush(bytes(buffer[:CHUNK_SIZE]))
                    del buffer[:CHUNK_SIZE]
            if buffer:
                await flush(bytes(buffer))
            await settle(len(pending))
            info = {
                "name": name,
                "bucket": bucket,
                "nuid": nuid,
                "size": total,
                "chunks": sent,
                "mtime": now_iso(),
                "digest": "SHA-256=" + base64.urlsafe_b64encode(digest.digest()).decode(),
                "options": {"max_chunk_size": CHUNK_SIZE},
            }
            meta_subject = f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
            try:
                await self.js.publish(
                    meta_subject, json.dumps(info).encode(), headers={"Nats-Rollup": "sub"}
                )
            except APIError as error:
                raise _store_error(error, "uploaded data") from None
        except BaseException:
            # chunks in flight are stored after a purge sent now: let them land first
            waiting = [future for future in pending.values() if not future.done()]
            if waiting:
                await asyncio.wait(waiting, timeout=ACK_TIMEOUT / 6)
            for future in pending.values():
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # retrieved: no "never retrieved" warning
            with contextlib.suppress(Exception):
                await self.js.purge_stream(f"OBJ_{bucket}", subject=chunk_subject)
            raise
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        return total

    async def put_object(self, name: str, data: bytes) -> None:
        """Store a whole dataset object under ``name`` (replacing one of that name).

        Raises:
            InsufficientStorage: If the data bucket is full.
        """
        try:
            await self.data.put(name, data)
        except APIError as error:
            raise _store_error(error, "uploaded data") from None

    async def read_object(self, name: str) -> bytes:
        """Read a whole dataset object (small ones are cached while the set cache is on)."""
        cached = self._object_cache.get(name)
        if cached is not None:
            self._object_cache.move_to_end(name)
            return cached
        try:
            result = await self.data.get(name)
        except NotFoundError:
            raise NotFound("no dataset with this handle") from None
        data = bytes(result.data or b"")
        if self._set_cache is not None and len(data) <= OBJECT_CACHE_ITEM:
            self._object_cache[name] = data
            self._object_cache_bytes += len(data)
            while self._object_cache_bytes > OBJECT_CACHE_BYTES:
                _, dropped = self._object_cache.popitem(last=False)
                self._object_cache_bytes -= len(dropped)
        return data

    async def delete_object(self, name: str) -> None:
        """Delete a dataset object; missing objects are ignored."""
        with contextlib.suppress(NotFoundError):
            await self.data.delete(name)

    async def enable_set_cache(self) -> None:
        """Cache dataset descriptions (and small datasets) in memory, evicted on change.

        Descriptions are written once and only ever deleted, so a cache that
        listens to the bucket's own subject (``$KV.fdrtd_sets.<handle>``) for
        deletions stays correct across any number of workers, and saves a
        JetStream round trip on every request that names a dataset.
        """
        self._set_cache = OrderedDict()

        async def evict(msg: Msg) -> None:
            handle = msg.subject.rsplit(".", 1)[-1]
            if self._set_cache is not None:
                self._set_cache.pop(handle, None)
            dropped = self._object_cache.pop(handle, None)
            if dropped is not None:
                self._object_cache_bytes -= len(dropped)

        await self.nc.subscribe(f"$KV.{SETS_BUCKET}.>", cb=evict)

    async def get_set(self, handle: str) -> dict[str, Any] | None:
        """Return a dataset description, or None."""
        cache = self._set_cache
        if cache is not None and handle in cache:
            cache.move_to_end(handle)
            return dict(cache[handle])
        try:
            entry = await self.sets.get(handle)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        description = dict(wire.unpackb(entry.value))
        if cache is not None:
            cache[handle] = description
            if len(cache) > SET_CACHE_SIZE:
                cache.popitem(last=False)
        return dict(description)

    async def put_set(self, handle: str, description: dict[str, Any]) -> None:
        """Store a dataset description."""
        await self.sets.put(handle, wire.packb(description))

    async def delete_set(self, handle: str) -> None:
        """Forget a dataset description."""
        with contextlib.suppress(KeyNotFoundError):
            await self.sets.purge(handle)

    # -- versions of named datasets -----------------------------------------

    async def get_version(self, name: str) -> tuple[dict[str, Any], int] | None:
        """The released version of the named dataset and its revision, or None."""
        try:
            entry = await self.versions.get(name)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return dict(wire.unpackb(entry.value)), entry.revision

    async def version_key(self) -> bytes:
        """The secret that version ids are shown under (made once per store, shared by all).

        A version's content hash is never shown as it is: an analyst could
        test guesses of a small dataset against it. Shown is its HMAC under
        this key, which is the same for every process of the server.
        """
        if self._version_key is None:
            with contextlib.suppress(KeyWrongLastSequenceError):  # another made it first
                await self.versions.create(_VERSION_KEY, secrets.token_bytes(32))
            entry = await self.versions.get(_VERSION_KEY)
            assert entry.value is not None
            self._version_key = bytes(entry.value)
        return self._version_key

    async def put_version(self, name: str, version: dict[str, Any], last: int | None) -> int:
        """Release ``version`` of the named dataset over revision ``last`` (None: the first).

        Raises:
            RecordChanged: If another process released a version meanwhile.
        """
        try:
            if last is None:
                return await self.versions.create(name, wire.packb(version))
            return await self.versions.update(name, wire.packb(version), last=last)
        except KeyWrongLastSequenceError:
            raise RecordChanged(name) from None

    # -- jobs and results ------------------------------------------------------

    async def get_job(self, handle: str) -> tuple[JobRecord, int] | None:
        """Return a job record and its revision, or None."""
        try:
            entry = await self.jobs.get(handle)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return JobRecord.from_dict(wire.unpackb(entry.value)), entry.revision

    async def put_job(self, handle: str, record: JobRecord, last: int | None = None) -> int:
        """Store a job record with a compare-and-set; return the record's new revision.

        Large results go to the results object store. Every write of a job
        record names the revision it replaces, so that a job has exactly one
        outcome: a runner that was merely slow never overwrites the end that
        :func:`~fdrtd_server.runners.fail_orphaned_jobs` wrote for it, and the
        sweep never overwrites the end its runner wrote.

        Args:
            handle: The job's result handle.
            record: The record to store (its ``updated`` time is set here).
            last: The revision this write replaces, as returned by the write
                before; None creates the record, which must not exist yet.

        Raises:
            RecordChanged: If the record is not at revision ``last`` (or exists,
                for None): someone else ended the job, or its owner released it.
            InsufficientStorage: If the bucket is full.
        """
        record.updated = now_iso()
        in_store = False
        try:
            if record.status == "done" and not record.result_in_store:
                packed = wire.packb(record.result)
                # an external NATS may allow smaller messages than our embedded one
                if len(packed) > min(INLINE_RESULT_LIMIT, self.nc.max_payload // 2):
                    await self.results.put(handle, packed)
                    record.result, record.result_in_store = None, True
                    in_store = True
            packed_record = wire.packb(record.to_dict())
            if last is None:
                return await self.jobs.create(handle, packed_record)
            return await self.jobs.update(handle, packed_record, last=last)
        except KeyWrongLastSequenceError:
            if in_store:
                with contextlib.suppress(Exception):
                    await self.results.delete(handle)  # nobody will ever read it
            raise RecordChanged(handle) from None
        except APIError as error:
            raise _store_error(error, "results") from None

    async def job_result(self, handle: str, record: JobRecord) -> Any:
        """The result of a finished job, wherever it is kept."""
        if record.result_in_store:
            stored = await self.results.get(handle)
            return wire.unpackb(bytes(stored.data or b""))
        return record.result

    async def delete_job(self, handle: str) -> None:
        """Forget a job and its result."""
        with contextlib.suppress(KeyNotFoundError):
            await self.jobs.purge(handle)
        with contextlib.suppress(NotFoundError):
            await self.results.delete(handle)

    async def watch_job(self, handle: str, timeout: float) -> AsyncIterator[JobRecord]:
        """Yield the job record now and on every change, until it finishes or ``timeout``."""
        updates = await self.nc.subscribe(f"$KV.{JOBS_BUCKET}.{handle}")
        try:
            current = await self.get_job(handle)
            if current is None:
                return
            record = current[0]
            yield record
            deadline = time.monotonic() + timeout
            while not record.finished:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                try:
                    msg = await updates.next_msg(timeout=min(remaining, REREAD))
                except nats.errors.TimeoutError:
                    # an update may have passed before we subscribed (see wait_job)
                    again = await self.get_job(handle)
                    if again is None:
                        return
                    seen = (record.status, record.progress, record.updated)
                    if (again[0].status, again[0].progress, again[0].updated) != seen:
                        record = again[0]
                        yield record
                    continue
                if msg.data:
                    record = JobRecord.from_dict(wire.unpackb(msg.data))
                    yield record
        finally:
            await updates.unsubscribe()

    async def wait_job(self, handle: str, timeout: float) -> JobRecord | None:
        """Return the job record once finished, or as it is after ``timeout``.

        Listens on the bucket's own subject (``$KV.fdrtd_jobs.<handle>``) with
        a plain subscription, made before the first read: far cheaper than a
        JetStream watcher. NATS hands a put to plain subscribers before
        JetStream has stored it, so an update can pass just before the
        subscription exists while the first read still finds the old record;
        the record is therefore read again whenever :data:`REREAD` seconds
        pass without an update.
        """
        if timeout <= 0:
            current = await self.get_job(handle)
            return current[0] if current else None
        updates = await self.nc.subscribe(f"$KV.{JOBS_BUCKET}.{handle}")
        try:
            current = await self.get_job(handle)
            if current is None:
                return None
            record = current[0]
            deadline = time.monotonic() + timeout
            while not record.finished:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    msg = await updates.next_msg(timeout=min(remaining, REREAD))
                except nats.errors.TimeoutError:
                    again = await self.get_job(handle)
                    if again is None:
                        break
                    record = again[0]
                    continue
                if msg.data:
                    record = JobRecord.from_dict(wire.unpackb(msg.data))
            return record
        finally:
            await updates.unsubscribe()


def check_owner(owner: str, principal: str, kind: str) -> None:
    """Refuse with 404 unless ``principal`` owns the handle.

    Another client's handle is reported exactly like an unknown one, so that
    nobody learns whether a handle exists.
    """
    if owner != principal:
        raise NotFound(f"no {kind} with this handle")
