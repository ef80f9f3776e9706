"""An in-memory stand-in for a PeerSession and a JobContext, to run every party's real code.

The parties run in one event loop and talk through a :class:`Wire`: one
queue per (receiver, sender, tag), a log of everything sent, an optional
hook that can change a message on its way, and the aborts of failed
parties. Each party's :class:`Peers` keeps every message it receives, so
that a test can count the rounds, check what was opened to whom, and take
a party's place to see what its view gives away.

Three ways in, from the engine up to a whole job:

- :func:`run_tasks` runs one coroutine per party, in a task named after it;
- :func:`run_parties` runs a step on the real :class:`SmpcSession` of every party;
- :func:`run_job` runs a microservice job function at every party, each with
  its own :class:`Context`. The protocol module's ``session_for`` (or psi's
  ``_session``) must return ``ctx.peers``; the test module patches that.

As the real :class:`fdrtd_server.peers.PeerSession` does, a party whose job
fails inside ``async with session`` with an error the others cannot reach by
themselves (not ``collective``) ends the computation: the others' waiting
receives fail with "party 'x' ended the computation: ...". Every receive has
a deadline and raises :class:`PartyTimeout` when it passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, MutableMapping
from typing import Any

import msgpack
import numpy as np
from nats.js.errors import KeyWrongLastSequenceError

from fdrtd_server.errors import PartyTimeout, error_for_status
from fdrtd_server.microservice import Dataset, Environment
from fdrtd_server.provenance import Provenance
from fdrtd_server.sdk.smpc import SmpcSession


class MemorySessions:
    """The ``fdrtd_sessions`` bucket in memory: ``create`` takes a NATS round trip and
    refuses an existing key, as JetStream does; ``put`` overwrites."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.records: dict[str, Any] = {}

    async def create(self, key: str, value: bytes) -> None:
        await asyncio.sleep(0.01)  # a NATS round trip
        if key in self.keys:
            raise KeyWrongLastSequenceError()
        self.keys.add(key)
        self.records[key] = msgpack.unpackb(value)

    async def put(self, key: str, value: bytes) -> None:
        self.records[key] = msgpack.unpackb(value)


class MemoryNats:
    """A NATS connection that accepts subscriptions and delivers nothing."""

    async def subscribe(self, *args: Any, **kwargs: Any) -> object:
        return object()


class MemoryBus:
    """What :class:`fdrtd_server.peers.PeerSession` and ``PeerInbox`` use of a bus."""

    def __init__(self) -> None:
        self.sessions = MemorySessions()
        self.nc = MemoryNats()


SESSION = "00112233445566778899aabbccddeeff"
WAIT = 10.0
"""Seconds a receive waits; every message here arrives within milliseconds."""

Boxes = MutableMapping[tuple[str, str, str], asyncio.Queue[Any]]
"""Mailboxes by (receiver, sender, tag)."""
Tamper = Callable[[str, str, str, Any], Any]
"""``(sender, receiver, tag, value) -> value`` applied to every message on the wire."""


@dataclasses.dataclass(frozen=True)
class Sent:
    """One message as its sender sent it (before any tampering)."""

    sender: str
    to: str
    tag: str
    value: Any


class Wire:
    """What the parties of one computation share: mailboxes, a log, and the aborts.

    Args:
        tamper: Changes each message on its way (the log keeps the original).
        boxes: Mailboxes to use, for a test that puts messages in by hand.
        wait: Seconds a receive waits before :class:`PartyTimeout`.
    """

    def __init__(
        self, tamper: Tamper | None = None, boxes: Boxes | None = None, wait: float = WAIT
    ) -> None:
        self.boxes: Boxes = defaultdict(asyncio.Queue) if boxes is None else boxes
        self.tamper = tamper
        self.wait = wait
        self.sent: list[Sent] = []
        self.aborted: dict[str, tuple[str, int]] = {}
        """Party -> (reason, status) of each party that ended the computation."""
        self.changed = asyncio.Condition()

    async def deliver(self, sender: str, to: str, tag: str, value: Any) -> None:
        """Log the message, tamper with it if asked, and put it in the receiver's box."""
        self.sent.append(Sent(sender, to, tag, value))
        if self.tamper is not None:
            value = self.tamper(sender, to, tag, value)
        self.boxes[(to, sender, tag)].put_nowait(value)
        async with self.changed:
            self.changed.notify_all()

    async def abort(self, party: str, error: BaseException) -> None:
        """``party`` ends the computation because of ``error``."""
        # the reason and status as PeerSession sends them in __aexit__ and reads them in deliver
        reason = getattr(error, "message", None) or "internal error"
        status = getattr(error, "status", 422)
        self.aborted[party] = (reason[:300], status if status in (403, 504) else 422)
        async with self.changed:
            self.changed.notify_all()

    def abort_seen_by(self, party: str) -> tuple[str, str, int] | None:
        """The first abort of a party other than ``party``: (who, reason, status)."""
        for other, (reason, status) in self.aborted.items():
            if other != party:
                return other, reason, status
        return None


class Peers:
    """Everything the protocols use of a PeerSession, in memory; it keeps what it receives.

    Args:
        wire: Shared by the parties; or bare mailboxes, for a test that puts
            the other parties' messages in by hand.
        me: This party.
        parties: Every party, in the order they all agree on.
    """

    def __init__(self, wire: Wire | Boxes, me: str, parties: list[str]) -> None:
        self.wire = wire if isinstance(wire, Wire) else Wire(boxes=wire)
        self.id, self.me, self.parties = SESSION, me, list(parties)
        self.index = self.parties.index(me)
        self.others = [p for p in self.parties if p != me]
        self.received: list[tuple[str, str, Any]] = []
        """(sender, tag, value) of every message received, in order."""

    async def __aenter__(self) -> Peers:
        return self

    async def __aexit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        # as the real session: an error only this party has ends the others too
        if (
            isinstance(error, Exception)
            and not getattr(error, "collective", False)
            and self.wire.abort_seen_by(self.me) is None
        ):
            await self.wire.abort(self.me, error)

    async def pair_seeds(self) -> dict[str, bytes]:
        return {party: seed(self.me, party) for party in self.others}

    async def send(self, to: str, tag: str, value: Any, *, timeout: float | None = None) -> None:
        await self.wire.deliver(self.me, to, tag, value)

    async def broadcast(self, tag: str, value: Any, to: Iterable[str] | None = None) -> None:
        for party in self.others if to is None else to:
            await self.send(party, tag, value)

    async def recv(self, sender: str, tag: str, *, patience: float = 1.0) -> Any:
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
                        f"{self.wire.wait:g} s"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wire.changed.wait(), remaining)

    async def gather(self, tag: str, senders: Iterable[str] | None = None) -> dict[str, Any]:
        # one sender after another, so that the received log has a fixed order
        return {sender: await self.recv(sender, tag) for sender in senders or self.others}

    async def exchange(self, tag: str, value: Any) -> dict[str, Any]:
        await self.broadcast(tag, value)
        received = await self.gather(tag)
        return {party: value if party == self.me else received[party] for party in self.parties}


def seed(a: str, b: str) -> bytes:
    """The pairwise seed of ``a`` and ``b`` (the same both ways)."""
    return hashlib.sha256("|".join(sorted((a, b))).encode()).digest()


class Context:
    """What the job functions use of a JobContext; ``data`` inputs are dicts of columns.

    The environment is a real :class:`Environment` for server ``name`` with
    every policy switch (``allow_*``) on; ``env`` overrides any field.
    """

    def __init__(self, name: str, parties: list[str], wire: Wire | None = None, **env: Any):
        switches = {
            f.name: True for f in dataclasses.fields(Environment) if f.name.startswith("allow_")
        }
        self.env = Environment(**{"server": name, **switches, **env})
        self.peers = Peers(Wire() if wire is None else wire, name, parties)
        self.session = {"id": self.peers.id, "parties": self.peers.parties}
        self.provenance = Provenance()

    async def load_dataset(
        self,
        handle: Any,
        field_name: str = "data",
        columns: Any = None,
        *,
        pushdown: bool = False,
        private: bool = False,
    ) -> Dataset:
        # the caller's own data: no differential privacy, whatever ``private`` says
        self.provenance.upload()
        return Dataset({key: np.asarray(column) for key, column in handle.items()})

    async def progress(self, fraction: float) -> None:
        pass


Job = Coroutine[Any, Any, Any]


def run_tasks(parties: Iterable[str], one: Callable[[str], Job]) -> dict[str, Any]:
    """Run ``one(party)`` for every party, each in a task named after it.

    Returns each party's outcome: its value, or the exception it raised.
    """
    names = list(parties)

    async def main() -> list[Any]:
        tasks = [asyncio.create_task(one(name), name=name) for name in names]
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    return dict(zip(names, asyncio.run(main()), strict=True))


Step = Callable[[SmpcSession, str], Awaitable[Any]]


def run_parties(parties: list[str], step: Step) -> tuple[dict[str, Any], dict[str, Peers]]:
    """Run ``step`` for every party on the real engine (after a deferred setup).

    Returns each party's outcome (its value or the exception) and its view.
    """
    wire = Wire()
    peers = {name: Peers(wire, name, parties) for name in parties}

    async def one(name: str) -> Any:
        smpc = SmpcSession(peers[name])  # type: ignore[arg-type]
        await smpc.setup({"party": name}, defer=True)
        return await step(smpc, name)

    return run_tasks(parties, one), peers


def run_job(
    function: Callable[..., Job],
    inputs: Mapping[str, Mapping[str, Any]],
    *,
    min_cohort: int | Mapping[str, int] = 3,
    env: Mapping[str, Any] | None = None,
    envs: Mapping[str, Mapping[str, Any]] | None = None,
    tamper: Tamper | None = None,
    **common: Any,
) -> tuple[dict[str, Any], dict[str, Peers]]:
    """Run the job ``function`` at every party of ``inputs``.

    Args:
        function: A job function, ``(ctx, inputs) -> result``.
        inputs: Each party's own inputs (``data`` a dict of columns).
        min_cohort: Every party's minimum cohort, or each one's.
        env: Environment fields for every party.
        envs: Environment fields for some parties (over ``env``).
        tamper: Changes messages on the wire.
        common: Inputs every party gives (under its own).

    Returns:
        Each party's outcome (its result or the exception) and its view.
    """
    parties = list(inputs)
    wire = Wire(tamper)
    cohorts = min_cohort if isinstance(min_cohort, Mapping) else dict.fromkeys(parties, min_cohort)
    fields = {
        name: {"min_cohort": cohorts[name], **(env or {}), **(envs or {}).get(name, {})}
        for name in parties
    }
    contexts = {name: Context(name, parties, wire, **fields[name]) for name in parties}

    def one(name: str) -> Job:
        return function(contexts[name], {**common, **inputs[name]})

    return run_tasks(parties, one), {name: ctx.peers for name, ctx in contexts.items()}
