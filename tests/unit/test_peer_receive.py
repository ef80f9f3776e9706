"""``POST /v1/peer`` under load and abuse: what is read, how much at once, what is audited.

A real :class:`~fdrtd_server.gateway.Gateway` (keys on disk, a federation
file) is driven through its ASGI fast path in one event loop. Each request's
body arrives in chunks the test hands out, so a test sees how much of a body
the gateway read before it answered, and can keep requests in flight at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette

from fdrtd_server import gateway
from fdrtd_server.audit import AuditLog, verify
from fdrtd_server.config import Settings, TokenStore
from fdrtd_server.custody import CustodyStore
from fdrtd_server.envelope import seal
from fdrtd_server.gateway import Gateway, ReplayGuard
from fdrtd_server.http_common import State
from fdrtd_server.identity import Identity, PeerEntry, add_member
from fdrtd_server.peers import Incoming
from fdrtd_server.policy import PolicyStore

CHUNK = 64 * 1024


class _Inbox:
    """The local inbox as the gateway sees it: every session is open here."""

    def __init__(self) -> None:
        self.routed: list[Incoming] = []

    def is_open(self, session_id: str) -> bool:
        return True

    async def route(self, message: Incoming) -> None:
        self.routed.append(message)


class _Peer:
    """A gateway of server 'alpha' in a federation of alpha, beta and gamma."""

    def __init__(self, home: Path) -> None:
        alpha = Identity.generate("alpha")
        alpha.save(home / "identity")
        self.beta = Identity.generate("beta")
        self.gamma = Identity.generate("gamma")
        members = home / "federation.toml"
        for member in (alpha, self.beta, self.gamma):
            add_member(members, member.public_entry("http://127.0.0.1:9"))
        self.alpha_entry: PeerEntry = alpha.public_entry("http://127.0.0.1:9")
        self.gamma_entry: PeerEntry = self.gamma.public_entry("http://127.0.0.1:9")
        self.audit_path = home / "audit.log"
        app = Starlette(routes=gateway.routes())
        state = State(
            settings=Settings(home=home, name="alpha"),
            bus=None,  # type: ignore[arg-type]  # every session is open in this process
            tokens=TokenStore(home),
            audit=AuditLog(self.audit_path),
            extra={},
            custody=CustodyStore(home),
            policy=PolicyStore(home),
        )
        app.state.fdrtd = state
        self.gateway = Gateway(state)
        self.inbox = _Inbox()
        self.gateway.local = self.inbox  # type: ignore[assignment]
        state.extra["gateway"] = self.gateway
        self.app = gateway.PeerFastPath(app)

    def sealed(self, seq: int, payload: bytes = b"x", sender: Identity | None = None) -> bytes:
        return seal(
            sender or self.beta, self.alpha_entry, session="s-1", seq=seq, tag="t", payload=payload
        )

    def audit(self) -> list[dict[str, Any]]:
        verify(self.audit_path)
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]


class _Request:
    """One POST /v1/peer whose body the gateway pulls chunk by chunk."""

    def __init__(self, body: bytes, *, declare: bool = True, hold: asyncio.Event | None = None):
        self.chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)] or [b""]
        self.declare = declare
        self.hold = hold
        self.pulled = 0
        self.started = asyncio.Event()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""

    async def receive(self) -> dict[str, Any]:
        if self.pulled >= len(self.chunks):
            await asyncio.sleep(3600)  # a client that sends nothing more
        if self.pulled == 1 and self.hold is not None:
            self.started.set()
            await self.hold.wait()
        chunk = self.chunks[self.pulled]
        self.pulled += 1
        return {"type": "http.request", "body": chunk, "more_body": self.pulled < len(self.chunks)}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        else:
            self.body += message.get("body", b"")

    async def run(self, app: Any) -> _Request:
        length = sum(len(chunk) for chunk in self.chunks)
        headers = [(b"content-type", b"application/msgpack")]
        if self.declare:
            headers.append((b"content-length", str(length).encode()))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/peer",
            "raw_path": b"/v1/peer",
            "root_path": "",
            "query_string": b"",
            "headers": headers,
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000),
        }
        await asyncio.wait_for(app(scope, self.receive, self.send), 10.0)
        return self

    def detail(self) -> str:
        return str(json.loads(self.body)["detail"])


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[_Peer]:
    yield _Peer(tmp_path)


def test_a_non_member_is_refused_after_reading_only_the_header(peer: _Peer) -> None:
    mallory = Identity.generate("mallory")
    body = peer.sealed(1, b"\x00" * (4 * 1024 * 1024), sender=mallory)
    request = asyncio.run(_Request(body).run(peer.app))
    assert request.status == 403
    assert "'mallory' is not a member" in request.detail()
    assert request.pulled == 1 < len(request.chunks)
    assert peer.audit()[-1]["outcome"] == "rejected not_a_member"


def test_a_message_for_another_member_is_refused_after_reading_only_the_header(
    peer: _Peer,
) -> None:
    body = seal(
        peer.beta, peer.gamma_entry, session="s-1", seq=1, tag="t", payload=b"\x00" * 500_000
    )
    request = asyncio.run(_Request(body).run(peer.app))
    assert request.status == 403
    assert "addressed to 'gamma'" in request.detail()
    assert request.pulled == 1
    assert peer.audit()[-1]["outcome"] == "rejected wrong_recipient"


def test_a_header_split_over_chunks_is_still_checked_early(peer: _Peer) -> None:
    """A client that sends a few bytes at a time cannot slip past the early check."""
    mallory = Identity.generate("mallory")
    body = peer.sealed(1, b"\x00" * 300_000, sender=mallory)

    async def run() -> _Request:
        request = _Request(body)
        request.chunks = [body[i : i + 7] for i in range(0, len(body), 7)]
        return await request.run(peer.app)

    request = asyncio.run(run())
    assert request.status == 403 and "not a member" in request.detail()
    assert request.pulled <= 200  # the header is at most about 330 bytes


def test_a_member_name_with_a_forged_signature_is_read_and_refused(peer: _Peer) -> None:
    impostor = Identity.generate("beta")  # beta's name, other keys
    request = asyncio.run(_Request(peer.sealed(1, b"x" * 200_000, sender=impostor)).run(peer.app))
    assert request.status == 403 and "signature does not verify" in request.detail()
    assert peer.audit()[-1]["outcome"] == "rejected bad_signature"


def test_an_honest_message_is_delivered_and_its_replay_refused(peer: _Peer) -> None:
    body = peer.sealed(1, b"a share")

    async def run() -> tuple[int, int]:
        first = await _Request(body).run(peer.app)
        again = await _Request(body, declare=False).run(peer.app)
        return first.status, again.status

    assert asyncio.run(run()) == (202, 409)
    assert [message.payload for message in peer.inbox.routed] == [b"a share"]
    assert (peer.gateway.reading, peer.gateway.reading_bytes) == (0, 0)


def test_too_many_messages_read_at_once_are_answered_busy(
    peer: _Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway, "MAX_PEER_READS", 2)

    async def run() -> tuple[list[int], _Request, tuple[int, int]]:
        hold = asyncio.Event()
        slow = [_Request(peer.sealed(seq, b"\x00" * 200_000), hold=hold) for seq in (1, 2)]
        tasks = [asyncio.ensure_future(request.run(peer.app)) for request in slow]
        await asyncio.wait_for(asyncio.gather(*(r.started.wait() for r in slow)), 5.0)
        third = await _Request(peer.sealed(3)).run(peer.app)
        hold.set()
        await asyncio.gather(*tasks)
        after = (peer.gateway.reading, peer.gateway.reading_bytes)
        return [request.status for request in slow], third, after

    statuses, third, after = asyncio.run(run())
    assert third.status == 503 and third.headers["retry-after"] == "1"
    assert "too many peer messages at once" in third.detail()
    assert statuses == [202, 202]
    assert after == (0, 0)


def test_the_bytes_read_at_once_are_bounded(peer: _Peer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway, "PEER_READ_BYTES", 300_000)

    async def run() -> tuple[_Request, _Request, _Request, tuple[int, int]]:
        hold = asyncio.Event()
        first = _Request(peer.sealed(1, b"\x00" * 200_000), hold=hold)
        task = asyncio.ensure_future(first.run(peer.app))
        await asyncio.wait_for(first.started.wait(), 5.0)
        declared = await _Request(peer.sealed(2, b"\x00" * 200_000)).run(peer.app)
        streamed = await _Request(peer.sealed(3, b"\x00" * 200_000), declare=False).run(peer.app)
        hold.set()
        await task
        return first, declared, streamed, (peer.gateway.reading, peer.gateway.reading_bytes)

    first, declared, streamed, after = asyncio.run(run())
    assert first.status == 202
    for refused in (declared, streamed):
        assert refused.status == 503 and "retry shortly" in refused.detail()
    assert streamed.pulled < len(streamed.chunks)  # refused while reading, not after
    assert after == (0, 0)


def test_an_oversized_message_is_refused_and_its_budget_given_back(
    peer: _Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway, "MAX_PEER_MESSAGE", 100_000)
    peer.gateway.state.settings = Settings(
        home=peer.audit_path.parent, name="alpha", max_body_bytes=1024
    )
    request = asyncio.run(_Request(peer.sealed(1, b"\x00" * 300_000), declare=False).run(peer.app))
    assert request.status == 413 and "limit of 100000 bytes" in request.detail()
    assert (peer.gateway.reading, peer.gateway.reading_bytes) == (0, 0)


def test_a_member_over_its_replay_quota_is_answered_busy_and_replays_still_refused(
    peer: _Peer,
) -> None:
    peer.gateway.replays = ReplayGuard(limit=2)

    async def run() -> list[_Request]:
        return [await _Request(peer.sealed(seq)).run(peer.app) for seq in (1, 2, 3, 1)]

    first, second, busy, replay = asyncio.run(run())
    assert (first.status, second.status) == (202, 202)
    assert busy.status == 503 and "from 'beta'" in busy.detail()
    assert busy.headers["retry-after"] == "1"
    assert replay.status == 409
    assert [record["outcome"] for record in peer.audit()[-2:]] == [
        "rejected busy",
        "rejected replay",
    ]


def test_a_flood_of_rejections_is_summed_up_in_the_audit_log(peer: _Peer) -> None:
    flood = 400

    async def run() -> list[int]:
        statuses = [(await _Request(b"junk %d" % n).run(peer.app)).status for n in range(flood)]
        peer.gateway.rejections.flush()
        return statuses

    assert set(asyncio.run(run())) == {403}
    records = [r for r in peer.audit() if r["action"] == "peer-message"]
    one_by_one = [r for r in records if r["outcome"] == "rejected malformed"]
    summaries = [r for r in records if "too many to record one by one" in r["outcome"]]
    assert len(records) < gateway.AUDIT_BURST + 60  # a bounded number of records
    assert summaries and all(set(s["reasons"]) == {"malformed"} for s in summaries)
    assert len(one_by_one) + sum(s["reasons"]["malformed"] for s in summaries) == flood


def test_a_summary_is_written_by_itself_a_second_later(peer: _Peer) -> None:
    """No further rejection is needed for the summary of a burst to reach the log."""

    async def run() -> None:
        for n in range(gateway.AUDIT_BURST + 20):
            await _Request(b"junk %d" % n).run(peer.app)
        # no further request comes: the summary must be written on its own
        async with asyncio.timeout(60):
            while "too many to record one by one" not in peer.audit()[-1]["outcome"]:
                await asyncio.sleep(0.05)

    asyncio.run(run())
