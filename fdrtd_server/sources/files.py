"""CSV and Parquet sources: a file, or a directory of such files read in name order.

Parquet is read with :meth:`pyarrow.parquet.ParquetFile.iter_batches`, only
the wanted columns, 64k rows a batch, without pre-buffering (31 MB growth
for a 10M-row file, measured). CSV is read with :func:`pyarrow.csv.open_csv`
(streaming, only the wanted columns); the column types are inferred once
from the first block of the first file and then imposed on every file, so a
directory's files must agree.

A directory holds the source's files as direct children named ``*.csv`` or
``*.parquet`` (not hidden); they are read sorted by name, so appending a
file whose name sorts last appends rows. A child that is a symbolic link
pointing outside the directory makes the whole source unavailable (it could
expose any file the server can read).

Versions: the SHA-256 of a file's bytes, or for a directory the SHA-256 over
the sorted list of (name, file hash). Hashes are kept per (path, size,
mtime_ns, inode) in this process, so an unchanged 245 MB file is hashed once
(0.2 s), not per request. A CSV file's row count comes from the same pass
(pyarrow parses what is hashed), Parquet's from its metadata.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from fdrtd_server.errors import ComputationFailed, SourceUnavailable
from fdrtd_server.sources.base import (
    BATCH_ROWS,
    Collector,
    Source,
    arrow_dtype,
    arrow_to_numpy,
)
from fdrtd_server.sources.spec import SourceSpec, Version, utc_now

__all__ = ["CsvSource", "ParquetSource", "source_files"]

_CACHE_SIZE = 4096
_cache: OrderedDict[tuple[str, int, int, int, str], tuple[str, int]] = OrderedDict()
_cache_lock = threading.Lock()


def source_files(spec: SourceSpec) -> list[Path]:
    """The files of a CSV or Parquet source, in reading order.

    Raises:
        SourceUnavailable: the path is missing, a directory holds none of the
            files, or a child links outside its directory.
    """
    kind = spec.kind
    path = Path(spec.path)
    if path.is_dir():
        root = path.resolve()
        found: list[Path] = []
        for child in sorted(path.iterdir(), key=lambda item: item.name):
            if child.name.startswith(".") or child.suffix.lower() != f".{kind}":
                continue
            target = child.resolve()
            if target.parent != root:
                raise SourceUnavailable(
                    f"a file of the {kind} source's directory links outside the directory; "
                    "the server refuses to follow it (ask the admin to replace the link)"
                )
            if target.is_file():
                found.append(child)
        if not found:
            raise SourceUnavailable(f"the {kind} source's directory holds no .{kind} file")
        return found
    if not path.is_file():
        raise SourceUnavailable(f"the {kind} source's file is missing or not a file")
    return [path]


class _HashingReader:
    """A binary file whose bytes are hashed as they are read (for pyarrow's CSV reader)."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("rb")
        self.hash = hashlib.sha256()
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self.hash.update(data)
        return data

    def rest(self) -> None:
        """Hash whatever the reader did not read (nothing, after a full parse)."""
        while data := self._file.read(1 << 20):
            self.hash.update(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self._file.close()
        self.closed = True


def _key(path: Path, what: str) -> tuple[str, int, int, int, str]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, what)


def _cached(path: Path, what: str, compute: Callable[[], tuple[str, int]]) -> tuple[str, int]:
    key = _key(path, what)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    value: tuple[str, int] = compute()
    with _cache_lock:
        _cache[key] = value
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return value


def _files_version(
    spec: SourceSpec, kind: str, compute: Callable[[Path], tuple[str, int]]
) -> Version:
    """The version of a file or directory source: each file's (hash, rows), cached.

    ``compute`` hashes one file and counts its rows; it runs only for a file
    whose path, size, mtime or inode changed since it last ran.
    """
    entries: list[tuple[str, str]] = []
    rows = 0
    for path in source_files(spec):
        file_hash, file_rows = _cached(path, kind, functools.partial(compute, path))
        entries.append((path.name, file_hash))
        rows += file_rows
    return Version(_combine(entries, Path(spec.path).is_dir()), rows, utc_now())


def _csv_error(error: pa.ArrowException, path: Path, names: Sequence[str]) -> ComputationFailed:
    """A 422 for a CSV that pyarrow cannot parse, without echoing its values."""
    text = str(error)
    column = re.search(r"CSV column #(\d+)", text)
    row = re.search(r"Row #(\d+)", text)
    # The file's name is the admin's business: say which file by its place only.
    where = f" (row {row.group(1)} of a file)" if row else ""
    if column and int(column.group(1)) < len(names):
        name = names[int(column.group(1))]
        target = re.search(r"conversion error to (\w+)", text)
        wanted = target.group(1) if target else "its type"
        return ComputationFailed(
            f"column {name!r} of the csv source holds a value that is not {wanted}{where}; "
            "fix the file or expose only other columns"
        )
    if "Expected" in text and "columns" in text:
        return ComputationFailed(
            f"the csv source is malformed: a row has a different number of fields than "
            f"the header{where}"
        )
    return ComputationFailed(f"the csv source is malformed and cannot be parsed{where}")


def _unavailable(kind: str, error: OSError) -> SourceUnavailable:
    return SourceUnavailable(
        f"the {kind} source's file cannot be read ({error.strerror or type(error).__name__})"
    )


class ParquetSource(Source):
    """A Parquet file or a directory of them."""

    def _open(self, path: Path) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        except OSError as error:
            raise _unavailable("parquet", error) from error
        except pa.ArrowException as error:
            raise ComputationFailed(
                "a file of the parquet source is not a valid Parquet file"
            ) from error

    def _all_columns(self) -> dict[str, str]:
        files = source_files(self.spec)
        first: dict[str, str] | None = None
        for path in files:
            schema = self._open(path).schema_arrow
            columns = _usable(schema)
            if first is None:
                first = columns
            elif any(columns.get(name) != dtype for name, dtype in first.items()):
                raise ComputationFailed(
                    "a file of the parquet source has other columns or types than the "
                    "first file; the files of a directory must agree"
                )
        assert first is not None
        return first

    def _observe(self, columns: Sequence[str]) -> Version:
        def compute(path: Path) -> tuple[str, int]:
            digest = hashlib.sha256()
            try:
                with path.open("rb") as handle:
                    while data := handle.read(1 << 20):
                        digest.update(data)
            except OSError as error:
                raise _unavailable("parquet", error) from error
            return digest.hexdigest(), self._open(path).metadata.num_rows

        return _files_version(self.spec, "parquet", compute)

    def _read(
        self, columns: Sequence[str], dtypes: Mapping[str, str], collector: Collector
    ) -> None:
        for path in source_files(self.spec):
            reader = self._open(path)
            try:
                for batch in reader.iter_batches(
                    batch_size=BATCH_ROWS, columns=list(columns), use_threads=False
                ):
                    collector.add(
                        {
                            name: arrow_to_numpy(batch.column(index), dtypes[name])
                            for index, name in enumerate(columns)
                        }
                    )
                    if collector.done:
                        return
            except OSError as error:
                raise _unavailable("parquet", error) from error
            except pa.ArrowException as error:  # a value that will not convert
                raise ComputationFailed(
                    f"the parquet source holds a value that cannot be read as its column's "
                    f"type ({type(error).__name__})"
                ) from error
            finally:
                reader.close()


def _usable(schema: pa.Schema, *, as_text: bool = False) -> dict[str, str]:
    """The columns of ``schema`` a computation can take, with their dtype text.

    Args:
        schema: The Arrow schema of a file.
        as_text: Take the other columns as text (CSV: a time pyarrow recognised is
            text as written); else leave them out (Parquet lists, structs, bytes).
    """
    found = {field.name: arrow_dtype(field.type) for field in schema}
    return {
        name: dtype or "string" for name, dtype in found.items() if dtype is not None or as_text
    }


class CsvSource(Source):
    """A CSV file (with a header row) or a directory of them."""

    def _reader(
        self,
        source: Any,
        path: Path,
        include: Sequence[str] | None,
        types: Mapping[str, pa.DataType] | None,
    ) -> pa_csv.CSVStreamingReader:
        convert = pa_csv.ConvertOptions(
            include_columns=list(include) if include else None,
            column_types=dict(types) if types else None,
            strings_can_be_null=True,
        )
        try:
            return pa_csv.open_csv(
                source,
                read_options=pa_csv.ReadOptions(block_size=1 << 20, use_threads=True),
                convert_options=convert,
            )
        except OSError as error:
            raise _unavailable("csv", error) from error
        except pa.ArrowException as error:
            raise _csv_error(error, path, list(include or ())) from error

    def _arrow_schema(self) -> pa.Schema:
        path = source_files(self.spec)[0]
        reader = self._reader(str(path), path, None, None)
        try:
            self._names: list[str] = reader.schema.names
            return reader.schema
        finally:
            reader.close()

    def _all_columns(self) -> dict[str, str]:
        return _usable(self._arrow_schema(), as_text=True)

    def _types(self, columns: Sequence[str]) -> dict[str, pa.DataType]:
        schema = self._arrow_schema()
        return {name: schema.field(name).type for name in columns}

    def _batches(
        self, path: Path, source: Any, columns: Sequence[str], types: Mapping[str, pa.DataType]
    ) -> Iterator[pa.RecordBatch]:
        reader = self._reader(source, path, columns, types)
        try:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except pa.ArrowInvalid as error:
                    # pyarrow numbers the columns of the file, not of include_columns.
                    raise _csv_error(error, path, getattr(self, "_names", [])) from error
                except OSError as error:
                    raise _unavailable("csv", error) from error
                yield batch
        finally:
            reader.close()

    def _observe(self, columns: Sequence[str]) -> Version:
        def compute(path: Path) -> tuple[str, int]:
            # count rows by parsing one column while the bytes go through the hash
            first = self._arrow_schema().names[0]
            try:
                stream = _HashingReader(path)
            except OSError as error:
                raise _unavailable("csv", error) from error
            try:
                count = sum(
                    batch.num_rows
                    for batch in self._batches(path, stream, [first], {first: pa.string()})
                )
                stream.rest()
            finally:
                stream.close()
            return stream.hash.hexdigest(), count

        return _files_version(self.spec, "csv", compute)

    def _read(
        self, columns: Sequence[str], dtypes: Mapping[str, str], collector: Collector
    ) -> None:
        types = self._types(columns)
        for path in source_files(self.spec):
            for batch in self._batches(path, str(path), columns, types):
                collector.add(
                    {
                        name: arrow_to_numpy(batch.column(index), dtypes[name])
                        for index, name in enumerate(batch.schema.names)
                    }
                )
                if collector.done:
                    return


def _combine(entries: Sequence[tuple[str, str]], directory: bool) -> str:
    """A file's own hash, or a directory's hash over its sorted (name, hash) list."""
    if not directory:
        return entries[0][1]
    digest = hashlib.sha256()
    for name, file_hash in sorted(entries):
        digest.update(os.fsencode(name) + b"\0" + file_hash.encode() + b"\n")
    return digest.hexdigest()
