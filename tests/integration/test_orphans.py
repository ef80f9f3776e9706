"""Nothing a server starts outlives it, not even after ``kill -9``.

A PSI of at least :data:`~fdrtd_server.sdk.curve.PARALLEL_THRESHOLD` items per
party runs in the server's process pool, which ``multiprocessing`` builds
from a fork server and a resource tracker; with the embedded ``nats-server``
that makes five processes besides the server. After a SIGKILL the fork
server, the pool workers and the resource tracker used to stay alive (about
95 MB), each keeping the others. Each test records the server's process
tree while it runs, opens a pidfd on every process in it (so a recycled pid
cannot fool the wait), stops the server, and waits on those pidfds, with a
generous deadline, until every one of them has exited.

pytest is a child subreaper (``tests/conftest.py``), so the orphans become
its children; the test reaps the ones it recorded.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fdrtd_client import Federation
from fdrtd_server.lifeline import ORPHANED
from fdrtd_server.local import LocalFederation, LocalServer
from fdrtd_server.sdk import curve

pytestmark = pytest.mark.skipif(
    not hasattr(os, "pidfd_open") or not Path("/proc/self/stat").exists(),
    reason="needs Linux 5.3 or later (/proc and pidfds) to watch the processes",
)

POLICY = {"FDRTD_ALLOW_SET_INTERSECTION": "true"}
ITEMS = curve.PARALLEL_THRESHOLD + 1000
GONE_WITHIN = 60.0
"""A generous deadline for every process to exit; not a bound that is asserted."""


@pytest.fixture(scope="module")
def parties(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    if curve.default_workers() < 2:
        pytest.skip("one CPU: the PSI runs without a process pool")
    with LocalFederation(tmp_path_factory.mktemp("orphans"), env=POLICY) as federation:
        yield federation


def parents() -> dict[int, int]:
    """pid -> parent pid of every process (from ``/proc``)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue  # exited meanwhile
            found[int(entry)] = int(stat.rsplit(b")", 1)[1].split()[1])
    return found


def command(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def started_by(root: int) -> dict[int, str]:
    """Every process below ``root`` in the process tree, with its command line."""
    links = parents()
    tree, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in links.items() if parent == pid]
        for child in children:
            tree[child] = command(child)
        frontier.extend(children)
    return tree


def run_psi(federation: LocalFederation) -> None:
    """A 3-party intersection of ITEMS items per party, which the process pool computes."""
    shared = [f"c-{i:08d}" for i in range(0, ITEMS, 4)]
    sets = {name: shared + [f"{name}-{i:08d}" for i in range(ITEMS)] for name in federation.servers}
    clients = Federation({name: s.client(60) for name, s in federation.servers.items()})
    handles = clients.upload({name: {"v": values} for name, values in sets.items()})
    inputs = {name: {"data": handles[name], "column": "v"} for name in sets}
    for result in clients.compute("psi", "intersection", inputs).results(100):
        assert result["size"] == len(shared)


def running_server(federation: LocalFederation, name: str) -> LocalServer:
    server = federation.servers[name]
    if server.process is None:  # stopped by an earlier test
        server.start(env=federation.env)
    return server


def processes_of(server: LocalServer) -> dict[int, str]:
    """The server's process tree after a PSI, checked to hold every kind of process it starts."""
    assert server.process is not None
    tree = started_by(server.process.pid)
    forkservers = [
        pid
        for pid, line in tree.items()
        if "multiprocessing.forkserver" in line and parents().get(pid) == server.process.pid
    ]
    assert len(forkservers) == 1, tree
    workers = started_by(forkservers[0])
    assert len(workers) >= 2, tree  # the pool workers
    assert any("multiprocessing.resource_tracker" in line for line in tree.values()), tree
    assert any("nats-server" in line for line in tree.values()), tree
    return tree


def wait_until_gone(pidfds: dict[int, int], tree: dict[int, str]) -> list[str]:
    """Wait on the pidfds until every process has exited or the deadline passed.

    Returns:
        The command lines of the processes still alive at the deadline, which
        are then killed through their pidfds.
    """
    poller = select.poll()
    for handle in pidfds.values():
        poller.register(handle, select.POLLIN)
    alive = dict(pidfds)
    deadline = time.monotonic() + GONE_WITHIN
    while alive and (remaining := deadline - time.monotonic()) > 0:
        for handle, _ in poller.poll(remaining * 1000):
            poller.unregister(handle)
            alive = {pid: fd for pid, fd in alive.items() if fd != handle}
    for pid, handle in pidfds.items():
        if pid in alive:  # a failed test leaves nothing behind either
            signal.pidfd_send_signal(handle, signal.SIGKILL)
        os.close(handle)
        # orphans were re-parented to pytest: reap them (a pool worker is not ours)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    return [f"{pid}: {tree[pid]}" for pid in alive]


def open_pidfds(tree: dict[int, str]) -> dict[int, int]:
    """A pidfd for every process of ``tree`` still alive: it stays this process's."""
    pidfds = {}
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):  # exited already
            pidfds[pid] = os.pidfd_open(pid)
    return pidfds


def stop_and_watch(server: LocalServer, *, kill: bool) -> list[str]:
    tree = processes_of(server)
    pidfds = open_pidfds(tree)
    server.stop(kill=kill)
    return wait_until_gone(pidfds, tree)


def test_no_process_outlives_a_killed_server(parties: LocalFederation) -> None:
    server = running_server(parties, "alpha")
    run_psi(parties)
    survivors = stop_and_watch(server, kill=True)
    assert survivors == [], f"still alive after SIGKILL of the server: {survivors}"


def test_no_process_outlives_a_stopped_server(parties: LocalFederation) -> None:
    server = running_server(parties, "alpha")
    run_psi(parties)
    survivors = stop_and_watch(server, kill=False)
    assert survivors == [], f"still alive after SIGTERM of the server: {survivors}"


def test_the_pool_is_reused_between_computations(parties: LocalFederation) -> None:
    server = running_server(parties, "alpha")
    run_psi(parties)
    first = set(processes_of(server))
    run_psi(parties)
    assert set(processes_of(server)) == first


POOL_OWNER = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from fdrtd_server.lifeline import exit_with

context = multiprocessing.get_context("forkserver")
pool = ProcessPoolExecutor(1, context, initializer=exit_with, initargs=(os.getpid(),))
print(pool.submit(os.getpid).result(), flush=True)
pool.submit(time.sleep, 3600)  # a worker busy for an hour: only exit_with ends it
sys.stdin.read()
"""


def test_a_pool_worker_busy_when_its_owner_is_killed_exits_too() -> None:
    """The mechanism alone: any process pool with ``exit_with`` ends with its owner."""
    command = [sys.executable, "-c", POOL_OWNER]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as owner:
        try:
            assert owner.stdout is not None
            worker = int(owner.stdout.readline())
            tree = started_by(owner.pid)
            assert worker in tree, tree
            assert any("multiprocessing.forkserver" in line for line in tree.values()), tree
            assert any("multiprocessing.resource_tracker" in line for line in tree.values()), tree
            pidfds = open_pidfds(tree)
        finally:
            owner.kill()  # our own child, by its id
            owner.wait()
    survivors = wait_until_gone(pidfds, tree)
    assert survivors == [], f"still alive after SIGKILL of their owner: {survivors}"


def test_exit_with_a_pid_that_is_not_an_ancestor_ends_the_process_at_once() -> None:
    """A server gone before the child started (its pid free, or another process's)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for pid, status in ((gone.pid, ORPHANED), (1, ORPHANED), (os.getpid(), 0)):
        script = f"from fdrtd_server.lifeline import exit_with; exit_with({pid})"
        ran = subprocess.run(
            [sys.executable, "-c", script],
            timeout=60,
            check=False,
        )
        assert ran.returncode == status, (pid, ran.returncode)
