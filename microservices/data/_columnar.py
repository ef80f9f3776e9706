"""Streaming CSV and Parquet uploads into the stored columnar form (Parquet), in bounded memory.

A CSV or Parquet upload may be far larger than what can be parsed in
memory (``max_parse_bytes``), so neither is read whole: the upload is copied
from the object store into a temporary file, converted batch by batch into a
Parquet file, and that file is streamed back into the object store in the
upload's place. The dataset's description records ``storage: parquet``;
:func:`fdrtd_server.microservice.decode_dataset` reads it back, only the
columns a computation asks for.

What is stored, and what is refused:

* **CSV.** A header row, then records (empty lines skipped, quoted newlines
  allowed, a UTF-8 byte order mark ignored). As for the in-memory parse
  before: a column whose every cell is a number, or empty, becomes float64
  (empty cells NaN); any other column stays text. The types are found while
  converting: a column that turns out to be text after its first batches
  were written as numbers costs one more pass over the file (the first pass
  then only reads). A ragged record is a 400 naming its line; text that is
  not UTF-8 a 400 naming the column and the line; a record longer than
  :data:`BLOCK` bytes a 400.
* **Parquet.** Flat columns of booleans, integers, floats and text
  (``string``, ``large_string``, dictionary-encoded text such as a pandas
  category). Anything else (timestamps, decimals, binary, nested types) is a
  400 naming the column and its type. Text is checked to be valid UTF-8 (a
  lone surrogate written as bytes is not), a 400 naming the column. Missing
  values stay missing in the stored form; a computation sees them as NaN
  (integer and boolean columns with missing values are described, and
  decoded, as float64) and as empty text.

Both keep the limits of the in-memory parse: at most :data:`MAX_COLUMNS`
columns and :data:`MAX_ROWS` records, cells of at most
:data:`MAX_CELL_CHARS` characters, text columns small enough to become a
numpy array (``max_text_bytes``). A conversion of an upload larger than
:data:`INLINE_LIMIT` runs in a child process (as a parse does, see
:mod:`._parse`) whose address space is capped and which is killed at its
deadline; a smaller one in a thread. The memory a conversion needs does not
grow with the upload: a batch is at most :data:`BLOCK` bytes of CSV, or
:data:`BATCH_BYTES` of Parquet values.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import csv
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from fdrtd_server.sdk import BadRequest, FdrtdError, PayloadTooLarge, exit_with, wire

from ._parse import (
    INLINE_LIMIT,
    MAX_CELL_CHARS,
    MAX_COLUMNS,
    MAX_ROWS,
    ChildWork,
    Limits,
    _cap_memory,
    _check_name,
    _check_text,
)

__all__ = ["BATCH_BYTES", "BLOCK", "STREAMED", "ConvertProcess", "convert"]

STREAMED = ("csv", "parquet")
"""The upload formats converted here, streamed rather than parsed in memory."""
BLOCK = 2 * 1024 * 1024
"""Bytes of CSV read and converted at a time; a record may not be longer. pyarrow's
streaming reader holds some 25 blocks ahead (measured: 205 MB live at 8 MiB blocks,
36 MB at 1 MiB), so blocks are kept small and batches gathered into row groups."""
ADDRESS_SPACE = 2 * 1024 * 1024 * 1024
"""Address space a conversion child may take beyond what it starts with. Far above what
it uses (a 427 MB, 10M-row CSV peaked at 280 MB resident), because pyarrow reserves
address space it never touches (1.2 GB for that CSV); an outer bound against a hostile
file (a Parquet row group of gigabytes), not the measure of a conversion's memory."""
ROW_GROUP = 256 * 1024
"""Records per row group of the stored form (CSV batches are gathered up to this)."""
BATCH_BYTES = 32 * 1024 * 1024
"""About how many bytes of Parquet values are read and written at a time."""
COMPRESSION = "snappy"
"""The stored form's compression: the fastest to write and to read back."""
STORAGE = "parquet"
"""The ``storage`` recorded in the description of a dataset stored this way."""
_COLUMN_NUMBER = re.compile(r"CSV column #(\d+)")
_ROW_NUMBER = re.compile(r"Row #(\d+)")


# -- csv -----------------------------------------------------------------------------


def _line_of(path: Path, record: int) -> int:
    """The line on which non-empty record number ``record`` (0: the header) ends.

    Only for a message: pyarrow numbers records, not lines, so the CSV is read
    again up to that record (the same way the in-memory parse counted).
    """
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as stream:
        reader = csv.reader(stream)
        seen = -1
        try:
            for row in reader:
                if row:
                    seen += 1
                    if seen == record:
                        break
        except csv.Error:
            pass
        return reader.line_num


def _csv_error(error: BaseException, path: Path, names: list[str], ragged: list[Any]) -> FdrtdError:
    """A clear 400 for what pyarrow found wrong; its own text (which quotes cells) is dropped."""
    text = str(error)
    if isinstance(error, MemoryError):
        return PayloadTooLarge(memory_message("csv"))
    if ragged:
        row = ragged[0]
        line = _line_of(path, row.number - 1) if row.number else "?"
        return BadRequest(
            f"CSV record on line {line} has {row.actual_columns} fields, "
            f"the header has {row.expected_columns}"
        )
    if isinstance(error, UnicodeDecodeError) or "UTF8" in text:
        column = _COLUMN_NUMBER.search(text)
        row_number = _ROW_NUMBER.search(text)
        where = ""
        if column and int(column.group(1)) < len(names):
            where = f" (column '{names[int(column.group(1))][:40]}'"
            if row_number:
                where += f", line {_line_of(path, int(row_number.group(1)) - 1)}"
            where += ")"
        return BadRequest(f"CSV upload is not UTF-8 text{where}")
    if "Empty CSV" in text:
        return BadRequest("CSV upload needs a header row and at least one record")
    if "straddl" in text:
        return BadRequest(
            f"CSV upload has a record longer than {BLOCK} bytes, or a quote left open"
        )
    return BadRequest("CSV upload cannot be parsed (a quote left open, or not CSV at all)")


def _as_float(column: pa.Array) -> pa.Array | None:
    """The column as float64 (empty or blank cells NaN), or None if a cell is not a number."""
    trimmed = pc.utf8_trim_whitespace(column)
    blank = pc.equal(trimmed, "")
    try:
        numbers = pc.cast(pc.if_else(blank, pa.scalar(None, pa.string()), trimmed), pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return pc.fill_null(numbers, math.nan)


def _longest(column: pa.Array) -> int:
    longest = pc.max(pc.utf8_length(column)).as_py()
    return int(longest or 0)


def _csv_reader(path: Path, raw_names: list[str] | None, ragged: list[Any]) -> Any:
    def invalid(row: Any) -> str:
        ragged.append(row)
        return "error"

    convert = pa_csv.ConvertOptions(
        column_types={name: pa.string() for name in raw_names or []},
        strings_can_be_null=False,
        check_utf8=True,
    )
    return pa_csv.open_csv(
        pa.OSFile(str(path)),  # read, not memory-mapped: the mapping counts as address space
        read_options=pa_csv.ReadOptions(use_threads=False, block_size=BLOCK),
        parse_options=pa_csv.ParseOptions(newlines_in_values=True, invalid_row_handler=invalid),
        convert_options=convert,
    )


def _csv_header(path: Path) -> tuple[list[str], list[str]]:
    """The header as pyarrow reads it, and the column names (stripped, checked)."""
    with path.open("rb") as stream:
        first = stream.readline(BLOCK)
    try:
        # incremental: a line cut at BLOCK may end inside a character
        codecs.getincrementaldecoder("utf-8")().decode(first, final=False)
    except UnicodeDecodeError:
        # UTF-16 and binary files end here, before pyarrow reads them as ragged records
        raise BadRequest("CSV upload is not UTF-8 text (its first line)") from None
    ragged: list[Any] = []
    try:
        reader = _csv_reader(path, None, ragged)
        raw_names = list(reader.schema.names)
    except (pa.ArrowException, UnicodeDecodeError) as error:
        raise _csv_error(error, path, [], ragged) from None
    reader.close()
    names = [name.strip() for name in raw_names]
    if len(names) > MAX_COLUMNS:
        raise BadRequest(f"CSV upload has more than {MAX_COLUMNS} columns")
    if len(set(names)) != len(names) or not all(names):
        raise BadRequest("CSV header names must be unique and non-empty")
    for name in names:
        _check_name(name)
    return raw_names, names


def _csv_pass(
    path: Path, target: Path, raw_names: list[str], names: list[str], numeric: list[bool]
) -> tuple[bool, int, list[int]]:
    """Convert the CSV with the column types in ``numeric``, writing ``target``.

    A column found not to be numeric is marked so in ``numeric``; from then on
    nothing more is written, and the rest of the file is only read to find the
    other such columns.

    Returns:
        Whether ``target`` was written whole, the records, each column's longest text.
    """
    ragged: list[Any] = []
    try:
        reader = _csv_reader(path, raw_names, ragged)
    except (pa.ArrowException, UnicodeDecodeError) as error:
        raise _csv_error(error, path, names, ragged) from None
    schema = pa.schema(
        [
            (name, pa.float64() if number else pa.string())
            for name, number in zip(names, numeric, strict=True)
        ]
    )
    rows, longest, whole = 0, [0] * len(names), True
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(pq.ParquetWriter(target, schema, compression=COMPRESSION))
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except (pa.ArrowException, UnicodeDecodeError) as error:
                raise _csv_error(error, path, names, ragged) from None
            rows += batch.num_rows
            if rows > MAX_ROWS:
                raise PayloadTooLarge(f"CSV upload has more than {MAX_ROWS} records")
            arrays: list[pa.Array] = []
            for j, column in enumerate(batch.columns):
                converted = _as_float(column) if numeric[j] else None
                if converted is None:
                    if numeric[j]:
                        numeric[j] = whole = False
                    longest[j] = max(longest[j], _longest(column))
                    if longest[j] > MAX_CELL_CHARS:
                        raise BadRequest(
                            f"column '{names[j][:40]}' holds a text longer than "
                            f"{MAX_CELL_CHARS} characters"
                        )
                    converted = column
                arrays.append(converted)
            if whole:
                pending.append(pa.record_batch(arrays, schema=schema))
                pending_rows += batch.num_rows
                if pending_rows >= ROW_GROUP:
                    writer.write_table(pa.Table.from_batches(pending), row_group_size=ROW_GROUP)
                    pending, pending_rows = [], 0
            else:
                pending, pending_rows = [], 0
        if whole and pending:
            writer.write_table(pa.Table.from_batches(pending), row_group_size=ROW_GROUP)
        reader.close()
    return whole, rows, longest


def convert_csv(path: Path, target: Path, limits: Limits) -> dict[str, Any]:
    """Convert the CSV file at ``path`` into Parquet at ``target``; return its description.

    Raises:
        BadRequest: If it is not UTF-8, is empty, ragged or has bad header names.
        PayloadTooLarge: If it has too many records, or a text column too large.
    """
    raw_names, names = _csv_header(path)
    numeric = [True] * len(names)
    whole, rows, longest = _csv_pass(path, target, raw_names, names, numeric)
    if not whole:
        # the types are all known now: this pass cannot find another text column
        whole, rows, longest = _csv_pass(path, target, raw_names, names, numeric)
        assert whole
    if rows == 0:
        raise BadRequest("CSV upload needs a header row and at least one record")
    columns: dict[str, Any] = {}
    for j, name in enumerate(names):
        if numeric[j]:
            columns[name] = {"dtype": "<f8", "shape": [rows]}
        else:
            _check_text(name, rows, longest[j], limits)
            columns[name] = {"dtype": "text", "shape": [rows]}
    return {"format": "table", "storage": STORAGE, "columns": columns, "rows": rows}


# -- parquet ----------------------------------------------------------------------------


def _is_text(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    )


def _stored_type(name: str, kind: pa.DataType) -> pa.DataType:
    """The type a column of type ``kind`` is stored as; other types are a 400 naming it."""
    if pa.types.is_boolean(kind) or pa.types.is_integer(kind):
        return kind
    if pa.types.is_float16(kind):
        return pa.float32()
    if pa.types.is_floating(kind):
        return kind
    if _is_text(kind) or (pa.types.is_dictionary(kind) and _is_text(kind.value_type)):
        return pa.string()
    raise BadRequest(
        f"column '{name[:40]}' has type {str(kind)[:60]}, which cannot be computed on: "
        "only booleans, integers, floats and text can be uploaded; convert it to numbers "
        "or text first"
    )


def _numpy_dtype(kind: pa.DataType, nulls: bool) -> str:
    if pa.types.is_string(kind):
        return "text"
    if nulls and not pa.types.is_floating(kind):
        return "<f8"  # missing values are NaN when computed on
    return str(wire.check_dtype(kind.to_pandas_dtype().__name__).newbyteorder("<").str)


def convert_parquet(path: Path, target: Path, limits: Limits) -> dict[str, Any]:
    """Check the Parquet file at ``path`` and rewrite it at ``target``; return its description.

    Rewritten rather than kept, so that the stored form has one known shape:
    flat columns of the types above, row groups of bounded size, one
    compression, and no metadata of the sender's.

    Raises:
        BadRequest: If it is not Parquet, cannot be read, or has a column that is not
            booleans, integers, floats or valid UTF-8 text.
        PayloadTooLarge: If it has too many columns or records, or a text column too large.
    """
    with path.open("rb") as head:
        if head.read(4) != b"PAR1":  # pyarrow reads only the footer's magic
            raise BadRequest("the parquet upload is not a Parquet file (it does not start as one)")
    try:
        source = pq.ParquetFile(path, pre_buffer=False, buffer_size=1024 * 1024)
    except (pa.ArrowException, OSError):
        raise BadRequest(
            "the parquet upload is not a Parquet file (its footer cannot be read)"
        ) from None
    with source:
        try:
            schema = source.schema_arrow
        except (pa.ArrowException, OSError):
            raise BadRequest("the parquet upload's schema cannot be read") from None
        if len(schema) > MAX_COLUMNS:
            raise BadRequest(f"parquet upload has more than {MAX_COLUMNS} columns")
        if len(schema) == 0:
            raise BadRequest("parquet upload has no columns")
        if source.metadata.num_rows > MAX_ROWS:
            raise PayloadTooLarge(f"parquet upload has more than {MAX_ROWS} records")
        names = [_check_name(name) for name in schema.names]
        if len(set(names)) != len(names):
            raise BadRequest("parquet column names must be unique")
        stored = pa.schema([(f.name, _stored_type(f.name, f.type)) for f in schema])
        per_row = sum(8 if _is_text(f.type) is False else 32 for f in stored)
        batch_rows = max(1024, min(256 * 1024, BATCH_BYTES // per_row))
        rows, nulls, longest = 0, [False] * len(names), [0] * len(names)
        with pq.ParquetWriter(target, stored, compression=COMPRESSION) as writer:
            try:
                for batch in source.iter_batches(batch_size=batch_rows, use_threads=False):
                    arrays = []
                    for j, column in enumerate(batch.columns):
                        kind = stored.field(j).type
                        if column.type != kind:
                            column = pc.cast(column, kind)
                        if _is_text(kind):
                            try:
                                column.validate(full=True)
                            except pa.ArrowInvalid:
                                raise BadRequest(
                                    f"column '{names[j][:40]}' holds text that is not valid "
                                    "UTF-8 (for example a lone UTF-16 surrogate); send it as "
                                    "valid UTF-8 text"
                                ) from None
                            longest[j] = max(longest[j], _longest(column))
                            if longest[j] > MAX_CELL_CHARS:
                                raise BadRequest(
                                    f"column '{names[j][:40]}' holds a text longer than "
                                    f"{MAX_CELL_CHARS} characters"
                                )
                        nulls[j] = nulls[j] or column.null_count > 0
                        arrays.append(column)
                    rows += batch.num_rows
                    writer.write_batch(pa.record_batch(arrays, schema=stored))
            except MemoryError:
                raise PayloadTooLarge(memory_message("parquet")) from None
            except (pa.ArrowException, OSError):
                raise BadRequest(
                    "the parquet upload cannot be read (damaged, or an encoding or "
                    "compression this server does not read)"
                ) from None
    columns: dict[str, Any] = {}
    for j, name in enumerate(names):
        kind = stored.field(j).type
        if _is_text(kind):
            _check_text(name, rows, longest[j], limits)
        columns[name] = {"dtype": _numpy_dtype(kind, nulls[j]), "shape": [rows]}
    return {"format": "table", "storage": STORAGE, "columns": columns, "rows": rows}


def convert(fmt: str, path: Path, target: Path, limits: Limits) -> dict[str, Any]:
    """Convert a csv or parquet upload at ``path`` into the stored form at ``target``.

    Returns:
        The dataset's description (without owner, sizes and time).

    Raises:
        BadRequest: If the upload is not valid in its format.
        PayloadTooLarge: If it breaks a limit.
    """
    if fmt == "csv":
        return convert_csv(path, target, limits)
    if fmt == "parquet":
        return convert_parquet(path, target, limits)
    raise BadRequest(f"'format' must be one of {', '.join(STREAMED)}")


# -- the conversion child --------------------------------------------------------------


def memory_message(fmt: str) -> str:
    """The refusal of an upload whose conversion ran out of the memory allowed."""
    return (
        f"the {fmt} upload needs more memory to convert than this server allows "
        f"({ADDRESS_SPACE} bytes of address space; a record or row group too large)"
    )


def _child_main(
    conn: Connection, fmt: str, path: str, target: str, limits: Limits, server: int
) -> None:
    """In the child: convert ``path`` into ``target``, send the description (or the error)."""
    exit_with(server)
    try:
        # the system allocator: mimalloc and jemalloc reserve address space by the gigabyte
        pa.set_memory_pool(pa.system_memory_pool())
        pa.set_cpu_count(1)
        pa.set_io_thread_count(1)
        _cap_memory(ADDRESS_SPACE)
        try:
            description = convert(fmt, Path(path), Path(target), limits)
        except FdrtdError as error:
            conn.send_bytes(wire.packb({"status": error.status, "message": error.message}))
            return
        except MemoryError:
            conn.send_bytes(wire.packb({"status": 413, "message": memory_message(fmt)}))
            return
        conn.send_bytes(wire.packb({"status": 200, "description": description}))
    except (BrokenPipeError, EOFError, MemoryError):
        pass
    finally:
        conn.close()


class ConvertProcess(ChildWork):
    """One csv or parquet upload converted in a child process, killed at its deadline.

    Use as an async context manager; :meth:`run` answers the description.
    Conversions and parses share the slots of :class:`._parse.ChildWork`.
    """

    def _timeout(self) -> PayloadTooLarge:
        return timeout_error(self.fmt)

    def _out_of_memory(self) -> PayloadTooLarge:
        return PayloadTooLarge(memory_message(self.fmt))

    def _run(self, path: Path, target: Path) -> dict[str, Any]:
        self._launch(_child_main, self.fmt, str(path), str(target), self.limits)
        return self._header(self._receive())

    async def run(self, path: Path, target: Path) -> dict[str, Any]:
        """Convert ``path`` into ``target`` in the child; return the description.

        Raises:
            BadRequest: If the upload is not valid in its format.
            PayloadTooLarge: If it breaks a limit, runs out of memory or of time.
        """
        return await asyncio.to_thread(self._run, path, target)


def timeout_error(fmt: str) -> PayloadTooLarge:
    """The refusal of an upload whose conversion did not end in its time."""
    return PayloadTooLarge(
        f"converting the {fmt} upload did not finish in the time allowed; send it as "
        "Parquet, which converts several times faster than CSV, or in parts"
    )


async def convert_file(
    fmt: str, path: Path, target: Path, limits: Limits, deadline: float
) -> dict[str, Any]:
    """Convert ``path`` into ``target``: in a thread if small, else in a child process.

    Raises:
        BadRequest, PayloadTooLarge: As :func:`convert`, or when out of time or memory.
    """
    if path.stat().st_size <= INLINE_LIMIT:
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(convert, fmt, path, target, limits),
                max(0.0, deadline - time.monotonic()),
            )
        except TimeoutError:
            raise timeout_error(fmt) from None
    async with ConvertProcess(fmt, limits, deadline) as child:
        return await child.run(path, target)


async def file_pieces(path: Path, size: int = 1024 * 1024) -> AsyncIterator[bytes]:
    """The bytes of the file at ``path``, read in a thread piece by piece."""
    with path.open("rb") as stream:
        read: Callable[[int], bytes] = stream.read
        while piece := await asyncio.to_thread(read, size):
            yield piece
