"""One job, one outcome: a runner that was slow, not dead, never overwrites the sweep's "failed".

A runner whose liveness key lapses (its event loop blocked, or NATS out of
reach, for longer than the key lives) is taken for dead by the sweep of
orphaned jobs, which marks its jobs failed. When the runner wakes, its next
write of the job's record must find the record changed and stop the job:
no "running" again, no "done", no second job-end event for the audit log.

Against a real ``nats-server``; the microservices run in this process, as
they do in the controller's. Every wait is for a condition.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.js.errors import NoKeysError

from fdrtd_client import wire
from fdrtd_server import runners
from fdrtd_server._embedded_nats import EmbeddedNats
from fdrtd_server.audit import JOBS_SUBJECT
from fdrtd_server.bus import SERVICE_PREFIX, Bus, JobRecord, new_handle
from fdrtd_server.microservice import (
    Environment,
    JobContext,
    Microservice,
    RunningMicroservices,
    start_microservices,
)
from fdrtd_server.runners import RESTARTED, fail_orphaned_jobs


@dataclass
class Gates:
    """What the test job waits for, and what it tells."""

    go: asyncio.Event = field(default_factory=asyncio.Event)
    reported: asyncio.Event = field(default_factory=asyncio.Event)


def _service(gates: Gates) -> Microservice:
    service = Microservice("gated", "1.0.0", "Waits for the test, reports progress, ends.")

    @service.job("step")
    async def step(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, int]:
        """Report progress, wait for the test, report progress again, end."""
        await ctx.progress(0.25)
        gates.reported.set()
        await gates.go.wait()
        await ctx.progress(0.5)
        return {"ok": 1}

    return service


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait until ``condition`` holds; fail naming ``what`` after a generous deadline."""
    deadline = time.monotonic() + 60
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _listed(bus: Bus) -> set[str]:
    try:
        return set(await bus.running.keys())
    except NoKeysError:
        return set()


@dataclass
class Setup:
    bus: Bus
    running: RunningMicroservices
    gates: Gates
    ends: list[dict[str, Any]]

    async def start(self, wait: float = 0) -> tuple[str, asyncio.Task[Any]]:
        """Start the job; return its handle and the start request (answered or held)."""
        handle = new_handle("result")
        message = {"principal": "ana", "role": "analyst", "inputs": {}, "result": handle}
        if wait:
            message["wait"] = wait
        request = asyncio.create_task(
            self.bus.nc.request(f"{SERVICE_PREFIX}.gated.step", wire.packb(message), timeout=60)
        )
        return handle, request

    async def record(self, handle: str) -> JobRecord | None:
        current = await self.bus.get_job(handle)
        return current[0] if current else None

    async def settled(self) -> None:
        """Wait until the job's task is gone, and every event it published has arrived."""

        async def idle() -> bool:
            return not any(runner.tasks for runner in self.running.runners)

        await until(idle, "the job's task to end")
        await self.bus.nc.flush()

    async def failed_once(self, handle: str) -> None:
        """Once the job's task is gone: it failed "restarted", unlisted, with one end event."""
        await self.settled()
        record = await self.record(handle)
        assert record is not None
        assert (record.status, record.error_status, record.error) == ("failed", 503, RESTARTED)
        assert handle not in await _listed(self.bus)
        mine = [event for event in self.ends if event["result"] == handle]
        assert [event["error_class"] for event in mine] == ["RunnerStopped"], mine


@asynccontextmanager
async def setup(url: str) -> AsyncIterator[Setup]:
    bus = await Bus.connect(url)
    ends: list[dict[str, Any]] = []

    async def ended(msg: Msg) -> None:
        ends.append(wire.unpackb(msg.data))

    await bus.nc.subscribe(JOBS_SUBJECT, cb=ended)
    gates = Gates()
    running = await start_microservices(bus, Environment(server="solo"), {"gated": _service(gates)})
    try:
        yield Setup(bus, running, gates, ends)
    finally:
        gates.go.set()
        await running.stop()
        await bus.close()


async def _sweep_first(url: str, *, as_a_starting_worker: bool) -> None:
    async with setup(url) as it:
        handle, request = await it.start()
        answer = wire.unpackb((await request).data)
        assert answer == {"result": handle, "status": "running"}
        assert handle in await _listed(it.bus)
        sweeper = await Bus.connect(url)
        try:
            if as_a_starting_worker:
                # the controller's key lapsed (its loop was busy); a worker starts and
                # sweeps, with no exemptions
                await it.bus.runners.delete(it.running.runner)
                started = await start_microservices(sweeper, Environment(server="solo"), {})
                await started.stop()
            else:
                assert await fail_orphaned_jobs(sweeper, everyone_gone=True) == 1
        finally:
            await sweeper.close()
        failed = await it.record(handle)
        assert failed is not None and (failed.status, failed.error) == ("failed", RESTARTED)

        it.gates.go.set()  # the runner wakes up and carries on
        await it.failed_once(handle)


def test_a_slow_runner_does_not_overwrite_the_failed_record_of_the_sweep(
    nats_server: EmbeddedNats,
) -> None:
    asyncio.run(_sweep_first(nats_server.url, as_a_starting_worker=False))


def test_a_starting_worker_fails_a_lapsed_controller_job_and_the_controller_stops_it(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runners, "HEARTBEAT_INTERVAL", 3600.0)  # the key stays lapsed
    asyncio.run(_sweep_first(nats_server.url, as_a_starting_worker=True))


async def _lapse(url: str) -> None:
    async with setup(url) as it:
        handle, request = await it.start()
        await request
        # the key expires (as after a blocked loop); the next beat finds it gone
        await it.bus.runners.delete(it.running.runner)

        async def failed() -> bool:
            record = await it.record(handle)
            return record is not None and record.finished

        await until(failed, "the runner to end its job after its key lapsed")
        await it.failed_once(handle)
        # the key is written again, and new jobs run as before
        assert (await it.bus.runners.get(it.running.runner)).value
        again, request = await it.start()
        await request
        it.gates.go.set()
        await it.settled()
        done = await it.record(again)
        assert done is not None and done.status == "done"


def test_a_runner_whose_key_lapsed_fails_its_running_jobs_once(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runners, "HEARTBEAT_INTERVAL", 0.05)
    asyncio.run(_lapse(nats_server.url))


async def _held(url: str) -> None:
    async with setup(url) as it:
        handle, request = await it.start(wait=30)
        await it.gates.reported.wait()  # progress() returned while the start is held
        # a kill -9 now must not leave a record "running" that no list knows of
        assert await it.record(handle) is None
        it.gates.go.set()
        answer = wire.unpackb((await request).data)
        assert answer["status"] == "done"
        assert (await it.record(handle)) is not None


def test_progress_of_a_held_start_is_written_only_with_the_first_record(
    nats_server: EmbeddedNats,
) -> None:
    asyncio.run(_held(nats_server.url))


async def _released(url: str) -> None:
    async with setup(url) as it:
        handle, request = await it.start()
        await request
        await it.bus.delete_job(handle)  # its owner releases it while it runs
        it.gates.go.set()
        await it.settled()
        assert await it.record(handle) is None  # not written again by its runner
        assert handle not in await _listed(it.bus)
        assert [event for event in it.ends if event["result"] == handle] == []


def test_a_job_released_while_it_runs_is_not_recorded_again(nats_server: EmbeddedNats) -> None:
    asyncio.run(_released(nats_server.url))
