"""Parsing json and msgpack uploads, bounded in size, structure, memory and time.

Documents cost far more memory parsed than as bytes: a msgpack list of empty
lists took 65 times its size as Python objects (a CSV of one-letter rows,
when CSV was parsed here too, 57 times; CSV and Parquet are now streamed, see
:mod:`._columnar`). A parse also holds the CPU for seconds. So:

* the controller refuses a json or msgpack upload larger than
  ``max_parse_bytes`` before it stores anything, and the data microservice
  checks again (:func:`check_parse_size`);
* :func:`parse` applies structural limits: at most :data:`MAX_COLUMNS`
  columns and :data:`MAX_ROWS` records, strings of at most
  :data:`MAX_CELL_CHARS` characters, and text columns small enough to be
  turned into a numpy array later (``max_text_bytes``);
* anything above :data:`INLINE_LIMIT` bytes is parsed in a child process
  (:class:`ParseProcess`) whose address space is capped and which is killed
  at its deadline, so that a hostile upload can exhaust only that child, and
  the event loop, which also serves every other request in the embedded
  default, never waits for a parse. Smaller uploads (at most a few MiB of
  memory however they are built) are parsed in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Self

import numpy as np

from fdrtd_server.sdk import BadRequest, FdrtdError, PayloadTooLarge, exit_with, wire
from fdrtd_server.sdk.host import error_for_status

__all__ = [
    "FORMATS",
    "INLINE_LIMIT",
    "MAX_CELL_CHARS",
    "MAX_COLUMNS",
    "MAX_ROWS",
    "Limits",
    "ParseProcess",
    "Parsed",
    "check_parse_size",
    "parse",
]

log = logging.getLogger("fdrtd.data")

FORMATS = ("raw", "csv", "parquet", "msgpack", "json")
PARSED = ("msgpack", "json")
"""The formats parsed whole in memory, and so limited to ``max_parse_bytes``; csv and
parquet are converted in bounded memory instead (see :mod:`._columnar`)."""
MAX_COLUMNS = 1000
MAX_ROWS = 50_000_000
MAX_CELL_CHARS = 131_072
"""Longest text cell or column name (the csv module's own default field limit)."""
INLINE_LIMIT = 256 * 1024
"""Uploads up to this size are parsed in a thread of the serving process, larger ones in a child."""
MEMORY_FACTOR = 16
MEMORY_FLOOR = 256 * 1024 * 1024
"""A parse child may use ``max(MEMORY_FLOOR, MEMORY_FACTOR * max_parse_bytes)`` more bytes."""
PIECE = 1024 * 1024
"""The parsed form travels from the child in pieces of this size."""
CONCURRENT_PARSES = 2
"""Parse children running at once in one process; further uploads wait (within their budget)."""
_RAW_HINT = (
    "send large numeric data as a raw array instead (format=raw; Client.upload(numpy_array) "
    "does), which is stored without being parsed"
)


@dataclass(frozen=True)
class Limits:
    """The limits of one parse."""

    max_parse_bytes: int
    """The largest csv, json or msgpack upload (the server's ``max_parse_bytes``)."""
    max_text_bytes: int
    """The largest a text column may grow as a numpy array (rows x longest x 4 bytes)."""

    @classmethod
    def for_parse_bytes(cls, max_parse_bytes: int) -> Limits:
        """The limits that follow from the ``max_parse_bytes`` setting."""
        return cls(max_parse_bytes, max(4 * max_parse_bytes, 64 * 1024 * 1024))

    @property
    def memory_bytes(self) -> int:
        """How much memory a parse child may take beyond what it starts with."""
        return max(MEMORY_FLOOR, MEMORY_FACTOR * self.max_parse_bytes)


@dataclass
class Parsed:
    """A parsed upload: its description, and its stored form (msgpack) in pieces."""

    description: dict[str, Any]
    pieces: list[bytes | bytearray | memoryview]


def check_parse_size(fmt: str, size: int, max_parse_bytes: int) -> None:
    """Refuse a json or msgpack upload larger than ``max_parse_bytes``.

    Raises:
        PayloadTooLarge: Saying why, and what to send instead.
    """
    if fmt in PARSED and size > max_parse_bytes:
        raise PayloadTooLarge(
            f"{fmt} uploads are limited to {max_parse_bytes} bytes on this server "
            f"(its max_parse_bytes setting), because they are parsed in memory; {_RAW_HINT}"
        )


def _check_text(name: str, rows: int, longest: int, limits: Limits) -> None:
    """Refuse a text column that would be too large as a numpy array of strings."""
    needed = rows * longest * 4  # numpy's fixed-width unicode: 4 bytes a character
    if needed > limits.max_text_bytes:
        raise PayloadTooLarge(
            f"text column '{name[:40]}' would take {needed} bytes in memory when computed "
            f"on ({rows} records times its longest value, {longest} characters); this "
            f"server allows {limits.max_text_bytes}: shorten the longest values or leave "
            "the column out"
        )


_NOT_UNICODE = (
    "text that is not valid Unicode (a lone UTF-16 surrogate, such as an unpaired \\u escape "
    "in JSON); send it as valid UTF-8 text"
)


def _is_unicode(texts: list[str]) -> bool:
    r"""Whether every string is valid Unicode, i.e. can be written as UTF-8.

    JSON lets ``"\ud800"`` through as a one-character string that no UTF-8
    encoder (msgpack, the store, the answer) accepts; one join and one
    encode check a whole column in C.
    """
    try:
        "".join(texts).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_name(name: Any) -> str:
    if isinstance(name, bytes | bytearray):
        raise BadRequest(
            "column names must be non-empty strings, and one is msgpack binary (bin); "
            "send the names as msgpack str (a Python str, not bytes)"
        )
    if not isinstance(name, str) or not name:
        raise BadRequest("column names must be non-empty strings")
    if len(name) > 200:
        raise BadRequest("column names must be at most 200 characters")
    if not _is_unicode([name]):
        raise BadRequest(f"a column name holds {_NOT_UNICODE}")
    return name


# -- json and msgpack ----------------------------------------------------------


def _float_column(values: list[Any], shown: str, kind: str) -> np.ndarray[Any, Any]:
    """A column of numbers as float64; one beyond the float range is a clear 400."""
    try:
        return np.array(values, dtype=np.float64)
    except OverflowError:
        raise BadRequest(
            f"column '{shown}' holds a {kind} too large for a 64-bit float (above about 1.8e308)"
        ) from None


def _normalise(document: Any, limits: Limits) -> dict[str, Any]:
    """Columns from a decoded document: a map of name to list or array, or one list or array."""
    if isinstance(document, list | np.ndarray):
        document = {"value": document}
    if not isinstance(document, dict) or not document or len(document) > MAX_COLUMNS:
        raise BadRequest(
            f"upload must be a list, an array, or a map of 1 to {MAX_COLUMNS} named columns"
        )
    columns: dict[str, Any] = {}
    for name, values in document.items():
        name = _check_name(name)
        shown = name[:40]
        if isinstance(values, np.ndarray):
            if values.ndim == 0:
                raise BadRequest(f"column '{shown}' must be a list or an array of records")
            columns[name] = values
            continue
        if not isinstance(values, list):
            raise BadRequest(f"column '{shown}' must be a list or an array")
        if len(values) > MAX_ROWS:
            raise PayloadTooLarge(f"column '{shown}' has more than {MAX_ROWS} records")
        if all(isinstance(v, str) for v in values):
            if not _is_unicode(values):
                raise BadRequest(f"column '{shown}' holds {_NOT_UNICODE}")
            longest = max(map(len, values), default=0)
            if longest > MAX_CELL_CHARS:
                raise BadRequest(
                    f"column '{shown}' holds a text longer than {MAX_CELL_CHARS} characters"
                )
            _check_text(name, len(values), longest, limits)
            columns[name] = values
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            # whole numbers stay exact (ids above 2^53 would be rounded as floats)
            try:
                columns[name] = np.array(values, dtype=np.int64)
            except OverflowError:
                columns[name] = _float_column(values, shown, "whole number")
        else:
            try:
                columns[name] = _float_column(values, shown, "number")
            except (TypeError, ValueError):
                raise BadRequest(
                    f"column '{shown}' must hold only numbers or only strings"
                ) from None
    lengths = {len(values) for values in columns.values()}
    if len(lengths) != 1:
        raise BadRequest("all columns must have the same number of records")
    return columns


def _describe(columns: dict[str, Any]) -> dict[str, Any]:
    described: dict[str, Any] = {}
    for name, values in columns.items():
        if isinstance(values, np.ndarray):
            described[name] = {"dtype": values.dtype.str, "shape": list(values.shape)}
        else:
            described[name] = {"dtype": "text", "shape": [len(values)]}
    return {"format": "table", "columns": described, "rows": len(next(iter(columns.values())))}


def parse_document(fmt: str, raw: bytes, limits: Limits) -> Parsed:
    """Parse a json or msgpack upload.

    Raises:
        BadRequest: If it is not valid, or not a table of numbers and strings.
        PayloadTooLarge: If it breaks a structural limit.
    """
    if fmt == "json":
        try:
            decoded = json.loads(raw)
        except UnicodeDecodeError:
            raise BadRequest("JSON upload is not UTF-8 text") from None
        except (ValueError, RecursionError):
            raise BadRequest("JSON upload is not valid JSON") from None
        try:
            document = wire.from_jsonable(decoded)
        except wire.WireError as error:
            raise BadRequest(f"JSON upload holds an array that cannot be read: {error}") from None
        except RecursionError:
            raise BadRequest("JSON upload is nested too deeply") from None
    else:
        try:
            document = wire.unpackb(
                raw,
                max_map_len=MAX_COLUMNS,
                max_array_len=MAX_ROWS,
                max_str_len=MAX_CELL_CHARS * 4,  # UTF-8: up to 4 bytes a character
                max_bin_len=limits.max_parse_bytes,
                max_ext_len=limits.max_parse_bytes,
            )
        except wire.WireError as error:
            raise BadRequest(f"msgpack upload cannot be read: {error}") from None
    columns = _normalise(document, limits)
    return Parsed(_describe(columns), [wire.packb(columns)])


def parse(fmt: str, raw: bytes, limits: Limits) -> Parsed:
    """Parse a json or msgpack upload into its description and stored form.

    Raises:
        BadRequest: If the upload is not valid in its format.
        PayloadTooLarge: If it is larger than the limits allow.
    """
    check_parse_size(fmt, len(raw), limits.max_parse_bytes)
    if fmt in PARSED:
        return parse_document(fmt, raw, limits)
    raise BadRequest(f"'format' must be one of {', '.join(PARSED)}")


def memory_message(fmt: str, limits: Limits) -> str:
    """The refusal of an upload whose parse ran out of the memory allowed."""
    return (
        f"the {fmt} upload needs more memory to parse than this server allows "
        f"({limits.memory_bytes} bytes; too many small values or nested lists); {_RAW_HINT}"
    )


# -- the parse child -----------------------------------------------------------------


def _cap_memory(extra: int) -> None:
    """Cap this process's address space at its current size plus ``extra`` bytes (Linux)."""
    try:
        import resource

        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[0])
    except (ImportError, OSError, ValueError, IndexError):
        return  # not Linux: the child is still separate and killed at its deadline
    limit = pages * os.sysconf("SC_PAGE_SIZE") + extra
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _child_main(conn: Connection, fmt: str, limits: Limits, server: int) -> None:
    """In the child: receive the upload, parse it, send the description and the pieces.

    ``server`` is the pid of the process that started the child: the child
    is the fork server's, not its, and ends as soon as that process is gone.
    """
    exit_with(server)
    try:
        _cap_memory(limits.memory_bytes)
        raw = conn.recv_bytes()
        try:
            parsed = parse(fmt, raw, limits)
        except FdrtdError as error:
            conn.send_bytes(wire.packb({"status": error.status, "message": error.message}))
            return
        except MemoryError:
            conn.send_bytes(wire.packb({"status": 413, "message": memory_message(fmt, limits)}))
            return
        except RecursionError:
            deep = f"{fmt} upload is nested too deeply"
            conn.send_bytes(wire.packb({"status": 400, "message": deep}))
            return
        del raw
        conn.send_bytes(wire.packb({"status": 200, "description": parsed.description}))
        for piece in parsed.pieces:
            view = memoryview(piece).cast("B")
            for start in range(0, len(view), PIECE):
                conn.send_bytes(view[start : start + PIECE])
        conn.send_bytes(b"")
    except (BrokenPipeError, EOFError, MemoryError):
        pass  # the parent gave up, or memory ran out even for an answer (seen as such)
    finally:
        conn.close()


_PRELOADED = False
_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def _context() -> Any:
    """The forkserver context: children are forked from a clean process, never from ours.

    Forking the serving process itself would copy its threads' locks and
    NATS connections; ``spawn`` would import numpy again for every upload.
    The fork server imports this module once, and forks a child from it in
    a few milliseconds.
    """
    global _PRELOADED
    context = multiprocessing.get_context("forkserver")
    if not _PRELOADED:
        context.set_forkserver_preload([__name__, "microservices.data._columnar"])
        _PRELOADED = True
    return context


def _slots() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    slots = _SLOTS.get(loop)
    if slots is None:
        slots = _SLOTS[loop] = asyncio.Semaphore(CONCURRENT_PARSES)
    return slots


class ChildWork:
    """Work on one upload in a child process, which is killed at its deadline.

    The base of :class:`ParseProcess` and of the conversion child of
    :mod:`._columnar`: a slot among :data:`CONCURRENT_PARSES` per event
    loop, the child started from the fork server, answers read within the
    deadline, and the child killed on the way out. Every wait happens in a
    thread; the event loop never blocks. Subclasses say how running out of
    time and of memory are refused.
    """

    def __init__(self, fmt: str, limits: Limits, deadline: float) -> None:
        self.fmt, self.limits, self.deadline = fmt, limits, deadline
        self._conn: Connection | None = None
        self._process: Any = None
        self._slot: asyncio.Semaphore | None = None

    async def __aenter__(self) -> Self:
        slots = _slots()
        try:
            await asyncio.wait_for(slots.acquire(), self._remaining())
        except TimeoutError:
            raise self._timeout() from None
        self._slot = slots
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await asyncio.to_thread(self._stop)
        finally:
            if self._slot is not None:
                self._slot.release()

    def _remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def _timeout(self) -> PayloadTooLarge:
        """The refusal when the work does not end by the deadline."""
        raise NotImplementedError("a ChildWork subclass must say how a timeout is refused")

    def _out_of_memory(self) -> PayloadTooLarge:
        """The refusal when the child dies without an answer (its memory cap, or a crash)."""
        raise NotImplementedError("a ChildWork subclass must say how running out is refused")

    def _stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        process = self._process
        if process is not None:
            if process.is_alive():
                process.kill()  # our own child, by its id
            process.join(5)
            with contextlib.suppress(ValueError):
                process.close()

    def _launch(self, target: Callable[..., None], *args: Any) -> Connection:
        """Start ``target(connection, *args, server_pid)`` in a child; our end of the pipe."""
        context = _context()
        ours: Connection
        ours, theirs = context.Pipe()
        self._conn = ours
        process = context.Process(target=target, args=(theirs, *args, os.getpid()), daemon=True)
        process.start()
        self._process = process
        theirs.close()
        return ours

    def _receive(self) -> bytes:
        """The next message from the child, within the deadline."""
        assert self._conn is not None
        if not self._conn.poll(self._remaining()):
            raise self._timeout()
        try:
            return self._conn.recv_bytes()
        except (EOFError, OSError):
            raise self._out_of_memory() from None

    def _header(self, message: bytes) -> dict[str, Any]:
        """The description in the child's first answer, or the error it answered."""
        answer = wire.unpackb(message)
        if answer.get("status") != 200:
            raise error_for_status(int(answer["status"]), str(answer["message"]))
        description: dict[str, Any] = answer["description"]
        return description


class ParseProcess(ChildWork):
    """One json or msgpack upload parsed in a child process, killed at its deadline.

    Use as an async context manager::

        async with ParseProcess(fmt, limits, deadline) as child:
            description = await child.start(raw)
            async for piece in child.pieces():
                ...
    """

    def _timeout(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"parsing the {self.fmt} upload did not finish in the time allowed; {_RAW_HINT}"
        )

    def _out_of_memory(self) -> PayloadTooLarge:
        return PayloadTooLarge(memory_message(self.fmt, self.limits))

    def _start(self, raw: bytes) -> dict[str, Any]:
        ours = self._launch(_child_main, self.fmt, self.limits)
        # a child that ended early said why (or not): that is read next
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            ours.send_bytes(raw)
        return self._header(self._receive())

    async def start(self, raw: bytes) -> dict[str, Any]:
        """Start the child, hand it ``raw`` and return the description it answers.

        Raises:
            BadRequest: If the upload is not valid in its format.
            PayloadTooLarge: If it breaks a limit, runs out of memory or of time.
        """
        return await asyncio.to_thread(self._start, raw)

    async def pieces(self) -> AsyncIterator[bytes]:
        """The stored form, piece by piece, as the child sends it."""
        while piece := await asyncio.to_thread(self._receive):
            yield piece


async def iterate(pieces: Iterable[bytes | bytearray | memoryview]) -> AsyncIterator[bytes]:
    """``pieces`` as an async iterator of bytes, for the object store."""
    for piece in pieces:
        view = memoryview(piece).cast("B")
        for start in range(0, len(view), PIECE):
            yield bytes(view[start : start + PIECE])
