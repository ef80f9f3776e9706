"""The gateway's HTTP client: kept-alive connections, the retry, and what a retry means.

A tiny asyncio HTTP server on 127.0.0.1 answers as a test needs: normally,
or by closing a kept-alive connection after reading a request (as a
restarting peer does), so that the client retries on a new connection; a raw
one answers with broken HTTP (negative lengths, bad chunks, endless headers),
and the client must fail clearly, at once, and close the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import types
from collections.abc import Awaitable, Callable

import pytest

from fdrtd_client import wire
from fdrtd_server import gateway as gateway_module
from fdrtd_server._http import PeerHttpClient
from fdrtd_server.gateway import Gateway
from fdrtd_server.identity import Identity

Answer = Callable[[int, int], bytes | None]
"""(connection number, request number on it) -> the response bytes, or None to hang up."""


def _response(status: int, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    return head.encode() + body


async def _serve(answer: Answer) -> tuple[asyncio.Server, int, list[bytes]]:
    received: list[bytes] = []
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number, requests = connections, 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                received.append(await reader.readexactly(length))
                requests += 1
                response = answer(number, requests)
                if response is None:
                    break
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port, received


def test_a_kept_connection_that_fails_is_retried_once_on_a_new_one() -> None:
    """The peer read the second request, then hung up: the client sends it again."""

    def answer(connection: int, request: int) -> bytes | None:
        if connection == 1 and request == 2:
            return None
        return _response(202, b'{"accepted":true}')

    async def run() -> tuple[list[tuple[int, bool]], list[bytes]]:
        server, port, received = await _serve(answer)
        client = PeerHttpClient(timeout=5)
        url = f"http://127.0.0.1:{port}"
        try:
            first = await client.post(url, "/v1/peer", b"one", "application/msgpack")
            second = await client.post(url, "/v1/peer", b"two", "application/msgpack")
        finally:
            await client.close()
            server.close()
        return [(first[0], first[2]), (second[0], second[2])], received

    outcomes, received = asyncio.run(run())
    assert outcomes == [(202, False), (202, True)]
    assert received == [b"one", b"two", b"two"]  # the peer saw the second body twice


def test_a_409_on_the_retry_means_the_first_copy_was_delivered() -> None:
    """The gateway reports the send as delivered, not as a refused replay."""

    def answer(connection: int, request: int) -> bytes | None:
        if connection == 1:
            return _response(202, b'{"accepted":true}') if request == 1 else None
        return _response(409, b'{"detail":"this peer message was already received (replay)"}')

    async def run() -> list[tuple[int, str]]:
        server, port, _ = await _serve(answer)
        client = PeerHttpClient(timeout=5)
        peer = Identity.generate("beta").public_entry(f"http://127.0.0.1:{port}")
        gateway = types.SimpleNamespace(http=client)
        try:
            first = await Gateway._post(gateway, peer, b"one")  # type: ignore[arg-type]
            retried = await Gateway._post(gateway, peer, b"two")  # type: ignore[arg-type]
            fresh = await Gateway._post(gateway, peer, b"three")  # type: ignore[arg-type]
        finally:
            await client.close()
            server.close()
        return [first, retried, fresh]

    first, retried, fresh = asyncio.run(run())
    assert first == (202, "")
    assert retried == (202, "")
    # a 409 on a connection that did not fail is a real refusal
    assert fresh[0] == 409
    assert "replay" in fresh[1] and "'beta'" in fresh[1]


# -- a peer that answers with something broken -------------------------------------------------


async def _raw_peer(
    answer: Callable[[asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.Server, int, list[asyncio.Future[None]]]:
    """A peer that reads one request, runs ``answer``, then waits for the client to hang up.

    Each connection adds a future that is set when the client closes the
    connection (it fails if the client has not within 30 s: a bound on a hang).
    """
    closed: list[asyncio.Future[None]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        closed.append(done)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            with contextlib.suppress(ConnectionError):
                await answer(writer)
            # the client must close its end: EOF (or a reset)
            with contextlib.suppress(ConnectionError):
                async with asyncio.timeout(30.0):
                    while await reader.read(65536):
                        pass
            done.set_result(None)
        except Exception as error:
            done.set_exception(error)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], closed


def _static(data: bytes) -> Callable[[asyncio.StreamWriter], Awaitable[None]]:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return answer


async def _endless_headers(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 202 Accepted\r\n")
    for number in range(100_000):  # bounded, but far more than any client may read
        writer.write(b"X-Filler-%d: yes\r\n" % number)
        await writer.drain()


async def _endless_chunks(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"\x00" * 65536
    for _ in range(1000):  # 64 MiB at most
        writer.write(b"10000\r\n" + chunk + b"\r\n")
        await writer.drain()


async def _endless_line(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 202 Accepted\r\nX-Long: ")
    for _ in range(1000):
        writer.write(b"a" * 65536)
        await writer.drain()


async def _half_answer(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 202 Acc")
    writer.write_eof()  # the peer stops sending in the middle of its status line


async def _silence(writer: asyncio.StreamWriter) -> None:
    """Answer nothing at all (the raw peer then only waits for the client to hang up)."""


BROKEN_ANSWERS: dict[str, tuple[Callable[[asyncio.StreamWriter], Awaitable[None]], str]] = {
    "negative length": (
        _static(b"HTTP/1.1 202 Accepted\r\nContent-Length: -1\r\n\r\n"),
        "Content-Length is not a number",
    ),
    "non-numeric length": (
        _static(b"HTTP/1.1 202 Accepted\r\nContent-Length: lots\r\n\r\n"),
        "Content-Length is not a number",
    ),
    "signed length": (
        _static(b"HTTP/1.1 202 Accepted\r\nContent-Length: +2\r\n\r\nok"),
        "Content-Length is not a number",
    ),
    "huge length": (
        _static(b"HTTP/1.1 202 Accepted\r\nContent-Length: 99999999999\r\n\r\n"),
        "larger than",
    ),
    "bad chunk size": (
        _static(b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n"),
        "malformed chunk size",
    ),
    "negative chunk size": (
        _static(b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nab\r\n"),
        "malformed chunk size",
    ),
    "huge chunk": (
        _static(b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\nfffffff\r\n"),
        "larger than",
    ),
    "chunk without CRLF": (
        _static(b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX"),
        "does not end in CRLF",
    ),
    "endless chunks": (_endless_chunks, "larger than"),
    "endless headers": (_endless_headers, "header lines"),
    "endless header line": (_endless_line, "line longer than"),
    "not HTTP": (_static(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), "not HTTP/1.1"),
    "bad status": (_static(b"HTTP/1.1 -20 X\r\nContent-Length: 0\r\n\r\n"), "not HTTP/1.1"),
    "hang-up mid-answer": (_half_answer, "closed the connection"),
}


async def _post_to(
    answer: Callable[[asyncio.StreamWriter], Awaitable[None]], timeout: float
) -> tuple[tuple[int, str], bool, int]:
    """Post one message to a raw peer that answers with ``answer``.

    Returns the gateway's outcome, whether the connection was closed (our side
    hung up while the raw peer waited), and how many connections the client kept
    for reuse. The post itself must end within 30 s (a generous deadline: it only
    bounds a hang), far below the hour a broken answer would cost if the client
    waited for its own timeout.
    """
    server, port, closed = await _raw_peer(answer)
    client = PeerHttpClient(timeout=timeout)
    peer = Identity.generate("beta").public_entry(f"http://127.0.0.1:{port}")
    gateway = types.SimpleNamespace(http=client)
    try:
        outcome = await asyncio.wait_for(
            Gateway._post(gateway, peer, b"one"),  # type: ignore[arg-type]
            30.0,
        )
        await asyncio.wait_for(closed[0], 30.0)  # the raw peer saw our side hang up
        hung_up = closed[0].done()
    finally:
        await client.close()
        server.close()
    return outcome, hung_up, sum(len(pool.idle) for pool in client._pools.values())


@pytest.mark.parametrize("case", list(BROKEN_ANSWERS))
def test_a_broken_answer_is_a_clear_error_and_the_connection_is_closed(case: str) -> None:
    answer, words = BROKEN_ANSWERS[case]

    (status, detail), hung_up, kept = asyncio.run(_post_to(answer, timeout=3600))
    assert status == 503
    assert detail.startswith("cannot reach party 'beta': ")
    assert words in detail, detail  # the broken answer, not the timeout, ended it
    assert hung_up  # our side closed the socket
    assert kept == 0  # and never keeps it for reuse


def test_a_peer_that_never_answers_times_out_and_the_socket_is_closed() -> None:
    (status, detail), hung_up, _ = asyncio.run(_post_to(_silence, timeout=0.5))
    assert status == 503 and "no answer within 0.5 s" in detail  # once, not retried
    assert hung_up


async def _refusal(answer: bytes) -> tuple[int, str]:
    """What the gateway makes of a peer that answers ``answer`` (the connection may stay open)."""
    server, port, _ = await _raw_peer(_static(answer))
    client = PeerHttpClient(timeout=3)
    peer = Identity.generate("beta").public_entry(f"http://127.0.0.1:{port}")
    try:
        return await Gateway._post(types.SimpleNamespace(http=client), peer, b"x")  # type: ignore[arg-type]
    finally:
        await client.close()
        server.close()


def test_a_peers_refusal_reaches_our_client_short_and_printable() -> None:
    detail = "\x1b[31mred\x00" + "x" * 900_000
    body = json.dumps({"detail": detail}).encode()

    status, text = asyncio.run(_refusal(_response(403, body)))
    assert status == 403
    assert text.startswith("party 'beta' refused the message: ?[31mred?xxx")
    assert len(text) < 300 and text.isprintable() and text.endswith("...")


@pytest.mark.parametrize(
    ("body", "expected"),
    [(b"<html>busy</html>", "(no readable reason given)"), (b"{}", "(no reason given)")],
)
def test_a_refusal_without_a_readable_reason_says_so(body: bytes, expected: str) -> None:
    assert asyncio.run(_refusal(_response(400, body))) == (
        400,
        f"party 'beta' refused the message: {expected}",
    )


def test_a_busy_peer_is_sent_the_message_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """503 means the peer did not take the message: it is sent again, a few times at most."""
    monkeypatch.setattr(gateway_module, "SEND_RETRIES", (0.01, 0.01, 0.01))
    busy = _response(503, b'{"detail":"busy; retry shortly"}')

    def twice_busy(connection: int, request: int) -> bytes | None:
        return busy if request <= 2 else _response(202, b'{"accepted":true}')

    def always_busy(connection: int, request: int) -> bytes | None:
        return busy

    async def run(answer: Answer) -> tuple[tuple[int, str], list[bytes]]:
        server, port, received = await _serve(answer)
        client = PeerHttpClient(timeout=3)
        peer = Identity.generate("beta").public_entry(f"http://127.0.0.1:{port}")
        try:
            outcome = await Gateway._post(types.SimpleNamespace(http=client), peer, b"m")  # type: ignore[arg-type]
        finally:
            await client.close()
            server.close()
        return outcome, received

    assert asyncio.run(run(twice_busy)) == ((202, ""), [b"m", b"m", b"m"])
    (status, detail), received = asyncio.run(run(always_busy))
    assert status == 503 and "busy; retry shortly" in detail
    assert len(received) == 4  # the first try and three more, then it gives up


def test_every_outgoing_request_from_a_worker_is_answered() -> None:
    """An unexpected failure is answered 500 with an incident id, never left unanswered."""
    published: list[tuple[str, dict[str, object]]] = []

    async def publish(subject: str, data: bytes) -> None:
        published.append((subject, wire.unpackb(data)))

    async def broken(request: dict[str, object]) -> dict[str, object]:
        raise RuntimeError("a bug")

    fake = types.SimpleNamespace(
        outgoing=broken,
        state=types.SimpleNamespace(
            bus=types.SimpleNamespace(nc=types.SimpleNamespace(publish=publish))
        ),
    )
    msg = types.SimpleNamespace(data=wire.packb({"to": "beta"}), reply="_INBOX.1")
    asyncio.run(Gateway.handle_outgoing(fake, msg))  # type: ignore[arg-type]
    assert len(published) == 1
    subject, answer = published[0]
    assert subject == "_INBOX.1" and answer["status"] == 500
    assert "internal error (incident " in str(answer["detail"]) and "a bug" not in str(
        answer["detail"]
    )
