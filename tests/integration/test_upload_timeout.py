"""A registration the controller stops waiting for leaves no dataset and a true audit record.

The controller waits :data:`~fdrtd_server.app.BUS_TIMEOUT` seconds for the
data microservice, then deletes the upload and audits it as refused. Before,
``register`` went on and stored the dataset anyway: an orphan, and a false
audit record. Now ``register`` gets a budget shorter than that wait, records
nothing after it, and undoes a record that went in late.

The controller and the data microservice run in this process (uvicorn in a
thread, a real nats-server, real HTTP on 127.0.0.1) with shortened times,
and the dataset record is held on purpose until the controller has answered,
so that the controller's wait runs out while the microservice is about to
record the dataset.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import uvicorn
from _processes import wait_for

from fdrtd_server._embedded_nats import EmbeddedNats, free_port
from fdrtd_server.app import create_app
from fdrtd_server.bus import Bus
from fdrtd_server.config import TokenStore, init_home, load_settings
from fdrtd_server.http_common import State
from fdrtd_server.microservice import Environment, RunningMicroservices, start_microservices
from fdrtd_server.routes import data as controller
from microservices.data import service as data_service

WAIT = 5.0
"""The controller's shortened wait for the microservice (BUS_TIMEOUT)."""
BUDGET = 3.0
"""The microservice's shortened budget (REGISTER_BUDGET), shorter than WAIT as in production."""


class _Controller:
    def __init__(self, url: str, token: str, home: Path) -> None:
        self.url, self.token, self.home = url, token, home
        self.answered = threading.Event()
        """Set by the test once the controller answered (gave up waiting)."""
        self.recorded = threading.Event()
        """Set once the slow record of the dataset is written."""
        self.undone = threading.Event()
        """Set once a record written late is deleted again."""

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    def datasets(self) -> list[str]:
        answer = requests.get(self.url + "/v1/data", headers=self.headers, timeout=10)
        assert answer.status_code == 200, answer.text[:300]
        return [entry["handle"] for entry in answer.json()["datasets"]]

    def audit(self, action: str) -> list[dict[str, Any]]:
        lines = (self.home / "audit.log").read_text("utf-8").splitlines()
        return [r for r in map(json.loads, lines) if r.get("action") == action]


@pytest.fixture
def slow_controller(
    tmp_path: Path, nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> Iterator[_Controller]:
    home = tmp_path / "home"
    port = free_port()
    init_home(home, "slow", port=port)
    token = TokenStore(home).add("analyst")
    settings = load_settings(home, {"nats_url": nats_server.url})
    made = _Controller("", token, home)
    monkeypatch.setattr(controller, "BUS_TIMEOUT", WAIT)
    monkeypatch.setattr(controller, "REGISTER_BUDGET", BUDGET)
    real_put_set = Bus.put_set

    async def slow_put_set(self: Bus, handle: str, description: dict[str, Any]) -> None:
        # the record of the dataset is written only after the controller stopped waiting
        for _ in range(3000):  # 60 s at most, should the controller never answer
            if made.answered.is_set():
                break
            await asyncio.sleep(0.02)
        await real_put_set(self, handle, description)
        made.recorded.set()

    real_delete_set = Bus.delete_set

    async def watched_delete_set(self: Bus, handle: str) -> None:
        await real_delete_set(self, handle)
        if made.recorded.is_set():
            made.undone.set()

    monkeypatch.setattr(Bus, "put_set", slow_put_set)
    monkeypatch.setattr(Bus, "delete_set", watched_delete_set)
    running: dict[str, Any] = {}

    async def on_start(state: State) -> None:
        bus = await Bus.connect(nats_server.url, name="slow-data")
        running["bus"] = bus
        running["services"] = await start_microservices(
            bus, Environment(server="slow"), {"data": data_service}
        )

    async def on_stop(state: State) -> None:
        services: RunningMicroservices = running["services"]
        await services.stop()
        await running["bus"].close()

    app = create_app(settings, nats_server.url, on_start=on_start, on_stop=on_stop)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), "the controller to start")
    assert server.started, "the controller did not start"
    made.url = f"http://127.0.0.1:{port}"
    try:
        yield made
    finally:
        server.should_exit = True
        thread.join(20)


@pytest.mark.parametrize("fmt", ["raw", "csv"])
def test_timed_out_registration_leaves_no_orphan_and_is_audited_as_refused(
    slow_controller: _Controller, fmt: str
) -> None:
    body = np.arange(16.0).tobytes() if fmt == "raw" else b"x\n" + b"1\n" * 16
    params = {"format": fmt, **({"dtype": "<f8"} if fmt == "raw" else {})}
    response = requests.post(
        slow_controller.url + "/v1/data",
        params=params,
        data=body,
        headers=slow_controller.headers,
        timeout=30,
    )
    assert response.status_code == 503, response.text[:300]
    assert "try again" in response.json()["detail"]
    # the controller gave up: only now does the microservice record the dataset, late ...
    slow_controller.answered.set()
    # ... and undo that
    wait_for(slow_controller.undone.is_set, "the late record to be undone")
    # ... and undoes it: no dataset, and the audit record says what happened
    assert slow_controller.datasets() == []
    (record,) = slow_controller.audit("upload")
    assert record["outcome"] == "refused 503"
    handle = record["target"]
    described = requests.get(
        f"{slow_controller.url}/v1/data/{handle}", headers=slow_controller.headers, timeout=10
    )
    assert described.status_code == 404
    assert requests.get(slow_controller.url + "/healthz", timeout=5).status_code == 200
