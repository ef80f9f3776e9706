"""The two ways a peer message travels, and replays on each.

A protocol reaches its gateway directly when both run in one process (the
embedded default) and over NATS when the protocol runs in a worker process
(``fdrtd.peer.out``, ``fdrtd.peer.seeds``, ``fdrtd.peer.in.<session>``).
Here one party, beta, runs its controller without microservices and its
protocols in a separate ``fdrtd-server worker`` on a standalone NATS, so
every message between alpha and beta takes the direct way on one side and
the bus on the other. Both must compute the same results, refuse the same
replays, and never keep a peer message in JetStream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import msgpack
import nats
import numpy as np
import pytest
import requests
from conditions import wait_for

from fdrtd_server._embedded_nats import EmbeddedNats
from fdrtd_server.envelope import OpenedMessage, seal
from fdrtd_server.errors import ServiceUnavailable
from fdrtd_server.gateway import ReplayGuard
from fdrtd_server.identity import Identity, add_member, load_federation
from fdrtd_server.local import LocalFederation, LocalServer
from fdrtd_server.peers import Incoming, PeerSession


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """alpha: everything in one process; beta: controller and worker on a shared NATS."""
    root = tmp_path_factory.mktemp("mixed")
    nats_server = EmbeddedNats(root / "nats").start()
    federation = LocalFederation(root, names=("alpha", "beta"), env={"FDRTD_MIN_COHORT": "1"})
    beta = federation.servers["beta"]
    beta.extra_args = ["--nats-url", nats_server.url, "--no-local-microservices"]
    worker: subprocess.Popen[bytes] | None = None
    try:
        with (beta.home / "worker.log").open("ab") as log:
            worker = subprocess.Popen(
                [
                    *(sys.executable, "-m", "fdrtd_server", "worker"),
                    *("--nats-url", nats_server.url, "--home", str(beta.home)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "FDRTD_MIN_COHORT": "1"},
            )
        federation.start()
        _wait_for_worker(beta)
        yield federation
    finally:
        federation.stop()
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(timeout=5)
        nats_server.stop()


def _wait_for_worker(server: LocalServer) -> None:
    def offered() -> bool:
        listed = server.client().microservices()
        return any(entry.get("name") == "smpc" for entry in listed)

    wait_for(offered, "beta's worker to offer the smpc microservice")


def test_secure_sum_between_an_embedded_server_and_a_worker(mixed: LocalFederation) -> None:
    fed = mixed.federation()
    handles = fed.upload({"alpha": np.array([1.5, 2.0]), "beta": np.array([10.0, -4.0])})
    job = fed.compute("smpc", "secure_sum", {n: {"data": h} for n, h in handles.items()})
    assert job.results(timeout=30, progress=False) == [{"sum": 9.5, "count": 4}] * 2


def test_a_multi_round_protocol_between_an_embedded_server_and_a_worker(
    mixed: LocalFederation,
) -> None:
    """Minimum and maximum take nine rounds each way: every round crosses both paths."""
    fed = mixed.federation()
    handles = fed.upload({"alpha": np.array([3.0, -7.25, 8.0]), "beta": np.array([0.5, 12.0])})
    job = fed.compute("smpc", "minimum_maximum", {n: {"data": h} for n, h in handles.items()})
    assert job.result(timeout=60, progress=False) == {"minimum": -7.25, "maximum": 12.0, "count": 5}


def _post(server: LocalServer, body: bytes) -> requests.Response:
    return requests.post(
        server.url + "/v1/peer",
        data=body,
        headers={"content-type": "application/msgpack"},
        timeout=10,
    )


def test_a_replay_to_the_worker_side_is_refused(mixed: LocalFederation) -> None:
    alpha, beta = mixed.servers["alpha"], mixed.servers["beta"]
    sender = Identity.load(alpha.home / "identity", "alpha")
    entry = load_federation(alpha.home / "federation.toml")["beta"]
    body = seal(sender, entry, session=secrets.token_hex(16), seq=1, tag="x", payload=b"\xc0")
    assert _post(beta, body).status_code == 202
    again = _post(beta, body)
    assert again.status_code == 409
    assert "replay" in again.json()["detail"]


async def _peer_streams(url: str) -> list[str]:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        found = []
        for info in await js.streams_info():
            subjects = info.config.subjects or []
            if any(subject.startswith("fdrtd.peer") for subject in subjects):
                found.append(info.config.name or "")
        return found
    finally:
        await nc.close()


def _embedded_nats_url(server: LocalServer) -> str:
    """The URL (with this start's credentials) of a server's embedded nats-server."""
    return server.nats_url_file.read_text("utf-8").strip()


def test_no_stream_keeps_peer_messages(mixed: LocalFederation) -> None:
    """Masked values of a session are never written to JetStream, on either path."""
    beta = mixed.servers["beta"]
    worker_side = beta.extra_args[beta.extra_args.index("--nats-url") + 1]
    embedded = _embedded_nats_url(mixed.servers["alpha"])
    assert asyncio.run(_peer_streams(worker_side)) == []
    assert asyncio.run(_peer_streams(embedded)) == []


class _Blackhole:
    """A TCP port on 127.0.0.1 that accepts connections and never answers."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self.server.accept()
                self.held.append(connection)

    def still_holds(self) -> bool:
        """Whether the first connection is still open: its sender has not given up."""
        connection = self.held[0]
        connection.setblocking(False)
        try:
            return connection.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True  # nothing to read, not closed
        finally:
            connection.setblocking(True)

    def close(self) -> None:
        self.server.close()
        for connection in self.held:
            connection.close()
        self.thread.join(timeout=5)


def test_a_party_that_never_answers_holds_up_no_other_computation(
    mixed: LocalFederation,
) -> None:
    """Workers' sends are handled concurrently: one stuck send does not stall the rest.

    beta's worker starts a session with 'ghost', whose port accepts the
    connection and never answers (the gateway waits up to its send timeout);
    meanwhile a sum between alpha and beta must go through as usual.
    """
    beta = mixed.servers["beta"]
    federation_file = beta.home / "federation.toml"
    original = federation_file.read_text("utf-8")
    blackhole = _Blackhole()
    try:
        ghost = Identity.generate("ghost").public_entry(f"http://127.0.0.1:{blackhole.port}")
        add_member(federation_file, ghost)
        with beta.client() as client:
            data = client.upload(np.array([1.0, 2.0]))
            stuck = client.compute(
                "smpc",
                "secure_sum",
                session={"id": secrets.token_hex(16), "parties": ["beta", "ghost"]},
                data=data,
            )
            # beta's gateway is now sending to ghost
            wait_for(lambda: bool(blackhole.held), "beta to try to reach ghost")
            fed = mixed.federation()
            handles = fed.upload({"alpha": np.array([5.0]), "beta": np.array([7.0])})
            job = fed.compute("smpc", "secure_sum", {n: {"data": h} for n, h in handles.items()})
            assert job.result(timeout=30, progress=False) == {"sum": 12.0, "count": 2}
            # done while the stuck send still waits for ghost's answer
            assert blackhole.still_holds()
            assert stuck.status()["status"] == "running"
    finally:
        federation_file.write_text(original, "utf-8")
        blackhole.close()


# -- the gateway's replay record and the session's own -------------------------------------


def _opened(seq: int, ts: float, session: str = "s-1", sender: str = "beta") -> OpenedMessage:
    return OpenedMessage(sender, session, seq, "t", b"", ts)


def test_replay_guard_refuses_a_second_copy_while_fresh() -> None:
    guard = ReplayGuard(max_age=10.0)
    assert guard.first_time(_opened(1, 1000.0), now=1000.0)
    assert not guard.first_time(_opened(1, 1000.0), now=1005.0)
    assert guard.first_time(_opened(2, 1000.0), now=1005.0)
    assert guard.first_time(_opened(1, 1000.0, session="s-2"), now=1005.0)


def test_replay_guard_forgets_only_what_is_stale_anyway() -> None:
    """After ts + max_age the envelope itself is refused as stale, so the record may go."""
    guard = ReplayGuard(max_age=10.0)
    assert guard.first_time(_opened(1, 1000.0), now=1000.0)
    assert not guard.first_time(_opened(1, 1000.0), now=1010.5)
    assert guard.first_time(_opened(9, 1012.0), now=1012.0)  # prunes the first record
    assert len(guard) == 1


def test_replay_guard_never_forgets_a_fresh_message_when_full() -> None:
    """At its limit the guard refuses new messages (retry), never a fresh key's memory."""
    guard = ReplayGuard(max_age=10.0, limit=3)
    for seq in range(3):
        assert guard.first_time(_opened(seq, 1000.0), now=1000.0)
    with pytest.raises(ServiceUnavailable, match=r"'beta'.*retry shortly"):
        guard.first_time(_opened(3, 1000.0), now=1001.0)
    # the first message, replayed while fresh, is still recognised: the one that
    # an evicting guard would have forgotten first
    for seq in range(3):
        assert not guard.first_time(_opened(seq, 1000.0), now=1002.0)
    assert len(guard) == 3


def test_replay_guard_quota_is_per_sender() -> None:
    """A member at its limit holds up no other member."""
    guard = ReplayGuard(max_age=10.0, limit=2)
    for seq in range(2):
        assert guard.first_time(_opened(seq, 1000.0, sender="mallory"), now=1000.0)
    with pytest.raises(ServiceUnavailable, match="'mallory'"):
        guard.first_time(_opened(2, 1000.0, sender="mallory"), now=1000.0)
    assert guard.first_time(_opened(0, 1000.0), now=1000.0)
    assert guard.first_time(_opened(1, 1000.0), now=1000.0)


def test_replay_guard_takes_new_messages_once_old_ones_are_stale() -> None:
    guard = ReplayGuard(max_age=10.0, limit=2)
    assert guard.first_time(_opened(0, 1000.0), now=1000.0)
    assert guard.first_time(_opened(1, 1005.0), now=1005.0)
    with pytest.raises(ServiceUnavailable):
        guard.first_time(_opened(2, 1010.0), now=1010.0)
    # seq 0 is stale after 1011: it is refused at opening anyway, and its key may go
    assert guard.first_time(_opened(2, 1011.5), now=1011.5)
    assert not guard.first_time(_opened(1, 1005.0), now=1011.5)  # seq 1 is still fresh
    with pytest.raises(ServiceUnavailable):
        guard.first_time(_opened(3, 1011.5), now=1011.5)


def test_replay_guard_with_many_keys_keeps_only_the_fresh_ones() -> None:
    """20k messages of two senders: expired keys go as new ones come, within the limit."""
    guard = ReplayGuard(max_age=10.0, limit=5_000)
    for step in range(10_000):
        now = 1000.0 + step * 0.01  # 100 messages a second, keys live about 11 s
        for sender in ("beta", "gamma"):
            assert guard.first_time(_opened(step, now, sender=sender), now=now)
    assert len(guard) <= 2 * 1_200


def _incoming(seq: int, tag: str, value: object, sender: str = "beta") -> Incoming:
    return Incoming("s-1", sender, tag, seq, msgpack.packb(value))


def test_a_session_takes_each_sequence_number_once() -> None:
    """The last line of defence: even a replay the gateway forgot cannot feed a protocol."""

    async def run() -> list[object]:
        session = PeerSession(None, "s-1", ["alpha", "beta"], "alpha", 0.2)  # type: ignore[arg-type]
        await session.deliver(_incoming(1, "a", 1))
        first = await session.recv("beta", "a")
        await session.deliver(_incoming(1, "a", 666))  # the same message again
        await session.deliver(_incoming(1, "b", 666))  # same seq, other tag: a forgery
        await session.deliver(_incoming(2, "b", 2))
        second = await session.recv("beta", "b")
        await session.deliver(_incoming(3, "a", 5, sender="mallory"))  # not a party
        await session.deliver(_incoming(4, "a", 5, sender="alpha"))  # not from ourselves
        try:
            await session.recv("beta", "a")
        except Exception as error:
            return [first, second, type(error).__name__]
        return [first, second, "received a replayed message"]

    assert asyncio.run(run()) == [1, 2, "PartyTimeout"]
