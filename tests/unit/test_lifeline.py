"""The polling fallback of :func:`fdrtd_server.lifeline.exit_with` (systems without pidfds).

Three real processes, as a server makes them: the "server", a "fork server"
it starts, and a "pool worker" the fork server starts, which calls
``exit_with(server)`` with ``os.pidfd_open`` taken away. The fork server
then exits while the server lives: the worker must live on. Once the server
is killed, the worker must end with :data:`~fdrtd_server.lifeline.ORPHANED`.

The worker prints a line after each of the lifeline's looks at the server,
with its parent at that moment, so the test waits for looks, never for time.
This pytest process is a child subreaper (see ``tests/conftest.py``), so
the orphaned worker becomes its child, and its exit status can be read here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fdrtd_server.lifeline import ORPHANED

WORKER = """
import os, sys, time
from fdrtd_server import lifeline
lifeline.POLL_SECONDS = 0.02
del os.pidfd_open  # as on a kernel before 5.3: the lifeline polls
looked = os.kill
def kill(pid, sig):
    looked(pid, sig)
    print("look", os.getppid(), flush=True)
os.kill = kill
lifeline.exit_with(int(sys.argv[1]))
print("ready", os.getpid(), os.getppid(), flush=True)
time.sleep(3600)
"""

FORK_SERVER = """
import os, subprocess, sys, time
out = open(sys.argv[1], "w")
subprocess.Popen([sys.executable, "-c", sys.argv[2], str(os.getppid())], stdout=out)
while "ready" not in open(sys.argv[1]).read():
    time.sleep(0.01)
"""

SERVER = """
import subprocess, sys
subprocess.run([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]], check=True)
print("fork server gone", flush=True)
sys.stdin.read()
"""


def wait_for(condition: object, what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after a generous deadline."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_pool_worker_outlives_its_fork_server_and_ends_with_the_server(tmp_path: Path) -> None:
    out = tmp_path / "worker.out"
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, FORK_SERVER, str(out), WORKER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    worker = 0
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == b"fork server gone\n"
        (ready,) = [line for line in out.read_text().splitlines() if line.startswith("ready")]
        worker, fork_server = int(ready.split()[1]), int(ready.split()[2])

        def looks_since_orphaned() -> int:
            parents = [line.split()[1] for line in out.read_text().splitlines() if "look" in line]
            return len([parent for parent in parents if int(parent) != fork_server])

        # the worker's parent is no longer the fork server, and it looked twice since
        wait_for(lambda: looks_since_orphaned() >= 2, "the worker to look at the server")
        assert os.waitpid(worker, os.WNOHANG) == (0, 0)  # alive
        server.kill()
        server.wait(timeout=30)
        ended: list[int] = []

        def reaped() -> bool:
            pid, status = os.waitpid(worker, os.WNOHANG)
            if pid:
                ended.append(status)
            return bool(pid)

        wait_for(reaped, "the worker to end with the server")
        assert os.waitstatus_to_exitcode(ended[0]) == ORPHANED
        worker = 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
        for pipe in (server.stdin, server.stdout):
            if pipe is not None:
                pipe.close()
        if worker:
            os.kill(worker, signal.SIGKILL)
            os.waitpid(worker, 0)
