"""A small asyncio HTTP/1.1 client for the peer gateway: POST with keep-alive.

The gateway sends many small messages to a few peers. Running ``requests``
in a thread pool cost milliseconds per message in thread hand-offs and GIL
convoys on a busy event loop; this client stays on the loop, keeps one or
more connections per peer open, and speaks just enough HTTP/1.1 for our own
``/v1/peer`` answers (``Content-Length`` bodies, or ``chunked``). TLS works
through ``asyncio.open_connection(ssl=...)`` for ``https://`` peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["HttpError", "PeerHttpClient"]

MAX_RESPONSE = 1024 * 1024
IDLE_REUSE = 3.0
"""A connection idle longer than this is closed, not reused: servers close idle
keep-alive connections after a few seconds (uvicorn: 5 s), and a request written
into one that is being closed is lost."""


class HttpError(Exception):
    """The peer could not be reached or answered with something that is not HTTP."""


@dataclass
class _Pool:
    host: str
    port: int
    ssl: ssl.SSLContext | None
    prefix: str
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = field(
        default_factory=list
    )

    def take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The most recently used idle connection that is still fresh; stale ones are closed."""
        limit = time.monotonic() - IDLE_REUSE
        while self.idle:
            reader, writer, since = self.idle.pop()
            if since >= limit and not writer.is_closing():
                return reader, writer
            writer.close()
        return None


class PeerHttpClient:
    """POSTs bodies to peers' URLs, reusing connections."""

    def __init__(self, timeout: float = 10.0, max_idle: int = 8) -> None:
        self.timeout = timeout
        self.max_idle = max_idle
        self._pools: dict[str, _Pool] = {}
        self._ssl = ssl.create_default_context()

    def _pool(self, base_url: str) -> _Pool:
        pool = self._pools.get(base_url)
        if pool is None:
            parts = urlsplit(base_url)
            secure = parts.scheme == "https"
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise HttpError(
                    f"peer URL must be http(s)://host[:port], got scheme '{parts.scheme}'"
                )
            pool = _Pool(
                host=parts.hostname,
                port=parts.port or (443 if secure else 80),
                ssl=self._ssl if secure else None,
                prefix=parts.path.rstrip("/"),
            )
            self._pools[base_url] = pool
        return pool

    async def post(
        self, base_url: str, path: str, body: bytes, content_type: str
    ) -> tuple[int, bytes, bool]:
        """POST ``body`` to ``base_url + path``; returns (status, response body, retried).

        ``retried`` is True when a kept-alive connection failed and the answer
        came on a new one: the peer may then have received the body twice.

        Raises:
            HttpError: If the peer cannot be reached or the answer is not HTTP.
            TimeoutError: If the whole exchange takes longer than the timeout.
        """
        pool = self._pool(base_url)
        async with asyncio.timeout(self.timeout):
            # a kept-alive connection may have been closed by the peer: retry once on a new one
            for attempt in range(2):
                # the retry always takes a new connection
                kept = pool.take() if attempt == 0 else None
                if kept is None:
                    try:
                        reader, writer = await asyncio.open_connection(
                            pool.host, pool.port, ssl=pool.ssl
                        )
                    except OSError as error:
                        raise HttpError(f"cannot connect: {type(error).__name__}") from None
                else:
                    reader, writer = kept
                try:
                    status, answer, keep = await self._exchange(
                        pool, reader, writer, path, body, content_type
                    )
                except (OSError, asyncio.IncompleteReadError, HttpError) as error:
                    writer.close()
                    if kept is None:
                        raise HttpError(
                            f"peer closed the connection: {type(error).__name__}"
                        ) from None
                    continue
                if keep and len(pool.idle) < self.max_idle:
                    pool.idle.append((reader, writer, time.monotonic()))
                else:
                    writer.close()
                return status, answer, attempt > 0
        raise HttpError("unreachable")  # pragma: no cover

    async def _exchange(
        self,
        pool: _Pool,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        path: str,
        body: bytes,
        content_type: str,
    ) -> tuple[int, bytes, bool]:
        head = (
            f"POST {pool.prefix}{path} HTTP/1.1\r\n"
            f"Host: {pool.host}:{pool.port}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: keep-alive\r\n\r\n"
        )
        # one gathered write: the body (up to tens of MiB) is not copied into the head
        writer.writelines([head.encode("latin-1"), body])
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise HttpError("the answer is not HTTP/1.1")
        status = int(parts[1])
        headers: dict[str, str] = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            answer = bytearray()
            while True:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    await reader.readline()
                    break
                answer += await reader.readexactly(size)
                await reader.readexactly(2)
                if len(answer) > MAX_RESPONSE:
                    raise HttpError("the answer is too large")
        else:
            length = int(headers.get("content-length", "0") or 0)
            if length > MAX_RESPONSE:
                raise HttpError("the answer is too large")
            answer = bytearray(await reader.readexactly(length))
        keep = headers.get("connection", "").lower() != "close"
        return status, bytes(answer), keep

    async def close(self) -> None:
        """Close every kept connection."""
        for pool in self._pools.values():
            for _, writer, _ in pool.idle:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            pool.idle.clear()
