"""The owner's policy per dataset: ``DIR/policy.toml``, versioned, read again when it changes.

The policy file says, per named dataset with server-wide defaults, which
microservices and functions may use it, the minimum cohort and small-cell
threshold, whether differential privacy applies and with which budget,
whether its exact results may be computed beside the analyst's own uploads
(``analyst_inputs``), and limits (concurrent computations per analyst, a
whole-job timeout)::

    version = "2026-12-07"          # the owner's label; stated in every result

    [defaults]                      # every dataset, unless its own table says otherwise
    functions = ["*"]               # "microservice.function", "microservice.*" or "*"
    min_cohort = 5
    small_cell = 5

    [defaults.privacy]
    dp = true
    epsilon = 0.1                   # what a query spends unless the analyst asks otherwise

    [datasets.patients]
    functions = ["smpc.secure_sum", "smpc.count", "map.*"]

    [datasets.patients.bounds]      # declared by the owner: values are clamped to them
    age = [0, 120]

A server without the file runs under the built-in defaults
(:data:`DEFAULT_VERSION`). The controller attaches the policy of each named
dataset a request may use to the computation's bus message
(:meth:`Policy.message`); the job reads it with
:meth:`~fdrtd_server.microservice.CallContext.dataset_policy`.

Every rule of the file is checked before it is used (:meth:`Policy.parse`),
and a :class:`PolicyError` names the line that breaks it, so that
``fdrtd-server policy check FILE`` can point the owner at it. A running
server reads the file again on the next request after it changed
(:class:`PolicyStore`); a file that breaks a rule stops every computation
(503) until it is mended, and both are audited (actor ``owner-policy``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fdrtd_server.custody import check_dataset_name
from fdrtd_server.errors import Forbidden, JobTimeout, TooManyRequests

if TYPE_CHECKING:
    from fdrtd_server.audit import AuditLog

__all__ = [
    "AUDIT_ACTOR",
    "DEFAULT_VERSION",
    "MAX_JOB_TIMEOUT",
    "POLICY_FILE",
    "TEMPLATE",
    "DatasetPolicy",
    "Policy",
    "PolicyError",
    "PolicyStore",
    "Privacy",
    "RunningJobs",
    "job_deadline",
    "write_template",
]

log = logging.getLogger("fdrtd.policy")
POLICY_FILE = "policy.toml"
DEFAULT_VERSION = "default"
"""The version of the built-in policy, for a server without a policy file."""
MAX_JOB_TIMEOUT = 86400.0
"""The longest whole-job timeout a policy may set: one day."""
MAX_COUNT = 2**31 - 1
"""The largest integer a policy may give a count (``min_cohort``, ``small_cell``,
``max_concurrent``): far beyond any real need, and within every integer the
protocols and their messages carry."""
MAX_EPSILON = 1e6
"""The largest epsilon (per query or in a budget) a policy may set."""
MAX_BOUND = 1e18
"""The largest magnitude of a declared bound: beyond it no fixed-point encoding holds it."""
MAX_FILE_BYTES = 1 << 20
"""The largest policy file read (1 MiB); a larger one is refused, as a broken rule is."""
READ_ATTEMPTS = 5
"""Reads of a policy file that changes while it is read, before the request is refused."""
MECHANISMS = ("laplace", "gaussian")
AUDIT_ACTOR = "owner-policy"
"""Who the audit log names for a change of the policy file the controller noticed."""
_FUNCTION = re.compile(r"^(\*|[a-z][a-z0-9_]{0,31}\.(\*|[a-z][a-z0-9_]{0,31}))$")
"""A function pattern: ``microservice.function``, ``microservice.*`` or ``*``."""
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:+-]{0,63}$")
"""The owner's version label: stated in results and the audit log, so short and plain."""
_SHOWN_KEY = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


class PolicyError(ValueError):
    """A policy file breaks a rule; the message names the file, the line and the rule.

    Attributes:
        source: The file (or what stands for it).
        line: The line (1-based) that breaks the rule, or None if no line does
            (an empty file, say).
        reason: The rule, without the file and line.
    """

    def __init__(self, reason: str, source: str = POLICY_FILE, line: int | None = None) -> None:
        self.source, self.line, self.reason = source, line, reason
        super().__init__(f"{source}:{line}: {reason}" if line else f"{source}: {reason}")


@dataclass(frozen=True)
class Privacy:
    """Differential privacy for one dataset: whether it applies, and its budget.

    Epsilons and deltas are those of the owner's dataset on this server. A
    query spends ``epsilon`` (or less, if the analyst asks) from the
    analyst's budget and from the total; a query that would exceed either is
    refused.
    """

    dp: bool = True
    mechanism: str = "laplace"
    """``"laplace"`` (pure epsilon-DP) or ``"gaussian"`` (zero-concentrated, converted
    to (epsilon, delta))."""
    epsilon: float = 0.1
    """What one query spends unless the analyst asks for another epsilon (from
    ``min_epsilon`` up to what remains of her budget)."""
    min_epsilon: float = 0.001
    """The smallest epsilon a query may ask for (refused 400 below, before the spend): at a
    tiny epsilon the noise is wider than a 64-bit sampler holds."""
    delta: float = 0.0
    """What one query spends of delta (0 for Laplace)."""
    analyst_epsilon: float = 1.0
    analyst_delta: float = 1e-6
    total_epsilon: float = 10.0
    total_delta: float = 1e-5

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the bus."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class DatasetPolicy:
    """What the owner allows for one dataset (its defaults filled in)."""

    functions: tuple[str, ...] = ("*",)
    min_cohort: int = 3
    small_cell: int = 3
    privacy: Privacy = field(default_factory=Privacy)
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    """Owner-declared bounds per column: values are clamped to them, and they give
    the sensitivity of differentially private releases."""
    max_concurrent: int = 16
    """Computations one analyst may run at once on this dataset."""
    job_timeout: float = 600.0
    """Seconds a whole computation on this dataset may take."""
    analyst_inputs: bool = False
    """Whether exact results of this dataset (no differential privacy) may be computed
    beside inputs the caller supplied herself (her uploads, on any party): she could
    subtract what she knows of them. False refuses such a multi-party computation on
    every party (:mod:`fdrtd_server.provenance`)."""

    def allows(self, microservice: str, function: str) -> bool:
        """Whether ``microservice.function`` may use the dataset."""
        wanted = f"{microservice}.{function}"
        return any(pattern in ("*", wanted, f"{microservice}.*") for pattern in self.functions)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the bus (:meth:`from_dict` reads it back)."""
        return {
            "functions": list(self.functions),
            "min_cohort": self.min_cohort,
            "small_cell": self.small_cell,
            "privacy": self.privacy.to_dict(),
            "bounds": {column: list(pair) for column, pair in self.bounds.items()},
            "max_concurrent": self.max_concurrent,
            "job_timeout": self.job_timeout,
            "analyst_inputs": self.analyst_inputs,
        }

    def public(self, server_min_cohort: int) -> dict[str, Any]:
        """What the catalogue shows an analyst: the rules, the declared bounds; no budget spent.

        The minimum cohort and small-cell threshold are those that apply (the
        server's minimum cohort, if stricter).
        """
        privacy = self.privacy
        return {
            "functions": list(self.functions),
            "min_cohort": max(server_min_cohort, self.min_cohort),
            "small_cell": max(server_min_cohort, self.small_cell),
            "dp": privacy.dp,
            **(
                {
                    "mechanism": privacy.mechanism,
                    "epsilon": privacy.epsilon,
                    "min_epsilon": privacy.min_epsilon,
                    "delta": privacy.delta,
                    "analyst_epsilon": privacy.analyst_epsilon,
                    "analyst_delta": privacy.analyst_delta,
                }
                if privacy.dp
                else {}
            ),
            "bounds": {column: list(pair) for column, pair in self.bounds.items()},
            "max_concurrent": self.max_concurrent,
            "job_timeout": self.job_timeout,
            "analyst_inputs": self.analyst_inputs,
        }

    def summary(self) -> str:
        """One line for ``fdrtd-server policy check``."""
        dp = (
            f"dp {self.privacy.mechanism} epsilon {self.privacy.epsilon:g} per query"
            if self.privacy.dp
            else "no dp"
        )
        functions = ", ".join(self.functions) if self.functions else "(none)"
        bounds = f", bounds for {len(self.bounds)} columns" if self.bounds else ""
        return (
            f"functions {functions}; min_cohort {self.min_cohort}, small_cell "
            f"{self.small_cell}; {dp}{bounds}; max_concurrent {self.max_concurrent}, "
            f"job_timeout {self.job_timeout:g} s; analyst_inputs "
            f"{str(self.analyst_inputs).lower()}"
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetPolicy:
        """Rebuild from :meth:`to_dict` (as the job gets it on the bus)."""
        privacy = Privacy(**dict(data.get("privacy") or {}))
        bounds = {str(k): (float(v[0]), float(v[1])) for k, v in (data.get("bounds") or {}).items()}
        functions = data.get("functions")
        return cls(
            # an empty list is the owner's "no function": kept, never read as "all"
            functions=tuple(functions) if isinstance(functions, list | tuple) else ("*",),
            min_cohort=int(data.get("min_cohort", 3)),
            small_cell=int(data.get("small_cell", 3)),
            privacy=privacy,
            bounds=bounds,
            max_concurrent=int(data.get("max_concurrent", 16)),
            job_timeout=float(data.get("job_timeout", 600.0)),
            analyst_inputs=data.get("analyst_inputs") is True,
        )


_DATASET_KEYS = ("functions", "min_cohort", "small_cell", "analyst_inputs", "privacy", "bounds")
_LIMIT_KEYS = ("max_concurrent", "job_timeout")
_PRIVACY_KEYS = tuple(f.name for f in dataclasses.fields(Privacy))


def _key(name: str) -> str:
    """A key of the file as a message names it (never a long or odd string)."""
    return f"'{name}'" if _SHOWN_KEY.fullmatch(name) else "a key"


def _split(dotted: str) -> tuple[str, ...]:
    """The parts of a TOML key (``a."b.c".d`` is three parts)."""
    parts = re.findall(r'"((?:[^"\\]|\\.)*)"|\'([^\']*)\'|([^.\s"\']+)', dotted)
    return tuple(next(p for p in groups if p) if any(groups) else "" for groups in parts)


class _Lines:
    """Where each table and key of a TOML text is: enough to name the line of a rule broken.

    Not a TOML parser: :mod:`tomllib` has read the text already; this finds
    the line of ``[table]`` headers and ``key =`` lines (dotted keys included)
    by their look. A key inside an inline table is found at its table's line.
    """

    _HEADER = re.compile(r"^\[\[?\s*([^\[\]#]+?)\s*\]\]?\s*(#.*)?$")
    _ASSIGN = re.compile(r"^((?:\"(?:[^\"\\]|\\.)*\"|'[^']*'|[A-Za-z0-9_\-. \t])+?)\s*=")

    def __init__(self, text: str) -> None:
        self.found: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            header = self._HEADER.match(line)
            if header:
                table = _split(header.group(1))
                self._note(table, number)
                continue
            assign = self._ASSIGN.match(line)
            if assign:
                self._note((*table, *_split(assign.group(1))), number)

    def _note(self, path: tuple[str, ...], number: int) -> None:
        for end in range(1, len(path) + 1):
            self.found.setdefault(path[:end], number)

    def of(self, path: tuple[str, ...]) -> int | None:
        """The line of ``path``, else of the nearest table holding it; None if none is found."""
        for end in range(len(path), 0, -1):
            if path[:end] in self.found:
                return self.found[path[:end]]
        return None


class _Reader:
    """Checks a parsed policy document, naming the line of each rule it finds broken."""

    def __init__(self, text: str, source: str) -> None:
        self.lines = _Lines(text)
        self.source = source

    def fail(self, path: tuple[str, ...], reason: str) -> PolicyError:
        """The error for ``path`` (at its line, else at the first line)."""
        return PolicyError(reason, self.source, self.lines.of(path) or 1)

    @staticmethod
    def where(path: tuple[str, ...]) -> str:
        return "[" + ".".join(path) + "]"

    def count(self, value: Any, path: tuple[str, ...]) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
            raise self.fail(
                path,
                f"{self.where(path[:-1])} '{path[-1]}' must be an integer from 1 to {MAX_COUNT}",
            )
        return value

    def number(self, value: Any, path: tuple[str, ...]) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(path, f"{self.where(path[:-1])} '{path[-1]}' must be a number")
        if not _finite(value):
            raise self.fail(path, f"{self.where(path[:-1])} '{path[-1]}' must be finite")
        return float(value)

    def functions(self, value: Any, path: tuple[str, ...]) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(
            isinstance(f, str) and _FUNCTION.fullmatch(f) for f in value
        ):
            raise self.fail(
                path,
                f"{self.where(path[:-1])} 'functions' must list patterns such as "
                '"smpc.count", "map.*" or "*" (lowercase microservice and function '
                "names; [] allows none)",
            )
        return tuple(value)

    def privacy(self, value: Any, base: Privacy, path: tuple[str, ...]) -> Privacy:
        where = self.where(path)
        if not isinstance(value, dict):
            raise self.fail(path, f"{where} must be a table of {', '.join(_PRIVACY_KEYS)}")
        merged = base.to_dict()
        for key, item in value.items():
            at = (*path, key)
            if key == "dp":
                if not isinstance(item, bool):
                    raise self.fail(at, f"{where} 'dp' must be true or false")
                merged[key] = item
            elif key == "mechanism":
                if item not in MECHANISMS:
                    raise self.fail(at, f'{where} \'mechanism\' must be "laplace" or "gaussian"')
                merged[key] = item
            elif key.endswith("epsilon") and key in _PRIVACY_KEYS:
                if not 0 < self.number(item, at) <= MAX_EPSILON:
                    raise self.fail(
                        at, f"{where} '{key}' must be greater than 0 and at most {MAX_EPSILON:g}"
                    )
                merged[key] = float(item)
            elif key.endswith("delta") and key in _PRIVACY_KEYS:
                if not 0 <= self.number(item, at) < 1:
                    raise self.fail(at, f"{where} '{key}' must be at least 0 and below 1")
                merged[key] = float(item)
            else:
                raise self.fail(
                    at, f"{where}: unknown key {_key(key)}; its keys are {', '.join(_PRIVACY_KEYS)}"
                )
        privacy = Privacy(**merged)
        self._consistent(privacy, value, path)
        return privacy

    def _consistent(
        self, privacy: Privacy, table: Mapping[str, Any], path: tuple[str, ...]
    ) -> None:
        """Refuse a budget no query could ever be spent from, and Gaussian noise without delta."""
        where = self.where(path)

        def at(*keys: str) -> tuple[str, ...]:
            return next(((*path, k) for k in keys if k in table), path)

        if privacy.mechanism == "gaussian" and privacy.delta <= 0:
            raise self.fail(
                at("delta", "mechanism"),
                f"{where}: the gaussian mechanism needs a 'delta' greater than 0 per query",
            )
        if privacy.min_epsilon > privacy.epsilon:
            raise self.fail(
                at("min_epsilon", "epsilon"),
                f"{where}: 'min_epsilon' is above 'epsilon' per query: a query at the "
                "per-query epsilon would be refused",
            )
        for spent, budget in (("epsilon", "analyst_epsilon"), ("epsilon", "total_epsilon")):
            if getattr(privacy, spent) > getattr(privacy, budget):
                raise self.fail(
                    at(spent, budget),
                    f"{where}: '{spent}' per query is above '{budget}': no query could run",
                )
        if privacy.mechanism == "gaussian":
            for budget in ("analyst_delta", "total_delta"):
                if privacy.delta > getattr(privacy, budget):
                    raise self.fail(
                        at("delta", budget),
                        f"{where}: 'delta' per query is above '{budget}': no query could run",
                    )

    def bounds(self, value: Any, path: tuple[str, ...]) -> dict[str, tuple[float, float]]:
        where = self.where(path)
        if not isinstance(value, dict):
            raise self.fail(path, f"{where} must be a table: column = [lower, upper]")
        found: dict[str, tuple[float, float]] = {}
        for column, pair in value.items():
            if not column or len(column) > 255:
                raise self.fail(path, f"{where}: a column name must be 1 to 255 characters")
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in pair)
                or not all(_finite(v) and abs(v) <= MAX_BOUND for v in pair)
                or not pair[0] < pair[1]
            ):
                raise self.fail(
                    (*path, column),
                    f"{where} {_key(column)} must be [lower, upper]: numbers from "
                    f"-{MAX_BOUND:g} to {MAX_BOUND:g}, lower < upper",
                )
            found[column] = (float(pair[0]), float(pair[1]))
        return found

    def dataset(self, table: Any, base: DatasetPolicy, path: tuple[str, ...]) -> DatasetPolicy:
        where = self.where(path)
        if not isinstance(table, dict):
            raise self.fail(path, f"{where} must be a table")
        values: dict[str, Any] = {}
        for key, value in table.items():
            at = (*path, key)
            if key == "functions":
                values[key] = self.functions(value, at)
            elif key in ("min_cohort", "small_cell", "max_concurrent"):
                values[key] = self.count(value, at)
            elif key == "analyst_inputs":
                if not isinstance(value, bool):
                    raise self.fail(at, f"{where} 'analyst_inputs' must be true or false")
                values[key] = value
            elif key == "job_timeout":
                seconds = self.number(value, at)
                if not 0 < seconds <= MAX_JOB_TIMEOUT:
                    raise self.fail(
                        at,
                        f"{where} 'job_timeout' must be more than 0 and at most "
                        f"{MAX_JOB_TIMEOUT:g} seconds",
                    )
                values[key] = seconds
            elif key == "privacy":
                values[key] = self.privacy(value, base.privacy, at)
            elif key == "bounds":
                values[key] = {**base.bounds, **self.bounds(value, at)}
            else:
                keys = ", ".join((*_DATASET_KEYS, *_LIMIT_KEYS))
                raise self.fail(at, f"{where}: unknown key {_key(key)}; its keys are {keys}")
        return dataclasses.replace(base, **values)


def _finite(value: float) -> bool:
    """Whether ``value`` is a finite number a float can hold (an integer may be too large)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _toml_line(error: tomllib.TOMLDecodeError, text: str) -> tuple[int | None, str]:
    """The line of a TOML syntax error and its message without the position."""
    line = getattr(error, "lineno", None)
    message = str(getattr(error, "msg", "") or error)
    found = re.search(r"\(at line (\d+), column \d+\)", message)
    if found:
        line = line or int(found.group(1))
        message = message[: found.start()].strip()
    elif "(at end of document)" in message:
        line = line or max(1, len(text.splitlines()))
        message = message.replace("(at end of document)", "at the end of the file").strip()
    return line, message


def _read_text(path: Path) -> str:
    """The text of the policy file ``path``, at most :data:`MAX_FILE_BYTES` of UTF-8.

    Raises:
        PolicyError: If it is larger, not UTF-8, or cannot be read.
        FileNotFoundError: If there is no file.
    """
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise PolicyError(
            f"the file cannot be read ({reason}); it must be a regular file the server can read",
            str(path),
        ) from None
    if len(raw) > MAX_FILE_BYTES:
        raise PolicyError(f"the file is larger than {MAX_FILE_BYTES} bytes", str(path))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("the file is not UTF-8 text", str(path)) from None


@dataclass(frozen=True)
class Policy:
    """A whole policy file: its version, the defaults and each dataset's own table."""

    version: str = DEFAULT_VERSION
    defaults: DatasetPolicy = field(default_factory=DatasetPolicy)
    datasets: Mapping[str, DatasetPolicy] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, source: str = POLICY_FILE) -> Policy:
        """Read a policy file's text.

        The version is the owner's label and the first 12 hex digits of the
        text's SHA-256: a change the owner forgot to label still changes it.

        Raises:
            PolicyError: Naming ``source``, the line and what is wrong.
        """
        if len(text) > MAX_FILE_BYTES or len(text.encode("utf-8")) > MAX_FILE_BYTES:
            raise PolicyError(f"the file is larger than {MAX_FILE_BYTES} bytes", source)
        try:
            return cls._parse(text, source)
        except RecursionError:
            raise PolicyError(
                "tables or arrays are nested too deeply; a policy needs at most a few levels",
                source,
            ) from None

    @classmethod
    def read(cls, path: Path) -> Policy:
        """Read and :meth:`parse` the policy file ``path``.

        Raises:
            PolicyError: If it breaks a rule, is larger than :data:`MAX_FILE_BYTES`,
                is not UTF-8 text, or cannot be read (naming why).
            FileNotFoundError: If there is no file.
        """
        return cls.parse(_read_text(path), str(path))

    @classmethod
    def _parse(cls, text: str, source: str) -> Policy:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            line, reason = _toml_line(error, text)
            raise PolicyError(f"not valid TOML: {reason}", source, line) from None
        except ValueError:
            # Python refuses to read an integer of more than 4300 digits
            raise PolicyError("not valid TOML: a number is far too long", source) from None
        reader = _Reader(text, source)
        for key in document:
            if key not in ("version", "defaults", "datasets"):
                raise reader.fail(
                    (key,),
                    f"unknown key {_key(key)}; the file holds version, [defaults] "
                    "and [datasets.NAME] tables",
                )
        label = document.get("version")
        if not isinstance(label, str) or not _LABEL.fullmatch(label.strip()):
            raise reader.fail(
                ("version",),
                "'version' must be the owner's label: 1 to 64 letters, digits, spaces or "
                '._:+- (e.g. "2026-12-07"); it is stated in every result',
            )
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
        defaults = reader.dataset(document.get("defaults", {}), DatasetPolicy(), ("defaults",))
        tables = document.get("datasets", {})
        if not isinstance(tables, dict):
            raise reader.fail(("datasets",), "'datasets' must hold one [datasets.NAME] table each")
        datasets: dict[str, DatasetPolicy] = {}
        for name, table in tables.items():
            try:
                check_dataset_name(name)
            except ValueError as error:
                table = (
                    f"[datasets.{name}]"
                    if _SHOWN_KEY.fullmatch(name)
                    else "a [datasets.NAME] table"
                )
                raise reader.fail(("datasets", name), f"{table}: {error}") from None
            datasets[name] = reader.dataset(table, defaults, ("datasets", name))
        return cls(version=f"{label.strip()}+{digest}", defaults=defaults, datasets=datasets)

    def of(self, name: str) -> DatasetPolicy:
        """The policy of the dataset ``name`` (the defaults if it has no table)."""
        return self.datasets.get(name, self.defaults)

    def message(self, names: Iterable[str]) -> dict[str, Any]:
        """What the computation's bus message carries: the version and each dataset's policy.

        ``defaults`` goes along for a computation on no named dataset (the
        caller's own uploads): its limits hold there too.
        """
        return {
            "version": self.version,
            "datasets": {n: self.of(n).to_dict() for n in names},
            "defaults": self.defaults.to_dict(),
        }

    def check_functions(self, names: Iterable[str], microservice: str, function: str) -> None:
        """Refuse a computation that a named dataset's policy does not allow.

        Raises:
            Forbidden: Naming the dataset and the functions its policy allows.
        """
        for name in sorted(names):
            policy = self.of(name)
            if not policy.allows(microservice, function):
                allowed = ", ".join(policy.functions) if policy.functions else "none"
                raise Forbidden(
                    f"the owner's policy of dataset '{name}' does not allow "
                    f"'{microservice}.{function}'; the functions it allows: {allowed}"
                )

    def limits(self, names: Iterable[str]) -> dict[str, tuple[int, str]]:
        """Each named dataset's concurrency limit (the defaults' if none), and whose it is."""
        found = {name: (self.of(name).max_concurrent, f"dataset '{name}'") for name in names}
        return found or {"": (self.defaults.max_concurrent, "this server's default")}

    def changes(self, before: Policy) -> dict[str, str]:
        """What changed since ``before``, by dataset name only (for the audit log, no values)."""
        added = sorted(set(self.datasets) - set(before.datasets))
        removed = sorted(set(before.datasets) - set(self.datasets))
        changed = sorted(
            name
            for name in set(self.datasets) & set(before.datasets)
            if self.datasets[name] != before.datasets[name]
        )
        found = {"previous": before.version}
        for key, names in (("added", added), ("removed", removed), ("changed", changed)):
            if names:
                found[key] = ",".join(names)
        if self.defaults != before.defaults:
            found["defaults"] = "changed"
        return found


def job_deadline(policy: Mapping[str, Any]) -> tuple[float, JobTimeout] | None:
    """The whole-job timeout of a computation, and the error it ends with; None if none.

    ``policy`` is what the controller sent (:meth:`Policy.message`): the
    shortest ``job_timeout`` of the named datasets, else that of the defaults.
    """
    datasets = policy.get("datasets")
    found = [
        (float(p["job_timeout"]), f"the policy of dataset '{name}'")
        for name, p in (datasets.items() if isinstance(datasets, Mapping) else ())
        if isinstance(p, Mapping) and isinstance(p.get("job_timeout"), int | float)
    ]
    defaults = policy.get("defaults")
    if not found and isinstance(defaults, Mapping):
        seconds = defaults.get("job_timeout")
        if isinstance(seconds, int | float):
            found.append((float(seconds), "this server's policy (its defaults)"))
    found = [(s, whose) for s, whose in found if s > 0 and math.isfinite(s)]
    if not found:
        return None
    seconds, whose = min(found)
    return seconds, JobTimeout(
        f"the computation exceeded the whole-job timeout of {seconds:g} s set by {whose}; "
        "ask for less (fewer records, a simpler function) or ask the owner for a longer one"
    )


class RunningJobs:
    """The computations each caller runs now, per named dataset: the controller's count.

    A job counts from its start request (:meth:`admit`, before anything is
    sent to the microservice) to its end, as its runner reports it on the bus
    (:meth:`end`); one that ended within the start's ``?wait=`` is counted
    off at once (:meth:`started`). When a caller is at a limit, the jobs
    counted for her are looked up first, so that an end report lost while
    the controller was away does not keep her out.
    """

    def __init__(self) -> None:
        self._jobs: dict[str, tuple[str, tuple[str, ...]]] = {}
        """Result handle -> (caller, dataset names; ``""`` for her own uploads)."""
        self._confirmed: set[str] = set()
        """Handles whose start was answered "running" (the others are in flight)."""

    def count(self, principal: str, name: str) -> int:
        """How many computations ``principal`` runs now on ``name``."""
        return sum(1 for who, names in self._jobs.values() if who == principal and name in names)

    async def admit(
        self,
        handle: str,
        principal: str,
        limits: Mapping[str, tuple[int, str]],
        alive: Callable[[str], Awaitable[bool]],
    ) -> None:
        """Count the computation ``handle`` of ``principal``, unless it goes past a limit.

        Args:
            handle: Its result handle.
            principal: The caller.
            limits: By dataset name (``""``: her own uploads), the most she may
                run at once and whose limit it is (:meth:`Policy.limits`).
            alive: Whether a counted job still runs (its record, read again).

        Raises:
            TooManyRequests: Naming the limit and whose it is.
        """
        for name, (limit, whose) in sorted(limits.items()):
            if self.count(principal, name) < limit:
                continue
            for other in [h for h, (who, _) in self._jobs.items() if who == principal]:
                if other in self._confirmed and not await alive(other):
                    self.end(other)
            if self.count(principal, name) >= limit:
                raise TooManyRequests(
                    f"you run {limit} computations at once on {whose or 'your own data'} "
                    f"already, the most that {'its owner' if name else 'this server'}'s "
                    f"policy allows (max_concurrent = {limit}); wait for one to end (or "
                    "release it), then start this one again"
                )
        self._jobs[handle] = (principal, tuple(sorted(limits)))

    def started(self, handle: str, answer: Any) -> None:
        """The start request of ``handle`` was answered: count on only if the job runs on."""
        if isinstance(answer, dict) and answer.get("status") == "running" and handle in self._jobs:
            self._confirmed.add(handle)
        else:
            self.end(handle)

    def end(self, handle: str) -> None:
        """The computation ``handle`` ended (or never started): it counts no more."""
        self._jobs.pop(handle, None)
        self._confirmed.discard(handle)


class PolicyStore:
    """The policy file of a server home, read again when it changes (next request).

    With an ``audit`` log, each version it sees for the first time is
    audited (actor :data:`AUDIT_ACTOR`, action ``policy``, target the
    version, and which datasets' tables were added, removed or changed;
    never a value), and so is a file it refuses, once per change of the file.
    """

    def __init__(self, home: Path, audit: AuditLog | None = None) -> None:
        self.path = home / POLICY_FILE
        self.audit = audit
        self.running = RunningJobs()
        """The computations each caller runs now (the ``max_concurrent`` limits)."""
        self._stamp: tuple[int, int, int] | None = None
        self._refused: tuple[int, int, int] | None = None
        self._failure: PolicyError | None = None
        """Why the file at stamp :attr:`_refused` was refused (raised again, not re-read)."""
        self._policy = Policy()

    def current(self) -> Policy:
        """The policy in force now.

        The file is read again when its time, size or inode changed, and its
        stamp is taken again after the read: a file that changed while it was
        read is read again (a few times), so that a half-written file is not
        taken for the new one. An owner should still replace it at once (write
        a new file, then rename it over the old one).

        Raises:
            PolicyError: If the file was changed into one that breaks a rule,
                cannot be read (a directory, no permission), is too large, or
                kept changing while it was read.
        """
        try:
            stamp = self._stat()
        except FileNotFoundError:
            return self._missing()
        except PolicyError as error:
            self._refuse((-1, -1, -1), error)
            raise
        if stamp == self._stamp:
            return self._policy
        if stamp == self._refused and self._failure is not None:
            raise self._failure  # the same broken file: not read and parsed on every request
        for _ in range(READ_ATTEMPTS):
            try:
                policy: Policy | None = Policy.read(self.path)
                failure: PolicyError | None = None
                after = self._stat()
            except FileNotFoundError:
                return self._missing()
            except PolicyError as error:
                policy, failure = None, error
                try:
                    after = self._stat()
                except FileNotFoundError:
                    return self._missing()
                except PolicyError:
                    after = stamp
            if after != stamp:
                stamp = after  # changed while read: read the new one
                continue
            if policy is None:
                assert failure is not None
                self._refuse(stamp, failure)
                raise failure
            self._stamp, self._refused = stamp, None
            if policy.version != self._policy.version:
                self._changed(policy)
            self._policy = policy
            return self._policy
        raise PolicyError(
            "the file changed while it was read, again and again; replace it at once "
            "(write a new file, then rename it over policy.toml)",
            str(self.path),
        )

    def _stat(self) -> tuple[int, int, int]:
        """The file's time, size and inode.

        Raises:
            FileNotFoundError: If there is no file.
            PolicyError: If it cannot be looked at (no permission on its directory).
        """
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            raise
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise PolicyError(f"the file cannot be read ({reason})", str(self.path)) from None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def _missing(self) -> Policy:
        """No file: the built-in defaults (audited once, if a file was there before)."""
        if self._stamp is not None or self._refused is not None:
            self._stamp, self._refused = None, None
            self._changed(Policy())
        return self._policy

    def _refuse(self, stamp: tuple[int, int, int], error: PolicyError) -> None:
        """Audit a file that breaks a rule, once per change of the file."""
        if stamp == self._refused:
            return
        self._refused, self._failure = stamp, error
        log.error("policy file refused, nothing is computed until it is mended: %s", error)
        if self.audit is not None:
            self.audit.write(
                AUDIT_ACTOR,
                "policy",
                "(invalid file)",
                "refused",
                line=error.line or 0,
                reason=error.reason[:300],
            )

    def _changed(self, policy: Policy) -> None:
        if self.audit is not None:
            self.audit.write(AUDIT_ACTOR, "policy", policy.version, **policy.changes(self._policy))
        self._policy = policy


TEMPLATE = """\
# The owner's policy for the datasets of this server; see docs/policy.md.
# `fdrtd-server policy check policy.toml` checks it (and names a bad line);
# a running server follows a change from its next request on, and audits it.

# Your label for this version; every result states it (with a hash of this file).
version = "1"

# Every named dataset (a published upload or a registered source), unless its
# own [datasets.NAME] table says otherwise. The values below are the defaults.
[defaults]
# which computations may use a dataset: "microservice.function", "microservice.*", "*"
functions = ["*"]
# no result over fewer records (the server's [policy] min_cohort holds too)
min_cohort = 3
# table and histogram cells below this are hidden (empty ones too)
small_cell = 3
# computations one analyst may run at once on a dataset (and on her own uploads)
max_concurrent = 16
# seconds a whole computation may take before it is cancelled (at most 86400)
job_timeout = 600
# whether exact results (dp = false) may be computed beside data the analyst
# uploaded herself, on this or another server: she could subtract her own part
# and see this dataset's small counts; false refuses such a computation
analyst_inputs = false

[defaults.privacy]
# only functions with a differentially private release may use a named dataset
dp = true
mechanism = "laplace"      # or "gaussian" (then delta > 0)
epsilon = 0.1              # what one query spends, unless the analyst asks otherwise
min_epsilon = 0.001        # the smallest epsilon an analyst may ask for per query
delta = 0.0
analyst_epsilon = 1.0      # what each analyst may spend in all
analyst_delta = 1e-6
total_epsilon = 10.0       # what all analysts together may spend
total_delta = 1e-5

# One table per dataset that differs from the defaults, for example:
#
# [datasets.patients]
# functions = ["smpc.count", "smpc.secure_sum", "map.aggregate"]
# min_cohort = 20
# small_cell = 10
#
# [datasets.patients.privacy]
# epsilon = 0.05
#
# [datasets.patients.bounds]   # values are clamped to these; they set the noise
# age = [0, 120]
"""
"""A valid policy file that states the built-in defaults, with comments; ``fdrtd-server init``
writes it."""


def write_template(home: Path) -> bool:
    """Write :data:`TEMPLATE` as ``home/policy.toml`` unless a policy is there; whether written."""
    path = home / POLICY_FILE
    if path.exists():
        return False
    path.write_text(TEMPLATE, "utf-8")
    return True
