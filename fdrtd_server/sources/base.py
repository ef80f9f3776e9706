"""The interface every kind of source implements, and what they share.

A :class:`Source` is opened from a :class:`~fdrtd_server.sources.spec.SourceSpec`
for the length of one use; it holds no connection or file open between calls.
Its methods are coroutines that run their blocking work in a worker thread
(:func:`asyncio.to_thread`), so the event loop (and the heartbeats on it)
stays free while a 10-million-row file is read.

Reads are bounded: rows arrive in batches, each batch is converted to numpy
at once, and the read is refused with :class:`~fdrtd_server.errors.PayloadTooLarge`
as soon as the arrays gathered so far would exceed ``max_bytes``, before the
next batch is read. Memory then stays within about twice ``max_bytes`` (the
batches and the final concatenation) plus one batch.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from fdrtd_server.errors import BadRequest, ComputationFailed, PayloadTooLarge
from fdrtd_server.sources.spec import SourceSpec, Version

__all__ = [
    "BATCH_ROWS",
    "Collector",
    "Moments",
    "Source",
    "arrow_dtype",
    "arrow_to_numpy",
    "choose_version",
    "values_to_numpy",
]

BATCH_ROWS = 65536
"""Rows per batch: as fast as larger batches (measured) and small in memory."""

Array = np.ndarray[Any, Any]


def choose_version(
    current: Version, released: Version | None, hold_back: int
) -> tuple[Version, bool]:
    """Decide which version computations use now, under the hold-back rule (FedMed).

    New rows are released only once at least ``hold_back`` of them have
    accumulated since the released version; until then computations keep
    reading the released version (its first ``released.rows`` rows).

    Hold-back assumes an append-only source. A source whose row count fell,
    or whose content changed without growing, cannot be served as the old
    version any more, so its current content is released at once.

    Args:
        current: The content now (:meth:`Source.observe`).
        released: The version released last, or None if none was.
        hold_back: The minimum number of new rows to release (0: release all).

    Returns:
        The version to use, and whether it is ``current`` newly released (the
        caller then stores it as the released version).
    """
    if released is None:
        return current, True
    if current.id == released.id:
        return released, False
    grown = current.rows - released.rows
    if grown <= 0 or grown >= hold_back:
        return current, True
    return released, False


@dataclass(frozen=True)
class Moments:
    """Local aggregates of one numeric column about a shift, for univariate statistics.

    Only finite values count (NULL, NaN and ±inf are left out).

    Attributes:
        count: How many values.
        sums: ``Σ(x - shift)^k`` for k = 1 .. degree.
        minimum, maximum: Of the values (0.0 when there are none).
        reciprocal, log: ``Σ positive_minimum / x`` and ``Σ ln x``, when a
            positive minimum was given (else 0.0).
    """

    count: int
    sums: tuple[float, ...]
    minimum: float
    maximum: float
    reciprocal: float = 0.0
    log: float = 0.0


def moments_of(
    values: Array, shift: float, degree: int, positive_minimum: float | None
) -> list[float]:
    """``[count, Σd, …, Σd^degree, min, max, Σl/x, Σln x]`` of the finite ``values``.

    The running form of :class:`Moments`: sums of pieces add up.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    out = [float(values.size)]
    deltas = values - shift
    power = np.ones_like(deltas)
    with np.errstate(over="ignore"):
        for _ in range(degree):
            np.multiply(power, deltas, out=power)
            out.append(float(power.sum()))
    out += [float(values.min()), float(values.max())] if values.size else [np.inf, -np.inf]
    if positive_minimum is not None and values.size:
        out += [float((positive_minimum / values).sum()), float(np.log(values).sum())]
    else:
        out += [0.0, 0.0]
    return out


def add_moments(total: list[float] | None, part: list[float], degree: int) -> list[float]:
    """Two running :func:`moments_of` lists combined."""
    if total is None:
        return part
    combined = [a + b for a, b in zip(total, part, strict=True)]
    combined[degree + 1] = min(total[degree + 1], part[degree + 1])
    combined[degree + 2] = max(total[degree + 2], part[degree + 2])
    return combined


def arrow_dtype(kind: pa.DataType) -> str | None:
    """How a column of this Arrow type is described and converted.

    None for a type that no computation takes (lists, structs, maps, bytes,
    times...).
    """
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_integer(kind):
        return "int64"
    if pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return "float64"
    if pa.types.is_boolean(kind):
        return "bool"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "string"
    return None


def arrow_to_numpy(column: pa.Array | pa.ChunkedArray, dtype: str) -> Array:
    """Convert an Arrow column to numpy as :meth:`Source.read` documents.

    Numbers become float64/int64 and booleans bool; a NULL among integers
    or booleans turns that batch into float64 with NaN. Text becomes a
    numpy str array, NULL as "".
    """
    if dtype == "string":
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            column = column.cast(pa.string())
        filled = column.fill_null("")
        return np.asarray(filled.to_numpy(zero_copy_only=False), dtype=str)
    if column.null_count or dtype == "float64":
        return np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), np.float64)
    if dtype == "int64":
        return np.asarray(column.cast(pa.int64()).to_numpy(zero_copy_only=False), np.int64)
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=bool)


def values_to_numpy(values: Sequence[Any], dtype: str, column: str, kind: str) -> Array:
    """Convert Python values from a database cursor to numpy (NULL as for Arrow).

    Raises:
        ComputationFailed: a value does not fit the column's type (the value is not named).
    """
    try:
        if dtype == "string":
            return np.array(["" if value is None else str(value) for value in values], dtype=str)
        if dtype == "float64" or any(value is None for value in values):
            return np.array(
                [np.nan if value is None else float(value) for value in values], dtype=np.float64
            )
        if dtype == "int64":
            return np.array(values, dtype=np.int64)
        return np.array([bool(value) for value in values], dtype=bool)
    except (TypeError, ValueError, OverflowError) as error:
        raise ComputationFailed(
            f"column {column!r} of the {kind} source holds a value that is not {dtype}"
        ) from error


class Collector:
    """Gathers converted batches of a read, refusing at once what exceeds ``max_bytes``."""

    def __init__(self, columns: Sequence[str], rows: int | None, max_bytes: int) -> None:
        self.columns = list(columns)
        self.limit = rows
        self.max_bytes = max_bytes
        self.rows = 0
        self._parts: dict[str, list[Array]] = {name: [] for name in self.columns}
        self._bytes_per_row: dict[str, int] = dict.fromkeys(self.columns, 0)

    @property
    def wanted(self) -> int | None:
        """How many more rows the read needs (None: all)."""
        return None if self.limit is None else self.limit - self.rows

    @property
    def done(self) -> bool:
        """True once ``rows`` rows have been gathered."""
        return self.limit is not None and self.rows >= self.limit

    def add(self, batch: Mapping[str, Array]) -> None:
        """Add one batch (every column the same length); cut at the row limit.

        Raises:
            PayloadTooLarge: the arrays would exceed ``max_bytes``.
        """
        length = len(batch[self.columns[0]]) if self.columns else 0
        wanted = self.wanted
        if wanted is not None and length > wanted:
            length = wanted
        for name in self.columns:
            part = batch[name][:length]
            # A str column's final width is its widest batch's: count every row at it.
            self._bytes_per_row[name] = max(self._bytes_per_row[name], part.dtype.itemsize)
            self._parts[name].append(part)
        self.rows += length
        if self.rows * sum(self._bytes_per_row.values()) > self.max_bytes:
            self._parts.clear()
            raise PayloadTooLarge(
                f"the columns asked for need more than max_bytes={self.max_bytes} bytes "
                "in memory; ask for fewer columns or rows, or raise the limit"
            )

    def result(self, dtypes: Mapping[str, str]) -> dict[str, Array]:
        """The gathered columns, each one numpy array."""
        out: dict[str, Array] = {}
        for name in self.columns:
            parts = self._parts[name]
            if parts:
                out[name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
            else:
                empty = {"float64": np.float64, "int64": np.int64, "bool": bool, "string": str}
                out[name] = np.array([], dtype=empty[dtypes[name]])
        return out


class Source(abc.ABC):
    """One opened source; every method runs its blocking work off the event loop."""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self._schema_cache: dict[str, str] | None = None

    # The blocking implementations a kind provides.

    @abc.abstractmethod
    def _all_columns(self) -> dict[str, str]:
        """Every column of the source and its dtype text."""

    @abc.abstractmethod
    def _observe(self, columns: Sequence[str]) -> Version:
        """The content now (of the exposed ``columns``)."""

    @abc.abstractmethod
    def _read(
        self, columns: Sequence[str], dtypes: Mapping[str, str], collector: Collector
    ) -> None:
        """Stream the rows of ``columns`` into ``collector`` until it is done or they end."""

    def _moments(
        self,
        column: str,
        rows: int | None,
        shift: float,
        degree: int,
        positive_minimum: float | None,
    ) -> list[float]:
        """The :func:`moments_of` list, streaming the column and keeping no rows.

        PostgreSQL pushes this down into SQL.
        """
        running: list[list[float] | None] = [None]

        class _Summing(Collector):
            def add(self, batch: Mapping[str, Array]) -> None:
                values = np.asarray(batch[column], dtype=np.float64)
                wanted = self.wanted
                if wanted is not None:
                    values = values[:wanted]
                self.rows += len(values)
                part = moments_of(values, shift, degree, positive_minimum)
                running[0] = add_moments(running[0], part, degree)

        self._read([column], {column: "float64"}, _Summing([column], rows, max_bytes=0))
        return running[0] or moments_of(np.empty(0), shift, degree, positive_minimum)

    # The coroutines callers use.

    def _schema(self) -> dict[str, str]:
        if self._schema_cache is None:
            every = self._all_columns()
            if self.spec.columns:
                missing = [name for name in self.spec.columns if name not in every]
                if missing:
                    raise ComputationFailed(
                        f"the {self.spec.kind} source is configured to expose column(s) "
                        f"{', '.join(map(repr, missing))}, which it does not have"
                    )
                every = {name: every[name] for name in self.spec.columns}
            self._schema_cache = every
        return self._schema_cache

    def _pick(self, columns: Sequence[str] | None) -> list[str]:
        schema = self._schema()
        if columns is None:
            return list(schema)
        picked: list[str] = []
        for name in columns:
            if name not in schema:
                raise BadRequest(
                    f"the dataset has no column {str(name)[:64]!r}; its columns are "
                    f"{', '.join(map(repr, schema))}"
                )
            if name not in picked:
                picked.append(name)
        return picked

    async def schema(self) -> dict[str, str]:
        """The exposed columns and their dtype text (``float64``, ``int64``, ``bool``, ``string``).

        Raises:
            SourceUnavailable: the file or database cannot be read.
        """
        return dict(await asyncio.to_thread(self._schema))

    async def observe(self) -> Version:
        """The content now: its rows and content id (``time`` is now).

        Raises:
            SourceUnavailable: the file or database cannot be read.
        """
        return await asyncio.to_thread(lambda: self._observe(list(self._schema())))

    async def read(
        self, columns: Sequence[str] | None, rows: int | None = None, *, max_bytes: int
    ) -> dict[str, Array]:
        """Read the first ``rows`` rows of ``columns``, in batches, within ``max_bytes``.

        Args:
            columns: Column names (None: every exposed column).
            rows: How many rows from the start (None: all); a released
                version's ``rows`` under hold-back.
            max_bytes: The most the returned arrays may take in memory.

        Returns:
            One numpy array per column: float64/int64/bool for numbers
            (float64 with NaN where a NULL was), numpy str for text.

        Raises:
            BadRequest: a column the dataset does not have.
            PayloadTooLarge: the arrays would exceed ``max_bytes``.
            ComputationFailed: malformed data, or a value of the wrong type.
            SourceUnavailable: the file or database cannot be read.
        """

        def work() -> dict[str, Array]:
            picked = self._pick(columns)
            dtypes = {name: self._schema()[name] for name in picked}
            collector = Collector(picked, rows, max_bytes)
            if picked and rows != 0:
                self._read(picked, dtypes, collector)
            return collector.result(dtypes)

        return await asyncio.to_thread(work)

    async def moments(
        self,
        column: str,
        rows: int | None = None,
        *,
        shift: float = 0.0,
        degree: int = 1,
        positive_minimum: float | None = None,
    ) -> Moments:
        """The :class:`Moments` of one numeric column, without returning rows.

        PostgreSQL computes them in SQL; files and SQLite stream the column
        in batches and sum them here.

        Args:
            column: The column's name.
            rows: Only the first ``rows`` rows (a held-back version), or all.
            shift: The values are summed as ``x - shift``.
            degree: The highest power summed (1 to 6).
            positive_minimum: Also sum ``positive_minimum / x`` and ``ln x``
                (every value must then be at least this).

        Raises:
            BadRequest: an unknown column, or one that is not numeric.
            SourceUnavailable: the file or database cannot be read.
        """

        def work() -> Moments:
            (name,) = self._pick([column])
            if self._schema()[name] == "string":
                raise BadRequest(f"column {name!r} is text, not numbers")
            found = self._moments(name, rows, float(shift), degree, positive_minimum)
            count = int(found[0])
            return Moments(
                count,
                tuple(found[1 : degree + 1]),
                found[degree + 1] if count else 0.0,
                found[degree + 2] if count else 0.0,
                found[degree + 3],
                found[degree + 4],
            )

        if not 1 <= degree <= 6:
            raise ValueError("degree must be 1 to 6")
        return await asyncio.to_thread(work)
