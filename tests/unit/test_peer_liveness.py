"""Sessions between real :class:`PeerSession` objects: heartbeats, the last round, records.

Every party has its own inbox and its own (in-memory) bucket of session
records; a :class:`_Link` stands in for the gateways and carries messages
between the parties' inboxes, as the real gateways hand them on, and can
lose a message after "accepting" it (a message that a receiving server took
and then lost), or stop carrying a party's messages (a party that died).

What is tried here:

* a party busy for several session timeouts is waited for, because its
  heartbeats say it is alive; a party that is gone is named within the
  timeout all the same;
* a message lost in a one-round computation fails it on every party: no
  party keeps a result that another failed to compute (issue 11, item 6);
* a session's record names the process that runs it, and says when it has
  ended; another process's inbox then drops that session's messages instead
  of holding them (issue 11, item 1);
* a replay of many recorded messages cannot push out what the sender sends
  now (issue 11, item 2).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import msgpack
import pytest
from memory_peers import MemoryBus

from fdrtd_server import peers
from fdrtd_server.errors import ComputationFailed, PartyTimeout
from fdrtd_server.peers import Incoming, PeerInbox, PeerSession, session_record

PARTIES = ["a", "b", "c"]


_Bus = MemoryBus


Drop = Callable[[str, str, str], bool]
"""``(sender, receiver, tag) -> True`` to lose that message after accepting it."""


class _Link:
    """The gateways of all parties: seal nothing, hand every message to its receiver's inbox."""

    def __init__(self, inboxes: dict[str, PeerInbox]) -> None:
        self.inboxes = inboxes
        self.drop: Drop = lambda sender, to, tag: False
        self.dead: set[str] = set()
        self.sent: list[tuple[str, str, str]] = []

    def for_party(self, me: str) -> peers.GatewayLink:
        link = self

        class _Gateway:
            async def outgoing(self, request: dict[str, Any]) -> dict[str, Any]:
                to, tag = request["to"], request["tag"]
                if me in link.dead:
                    await asyncio.sleep(3600)  # a dead party sends nothing
                link.sent.append((me, to, tag))
                if to in link.dead:
                    return {"status": 503, "detail": f"cannot reach party '{to}'"}
                if not link.drop(me, to, tag):
                    message = Incoming(
                        request["session"], me, tag, request["seq"], request["payload"], time.time()
                    )
                    await link.inboxes[to].route(message)
                return {"status": 202, "detail": ""}

            def seeds(self, request: dict[str, Any]) -> dict[str, Any]:
                raise AssertionError("not used here")

        return _Gateway()


async def _parties(timeout: float) -> tuple[_Link, dict[str, _Bus]]:
    buses = {name: _Bus() for name in PARTIES}
    inboxes = {name: await PeerInbox.of(bus) for name, bus in buses.items()}  # type: ignore[arg-type]
    link = _Link(inboxes)
    for name, inbox in inboxes.items():
        inbox.gateway = link.for_party(name)
    return link, buses


Step = Callable[[PeerSession], Coroutine[Any, Any, Any]]


async def _run(
    buses: dict[str, _Bus], steps: dict[str, Step], session_id: str, timeout: float
) -> dict[str, Any]:
    async def one(name: str) -> Any:
        session = PeerSession(buses[name], session_id, PARTIES, name, timeout)  # type: ignore[arg-type]
        async with session:
            return await steps[name](session)

    names = list(steps)
    outcomes = await asyncio.gather(*(one(name) for name in names), return_exceptions=True)
    return dict(zip(names, outcomes, strict=True))


def test_a_busy_party_is_waited_for_and_a_dead_one_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """c computes for four session timeouts before it sends; its heartbeats keep a and b waiting.

    In a second session c dies: a and b name it within about one timeout.
    """
    # generous against a loaded machine: a pause of the event loop shorter than the
    # timeout is harmless, heartbeats come every tenth of it
    timeout = 1.5
    monkeypatch.setattr(peers, "HEARTBEAT", 0.15)

    async def busy() -> tuple[dict[str, Any], dict[str, Any], bool]:
        link, buses = await _parties(timeout)

        async def waits(session: PeerSession) -> Any:
            return await session.recv("c", "result")

        async def works(session: PeerSession) -> Any:
            await asyncio.sleep(4 * timeout)  # the event loop stays free, as in the pool
            await session.broadcast("result", 42)
            return 42

        ok = await _run(buses, {"a": waits, "b": waits, "c": works}, "busy-session", timeout)
        beats = sum(1 for sender, _, tag in link.sent if sender == "c" and tag == "alive")
        assert beats >= 4, beats

        waiting_when_c_died: list[bool] = []

        async def dies(session: PeerSession) -> Any:
            await asyncio.sleep(3 * timeout)  # heartbeats keep a and b waiting meanwhile
            waiting_when_c_died.append(not any(runs[n].done() for n in ("a", "b")))
            link.dead.add("c")  # then c dies: no message, no heartbeat
            await asyncio.sleep(3600)

        steps = {"a": waits, "b": waits, "c": dies}
        runs = {
            name: asyncio.ensure_future(_run(buses, {name: steps[name]}, "dead-session", timeout))
            for name in PARTIES
        }
        dead = {name: (await runs[name])[name] for name in ("a", "b")}
        runs["c"].cancel()
        await asyncio.gather(runs["c"], return_exceptions=True)
        return ok, dead, waiting_when_c_died == [True]

    ok, dead, kept_waiting = asyncio.run(busy())
    assert ok == {"a": 42, "b": 42, "c": 42}
    for name in ("a", "b"):
        assert isinstance(dead[name], PartyTimeout), dead[name]
        assert "party 'c' did not send its 'result' message: no sign of life" in dead[name].message
    # they were still waiting, three timeouts in, while c's heartbeats came; they gave up
    # once c was silent
    assert kept_waiting


def test_heartbeats_are_not_held_and_sessions_run_elsewhere_stay_known() -> None:
    """A heartbeat for a session not open here is dropped, never held in the sender's quota;
    a session known to run in another process stays known while its messages keep coming."""

    async def run() -> tuple[PeerInbox, int]:
        inbox = await PeerInbox.of(_Bus())  # type: ignore[arg-type]
        for number in range(100):
            await inbox.route(Incoming(f"s-{number}", "b", "alive", 1, b"\x80", time.time()))
        record = session_record(PARTIES, "another-process")
        await inbox._from_store(_StoreMsg("elsewhere", record))  # type: ignore[arg-type]
        clock = time.monotonic()
        original = peers.time.monotonic
        try:
            for step in range(1, 5):  # 4 x 400 s: longer than GONE_KEEP, messages all along
                peers.time.monotonic = lambda step=step: clock + 400 * step  # type: ignore[misc]
                await inbox.route(Incoming("elsewhere", "b", "t", step, b"\xc0", time.time()))
                await inbox._from_store(_StoreMsg(f"other-{step}", record))  # type: ignore[arg-type]
        finally:
            peers.time.monotonic = original  # type: ignore[misc]
        return inbox, inbox.discarded

    inbox, discarded = asyncio.run(run())
    assert inbox.held == {} and inbox.held_from("b") == (0, 0, 0)
    assert discarded == 4


def test_a_message_lost_in_a_one_round_sum_fails_it_on_every_party() -> None:
    """a's share for c is accepted and lost: c finds out, and a and b must not keep a result.

    Before the last round (``end``), a and b kept their sums while c failed.
    """
    timeout = 1.0

    async def lost() -> dict[str, Any]:
        link, buses = await _parties(timeout)
        link.drop = lambda sender, to, tag: (sender, to, tag) == ("a", "c", "share")

        async def one_round(session: PeerSession) -> Any:
            shares = await session.exchange("share", 1)
            return sum(shares.values())

        return await _run(buses, dict.fromkeys(PARTIES, one_round), "lost-session", timeout)

    outcomes = asyncio.run(lost())
    # a's heartbeats say it delivered a message that c never took: c names the loss
    assert isinstance(outcomes["c"], ComputationFailed), outcomes
    lost_message = "a message from party 'a' was lost on its way to this server"
    assert lost_message in outcomes["c"].message
    for name in ("a", "b"):
        assert isinstance(outcomes[name], ComputationFailed), outcomes
        assert "party 'c' ended the computation" in outcomes[name].message
        assert lost_message in outcomes[name].message


def test_every_party_keeps_its_result_only_when_all_have_theirs() -> None:
    async def fine() -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
        link, buses = await _parties(5.0)

        async def one_round(session: PeerSession) -> Any:
            shares = await session.exchange("share", 1)
            return sum(shares.values())

        outcomes = await _run(buses, dict.fromkeys(PARTIES, one_round), "fine-session", 5.0)
        return outcomes, link.sent

    outcomes, sent = asyncio.run(fine())
    assert outcomes == {"a": 3, "b": 3, "c": 3}
    ends = sorted((sender, to) for sender, to, tag in sent if tag == "end")
    assert ends == sorted((s, t) for s in PARTIES for t in PARTIES if s != t)


def test_protocols_cannot_send_the_sessions_own_tags() -> None:
    async def run() -> None:
        _, buses = await _parties(1.0)
        session = PeerSession(buses["a"], "tags-session", PARTIES, "a", 1.0)  # type: ignore[arg-type]
        for tag in ("abort", "alive", "end"):
            with pytest.raises(ValueError, match="reserved"):
                await session.send("b", tag, None)
            with pytest.raises(ValueError, match="reserved"):
                await session.broadcast(tag, None)

    asyncio.run(run())


class _StoreMsg:
    """A ``$KV.fdrtd_sessions.<id>`` message, as a core subscriber sees a record being put."""

    def __init__(self, session_id: str, value: bytes) -> None:
        self.subject = f"$KV.fdrtd_sessions.{session_id}"
        self.data = value
        self.headers: dict[str, str] | None = None


def test_a_session_running_in_another_process_is_not_held_here() -> None:
    """Two workers of one server: the one that does not run a session drops its messages."""

    async def run() -> tuple[PeerInbox, PeerInbox, Any]:
        bus_one, bus_two = _Bus(), _Bus()
        one = await PeerInbox.of(bus_one)  # type: ignore[arg-type]
        two = await PeerInbox.of(bus_two)  # type: ignore[arg-type]
        # both hear b's early message for s1, which one runs
        early = Incoming("s1", "b", "t", 1, msgpack.packb("early"), time.time())
        await one.route(early)
        await two.route(early)
        record = session_record(PARTIES, one.id)
        for inbox in (one, two):  # both watch the record one makes
            await inbox._from_store(_StoreMsg("s1", record))  # type: ignore[arg-type]
        later = Incoming("s1", "b", "u", 2, msgpack.packb("later"), time.time())
        await one.route(later)
        await two.route(later)
        return one, two, None

    one, two, _ = asyncio.run(run())
    assert set(one.held) == {"s1"} and len(one.held["s1"]) == 2
    assert two.held == {} and two.held_from("b") == (0, 0, 0)
    assert two.discarded == 2


def test_an_ended_session_is_dropped_and_reported_ended() -> None:
    async def run() -> PeerInbox:
        inbox = await PeerInbox.of(_Bus())  # type: ignore[arg-type]
        await inbox.route(Incoming("s2", "b", "t", 1, b"\xc0", time.time()))
        ended = session_record(PARTIES, inbox.id, ended=True)
        await inbox._from_store(_StoreMsg("s2", ended))  # type: ignore[arg-type]
        await inbox.route(Incoming("s2", "b", "t", 2, b"\xc0", time.time()))
        return inbox

    inbox = asyncio.run(run())
    # the held message and the later one are both dropped, nothing else is
    assert inbox.held == {} and inbox.discarded == 2
    assert "s2" in inbox._gone and "s-other" not in inbox._gone


def test_a_session_records_its_process_and_its_end() -> None:
    async def run() -> tuple[str, dict[str, Any], dict[str, Any]]:
        _, buses = await _parties(5.0)

        async def nothing(session: PeerSession) -> Any:
            assert session._registered is not None
            await session._registered  # the record is made while the protocol starts
            record = dict(buses[session.me].sessions.records["record-session"])
            return record

        outcomes = await _run(buses, dict.fromkeys(PARTIES, nothing), "record-session", 5.0)
        for _ in range(100):  # the end is recorded in the background
            if buses["a"].sessions.records["record-session"].get("ended"):
                break
            await asyncio.sleep(0.01)
        inbox = await PeerInbox.of(buses["a"])  # type: ignore[arg-type]
        return inbox.id, outcomes["a"], buses["a"].sessions.records["record-session"]

    worker, during, after = asyncio.run(run())
    assert during == {"parties": PARTIES, "worker": worker}
    assert after == {"parties": PARTIES, "worker": worker, "ended": True}


def test_replayed_messages_give_way_to_what_the_sender_sends_now() -> None:
    """A recorder replays 200 of alpha's older messages for sessions not open here.

    Alpha's quota of sessions fills with them; alpha's new message, sealed
    later, pushes the oldest out and is delivered.
    """

    async def run() -> tuple[Any, tuple[int, int, int], int]:
        inbox = await PeerInbox.of(_Bus())  # type: ignore[arg-type]
        recorded = time.time() - 60
        for number in range(200):
            await inbox.route(Incoming(f"old-{number}", "alpha", "t", 1, b"\xc0", recorded))
        full = inbox.held_from("alpha")
        older = Incoming("older-session", "alpha", "t", 1, b"\xc0", recorded - 60)
        await inbox.route(older)  # older than all alpha has here: it pushes nothing out
        assert "older-session" not in inbox.held and inbox.held_from("alpha") == full
        fresh = Incoming("new-session", "alpha", "t", 1, msgpack.packb("now"), time.time())
        await inbox.route(fresh)
        bus = _Bus()
        session = PeerSession(bus, "new-session", ["alpha", "b", "c"], "b", 1.0)  # type: ignore[arg-type]
        await inbox.open(session)
        value = await session.recv("alpha", "t")
        inbox.close(session)
        return value, inbox.held_from("alpha"), inbox.dropped

    value, (_, _, sessions), dropped = asyncio.run(run())
    assert value == "now"
    assert sessions <= peers.HOLD_SESSIONS_PER_SENDER
    assert dropped >= 200 - peers.HOLD_SESSIONS_PER_SENDER
