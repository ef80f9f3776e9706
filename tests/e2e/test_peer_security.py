"""Invariant 4 and 6 against real servers: peers are authenticated, nothing hangs.

The first half attacks a running server's peer gateway (``POST /v1/peer``)
the way an outsider or a dishonest member could: forged senders, replays,
tampered ciphertexts and headers, messages for somebody else, stale
timestamps, garbage and oversized bodies, and a valid message moved into
another session. Every attempt must be refused (403, 409 or 413) and
audited, while honest messages are still accepted.

The second half runs real computations in which a party never joins, is
stopped before, or is killed (SIGKILL) in the middle, on a federation whose
session timeout is 3 s: the remaining parties must fail within that timeout
with an error that names the missing party. Every wait in this module has a
deadline.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import secrets
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import nats
import numpy as np
import pytest
import requests
from conditions import wait_for
from conftest import assert_healthy
from nats.js.errors import KeyNotFoundError

from fdrtd_client import Client, Job
from fdrtd_client.errors import ComputationFailed, PartyTimeout, ServerError
from fdrtd_server._embedded_nats import read_url_file
from fdrtd_server.audit import verify
from fdrtd_server.envelope import seal
from fdrtd_server.identity import Identity, PeerEntry, load_federation
from fdrtd_server.local import LocalFederation, LocalServer

MSGPACK = "application/msgpack"
PAYLOAD = b"\x93\x01\x02\x03 a share that must stay secret"
SESSION_TIMEOUT = 3.0
DROPOUT_NAMES = ("d1", "d2", "d3")


# -- helpers -------------------------------------------------------------------------------


def session_id() -> str:
    return "sec-" + secrets.token_hex(12)


def session_recorded(server: LocalServer, sid: str) -> bool:
    """Whether ``server`` has recorded the session id ``sid`` as used (its protocol joined)."""

    async def look() -> bool:
        nc = await nats.connect(read_url_file(server.nats_url_file), connect_timeout=5)
        try:
            records = await nc.jetstream().key_value("fdrtd_sessions")
            try:
                await records.get(sid)
            except KeyNotFoundError:
                return False
            return True
        finally:
            await nc.close()

    return asyncio.run(look())


def entry(server: LocalServer, name: str) -> PeerEntry:
    """``name``'s federation entry as ``server`` knows it."""
    return load_federation(server.home / "federation.toml")[name]


def identity(server: LocalServer) -> Identity:
    """The real identity (private keys) of ``server``."""
    return Identity.load(server.home / "identity", server.name)


def post(server: LocalServer, body: bytes) -> requests.Response:
    return requests.post(
        server.url + "/v1/peer", data=body, headers={"content-type": MSGPACK}, timeout=10
    )


def assert_rejected(response: requests.Response, status: int, *words: str) -> dict[str, Any]:
    """An RFC 9457 problem document with ``status`` whose detail has every word."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert set(problem) >= {"type", "title", "status", "detail"}
    for word in words:
        assert word in problem["detail"]
    return problem


def audit_records(server: LocalServer) -> list[dict[str, Any]]:
    path = server.home / "audit.log"
    verify(path)
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def rejections(server: LocalServer) -> list[str]:
    """Outcomes of the audited peer-message rejections, oldest first."""
    return [
        record["outcome"]
        for record in audit_records(server)
        if record["action"] == "peer-message" and record["outcome"] != "ok"
    ]


def split(envelope: bytes) -> dict[str, bytes]:
    outer: dict[str, bytes] = msgpack.unpackb(envelope)
    return outer


def join(outer: dict[str, bytes]) -> bytes:
    packed: bytes = msgpack.packb(outer)
    return packed


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# -- attacks on the gateway (shared trio) --------------------------------------------------


@pytest.fixture(scope="module")
def alpha(trio: LocalFederation) -> LocalServer:
    return trio.servers["alpha"]


@pytest.fixture(scope="module")
def beta(trio: LocalFederation) -> LocalServer:
    return trio.servers["beta"]


@pytest.fixture(scope="module")
def alpha_entry(beta: LocalServer) -> PeerEntry:
    return entry(beta, "alpha")


@pytest.fixture(scope="module")
def beta_identity(beta: LocalServer) -> Identity:
    return identity(beta)


def test_honest_message_is_accepted(
    alpha: LocalServer, alpha_entry: PeerEntry, beta_identity: Identity
) -> None:
    body = seal(beta_identity, alpha_entry, session=session_id(), seq=1, tag="x", payload=PAYLOAD)
    response = post(alpha, body)
    assert response.status_code == 202
    assert response.json() == {"accepted": True}


def test_message_from_non_member_is_refused(alpha: LocalServer, alpha_entry: PeerEntry) -> None:
    mallory = Identity.generate("mallory")
    body = seal(mallory, alpha_entry, session=session_id(), seq=1, tag="x", payload=PAYLOAD)
    assert_rejected(post(alpha, body), 403, "'mallory'", "not a member")
    assert rejections(alpha)[-1] == "rejected not_a_member"


def test_message_claiming_to_be_a_member_is_refused(
    alpha: LocalServer, alpha_entry: PeerEntry
) -> None:
    """Mallory's own keys under beta's name: the signature does not verify."""
    impostor = Identity.generate("beta")
    body = seal(impostor, alpha_entry, session=session_id(), seq=1, tag="x", payload=PAYLOAD)
    assert_rejected(post(alpha, body), 403, "'beta'", "signature")
    assert rejections(alpha)[-1] == "rejected bad_signature"


def test_replay_is_refused(
    alpha: LocalServer, alpha_entry: PeerEntry, beta_identity: Identity
) -> None:
    body = seal(beta_identity, alpha_entry, session=session_id(), seq=1, tag="x", payload=PAYLOAD)
    assert post(alpha, body).status_code == 202
    assert_rejected(post(alpha, body), 409, "replay")
    assert_rejected(post(alpha, body), 409, "replay")


def test_same_sequence_number_in_a_fresh_envelope_is_a_replay(
    alpha: LocalServer, alpha_entry: PeerEntry, beta_identity: Identity
) -> None:
    """Replay detection keys on (sender, session, seq), not on the envelope bytes."""
    session = session_id()
    first = seal(beta_identity, alpha_entry, session=session, seq=7, tag="a", payload=b"one")
    second = seal(beta_identity, alpha_entry, session=session, seq=7, tag="b", payload=b"two")
    assert first != second
    assert post(alpha, first).status_code == 202
    assert_rejected(post(alpha, second), 409, "replay")
    third = seal(beta_identity, alpha_entry, session=session, seq=8, tag="b", payload=b"two")
    assert post(alpha, third).status_code == 202


def test_replay_after_the_session_finished_is_refused(
    trio: LocalFederation, alpha: LocalServer, alpha_entry: PeerEntry, beta_identity: Identity
) -> None:
    """Ending a session clears its messages on the receiver, but not the replay record."""
    session = session_id()
    probe = seal(beta_identity, alpha_entry, session=session, seq=10**9, tag="p", payload=b"x")
    assert post(alpha, probe).status_code == 202
    fed = trio.federation()
    jobs = []
    for name in ("alpha", "beta"):
        client = fed.clients[name]
        handle = client.upload(np.arange(3.0))
        spec = {"id": session, "parties": ["alpha", "beta"]}
        jobs.append(client.compute("smpc", "secure_sum", session=spec, data=handle))
    assert [job.result(30, progress=False) for job in jobs] == [{"sum": 6.0, "count": 6}] * 2
    assert_rejected(post(alpha, probe), 409, "replay")


def test_flipped_ciphertext_byte_is_refused(
    alpha: LocalServer, alpha_entry: PeerEntry, beta_identity: Identity
) -> None:
    outer = split(
        seal(beta_identity, alpha_entry, session=session_id(), seq=1, tag="x", payload=PAYLOAD)
    )
    for index in (0, len(outer["c"]) // 2, len(outer["c"]) - 1):
        tampered = {**outer, "c": flip(outer["c"], index)}
        assert_rejected(post(alpha, join(tampered)), 403, "signature")
    # the untouched message is still good: the refusals were for the tampering
    assert post(alpha, join(outer)).status_code == 202


def test_flipped_header_byte_is_refused(
    alpha: LocalServer, alpha_entry: PeerEntry, beta_identity: Identity
) -> None:
    outer = split(
        seal(beta_identity, alpha_entry, session=session_id(), seq=1, tag="x", payload=PAYLOAD)
    )
    # the last bytes of the header are the nonce: still well formed, but no longer signed
    tampered = {**outer, "h": flip(outer["h"], len(outer["h"]) - 1)}
    assert_rejected(post(alpha, join(tampered)), 403, "signature")
    tampered = {**outer, "h": flip(outer["h"], 1)}  # anywhere else: refused as well
    assert post(alpha, join(tampered)).status_code == 403
    tampered = {**outer, "s": flip(outer["s"], 10)}
    assert_rejected(post(alpha, join(tampered)), 403, "signature")
    assert post(alpha, join(outer)).status_code == 202


def test_message_for_another_member_is_refused(
    alpha: LocalServer, beta: LocalServer, beta_identity: Identity
) -> None:
    body = seal(
        beta_identity,
        entry(beta, "gamma"),
        session=session_id(),
        seq=1,
        tag="x",
        payload=PAYLOAD,
    )
    assert_rejected(post(alpha, body), 403, "'gamma'")
    assert rejections(alpha)[-1] == "rejected wrong_recipient"


def test_stale_message_is_refused(
    alpha: LocalServer, alpha_entry: PeerEntry, beta_identity: Identity
) -> None:
    for skew in (-3600.0, +3600.0):
        body = seal(
            beta_identity,
            alpha_entry,
            session=session_id(),
            seq=1,
            tag="x",
            payload=PAYLOAD,
            now=time.time() + skew,
        )
        assert_rejected(post(alpha, body), 403, "timestamp")
        assert rejections(alpha)[-1] == "rejected stale"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"garbage \x00\xff\xfe not an envelope",
        json.dumps({"h": "x", "c": "y", "s": "z"}).encode(),
        msgpack.packb({"h": b"", "c": b"", "s": b""}),
        msgpack.packb([1, 2, 3]),
        b"\xdf\xff\xff\xff\xff",  # a map header claiming 2^32 - 1 entries
    ],
    ids=["empty", "garbage", "json", "empty-fields", "array", "huge-map"],
)
def test_garbage_is_refused(alpha: LocalServer, body: bytes) -> None:
    response = post(alpha, body)
    assert response.status_code in (400, 403), response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == response.status_code
    assert_healthy(alpha)


def test_oversized_declared_body_is_refused_before_reading(alpha: LocalServer) -> None:
    size = 2**31  # 2 GiB declared; not a byte of it is sent
    connection = http.client.HTTPConnection("127.0.0.1", alpha.port, timeout=10)
    try:
        connection.putrequest("POST", "/v1/peer")
        connection.putheader("content-type", MSGPACK)
        connection.putheader("content-length", str(size))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413
        problem = json.loads(response.read())
        assert problem["status"] == 413 and "limit" in problem["detail"]
    finally:
        connection.close()
    assert_healthy(alpha)


def test_oversized_streamed_body_is_refused(alpha: LocalServer) -> None:
    """A chunked body without a declared length is cut off once it passes the limit."""
    chunk = b"\x00" * (1024 * 1024)
    connection = http.client.HTTPConnection("127.0.0.1", alpha.port, timeout=20)
    status = None
    try:
        connection.putrequest("POST", "/v1/peer")
        connection.putheader("content-type", MSGPACK)
        connection.putheader("transfer-encoding", "chunked")
        connection.endheaders()
        try:
            for _ in range(80):  # 80 MiB, beyond the 64 MiB peer message limit
                connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            connection.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may stop reading once it has answered
        response = connection.getresponse()
        status = response.status
    finally:
        connection.close()
    assert status == 413
    assert_healthy(alpha)


def test_non_member_is_refused_after_its_header_not_its_whole_body(alpha: LocalServer) -> None:
    """The claimed sender is checked once the header is in: 30 MiB are never read or hashed."""
    mallory = Identity.generate("mallory")
    body = seal(
        mallory,
        identity(alpha).public_entry(alpha.url),
        session=session_id(),
        seq=1,
        tag="x",
        payload=b"\x00" * (30 * 1024 * 1024),
    )
    connection = http.client.HTTPConnection("127.0.0.1", alpha.port, timeout=10)
    try:
        connection.putrequest("POST", "/v1/peer")
        connection.putheader("content-type", MSGPACK)
        connection.putheader("content-length", str(len(body)))
        connection.endheaders()
        connection.send(body[:4096])  # the header and a little more; the rest never comes
        # answered without the rest of the body (the socket's timeout bounds a hang)
        response = connection.getresponse()
        problem = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 403
    assert "'mallory' is not a member" in problem["detail"]
    assert rejections(alpha)[-1] == "rejected not_a_member"
    assert_healthy(alpha)


def test_a_job_reusing_a_running_session_id_cannot_take_over_that_session(
    trio: LocalFederation,
) -> None:
    """The review's attack: another job with a running session's id is refused (409), and the
    running session still gets its messages and completes instead of timing out."""
    session = {"id": session_id(), "parties": ["alpha", "beta"]}
    alpha = trio.servers["alpha"].client(timeout=10)
    beta = trio.servers["beta"].client(timeout=10)
    victim = alpha.compute("smpc", "secure_sum", session=session, data=alpha.upload(np.arange(4.0)))
    # the victim's session is recorded and waits for beta
    wait_for(lambda: session_recorded(trio.servers["alpha"], session["id"]), "the session record")
    intruder = alpha.compute(
        "smpc", "secure_sum", session=session, data=alpha.upload(np.arange(4.0) + 100)
    )
    refused = failure(intruder, 20)
    assert refused.status == 409 and "already used" in refused.detail
    partner = beta.compute("smpc", "secure_sum", session=session, data=beta.upload(np.arange(4.0)))
    expected = {"sum": 12.0, "count": 8}
    assert victim.result(30, progress=False) == expected
    assert partner.result(30, progress=False) == expected


def test_message_moved_to_another_session_is_refused(
    alpha: LocalServer, alpha_entry: PeerEntry, beta_identity: Identity
) -> None:
    session_a, session_b = session_id(), session_id()
    outer = split(
        seal(beta_identity, alpha_entry, session=session_a, seq=1, tag="x", payload=PAYLOAD)
    )
    header = msgpack.unpackb(outer["h"])
    assert header["session"] == session_a
    moved_header = msgpack.packb({**header, "session": session_b})  # same key order
    assert list(msgpack.unpackb(moved_header)) == list(header)
    moved = {**outer, "h": moved_header}
    assert_rejected(post(alpha, join(moved)), 403, "signature")
    # nor may the attacker re-seal the stolen ciphertext under another member's name
    mallory_as_gamma = Identity.generate("gamma")
    moved_again = seal(
        mallory_as_gamma, alpha_entry, session=session_b, seq=1, tag="x", payload=PAYLOAD
    )
    assert post(alpha, moved_again).status_code == 403
    assert post(alpha, join(outer)).status_code == 202


def test_every_rejection_is_audited(
    alpha: LocalServer, alpha_entry: PeerEntry, beta_identity: Identity
) -> None:
    before = len(rejections(alpha))
    body = seal(beta_identity, alpha_entry, session=session_id(), seq=1, tag="x", payload=PAYLOAD)
    outer = split(body)
    assert post(alpha, join({**outer, "c": flip(outer["c"], 3)})).status_code == 403
    assert post(alpha, b"nonsense").status_code in (400, 403)
    assert post(alpha, body).status_code == 202
    assert post(alpha, body).status_code == 409
    after = rejections(alpha)
    assert after[before:] == ["rejected bad_signature", "rejected malformed", "rejected replay"]


def test_computations_still_work_after_the_attacks(trio: LocalFederation) -> None:
    for server in trio.servers.values():
        assert_healthy(server)
    fed = trio.federation()
    handles = fed.upload({name: np.arange(4.0) * (i + 1) for i, name in enumerate(fed.parties)})
    job = fed.compute("smpc", "secure_sum", {n: {"data": h} for n, h in handles.items()})
    assert job.results(timeout=30, progress=False) == [{"sum": 36.0, "count": 12}] * 3


def test_reused_session_id_is_refused(trio: LocalFederation) -> None:
    """A finished session's id cannot be run again: no party returns a (wrong) result."""
    fed = trio.federation()
    session = session_id()
    first = fed.upload({name: np.arange(5.0) for name in fed.parties})
    job = fed.compute(
        "smpc", "secure_sum", {n: {"data": h} for n, h in first.items()}, session=session
    )
    assert job.results(timeout=30, progress=False) == [{"sum": 30.0, "count": 15}] * 3
    second = fed.upload({name: np.arange(5.0) + 100 for name in fed.parties})
    again = fed.compute(
        "smpc", "secure_sum", {n: {"data": h} for n, h in second.items()}, session=session
    )
    for one in again.jobs:
        with pytest.raises(ServerError) as caught:
            one.result(45, progress=False)
        assert caught.value.status in (409, 422), caught.value
        assert "replay" in caught.value.detail or "session" in caught.value.detail


# -- dropouts (own federation, 3 s session timeout) ------------------------------------------


def own_servers(federation: LocalFederation) -> bool:
    """Every server process runs and its URL answers with its own name."""
    return all(
        server.process is not None
        and server.process.poll() is None
        and requests.get(server.url + "/v1/identity", timeout=5).json()["name"] == name
        for name, server in federation.servers.items()
    )


def start_federation(root: Path, names: tuple[str, ...], env: dict[str, str]) -> LocalFederation:
    """Start servers with ``env``; rebuild on fresh ports if another process took one."""
    for attempt in range(3):
        federation = LocalFederation(root / f"try{attempt}", names=names)
        try:
            with ThreadPoolExecutor(len(names)) as pool:
                list(pool.map(lambda server: server.start(env=env), federation.servers.values()))
        except RuntimeError:
            federation.stop()
            continue
        if own_servers(federation):
            return federation
        federation.stop()
    raise RuntimeError(f"could not start the federation {names} on free ports")


@pytest.fixture(scope="module")
def dropout_env() -> dict[str, str]:
    return {"FDRTD_SESSION_TIMEOUT": str(SESSION_TIMEOUT)}


@pytest.fixture(scope="module")
def short(
    tmp_path_factory: pytest.TempPathFactory, dropout_env: dict[str, str]
) -> Iterator[LocalFederation]:
    """Three servers whose sessions time out after 3 s."""
    federation = start_federation(tmp_path_factory.mktemp("short"), DROPOUT_NAMES, dropout_env)
    yield federation
    federation.stop()


@pytest.fixture
def running(short: LocalFederation, dropout_env: dict[str, str]) -> LocalFederation:
    """The short-timeout federation, with every server up (restarts any a test stopped)."""
    for server in short.servers.values():
        if server.process is None or server.process.poll() is not None:
            server.start(env=dropout_env)
    assert own_servers(short), "a restarted server lost its port to another process"
    return short


def start_on(
    federation: LocalFederation,
    names: tuple[str, ...],
    function: str = "secure_sum",
    data: Any = None,
    *,
    sid: str | None = None,
    **inputs: Any,
) -> dict[str, Job]:
    """Start ``function`` on ``names`` only, in a session (id ``sid``) that lists every server."""
    session = {"id": sid or session_id(), "parties": list(federation.servers)}
    jobs = {}
    for name in names:
        client: Client = federation.servers[name].client(timeout=10)
        handle = client.upload(np.arange(10.0) if data is None else data)
        jobs[name] = client.compute("smpc", function, session=session, data=handle, **inputs)
    return jobs


def failure(job: Job, timeout: float) -> ServerError:
    with pytest.raises(ServerError) as caught:
        job.result(timeout, progress=False)
    return caught.value


def test_dropout_setting_is_in_effect(running: LocalFederation) -> None:
    fed = running.federation(timeout=10)
    handles = fed.upload({name: np.arange(6.0) for name in fed.parties})
    job = fed.compute("smpc", "count", {n: {"data": h} for n, h in handles.items()})
    assert job.results(timeout=20, progress=False) == [{"count": 18}] * 3


def test_party_that_never_joins(running: LocalFederation) -> None:
    start = time.monotonic()
    jobs = start_on(running, ("d1", "d2"))
    for name, job in jobs.items():
        error = failure(job, 20)
        assert isinstance(error, PartyTimeout), (name, error)
        assert error.status == 504
        assert "'d3'" in error.detail
        assert f"{SESSION_TIMEOUT:g} s" in error.detail
    # they waited for the timeout before giving up (a lower bound, which a loaded machine
    # cannot break); how soon after it they gave up is bounded by failure()'s deadline only
    assert time.monotonic() - start >= SESSION_TIMEOUT - 0.5


def test_party_stopped_before_the_computation(
    running: LocalFederation, dropout_env: dict[str, str]
) -> None:
    running.servers["d3"].stop()
    try:
        jobs = start_on(running, ("d1", "d2"))
        for name, job in jobs.items():
            error = failure(job, 20)
            assert isinstance(error, PartyTimeout | ComputationFailed), (name, error)
            assert "'d3'" in error.detail
    finally:
        running.servers["d3"].start(env=dropout_env)
    for server in running.servers.values():
        assert_healthy(server)


def test_party_killed_mid_computation(
    running: LocalFederation, dropout_env: dict[str, str]
) -> None:
    # a long protocol: sixteen rounds of secure OR over 2 x 15 thresholds per element
    data = np.random.default_rng(5).normal(size=(50, 1500))
    victim = running.servers["d3"]
    sid = session_id()
    jobs = start_on(running, DROPOUT_NAMES, "minimum_maximum", data=data, sid=sid)
    # in the middle of the protocol: every party has joined the session, none has ended
    for server in running.servers.values():
        wait_for(lambda server=server: session_recorded(server, sid), f"{server.name} to join")
    assert jobs["d1"].status()["status"] == "running"
    assert victim.process is not None
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(timeout=10)
    try:
        for name in ("d1", "d2"):
            error = failure(jobs[name], 20)
            assert isinstance(error, PartyTimeout | ComputationFailed), (name, error)
            assert "'d3'" in error.detail
    finally:
        victim.stop()
        victim.start(env=dropout_env)
    for server in running.servers.values():
        assert_healthy(server)


def test_federation_recovers_after_dropouts(running: LocalFederation) -> None:
    fed = running.federation(timeout=10)
    handles = fed.upload({name: np.arange(1.0, 5.0) for name in fed.parties})
    job = fed.compute("smpc", "secure_sum", {n: {"data": h} for n, h in handles.items()})
    assert job.results(timeout=20, progress=False) == [{"sum": 30.0, "count": 12}] * 3
