"""Custody: named datasets, who owns them, and whom their owners granted their use.

The three kinds of people a server serves are told apart by their token's role
(:data:`fdrtd_server.config.ROLES`):

* the **admin** manages tokens and registers *sources* (files and databases
  the institution keeps, read in place) on behalf of an owner;
* an **owner** publishes datasets under a name (an upload of theirs, or a
  source registered for them) and grants analysts their use;
* an **analyst** finds the datasets granted to her in the catalogue and
  computes on them without ever holding them.

A dataset is known by its *name*. Without a grant it does not exist for an
analyst: every route answers an unknown name and a name she may not use
alike, with 404.

The state lives in the server home (``DIR/custody.json``), written atomically
under a lock by the controller and by ``fdrtd-server grant|source``, and read
again whenever it changes, so a change applies to the next request. Sources
may also be given in ``fdrtd.toml`` as ``[sources.NAME]`` tables (with
``owner`` and ``description`` beside the source's keys): those are read-only
here and change with the file.

What a microservice needs to read a dataset travels with each computation
request (:meth:`CustodyStore.usable`): the datasets the caller may use for
that very function, now. Workers on other machines therefore need no copy of
this file, only access to the sources themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fdrtd_server._files import write_atomic
from fdrtd_server.config import CONFIG_FILE, NAME_RULE

__all__ = [
    "CUSTODY_FILE",
    "DATASET_NAME",
    "CustodyStore",
    "DatasetEntry",
    "Grant",
    "check_dataset_name",
]

log = logging.getLogger("fdrtd.custody")
CUSTODY_FILE = "custody.json"
DATASET_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
"""A dataset's name: a lowercase letter, then letters, digits, ``_`` or ``-``.

A data handle (``d-`` and 40 hex digits) also fits this rule, so a name that
looks like a handle is refused: a reference is either one or the other."""
_HANDLE_LIKE = re.compile(r"^[dr]-")
"""Names are never mistaken for handles: none starts like one."""
_FUNCTION = re.compile(r"^(\*|[a-z][a-z0-9_]{0,31}\.(\*|[a-z][a-z0-9_]{0,31}))$")
MAX_DESCRIPTION = 2000
RECORD_LEVEL = frozenset(
    {
        "smpc.minimum_maximum",
        "smpc.kth_smallest",
        "smpc.median",
        "smpc.quantiles",
        "smpc.matrix_product",
        "smpc.linear_regression_vertical",
        "smpc.contingency_table_vertical",
        "psi.intersection",
        "psi.intersection_size",
        "psi.union",
    }
)
"""Functions whose result can be a single record's value or membership.

An analyst who supplies the other party's input herself can walk through an
owner's records with them (the k-th smallest for every k; a one-item set
intersected with the owner's ids). A grant covers them only where it names
them one by one: ``"*"`` and ``"smpc.*"`` do not."""


def check_dataset_name(name: Any, what: str = "dataset name") -> str:
    """``name`` if it is a valid dataset name.

    Raises:
        ValueError: Saying what the rule is.
    """
    if not isinstance(name, str) or not DATASET_NAME.fullmatch(name) or _HANDLE_LIKE.match(name):
        raise ValueError(
            f"the {what} must be 1 to 63 characters: a lowercase letter, then lowercase "
            "letters, digits, '_' or '-' (and not a data handle)"
        )
    return name


def _check_token_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not NAME_RULE.fullmatch(name):
        raise ValueError(f"the {what} must be a token name: lowercase letters, digits, '-' or '_'")
    return name


def _check_description(text: Any) -> str:
    if not isinstance(text, str) or len(text) > MAX_DESCRIPTION:
        raise ValueError(f"the description must be text of at most {MAX_DESCRIPTION} characters")
    if any(ord(c) < 32 and c not in "\n\t" for c in text):
        raise ValueError("the description must not hold control characters")
    return text


def _parse_time(text: Any, what: str) -> str | None:
    """An ISO 8601 time as given (a date alone means its midnight, UTC), or None."""
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        raise ValueError(f"'{what}' must be an ISO 8601 time such as 2027-01-31T12:00:00Z")
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC).isoformat(timespec="seconds")
    except (ValueError, OverflowError):  # OverflowError: beyond year 1 or 9999 in UTC
        raise ValueError(
            f"'{what}' must be an ISO 8601 time such as 2027-01-31T12:00:00Z"
        ) from None


def _now() -> datetime:
    return datetime.now(UTC)


def _now_iso() -> str:
    return _now().isoformat(timespec="seconds")


@dataclass(frozen=True)
class Grant:
    """An owner's permission for one grantee to use one dataset.

    Attributes:
        functions: ``microservice.function`` patterns it allows (``"smpc.*"``,
            ``"map.aggregate"``, ``"*"`` for every microservice), or empty for
            every function. A record-level function (:data:`RECORD_LEVEL`) is
            allowed only where it is named itself.
        not_before, not_after: The time window (ISO 8601, UTC), or None.
    """

    dataset: str
    grantee: str
    functions: tuple[str, ...] = ()
    not_before: str | None = None
    not_after: str | None = None
    granted_by: str = ""
    created: str = ""
    owner: str = ""
    """The dataset's owner when the grant was made: a grant never carries over to
    another owner's dataset that later takes the same name."""

    @classmethod
    def make(
        cls,
        dataset: Any,
        grantee: Any,
        functions: Any = (),
        not_before: Any = None,
        not_after: Any = None,
        granted_by: str = "",
        owner: str = "",
    ) -> Grant:
        """A checked grant.

        Raises:
            ValueError: Naming the field that breaks its rule.
        """
        if functions is None:
            functions = ()
        if isinstance(functions, str):
            functions = [part.strip() for part in functions.split(",") if part.strip()]
        if not isinstance(functions, list | tuple) or not all(
            isinstance(f, str) and _FUNCTION.fullmatch(f) for f in functions
        ):
            raise ValueError(
                "'functions' must list microservice.function patterns such as "
                "'smpc.univariate', 'map.*' or '*'"
            )
        start, end = _parse_time(not_before, "not_before"), _parse_time(not_after, "not_after")
        if start and end and start >= end:
            raise ValueError("'not_before' must come before 'not_after'")
        return cls(
            check_dataset_name(dataset),
            _check_token_name(grantee, "grantee"),
            tuple(sorted(set(functions))) if set(functions) != {"*"} else (),
            start,
            end,
            granted_by,
            _now_iso(),
            owner,
        )

    def allows(self, microservice: str | None, function: str | None, now: datetime) -> bool:
        """Whether the grant covers ``microservice.function`` (any, if None) at ``now``."""
        stamp = now.isoformat(timespec="seconds")
        if self.not_before and stamp < self.not_before:
            return False
        if self.not_after and stamp >= self.not_after:
            return False
        if microservice is None:
            return True
        named = f"{microservice}.{function}"
        if named in RECORD_LEVEL:
            return named in self.functions
        patterns = (named, f"{microservice}.*", "*")
        return not self.functions or any(p in self.functions for p in patterns)

    def to_dict(self) -> dict[str, Any]:
        """The grant as stored and shown (``functions`` ``["*"]`` for all)."""
        return {
            "dataset": self.dataset,
            "grantee": self.grantee,
            "functions": list(self.functions) or ["*"],
            "not_before": self.not_before,
            "not_after": self.not_after,
            "granted_by": self.granted_by,
            "created": self.created,
            "owner": self.owner,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Grant:
        """Rebuild from :meth:`to_dict` output."""
        functions = list(data.get("functions", []))
        if functions == ["*"]:
            functions = []
        return cls(
            str(data["dataset"]),
            str(data["grantee"]),
            tuple(functions),
            data.get("not_before"),
            data.get("not_after"),
            str(data.get("granted_by", "")),
            str(data.get("created", "")),
            str(data.get("owner", "")),
        )


@dataclass(frozen=True)
class DatasetEntry:
    """A named dataset: an owner's published upload, or a registered source.

    Attributes:
        kind: ``"upload"``, or a source kind (``"csv"``, ``"parquet"``,
            ``"sqlite"``, ``"postgresql"``).
        handle: The data handle of an upload.
        source: The source's settings (:class:`fdrtd_server.sources.SourceSpec`
            as a dict); never shown to clients.
        configured: Given in ``fdrtd.toml`` (changed there, not through the API).
    """

    name: str
    kind: str
    owner: str
    description: str = ""
    handle: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    configured: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The entry as stored in ``custody.json`` (its name is the key)."""
        data: dict[str, Any] = {
            "kind": self.kind,
            "owner": self.owner,
            "description": self.description,
            "created": self.created,
        }
        if self.handle:
            data["handle"] = self.handle
        if self.source:
            data["source"] = self.source
        return data

    @classmethod
    def from_dict(
        cls, name: str, data: Mapping[str, Any], configured: bool = False
    ) -> DatasetEntry:
        """Rebuild from :meth:`to_dict` output."""
        return cls(
            name,
            str(data["kind"]),
            str(data["owner"]),
            str(data.get("description", "")),
            str(data.get("handle", "")),
            dict(data.get("source") or {}),
            str(data.get("created", "")),
            configured,
        )

    def message(self) -> dict[str, Any]:
        """What a microservice needs to read it (sent on the bus, never to clients)."""
        data: dict[str, Any] = {"kind": self.kind, "owner": self.owner}
        if self.handle:
            data["handle"] = self.handle
        if self.source:
            data["source"] = self.source
        return data


def _source_spec(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The checked source settings of ``data`` (its keys but owner and description)."""
    from fdrtd_server.sources import SourceSpec  # local: pyarrow and psycopg load on use

    spec = {key: value for key, value in data.items() if key not in ("owner", "description")}
    checked: dict[str, Any] = SourceSpec.from_dict(spec, where).to_dict()
    return checked


def configured_sources(home: Path) -> dict[str, DatasetEntry]:
    """The ``[sources.NAME]`` tables of ``home/fdrtd.toml``, checked.

    Raises:
        ValueError: Naming the source and the bad key.
    """
    path = home / CONFIG_FILE
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from None
    tables = document.get("sources", {})
    if not isinstance(tables, dict):
        raise ValueError(f"{path}: [sources] must hold one table per source")
    found: dict[str, DatasetEntry] = {}
    for name, table in tables.items():
        where = f"{path}: [sources.{name}]"
        try:
            check_dataset_name(name, "source name")
            if not isinstance(table, dict):
                raise ValueError("must be a table")
            owner = _check_token_name(table.get("owner"), "owner")
            description = _check_description(table.get("description", ""))
            spec = _source_spec(table, where)
        except ValueError as error:
            text = str(error)
            raise ValueError(text if text.startswith(where) else f"{where}: {text}") from None
        found[name] = DatasetEntry(
            name, spec["kind"], owner, description, source=spec, configured=True
        )
    return found


class CustodyStore:
    """The named datasets and grants of one server home (``custody.json``).

    Every change is a read-modify-write under an exclusive lock on
    ``custody.lock``, written atomically; reads re-load the file when it
    changed, so a grant revoked from the command line applies to the next
    request of a running server.
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / CUSTODY_FILE
        self._lock_path = home / "custody.lock"
        self._stamp: tuple[int, int, int] | None = None
        self._config_stamp: tuple[int, int, int] | None = None
        self._datasets: dict[str, DatasetEntry] = {}
        self._configured: dict[str, DatasetEntry] = {}
        self._grants: list[Grant] = []

    # -- reading -------------------------------------------------------------

    @staticmethod
    def _stat(path: Path) -> tuple[int, int, int] | None:
        try:
            status = path.stat()
        except FileNotFoundError:
            return None
        return (status.st_mtime_ns, status.st_size, status.st_ino)

    def _load(self, document: Mapping[str, Any]) -> None:
        self._datasets = {
            name: DatasetEntry.from_dict(name, entry)
            for name, entry in document.get("datasets", {}).items()
        }
        self._grants = [Grant.from_dict(grant) for grant in document.get("grants", [])]

    def _reload(self) -> None:
        stamp = self._stat(self.path)
        if stamp != self._stamp:
            if stamp is None:
                self._load({})
            else:
                self._load(json.loads(self.path.read_text("utf-8")))
            self._stamp = stamp
        config_stamp = self._stat(self.home / CONFIG_FILE)
        if config_stamp != self._config_stamp:
            self._config_stamp = config_stamp
            try:
                self._configured = configured_sources(self.home)
            except ValueError as error:
                # a running server keeps the sources it had (a start refuses the file)
                log.error("the [sources] of %s are not used: %s", CONFIG_FILE, error)

    def datasets(self) -> dict[str, DatasetEntry]:
        """Every named dataset, by name (configured sources included)."""
        self._reload()
        return {**self._datasets, **self._configured}

    def grants(self) -> list[Grant]:
        """Every grant."""
        self._reload()
        return list(self._grants)

    def get(self, name: str) -> DatasetEntry | None:
        """The dataset named ``name``, or None."""
        return self.datasets().get(name)

    def _grants_of(self, entry: DatasetEntry, principal: str) -> list[Grant]:
        """The grants of ``entry`` (by name and owner) to ``principal``."""
        return [
            g
            for g in self.grants()
            if g.dataset == entry.name and g.grantee == principal and g.owner == entry.owner
        ]

    def visible(self, principal: str, role: str) -> list[tuple[DatasetEntry, list[Grant]]]:
        """The datasets ``principal`` may see, each with the grants that let her (if any)."""
        now = _now()
        found = []
        for _, entry in sorted(self.datasets().items()):
            live = [g for g in self._grants_of(entry, principal) if g.allows(None, None, now)]
            if role == "admin" or entry.owner == principal or live:
                found.append((entry, live))
        return found

    def usable(
        self,
        principal: str,
        role: str,
        microservice: str,
        function: str,
        names: Iterable[str] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """The datasets ``principal`` may use for ``microservice.function`` now, for the bus.

        Owners use their own datasets; analysts the datasets granted to them
        for this function in this time window. Admins compute on nothing.

        Args:
            principal: The caller's token name.
            role: The caller's role.
            microservice: The microservice of the computation.
            function: Its function.
            names: Only these (the names a request mentions); None: all.
        """
        if role == "admin":
            return {}
        now = _now()
        datasets = self.datasets()
        wanted = datasets if names is None else [n for n in set(names) if n in datasets]
        found: dict[str, dict[str, Any]] = {}
        for name in wanted:
            entry = datasets[name]
            granted = (
                g.allows(microservice, function, now) for g in self._grants_of(entry, principal)
            )
            if entry.owner == principal or any(granted):
                found[name] = entry.message()
        return found

    # -- changing ------------------------------------------------------------

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, Any]]:
        """The document under an exclusive lock; written back when the block ends well."""
        self.home.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                document = json.loads(self.path.read_text("utf-8"))
            except FileNotFoundError:
                document = {"datasets": {}, "grants": []}
            yield document
            write_atomic(self.path, json.dumps(document, indent=2, sort_keys=True))
        finally:
            os.close(fd)  # releases the lock
        self._stamp = None  # read again next time

    def _check_new_name(self, name: str, document: Mapping[str, Any]) -> None:
        self._reload()
        if name in document["datasets"] or name in self._configured:
            raise FileExistsError(
                f"a dataset named '{name}' exists on this server; choose another name"
            )

    def publish(self, name: Any, owner: str, handle: str, description: Any = "") -> DatasetEntry:
        """Publish the upload ``handle`` of ``owner`` under ``name``.

        Raises:
            ValueError: If the name or description breaks its rule.
            FileExistsError: If the name is taken, or the upload is published already.
        """
        name = check_dataset_name(name)
        description = _check_description(description)
        with self._editing() as document:
            self._check_new_name(name, document)
            for other, entry in document["datasets"].items():
                if entry.get("handle") == handle:
                    raise FileExistsError(f"this upload is published already, as '{other}'")
            entry = DatasetEntry(name, "upload", owner, description, handle, created=_now_iso())
            document["datasets"][name] = entry.to_dict()
        return entry

    def add_source(
        self, name: Any, owner: Any, spec: Mapping[str, Any], description: Any = ""
    ) -> DatasetEntry:
        """Register a source read in place, as the dataset ``name`` of ``owner``.

        Raises:
            ValueError: If a setting breaks its rule (named).
            FileExistsError: If the name is taken.
        """
        name = check_dataset_name(name)
        owner = _check_token_name(owner, "owner")
        description = _check_description(description)
        checked = _source_spec(spec, f"source '{name}'")
        with self._editing() as document:
            self._check_new_name(name, document)
            entry = DatasetEntry(
                name, checked["kind"], owner, description, source=checked, created=_now_iso()
            )
            document["datasets"][name] = entry.to_dict()
        return entry

    def remove(self, name: str) -> DatasetEntry:
        """Take the dataset ``name`` out of the catalogue, and its grants with it.

        Raises:
            KeyError: If there is no such dataset here.
            PermissionError: If it is configured in ``fdrtd.toml``.
        """
        self._reload()
        if name in self._configured:
            raise PermissionError(
                f"the source '{name}' is configured in {CONFIG_FILE}: remove it there"
            )
        with self._editing() as document:
            data = document["datasets"].pop(name, None)
            if data is None:
                raise KeyError(f"no dataset named '{name}' on this server")
            document["grants"] = [g for g in document["grants"] if g["dataset"] != name]
        return DatasetEntry.from_dict(name, data)

    def grant(self, grant: Grant) -> Grant:
        """Add ``grant``, for the dataset's current owner.

        It replaces the grant of the same dataset to the same grantee.

        Raises:
            KeyError: If the dataset does not exist.
        """
        with self._editing() as document:
            self._reload()
            if grant.dataset in self._configured:
                owner = self._configured[grant.dataset].owner
            elif grant.dataset in document["datasets"]:
                owner = str(document["datasets"][grant.dataset]["owner"])
            else:
                raise KeyError(f"no dataset named '{grant.dataset}' on this server")
            grant = dataclasses.replace(grant, owner=owner)
            document["grants"] = [
                g
                for g in document["grants"]
                if (g["dataset"], g["grantee"]) != (grant.dataset, grant.grantee)
            ] + [grant.to_dict()]
        return grant

    def revoke(self, dataset: str, grantee: str) -> Grant:
        """Remove the grant of ``dataset`` to ``grantee``; applies to the next request.

        Raises:
            KeyError: If there is no such grant.
        """
        with self._editing() as document:
            kept: list[dict[str, Any]] = []
            gone: list[dict[str, Any]] = []
            for g in document["grants"]:
                (gone if (g["dataset"], g["grantee"]) == (dataset, grantee) else kept).append(g)
            if not gone:
                raise KeyError(f"'{grantee}' holds no grant of '{dataset}'")
            document["grants"] = kept
        return Grant.from_dict(gone[0])
