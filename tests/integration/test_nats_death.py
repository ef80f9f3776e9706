"""When NATS dies for good, the controller and workers exit non-zero, for a supervisor to restart.

Real processes only: the embedded ``nats-server`` child of a real ``fdrtd-server
serve`` is killed with SIGKILL (found through ``/proc``), and a worker's
standalone ``nats-server`` is killed likewise. Nothing here measures time:
each test waits for a condition with a generous deadline.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from _processes import make_server, start_worker_with_new_home, wait_for

from fdrtd_server._embedded_nats import EmbeddedNats, write_private
from fdrtd_server.local import LocalServer
from fdrtd_server.server import EXIT_NATS_LOST

LOST = "the NATS server stopped"


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux ``/proc``)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        found.extend(int(child) for child in text.split())
    return found


def command(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def status(url: str, token: str = "") -> int | None:
    """The status code of GET ``url``, or None if nothing answers."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        return requests.get(url, headers=headers, timeout=3).status_code
    except requests.RequestException:
        return None


@pytest.fixture
def solo(tmp_path: Path) -> Iterator[LocalServer]:
    server = make_server(tmp_path)
    try:
        yield server
    finally:
        server.stop(kill=True)


def test_the_controller_exits_when_its_embedded_nats_dies_and_keeps_its_data(
    solo: LocalServer,
) -> None:
    solo.start()
    process = solo.process
    assert process is not None
    with solo.client() as client:
        data = client.upload(np.arange(12.0))
        result = client.compute("map", "aggregate", data=data)
        assert result.result(timeout=30)["sum"] == 66.0

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


def test_a_worker_exits_when_its_nats_dies(tmp_path: Path, nats_server: EmbeddedNats) -> None:
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


def test_the_controller_exits_when_reconnecting_to_an_external_nats_fails(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    url_file = tmp_path / "nats.url"
    write_private(url_file, nats_server.url + "\n")
    server = make_server(tmp_path)
    server.extra_args = ["--nats-url", f"file:{url_file}"]
    log = server.home / "server.log"
    try:
        server.start()
        process = server.process
        assert process is not None and nats_server.pid is not None
        os.kill(nats_server.pid, signal.SIGKILL)
        wait_for(lambda: process.poll() is not None, "the controller to exit")
    finally:
        server.stop(kill=True)
    assert process.returncode == EXIT_NATS_LOST
    (line,) = [line for line in log.read_text().splitlines() if LOST in line]
    assert "reconnecting failed" in line and "***@127.0.0.1" in line
    assert nats_server.url not in log.read_text()  # no password in the log
