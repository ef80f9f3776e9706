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
  seconds in the controller.

A job has exactly one outcome. Every write of a job record, the runner's and
the sweep's, is a compare-and-set on the revision its writer wrote or read
last (:meth:`~fdrtd_server.bus.Bus.put_job`). A runner that was only slow
(its event loop blocked, or NATS out of reach, past :data:`RUNNER_TTL`) and
was taken for dead finds, at its next write, that the record changed: it
stops the job and writes and reports nothing more of it. Its heartbeat also
notices that its key had lapsed, and stops its jobs that run on (each writes
its end unless the sweep did). A job listed but not yet recorded gets a
failed record from the sweep, which its runner then cannot replace.

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
import time
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from fdrtd_client import wire
from fdrtd_server.audit import JOBS_SUBJECT
from fdrtd_server.bus import RUNNER_TTL, Bus, JobRecord, RecordChanged, now_iso

__all__ = [
    "HEARTBEAT_INTERVAL",
    "RESTARTED",
    "RUNNER_TTL",
    "STOP_WRITE_TIMEOUT",
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
OUTAGE_GRACE = RUNNER_TTL + 2 * HEARTBEAT_INTERVAL
"""Seconds after the bus was last seen unreachable during which a lapsed liveness key is
put down to that outage (every key lapses in one longer than ``RUNNER_TTL``), not to a
dead or blocked process: no sweep fails jobs then, and a runner rewrites its key and
lets its jobs go on."""
"""Seconds between two searches for orphaned jobs in the controller."""
STOP_WRITE_TIMEOUT = 2.0
"""Seconds a stopping process gives each last write (a job's end, its liveness key)."""

log = logging.getLogger("fdrtd.runners")


def new_runner_id() -> str:
    """A fresh runner id: 64 random bits in hex, new on every start of a process."""
    return secrets.token_hex(8)


class Heartbeat:
    """Keeps the liveness key of one runner fresh until :meth:`stop`.

    Each refresh is a compare-and-set on the key's revision, so the heartbeat
    learns when the key had lapsed in between (the event loop was blocked, or
    NATS unreachable, for :data:`RUNNER_TTL` seconds): other processes may then
    have marked this runner's jobs failed. It writes the key again, logs a
    warning and calls ``on_lapse``, which stops those jobs (each writes its
    end only if nobody else did: see :meth:`fdrtd_server.bus.Bus.put_job`).

    Args:
        bus: The connection to write the key on.
        runner: The runner id.
        on_lapse: Called (from the heartbeat's task) when the key had lapsed.
    """

    def __init__(self, bus: Bus, runner: str, on_lapse: Callable[[], None] | None = None) -> None:
        self.bus, self.runner, self.on_lapse = bus, runner, on_lapse
        self._task: asyncio.Task[None] | None = None
        self._revision = 0
        self._unreachable_at = -OUTAGE_GRACE
        """When the bus was last seen unreachable (monotonic time)."""

    async def start(self) -> Heartbeat:
        """Write the key now (before any job of this runner exists), then keep it fresh."""
        self._revision = await self.bus.runners.put(self.runner, now_iso().encode())
        self._task = asyncio.create_task(self._beat(), name=f"heartbeat-{self.runner}")
        return self

    async def _beat(self) -> None:
        while not self.bus.lost:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            if not self.bus.connected:
                self._unreachable_at = time.monotonic()
                continue
            try:
                await self._refresh()
            except Exception as error:  # the bus is reconnecting: try again next time
                self._unreachable_at = time.monotonic()
                log.warning("could not refresh this process's liveness key: %s", error)

    async def _refresh(self) -> None:
        """Write the key once; notice (and report) that it had lapsed."""
        value = now_iso().encode()
        try:
            self._revision = await self.bus.runners.update(self.runner, value, last=self._revision)
            return
        except KeyWrongLastSequenceError:
            pass  # expired (or deleted) since the last write, or a write that timed out landed
        try:
            entry = await self.bus.runners.get(self.runner)
        except KeyNotFoundError:
            entry = None  # expired, or deleted: it lapsed
        if entry is not None and entry.value is not None and entry.revision is not None:
            self._revision = entry.revision  # only this process writes its key: not lapsed
            return
        self._revision = await self.bus.runners.put(self.runner, value)
        if time.monotonic() - self._unreachable_at <= OUTAGE_GRACE:
            # every key lapsed while NATS was away, and no sweep acts so soon after
            # an outage (sweep_forever): this process was not taken for dead
            log.info("rewrote this process's liveness key, which lapsed while NATS was away")
            return
        log.warning(
            "this process's liveness key had expired (its event loop was blocked, or NATS "
            "unreachable, for %g s or more): the computations it was running may have been "
            "marked failed by another process, and are stopped",
            RUNNER_TTL,
        )
        if self.on_lapse is not None:
            self.on_lapse()

    async def stop(self) -> None:
        """Stop refreshing, and delete the key: this runner's jobs have all ended."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            async with asyncio.timeout(STOP_WRITE_TIMEOUT):
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
    bus: Bus, *, everyone_gone: bool = False, alive: tuple[str, ...] = (), at_start: bool = False
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
        at_start: True when a process starts: a number above 0 is then a
            warning an operator should read, worded for a restart.

    Every write is a compare-and-set (:meth:`~fdrtd_server.bus.Bus.put_job`):
    a job whose record changed since it was read (its runner wrote its end
    just now) is left alone, and a runner that was merely slow, not dead,
    finds its record changed on its next write and stops the job without
    writing or reporting a second end. A job listed but not recorded yet
    gets a failed record of its own (created only if none exists), so that
    its runner, should it be alive after all, cannot write one afterwards.
    An error with one job is logged; the others are looked at all the same.
    """
    known = dict.fromkeys(alive, True)
    failed = 0
    try:
        entries = await _running_entries(bus)
    except Exception as error:
        log.warning("could not list the computations running on this server's bus: %s", error)
        return 0
    for handle, runner in entries:
        try:
            failed += await _fail_if_orphaned(bus, handle, runner, everyone_gone, known)
        except Exception as error:
            log.warning("could not check whether a computation's process is alive: %s", error)
    if failed and at_start:
        log.warning(
            "%s that %s running when the server stopped %s been marked failed",
            _computations(failed),
            "was" if failed == 1 else "were",
            "has" if failed == 1 else "have",
        )
    elif failed:
        log.warning(
            "%s whose process had stopped %s been marked failed",
            _computations(failed),
            "has" if failed == 1 else "have",
        )
    return failed


def _computations(count: int) -> str:
    """``"1 computation"``, ``"2 computations"``."""
    return f"{count} computation{'' if count == 1 else 's'}"


async def _fail_if_orphaned(
    bus: Bus, handle: str, runner: str, everyone_gone: bool, known: dict[str, bool]
) -> int:
    """Fail the listed job ``handle`` if its runner is gone; return 1 if it was failed now."""
    current = await bus.get_job(handle)
    if current is None:
        if not everyone_gone and await _alive(bus, runner, known):
            return 0  # listed, and its running record is being written
        # listed, never recorded: its runner died (or stalled) between the two writes
        placeholder = JobRecord("", "", "", "failed", created=now_iso(), runner=runner)
        placeholder.error_status, placeholder.error = 503, RESTARTED
        try:
            await bus.put_job(handle, placeholder)
        except RecordChanged:
            return 0  # recorded meanwhile: look again at the next sweep
        await bus.unlist_running(handle)
        return 0  # no start was ever answered with this handle: nobody to tell
    record, revision = current
    if record.finished:
        await bus.unlist_running(handle)  # ended, with its index entry left behind
        return 0
    if not everyone_gone and await _alive(bus, record.runner or runner, known):
        return 0
    record.status, record.error_status, record.error = "failed", 503, RESTARTED
    try:
        await bus.put_job(handle, record, last=revision)
    except RecordChanged:
        return 0  # written meanwhile: look again at the next sweep
    await _report(bus, handle, record)
    await bus.unlist_running(handle)
    return 1


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
    unreachable_at = -OUTAGE_GRACE
    while not bus.lost:
        await asyncio.sleep(SWEEP_INTERVAL)
        if not bus.connected:
            unreachable_at = time.monotonic()
            continue
        if time.monotonic() - unreachable_at <= OUTAGE_GRACE:
            continue  # every key lapsed in a long outage: give the runners time to rewrite them
        try:
            await fail_orphaned_jobs(bus, alive=alive)
        except Exception as error:  # the bus is reconnecting: try again next time
            unreachable_at = time.monotonic()
            log.warning("could not look for computations whose process stopped: %s", error)
