"""``fail_orphaned_jobs`` against a real nats-server: who is failed, who is spared.

The records are written as a runner writes them (listed in ``fdrtd_running``,
then recorded in ``fdrtd_jobs``); liveness keys come from a real
:class:`~fdrtd_server.runners.Heartbeat`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from nats.js.errors import NoKeysError

from fdrtd_client import wire
from fdrtd_server._embedded_nats import EmbeddedNats
from fdrtd_server.bus import Bus, JobRecord, RecordChanged, new_handle, now_iso
from fdrtd_server.microservice import Environment, start_microservices
from fdrtd_server.runners import RESTARTED, Heartbeat, fail_orphaned_jobs, new_runner_id


async def _start(bus: Bus, runner: str, status: str = "running") -> str:
    handle = new_handle("result")
    record = JobRecord("ana", "example", "slow", status, created=now_iso(), runner=runner)
    await bus.list_running(handle, runner)
    await bus.put_job(handle, record)
    return handle


async def _listed(bus: Bus) -> set[str]:
    try:
        return set(await bus.running.keys())
    except NoKeysError:  # nothing listed
        return set()


async def _scenario(url: str) -> None:
    bus = await Bus.connect(url)
    try:
        live, own, dead = new_runner_id(), new_runner_id(), new_runner_id()
        heartbeat = await Heartbeat(bus, live).start()
        orphan = await _start(bus, dead)
        spared = await _start(bus, live)
        mine = await _start(bus, own)
        ended = await _start(bus, dead, "done")

        assert await fail_orphaned_jobs(bus, alive=(own,)) == 1
        failed = await bus.get_job(orphan)
        assert failed is not None
        assert (failed[0].status, failed[0].error_status, failed[0].error) == (
            "failed",
            503,
            RESTARTED,
        )
        for handle, status in ((spared, "running"), (mine, "running"), (ended, "done")):
            current = await bus.get_job(handle)
            assert current is not None and current[0].status == status
        # the ended and the failed job are off the list; the others stay on it
        assert await _listed(bus) == {spared, mine}

        # a freshly started embedded NATS: nobody of before can be alive
        assert await fail_orphaned_jobs(bus, everyone_gone=True) == 2
        assert await _listed(bus) == set()
        await heartbeat.stop()
    finally:
        await bus.close()


def test_only_jobs_whose_runner_is_gone_are_failed(nats_server: EmbeddedNats) -> None:
    asyncio.run(_scenario(nats_server.url))


def on_bus(url: str, scenario: Callable[[Bus], Awaitable[None]]) -> None:
    """Run ``scenario`` on a connection to the NATS at ``url``."""

    async def run() -> None:
        bus = await Bus.connect(url)
        try:
            await scenario(bus)
        finally:
            await bus.close()

    asyncio.run(run())


async def _unreadable(bus: Bus) -> None:
    dead = new_runner_id()
    broken = new_handle("result")
    await bus.list_running(broken, dead)
    await bus.jobs.put(broken, wire.packb("not a job record"))
    orphan = await _start(bus, dead)
    # the broken one is logged and skipped; the others are failed all the same
    assert await fail_orphaned_jobs(bus, everyone_gone=True) == 1
    failed = await bus.get_job(orphan)
    assert failed is not None and failed[0].status == "failed"
    # and a process that runs microservices starts all the same
    running = await start_microservices(bus, Environment(server="solo"), {})
    await running.stop()


def test_a_record_the_sweep_cannot_read_stops_neither_the_sweep_nor_a_start(
    nats_server: EmbeddedNats,
) -> None:
    on_bus(nats_server.url, _unreadable)


async def _unrecorded(bus: Bus) -> None:
    handle, dead = new_handle("result"), new_runner_id()
    await bus.list_running(handle, dead)  # the runner stalled between its two writes
    await fail_orphaned_jobs(bus)
    assert handle not in await _listed(bus)
    # the runner wakes up: its running record must not be written, or nobody would
    # ever fail it
    late = JobRecord("ana", "example", "slow", "running", created=now_iso(), runner=dead)
    with pytest.raises(RecordChanged):
        await bus.put_job(handle, late)
    current = await bus.get_job(handle)
    assert current is not None and current[0].status == "failed"


def test_a_listed_job_without_a_record_cannot_be_recorded_after_the_sweep(
    nats_server: EmbeddedNats,
) -> None:
    on_bus(nats_server.url, _unrecorded)
