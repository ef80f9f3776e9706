"""A job whose process dies ends ``failed`` with a "restarted" message, and waits on it end.

Real processes only: ``fdrtd-server serve`` with its embedded ``nats-server``
is killed with SIGKILL in the middle of a slow job and started again on the
same home; with an external NATS, a controller is killed while a worker runs
a job (which must go on and finish), then the worker is killed (its job must
fail once its liveness key expires).
"""

from __future__ import annotations

import asyncio
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
import requests
from _processes import make_server, start_worker, wait_for
from nats.js.errors import NoKeysError

from fdrtd_client import errors as client_errors
from fdrtd_server._embedded_nats import EmbeddedNats, write_private
from fdrtd_server.bus import RUNNING_BUCKET
from fdrtd_server.local import LocalFederation, LocalServer

RESTART = "computation that was running when the server stopped has been marked failed"
"""The warning a start prints when it failed one job (the one that was running)."""
SLOW: dict[str, Any] = {"factor": 1.0, "steps": 100, "delay": 1.0}
"""``example.scaled_sum`` inputs that make it run for about 100 s."""


@pytest.fixture
def solo(tmp_path: Path, example_plugin: None) -> Iterator[LocalServer]:
    server = make_server(tmp_path)
    try:
        yield server
    finally:
        server.stop(kill=True)


def assert_failed_by_restart(view: dict[str, object]) -> None:
    assert view["status"] == "failed", view
    error = view["error"]
    assert isinstance(error, dict)
    assert error["status"] == 503
    assert "restarted" in str(error["detail"]) and "run it again" in str(error["detail"])


def test_a_job_running_when_the_server_is_killed_fails_at_the_restart(solo: LocalServer) -> None:
    solo.start()
    with solo.client() as client:
        data = client.upload(np.arange(30.0))
        finished = client.compute("map", "aggregate", data=data)
        assert finished.result(timeout=30)["count"] == 30
        job = client.compute("example", "scaled_sum", data=data, **SLOW)
        assert job.status()["status"] == "running"

    solo.stop(kill=True)  # SIGKILL: nothing can write the job's end
    solo.start()
    # the operator reads how many computations the restart failed
    told = [line for line in (solo.home / "server.log").read_text().splitlines() if RESTART in line]
    assert len(told) == 1 and " WARNING " in told[0] and told[0].endswith(f"1 {RESTART}"), told

    headers = {"authorization": f"Bearer {solo.token}"}
    # failed from the first look on: no waiting for a liveness key to expire
    view = requests.get(f"{solo.url}/v1/results/{job.handle}", headers=headers, timeout=10).json()
    assert_failed_by_restart(view)
    # a long poll and an event stream end at once too
    polled = requests.get(
        f"{solo.url}/v1/results/{job.handle}?wait=30", headers=headers, timeout=40
    ).json()
    assert_failed_by_restart(polled)
    events = requests.get(
        f"{solo.url}/v1/results/{job.handle}/events", headers=headers, timeout=40
    ).text
    assert '"status": "failed"' in events and "restarted" in events
    with solo.client() as client:
        with pytest.raises(client_errors.ServerError) as failed:
            client.job(job.handle).result(timeout=60)
        assert failed.value.status == 503
        assert "restarted" in str(failed.value)
        # what had finished is still there, and the server computes again
        assert client.job(finished.handle).result(timeout=10)["count"] == 30
        again = client.compute("example", "scaled_sum", data=data, factor=2.0, steps=2)
        assert again.result(timeout=30) == {"sum": 870.0}

    def audited() -> bool:
        lines = (solo.home / "audit.log").read_text().splitlines()
        return any(
            '"action":"job-end"' in line and job.handle in line and "RunnerStopped" in line
            for line in lines
        )

    wait_for(audited, "the audit log to record how the job ended")


def test_a_protocol_waiting_for_a_party_fails_at_the_restart(tmp_path: Path) -> None:
    """An smpc job whose other party never joins runs until the session timeout (30 s)."""
    with LocalFederation(tmp_path, ("alpha", "beta")) as federation:
        alpha = federation.servers["alpha"]
        session = {"id": secrets.token_hex(16), "parties": ["alpha", "beta"]}
        with alpha.client() as client:
            data = client.upload(np.arange(10.0))
            job = client.compute("smpc", "secure_sum", session=session, data=data)
            assert job.status()["status"] == "running"
        alpha.stop(kill=True)
        alpha.start()
        with alpha.client() as client:
            view = client.job(job.handle).status()
            assert_failed_by_restart(view)


# -- external NATS, controller and worker in processes of their own ---------------


async def _listed(url: str) -> set[str]:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        bucket = await nc.jetstream(timeout=5).key_value(RUNNING_BUCKET)
        try:
            return set(await bucket.keys())
        except NoKeysError:
            return set()
    finally:
        await nc.close()


def listed(url: str) -> set[str]:
    """The result handles in ``fdrtd_running`` (jobs running on past their start)."""
    return asyncio.run(_listed(url))


class Worker:
    """``fdrtd-server worker`` for a home, against a NATS URL kept in a file."""

    def __init__(self, home: Path, url_file: Path) -> None:
        self.process = start_worker(home, url_file, home / "worker.log")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=15)


def test_a_controller_restart_spares_a_live_worker_and_a_dead_worker_fails_its_job(
    tmp_path: Path, nats_server: EmbeddedNats, example_plugin: None
) -> None:
    url_file = tmp_path / "nats.url"
    write_private(url_file, nats_server.url + "\n")
    server = make_server(tmp_path)
    server.extra_args = ["--nats-url", f"file:{url_file}", "--no-local-microservices"]
    worker = Worker(server.home, url_file)
    try:
        server.start(ready_timeout=60)  # ready once the worker's data microservice answers
        with server.client() as client:
            data = client.upload(np.arange(30.0))
            spared = client.compute("example", "scaled_sum", data=data, steps=6, delay=1.0)
            doomed = client.compute("example", "scaled_sum", data=data, **SLOW)
            assert spared.status()["status"] == "running"

        server.stop(kill=True)
        server.start(ready_timeout=60)
        with server.client() as client:
            # the worker never stopped: its jobs go on, and end as they should
            assert client.job(spared.handle).result(timeout=60) == {"sum": 435.0}
            # listed while it ran, off the list once it ended
            wait_for(lambda: spared.handle not in listed(nats_server.url), "the end to be unlisted")
            assert doomed.handle in listed(nats_server.url)
            assert client.job(doomed.handle).status()["status"] == "running"

            worker.kill()
            # nobody runs it any more: it fails once the worker's liveness key expires
            with pytest.raises(client_errors.ServerError) as failed:
                client.job(doomed.handle).result(timeout=90)
            assert failed.value.status == 503
            assert "restarted" in str(failed.value)
    finally:
        worker.kill()
        server.stop()
    assert worker.process.returncode == -signal.SIGKILL
