"""A small asyncio HTTP/1.1 client for the peer gateway: POST with keep-alive.

The gateway sends many small messages to a few peers. Running ``requests``
in a thread pool cost milliseconds per message in thread hand-offs and GIL
convoys on a busy event loop; this client stays on the loop, keeps one or
more connections per peer open, and speaks just enough HTTP/1.1 for our own
``/v1/peer`` answers (``Content-Length`` bodies, or ``chunked``). TLS works
through ``asyncio.open_connection(ssl=...)`` for ``https://`` peers, with the
context the gateway gives (:meth:`fdrtd_server.tls.TlsFiles.peer_context`);
a handshake that fails says why (:class:`TlsRefused`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fdrtd_server.tls import describe_error

__all__ = ["HttpError", "PeerHttpClient", "TlsRefused"]

MAX_RESPONSE = 1024 * 1024
"""Largest answer body read from a peer (ours are a few dozen bytes)."""
MAX_HEADERS = 64
"""Most header lines (and chunked trailer lines) read from an answer."""
MAX_HEAD = 16 * 1024
"""Most bytes of status line and headers together; also the longest line read."""
IDLE_REUSE = 3.0
"""A connection idle longer than this is closed, not reused: servers close idle
keep-alive connections after a few seconds (uvicorn: 5 s), and a request written
into one that is being closed is lost."""


class HttpError(Exception):
    """The peer could not be reached or answered with something that is not HTTP."""


class TlsRefused(HttpError):
    """The TLS handshake with the peer failed: its certificate, or ours, was refused.

    Not a passing trouble: trying again changes nothing until a certificate
    or a setting is changed.
    """


class _Unanswered(HttpError):
    """The peer closed the connection before the first byte of its answer."""


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
    """POSTs bodies to peers' URLs, reusing connections.

    Args:
        timeout: Seconds one exchange may take, connecting included.
        max_idle: Most idle connections kept per peer.
        ssl_context: The TLS context for ``https://`` peers (default: the
            system's CA store, hostname checked).
        https_only: Refuse ``http://`` peers (:class:`TlsRefused`, before any
            connection): for a server with TLS settings, whose peers' messages
            must not travel in the clear because one member's URL says so.
    """

    def __init__(
        self,
        timeout: float = 10.0,
        max_idle: int = 8,
        ssl_context: ssl.SSLContext | None = None,
        *,
        https_only: bool = False,
    ) -> None:
        self.timeout = timeout
        self.max_idle = max_idle
        self.https_only = https_only
        self._pools: dict[str, _Pool] = {}
        self._ssl = ssl_context or ssl.create_default_context()

    def _pool(self, base_url: str) -> _Pool:
        pool = self._pools.get(base_url)
        if pool is None:
            parts = urlsplit(base_url)
            secure = parts.scheme == "https"
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise HttpError(
                    f"peer URL must be http(s)://host[:port], got scheme '{parts.scheme}'"
                )
            if self.https_only and not secure:
                raise TlsRefused(
                    f"its URL {base_url} is plain http://, and this server has TLS settings "
                    "('tls_cert' or 'tls_ca'): it sends to https:// members only. Give the "
                    "member its https:// URL (a certificate signed by the federation's CA, "
                    "setting 'tls_ca') in federation.toml"
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
                            pool.host, pool.port, ssl=pool.ssl, limit=MAX_HEAD
                        )
                    except ssl.SSLError as error:
                        raise TlsRefused(f"cannot connect: {describe_error(error)}") from None
                    except OSError as error:
                        raise HttpError(f"cannot connect: {type(error).__name__}") from None
                else:
                    reader, writer = kept
                try:
                    status, answer, keep = await self._exchange(
                        pool, reader, writer, path, body, content_type
                    )
                except (OSError, asyncio.IncompleteReadError, HttpError, ValueError) as error:
                    writer.close()
                    if kept is None:
                        if isinstance(error, _Unanswered) and pool.ssl is not None:
                            # TLS 1.3: a peer refuses a client certificate after the client's
                            # side of the handshake, and the alert reaches asyncio as a close
                            raise TlsRefused(
                                "it closed the new TLS connection without answering: it requires "
                                "a client certificate signed by the federation's CA (set "
                                "'tls_client_cert' and 'tls_client_key', or 'tls_cert' allowing "
                                "client authentication), or it stopped"
                            ) from None
                        if isinstance(error, HttpError):
                            raise
                        if isinstance(error, ssl.SSLError):
                            raise TlsRefused(
                                f"the connection failed: {describe_error(error)}"
                            ) from None
                        raise HttpError(f"the connection failed: {type(error).__name__}") from None
                    continue
                except BaseException:
                    # a timeout or a cancellation: the exchange is half done, never reuse it
                    writer.close()
                    raise
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
        status_line = await _line(reader, first=True)
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not _digits(parts[1], 3):
            raise HttpError("the answer is not HTTP/1.1")
        status = int(parts[1])
        headers: dict[str, str] = {}
        size = len(status_line)
        for _ in range(MAX_HEADERS + 1):
            line = await _line(reader)
            size += len(line)
            if line in (b"\r\n", b"\n"):
                break
            if size > MAX_HEAD:
                raise HttpError(f"the answer's headers are longer than {MAX_HEAD} bytes")
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon:
                raise HttpError("the answer has a malformed header line")
            headers[name.strip().lower()] = value.strip()
        else:
            raise HttpError(f"the answer has more than {MAX_HEADERS} header lines")
        if headers.get("transfer-encoding", "").lower() == "chunked":
            answer = await _chunked(reader)
            keep = True
        elif "content-length" in headers:
            declared = headers["content-length"]
            if not _digits(declared.encode("latin-1"), 19):
                raise HttpError("the answer's Content-Length is not a number of bytes")
            length = int(declared)
            if length > MAX_RESPONSE:
                raise HttpError(f"the answer is larger than {MAX_RESPONSE} bytes")
            answer = bytearray(await reader.readexactly(length))
            keep = True
        else:
            # no length: the body (if any) ends when the peer closes; never reuse this one
            answer = bytearray()
            keep = False
        keep = keep and headers.get("connection", "").lower() != "close"
        return status, bytes(answer), keep

    async def close(self) -> None:
        """Close every kept connection."""
        for pool in self._pools.values():
            for _, writer, _ in pool.idle:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            pool.idle.clear()


def _digits(text: bytes, most: int) -> bool:
    """Whether ``text`` is 1 to ``most`` ASCII digits (no sign, no space, no underscore)."""
    return 0 < len(text) <= most and all(0x30 <= byte <= 0x39 for byte in text)


async def _line(reader: asyncio.StreamReader, *, first: bool = False) -> bytes:
    """One line of the answer's head, at most :data:`MAX_HEAD` bytes, ending in a newline.

    Args:
        reader: The connection's reader.
        first: Whether this is the status line (a close before it is :class:`_Unanswered`).

    Raises:
        HttpError: If the line is longer, or the peer closes before its end.
    """
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise HttpError(f"the answer has a line longer than {MAX_HEAD} bytes") from None
    except asyncio.IncompleteReadError as error:
        if first and not error.partial:
            raise _Unanswered("the peer closed the connection without answering") from None
        raise HttpError("the peer closed the connection in the middle of its answer") from None
    return line


async def _chunked(reader: asyncio.StreamReader) -> bytearray:
    """A ``Transfer-Encoding: chunked`` body, at most :data:`MAX_RESPONSE` bytes.

    Raises:
        HttpError: If a chunk size is not hexadecimal, the body is too large,
            a chunk does not end in CRLF, or there are too many trailer lines.
    """
    answer = bytearray()
    while True:
        size_field = (await _line(reader)).split(b";")[0].strip()
        if not 0 < len(size_field) <= 8 or any(
            byte not in b"0123456789abcdefABCDEF" for byte in size_field
        ):
            raise HttpError("the answer has a malformed chunk size")
        size = int(size_field, 16)
        if size == 0:
            break
        if len(answer) + size > MAX_RESPONSE:
            raise HttpError(f"the answer is larger than {MAX_RESPONSE} bytes")
        answer += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise HttpError("the answer has a chunk that does not end in CRLF")
    for _ in range(MAX_HEADERS):
        if await _line(reader) in (b"\r\n", b"\n"):
            return answer
    raise HttpError(f"the answer has more than {MAX_HEADERS} trailer lines")
