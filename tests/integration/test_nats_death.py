"""When NATS dies for good, the controller and workers exit non-zero, for a supervisor to restart.

Real processes only: the embedded ``nats-server`` child of a real ``fdrtd-server
serve`` is killed with SIGKILL (found through ``/proc``), and a worker's
standalone ``nats-server`` is killed likewise. Nothing here measures time:
each test waits for a condition with a generous deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import numpy as np
import pytest
import requests
from _processes import make_server, start_worker_with_new_home, wait_for
from nats.aio.msg import Msg

from fdrtd_server._embedded_nats import (
    CLIENT_URL_FILE,
    EmbeddedNats,
    find_nats_server,
    read_url_file,
    write_private,
)
from fdrtd_server.bus import JOBS_BUCKET, RUNNER_TTL
from fdrtd_server.local import LocalServer
from fdrtd_server.server import EXIT_NATS_LOST

LOST = "the NATS server stopped"
PATIENCE = 3.0
"""``nats_reconnect_seconds`` of the tests that wait for a process to give NATS up."""


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux ``/proc``)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        found.extend(int(child) for child in text.split())
    return found


def command(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def status(url: str, token: str = "", timeout: float = 3) -> int | None:
    """The status code of GET ``url``, or None if nothing answers."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        return requests.get(url, headers=headers, timeout=timeout).status_code
    except requests.RequestException:
        return None


class ReadsOf:
    """Counts the reads of one job record on a NATS (its direct gets), from a thread of its own.

    Args:
        url_file: The file with the NATS URL (with credentials).
        handle: The job's result handle.
    """

    def __init__(self, url_file: Path, handle: str) -> None:
        self.url = read_url_file(url_file)
        self.subject = f"$JS.API.DIRECT.GET.KV_{JOBS_BUCKET}.$KV.{JOBS_BUCKET}.{handle}"
        self.count = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._listen()))

    async def _listen(self) -> None:
        nc = await nats.connect(self.url, connect_timeout=5, max_reconnect_attempts=0)

        async def seen(msg: Msg) -> None:
            self.count += 1

        try:
            await nc.subscribe(self.subject, cb=seen)
            await nc.flush()
            self._ready.set()
            while not self._stop.is_set():
                await asyncio.sleep(0.02)
        finally:
            await nc.close()

    def __enter__(self) -> ReadsOf:
        self._thread.start()
        assert self._ready.wait(30), "could not listen on the NATS"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.fixture
def solo(tmp_path: Path) -> Iterator[LocalServer]:
    server = make_server(tmp_path)
    try:
        yield server
    finally:
        server.stop(kill=True)


def test_the_controller_exits_when_its_embedded_nats_dies_and_keeps_its_data(
    solo: LocalServer, example_plugin: None
) -> None:
    solo.start()
    process = solo.process
    assert process is not None
    with solo.client() as client:
        data = client.upload(np.arange(12.0))
        result = client.compute("map", "aggregate", data=data)
        assert result.result(timeout=30)["sum"] == 66.0
        slow = client.compute("example", "scaled_sum", data=data, steps=100, delay=1.0)

    # a long poll held open while NATS dies: answered, refused (503), not left hanging
    held: list[int | None] = []
    url = f"{solo.url}/v1/results/{slow.handle}?wait=30"
    with ReadsOf(solo.home / "jetstream" / CLIENT_URL_FILE, slow.handle) as reads:
        poll = threading.Thread(target=lambda: held.append(status(url, solo.token, 60)))
        poll.start()
        # the owner check reads the record, then the long poll (after subscribing)
        wait_for(lambda: reads.count >= 2, "the long poll to be held")
    (nats,) = [pid for pid in children(process.pid) if "nats-server" in command(pid)]
    log = solo.home / "server.log"
    os.kill(nats, signal.SIGKILL)

    statuses_after_notice: list[int | None] = []
    api_statuses: set[int | None] = set()

    def exited() -> bool:
        noticed = LOST in log.read_text("utf-8", "replace")
        health = status(solo.url + "/healthz")
        if noticed:
            statuses_after_notice.append(health)
        # requests that meet the dead bus: refused (503) or not answered, never 500
        api_statuses.add(status(solo.url + "/v1/data", solo.token))
        api_statuses.add(status(f"{solo.url}/v1/results/{result.handle}", solo.token))
        return process.poll() is not None

    wait_for(exited, "the controller to exit after its NATS died")
    poll.join(timeout=90)
    assert held == [503]
    assert process.returncode == EXIT_NATS_LOST
    text = log.read_text("utf-8", "replace")
    (line,) = [line for line in text.splitlines() if LOST in line]
    assert " ERROR " in line and "supervisor can restart it" in line and "signal 9" in line
    assert "Traceback" not in text
    assert 200 not in statuses_after_notice
    assert api_statuses <= {200, 503, None}, api_statuses

    solo.process = None  # exited: start it again on the same home
    solo.start()
    with solo.client() as client:
        assert client.describe(data)["rows"] == 12
        assert client.job(result.handle).result(timeout=10)["sum"] == 66.0


def test_the_controller_exits_75_when_its_nats_dies_as_it_stops(solo: LocalServer) -> None:
    """SIGTERM and NATS's death at once (the controller is stopped meanwhile): code 75."""
    solo.start()
    process = solo.process
    assert process is not None
    (nats,) = [pid for pid in children(process.pid) if "nats-server" in command(pid)]
    os.kill(process.pid, signal.SIGSTOP)
    try:
        os.kill(nats, signal.SIGKILL)
        process.send_signal(signal.SIGTERM)
    finally:
        os.kill(process.pid, signal.SIGCONT)
    wait_for(lambda: process.poll() is not None, "the controller to exit")
    assert process.returncode == EXIT_NATS_LOST
    text = (solo.home / "server.log").read_text("utf-8", "replace")
    assert len([line for line in text.splitlines() if LOST in line]) == 1, text
    assert "Traceback" not in text


def connected(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a TCP connection to ``port`` on 127.0.0.1 (Linux ``/proc``)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    for row in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if state == "01" and int(remote.split(":")[1], 16) == port and inode in inodes:
            return True
    return False


def test_the_controller_exits_75_when_its_nats_dies_as_it_starts(tmp_path: Path) -> None:
    """NATS killed once the starting controller is connected to it, wherever its start is."""
    server = make_server(tmp_path)
    log = server.home / "server.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "fdrtd_server", "serve", str(server.home)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        nats: list[int] = []

        def nats_connected() -> bool:
            if not nats:
                nats.extend(p for p in children(process.pid) if "nats-server" in command(p))
            config = server.home / "jetstream" / "nats-server.conf"
            if not nats or not config.exists():
                return False
            port = int(config.read_text().split('listen: "127.0.0.1:')[1].split('"')[0])
            return connected(process.pid, port)

        wait_for(nats_connected, "the controller to connect to its embedded NATS")
        os.kill(process.pid, signal.SIGSTOP)
        try:
            os.kill(nats[0], signal.SIGKILL)
        finally:
            os.kill(process.pid, signal.SIGCONT)
        wait_for(lambda: process.poll() is not None, "the controller to exit")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
    assert process.returncode == EXIT_NATS_LOST
    text = log.read_text("utf-8", "replace")
    (line,) = [line for line in text.splitlines() if LOST in line]
    assert " ERROR " in line and "signal 9" in line
    assert "Traceback" not in text


def test_a_worker_exits_when_its_nats_dies(
    tmp_path: Path, nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FDRTD_NATS_RECONNECT_SECONDS", str(PATIENCE))
    worker, log = start_worker_with_new_home(tmp_path, nats_server)
    try:
        wait_for(lambda: "fdrtd worker for" in log.read_text(), "the worker to start")
        assert nats_server.pid is not None
        os.kill(nats_server.pid, signal.SIGKILL)
        wait_for(lambda: worker.poll() is not None, "the worker to exit after its NATS died")
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait(timeout=15)
    assert worker.returncode == EXIT_NATS_LOST
    (line,) = [line for line in log.read_text().splitlines() if LOST in line]
    assert " ERROR " in line and "supervisor can restart it" in line


def on_external_nats(root: Path, nats: EmbeddedNats) -> LocalServer:
    """A server (not started) for a fresh home under ``root``, on the standalone ``nats``."""
    url_file = root / "nats.url"
    write_private(url_file, nats.url + "\n")
    server = make_server(root)
    server.extra_args = ["--nats-url", f"file:{url_file}"]
    return server


def test_the_controller_exits_when_reconnecting_to_an_external_nats_fails(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    server = on_external_nats(tmp_path, nats_server)
    log = server.home / "server.log"
    try:
        server.start(env={"FDRTD_NATS_RECONNECT_SECONDS": str(PATIENCE)})
        process = server.process
        assert process is not None and nats_server.pid is not None
        os.kill(nats_server.pid, signal.SIGKILL)
        # not healthy while it tries to reconnect, for the PATIENCE seconds it has
        wait_for(lambda: status(server.url + "/healthz") == 503, "/healthz to answer 503")
        assert status(server.url + "/readyz") in (503, None)
        wait_for(lambda: process.poll() is not None, "the controller to exit")
    finally:
        server.stop(kill=True)
    assert process.returncode == EXIT_NATS_LOST
    (line,) = [line for line in log.read_text().splitlines() if LOST in line]
    assert "reconnecting failed" in line and "***@127.0.0.1" in line
    assert f"for {PATIENCE:g} s" in line
    assert nats_server.url not in log.read_text()  # no password in the log


def start_again(nats_server: EmbeddedNats) -> subprocess.Popen[bytes]:
    """Start the killed standalone nats-server again: same port, credentials and store."""
    return subprocess.Popen(
        [find_nats_server(), "--config", str(nats_server.config_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )


def test_the_controller_rides_out_a_restart_of_an_external_nats(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    """Killed and started again (same port, credentials, store): unhealthy meanwhile, not gone."""
    server = on_external_nats(tmp_path, nats_server)
    again: subprocess.Popen[bytes] | None = None
    try:
        server.start()  # with the default nats_reconnect_seconds
        process = server.process
        assert process is not None and nats_server.pid is not None
        with server.client() as client:
            data = client.upload(np.arange(12.0))
            result = client.compute("map", "aggregate", data=data)
            assert result.result(timeout=30)["sum"] == 66.0
        os.kill(nats_server.pid, signal.SIGKILL)
        wait_for(lambda: status(server.url + "/healthz") == 503, "/healthz to answer 503")
        again = start_again(nats_server)
        wait_for(lambda: status(server.url + "/healthz") == 200, "/healthz to recover")
        wait_for(lambda: status(server.url + "/readyz") == 200, "/readyz to recover")
        assert process.poll() is None
        with server.client() as client:
            assert client.job(result.handle).result(timeout=10)["sum"] == 66.0
            assert client.compute("map", "aggregate", data=data).result(timeout=30)["sum"] == 66.0
    finally:
        server.stop(kill=True)
        if again is not None:
            again.kill()
            again.wait(timeout=15)
    text = (server.home / "server.log").read_text("utf-8", "replace")
    assert LOST not in text and "Traceback" not in text


@pytest.mark.slow
def test_a_computation_that_needs_no_bus_outlives_a_nats_outage_longer_than_the_keys(
    tmp_path: Path, nats_server: EmbeddedNats, example_plugin: None
) -> None:
    """NATS away for longer than a liveness key lives (``RUNNER_TTL``), then back.

    Every runner's key lapsed meanwhile, which is not a sign that a runner
    died: a job that did not need the bus while NATS was away finishes
    ``done`` after it, and is not failed as if its server had restarted.
    """
    server = on_external_nats(tmp_path, nats_server)
    again: subprocess.Popen[bytes] | None = None
    try:
        server.start()  # with the default nats_reconnect_seconds (60 s)
        assert nats_server.pid is not None
        with server.client() as client:
            data = client.upload(np.arange(12.0))
            # the second step (and the bus) is needed only after the outage
            job = client.compute("example", "scaled_sum", data=data, steps=2, delay=RUNNER_TTL + 25)
            wait_for(
                lambda: job.status(value=False).get("progress", 0) >= 0.5, "the job's first step"
            )
        os.kill(nats_server.pid, signal.SIGKILL)
        wait_for(lambda: status(server.url + "/healthz") == 503, "/healthz to answer 503")
        # the scenario itself: an outage longer than a liveness key lives
        time.sleep(RUNNER_TTL + 3)
        again = start_again(nats_server)
        wait_for(lambda: status(server.url + "/healthz") == 200, "/healthz to recover")
        with server.client() as client:
            assert client.job(job.handle).result(timeout=90)["sum"] == 66.0
    finally:
        server.stop(kill=True)
        if again is not None:
            again.kill()
            again.wait(timeout=15)
