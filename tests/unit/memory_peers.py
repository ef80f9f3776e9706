"""An in-memory stand-in for a PeerSession, to run the real SMPC engine for every party.

The parties run in one event loop and talk through queues; each keeps every
message it receives, so that a test can count the rounds and take a party's
place to see what its view gives away.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from protocols.smpc.engine import SmpcSession

SESSION = "00112233445566778899aabbccddeeff"


class Peers:
    """What the engine uses of a PeerSession, in memory; it keeps what it receives."""

    def __init__(self, boxes: defaultdict[Any, asyncio.Queue[Any]], me: str, parties: list[str]):
        self.boxes, self.me, self.parties, self.id = boxes, me, parties, SESSION
        self.others = [p for p in parties if p != me]
        self.received: list[tuple[str, str, Any]] = []

    async def pair_seeds(self) -> dict[str, bytes]:
        return {party: seed(self.me, party) for party in self.others}

    async def broadcast(self, tag: str, value: Any, to: list[str] | None = None) -> None:
        for party in self.others if to is None else to:
            self.boxes[(party, self.me, tag)].put_nowait(value)

    async def recv(self, sender: str, tag: str) -> Any:
        value = await asyncio.wait_for(self.boxes[(self.me, sender, tag)].get(), 10)
        self.received.append((sender, tag, value))
        return value

    async def send(self, to: str, tag: str, value: Any) -> None:
        await self.broadcast(tag, value, [to])

    async def gather(self, tag: str, senders: list[str] | None = None) -> dict[str, Any]:
        return {sender: await self.recv(sender, tag) for sender in senders or self.others}

    async def exchange(self, tag: str, value: Any) -> dict[str, Any]:
        await self.broadcast(tag, value)
        received = {party: await self.recv(party, tag) for party in self.others}
        return {party: value if party == self.me else received[party] for party in self.parties}


def seed(a: str, b: str) -> bytes:
    return hashlib.sha256("|".join(sorted((a, b))).encode()).digest()


Step = Callable[[SmpcSession, str], Awaitable[Any]]


def run_parties(parties: list[str], step: Step) -> tuple[dict[str, Any], dict[str, Peers]]:
    """Run ``step`` for every party on the real engine (after a deferred setup).

    Returns each party's outcome (its value or the exception) and its view.
    """
    boxes: defaultdict[Any, asyncio.Queue[Any]] = defaultdict(asyncio.Queue)
    peers = {name: Peers(boxes, name, parties) for name in parties}

    async def one(name: str) -> Any:
        smpc = SmpcSession(peers[name])  # type: ignore[arg-type]
        await smpc.setup({"party": name}, defer=True)
        return await step(smpc, name)

    async def main() -> list[Any]:
        done: list[Any] = await asyncio.gather(
            *(one(name) for name in parties), return_exceptions=True
        )
        return done

    outcomes = asyncio.run(main())
    return dict(zip(parties, outcomes, strict=True)), peers
