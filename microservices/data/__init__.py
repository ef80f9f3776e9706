"""The data microservice: turns an uploaded object into a dataset, and releases it.

The controller streams an upload's bytes straight into the JetStream object
store under a fresh data handle, then calls ``fdrtd.svc.data.register``.
This microservice checks the bytes against the declared format and records
the dataset's description (owner, columns, dtypes, row count). Nothing here
ever sends a dataset's content anywhere: the only answers are descriptions.

Formats:

``raw``
    The bytes of one numpy array (``dtype`` and optional ``shape`` given by the
    client). Checked by length alone, so a 1 GiB array is never read into
    memory at upload time.
``csv``
    A header row, then records. Columns whose every cell is a number become
    float64 (empty cells are NaN); other columns stay text (categories, ids).
``parquet``
    Flat columns of booleans, integers, floats and text (a pandas DataFrame
    as ``Client.upload`` sends it); names and types are kept.
``msgpack`` / ``json``
    A map of column name to list or array, or a single list or array (which
    becomes the column ``value``).

CSV and Parquet are streamed: copied from the object store into a temporary
file and converted batch by batch into Parquet, the stored form, in bounded
memory, whatever their size (see :mod:`._columnar`). json and msgpack are
parsed whole in memory, which costs many times their size, so they are
limited to ``max_parse_bytes`` and parsed with structural, memory and time
limits, off the event loop (see :mod:`._parse`). Either way the work is done
in a child process killed at its deadline when the upload is larger than a
few hundred KiB.

Two more limits hold for every upload:

* **Quota.** The datasets of one client (token name) may take at most
  ``max_client_bytes`` on this server, counted as stored (a CSV's parsed
  form may be larger than the CSV). The controller checks before it stores
  anything; ``register`` checks again, under a lock, just before it records
  the dataset.
* **Budget.** ``register`` is given a number of seconds by the controller
  (``budget``, less than the controller's own wait): it records nothing
  after that time, and undoes a record that went in late. So when the
  controller gives up on a registration, deletes the upload and audits it
  as refused, no dataset of it remains.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fdrtd_server.sdk import (
    BadRequest,
    CallContext,
    Conflict,
    Input,
    Microservice,
    Output,
    PayloadTooLarge,
    ServiceUnavailable,
    distribution_version,
    wire,
)
from fdrtd_server.sdk.host import (
    DEFAULT_MAX_CLIENT_BYTES,
    DEFAULT_MAX_PARSE_BYTES,
    SETS_BUCKET,
    now_iso,
    parse_handle,
)

from ._columnar import STREAMED, convert_file, file_pieces
from ._parse import (
    FORMATS,
    INLINE_LIMIT,
    Limits,
    Parsed,
    ParseProcess,
    check_parse_size,
    iterate,
    parse,
)

__all__ = ["FORMATS", "service"]

service = Microservice(
    "data",
    distribution_version("fdrtd", "0.1.0"),
    "Registers uploaded datasets and releases them; never returns their content.",
)

DEFAULT_BUDGET = 25.0
"""Seconds ``register`` may take if the controller names none (its bus timeout is 30 s)."""
STORE_RESERVE = 2.0
"""Seconds of the budget kept for storing the parsed form and recording the dataset
(at most a fifth of what is left of the budget when the parse starts)."""
_QUOTA_LOCKS: weakref.WeakValueDictionary[tuple[int, str], asyncio.Lock] = (
    weakref.WeakValueDictionary()
)


def _setting(inputs: dict[str, Any], key: str, default: int) -> int:
    value = inputs.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1024:
        raise BadRequest(f"'{key}' must be a number of bytes, at least 1024")
    return value


def _budget(inputs: dict[str, Any]) -> float:
    value = inputs.get("budget", DEFAULT_BUDGET)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value <= 600:
        raise BadRequest("'budget' must be a number of seconds between 1 and 600")
    return float(value)


def _numeric_dtype(text: Any) -> Any:
    try:
        return wire.check_dtype(str(text))
    except wire.WireError:
        raise BadRequest(
            "'dtype' must be a boolean, integer or float type written as a numpy code such "
            "as '<f8', '<i4' or '|b1', or a name such as 'float64', 'int32' or 'bool'"
        ) from None


def _raw_description(inputs: dict[str, Any], size: int) -> dict[str, Any]:
    dtype = _numeric_dtype(inputs.get("dtype", "float64"))
    shape = inputs.get("shape")
    if shape is None:
        if size % dtype.itemsize:
            raise BadRequest("upload length is not a whole number of elements of its dtype")
        shape = [size // dtype.itemsize]
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 8
        or not all(isinstance(n, int) and n >= 0 for n in shape)
    ):
        raise BadRequest("'shape' must be a list of 1 to 8 non-negative integers")
    if math.prod(shape) * dtype.itemsize != size:
        raise BadRequest("upload length does not match 'dtype' and 'shape'")
    return {
        "format": "raw",
        "dtype": dtype.str,
        "shape": shape,
        "columns": {"value": {"dtype": dtype.str, "shape": shape}},
        "rows": shape[0],
    }


async def _owned(ctx: CallContext) -> list[tuple[str, dict[str, Any]]]:
    """The caller's datasets: handle and stored description."""
    # the stream's subject list is exact; KeyValue.keys() can miss keys under load
    info = await ctx.bus.js.stream_info(f"KV_{SETS_BUCKET}", subjects_filter=f"$KV.{SETS_BUCKET}.>")
    keys = [subject.rsplit(".", 1)[-1] for subject in (info.state.subjects or {})]
    found = []
    for key in keys:
        description = await ctx.bus.get_set(key)
        if description is not None and description["owner"] == ctx.principal:
            found.append((key, description))
    return found


def _stored(description: dict[str, Any]) -> int:
    """Bytes a dataset takes in the object store (its upload size, for older records)."""
    return int(description.get("stored", description.get("bytes", 0)))


async def _usage(ctx: CallContext, leave_out: str = "") -> int:
    return sum(_stored(d) for handle, d in await _owned(ctx) if handle != leave_out)


def quota_message(used: int, quota: int) -> str:
    """The refusal of an upload that would take a client over its quota."""
    return (
        f"this upload would take your datasets on this server over your quota of {quota} "
        f"bytes (they take {used} bytes now): release datasets you no longer need "
        "(DELETE /v1/data/{handle}), or ask the server's owner to raise max_client_bytes"
    )


def _quota_lock(principal: str) -> asyncio.Lock:
    """One lock per client and event loop: its quota check and record go one at a time."""
    key = (id(asyncio.get_running_loop()), principal)
    lock = _QUOTA_LOCKS.get(key)
    if lock is None:
        lock = _QUOTA_LOCKS[key] = asyncio.Lock()
    return lock


def _late() -> ServiceUnavailable:
    return ServiceUnavailable(
        "registering the upload took longer than the server waits for it; nothing was kept, "
        "try again"
    )


async def _read_upload(ctx: CallContext, handle: str) -> bytes:
    """The uploaded bytes, read around the dataset cache (nothing of a parse input is kept)."""
    result = await ctx.bus.data.get(handle)
    return bytes(result.data or b"")


async def _within(pieces: AsyncIterator[bytes], room: int) -> AsyncIterator[bytes]:
    """``pieces``, refused as soon as they add up to more than ``room`` bytes."""
    total = 0
    async for piece in pieces:
        total += len(piece)
        if total > room:
            raise PayloadTooLarge(
                "the parsed form of this upload is larger than what is left of your quota "
                f"on this server ({room} bytes): release datasets you no longer need "
                "(DELETE /v1/data/{handle}), or ask the server's owner to raise "
                "max_client_bytes"
            )
        yield piece


async def _parse_and_store(
    ctx: CallContext, handle: str, fmt: str, limits: Limits, deadline: float, room: int
) -> tuple[dict[str, Any], int]:
    """Parse the upload under ``handle`` and store its parsed form in its place.

    Returns:
        The description and the number of bytes stored.

    Raises:
        BadRequest, PayloadTooLarge: If the upload is invalid or too large (also
            when its parsed form is larger than ``room``, what is left of the quota).
    """
    raw = await _read_upload(ctx, handle)
    parse_deadline = deadline - min(STORE_RESERVE, (deadline - time.monotonic()) / 5)
    if len(raw) <= INLINE_LIMIT:
        try:
            parsed: Parsed = await asyncio.wait_for(
                asyncio.to_thread(parse, fmt, raw, limits),
                max(0.0, parse_deadline - time.monotonic()),
            )
        except TimeoutError:
            raise PayloadTooLarge(
                f"parsing the {fmt} upload did not finish in the time allowed; send large "
                "numeric data as a raw array instead (format=raw)"
            ) from None
        del raw
        await ctx.bus.delete_object(handle)
        stored = await ctx.bus.put_stream(handle, _within(iterate(parsed.pieces), room), room)
        return parsed.description, stored
    async with ParseProcess(fmt, limits, parse_deadline) as child:
        description = await child.start(raw)
        del raw
        await ctx.bus.delete_object(handle)
        stored = await ctx.bus.put_stream(handle, _within(child.pieces(), room), room)
        return description, stored


async def _convert_and_store(
    ctx: CallContext, handle: str, fmt: str, limits: Limits, deadline: float, room: int
) -> tuple[dict[str, Any], int]:
    """Convert the csv or parquet upload under ``handle`` and store the result in its place.

    The upload is copied into a temporary file (never whole into memory),
    converted there into Parquet, and the Parquet file is streamed back; the
    temporary files are removed whatever happens.

    Returns:
        The description and the number of bytes stored.

    Raises:
        BadRequest, PayloadTooLarge: If the upload is invalid or too large (also
            when its stored form is larger than ``room``, what is left of the quota).
        ServiceUnavailable: If it is not done by ``deadline``.
    """
    with tempfile.TemporaryDirectory(prefix="fdrtd-upload-") as folder:
        source, target = Path(folder, "upload"), Path(folder, "stored.parquet")
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                with source.open("wb") as spool:
                    await ctx.bus.data.get(handle, writeinto=spool)
        except TimeoutError:
            raise _late() from None
        description = await convert_file(fmt, source, target, limits, deadline)
        source.unlink()
        await ctx.bus.delete_object(handle)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                stored = await ctx.bus.put_stream(handle, _within(file_pieces(target), room), room)
        except TimeoutError:
            raise _late() from None
    return description, stored


_HANDLE = Input("handle", "string", "the dataset's handle", required=True)
_SCHEMA = [
    Output("handle", "string", "the dataset's handle"),
    Output("format", "string", "the upload format"),
    Output("columns", "object", "each column's dtype and shape"),
    Output("rows", "integer", "the number of records"),
    Output("bytes", "integer", "the size of the upload"),
    Output("created", "string", "when it was uploaded (ISO 8601)"),
]
_BYTES = "a limit in bytes, at least 1024"


@service.call(
    "register",
    inputs=[
        _HANDLE,
        Input("size", "integer", "the bytes uploaded", required=True, minimum=0),
        Input("format", "string", "the upload format", required=True, choices=FORMATS),
        Input("dtype", "string", "a raw array's numpy dtype"),
        Input("shape", "array", "a raw array's shape", minimum=1, maximum=8, items="integer"),
        Input("max_parse_bytes", "integer", _BYTES, minimum=1024),
        Input("max_client_bytes", "integer", _BYTES, minimum=1024),
        Input("budget", "number", "seconds it may take", minimum=1, maximum=600),
    ],
    outputs=_SCHEMA,
)
async def register(ctx: CallContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Check an uploaded object against its format and record the dataset.

    Inputs (from the controller): ``handle``, ``size``, ``format`` (with
    ``dtype`` and ``shape`` for raw arrays), and the limits ``max_parse_bytes``,
    ``max_client_bytes`` and ``budget`` (seconds). Nothing is recorded after
    the budget; on any error the upload is deleted.
    """
    deadline = time.monotonic() + _budget(inputs)
    handle = parse_handle(inputs.get("handle"), "data")
    size = inputs.get("size")
    fmt = inputs.get("format")
    if await ctx.bus.get_set(handle) is not None:
        # never touch a dataset that is already registered (not even to clean up)
        raise Conflict("this dataset is already registered")
    recorded = False
    try:
        max_parse = _setting(inputs, "max_parse_bytes", DEFAULT_MAX_PARSE_BYTES)
        quota = _setting(inputs, "max_client_bytes", DEFAULT_MAX_CLIENT_BYTES)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest("'size' must be the number of bytes uploaded")
        if fmt not in FORMATS:
            raise BadRequest(f"'format' must be one of {', '.join(FORMATS)}")
        check_parse_size(fmt, size, max_parse)
        used = await _usage(ctx, handle)
        if used + size > quota:
            raise PayloadTooLarge(quota_message(used, quota))
        if fmt == "raw":
            description, stored = _raw_description(inputs, size), size
        elif fmt in STREAMED:
            limits = Limits.for_parse_bytes(max_parse)
            description, stored = await _convert_and_store(
                ctx, handle, fmt, limits, deadline, quota - used
            )
        else:
            limits = Limits.for_parse_bytes(max_parse)
            description, stored = await _parse_and_store(
                ctx, handle, fmt, limits, deadline, quota - used
            )
        description.update(owner=ctx.principal, bytes=size, stored=stored, created=now_iso())
        async with _quota_lock(ctx.principal):
            # uploads of the same client may have been recorded meanwhile
            used = await _usage(ctx, handle)
            if used + stored > quota:
                raise PayloadTooLarge(quota_message(used, quota))
            if time.monotonic() > deadline:
                raise _late()
            recorded = True
            await ctx.bus.put_set(handle, description)
        if time.monotonic() > deadline:
            # the controller may have stopped waiting and deleted the upload: undo
            raise _late()
    except BaseException:
        if recorded:
            await asyncio.shield(ctx.bus.delete_set(handle))
        await asyncio.shield(ctx.bus.delete_object(handle))
        raise
    return {"handle": handle, **_public(description)}


def _public(description: dict[str, Any]) -> dict[str, Any]:
    """The part of a description a client may see: its schema, never values."""
    keys = ("format", "columns", "rows", "bytes", "created")
    return {key: description[key] for key in keys if key in description}


@service.call("describe", inputs=[_HANDLE], outputs=_SCHEMA)
async def describe(ctx: CallContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """The schema of a dataset the caller owns."""
    handle, description = await ctx.owned_description(inputs.get("handle"))
    return {"handle": handle, **_public(description)}


@service.call(
    "release",
    inputs=[_HANDLE],
    outputs=[_SCHEMA[0], Output("released", "boolean", "true")],
)
async def release(ctx: CallContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Delete a dataset the caller owns."""
    handle, _ = await ctx.owned_description(inputs.get("handle"))
    await ctx.bus.delete_set(handle)
    await ctx.bus.delete_object(handle)
    return {"handle": handle, "released": True}


@service.call("list", inputs=[], outputs=[Output("datasets", "array", "each dataset's schema")])
async def list_sets(ctx: CallContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """The caller's datasets, by handle, with their schemas."""
    return {"datasets": [{"handle": h, **_public(d)} for h, d in await _owned(ctx)]}


@service.call(
    "usage",
    inputs=[],
    outputs=[
        Output("bytes", "integer", "what the caller's datasets take in storage"),
        Output("datasets", "integer", "how many there are"),
    ],
)
async def usage(ctx: CallContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """How many bytes the caller's datasets take in the object store, and how many there are."""
    owned = await _owned(ctx)
    return {"bytes": sum(_stored(d) for _, d in owned), "datasets": len(owned)}
