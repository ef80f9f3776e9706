"""The inbox of a process: who gets a session id's messages, and what waits for a session.

Two attacks on it, each tried here:

* a local client starts a job with the id of another client's running session:
  it must be refused without touching that session's routing;
* a federation member floods messages for sessions that are not open here:
  only its own messages may be dropped, never another party's early message,
  and the memory held stays bounded.

The bus is an in-memory stand-in: a key-value bucket whose ``create`` takes a
NATS round trip and refuses an existing key, as JetStream does.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest
from memory_peers import MemoryBus

from fdrtd_server import peers
from fdrtd_server.errors import Conflict, PartyTimeout
from fdrtd_server.peers import Incoming, PeerInbox, PeerSession


class _OthersConfirm:
    """The gateway, as far as these tests need one: the other parties answer every
    ``end`` at once with their own, so that a session that ends well can close."""

    def __init__(self, inbox: PeerInbox) -> None:
        self.inbox = inbox
        self.sent: list[tuple[str, str]] = []

    async def outgoing(self, request: dict[str, Any]) -> dict[str, Any]:
        self.sent.append((request["to"], request["tag"]))
        if request["tag"] == peers.END_TAG:
            reply = Incoming(request["session"], request["to"], peers.END_TAG, 10**6, b"\xc0")
            asyncio.get_running_loop().call_soon(
                lambda: asyncio.ensure_future(self.inbox.route(reply))
            )
        return {"status": 202, "detail": ""}

    def seeds(self, request: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("not used here")


class _Bus(MemoryBus):
    def __init__(self) -> None:
        super().__init__()
        self._peer_inbox = PeerInbox(self)  # type: ignore[arg-type]
        self.link = _OthersConfirm(self._peer_inbox)
        self._peer_inbox.gateway = self.link


def _message(session: str, sender: str, seq: int, value: Any, tag: str = "t") -> Incoming:
    return Incoming(session, sender, tag, seq, msgpack.packb(value))


def _session(bus: _Bus, session_id: str, timeout: float = 1.0) -> PeerSession:
    return PeerSession(bus, session_id, ["a", "b", "m"], "a", timeout=timeout)  # type: ignore[arg-type]


# -- finding 1: one session per id, and only the registered one ------------------------------


def test_a_second_job_with_a_running_session_id_cannot_take_its_messages() -> None:
    """The review's sequence: X runs, Y starts with X's id, is refused, and X completes."""

    async def run() -> tuple[str, bool, Any]:
        bus = _Bus()
        inbox = await PeerInbox.of(bus)  # type: ignore[arg-type]
        async with _session(bus, "session-x1") as x:
            assert x._registered is not None
            await x._registered
            refusal = ""
            try:
                async with _session(bus, "session-x1"):
                    await asyncio.sleep(0.05)
            except Conflict as error:
                refusal = error.message
            routed = inbox.is_open("session-x1")
            await inbox.route(_message("session-x1", "b", 1, 42))
            return refusal, routed, await x.recv("b", "t")

    refusal, routed, value = asyncio.run(run())
    assert "already used" in refusal and "new session id" in refusal
    assert routed
    assert value == 42


def test_two_jobs_starting_together_with_one_id_route_to_the_one_registered() -> None:
    """Both enter before either is recorded: the loser never opens, the winner gets everything."""

    async def run() -> tuple[Any, Any, str]:
        bus = _Bus()
        inbox = await PeerInbox.of(bus)  # type: ignore[arg-type]
        x = _session(bus, "session-race")
        y = _session(bus, "session-race")
        await x.__aenter__()
        await y.__aenter__()
        # early messages, before either record is made: held, not lost
        await inbox.route(_message("session-race", "b", 1, "early"))
        assert not inbox.is_open("session-race")
        try:
            await y.recv("b", "t")
            outcome = "the loser received a message"
        except Conflict as error:
            outcome = error.message
        with pytest.raises(Conflict):
            await y.__aexit__(None, None, None)
        first = await x.recv("b", "t")
        await inbox.route(_message("session-race", "b", 2, "late", tag="u"))
        second = await x.recv("b", "u")
        await x.__aexit__(None, None, None)
        return first, second, outcome

    first, second, outcome = asyncio.run(run())
    assert (first, second) == ("early", "late")
    assert "already used" in outcome


def test_a_refused_session_stops_receiving_at_once_not_after_its_timeout() -> None:
    async def run() -> None:
        bus = _Bus()
        bus.sessions.keys.add("session-used")
        with pytest.raises(Conflict, match="already used"):
            async with _session(bus, "session-used", timeout=3600.0) as session:
                # an hour's timeout: ending within the deadline means it did not wait for it
                await asyncio.wait_for(session.recv("b", "t"), 30.0)

    asyncio.run(run())


def test_open_refuses_an_id_already_open_and_close_leaves_the_owner_alone() -> None:
    async def run() -> None:
        bus = _Bus()
        inbox = await PeerInbox.of(bus)  # type: ignore[arg-type]
        owner, intruder = _session(bus, "session-o"), _session(bus, "session-o")
        await inbox.open(owner)
        await inbox.open(owner)  # opening one's own id again is harmless
        with pytest.raises(Conflict, match="already running"):
            await inbox.open(intruder)
        inbox.close(intruder)
        assert inbox.sessions["session-o"] is owner
        inbox.close(owner)
        assert not inbox.is_open("session-o")

    asyncio.run(run())


def test_a_session_left_before_its_record_is_made_is_never_opened() -> None:
    """Leaving early (an error, a cancellation) must not leave a session routed forever."""

    async def run() -> bool:
        bus = _Bus()
        inbox = await PeerInbox.of(bus)  # type: ignore[arg-type]
        session = _session(bus, "session-left")
        await session.__aenter__()
        leaving = asyncio.ensure_future(session.__aexit__(None, None, None))
        await asyncio.sleep(0)
        leaving.cancel()  # the exit itself is cancelled while the record is under way
        with pytest.raises(asyncio.CancelledError):
            await leaving
        # the record is still made (and, in the same step, the session left alone)
        async with asyncio.timeout(30):
            while "session-left" not in bus.sessions.keys:
                await asyncio.sleep(0.005)
        return inbox.is_open("session-left")

    assert asyncio.run(run()) is False


def test_a_message_for_a_session_that_never_opens_times_out_clearly() -> None:
    async def run() -> str:
        bus = _Bus()
        async with _session(bus, "session-quiet", timeout=0.2) as session:
            try:
                await session.recv("b", "t")
            except PartyTimeout as error:
                return error.message
        return "no timeout"

    assert "party 'b' did not send its 't' message" in asyncio.run(run())


# -- finding 2: the holding area is bounded per sender ---------------------------------------


def test_a_flooding_member_cannot_push_out_another_partys_early_message() -> None:
    """b's first message waits; m floods every kind of junk; b's message is still delivered."""

    async def run() -> tuple[Any, tuple[int, int, int], int]:
        bus = _Bus()
        inbox = await PeerInbox.of(bus)  # type: ignore[arg-type]
        await inbox.route(_message("session-v", "b", 1, "from b"))
        # many made-up sessions, empty payloads, and a few large ones
        for seq in range(3 * peers.HOLD_MESSAGES_PER_SENDER):
            await inbox.route(Incoming(f"junk-{seq}", "m", "t", seq, b""))
        for seq in range(2 * peers.HOLD_MESSAGES_PER_SENDER):
            await inbox.route(Incoming("junk-1", "m", "t", seq, b""))
        big = b"\x00" * (peers.HOLD_BYTES_PER_SENDER // 4)
        for seq in range(8):
            await inbox.route(Incoming("junk-2", "m", "t", seq, big))
        async with _session(bus, "session-v") as session:
            value = await session.recv("b", "t")
        return value, inbox.held_from("m"), inbox.dropped

    value, (messages, size, sessions), dropped = asyncio.run(run())
    assert value == "from b"
    assert messages <= peers.HOLD_MESSAGES_PER_SENDER
    assert size <= peers.HOLD_BYTES_PER_SENDER
    assert sessions <= peers.HOLD_SESSIONS_PER_SENDER
    assert dropped > 0


def test_empty_messages_count_against_the_quota() -> None:
    async def run() -> tuple[int, int, int]:
        bus = _Bus()
        inbox = await PeerInbox.of(bus)  # type: ignore[arg-type]
        for seq in range(peers.HOLD_MESSAGES_PER_SENDER + 500):
            await inbox.route(Incoming("junk", "m", "t", seq, b""))
        return inbox.held_from("m")

    messages, size, sessions = asyncio.run(run())
    assert messages == peers.HOLD_MESSAGES_PER_SENDER
    assert size == messages * peers.HOLD_OVERHEAD
    assert sessions == 1


def test_the_holding_area_counts_every_senders_bytes_separately() -> None:
    """m fills its byte quota; b can still hold a large message of its own."""

    async def run() -> tuple[tuple[int, int, int], Any]:
        bus = _Bus()
        inbox = await PeerInbox.of(bus)  # type: ignore[arg-type]
        half = b"\x00" * (peers.HOLD_BYTES_PER_SENDER // 2)
        for seq in range(4):
            await inbox.route(Incoming(f"junk-{seq}", "m", "t", seq, half))
        large = msgpack.packb(b"\x01" * (peers.HOLD_BYTES_PER_SENDER // 2))
        await inbox.route(Incoming("session-l", "b", "t", 1, large))
        async with _session(bus, "session-l") as session:
            value = await session.recv("b", "t")
        return inbox.held_from("m"), len(value)

    (messages, size, _), length = asyncio.run(run())
    assert messages == 1 and size <= peers.HOLD_BYTES_PER_SENDER
    assert length == peers.HOLD_BYTES_PER_SENDER // 2


def test_held_messages_expire_and_give_their_quota_back(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(peers.time, "monotonic", lambda: clock[0])

    async def run() -> list[tuple[int, int, int]]:
        bus = _Bus()
        inbox = await PeerInbox.of(bus)  # type: ignore[arg-type]
        for seq in range(peers.HOLD_MESSAGES_PER_SENDER):
            await inbox.route(Incoming(f"junk-{seq % 10}", "m", "t", seq, b"x"))
        full = inbox.held_from("m")
        clock[0] += peers.INBOX_HOLD + 1
        await inbox.route(Incoming("junk-new", "m", "t", 0, b"x"))
        after = inbox.held_from("m")
        assert set(inbox.held) == {"junk-new"}
        return [full, after]

    full, after = asyncio.run(run())
    assert full[0] == peers.HOLD_MESSAGES_PER_SENDER
    assert after == (1, 1 + peers.HOLD_OVERHEAD, 1)


def test_opening_a_session_does_not_scan_everything_held() -> None:
    """Many senders at their quota: opening a session looks up its own id only.

    The held messages are counted, not timed: opening hundreds of sessions
    never walks through what is held for other sessions.
    """

    class _Watched(dict[str, Any]):
        scans = 0

        def __iter__(self) -> Any:
            _Watched.scans += 1
            return super().__iter__()

        def values(self) -> Any:
            _Watched.scans += 1
            return super().values()

        def items(self) -> Any:
            _Watched.scans += 1
            return super().items()

    async def run() -> int:
        bus = _Bus()
        inbox = await PeerInbox.of(bus)  # type: ignore[arg-type]
        for sender in range(20):
            for seq in range(peers.HOLD_MESSAGES_PER_SENDER):
                await inbox.route(Incoming(f"junk-{seq % 50}", f"m{sender}", "t", seq, b""))
        inbox.held = _Watched(inbox.held)
        for number in range(300):
            session = _session(bus, f"session-{number}")
            await inbox.open(session)
            inbox.close(session)
        assert _Watched.scans == 0
        return len(inbox.held)

    assert asyncio.run(run()) == 50  # the junk is still held, untouched


def test_taken_messages_do_not_pile_up_in_the_arrival_order() -> None:
    """Sessions that take their held messages leave no bookkeeping behind for long."""

    async def run() -> tuple[int, int]:
        bus = _Bus()
        inbox = await PeerInbox.of(bus)  # type: ignore[arg-type]
        await inbox.route(Incoming("first", "b", "t", 0, b""))  # stays at the front
        for number in range(5000):
            await inbox.route(Incoming(f"s-{number}", "b", "t", 1, msgpack.packb(number)))
            session = _session(bus, f"s-{number}")
            await inbox.open(session)
            inbox.close(session)
        return len(inbox._arrivals), inbox.held_from("b")[0]

    arrivals, held = asyncio.run(run())
    assert held == 1
    assert arrivals <= 1026
