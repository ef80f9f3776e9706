"""The owner's policy per dataset: ``DIR/policy.toml``, versioned, read again when it changes.

The policy file says, per named dataset with server-wide defaults, which
microservices and functions may use it, the minimum cohort and small-cell
threshold, whether differential privacy applies and with which budget, and
limits (concurrent computations per analyst, a whole-job timeout)::

    version = "2026-12-07"          # the owner's label; stated in every result

    [defaults]                      # every dataset, unless its own table says otherwise
    functions = ["*"]               # "microservice.function", "microservice.*" or "*"
    min_cohort = 5
    small_cell = 5

    [defaults.privacy]
    dp = true
    epsilon = 0.1                   # spent by one query unless the analyst asks for less

    [datasets.patients]
    functions = ["smpc.secure_sum", "smpc.count", "map.*"]

    [datasets.patients.bounds]      # declared by the owner: values are clamped to them
    age = [0, 120]

A server without the file runs under the built-in defaults
(:data:`DEFAULT_VERSION`). The controller attaches the policy of each named
dataset a request may use to the computation's bus message
(:meth:`Policy.message`); the job reads it with
:meth:`~fdrtd_server.microservice.CallContext.dataset_policy`.
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_VERSION",
    "POLICY_FILE",
    "DatasetPolicy",
    "Policy",
    "PolicyError",
    "PolicyStore",
    "Privacy",
]

POLICY_FILE = "policy.toml"
DEFAULT_VERSION = "default"
"""The version of the built-in policy, for a server without a policy file."""


class PolicyError(ValueError):
    """A policy file breaks a rule; the message names the file, the line and the rule."""


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
    """What one query spends unless the analyst asks for less."""
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
    max_concurrent: int = 4
    """Computations one analyst may run at once on this dataset."""
    job_timeout: float = 600.0
    """Seconds a whole computation on this dataset may take."""

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
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetPolicy:
        """Rebuild from :meth:`to_dict` (as the job gets it on the bus)."""
        privacy = Privacy(**dict(data.get("privacy") or {}))
        bounds = {str(k): (float(v[0]), float(v[1])) for k, v in (data.get("bounds") or {}).items()}
        return cls(
            functions=tuple(data.get("functions") or ("*",)),
            min_cohort=int(data.get("min_cohort", 3)),
            small_cell=int(data.get("small_cell", 3)),
            privacy=privacy,
            bounds=bounds,
            max_concurrent=int(data.get("max_concurrent", 4)),
            job_timeout=float(data.get("job_timeout", 600.0)),
        )


_PRIVACY_KEYS = {
    "dp": bool,
    "mechanism": str,
    "epsilon": float,
    "delta": float,
    "analyst_epsilon": float,
    "analyst_delta": float,
    "total_epsilon": float,
    "total_delta": float,
}
_DATASET_KEYS = {
    "functions": list,
    "min_cohort": int,
    "small_cell": int,
    "max_concurrent": int,
    "job_timeout": float,
}


def _typed(value: Any, wanted: type, where: str) -> Any:
    if wanted is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, wanted) or (wanted is not bool and isinstance(value, bool)):
        raise PolicyError(f"{where} must be a {wanted.__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise PolicyError(f"{where} must be a finite number")
    return value


def _dataset(table: Mapping[str, Any], base: DatasetPolicy, where: str) -> DatasetPolicy:
    values: dict[str, Any] = {}
    privacy = base.privacy.to_dict()
    bounds = dict(base.bounds)
    for key, value in table.items():
        if key in _DATASET_KEYS:
            values[key] = _typed(value, _DATASET_KEYS[key], f"{where} '{key}'")
        elif key == "privacy" and isinstance(value, dict):
            for pkey, pvalue in value.items():
                if pkey not in _PRIVACY_KEYS:
                    raise PolicyError(f"{where}.privacy: unknown key '{pkey}'")
                privacy[pkey] = _typed(pvalue, _PRIVACY_KEYS[pkey], f"{where}.privacy '{pkey}'")
        elif key == "bounds" and isinstance(value, dict):
            for column, pair in value.items():
                if (
                    not isinstance(pair, list)
                    or len(pair) != 2
                    or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in pair)
                    or not pair[0] < pair[1]
                ):
                    raise PolicyError(
                        f"{where}.bounds '{column}' must be [lower, upper] with lower < upper"
                    )
                bounds[str(column)] = (float(pair[0]), float(pair[1]))
        else:
            raise PolicyError(f"{where}: unknown key '{key}'")
    if "functions" in values:
        values["functions"] = tuple(str(f) for f in values["functions"])
    return DatasetPolicy(**{**_plain(base), **values}, privacy=Privacy(**privacy), bounds=bounds)


def _plain(policy: DatasetPolicy) -> dict[str, Any]:
    return {key: getattr(policy, key) for key in _DATASET_KEYS}


@dataclass(frozen=True)
class Policy:
    """A whole policy file: its version, the defaults and each dataset's own table."""

    version: str = DEFAULT_VERSION
    defaults: DatasetPolicy = field(default_factory=DatasetPolicy)
    datasets: Mapping[str, DatasetPolicy] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, source: str = POLICY_FILE) -> Policy:
        """Read a policy file's text.

        Raises:
            PolicyError: Naming ``source`` and what is wrong.
        """
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise PolicyError(f"{source}: not valid TOML: {error}") from None
        label = document.get("version")
        if not isinstance(label, str) or not label.strip():
            raise PolicyError(f"{source}: 'version' must be a non-empty string (the owner's label)")
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
        defaults = _dataset(
            document.get("defaults") or {}, DatasetPolicy(), f"{source}: [defaults]"
        )
        datasets = {
            str(name): _dataset(table, defaults, f"{source}: [datasets.{name}]")
            for name, table in (document.get("datasets") or {}).items()
        }
        for key in document:
            if key not in ("version", "defaults", "datasets"):
                raise PolicyError(f"{source}: unknown key '{key}'")
        return cls(version=f"{label.strip()}+{digest}", defaults=defaults, datasets=datasets)

    def of(self, name: str) -> DatasetPolicy:
        """The policy of the dataset ``name`` (the defaults if it has no table)."""
        return self.datasets.get(name, self.defaults)

    def message(self, names: Iterable[str]) -> dict[str, Any]:
        """What the computation's bus message carries: the version and each dataset's policy."""
        return {"version": self.version, "datasets": {n: self.of(n).to_dict() for n in names}}


class PolicyStore:
    """The policy file of a server home, read again when it changes (next request)."""

    def __init__(self, home: Path) -> None:
        self.path = home / POLICY_FILE
        self._stamp: tuple[int, int] | None = None
        self._policy = Policy()

    def current(self) -> Policy:
        """The policy in force now.

        Raises:
            PolicyError: If the file was changed into one that breaks a rule.
        """
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._policy = None, Policy()
            return self._policy
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._policy = Policy.parse(self.path.read_text("utf-8"), str(self.path))
            self._stamp = stamp
        return self._policy
