"""The plugin interface: how a microservice is written, found and run.

A microservice is a :class:`Microservice` object with *functions*. A plugin
author ships an ordinary Python package that exposes one in the entry-point
group ``fdrtd.microservices``::

    # my_plugin/__init__.py
    from fdrtd_server.inputs import DATA, Output
    from fdrtd_server.microservice import JobContext, Microservice

    service = Microservice("wordcount", "1.0.0", "Counts rows of a dataset.")

    @service.job("rows", inputs=[DATA], outputs=[Output("rows", "integer", "records")])
    async def rows(ctx: JobContext, inputs: dict[str, object]) -> dict[str, int]:
        # a docstring here would describe the function in /v1/openapi.json
        dataset = await ctx.load_dataset(inputs["data"])
        ctx.check_cohort(dataset.rows)
        return {"rows": dataset.rows}

    # pyproject.toml
    [project.entry-points."fdrtd.microservices"]
    wordcount = "my_plugin:service"

Each microservice runs as a NATS service (``nats.micro``), so
``$SRV.PING/INFO/STATS`` and the NATS tooling see it; every function listens
on ``fdrtd.svc.<microservice>.<function>`` in the queue group ``fdrtd``, so
any number of workers share the load. The controller never calls a function
directly: it sends a request on that subject, whether the microservice runs
in the controller's process or in a worker on another machine.

Two kinds of functions exist:

* ``@service.job(name)``: a computation. The caller gets a result handle at
  once; the function runs in the background, may report progress, and its
  return value is stored as the result.
* ``@service.call(name)``: a quick request answered directly (used by the
  built-in data microservice to register uploads).

A function declares its inputs and outputs when it is registered
(:mod:`fdrtd_server.inputs`); the runner checks each request against the
declaration before the function runs, so that an unknown, missing, mistyped
or out-of-range input is a 400 naming it. A function registered without
``inputs`` gets whatever the client sent. The declaration also travels in
the endpoint metadata, for the controller's ``/v1/openapi.json``.

Errors never leak: a :class:`~fdrtd_server.errors.FdrtdError` crosses the bus
as its status and message; anything else becomes "internal error" with an id
that is written to the server log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import importlib.metadata
import json
import logging
import re
import secrets
import traceback
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import numpy as np
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service

from fdrtd_client import wire
from fdrtd_server import receipts
from fdrtd_server.audit import JOBS_SUBJECT
from fdrtd_server.bus import (
    QUEUE_GROUP,
    SERVICE_PREFIX,
    Bus,
    JobRecord,
    RecordChanged,
    check_owner,
    now_iso,
    parse_handle,
)
from fdrtd_server.custody import DATASET_NAME
from fdrtd_server.errors import (
    BadRequest,
    CohortTooSmall,
    FdrtdError,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    PluginError,
    ServiceUnavailable,
)
from fdrtd_server.inputs import Input, Output, Signature
from fdrtd_server.peers import PeerInbox, PeerSession, stop_reasons
from fdrtd_server.policy import DatasetPolicy, job_deadline
from fdrtd_server.privacy import KvStore, Ledger, PrivateTerms, terms_for
from fdrtd_server.provenance import Provenance
from fdrtd_server.runners import (
    RESTARTED,
    STOP_WRITE_TIMEOUT,
    Heartbeat,
    fail_orphaned_jobs,
    new_runner_id,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "CallContext",
    "Dataset",
    "Environment",
    "Input",
    "JobContext",
    "JobEnded",
    "Microservice",
    "Output",
    "Signature",
    "Switch",
    "discover",
    "policy_switches",
    "registration_tag",
    "shown_version",
    "start_microservices",
]

ENTRY_POINT_GROUP = "fdrtd.microservices"
SIGNATURE_METADATA = "fdrtd.signature"
"""Key of the endpoint metadata that carries a function's :class:`Signature` as JSON."""
NAME_RULE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
log = logging.getLogger("fdrtd.microservice")


@dataclass(frozen=True)
class Environment:
    """What microservices know about the server they run for."""

    server: str
    min_cohort: int = 3
    small_cell: int = 0
    """Table and histogram cells below this are hidden: per job, the strictest of the
    server's ``min_cohort`` and the ``small_cell`` of the datasets' policies (0: the
    ``min_cohort``)."""
    session_timeout: float = 30.0
    allow_map_reduce: bool = True
    allow_set_union: bool = False
    allow_set_intersection: bool = False
    allow_matrix_product: bool = False
    allow_vertical_regression: bool = False
    max_read_bytes: int = 2 * 1024 * 1024 * 1024
    plugin_policy: Mapping[str, Mapping[str, bool]] = field(default_factory=dict)
    """The owner's settings of the microservices' own switches: ``[policy.<microservice>]``."""

    def __post_init__(self) -> None:
        if self.small_cell < 1:
            object.__setattr__(self, "small_cell", self.min_cohort)

    def require(self, setting: str, what: str, why: str) -> None:
        """Refuse (403) a function that can disclose inputs unless the policy allows it.

        Args:
            setting: The policy switch, one of :func:`policy_switches`, e.g.
                ``"allow_set_union"``.
            what: The functions it allows, for the message ("set unions").
            why: What they can disclose, for the message.

        Raises:
            Forbidden: If this server's policy leaves ``setting`` off.
            PluginError: If ``setting`` is not a switch this server knows (a
                bug of the plugin; declare the switch with ``policy=`` when
                registering the function to find it at import time).
        """
        _check_switch(setting, PluginError)
        if not getattr(self, setting):
            raise Forbidden(
                f"this server's policy does not allow {what} ({why}); "
                f"the owner can set {setting} = true"
            )


def policy_switches() -> tuple[str, ...]:
    """The policy switches a function may :meth:`~Environment.require`: ``allow_*``."""
    return tuple(
        item.name
        for item in dataclasses.fields(Environment)
        if item.name.startswith("allow_") and item.type in (bool, "bool")
    )


def _check_switch(setting: Any, error: type[Exception], own: Iterable[str] = ()) -> None:
    """Raise ``error`` naming ``setting`` and the known switches unless it is one.

    The known switches are the server's (:func:`policy_switches`) and the
    microservice's ``own`` (declared with :meth:`Microservice.switch`).
    """
    known = (*policy_switches(), *own)
    if setting in own:
        return
    if setting not in known:
        raise error(
            f"the plugin asks for the policy switch '{str(setting)[:64]}', which this server "
            f"does not know; the known switches are {', '.join(known)} (a bug of the "
            "microservice plugin: its author must use one of them, or declare its own with "
            "service.switch)"
        )


@dataclass
class Dataset:
    """A dataset as a function sees it: named columns that share their first dimension.

    Attributes:
        columns: The columns read (those asked for, or all).
        count: The number of records when no column was read (``columns=[]``).
    """

    columns: dict[str, np.ndarray[Any, Any]]
    count: int | None = None
    source: Any = None
    """With ``load_dataset(..., pushdown=True)``, a source read in place: a
    :class:`fdrtd_server.sources.Source` whose ``moments`` and ``schema`` a
    function may use instead of reading rows (``columns`` is then empty)."""
    limit: int | None = None
    """How many rows of :attr:`source` the version in use has (None: all)."""
    privacy: PrivateTerms | None = None
    """With ``load_dataset(..., private=True)``, the differential privacy terms of a
    named dataset whose owner requires them (:mod:`fdrtd_server.sdk.privacy`); None
    for the caller's own upload and a dataset without differential privacy."""

    async def source_column(self, name: Any) -> str:
        """The column ``name`` of :attr:`source`; None picks the only one.

        Raises:
            BadRequest: If it does not exist or a choice is needed.
        """
        schema = await self.source.schema()
        if name is None:
            if len(schema) != 1:
                raise BadRequest(
                    "the dataset has several columns; name one with the 'column' input"
                )
            return str(next(iter(schema)))
        if not isinstance(name, str) or name not in schema:
            raise BadRequest("the dataset has no column of that name")
        return name

    @property
    def rows(self) -> int:
        """Number of records (the first dimension of the columns)."""
        if self.count is not None:
            return self.count
        first = next(iter(self.columns.values()))
        return int(first.shape[0]) if first.ndim else 1

    def column(self, name: Any) -> np.ndarray[Any, Any]:
        """The column ``name``; None picks the only column.

        Raises:
            BadRequest: If the column does not exist or a choice is needed.
        """
        if name is None:
            if len(self.columns) != 1:
                raise BadRequest(
                    "the dataset has several columns; name one with the 'column' input"
                )
            return next(iter(self.columns.values()))
        if not isinstance(name, str) or name not in self.columns:
            raise BadRequest("the dataset has no column of that name")
        return self.columns[name]


def _wanted(columns: Iterable[Any] | None) -> list[str] | None:
    """The column names a function asks for; None (all) if any is unnamed (None)."""
    if columns is None:
        return None
    names = list(columns)
    if any(name is None for name in names):
        return None
    if not all(isinstance(name, str) for name in names):
        raise BadRequest("the dataset has no column of that name")
    return list(dict.fromkeys(names))


INLINE_DECODE = 256 * 1024
"""Stored objects up to this size are decoded on the event loop (a thread hop costs more
than decoding them); larger ones in a worker thread, so the heartbeats go on."""


async def _decode(description: Mapping[str, Any], raw: bytes, columns: list[str] | None) -> Dataset:
    if len(raw) <= INLINE_DECODE:
        return decode_dataset(description, raw, columns)
    return await asyncio.to_thread(decode_dataset, description, raw, columns)


def _check_decoded_size(
    description: Mapping[str, Any], columns: list[str] | None, limit: int
) -> None:
    """Refuse to decode more than ``limit`` bytes of an upload's columns.

    A compressed upload counts against the quota as stored, and a column of
    millions of equal values stores in kilobytes: its decoded size is bounded
    here, by ``max_read_bytes`` as a source read in place is.

    Raises:
        PayloadTooLarge: Naming the limit.
    """
    known = description.get("columns") or {}
    rows = int(description.get("rows") or 0)
    wanted = known if columns is None else {name: known.get(name, {}) for name in columns}
    size = 0
    for column in wanted.values():
        try:
            width = np.dtype(str(column.get("dtype", "<f8"))).itemsize
        except TypeError:
            width = 8
        shape = column.get("shape") or [rows]
        size += int(np.prod([int(n) for n in shape], dtype=np.float64)) * max(width, 8)
    if size > limit:
        raise PayloadTooLarge(
            f"the columns asked for need more than max_read_bytes={limit} bytes in memory; "
            "name fewer columns, or ask the server's owner to raise max_read_bytes"
        )


async def _decoded(
    bus: Bus,
    handle: str,
    description: Mapping[str, Any],
    columns: list[str] | None,
    limit: int,
) -> Dataset:
    """An upload's columns (only those wanted; ``[]``: only the number of records)."""
    if columns is not None and not columns:
        return Dataset({}, count=int(description["rows"]))
    _check_decoded_size(description, columns, limit)
    raw = await bus.read_object(handle)
    return await _decode(description, raw, columns)


def registration_tag(entry: Mapping[str, Any]) -> str:
    """A hash of a named dataset's owner and settings: a released version belongs to it."""
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:32]


async def shown_version(bus: Bus, content: str, time: str) -> dict[str, str]:
    """A dataset version as results and the catalogue show it: ``{id, time}``.

    The id is an HMAC of the content hash under the server's version key
    (:meth:`~fdrtd_server.bus.Bus.version_key`): it changes exactly when the
    content does, and nobody can test a guess of the content against it.
    """
    key = await bus.version_key()
    return {"id": hmac.new(key, content.encode(), hashlib.sha256).hexdigest(), "time": time}


@dataclass
class CallContext:
    """What a function gets besides its inputs: who asks, and the bus.

    Attributes:
        datasets: The named datasets the caller may use for this function now,
            as the controller found them in the owner's grants
            (:meth:`fdrtd_server.custody.CustodyStore.usable`).
        versions: The version of each named dataset read so far, by name;
            stated in the job's result.
    """

    bus: Bus
    env: Environment
    principal: str
    role: str
    session: dict[str, Any] | None = None
    datasets: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    microservice: str = ""
    """The name of the microservice whose function runs."""
    switches: Mapping[str, bool] = field(default_factory=dict)
    """The microservice's own policy switches (:meth:`Microservice.switch`), as this
    server's owner set them (``[policy.<microservice>]``), else their defaults."""
    policy_version: str = ""
    """The version of the owner's policy file (:mod:`fdrtd_server.policy`) for this request."""
    policies: Mapping[str, Any] = field(default_factory=dict)
    """The owner's policy of each named dataset in :attr:`datasets`, as the controller sent it."""
    provenance: Provenance = field(default_factory=Provenance)
    """What :meth:`load_dataset` loaded: uploads of the caller's, named datasets read exactly;
    a multi-party function declares it (``fdrtd_server.sdk.declare``)."""

    def dataset_policy(self, name: str) -> DatasetPolicy:
        """The owner's policy of the named dataset ``name`` (the defaults if none was sent)."""
        found = self.policies.get(name)
        return DatasetPolicy.from_dict(found) if isinstance(found, Mapping) else DatasetPolicy()

    def budget_ledger(self) -> Ledger:
        """This server's privacy budget ledger (:mod:`fdrtd_server.privacy`)."""
        return Ledger(KvStore(self.bus.budgets))

    def policy(self, switch: str) -> bool:
        """Whether this server's policy turns ``switch`` on.

        Args:
            switch: One of the microservice's own switches (declared with
                :meth:`Microservice.switch`), or one of the server's
                (:func:`policy_switches`, e.g. ``"allow_set_union"``).

        Raises:
            PluginError: If ``switch`` is neither (a bug of the plugin: list the
                switches a function reads in its ``policy=`` to find it at start).
        """
        if switch in self.switches:
            return bool(self.switches[switch])
        _check_switch(switch, PluginError, self.switches)
        return bool(getattr(self.env, switch))

    def require(self, switch: str, what: str, why: str) -> None:
        """Refuse (403) unless this server's policy turns ``switch`` on.

        Args:
            switch: As for :meth:`policy`.
            what: What the switch allows, for the message ("vector means of two parties").
            why: What that can disclose, for the message.

        Raises:
            Forbidden: If the policy leaves ``switch`` off; the message says how to set it.
            PluginError: If ``switch`` is unknown (see :meth:`policy`).
        """
        if self.policy(switch):
            return
        where = f" in [policy.{self.microservice}]" if switch in self.switches else ""
        raise Forbidden(
            f"this server's policy does not allow {what} ({why}); "
            f"the owner can set {switch} = true{where}"
        )

    async def owned_description(
        self, handle: Any, field_name: str = "handle"
    ) -> tuple[str, dict[str, Any]]:
        """The handle and stored description of a dataset the caller owns.

        Raises:
            BadRequest: If ``handle`` is not a data handle.
            NotFound: If it is unknown or belongs to another client (the same answer).
        """
        handle = parse_handle(handle, "data", field_name)
        description = await self.bus.get_set(handle)
        if description is None:
            raise NotFound("no dataset with this handle")
        check_owner(description["owner"], self.principal, "dataset")
        return handle, description

    async def load_dataset(
        self,
        ref: Any,
        field_name: str = "data",
        columns: Iterable[Any] | None = None,
        *,
        pushdown: bool = False,
        private: bool = False,
    ) -> Dataset:
        """Load a dataset: a named one the caller may use, or an upload of her own.

        Args:
            ref: A dataset name from the catalogue, or a data handle.
            field_name: The input that gave ``ref``, for messages.
            columns: The columns the function needs (None: all; ``[]``: only the
                number of records). A source is read only for those, in batches.
            pushdown: For a source read in place, read no rows: the dataset's
                :attr:`Dataset.source` then computes aggregates where the data
                lives (in SQL for a database). Ignored for uploads.
            private: Whether the function releases its result with differential
                privacy: a named dataset whose owner requires it then carries its
                terms (:attr:`Dataset.privacy`); without, such a dataset is refused.

        Raises:
            BadRequest: If ``ref`` is neither a name nor a handle.
            NotFound: If no such dataset exists for the caller (a name she holds
                no grant for is answered alike).
            Forbidden: If the owner requires differential privacy and ``private``
                is False (before anything is read or spent).
        """
        wanted = _wanted(columns)
        if isinstance(ref, str) and ref in self.datasets:
            policy = self.dataset_policy(ref)
            terms = terms_for(ref, policy, self.principal, private, self.budget_ledger)
            self.provenance.named(ref, exact=terms is None, analyst_inputs=policy.analyst_inputs)
            loaded = await self._load_named(ref, self.datasets[ref], wanted, pushdown)
            loaded.privacy = terms
            return loaded
        if isinstance(ref, str) and not ref.startswith(("d-", "r-")) and DATASET_NAME.match(ref):
            raise NotFound(f"no dataset named '{ref}' on this server")
        if not isinstance(ref, str) or not ref.startswith("d-"):
            raise BadRequest(
                f"'{field_name}' must be a dataset name from the catalogue, or a data handle "
                "as returned by the server"
            )
        handle, description = await self.owned_description(ref, field_name)
        self.provenance.upload()
        return await _decoded(self.bus, handle, description, wanted, self.env.max_read_bytes)

    async def _load_named(
        self, name: str, entry: Mapping[str, Any], columns: list[str] | None, pushdown: bool
    ) -> Dataset:
        if entry.get("kind") == "upload":
            handle = str(entry.get("handle", ""))
            description = await self.bus.get_set(handle) if handle.startswith("d-") else None
            if description is None:
                raise NotFound(f"the dataset '{name}' was withdrawn by its owner")
            _check_decoded_size(description, columns, self.env.max_read_bytes)
            raw = await self.bus.read_object(handle)  # read whole anyway: it is hashed
            digest = description.get("sha256")
            if not isinstance(digest, str):
                # an upload never changes: its version is hashed once and kept
                digest = await asyncio.to_thread(lambda: hashlib.sha256(raw).hexdigest())
                await self.bus.put_set(handle, {**description, "sha256": digest})
            self.versions[name] = await shown_version(
                self.bus, str(digest), str(description.get("created", ""))
            )
            if columns is not None and not columns:
                return Dataset({}, count=int(description["rows"]))
            return await _decode(description, raw, columns)
        from fdrtd_server.sources import SourceSpec, open_source

        spec = SourceSpec.from_dict(entry.get("source") or {}, f"dataset '{name}'")
        source = open_source(spec)
        tag = registration_tag(entry)
        version, current = await self._version(name, tag, await source.observe(), spec.hold_back)
        self.versions[name] = await shown_version(self.bus, version.id, version.time)
        if columns is not None and not columns:
            return Dataset({}, count=version.rows)
        limit = None if version.id == current.id else version.rows
        if pushdown:
            return Dataset({}, count=version.rows, source=source, limit=limit)
        read = await source.read(columns, limit, max_bytes=self.env.max_read_bytes)
        if not read:
            return Dataset({}, count=version.rows)
        return Dataset(dict(read))

    async def _version(self, name: str, tag: str, current: Any, hold_back: int) -> tuple[Any, Any]:
        """The version of ``name`` to read now, and ``current``; releases it if it is new.

        A released version counts only for the same registration (``tag``, a
        hash of the owner and the source's settings): a name withdrawn and
        registered again starts afresh. Several processes may observe a new
        version at once: the release is a compare-and-set, and the loser reads
        what the winner released.
        """
        from fdrtd_server.sources import Version, choose_version

        for _ in range(5):
            found = await self.bus.get_version(name)
            released = Version.from_dict(found[0]) if found and found[0].get("tag") == tag else None
            version, new = choose_version(current, released, hold_back)
            if not new:
                return version, current
            record = {**version.to_dict(), "tag": tag}
            try:
                await self.bus.put_version(name, record, found[1] if found else None)
            except RecordChanged:
                continue
            return version, current
        raise ServiceUnavailable(f"the dataset '{name}' keeps changing; try again")

    def check_cohort(self, rows: int) -> None:
        """Refuse results that describe fewer records than the policy's minimum.

        Raises:
            CohortTooSmall: If ``rows`` is below the minimum cohort.
        """
        if rows < self.env.min_cohort:
            raise CohortTooSmall(self.env.min_cohort)


class JobEnded(asyncio.CancelledError):
    """Raised in a job by :meth:`JobContext.progress` once someone else ended the job.

    The job's record changed since its runner last wrote it: the sweep of
    orphaned jobs marked it failed (this process had been unresponsive for
    longer than its liveness key lives), or its owner released it. The job
    is cancelled: nothing of it is written or reported any more. A
    cancellation, so that ``except Exception`` in a function does not hold it.
    """


@dataclass
class JobContext(CallContext):
    """A :class:`CallContext` for a running computation, with progress."""

    handle: str = ""
    record: JobRecord | None = None
    revision: int | None = None
    """The revision of the job record this runner wrote last; None before its first write."""
    ended_elsewhere: bool = False
    """True once a write found the record changed by someone else: the job is not ours."""
    lapsed: bool = False
    """True once this runner's liveness key was found lapsed while the job ran."""
    _writing: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    async def progress(self, fraction: float) -> None:
        """Report how far the computation is (0 to 1); clients see it while polling.

        Before the job's first record is written (while its start request is
        held), the progress is kept and written with that record.

        Raises:
            JobEnded: If someone else ended the job meanwhile (it must stop).
        """
        if self.record is None:
            return
        self.record.progress = max(0.0, min(1.0, float(fraction)))
        if self.revision is not None and not await self.write_record():
            raise JobEnded()

    async def _released(self) -> bool:
        """Whether the job's record is gone (released by its owner), as far as can be read."""
        try:
            return await self.bus.get_job(self.handle) is None
        except Exception:
            return False

    async def write_record(self) -> bool:
        """Write the job record over the revision written last (create it the first time).

        Returns:
            True if written; False if someone else had written the record
            since (then nothing is written for this job any more).
        """
        assert self.record is not None
        async with self._writing:
            if self.ended_elsewhere:
                return False
            try:
                self.revision = await self.bus.put_job(self.handle, self.record, self.revision)
            except RecordChanged:
                self.ended_elsewhere = True
                released = await self._released()
                log.log(
                    logging.INFO if released else logging.WARNING,
                    "a computation is stopped: %s",
                    "its owner released it"
                    if released
                    else "another process marked it failed while this process was unresponsive",
                )
                return False
            return True


def decode_dataset(
    description: Mapping[str, Any], raw: bytes, columns: Iterable[str] | None = None
) -> Dataset:
    """Turn a stored object back into columns, by the form recorded at upload.

    Args:
        description: The dataset's stored description.
        raw: The stored object.
        columns: The names of the columns wanted; None for all. A Parquet
            object (``storage: parquet``, a csv or parquet upload) decodes only
            these; the other forms are decoded whole and then narrowed.

    Returns:
        The columns: numbers as numpy arrays (missing values NaN, which makes
        an integer or boolean column with missing values float64, as its
        description says), text as numpy unicode arrays (missing text empty).

    Raises:
        BadRequest: If a column asked for is not in the dataset.
    """
    wanted = None if columns is None else list(dict.fromkeys(columns))
    known = description.get("columns") or {}
    if wanted is not None and not all(name in known for name in wanted):
        raise BadRequest("the dataset has no column of that name")
    if description.get("storage") == "parquet":
        return Dataset(_decode_parquet(raw, wanted))
    if description["format"] == "raw":
        array = np.frombuffer(raw, dtype=np.dtype(description["dtype"]))
        decoded = {"value": array.reshape(description["shape"])}
    else:
        decoded = {
            name: values if isinstance(values, np.ndarray) else np.array(values, dtype=str)
            for name, values in wire.unpackb(raw).items()
        }
    if wanted is not None:
        decoded = {name: decoded[name] for name in wanted}
    return Dataset(decoded)


def _decode_parquet(raw: bytes, columns: list[str] | None) -> dict[str, np.ndarray[Any, Any]]:
    """The columns of a stored Parquet object (the data microservice wrote it)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(raw), columns=columns, use_threads=False)
    decoded: dict[str, np.ndarray[Any, Any]] = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        kind = column.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            if column.null_count:
                column = pc.fill_null(column, "")
            decoded[name] = column.to_numpy().astype(str)
            continue
        if column.null_count:
            column = pc.fill_null(pc.cast(column, pa.float64()), float("nan"))
        decoded[name] = column.to_numpy()
    return decoded


SWITCH_RULE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


@dataclass(frozen=True)
class Switch:
    """A policy switch a microservice declares (:meth:`Microservice.switch`)."""

    name: str
    default: bool
    doc: str = ""


JobFunction = Callable[[JobContext, dict[str, Any]], Awaitable[Any]]
CallFunction = Callable[[CallContext, dict[str, Any]], Awaitable[Any]]


@dataclass
class Microservice:
    """A named set of functions, run as one NATS service.

    Args:
        name: Lowercase letters, digits and ``_``; the subject's middle part.
        version: Semantic version; defaults to the installed distribution's.
        description: One sentence shown by ``$SRV.INFO`` and ``/v1/microservices``.
        multiparty: Whether its jobs are multi-party protocols: a request to
            start one without a ``session`` is refused before it runs.
    """

    name: str
    version: str
    description: str
    multiparty: bool = False
    jobs: dict[str, JobFunction] = field(default_factory=dict)
    calls: dict[str, CallFunction] = field(default_factory=dict)
    signatures: dict[str, Signature] = field(default_factory=dict)
    """What each function takes and gives, as declared when it was registered."""
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    switches: dict[str, Switch] = field(default_factory=dict)
    """The microservice's own policy switches, by name (see :meth:`switch`)."""

    def __post_init__(self) -> None:
        if not NAME_RULE.fullmatch(self.name):
            raise ValueError(
                f"microservice name '{self.name[:40]}' must be lowercase letters, digits "
                "and '_', starting with a letter, at most 32 characters"
            )

    def switch(self, name: str, default: bool = False, doc: str = "") -> str:
        """Declare a policy switch of this microservice, for the server's owner to set.

        The owner sets it in ``fdrtd.toml``, in the table of the microservice::

            [policy.vecmean]
            allow_vector_mean_of_two = true

        and a function reads it with ``ctx.policy(name)`` or refuses with
        ``ctx.require(name, what, why)``. A switch the owner sets that the
        microservice does not declare stops the server at start, naming it.

        Args:
            name: Lowercase letters, digits and ``_`` (``allow_...`` for a
                permission); not one of the server's own switches.
            default: Its value where the owner does not set it. A switch that
                allows a disclosure should default to False.
            doc: One sentence: what it allows, and what that can disclose.

        Returns:
            ``name``, to keep as a constant (``ALLOW_TWO = service.switch(...)``).

        Raises:
            ValueError: If the name is malformed, taken, or the default not a bool.
        """
        if not SWITCH_RULE.fullmatch(name):
            raise ValueError(
                f"switch name '{name[:40]}' must be lowercase letters, digits and '_', "
                "starting with a letter, at most 64 characters"
            )
        if name in policy_switches() or name in {f.name for f in dataclasses.fields(Environment)}:
            raise ValueError(f"'{name}' is a setting of the server; give the switch another name")
        if name in self.switches:
            raise ValueError(f"switch '{name}' is declared twice in '{self.name}'")
        if not isinstance(default, bool):
            raise ValueError(f"the default of switch '{name}' must be True or False")
        self.switches[name] = Switch(name, default, doc)
        return name

    def switch_values(self, owner: Mapping[str, bool] | None = None) -> dict[str, bool]:
        """This microservice's switches as ``owner`` set them (``[policy.<name>]``), else defaults.

        Raises:
            ValueError: If ``owner`` sets a switch that is not declared, or not to a bool.
        """
        owner = owner or {}
        for key, value in owner.items():
            if key not in self.switches:
                declared = ", ".join(sorted(self.switches)) or "none"
                raise ValueError(
                    f"[policy.{self.name}] sets '{str(key)[:64]}', which the microservice "
                    f"'{self.name}' does not declare (its switches: {declared})"
                )
            if not isinstance(value, bool):
                raise ValueError(f"[policy.{self.name}] '{key}' must be true or false")
        return {name: owner.get(name, switch.default) for name, switch in self.switches.items()}

    def job(
        self,
        name: str,
        description: str = "",
        *,
        inputs: Sequence[Input] | None = None,
        outputs: Sequence[Output] = (),
        policy: Sequence[str] = (),
    ) -> Callable[[JobFunction], JobFunction]:
        """Register a computation function under ``name``.

        Args:
            name: The function's name (lowercase letters, digits, ``_``).
            description: One sentence; defaults to the docstring's first line.
            inputs: The inputs it takes. Requests are checked against them
                before the function runs (an unknown, missing, mistyped or
                out-of-range input is a 400). None (the default) checks nothing.
            outputs: The keys of its result, for the API documentation.
            policy: The policy switches it reads (``ctx.policy``,
                ``ctx.require``): the server's or the microservice's own,
                declared before; an unknown one is refused here, at import time.

        Raises:
            ValueError: If the name is taken or malformed, or a switch unknown.
        """

        def register(function: JobFunction) -> JobFunction:
            self._declare(name, function, description, inputs, outputs, policy, job=True)
            self.jobs[name] = function
            return function

        return register

    def call(
        self,
        name: str,
        description: str = "",
        *,
        inputs: Sequence[Input] | None = None,
        outputs: Sequence[Output] = (),
        policy: Sequence[str] = (),
    ) -> Callable[[CallFunction], CallFunction]:
        """Register a direct request function under ``name`` (arguments as for :meth:`job`)."""

        def register(function: CallFunction) -> CallFunction:
            self._declare(name, function, description, inputs, outputs, policy, job=False)
            self.calls[name] = function
            return function

        return register

    def _declare(
        self,
        name: str,
        function: Callable[..., Any],
        description: str,
        inputs: Sequence[Input] | None,
        outputs: Sequence[Output],
        policy: Sequence[str],
        *,
        job: bool,
    ) -> None:
        self._check_new(name)
        for setting in policy:
            _check_switch(setting, ValueError, self.switches)
        doc = (function.__doc__ or "").strip().split("\n\n")[0]
        self.signatures[name] = Signature(
            description=description or " ".join(doc.split()),
            inputs=None if inputs is None else tuple(inputs),
            outputs=tuple(outputs),
            policy=tuple(policy),
            multiparty=self.multiparty and job,
        )

    def add_cleanup(self, function: Callable[[], None]) -> None:
        """Run ``function`` when the microservice stops (e.g. shut down a process pool)."""
        if function not in self.cleanups:
            self.cleanups.append(function)

    def _check_new(self, name: str) -> None:
        if not NAME_RULE.fullmatch(name):
            raise ValueError(f"function name '{name[:40]}' must be like a Python identifier")
        if name in self.jobs or name in self.calls:
            raise ValueError(f"function '{name}' is registered twice in '{self.name}'")

    @property
    def functions(self) -> list[str]:
        """Names of all functions."""
        return sorted([*self.jobs, *self.calls])


def _where(entry: importlib.metadata.EntryPoint) -> str:
    """An entry point as a message names it: its name, target and distribution."""
    dist = getattr(entry, "dist", None)
    source = f" of {dist.name} {dist.version}" if dist is not None else ""
    return f"'{entry.name} = {entry.value}'{source}"


def discover(
    allowed: Iterable[str] = (),
    policy: Mapping[str, Mapping[str, bool]] | None = None,
    *,
    entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
) -> dict[str, Microservice]:
    """Load microservices from the ``fdrtd.microservices`` entry points.

    An entry point's name is the microservice's name: it is what the policy's
    ``microservices`` list and ``[policy.<name>]`` tables say, and what the
    controller routes by. So a plugin whose entry point is named otherwise
    than its :class:`Microservice`, and two plugins of one name, stop the
    start (rather than one silently replacing the other).

    Args:
        allowed: If not empty, only these microservices are loaded (the policy).
        policy: The owner's settings of the microservices' own switches, by
            microservice (``[policy.<name>]``); checked against what the
            loaded microservices declare.
        entry_points: The entry points to load; the installed ones of the group
            if None.

    Raises:
        ImportError: Naming the plugin, if a plugin fails to import.
        TypeError: Naming the plugin, if it does not point at a Microservice.
        ValueError: If two entry points have one name, an entry point's name
            is not its microservice's, or ``policy`` sets a switch that a
            loaded microservice does not declare, or names a microservice that
            is not installed.
    """
    wanted = set(allowed)
    entries = list(
        importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        if entry_points is None
        else entry_points
    )
    named: dict[str, importlib.metadata.EntryPoint] = {}
    for entry in entries:
        if entry.name in named and (not wanted or entry.name in wanted):
            raise ValueError(
                f"two microservice plugins are named '{entry.name}': "
                f"{_where(named[entry.name])} and {_where(entry)}; uninstall one of them"
            )
        named.setdefault(entry.name, entry)
    found: dict[str, Microservice] = {}
    for name, entry in named.items():
        if wanted and name not in wanted:
            continue
        try:
            obj = entry.load()
        except Exception as error:
            raise ImportError(
                f"microservice plugin '{entry.name}' ({entry.value}) failed to import: {error}"
            ) from error
        if not isinstance(obj, Microservice):
            raise TypeError(
                f"microservice plugin '{entry.name}' ({entry.value}) is a "
                f"{type(obj).__name__}, not a fdrtd_server.microservice.Microservice"
            )
        if obj.name != name:
            raise ValueError(
                f"the microservice plugin {_where(entry)} is the microservice '{obj.name}'; "
                f"its entry point must be named '{obj.name}' (the name the policy and the "
                "controller use)"
            )
        found[name] = obj
    for name, settings in (policy or {}).items():
        if name in found:
            found[name].switch_values(settings)  # raises on a switch it does not declare
        elif name not in named:
            raise ValueError(
                f"[policy.{str(name)[:40]}] sets switches of a microservice that is not "
                f"installed (installed: {', '.join(sorted(named)) or 'none'})"
            )
    return found


STOPPED = "the server stopped before the computation finished; run it again"
MAX_START_WAIT = 60.0
"""Longest a start request may be held for its job to end (the controller's ``MAX_WAIT``)."""


def _start_wait(message: Mapping[str, Any]) -> float:
    """Seconds the start request may be held (``wait`` in the bus request; 0 if absent)."""
    wait = message.get("wait", 0)
    if isinstance(wait, bool) or not isinstance(wait, int | float):
        raise BadRequest("'wait' in a bus request must be a number of seconds")
    if not 0 <= wait <= MAX_START_WAIT:
        raise BadRequest(f"'wait' must be between 0 and {MAX_START_WAIT:g} seconds")
    return float(wait)


def _error_class(error: BaseException) -> str:
    """The class of the error a job ended with (the inner fdrtd error of a group)."""
    if isinstance(error, BaseExceptionGroup):
        inner = [e for e in error.exceptions if isinstance(e, FdrtdError)]
        if inner:
            error = inner[0]
    return type(error).__name__


def _sanitise(error: BaseException) -> tuple[str, str]:
    """Turn any error into (status code, message) that is safe to send."""
    if isinstance(error, BaseExceptionGroup):
        inner = [e for e in error.exceptions if isinstance(e, FdrtdError)]
        if inner:
            error = inner[0]
    if isinstance(error, FdrtdError):
        return str(error.status), error.message
    incident = secrets.token_hex(6)
    # the message of an unexpected error may hold data: log its type and frames only
    log.error(
        "internal error %s: %s\n%s",
        incident,
        type(error).__name__,
        "".join(traceback.format_tb(error.__traceback__)),
    )
    return "500", f"internal error (incident {incident}); the server log has details"


def _strictest(env: Environment, policies: Mapping[str, Any]) -> Environment:
    """``env`` with the strictest minimum cohort and small-cell threshold.

    Those of the server (its ``min_cohort`` for both) and of the datasets' policies.
    """

    def strictest(key: str, server: int) -> int:
        found = [
            int(p[key])
            for p in policies.values()
            if isinstance(p, Mapping) and isinstance(p.get(key), int)
        ]
        return max([server, *found])

    return dataclasses.replace(
        env,
        min_cohort=strictest("min_cohort", env.min_cohort),
        small_cell=strictest("small_cell", env.small_cell),
    )


async def _within(policy: Any, computation: Awaitable[Any]) -> Any:
    """Await ``computation``, cancelled after the whole-job timeout of the owner's ``policy``.

    The job then fails with :class:`~fdrtd_server.errors.JobTimeout`, and an
    open peer session tells the other parties so (:func:`~fdrtd_server.peers.stop_reasons`).
    """
    deadline = job_deadline(policy) if isinstance(policy, Mapping) else None
    if deadline is None:
        return await computation
    seconds, error = deadline
    task = asyncio.current_task()
    assert task is not None
    reasons = stop_reasons()

    def expire() -> None:
        reasons.append(error)
        task.cancel()

    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        return await computation
    except asyncio.CancelledError:
        if not reasons or task.uncancel() > 0:
            raise  # stopped for another reason as well
        raise error from None
    finally:
        timer.cancel()


async def _refuse_session(
    bus: Bus, env: Environment, session: dict[str, Any], error: FdrtdError
) -> None:
    """End ``session`` for the other parties with ``error``, as a refusing function would."""
    with contextlib.suppress(Exception):
        async with PeerSession(
            bus, session["id"], session["parties"], env.server, env.session_timeout
        ):
            raise error


class _Runner:
    """Runs one microservice's handlers and its background jobs.

    Every job record it writes names ``runner``, the id of this process's
    start, and a job that runs on past its start request is listed in the
    ``fdrtd_running`` bucket until its end is recorded, so that its end is
    written by someone even if this process dies (:mod:`fdrtd_server.runners`).
    """

    def __init__(self, bus: Bus, env: Environment, spec: Microservice, runner: str = "") -> None:
        self.bus, self.env, self.spec, self.runner = bus, env, spec, runner
        self.switches = spec.switch_values(env.plugin_policy.get(spec.name))
        self.tasks: set[asyncio.Task[None]] = set()
        self.listed: set[str] = set()  # result handles listed in fdrtd_running
        # the jobs whose function still runs: (task, context) by result handle
        self.computing: dict[str, tuple[asyncio.Task[None], JobContext]] = {}
        self.stopping = False

    def handler(self, function: str) -> Callable[[Request], Awaitable[None]]:
        async def handle(request: Request) -> None:
            try:
                message = wire.unpackb(request.data)
                if not isinstance(message, dict) or not isinstance(message.get("inputs"), dict):
                    raise BadRequest("bus request must be a map with an 'inputs' map")
                wait = _start_wait(message)
                if wait > 0:
                    # held until the job ends or the wait is over: answered from a task
                    # of its own, since NATS hands an endpoint its requests one by one
                    answering = asyncio.create_task(self._answer(function, message, wait, request))
                    self.tasks.add(answering)
                    answering.add_done_callback(self.tasks.discard)
                    return
            except BaseException as error:
                if isinstance(error, asyncio.CancelledError):
                    raise
                code, text = _sanitise(error)
                await request.respond_error(code, text)
                return
            await self._answer(function, message, wait, request)

        return handle

    async def _answer(
        self, function: str, message: dict[str, Any], wait: float, request: Request
    ) -> None:
        try:
            reply = await self._dispatch(function, message, wait)
        except BaseException as error:
            if isinstance(error, asyncio.CancelledError):
                # stopping while the answer is held: say so now rather than let
                # the controller wait out its bus timeout
                with contextlib.suppress(Exception):
                    await asyncio.shield(request.respond_error("503", STOPPED))
                raise
            code, text = _sanitise(error)
            await request.respond_error(code, text)
            return
        await request.respond(wire.packb(reply))

    async def _dispatch(self, function: str, message: dict[str, Any], wait: float) -> Any:
        principal, role = str(message.get("principal", "")), str(message.get("role", ""))
        session = message.get("session")
        if function in self.spec.calls and "result" in message:
            # /v1/compute sends a result handle: only jobs may be started that way
            raise BadRequest(
                f"'{self.spec.name}.{function}' is not a computation; it cannot be started"
            )
        message["inputs"] = await self._validate(function, message["inputs"], session)
        datasets = message.get("datasets") or {}
        if not isinstance(datasets, dict):
            raise BadRequest("'datasets' must be a map")
        policy = message.get("policy") or {}
        policies = policy.get("datasets") or {} if isinstance(policy, dict) else None
        if not isinstance(policies, dict):
            raise BadRequest("'policy' must be a map with the datasets' policies")
        # what every context of this request holds: who asks, and the policy's switches
        common: dict[str, Any] = {
            "bus": self.bus,
            "principal": principal,
            "role": role,
            "session": session,
            "datasets": datasets,
            "microservice": self.spec.name,
            "switches": self.switches,
            "policy_version": str(policy.get("version", "")),
            "policies": policies,
            "env": _strictest(self.env, policies),
        }
        if function in self.spec.calls:
            ctx = CallContext(**common)
            return await self.spec.calls[function](ctx, message["inputs"])
        handle = parse_handle(message.get("result"), "result", "result")
        record = JobRecord(
            principal,
            self.spec.name,
            function,
            "running",
            created=now_iso(),
            runner=self.runner,
            policy_version=common["policy_version"],
        )
        # what its receipt will state it ran (names and numbers; arrays only as digests)
        record.parameters = receipts.parameters_of(message["inputs"])
        record.session = dict(session) if isinstance(session, dict) else {}
        job = JobContext(**common, handle=handle, record=record)
        computed = asyncio.Event()
        recorded: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            self._run(job, self.spec.jobs[function], message["inputs"], computed, recorded, policy)
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        self.computing[handle] = (task, job)
        task.add_done_callback(lambda _: self.computing.pop(handle, None))
        try:
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(computed.wait(), wait)
            if computed.is_set():
                # finished within the wait: one record, the final one, and it goes
                # back with the answer, so that the controller need not read it again
                written = await job.write_record()
                recorded.set_result(True)
                if not written:
                    raise ServiceUnavailable(RESTARTED)
                final = record.to_dict()
                if message.get("value") is False:
                    final["result"] = None  # the caller wants the state only
                return {"result": handle, "status": record.status, "record": final}
            # the job runs on: record it as running now, and the task records the end
            # after this (so that the running record can never overwrite the final one);
            # listed first, so that a running record is never missing from the list
            await self.bus.list_running(handle, self.runner)
            self.listed.add(handle)
            if not await job.write_record():
                # the sweep failed it between the two writes: it is not ours to run
                self.listed.discard(handle)
                task.cancel()
                raise ServiceUnavailable(RESTARTED)
            return {"result": handle, "status": "running"}
        finally:
            if not recorded.done():
                # the running record is written, or a write failed, or we were
                # stopped: either way the task records the end itself
                recorded.set_result(False)

    async def _validate(
        self, function: str, inputs: dict[str, Any], session: Any
    ) -> dict[str, Any]:
        """Check ``inputs`` against the function's declaration; return them as it gets them.

        A multi-party job refused here tells the session's other parties at
        once (the abort of :class:`~fdrtd_server.peers.PeerSession`), as the
        function itself would, so that they fail with this party's reason
        instead of waiting out the session timeout.

        Raises:
            BadRequest: Naming the input that breaks the declaration.
        """
        signature = self.spec.signatures.get(function)
        if signature is None:
            return inputs
        if signature.multiparty and not isinstance(session, dict):
            raise BadRequest(
                f"'{self.spec.name}.{function}' is a multi-party protocol: give a 'session' "
                "with an 'id' and the 'parties'"
            )
        try:
            return signature.validate(inputs, f"'{self.spec.name}.{function}'")
        except BadRequest as error:
            if function in self.spec.jobs and isinstance(session, dict):
                await _refuse_session(self.bus, self.env, session, error)
            raise

    async def _run(
        self,
        ctx: JobContext,
        function: JobFunction,
        inputs: dict[str, Any],
        computed: asyncio.Event,
        recorded: asyncio.Future[bool],
        policy: Any = None,
    ) -> None:
        """Compute, then write the final record unless the start request's answer did.

        The computation is cancelled after the whole-job timeout of the
        owner's ``policy`` (as the controller sent it), and fails then.

        Nothing is written or reported once the job's record was changed by
        someone else (:attr:`JobContext.ended_elsewhere`): the job then has
        its one outcome already.
        """
        assert ctx.record is not None
        error_class = ""
        try:
            result = await _within(policy, function(ctx, inputs))
            output, joint = receipts.value_sha256s(result)
        except asyncio.CancelledError:
            self.computing.pop(ctx.handle, None)
            if ctx.ended_elsewhere:
                await asyncio.shield(self._unlist(ctx.handle))
                raise
            ctx.record.status, ctx.record.error_status = "failed", 503
            ctx.record.error = RESTARTED if ctx.lapsed else STOPPED
            try:
                await asyncio.shield(self._record_end(ctx))
            finally:
                if not ctx.ended_elsewhere:
                    await self._report_end(ctx, "RunnerStopped" if ctx.lapsed else "CancelledError")
            raise
        except BaseException as error:
            code, message = _sanitise(error)
            error_class = _error_class(error)
            ctx.record.status, ctx.record.error_status, ctx.record.error = (
                "failed",
                int(code),
                message,
            )
        else:
            ctx.record.status, ctx.record.progress, ctx.record.result = "done", 1.0, result
            ctx.record.output_sha256, ctx.record.joint_sha256 = output, joint
        ctx.record.datasets = dict(ctx.versions)
        self.computing.pop(ctx.handle, None)
        computed.set()
        try:
            written = await asyncio.shield(recorded)
        except asyncio.CancelledError:
            written = False  # stopping: record the end now, whoever else may
        try:
            if not written:
                await asyncio.shield(self._record_end(ctx))
        finally:
            if not ctx.ended_elsewhere:
                await self._report_end(ctx, error_class)

    async def _record_end(self, ctx: JobContext) -> None:
        """Write the final record, then take the job off the list of running ones.

        Bounded while stopping (:data:`~fdrtd_server.runners.STOP_WRITE_TIMEOUT`),
        and skipped once NATS is gone for good: a job left unrecorded fails at
        the next start (:mod:`fdrtd_server.runners`).
        """
        assert ctx.record is not None
        if self.bus.lost:
            return
        async with asyncio.timeout(STOP_WRITE_TIMEOUT if self.stopping else None):
            await ctx.write_record()  # unless someone else ended it: then nothing is written
            await self._unlist(ctx.handle)

    async def _unlist(self, handle: str) -> None:
        """Take ``handle`` off the list of running jobs, if this runner listed it.

        Also when someone else ended the job: the sweep unlisted it already (a
        second purge does nothing), a release did not.
        """
        if handle in self.listed:
            self.listed.discard(handle)
            await self.bus.unlist_running(handle)

    def lapsed(self) -> None:
        """Stop the jobs running on past their start: this runner's liveness key had lapsed.

        Each writes its end (failed, "restarted") unless the sweep of another
        process already wrote one; either way it has one outcome.
        """
        for handle, (task, ctx) in list(self.computing.items()):
            if handle in self.listed and not task.done():
                ctx.lapsed = True
                task.cancel()

    async def _report_end(self, ctx: JobContext, error_class: str) -> None:
        """Tell the controller's audit log how the job ended: status and error class, no data.

        A core NATS message (a publish, no round trip): a controller that is not
        connected at that moment does not record it; the job's record keeps its end.
        """
        assert ctx.record is not None
        event: dict[str, Any] = {
            "result": ctx.handle,
            "principal": ctx.principal,
            "microservice": self.spec.name,
            "function": ctx.record.function,
            "status": ctx.record.status,
        }
        if ctx.record.status == "failed":
            event.update(error_status=ctx.record.error_status, error_class=error_class)
        if ctx.versions:  # which named datasets it read, so that owners can see who used them
            event["datasets"] = {name: v["id"] for name, v in ctx.versions.items()}
        try:
            await asyncio.shield(self.bus.nc.publish(JOBS_SUBJECT, wire.packb(event)))
        except Exception as error:
            log.warning("could not report the end of a job for the audit log: %s", error)

    async def stop(self) -> None:
        self.stopping = True
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for cleanup in self.spec.cleanups:
            try:
                cleanup()
            except Exception:
                log.exception("cleanup of microservice '%s' failed", self.spec.name)


class RunningMicroservices:
    """The NATS services started by :func:`start_microservices`; stop them with :meth:`stop`."""

    def __init__(self, runner: str = "") -> None:
        self.runner = runner
        """The runner id of this process's start, written into every job record."""
        self.services: list[Service] = []
        self.runners: list[_Runner] = []
        self.heartbeat: Heartbeat | None = None

    def lapsed(self) -> None:
        """This process's liveness key had lapsed: stop its jobs that run on past their start."""
        for runner in self.runners:
            runner.lapsed()

    async def stop(self) -> None:
        """Stop accepting requests, cancel running jobs (they are marked failed)."""
        for service in self.services:
            # a closed connection (NATS gone) took the subscriptions with it
            with contextlib.suppress(nats.errors.ConnectionClosedError):
                await service.stop()
        for runner in self.runners:
            await runner.stop()
        if self.heartbeat is not None:
            await self.heartbeat.stop()


async def start_microservices(
    bus: Bus, env: Environment, specs: Mapping[str, Microservice]
) -> RunningMicroservices:
    """Start every microservice in ``specs`` as a NATS service on ``bus``.

    The process gets a new runner id, whose liveness key is kept fresh while
    the microservices run; jobs left unfinished by processes that are gone
    are marked failed first (:func:`fdrtd_server.runners.fail_orphaned_jobs`).
    """
    for spec in specs.values():
        # before anything starts: a switch the owner set that it does not declare
        spec.switch_values(env.plugin_policy.get(spec.name))
    running = RunningMicroservices(new_runner_id())
    running.heartbeat = await Heartbeat(bus, running.runner, running.lapsed).start()
    await fail_orphaned_jobs(bus, at_start=True)
    await bus.enable_set_cache()
    # listen for peer messages before any session can start, so that none is missed
    await PeerInbox.of(bus)
    for spec in specs.values():
        service = await add_service(
            bus.nc,
            name=f"fdrtd-{spec.name}".replace("_", "-"),
            version=spec.version,
            description=spec.description,
            metadata={"fdrtd.microservice": spec.name},
            queue_group=QUEUE_GROUP,
        )
        runner = _Runner(bus, env, spec, running.runner)
        for function in spec.functions:
            await service.add_endpoint(
                EndpointConfig(
                    name=function,
                    handler=runner.handler(function),
                    subject=f"{SERVICE_PREFIX}.{spec.name}.{function}",
                    queue_group=QUEUE_GROUP,
                    metadata={
                        "kind": "job" if function in spec.jobs else "call",
                        SIGNATURE_METADATA: json.dumps(spec.signatures[function].to_dict()),
                    },
                )
            )
        running.services.append(service)
        running.runners.append(runner)
    return running


def distribution_version(distribution: str, fallback: str = "0.0.0") -> str:
    """The installed version of ``distribution`` (for ``Microservice.version``)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return fallback
