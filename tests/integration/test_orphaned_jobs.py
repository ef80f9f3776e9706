"""``fail_orphaned_jobs`` against a real nats-server: who is failed, who is spared.

The records are written as a runner writes them (listed in ``fdrtd_running``,
then recorded in ``fdrtd_jobs``); liveness keys come from a real
:class:`~fdrtd_server.runners.Heartbeat`.
"""

from __future__ import annotations

import asyncio

from nats.js.errors import NoKeysError

from fdrtd_server._embedded_nats import EmbeddedNats
from fdrtd_server.bus import Bus, JobRecord, new_handle, now_iso
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
