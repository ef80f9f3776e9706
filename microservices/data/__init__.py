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
``msgpack`` / ``json``
    A map of column name to list or array, or a single list or array (which
    becomes the column ``value``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

import numpy as np

from fdrtd_client import wire
from fdrtd_server.bus import SETS_BUCKET, now_iso, parse_handle
from fdrtd_server.errors import BadRequest, Conflict, PayloadTooLarge
from fdrtd_server.microservice import CallContext, Microservice, distribution_version

service = Microservice(
    "data",
    distribution_version("fdrtd", "0.1.0"),
    "Registers uploaded datasets and releases them; never returns their content.",
)

FORMATS = ("raw", "csv", "msgpack", "json")
PARSE_LIMIT = 512 * 1024 * 1024
MAX_COLUMNS = 1000
_NUMERIC = frozenset("biuf")


def _numeric_dtype(text: Any) -> np.dtype[Any]:
    try:
        dtype = np.dtype(str(text))
    except TypeError:
        raise BadRequest("'dtype' must be a numpy dtype name such as 'float64' or '<i8'") from None
    if dtype.kind not in _NUMERIC:
        raise BadRequest("'dtype' must be a boolean, integer or float type")
    return dtype


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


def _column_from_cells(cells: list[str]) -> np.ndarray[Any, Any] | list[str]:
    try:
        return np.array([float(c) if c.strip() else math.nan for c in cells], dtype=np.float64)
    except ValueError:
        return cells


def parse_csv(raw: bytes) -> dict[str, Any]:
    """Parse CSV bytes into columns.

    Raises:
        BadRequest: If the CSV is empty, ragged or has duplicate header names.
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadRequest("CSV upload is not UTF-8 text") from None
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as error:
        raise BadRequest(f"CSV upload cannot be parsed: {error}") from None
    rows = [row for row in rows if row]
    if len(rows) < 2:
        raise BadRequest("CSV upload needs a header row and at least one record")
    header = [name.strip() for name in rows[0]]
    if len(set(header)) != len(header) or not all(header) or len(header) > MAX_COLUMNS:
        raise BadRequest("CSV header names must be unique, non-empty, at most 1000")
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise BadRequest(f"CSV record on line {number} has a different number of fields")
    return {name: _column_from_cells([row[i] for row in rows[1:]]) for i, name in enumerate(header)}


def _normalise(document: Any) -> dict[str, Any]:
    if isinstance(document, list | np.ndarray):
        document = {"value": document}
    if not isinstance(document, dict) or not document or len(document) > MAX_COLUMNS:
        raise BadRequest("upload must be a list, an array, or a map of 1 to 1000 named columns")
    columns: dict[str, Any] = {}
    for name, values in document.items():
        if not isinstance(name, str) or not name:
            raise BadRequest("column names must be non-empty strings")
        if isinstance(values, np.ndarray) and values.ndim == 0:
            raise BadRequest(f"column '{name[:40]}' must be a list or an array of records")
        texts = isinstance(values, list) and all(isinstance(v, str) for v in values)
        if isinstance(values, np.ndarray) or texts:
            columns[name] = values
        elif isinstance(values, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in values
        ):
            # whole numbers stay exact (ids above 2^53 would be rounded as floats)
            try:
                columns[name] = np.array(values, dtype=np.int64)
            except OverflowError:
                columns[name] = np.array(values, dtype=np.float64)
        elif isinstance(values, list):
            try:
                columns[name] = np.array(values, dtype=np.float64)
            except (TypeError, ValueError):
                raise BadRequest(
                    f"column '{str(name)[:40]}' must hold only numbers or only strings"
                ) from None
        else:
            raise BadRequest(f"column '{str(name)[:40]}' must be a list or an array")
    lengths = {len(values) for values in columns.values()}
    if len(lengths) != 1:
        raise BadRequest("all columns must have the same number of records")
    return columns


def _table_description(columns: dict[str, Any]) -> dict[str, Any]:
    described: dict[str, Any] = {}
    for name, values in columns.items():
        if isinstance(values, np.ndarray):
            described[name] = {"dtype": values.dtype.str, "shape": list(values.shape)}
        else:
            described[name] = {"dtype": "text", "shape": [len(values)]}
    return {"format": "table", "columns": described, "rows": len(next(iter(columns.values())))}


@service.call("register")
async def register(ctx: CallContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Check an uploaded object against its format and record the dataset."""
    handle = parse_handle(inputs.get("handle"), "data")
    size = inputs.get("size")
    fmt = inputs.get("format")
    if await ctx.bus.get_set(handle) is not None:
        # never touch a dataset that is already registered (not even to clean up)
        raise Conflict("this dataset is already registered")
    try:
        if not isinstance(size, int) or size < 0:
            raise BadRequest("'size' must be the number of bytes uploaded")
        if fmt not in FORMATS:
            raise BadRequest(f"'format' must be one of {', '.join(FORMATS)}")
        if fmt == "raw":
            description = _raw_description(inputs, size)
        else:
            if size > PARSE_LIMIT:
                raise PayloadTooLarge(
                    f"{fmt} uploads are limited to {PARSE_LIMIT} bytes; upload large "
                    "arrays in the 'raw' format"
                )
            raw = await ctx.bus.read_object(handle)
            if fmt == "csv":
                columns = parse_csv(raw)
            elif fmt == "json":
                try:
                    columns = _normalise(wire.from_jsonable(json.loads(raw)))
                except (ValueError, RecursionError):
                    raise BadRequest("JSON upload is not valid JSON") from None
            else:
                try:
                    columns = _normalise(wire.unpackb(raw))
                except wire.WireError as error:
                    raise BadRequest(f"msgpack upload cannot be read: {error}") from None
            description = _table_description(columns)
            await ctx.bus.delete_object(handle)
            await ctx.bus.data.put(handle, wire.packb(columns))
    except BaseException:
        await ctx.bus.delete_object(handle)
        raise
    description.update(owner=ctx.principal, bytes=size, created=now_iso())
    await ctx.bus.put_set(handle, description)
    return {"handle": handle, **_public(description)}


def _public(description: dict[str, Any]) -> dict[str, Any]:
    """The part of a description a client may see: its schema, never values."""
    keys = ("format", "columns", "rows", "bytes", "created")
    return {key: description[key] for key in keys if key in description}


@service.call("describe")
async def describe(ctx: CallContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """The schema of a dataset the caller owns."""
    handle, description = await ctx.owned_description(inputs.get("handle"))
    return {"handle": handle, **_public(description)}


@service.call("release")
async def release(ctx: CallContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Delete a dataset the caller owns."""
    handle, _ = await ctx.owned_description(inputs.get("handle"))
    await ctx.bus.delete_set(handle)
    await ctx.bus.delete_object(handle)
    return {"handle": handle, "released": True}


@service.call("list")
async def list_sets(ctx: CallContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """The caller's datasets, by handle, with their schemas."""
    # the stream's subject list is exact; KeyValue.keys() can miss keys under load
    info = await ctx.bus.js.stream_info(f"KV_{SETS_BUCKET}", subjects_filter=f"$KV.{SETS_BUCKET}.>")
    keys = [subject.rsplit(".", 1)[-1] for subject in (info.state.subjects or {})]
    found = []
    for key in keys:
        description = await ctx.bus.get_set(key)
        if description is not None and description["owner"] == ctx.principal:
            found.append({"handle": key, **_public(description)})
    return {"datasets": found}
