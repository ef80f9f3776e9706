"""What the admin registers (:class:`SourceSpec`) and what a pull finds (:class:`Version`).

A spec is configuration, written by the admin in ``fdrtd.toml`` or with
``fdrtd-server source add``; the analyst never sends any part of it. It is
checked once, when it is read (:meth:`SourceSpec.from_dict`): kinds, the
fields each kind needs, identifiers (tables, columns, the row order) and the
shape of a fixed query. The checks are strict even though an admin wrote the
values, because a mistake here reaches a database.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "SOURCE_KINDS",
    "SourceSpec",
    "Version",
    "check_column_name",
    "check_query",
    "utc_now",
]

SOURCE_KINDS = ("csv", "parquet", "sqlite", "postgresql")
"""The kinds of source read in place."""

_FILE_KINDS = ("csv", "parquet")
_SQL_KINDS = ("sqlite", "postgresql")

_TABLE_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")
"""One part of a table name: a plain SQL identifier (quoted anyway when used)."""

_COLUMN_MAX = 63
"""The longest column name accepted (PostgreSQL's NAMEDATALEN - 1)."""

_SHA256 = re.compile(r"[0-9a-f]{64}")


def utc_now() -> str:
    """The current time as ISO 8601 UTC with seconds (``2026-12-07T10:00:00Z``)."""
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    return now.isoformat().replace("+00:00", "Z")


def check_column_name(name: Any, where: str) -> str:
    """Return ``name`` if it can name a column: 1 to 63 printable characters.

    Column names are always quoted where they reach SQL, so this rule is
    about clear errors (and keeping control characters out of logs), not
    about quoting.

    Raises:
        ValueError: naming ``where``.
    """
    if not isinstance(name, str) or not 1 <= len(name) <= _COLUMN_MAX:
        raise ValueError(f"{where} must be a column name of 1 to {_COLUMN_MAX} characters")
    if not name.isprintable() or name != name.strip():
        raise ValueError(
            f"{where} must be a column name of printable characters without "
            "leading or trailing spaces"
        )
    return name


def _check_table(name: str, kind: str, where: str) -> str:
    parts = name.split(".")
    if len(parts) > (2 if kind == "postgresql" else 1) or not all(
        _TABLE_PART.fullmatch(part) for part in parts
    ):
        shape = "table or schema.table" if kind == "postgresql" else "table"
        raise ValueError(
            f"{where}.table must be a {shape} name of letters, digits, '_' and '$' "
            "(starting with a letter or '_', at most 63 characters a part)"
        )
    return name


def check_query(query: str, where: str = "source") -> str:
    """Return ``query`` stripped, if it is one plain ``SELECT`` or ``WITH`` statement.

    The rule is deliberately narrow: the query must start with ``SELECT`` or
    ``WITH``, may end with one ``;``, and must contain no other ``;``. It is
    then only ever run wrapped as a subquery (``SELECT ... FROM (query) AS
    t``) on a read-only connection, so a statement that modifies data fails
    at the database even if it slipped past this check.

    Raises:
        ValueError: naming ``where`` and the rule broken.
    """
    text = query.strip()
    if text.endswith(";"):
        text = text[:-1].rstrip()
    head = text.split(None, 1)[0].upper() if text else ""
    if head not in ("SELECT", "WITH"):
        raise ValueError(f"{where}.query must be a single SELECT or WITH statement")
    if ";" in text:
        raise ValueError(f"{where}.query must be a single statement: no ';' except one at the end")
    return text


@dataclass(frozen=True)
class SourceSpec:
    """A dataset read in place: which kind, where, and which rows and columns.

    Attributes:
        kind: One of :data:`SOURCE_KINDS`.
        path: ``csv``/``parquet``: a file, or a directory whose direct children
            ``*.csv``/``*.parquet`` are read in the order of their names;
            ``sqlite``: the database file.
        table: ``sqlite``/``postgresql``: the table (``schema.table`` allowed
            for PostgreSQL); exclusive with ``query``.
        query: ``sqlite``/``postgresql``: a fixed read-only ``SELECT`` chosen
            by the admin; exclusive with ``table``.
        dsn: ``postgresql``: a connection string (never shown in listings).
        dsn_env: ``postgresql``: or the name of an environment variable that
            holds it.
        order_by: A column that gives the row order; required for
            ``hold_back`` on databases (files keep the order of their rows).
        hold_back: The FedMed rule: new rows are released only once at least
            this many have accumulated since the last released version.
        columns: The only columns exposed (default: all).
    """

    kind: str
    path: str = ""
    table: str = ""
    query: str = ""
    dsn: str = ""
    dsn_env: str = ""
    order_by: str = ""
    hold_back: int = 0
    columns: tuple[str, ...] = field(default=())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "source") -> SourceSpec:
        """Build and check a spec from configuration (a TOML table or a JSON object).

        Args:
            data: The keys of this class; unknown keys are refused.
            where: How the configuration names this source, for messages
                (``"sources.clinic"``).

        Raises:
            ValueError: naming ``where`` and the key that is wrong.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} must be a table of settings")
        known = {item.name for item in fields(cls)}
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            raise ValueError(
                f"{where} has unknown setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        kind = data.get("kind")
        if kind not in SOURCE_KINDS:
            raise ValueError(f"{where}.kind must be one of {', '.join(SOURCE_KINDS)}")
        text: dict[str, str] = {}
        for name in ("path", "table", "query", "dsn", "dsn_env", "order_by"):
            value = data.get(name, "")
            if not isinstance(value, str):
                raise ValueError(f"{where}.{name} must be a string")
            text[name] = value
        hold_back = data.get("hold_back", 0)
        if isinstance(hold_back, bool) or not isinstance(hold_back, int) or hold_back < 0:
            raise ValueError(f"{where}.hold_back must be a whole number of rows, 0 or more")
        raw_columns = data.get("columns", ())
        if isinstance(raw_columns, str) or not isinstance(raw_columns, (list, tuple)):
            raise ValueError(f"{where}.columns must be a list of column names")
        columns = tuple(
            check_column_name(column, f"{where}.columns[{index}]")
            for index, column in enumerate(raw_columns)
        )
        if len(set(columns)) != len(columns):
            raise ValueError(f"{where}.columns must not name a column twice")
        if text["order_by"]:
            check_column_name(text["order_by"], f"{where}.order_by")
        spec = cls(kind=kind, hold_back=hold_back, columns=columns, **text)
        spec._check(where)
        return spec

    def _check(self, where: str) -> None:
        def refuse(*names: str) -> None:
            for name in names:
                if getattr(self, name):
                    raise ValueError(f"{where}.{name} does not apply to a {self.kind} source")

        if self.kind in _FILE_KINDS:
            refuse("table", "query", "dsn", "dsn_env")
            if not self.path:
                raise ValueError(f"{where}.path is required: a {self.kind} file or directory")
            return
        if self.kind == "sqlite":
            refuse("dsn", "dsn_env")
            if not self.path:
                raise ValueError(f"{where}.path is required: the SQLite database file")
        else:
            refuse("path")
            if bool(self.dsn) == bool(self.dsn_env):
                raise ValueError(
                    f"{where} needs exactly one of dsn (a connection string) and dsn_env "
                    "(the environment variable that holds it)"
                )
            if self.dsn_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.dsn_env):
                raise ValueError(f"{where}.dsn_env must be an environment variable's name")
        if bool(self.table) == bool(self.query):
            raise ValueError(f"{where} needs exactly one of table and query")
        if self.table:
            _check_table(self.table, self.kind, where)
        else:
            check_query(self.query, where)
        if self.hold_back and not self.order_by:
            raise ValueError(
                f"{where}.order_by is required with hold_back on a {self.kind} source: "
                "a column giving the order in which rows were added"
            )

    def to_dict(self) -> dict[str, Any]:
        """The spec as configuration (round-trips with :meth:`from_dict`; includes ``dsn``)."""
        data: dict[str, Any] = {"kind": self.kind}
        for name in ("path", "table", "query", "dsn", "dsn_env", "order_by"):
            if getattr(self, name):
                data[name] = getattr(self, name)
        if self.hold_back:
            data["hold_back"] = self.hold_back
        if self.columns:
            data["columns"] = list(self.columns)
        return data

    def public(self) -> dict[str, Any]:
        """What anyone who may see the dataset may learn: its kind and hold-back only."""
        return {"kind": self.kind, "hold_back": self.hold_back}

    def __repr__(self) -> str:
        # A connection string may hold a password: never print it.
        shown = {key: value for key, value in self.to_dict().items() if key != "dsn"}
        if self.dsn:
            shown["dsn"] = "***"
        return f"SourceSpec({shown!r})"


@dataclass(frozen=True)
class Version:
    """One state of a source's content.

    Attributes:
        id: SHA-256 hex of the content (how it is computed per kind: see
            :mod:`fdrtd_server.sources`).
        rows: The number of rows.
        time: ISO 8601 UTC: when this version was seen (or released).
    """

    id: str
    rows: int
    time: str

    def to_dict(self) -> dict[str, Any]:
        """The version as JSON: ``{"id", "rows", "time"}``."""
        return {"id": self.id, "rows": self.rows, "time": self.time}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Version:
        """Read a version written by :meth:`to_dict`.

        Raises:
            ValueError: when a key is missing or of the wrong type.
        """
        version_id, rows, time = data.get("id"), data.get("rows"), data.get("time")
        if not isinstance(version_id, str) or not _SHA256.fullmatch(version_id):
            raise ValueError("a version's id must be 64 hexadecimal digits (SHA-256)")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError("a version's rows must be a whole number, 0 or more")
        if not isinstance(time, str) or not time:
            raise ValueError("a version's time must be an ISO 8601 text")
        return cls(id=version_id, rows=rows, time=time)
