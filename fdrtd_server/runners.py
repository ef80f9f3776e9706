"""Which process runs a job, whether it is still alive, and what becomes of its jobs if not.

A job lives in the memory of the process that runs it (the controller in the
embedded default, or a worker). If that process dies (``kill -9``, a crash, a
power cut), nothing would ever write the job's end, and a client waiting on
it would wait forever. So:

* every process that runs microservices draws a **runner id** (random, new on
  every start) and writes it into each job record it creates
  (:attr:`~fdrtd_server.bus.JobRecord.runner`);
* it keeps a **liveness key** under that id fresh in the ``fdrtd_runners``
  bucket, whose entries expire :data:`RUNNER_TTL` seconds after their last
  write (:class:`Heartbeat`);
* a job that runs on past its start request is listed in the
  ``fdrtd_running`` bucket (key: result handle, value: runner id) until its
  final record is written, so that finding unfinished jobs never means
  reading every result ever stored;
* :func:`fail_orphaned_jobs` marks failed, with :data:`RESTARTED` and status
  503, every listed job whose runner has no liveness key. It runs when a
  process that runs microservices starts, and every :data:`SWEEP_INTERVAL`
  seconds in the controller. It writes with a compare-and-set on the job
  record's revision, so a final record written concurrently by a live runner
  is never overwritten.

An embedded ``nats-server`` draws new credentials on every start, so no
process of an earlier start can still reach it: ``serve`` then fails every
unfinished job at once (``everyone_gone=True``) instead of waiting for
liveness keys to expire. With an external NATS, a controller restart leaves
the jobs of running workers alone, and the jobs of a worker that died fail
within :data:`RUNNER_TTL` plus :data:`SWEEP_INTERVAL` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any

import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from fdrtd_client import wire
from fdrtd_server.audit import JOBS_SUBJECT
from fdrtd_server.bus import RUNNER_TTL, Bus, JobRecord, now_iso

__all__ = [
    "HEARTBEAT_INTERVAL",
    "RESTARTED",
    "RUNNER_TTL",
    "SWEEP_INTERVAL",
    "Heartbeat",
    "fail_orphaned_jobs",
    "new_runner_id",
    "sweep_forever",
]

RESTARTED = (
    "the server (or the worker running this computation) restarted while it ran; run it again"
)
"""The error of a job whose process died before it ended (HTTP status 503)."""
HEARTBEAT_INTERVAL = 4.0
"""Seconds between two writes of a process's liveness key."""
SWEEP_INTERVAL = 5.0
"""Seconds between two searches for orphaned jobs in the controller."""

log = logging.getLogger("fdrtd.runners")


def new_runner_id() -> str:
    """A fresh runner id: 64 random bits in hex, new on every start of a process."""
    return secrets.token_hex(8)


class Heartbeat:
    """Keeps the liveness key of one runner fresh until :meth:`stop`.

    Args:
        bus: The connection to write the key on.
        runner: The runner id.
    """

    def __init__(self, bus: Bus, runner: str) -> None:
        self.bus, self.runner = bus, runner
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Heartbeat:
        """Write the key now (before any job of this runner exists), then keep it fresh."""
        await self.bus.runners.put(self.runner, now_iso().encode())
        self._task = asyncio.create_task(self._beat(), name=f"heartbeat-{self.runner}")
        return self

    async def _beat(self) -> None:
        while not self.bus.lost:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            try:
                await self.bus.runners.put(self.runner, now_iso().encode())
            except Exception as error:  # the bus is reconnecting: try again next time
                log.warning("could not refresh this process's liveness key: %s", error)

    async def stop(self) -> None:
        """Stop refreshing, and delete the key: this runner's jobs have all ended."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.bus.runners.delete(self.runner)


async def _alive(bus: Bus, runner: str, known: dict[str, bool]) -> bool:
    """Whether ``runner`` has a liveness key (the positive answers are remembered)."""
    if known.get(runner):
        return True
    if not runner:
        return False  # a record of a version without runner ids
    try:
        entry = await bus.runners.get(runner)
    except KeyNotFoundError:
        return False
    known[runner] = entry.value is not None
    return known[runner]


async def _running_entries(bus: Bus) -> list[tuple[str, str]]:
    """(result handle, runner id) of every entry of ``fdrtd_running``."""
    found: list[tuple[str, str]] = []
    watcher = await bus.running.watchall(ignore_deletes=True)
    try:
        async for entry in watcher:
            if entry is None:
                break  # no more entries now
            if entry.value is not None:
                found.append((entry.key, entry.value.decode("utf-8", "replace")))
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return found


async def fail_orphaned_jobs(
    bus: Bus, *, everyone_gone: bool = False, alive: tuple[str, ...] = ()
) -> int:
    """Mark failed every unfinished job whose runner is gone; return how many.

    Args:
        bus: A connection to the server's bus.
        everyone_gone: True when no runner of an earlier start can be alive
            (a freshly started embedded NATS): every unfinished job fails
            without looking at liveness keys.
        alive: Runner ids known to be alive without looking (this process's
            own: its liveness key may lapse while its event loop was busy,
            and so may the sweep, which then must not fail its own jobs).

    A job whose record changed since it was read (its runner wrote its end
    just now) is left alone: the record is written with a compare-and-set on
    its revision.
    """
    known = dict.fromkeys(alive, True)
    failed = 0
    for handle, runner in await _running_entries(bus):
        current = await bus.get_job(handle)
        if current is None and not everyone_gone and await _alive(bus, runner, known):
            continue  # listed, and its running record is being written
        if current is not None and not current[0].finished:
            record, revision = current
            if not everyone_gone and await _alive(bus, record.runner or runner, known):
                continue
            record.status, record.error_status, record.error = "failed", 503, RESTARTED
            record.updated = now_iso()
            try:
                await bus.jobs.update(handle, wire.packb(record.to_dict()), last=revision)
            except KeyWrongLastSequenceError:
                continue  # written meanwhile: look again at the next sweep
            failed += 1
            await _report(bus, handle, record)
        # ended (now, or earlier with its index entry left behind), or released
        await bus.unlist_running(handle)
    if failed:
        log.info("%d computation(s) whose process had stopped were marked failed", failed)
    return failed


async def _report(bus: Bus, handle: str, record: JobRecord) -> None:
    """Tell the controller's audit log about the end, as a runner would."""
    event: dict[str, Any] = {
        "result": handle,
        "principal": record.owner,
        "microservice": record.microservice,
        "function": record.function,
        "status": "failed",
        "error_status": 503,
        "error_class": "RunnerStopped",
    }
    with contextlib.suppress(nats.errors.Error):
        await bus.nc.publish(JOBS_SUBJECT, wire.packb(event))


async def sweep_forever(bus: Bus, alive: tuple[str, ...] = ()) -> None:
    """Run :func:`fail_orphaned_jobs` every :data:`SWEEP_INTERVAL` seconds until cancelled.

    Args:
        bus: A connection to the server's bus.
        alive: The runner ids of this process, whose jobs are never orphans.
    """
    while not bus.lost:
        await asyncio.sleep(SWEEP_INTERVAL)
        try:
            await fail_orphaned_jobs(bus, alive=alive)
        except Exception as error:  # the bus is reconnecting: try again next time
            log.warning("could not look for computations whose process stopped: %s", error)
