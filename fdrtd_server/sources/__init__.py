"""Owners' data read in place: CSV and Parquet files, SQLite and PostgreSQL.

The admin registers a source (:class:`SourceSpec`); the server reads it
where it lives, never copying it whole: :func:`open_source` gives a
:class:`Source` whose coroutines tell its schema, observe its content as a
:class:`Version` and read the columns a computation needs, in batches, within
a memory bound. :func:`choose_version` applies the hold-back rule (FedMed):
new rows are released only once enough have accumulated.

How each kind reads and fingerprints its content, and what it costs on
10 million rows, is documented in :mod:`fdrtd_server.sources.files` (CSV,
Parquet) and :mod:`fdrtd_server.sources.sql` (SQLite, PostgreSQL).

Errors (:mod:`fdrtd_server.errors`): a missing or unreadable file and an
unreachable database are :class:`~fdrtd_server.errors.SourceUnavailable`
(424); malformed data or a value of the wrong type is
:class:`~fdrtd_server.errors.ComputationFailed` (422); an unknown column is
:class:`~fdrtd_server.errors.BadRequest` (400); a read larger than its bound
is :class:`~fdrtd_server.errors.PayloadTooLarge` (413).
"""

from __future__ import annotations

from fdrtd_server.sources.base import Moments, Source, choose_version
from fdrtd_server.sources.files import CsvSource, ParquetSource
from fdrtd_server.sources.spec import SOURCE_KINDS, SourceSpec, Version, check_query
from fdrtd_server.sources.sql import PostgresSource, SqliteSource

__all__ = [
    "SOURCE_KINDS",
    "Moments",
    "Source",
    "SourceSpec",
    "Version",
    "check_query",
    "choose_version",
    "open_source",
]


def open_source(spec: SourceSpec) -> Source:
    """Open the source a spec describes (nothing is read until a coroutine is awaited)."""
    kinds: dict[str, type[Source]] = {
        "csv": CsvSource,
        "parquet": ParquetSource,
        "sqlite": SqliteSource,
        "postgresql": PostgresSource,
    }
    return kinds[spec.kind](spec)
