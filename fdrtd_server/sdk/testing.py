"""The testing kit: every party's real job function in one event loop, with in-memory peers.

A plugin's own tests run its multi-party protocol without servers, NATS or
HTTP: :class:`MemoryFederation` gives each party a :class:`MemoryContext`
(a real :class:`~fdrtd_server.microservice.JobContext` whose datasets are
in memory) and runs the job function of every party concurrently::

    from fdrtd_server.sdk.testing import MemoryFederation
    from vector_mean import service

    def test_mean() -> None:
        fed = MemoryFederation(
            ("alpha", "beta", "gamma"),
            datasets={"alpha": {"x": [[1, 2], [3, 4], [5, 6]]}, "beta": ..., "gamma": ...},
        )
        results = fed.run_sync(service, "mean", column="x")
        assert results["alpha"]["mean"] == ...

What is real: the job function, the server's check of the inputs against
the function's declaration (a refusal there ends the session for the other
parties, as the server's runner does), the
:class:`~fdrtd_server.microservice.Environment` and its policy
(``min_cohort`` 3 and the server's other defaults, unless ``env`` says
otherwise), and the wire codec: every peer message and every result is
packed and unpacked by :mod:`fdrtd_client.wire`, so what cannot travel
fails here too, and a received array is read-only as it is on a server.

What is in memory: the peers. The parties share a :class:`Wire` of
mailboxes, one per (receiver, sender, tag), and a :class:`MemoryPeerSession`
behaves as :class:`fdrtd_server.peers.PeerSession` does where a protocol can
see it:

* every receive has a deadline and raises
  :class:`~fdrtd_server.errors.PartyTimeout` naming the party and the tag;
* a party whose job fails inside ``async with session`` with an error the
  others cannot reach by themselves (one not marked ``collective``) ends
  the computation: the others' waiting receives fail at once with "party
  'x' ended the computation: ..." and the status of the first error (403
  and 504 are kept, anything else is 422);
* the last round (``end``) keeps a party's result only once every other
  party has its own;
* a session id is opened once per party; a second ``peer_session()``
  entered in the same run is a :class:`~fdrtd_server.errors.Conflict`;
* the pairwise seeds are derived from the session id and the pair (the
  same both ways, different in every run).

A protocol reaches its session through the SDK's ``session_for(ctx)``,
which calls :meth:`MemoryContext.peer_session` when the context has it: no
monkeypatching is needed.

For security tests the kit keeps what travelled: :attr:`MemoryFederation.log`
(every message as its sender sent it, with the ``end`` round), each party's
:attr:`MemoryPeerSession.received`, and a ``tamper`` hook that changes
messages on their way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import secrets
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

# The kit's only imports from the rest of fdrtd. It is part of the SDK, so it
# may use the server's own modules; none of these names is for plugins.
from fdrtd_client import wire
from fdrtd_server.errors import (
    BadRequest,
    CohortTooSmall,
    Conflict,
    FdrtdError,
    NotFound,
    PartyTimeout,
    error_for_status,
)
from fdrtd_server.microservice import Dataset, Environment, JobContext, Microservice, _wanted
from fdrtd_server.peers import ABORT_TAG, END_TAG
from fdrtd_server.policy import DatasetPolicy
from fdrtd_server.privacy import Ledger, MemoryStore, terms_for

__all__ = [
    "DATASET",
    "MemoryContext",
    "MemoryFederation",
    "MemoryPeerSession",
    "Sent",
    "Tamper",
    "Wire",
]

T = TypeVar("T")

DATASET = "data"
"""The name under which a party's dataset is known when it is given as bare columns."""
WAIT = 10.0
"""Seconds a receive waits by default; every message here arrives within milliseconds."""

Tamper = Callable[[str, str, str, Any], Any]
"""``(sender, receiver, tag, value) -> value``, applied to every message on the wire."""
Columns = Mapping[str, Any]
"""A dataset in memory: column name -> values (a list, a list of vectors, an array)."""


@dataclasses.dataclass(frozen=True)
class Sent:
    """One peer message as its sender sent it (before any tampering)."""

    sender: str
    to: str
    tag: str
    value: Any


class Wire:
    """What the parties of one computation share: mailboxes, a log, and the aborts.

    Args:
        tamper: Changes each message on its way (the log keeps the original).
        wait: Seconds a receive waits before :class:`PartyTimeout`.
    """

    def __init__(self, tamper: Tamper | None = None, wait: float = WAIT) -> None:
        self.boxes: defaultdict[tuple[str, str, str], asyncio.Queue[Any]] = defaultdict(
            asyncio.Queue
        )
        self.tamper = tamper
        self.wait = wait
        self.sent: list[Sent] = []
        self.aborted: dict[str, tuple[str, int]] = {}
        """Party -> (reason, status) of each party that ended the computation, in order."""
        self.opened: set[str] = set()
        """The parties that have opened their session of this computation."""
        self.changed = asyncio.Condition()

    async def deliver(self, sender: str, to: str, tag: str, value: Any) -> None:
        """Log the message, send it through the wire codec, and put it in the receiver's box.

        Raises:
            TypeError: If ``value`` is not plain data that can travel
                (:func:`fdrtd_client.wire.packb`).
        """
        packed = wire.packb(value)
        self.sent.append(Sent(sender, to, tag, value))
        received = wire.unpackb(packed)
        if self.tamper is not None:
            received = self.tamper(sender, to, tag, received)
        self.boxes[(to, sender, tag)].put_nowait(received)
        async with self.changed:
            self.changed.notify_all()

    async def abort(self, party: str, error: BaseException) -> None:
        """``party`` ends the computation because of ``error`` (as ``PeerSession`` tells it)."""
        reason = getattr(error, "message", None) or "internal error"
        status = getattr(error, "status", 422)
        # as PeerSession.deliver reads an abort: a policy refusal or a timeout
        # means the same for every party; anything else is the computation failing
        self.aborted.setdefault(party, (reason[:300], status if status in (403, 504) else 422))
        async with self.changed:
            self.changed.notify_all()

    def abort_seen_by(self, party: str) -> tuple[str, str, int] | None:
        """The first abort of a party other than ``party``: (who, reason, status)."""
        for other, (reason, status) in self.aborted.items():
            if other != party:
                return other, reason, status
        return None

    def seed(self, session: str, a: str, b: str) -> bytes:
        """The pairwise seed of ``a`` and ``b`` in ``session`` (the same both ways)."""
        return hashlib.sha256("|".join([session, *sorted((a, b))]).encode()).digest()


class MemoryPeerSession:
    """One party's end of a computation, in memory: what protocols use of a ``PeerSession``.

    Attributes:
        id: The session id (new in every run).
        me: This party.
        parties: Every party, in the order they all agree on.
        index: This party's place in :attr:`parties`.
        others: The other parties, in order.
        received: ``(sender, tag, value)`` of every message received, in order.
    """

    def __init__(self, wire: Wire, session_id: str, me: str, parties: Sequence[str]) -> None:
        if me not in parties:
            raise BadRequest(f"this server ('{me}') is not one of the session's parties")
        self.wire = wire
        self.id, self.me, self.parties = session_id, me, list(parties)
        self.index = self.parties.index(me)
        self.others = [p for p in self.parties if p != me]
        self.received: list[tuple[str, str, Any]] = []

    async def __aenter__(self) -> MemoryPeerSession:
        if self.me in self.wire.opened:
            raise Conflict(
                f"session '{self.id}' was already used on this server; "
                "start every computation with a new session id"
            )
        self.wire.opened.add(self.me)
        return self

    async def __aexit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        if error is None:
            try:
                # the last round: keep the result only once every other party has its own
                await self.broadcast(END_TAG, None)
                await self.gather(END_TAG)
            except Exception as failure:
                await self._abort(failure)
                raise
            return
        await self._abort(error)

    async def _abort(self, error: BaseException) -> None:
        """Tell the others, unless they reach ``error`` by themselves or one has aborted."""
        if (
            isinstance(error, Exception)
            and not getattr(error, "collective", False)
            and self.wire.abort_seen_by(self.me) is None
        ):
            await self.wire.abort(self.me, error)

    async def pair_seeds(self) -> dict[str, bytes]:
        """A 32-byte seed shared with each other party, new in every session."""
        return {party: self.wire.seed(self.id, self.me, party) for party in self.others}

    async def send(self, to: str, tag: str, value: Any, *, timeout: float | None = None) -> None:
        """Send ``value`` to party ``to`` under ``tag``."""
        if to not in self.others:
            raise BadRequest(f"'{to}' is not another party of this session")
        if tag in (ABORT_TAG,):
            raise ValueError(f"the tag '{tag}' is reserved for the session itself")
        await self.wire.deliver(self.me, to, tag, value)

    async def broadcast(self, tag: str, value: Any, to: Iterable[str] | None = None) -> None:
        """Send ``value`` to every other party (or those in ``to``)."""
        for party in self.others if to is None else to:
            await self.send(party, tag, value)

    async def recv(self, sender: str, tag: str, *, patience: float = 1.0) -> Any:
        """The message ``sender`` sent under ``tag``; waits up to ``patience`` deadlines.

        Raises:
            PartyTimeout: If it does not arrive in time.
            FdrtdError: "party 'x' ended the computation: ...", if a party aborted.
        """
        box = self.wire.boxes[(self.me, sender, tag)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wire.wait * patience
        async with self.wire.changed:
            while True:
                # a message that arrived before an abort is still delivered
                if not box.empty():
                    value = box.get_nowait()
                    self.received.append((sender, tag, value))
                    return value
                aborted = self.wire.abort_seen_by(self.me)
                if aborted is not None:
                    party, reason, status = aborted
                    raise error_for_status(
                        status, f"party '{party}' ended the computation: {reason}"
                    )
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise PartyTimeout(
                        f"party '{sender}' did not send its '{tag}' message within "
                        f"{self.wire.wait * patience:g} s"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wire.changed.wait(), remaining)

    async def gather(self, tag: str, senders: Iterable[str] | None = None) -> dict[str, Any]:
        """The message under ``tag`` from each of ``senders`` (every other party by default)."""
        # one sender after another, so that the received log has a fixed order
        return {sender: await self.recv(sender, tag) for sender in senders or self.others}

    async def exchange(self, tag: str, value: Any) -> dict[str, Any]:
        """Send ``value`` to every other party and receive theirs; every party's, by name."""
        await self.broadcast(tag, value)
        received = await self.gather(tag)
        return {party: value if party == self.me else received[party] for party in self.parties}


@dataclasses.dataclass
class MemoryContext(JobContext):
    """A :class:`JobContext` whose datasets are in memory and whose peers are a :class:`Wire`.

    Attributes:
        tables: This party's datasets, by name: column name -> numpy array.
        wire: The computation's wire, shared with the other parties.
        reported: Every progress fraction the job reported, in order.
        sessions: The peer sessions it opened (their ``received`` messages).
    """

    tables: dict[str, dict[str, np.ndarray[Any, Any]]] = dataclasses.field(default_factory=dict)
    wire: Wire = dataclasses.field(default_factory=Wire)
    reported: list[float] = dataclasses.field(default_factory=list)
    sessions: list[MemoryPeerSession] = dataclasses.field(default_factory=list)
    ledger: Ledger = dataclasses.field(default_factory=lambda: Ledger(MemoryStore()))
    """This party's privacy budget ledger, in memory."""

    def budget_ledger(self) -> Ledger:
        """This party's privacy budget ledger (:attr:`ledger`)."""
        return self.ledger

    def peer_session(self) -> MemoryPeerSession:
        """This party's session of the computation (the SDK's ``session_for`` calls this)."""
        if not self.session:
            raise BadRequest(
                "this is a multi-party protocol: give a 'session' with an 'id' and the 'parties'"
            )
        opened = MemoryPeerSession(
            self.wire, self.session["id"], self.env.server, self.session["parties"]
        )
        self.sessions.append(opened)
        return opened

    async def load_dataset(
        self,
        ref: Any,
        field_name: str = "data",
        columns: Iterable[Any] | None = None,
        *,
        pushdown: bool = False,
        private: bool = False,
    ) -> Dataset:
        """A dataset of this party, by name, as the server would load an upload.

        ``pushdown`` is ignored (as it is for an upload): the columns are in memory.
        A dataset with a policy (``MemoryFederation(policies=...)``) is a named
        dataset under its owner's policy, as on a server (differential privacy,
        ``private``); one without is treated as the caller's own upload.

        Raises:
            NotFound: If this party has no dataset of that name.
            BadRequest: If ``ref`` is no name, or a column asked for is missing.
        """
        if not isinstance(ref, str):
            raise BadRequest(
                f"'{field_name}' must be a dataset name from the catalogue, or a data handle "
                "as returned by the server"
            )
        table = self.tables.get(ref)
        if table is None:
            raise NotFound(f"no dataset named '{ref}' on this server")
        terms = None
        if ref in self.policies:
            policy = self.dataset_policy(ref)
            terms = terms_for(ref, policy, self.principal, private, self.budget_ledger)
            self.provenance.named(ref, exact=terms is None, analyst_inputs=policy.analyst_inputs)
        else:
            self.provenance.upload()
        wanted = _wanted(columns)
        if wanted is not None and not all(name in table for name in wanted):
            raise BadRequest("the dataset has no column of that name")
        if wanted is not None and not wanted:
            first = next(iter(table.values()), np.empty(0))
            return Dataset({}, count=int(first.shape[0]) if first.ndim else 1, privacy=terms)
        chosen = table if wanted is None else {name: table[name] for name in wanted}
        return Dataset(dict(chosen), privacy=terms)

    async def progress(self, fraction: float) -> None:
        """Record the progress (0 to 1) in :attr:`reported`."""
        self.reported.append(max(0.0, min(1.0, float(fraction))))

    def check_cohort(self, rows: int) -> None:
        """Refuse results that describe fewer records than this party's minimum cohort."""
        if rows < self.env.min_cohort:
            raise CohortTooSmall(self.env.min_cohort)


JobFunction = Callable[[JobContext, dict[str, Any]], Awaitable[Any]]


class MemoryFederation:
    """Several parties in one event loop, each running its own real job function.

    Args:
        parties: The parties' server names, in the session's order.
        env: :class:`~fdrtd_server.microservice.Environment` fields for every
            party (``min_cohort``, ``allow_*`` switches...); the server's
            defaults otherwise.
        envs: Environment fields for single parties, over ``env``.
        datasets: Each party's data: its columns (then named :data:`DATASET`,
            ``"data"``), or a mapping of dataset names to columns. A column is
            anything ``numpy.asarray`` takes: a list of numbers, of vectors
            (rows of a 2-D column), of strings.
        timeout: Seconds each receive waits before :class:`PartyTimeout`.
        tamper: Changes every message on its way (see :data:`Tamper`).
        principal: Who asks, as ``ctx.principal`` (role ``analyst``).
        policies: Each party's owner policy per dataset name (a
            :class:`~fdrtd_server.policy.DatasetPolicy`): that dataset is then a
            named one under it (differential privacy by default, with a budget
            in the party's in-memory ledger, kept across runs). A dataset
            without one is the caller's own upload.

    Attributes:
        log: The messages of the last run, as their senders sent them.
        contexts: Each party's context of the last run (its sessions,
            ``received`` messages and ``reported`` progress).
    """

    def __init__(
        self,
        parties: Sequence[str] = ("alpha", "beta", "gamma"),
        *,
        env: Mapping[str, Any] | None = None,
        envs: Mapping[str, Mapping[str, Any]] | None = None,
        datasets: Mapping[str, Mapping[str, Any]] | None = None,
        timeout: float = WAIT,
        tamper: Tamper | None = None,
        principal: str = "analyst",
        policies: Mapping[str, Mapping[str, DatasetPolicy]] | None = None,
    ) -> None:
        self.parties = list(parties)
        if len(set(self.parties)) != len(self.parties) or len(self.parties) < 2:
            raise ValueError("a federation needs at least two parties, each named once")
        named = set(envs or {}) | set(datasets or {}) | set(policies or {})
        unknown = sorted(named - set(self.parties))
        if unknown:
            raise ValueError(f"no party named {', '.join(unknown)} in this federation")
        self.envs = {
            party: {**(env or {}), **(envs or {}).get(party, {})} for party in self.parties
        }
        for party, fields in self.envs.items():
            Environment(**{"server": party, **fields})  # a misspelt field fails here, at once
        self.tables = {party: _tables((datasets or {}).get(party, {})) for party in self.parties}
        self.timeout = timeout
        self.tamper = tamper
        self.principal = principal
        self.policies = {
            party: {name: p.to_dict() for name, p in (policies or {}).get(party, {}).items()}
            for party in self.parties
        }
        self.ledgers = {party: Ledger(MemoryStore()) for party in self.parties}
        self.log: list[Sent] = []
        self.contexts: dict[str, MemoryContext] = {}

    def _contexts(self) -> dict[str, MemoryContext]:
        """A fresh context for every party, sharing a fresh wire and session id."""
        shared = Wire(self.tamper, self.timeout)
        session = {"id": secrets.token_hex(16), "parties": list(self.parties)}
        self.log = shared.sent
        self.contexts = {
            party: MemoryContext(
                None,  # type: ignore[arg-type]  # no bus: nothing here may use one
                Environment(**{"server": party, **self.envs[party]}),
                self.principal,
                "analyst",
                dict(session),
                policies=self.policies[party],
                tables=self.tables[party],
                wire=shared,
                ledger=self.ledgers[party],
            )
            for party in self.parties
        }
        return self.contexts

    async def each(
        self, one: Callable[[MemoryContext], Awaitable[T]]
    ) -> dict[str, T | BaseException]:
        """Run ``one(ctx)`` for every party concurrently, each in a task named after it.

        The lowest level of the kit, for a test of a protocol step rather than
        a whole job: ``one`` may open ``session_for(ctx)`` and run an
        ``SmpcSession`` on it.

        Returns:
            Each party's outcome: its value, or the exception it raised.
        """
        contexts = self._contexts()
        tasks = [asyncio.create_task(_awaited(one(contexts[p])), name=p) for p in self.parties]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        return dict(zip(self.parties, outcomes, strict=True))

    async def outcomes(
        self,
        target: Microservice | JobFunction,
        function: str | None = None,
        inputs: Mapping[str, Mapping[str, Any]] | None = None,
        **common: Any,
    ) -> dict[str, Any]:
        """Run a job at every party, as :meth:`run` does; return each party's outcome.

        Returns:
            Each party's result (packed and unpacked as a client receives
            it), or the exception it raised.
        """
        job, where, declared = _resolve(target, function)
        by_party = inputs or {}
        unknown = sorted(set(by_party) - set(self.parties))
        if unknown:
            raise ValueError(f"no party named {', '.join(unknown)} in this federation")

        async def one(ctx: MemoryContext) -> Any:
            party = ctx.env.server
            given = {**common, **by_party.get(party, {})}
            if "data" not in given and len(ctx.tables) == 1 and "data" in declared:
                given["data"] = next(iter(ctx.tables))
            if isinstance(target, Microservice):  # its declaration is checked first
                _own_switches(ctx, target)
                signature = target.signatures[str(function)]
                try:
                    given = signature.validate(given, where)
                except FdrtdError as error:
                    # as the server's runner does: the others hear of the refusal at once
                    if signature.multiparty:
                        await ctx.wire.abort(party, error)
                    raise
            result = await job(ctx, given)
            return wire.unpackb(wire.packb(result))

        return await self.each(one)

    async def run(
        self,
        target: Microservice | JobFunction,
        function: str | None = None,
        inputs: Mapping[str, Mapping[str, Any]] | None = None,
        **common: Any,
    ) -> dict[str, Any]:
        """Run a job at every party and return every party's result.

        Args:
            target: A :class:`Microservice` (then ``function`` names one of its
                jobs, and each party's inputs are checked against its
                declaration first, as the server does), or a job function
                ``(ctx, inputs) -> result`` (called as it is).
            function: The job's name, for a microservice.
            inputs: Each party's own inputs, by party.
            common: Inputs every party gives (a party's own win). A party with
                one dataset whose inputs name none gets it as ``data``, if the
                function takes a ``data`` input.

        Returns:
            Each party's result, packed and unpacked as a client receives it.

        Raises:
            Exception: The error of the party that ended the computation
                first; if none did (a refusal every party reached alike), the
                first party's error in the session's order.
        """
        found = await self.outcomes(target, function, inputs, **common)
        failed = {p: o for p, o in found.items() if isinstance(o, BaseException)}
        if failed:
            first = next((p for p in self.aborted() if p in failed), next(iter(failed)))
            raise failed[first]
        return found

    def run_sync(
        self,
        target: Microservice | JobFunction,
        function: str | None = None,
        inputs: Mapping[str, Mapping[str, Any]] | None = None,
        **common: Any,
    ) -> dict[str, Any]:
        """:meth:`run` in an event loop of its own, for a test that is not async."""
        return asyncio.run(self.run(target, function, inputs, **common))

    def aborted(self) -> list[str]:
        """The parties that ended the last run's computation, first first."""
        contexts = list(self.contexts.values())
        return list(contexts[0].wire.aborted) if contexts else []

    def tags(self, sender: str | None = None) -> list[str]:
        """The tags of the last run's messages (of ``sender``'s only, if given), in order."""
        return [m.tag for m in self.log if sender is None or m.sender == sender]


async def _awaited(value: Awaitable[T]) -> T:
    return await value


def _own_switches(ctx: MemoryContext, service: Microservice) -> None:
    """Give ``ctx`` the microservice's own policy switches as this party's owner set them.

    As the server's runner does: ``env.plugin_policy[<microservice>]`` (the
    ``[policy.<microservice>]`` table; pass it in ``env``/``envs``), else
    each switch's default. A switch set but not declared is a ``ValueError``.
    """
    owner = ctx.env.plugin_policy.get(service.name)
    ctx.microservice = service.name
    ctx.switches = service.switch_values(owner)


def _tables(given: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray[Any, Any]]]:
    """A party's datasets by name: bare columns are the dataset :data:`DATASET`."""
    named = given if given and all(isinstance(v, Mapping) for v in given.values()) else None
    datasets = named if named is not None else ({DATASET: given} if given else {})
    tables: dict[str, dict[str, np.ndarray[Any, Any]]] = {}
    for name, columns in datasets.items():
        table = {str(column): np.asarray(values) for column, values in columns.items()}
        lengths = {array.shape[0] if array.ndim else 1 for array in table.values()}
        if len(lengths) > 1:
            raise ValueError(f"the columns of dataset '{name}' differ in length")
        tables[str(name)] = table
    return tables


def _resolve(
    target: Microservice | JobFunction, function: str | None
) -> tuple[JobFunction, str, set[str]]:
    """The job function to run, its name for messages, and its declared input names."""
    if not isinstance(target, Microservice):
        return target, getattr(target, "__name__", "job"), {"data"}
    if function not in target.jobs:
        raise ValueError(
            f"'{target.name}' has no job '{function}'; its jobs are {', '.join(target.jobs)}"
        )
    signature = target.signatures[function]
    declared = {item.name for item in signature.inputs or ()} if signature.inputs else {"data"}
    return target.jobs[function], f"'{target.name}.{function}'", declared
