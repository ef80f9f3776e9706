"""The differential privacy budget of each named dataset: the ledger, and who must use DP.

The owner's policy (:mod:`fdrtd_server.policy`) says per named dataset whether
differential privacy applies (``privacy.dp``, true by default) and with which
budget: ``analyst_epsilon`` / ``analyst_delta`` for each analyst, and
``total_epsilon`` / ``total_delta`` for all of them together. This module

* refuses (403) a function that loads such a dataset without a differentially
  private release (:func:`terms_for`, called by
  :meth:`fdrtd_server.microservice.CallContext.load_dataset` before anything
  is read), and gives a function that has one the dataset's
  :class:`PrivateTerms`: the policy's privacy terms, the declared bounds of
  each column, and a way to spend from the budget;
* keeps what was spent in the ``fdrtd_budgets`` key-value bucket of this
  server's NATS (:class:`Ledger`): one entry per dataset name, with the total
  and each analyst's spend as exact fractions (``"1/3"``), so that it survives
  restarts, every worker process shares it, and three queries of 1/3 fit in a
  budget of 1.

A spend is a compare-and-set: read the entry and its revision, check both
caps, write the new entry *at that revision*, and start again if another
process wrote in between. Two concurrent queries can therefore never both
take the last of a budget. A spend is final: it happens right before the
noise is drawn, and nothing is given back, whether or not the computation
then succeeds (see ``docs/protocols.md``). What is refused before the spend
(the dataset's policy, a missing bound, a budget too small, bad inputs) costs
nothing.

The ledger is keyed by the dataset's name alone: a dataset withdrawn and
registered again under the same name keeps what was spent on it, so that
re-registering cannot reset a budget. Only the owner's policy (a larger cap)
gives more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

from fdrtd_client import wire
from fdrtd_server.errors import BadRequest, Forbidden, ServiceUnavailable
from fdrtd_server.policy import DatasetPolicy, Privacy

__all__ = [
    "DP_FUNCTIONS",
    "Budget",
    "KvStore",
    "Ledger",
    "MemoryStore",
    "PrivateTerms",
    "Spent",
    "Store",
    "StoreConflict",
    "caps",
    "exact",
    "show",
    "terms_for",
]

DP_FUNCTIONS = (
    "smpc.count",
    "smpc.secure_sum",
    "smpc.mean",
    "smpc.frequency_table",
    "smpc.histogram",
    "smpc.contingency_table",
    "smpc.linear_regression",
    "map.aggregate",
)
"""The built-in functions with a differentially private release (named in refusals)."""
_RETRIES = 64
"""Compare-and-set attempts before a spend gives up (each lost one means another won)."""


def exact(value: Any, what: str = "epsilon") -> Fraction:
    """A budget amount as an exact fraction: a float by its shortest decimal (0.1 is 1/10).

    Raises:
        BadRequest: If ``value`` is not a finite number of at least 0.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str | Fraction):
        raise BadRequest(f"'{what}' must be a number")
    try:
        number = Fraction(repr(value)) if isinstance(value, float) else Fraction(value)
    except (ValueError, ZeroDivisionError):
        raise BadRequest(f"'{what}' must be a finite number") from None
    if number < 0:
        raise BadRequest(f"'{what}' must not be negative")
    return number


def show(value: Fraction) -> float:
    """A fraction as a client is shown it (a float; the ledger keeps the exact value)."""
    return float(value)


@dataclass(frozen=True)
class Spent:
    """Epsilon and delta spent (or remaining), exactly."""

    epsilon: Fraction = Fraction(0)
    delta: Fraction = Fraction(0)

    def __add__(self, other: Spent) -> Spent:
        return Spent(self.epsilon + other.epsilon, self.delta + other.delta)

    def fits(self, cap: Spent) -> bool:
        """Whether this spend stays within ``cap`` in both epsilon and delta."""
        return self.epsilon <= cap.epsilon and self.delta <= cap.delta

    def left_of(self, cap: Spent) -> Spent:
        """What ``cap`` leaves after this spend (never below 0)."""
        zero = Fraction(0)
        return Spent(max(cap.epsilon - self.epsilon, zero), max(cap.delta - self.delta, zero))

    def to_dict(self) -> dict[str, str]:
        """Exact form for the ledger: ``{"epsilon": "1/3", "delta": "0"}``."""
        return {"epsilon": str(self.epsilon), "delta": str(self.delta)}

    def shown(self) -> dict[str, float]:
        """As a client is shown it."""
        return {"epsilon": show(self.epsilon), "delta": show(self.delta)}

    @classmethod
    def from_dict(cls, data: Any) -> Spent:
        """Read :meth:`to_dict` back; a malformed entry is refused, never read as nothing spent."""
        if not isinstance(data, Mapping):
            raise ServiceUnavailable("the privacy ledger holds a malformed entry")
        try:
            return cls(Fraction(str(data["epsilon"])), Fraction(str(data["delta"])))
        except (KeyError, ValueError, ZeroDivisionError):
            raise ServiceUnavailable("the privacy ledger holds a malformed entry") from None


def caps(privacy: Privacy) -> tuple[Spent, Spent]:
    """The per-analyst and the total cap of a dataset's privacy terms, exactly."""
    return (
        Spent(exact(privacy.analyst_epsilon), exact(privacy.analyst_delta, "delta")),
        Spent(exact(privacy.total_epsilon), exact(privacy.total_delta, "delta")),
    )


@dataclass(frozen=True)
class Budget:
    """What one analyst has spent of one dataset's budget, what all have, and what remains."""

    dataset: str
    analyst: Spent
    total: Spent
    analyst_cap: Spent
    total_cap: Spent
    analysts: Mapping[str, Spent] = field(default_factory=dict)

    @property
    def remaining(self) -> Spent:
        """What the analyst may still spend: the smaller of her remainder and the total's."""
        mine = self.analyst.left_of(self.analyst_cap)
        everyone = self.total.left_of(self.total_cap)
        return Spent(min(mine.epsilon, everyone.epsilon), min(mine.delta, everyone.delta))

    def own(self) -> dict[str, Any]:
        """As an analyst is shown it: her own spend, cap and what she may still spend.

        Never what the others spent, nor the total cap: her remainder is
        the smaller of her own and the total's (:attr:`remaining`), which is
        all the total tells her (a spend beyond it is refused anyway).
        """
        return {
            "spent": {"analyst": self.analyst.shown()},
            "remaining": {"analyst": self.remaining.shown()},
            "caps": {"analyst": self.analyst_cap.shown()},
        }

    def to_dict(self) -> dict[str, Any]:
        """As the dataset's owner is shown it: spent and remaining, per analyst and in total."""
        return {
            "spent": {"analyst": self.analyst.shown(), "total": self.total.shown()},
            "remaining": {
                "analyst": self.analyst.left_of(self.analyst_cap).shown(),
                "total": self.total.left_of(self.total_cap).shown(),
            },
            "caps": {"analyst": self.analyst_cap.shown(), "total": self.total_cap.shown()},
        }


class StoreConflict(Exception):
    """A compare-and-set write found another revision than the one it read."""


class Store(Protocol):
    """Where a :class:`Ledger` keeps its entries: a key-value map with revisions."""

    async def read(self, key: str) -> tuple[bytes, int] | None:
        """The value under ``key`` and its revision, or None."""

    async def write(self, key: str, value: bytes, revision: int | None) -> None:
        """Write ``value`` if ``key`` is still at ``revision`` (None: absent).

        Raises:
            StoreConflict: If it is not.
        """


class KvStore:
    """A :class:`Store` over a JetStream key-value bucket (the ``fdrtd_budgets`` bucket)."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    async def read(self, key: str) -> tuple[bytes, int] | None:
        """See :meth:`Store.read`."""
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return bytes(entry.value), int(entry.revision)

    async def write(self, key: str, value: bytes, revision: int | None) -> None:
        """See :meth:`Store.write`."""
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            if revision is None:
                await self.kv.create(key, value)
            else:
                await self.kv.update(key, value, last=revision)
        except KeyWrongLastSequenceError:  # another process wrote first
            raise StoreConflict(key) from None


class MemoryStore:
    """A :class:`Store` in memory (the testing kit's; one process only)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[bytes, int]] = {}
        self._revision = 0

    async def read(self, key: str) -> tuple[bytes, int] | None:
        """See :meth:`Store.read`."""
        return self.entries.get(key)

    async def write(self, key: str, value: bytes, revision: int | None) -> None:
        """See :meth:`Store.write`."""
        found = self.entries.get(key)
        if (found[1] if found else None) != revision:
            raise StoreConflict(key)
        self._revision += 1
        self.entries[key] = (value, self._revision)


class Ledger:
    """The spend of every named dataset of this server, per analyst and in total."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def _entry(self, dataset: str) -> tuple[dict[str, Any], int | None]:
        found = await self.store.read(dataset)
        if found is None:
            return {"total": Spent().to_dict(), "analysts": {}}, None
        entry = wire.unpackb(found[0])
        if not isinstance(entry, dict) or not isinstance(entry.get("analysts"), dict):
            raise ServiceUnavailable("the privacy ledger holds a malformed entry")
        return entry, found[1]

    async def budget(self, dataset: str, analyst: str, privacy: Privacy) -> Budget:
        """What ``analyst`` and everyone have spent of ``dataset``, and its caps."""
        entry, _ = await self._entry(dataset)
        return _budget(dataset, analyst, privacy, entry)

    async def spend(
        self, dataset: str, analyst: str, privacy: Privacy, wanted: Spent, *, needs: str = ""
    ) -> Budget:
        """Spend ``wanted`` from the analyst's and the total budget of ``dataset``, atomically.

        Args:
            dataset: The dataset's name.
            analyst: Who spends (the caller's token name).
            privacy: The dataset's privacy terms now (its caps).
            wanted: What the query spends.
            needs: What the query is, for the refusal ("'smpc.count'").

        Returns:
            The budget after the spend.

        Raises:
            Forbidden: If either cap would be exceeded; the detail names the
                dataset, what remains for the caller, and what the query needs.
            ServiceUnavailable: If the ledger cannot be written (contention).
        """
        for _ in range(_RETRIES):
            entry, revision = await self._entry(dataset)
            before = _budget(dataset, analyst, privacy, entry)
            mine, everyone = before.analyst + wanted, before.total + wanted
            if not (mine.fits(before.analyst_cap) and everyone.fits(before.total_cap)):
                raise Forbidden(_refusal(before, wanted, needs))
            analysts = dict(entry["analysts"])
            analysts[analyst] = mine.to_dict()
            new = {"total": everyone.to_dict(), "analysts": analysts}
            try:
                await self.store.write(dataset, wire.packb(new), revision)
            except StoreConflict:
                await asyncio.sleep(0)  # another spend won this round: read it and try again
                continue
            return _budget(dataset, analyst, privacy, new)
        raise ServiceUnavailable(
            f"the privacy budget of dataset '{dataset}' is being spent by many queries at "
            "once; try again"
        )


def _budget(dataset: str, analyst: str, privacy: Privacy, entry: Mapping[str, Any]) -> Budget:
    analyst_cap, total_cap = caps(privacy)
    analysts = {str(k): Spent.from_dict(v) for k, v in entry["analysts"].items()}
    return Budget(
        dataset,
        analysts.get(analyst, Spent()),
        Spent.from_dict(entry["total"]),
        analyst_cap,
        total_cap,
        analysts,
    )


def _refusal(before: Budget, wanted: Spent, needs: str) -> str:
    # what remains for the caller: the smaller of her own remainder and the total's
    # (never the others' spend as such)
    left = before.remaining
    query = f"this query{f' ({needs})' if needs else ''}"
    return (
        f"the privacy budget of dataset '{before.dataset}' does not allow {query}: it needs "
        f"epsilon {show(wanted.epsilon):g} and delta {show(wanted.delta):g}; what remains for "
        f"you is epsilon {show(left.epsilon):g} and delta {show(left.delta):g}; ask for a "
        "smaller 'epsilon', or ask the dataset's owner for a larger budget"
    )


@dataclass(frozen=True)
class PrivateTerms:
    """A named dataset's differential privacy terms, as a function with a DP release gets them.

    Attributes:
        dataset: The dataset's name.
        privacy: The owner's privacy terms (mechanism, per-query epsilon, caps).
        bounds: The owner's declared bounds per column (values are clamped to them).
        analyst: Who spends (the caller).
        spend_from: Spends from the ledger (see :meth:`spend`).
    """

    dataset: str
    privacy: Privacy
    bounds: Mapping[str, tuple[float, float]]
    analyst: str
    spend_from: Callable[[str, str, Privacy, Spent, str], Awaitable[Budget]]

    def bound(self, column: str, what: str) -> tuple[float, float]:
        """The declared bounds of ``column``.

        Raises:
            Forbidden: If the owner declared none (``what`` says what needs them).
        """
        found = self.bounds.get(column)
        if found is None:
            raise Forbidden(
                f"the column '{column}' of dataset '{self.dataset}' has no declared bounds, "
                f"which {what} under differential privacy needs; its owner can declare them "
                f"([datasets.{self.dataset}.bounds] {column} = [lower, upper])"
            )
        return found

    def wanted(self, epsilon: Any) -> Spent:
        """What a query spends: the analyst's ``epsilon`` (None: the policy's), and delta.

        Raises:
            BadRequest: If ``epsilon`` is not a positive number, or is below the
                owner's floor ``min_epsilon`` (at a tiny epsilon the noise is too
                wide for the 64-bit sampler, whose saturated draws would give the
                exact value away; a floor refuses it plainly, before the spend).
            Forbidden: If the policy asks for a mechanism this server does not
                have, or the Gaussian one without a per-query delta.
        """
        chosen = exact(self.privacy.epsilon if epsilon is None else epsilon)
        if chosen <= 0:
            raise BadRequest("'epsilon' must be greater than 0")
        floor = exact(self.privacy.min_epsilon, "min_epsilon")
        if chosen < floor:
            raise BadRequest(
                f"'epsilon' {show(chosen):g} is below the smallest epsilon the owner of dataset "
                f"'{self.dataset}' allows per query ({show(floor):g}, its 'min_epsilon'); ask "
                "for at least that"
            )
        mechanism = self.privacy.mechanism
        delta = exact(self.privacy.delta, "delta") if mechanism == "gaussian" else Fraction(0)
        if mechanism not in ("laplace", "gaussian") or (mechanism == "gaussian" and delta <= 0):
            raise Forbidden(
                f"the privacy terms of dataset '{self.dataset}' name the mechanism "
                f"'{mechanism[:32]}'{' with delta 0' if mechanism == 'gaussian' else ''}; its "
                "owner must choose 'laplace', or 'gaussian' with a delta above 0"
            )
        return Spent(chosen, delta)

    async def spend(self, wanted: Spent, needs: str) -> Budget:
        """Spend ``wanted`` from this dataset's budget for the caller (see :meth:`Ledger.spend`)."""
        return await self.spend_from(self.dataset, self.analyst, self.privacy, wanted, needs)


def terms_for(
    name: str,
    policy: DatasetPolicy,
    analyst: str,
    private: bool,
    ledger: Callable[[], Ledger],
) -> PrivateTerms | None:
    """The privacy terms of the named dataset ``name`` for a function, or None if it needs none.

    Args:
        name: The dataset's name.
        policy: The owner's policy for it.
        analyst: Who asks.
        private: Whether the function releases its result with differential
            privacy (``load_dataset(..., private=True)``).
        ledger: Gives this server's ledger (called only if the terms are needed).

    Raises:
        Forbidden: If the owner requires differential privacy and the function
            has none; nothing was read or spent.
    """
    if not policy.privacy.dp:
        return None
    if not private:
        raise Forbidden(
            f"the owner of dataset '{name}' requires differential privacy for it, which this "
            f"function does not offer; functions that do: {', '.join(DP_FUNCTIONS)}; the "
            f"owner can set dp = false in [datasets.{name}.privacy] of the policy file"
        )
    found = ledger()

    async def spend_from(
        dataset: str, who: str, privacy: Privacy, wanted: Spent, needs: str
    ) -> Budget:
        return await found.spend(dataset, who, privacy, wanted, needs=needs)

    return PrivateTerms(name, policy.privacy, dict(policy.bounds), analyst, spend_from)
