"""Scale-out on NATS: a controller without microservices and separate worker processes.

Every test here runs real processes against a standalone ``nats-server``
with JetStream (the ``nats_server`` fixture): ``fdrtd-server serve HOME
--nats-url URL --no-local-microservices`` as the controller and ``fdrtd-server
worker --nats-url URL`` as workers. The NATS service API (``$SRV.PING``,
``$SRV.INFO``, ``$SRV.STATS``) is queried directly with nats-py, as standard
NATS tooling would, to see which worker handled what.

The last tests are unit tests of the plugin interface (``discover`` and the
``Microservice`` rules), which need no processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import numpy as np
import pytest
import requests
from nats.js.errors import NotFoundError

import fdrtd_client
from fdrtd_client import errors as client_errors
from fdrtd_server._embedded_nats import EmbeddedNats, free_port
from fdrtd_server.bus import DATA_BUCKET
from fdrtd_server.config import TokenStore, init_home
from fdrtd_server.microservice import CallContext, JobContext, Microservice, discover

SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$"
)
BUILT_IN = ("data", "map", "smpc")


# -- helpers -------------------------------------------------------------------


class Processes:
    """Processes started by one test; every one is terminated and waited for."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, label: str, *args: str) -> subprocess.Popen[bytes]:
        """Start ``python -m fdrtd_server ARGS`` with its output in ``<label>.log``."""
        with (self.log_dir / f"{label}.log").open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "fdrtd_server", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.running[label] = process
        return process

    def stop(self, label: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` to the process, wait for it, and return its exit code."""
        process = self.running.pop(label)
        if process.poll() is None:
            process.send_signal(sig)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
            raise AssertionError(f"{label} did not stop within {timeout:g} s") from None

    def stop_all(self) -> None:
        """Terminate everything still running (SIGKILL if SIGTERM is not enough)."""
        for label in list(self.running):
            process = self.running.pop(label)
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def logs(self) -> str:
        """The last lines of every log, for assertion messages."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            tail = path.read_text("utf-8", "replace").splitlines()[-15:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)


@pytest.fixture
def nats_url(nats_server: EmbeddedNats) -> str:
    """The URL of the ``nats_server`` fixture (which stops it on teardown)."""
    return nats_server.url


@pytest.fixture
def procs(tmp_path: Path, nats_url: str) -> Iterator[Processes]:
    # depends on nats_url so that the processes stop before their NATS does
    group = Processes(tmp_path / "logs")
    try:
        yield group
    finally:
        group.stop_all()


@dataclass
class Home:
    """A server home made for these tests."""

    path: Path
    port: int
    token: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> fdrtd_client.Client:
        return fdrtd_client.connect(self.url, self.token, timeout=15)


@pytest.fixture
def home(tmp_path: Path) -> Home:
    path = tmp_path / "h"
    port = free_port()
    init_home(path, "solo", port=port)
    return Home(path, port, TokenStore(path).add("analyst"))


def wait_until(
    condition: Callable[[], bool], what: str, procs: Processes, timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}\n{procs.logs()}")


def http_status(url: str) -> int | None:
    """The status code of GET ``url``, or None if nothing answers."""
    try:
        return requests.get(url, timeout=3).status_code
    except requests.ConnectionError:
        return None


def start_controller(procs: Processes, home: Home, nats_url: str) -> subprocess.Popen[bytes]:
    process = procs.start(
        "serve", "serve", str(home.path), "--nats-url", nats_url, "--no-local-microservices"
    )

    def alive_and_healthy() -> bool:
        assert process.poll() is None, f"the controller exited\n{procs.logs()}"
        return http_status(home.url + "/healthz") == 200

    wait_until(alive_and_healthy, "the controller's /healthz", procs)
    return process


def start_worker(
    procs: Processes, label: str, nats_url: str, home: Home
) -> subprocess.Popen[bytes]:
    # a worker always follows a server home's settings and policy (--home is required)
    return procs.start(label, "worker", "--nats-url", nats_url, "--home", str(home.path))


async def _gather(url: str, subject: str, wait: float, expect: int | None) -> list[dict[str, Any]]:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    replies: list[dict[str, Any]] = []
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(subject, b"", reply=inbox)
        # a busy machine may answer late: wait up to 10 s for the replies
        # expected, then ``wait`` more for any unexpected extra one
        deadline = time.monotonic() + (wait if not expect else 10.0)
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=remaining)
            except nats.errors.TimeoutError:
                break
            if msg.headers and msg.headers.get("Status") == "503":
                break  # "no responders": nobody runs a service that answers this
            replies.append(json.loads(msg.data))
            if len(replies) == expect:
                deadline = time.monotonic() + wait
        await sub.unsubscribe()
    finally:
        await nc.close()
    return replies


def srv(url: str, subject: str, *, expect: int | None = None, wait: float = 0.5) -> list[Any]:
    """Replies to a ``$SRV`` discovery request.

    Gathered for ``wait`` seconds, or, with ``expect``, until that many replies
    came (at most 10 s) and then ``wait`` seconds more.
    """
    return asyncio.run(_gather(url, subject, wait, expect))


async def _stored_objects(url: str) -> list[str]:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        store = await nc.jetstream(timeout=5).object_store(DATA_BUCKET)
        try:
            entries = await store.list(ignore_deletes=True)
        except NotFoundError:
            entries = []
    finally:
        await nc.close()
    return sorted(str(entry.name) for entry in entries)


def stored_objects(url: str) -> list[str]:
    """Names of the datasets in the JetStream object store (deleted ones left out)."""
    return asyncio.run(_stored_objects(url))


def instances(url: str, verb: str, service: str, expect: int) -> list[dict[str, Any]]:
    """Replies of every instance of ``service`` to ``$SRV.<verb>.<service>``."""
    return srv(url, f"$SRV.{verb}.{service}", expect=expect)


def example_requests(url: str) -> int:
    """Requests the example microservice's instances have taken (``$SRV.STATS``)."""
    stats = srv(url, "$SRV.STATS.fdrtd-example", wait=0.3)
    return sum(endpoint["num_requests"] for each in stats for endpoint in each["endpoints"])


def service_name(microservice: str) -> str:
    """The NATS service name of a microservice (``nats.micro`` takes no '_')."""
    return f"fdrtd-{microservice}".replace("_", "-")


def wait_for_instances(url: str, count: int, procs: Processes) -> None:
    """Wait until every fdrtd microservice has ``count`` instances answering PING."""
    names = {service_name(name) for name in discover()}

    def complete() -> bool:
        counts = Counter(reply["name"] for reply in srv(url, "$SRV.PING", wait=0.3))
        return all(counts[name] == count for name in names)

    wait_until(complete, f"{count} instance(s) of {sorted(names)}", procs)


# -- scale-out -------------------------------------------------------------------


def test_two_workers_share_the_load_and_the_service_goes_when_they_go(
    nats_url: str, home: Home, procs: Processes, example_plugin: None
) -> None:
    url = nats_url
    start_controller(procs, home, url)
    # no microservice anywhere yet: alive, but not ready
    assert http_status(home.url + "/readyz") == 503
    with home.client() as client:
        with pytest.raises(client_errors.NotFound):
            client.upload(np.arange(5.0))
        assert stored_objects(url) == []  # the refused upload left nothing behind

        start_worker(procs, "worker1", url, home)
        start_worker(procs, "worker2", url, home)
        wait_until(lambda: http_status(home.url + "/readyz") == 200, "/readyz 200", procs)
        wait_for_instances(url, 2, procs)
        listed = {entry["name"]: entry for entry in client.microservices()}
        assert {name: listed[name]["instances"] for name in (*BUILT_IN, "example")} == {
            "data": 2,
            "map": 2,
            "smpc": 2,
            "example": 2,
        }

        sizes = (5, 8, 13, 21)
        handles = [client.upload(np.arange(float(n))) for n in sizes]
        map_jobs = [
            (n, client.compute("map", "aggregate", data=h))
            for n, h in zip(sizes * 10, handles * 10, strict=True)
        ]
        example_jobs = [
            (n, client.compute("example", "rows", data=h))
            for n, h in zip(sizes, handles, strict=True)
        ]
        scaled = [
            (n, client.compute("example", "scaled_sum", data=h, factor=2.0, steps=3))
            for n, h in zip(sizes[:2], handles[:2], strict=True)
        ]
        assert len(map_jobs) == 40
        for n, job in map_jobs:
            value = job.result(timeout=30)
            assert value["count"] == n
            assert value["sum"] == n * (n - 1) / 2
            assert value["sum_squares"] == sum(k * k for k in range(n))
        for n, job in example_jobs:
            assert job.result(timeout=30) == {"rows": n}
        for n, job in scaled:
            assert job.result(timeout=30) == {"sum": float(n * (n - 1))}

        # both workers did part of the work, and no request was counted twice
        stats = instances(url, "STATS", "fdrtd-map", 2)
        assert len(stats) == 2, stats
        assert len({s["id"] for s in stats}) == 2
        per_instance = [
            {e["name"]: e["num_requests"] for e in s["endpoints"]}["aggregate"] for s in stats
        ]
        assert all(count > 0 for count in per_instance), per_instance
        assert sum(per_instance) == 40
        example_stats = instances(url, "STATS", "fdrtd-example", 2)
        example_calls = Counter[str]()
        for instance in example_stats:
            for endpoint in instance["endpoints"]:
                example_calls[endpoint["name"]] += endpoint["num_requests"]
        assert example_calls == Counter({"rows": 4, "scaled_sum": 2})
        data_stats = instances(url, "STATS", "fdrtd-data", 2)
        assert sum(
            e["num_requests"] for s in data_stats for e in s["endpoints"] if e["name"] == "register"
        ) == len(sizes)

        # one worker goes: the other carries on alone
        assert procs.stop("worker1") == 0
        pings = instances(url, "PING", "fdrtd-map", 1)
        assert len(pings) == 1
        assert http_status(home.url + "/readyz") == 200
        survivors = [client.compute("map", "aggregate", data=h) for h in handles]
        for n, job in zip(sizes, survivors, strict=True):
            assert job.result(timeout=30)["count"] == n
        fresh = client.upload(np.arange(34.0))
        assert stored_objects(url) == sorted([*handles, fresh])
        assert client.compute("map", "aggregate", data=fresh).result(timeout=30)["count"] == 34

        # none left (the last one crashes): a prompt 404, not a hang; results stay
        assert procs.stop("worker2", signal.SIGKILL) == -signal.SIGKILL
        assert instances(url, "PING", "fdrtd-map", 0) == []
        # refused as absent (404), not after the bus timeout (which would be a 503)
        with pytest.raises(client_errors.NotFound) as refused:
            client.compute("map", "aggregate", data=handles[0])
        assert refused.value.status == 404
        assert "map" in str(refused.value)
        assert http_status(home.url + "/readyz") == 503
        assert map_jobs[0][1].result(timeout=5)["count"] == sizes[0]
        assert survivors[-1].status()["status"] == "done"


def test_controller_restart_keeps_handles_while_workers_run(
    nats_url: str, home: Home, procs: Processes, example_plugin: None
) -> None:
    url = nats_url
    start_controller(procs, home, url)
    worker = start_worker(procs, "worker", url, home)
    wait_until(lambda: http_status(home.url + "/readyz") == 200, "/readyz 200", procs)
    wait_for_instances(url, 1, procs)
    (before,) = instances(url, "PING", "fdrtd-example", 1)

    with home.client() as client:
        data = client.upload(np.arange(20.0))
        done = client.compute("map", "aggregate", data=data)
        assert done.result(timeout=30)["sum"] == 190.0
        slow = client.compute("example", "scaled_sum", data=data, factor=3.0, steps=4, delay=0.4)
        assert slow.status()["status"] in ("queued", "running")

    assert procs.stop("serve") == 0
    assert http_status(home.url + "/healthz") is None
    start_controller(procs, home, url)
    wait_until(lambda: http_status(home.url + "/readyz") == 200, "/readyz 200 again", procs)

    with home.client() as client:
        assert client.job(done.handle).result(timeout=10)["sum"] == 190.0
        assert client.job(slow.handle).result(timeout=30) == {"sum": 570.0}
        assert client.describe(data)["rows"] == 20
        again = client.compute("map", "aggregate", data=data).result(timeout=30)
        assert (again["count"], again["sum"]) == (20, 190.0)
        assert [d["handle"] for d in client.datasets()] == [data]

    # the very same worker (process and service instance) did all of it
    assert worker.poll() is None
    (after,) = instances(url, "PING", "fdrtd-example", 1)
    assert after["id"] == before["id"]
    stats = {
        e["name"]: e["num_requests"]
        for e in instances(url, "STATS", "fdrtd-map", 1)[0]["endpoints"]
    }
    assert stats["aggregate"] == 2


def test_a_worker_that_stops_answers_a_held_start_at_once(
    nats_url: str, home: Home, procs: Processes, example_plugin: None
) -> None:
    """A start request held for its job (``?wait=``) is answered 503 when the worker stops."""
    start_controller(procs, home, nats_url)
    start_worker(procs, "worker", nats_url, home)
    wait_until(lambda: http_status(home.url + "/readyz") == 200, "/readyz 200", procs)
    wait_for_instances(nats_url, 1, procs)
    with fdrtd_client.connect(home.url, home.token, timeout=15, start_wait=20) as client:
        data = client.upload(np.arange(5.0))
        outcome: list[BaseException | object] = []

        def start() -> None:
            try:
                outcome.append(
                    client.compute(
                        "example", "scaled_sum", data=data, factor=1.0, steps=10, delay=1.0
                    )
                )
            except BaseException as error:  # the assertion below names it
                outcome.append(error)

        starter = threading.Thread(target=start)
        starter.start()
        # the worker took the start request and holds it: the job takes 10 s
        wait_until(lambda: example_requests(nats_url) >= 1, "the worker to take the start", procs)
        assert procs.stop("worker") == 0
        starter.join(timeout=20)
        assert not starter.is_alive()
        (error,) = outcome
        assert isinstance(error, client_errors.ServiceUnavailable), error
        # answered because the worker stopped, not when the bus timeout ran out
        assert "stopped" in error.detail


# -- discovery -----------------------------------------------------------------


def test_srv_discovery_names_versions_and_subjects(
    nats_url: str, procs: Processes, example_plugin: None, home: Home
) -> None:
    url = nats_url
    start_worker(procs, "disco", url, home)
    wait_for_instances(url, 1, procs)
    specs = discover()
    assert set(BUILT_IN) <= set(specs)

    pings = {reply["name"]: reply for reply in srv(url, "$SRV.PING", expect=len(specs))}
    # a NATS service name has '-' where a microservice name has '_' (vector_mean)
    expected_names = {service_name(name) for name in specs}
    assert expected_names <= set(pings)
    for name, spec in specs.items():
        ping = pings[service_name(name)]
        assert ping["type"] == "io.nats.micro.v1.ping_response"
        assert SEMVER.match(ping["version"]), ping["version"]
        assert ping["version"] == spec.version
        assert ping["metadata"] == {"fdrtd.microservice": name}

    infos = {reply["name"]: reply for reply in srv(url, "$SRV.INFO", expect=len(specs))}
    for name, spec in specs.items():
        info = infos[service_name(name)]
        assert info["version"] == spec.version
        assert info["description"] == spec.description
        endpoints = {e["name"]: e for e in info["endpoints"]}
        assert sorted(endpoints) == spec.functions
        for function, endpoint in endpoints.items():
            assert endpoint["subject"] == f"fdrtd.svc.{name}.{function}"
            assert endpoint["queue_group"] == "fdrtd"
            kind = "job" if function in spec.jobs else "call"
            assert set(endpoint["metadata"]) == {"kind", "fdrtd.signature"}
            assert endpoint["metadata"]["kind"] == kind
            # the declared inputs and outputs, for the controller's /v1/openapi.json
            declared = json.loads(endpoint["metadata"]["fdrtd.signature"])
            assert declared == spec.signatures[function].to_dict()

    # the built-in functions themselves, by name
    subjects = {e["subject"] for info in infos.values() for e in info["endpoints"]}
    assert {
        "fdrtd.svc.data.register",
        "fdrtd.svc.data.describe",
        "fdrtd.svc.map.aggregate",
        "fdrtd.svc.smpc.secure_sum",
        "fdrtd.svc.smpc.univariate",
    } <= subjects
    # a service-specific INFO request reaches only that service
    (map_info,) = instances(url, "INFO", "fdrtd-map", 1)
    assert map_info["name"] == "fdrtd-map"
    assert procs.stop("disco") == 0
    assert srv(url, "$SRV.PING", wait=0.3) == []


# -- the plugin interface, without processes -----------------------------------


def test_discover_loads_only_allowed_microservices(example_plugin: None) -> None:
    only_map = discover(allowed=("map",))
    assert list(only_map) == ["map"]
    assert isinstance(only_map["map"], Microservice)
    assert "aggregate" in only_map["map"].functions
    assert discover(allowed=("no_such_service",)) == {}
    everything = discover()
    assert {*BUILT_IN, "example"} <= set(everything)
    assert all(spec.name == key for key, spec in everything.items())


@pytest.mark.parametrize("name", ["Bad Name", "map-reduce", "1map", "", "x" * 33, "Map"])
def test_microservice_name_rule(name: str) -> None:
    with pytest.raises(ValueError, match="microservice name"):
        Microservice(name, "1.0.0", "a test service")


def test_function_registered_twice_is_refused() -> None:
    service = Microservice("twice", "1.0.0", "a test service")

    async def first(ctx: JobContext, inputs: dict[str, Any]) -> int:
        return 1

    async def direct(ctx: CallContext, inputs: dict[str, Any]) -> int:
        return 2

    service.job("go")(first)
    with pytest.raises(ValueError, match="registered twice"):
        service.job("go")(first)
    with pytest.raises(ValueError, match="registered twice"):
        service.call("go")(direct)
    service.call("ask")(direct)
    with pytest.raises(ValueError, match="registered twice"):
        service.job("ask")(first)
    with pytest.raises(ValueError, match="function name"):
        service.job("Not-A-Name")(first)
    assert service.functions == ["ask", "go"]
    assert (service.jobs, service.calls) == ({"go": first}, {"ask": direct})
