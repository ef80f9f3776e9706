"""The gateway's HTTP client: kept-alive connections, the retry, and what a retry means.

A tiny asyncio HTTP server on 127.0.0.1 answers as a test needs: normally,
or by closing a kept-alive connection after reading a request (as a
restarting peer does), so that the client retries on a new connection.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable

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
