"""Processes a server starts end with it, even when it is killed with SIGKILL.

A direct child can ask the kernel for a signal when its parent dies
(``PR_SET_PDEATHSIG``; the embedded ``nats-server`` does). That is not
enough for the processes ``multiprocessing`` makes with its ``forkserver``
start method, which the psi worker pool and the upload parser use: they are
children of the fork server, not of the server, and ``PR_SET_PDEATHSIG``
fires when the parent *thread* that forked ends, not the process. Nothing
else ends them either: a pool worker waits on a queue whose write end it
holds itself. So after a ``kill -9`` the fork server, the pool workers and
the resource tracker stayed alive, about 95 MB, each keeping the others.

:func:`exit_with` closes that gap from the inside: a process the server
started calls it first thing with the server's pid, and a daemon thread
ends the process as soon as the server is gone. On Linux (5.3 and later)
the thread blocks on a pidfd, which becomes readable when the process exits;
there is no polling and no pid that could be recycled. Elsewhere it looks
every :data:`POLL_SECONDS` whether the server's pid still names the process
that started when the server did (its start time in ``/proc``), so that a
recycled pid is not taken for the server.

The fork server and the resource tracker need no watchdog of their own.
The fork server exits when no process holds the write end of its "alive"
pipe any more, and the resource tracker when no process holds the write end
of its pipe: in both cases the server and the children the fork server made
for it, which :func:`exit_with` ends.
"""

from __future__ import annotations

import os
import select
import threading
import time

__all__ = ["ORPHANED", "POLL_SECONDS", "exit_with"]

ORPHANED = 70
"""Exit status of a process that ended because the server it belonged to was gone."""
POLL_SECONDS = 1.0
"""Where there are no pidfds: how often the server's pid is checked."""


def exit_with(pid: int) -> None:
    """End this process, at once and without cleanup, as soon as process ``pid`` is gone.

    Meant for processes the server starts indirectly, e.g. as the
    initializer of a process pool::

        ProcessPoolExecutor(initializer=exit_with, initargs=(os.getpid(),), ...)

    Args:
        pid: The server's process id. It must be this process's parent or
            its parent's parent (the fork server's parent): a ``pid`` that is
            neither means the server died before this process started and its
            pid may already belong to another process, so this process ends.
    """
    handle: int | None = None
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(ORPHANED)
    except (AttributeError, OSError):
        handle = None  # not Linux, or a kernel older than 5.3: poll instead
    # checked after the pidfd is open: if pid is our ancestor now, the pidfd is the server's,
    # and so is the start time read next (which tells the server's pid from a recycled one)
    if not _is_ancestor(pid):
        os._exit(ORPHANED)
    started = _start_time(pid)
    threading.Thread(
        target=_exit_when_gone, args=(pid, handle, started), name="fdrtd-lifeline", daemon=True
    ).start()


def _stat(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (None if unreadable).

    ``pid (comm) state ppid ...``: the name may hold spaces and parentheses,
    so the fields are those after its last ``)``: ``[0]`` is the state,
    ``[1]`` the parent, ``[19]`` the start time (field 22 of ``proc(5)``).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _parent_of(pid: int) -> int | None:
    """The parent of ``pid`` from ``/proc`` (None where there is no ``/proc`` or no such pid)."""
    fields = _stat(pid)
    try:
        return int(fields[1]) if fields else None
    except (ValueError, IndexError):
        return None


def _start_time(pid: int) -> bytes | None:
    """When ``pid`` started (clock ticks since boot), None where ``/proc`` cannot tell.

    A pid and its start time name one process for good: a recycled pid has
    another start time.
    """
    fields = _stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _is_ancestor(pid: int) -> bool:
    """Whether ``pid`` is this process's parent or grandparent (True where that cannot be read)."""
    parent = os.getppid()
    if parent == pid:
        return True
    grandparent = _parent_of(parent)
    if grandparent is None:
        return not os.path.exists("/proc/self/stat")  # no /proc: cannot tell
    return grandparent == pid


def _gone(pid: int, started: bytes | None) -> bool:
    """Whether the process ``pid`` that started at ``started`` has exited.

    A zombie (exited, not yet reaped by its parent) counts as gone, and so
    does a pid that now names another process (another start time).
    """
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, under another user
    fields = _stat(pid)
    if fields is None:
        # no /proc entry although the pid exists: no /proc at all (cannot tell more),
        # or the process ended between the two looks
        return os.path.exists("/proc/self/stat")
    return fields[0] in (b"Z", b"X") or (started is not None and _start_time(pid) != started)


def _exit_when_gone(pid: int, handle: int | None, started: bytes | None) -> None:
    """Wait until the server ``pid`` has exited, then end this process at once.

    Runs in the lifeline's daemon thread. With a pidfd (``handle``) it blocks
    until the kernel says the process exited. Without (no pidfds on this
    system) it looks every :data:`POLL_SECONDS` whether ``pid`` still names
    the process that started at ``started``: the server itself, not whether it
    is still this process's ancestor, since the fork server between them may
    end while the server lives.

    Args:
        pid: The server's process id.
        handle: A pidfd of it, or None to poll.
        started: Its start time (:func:`_start_time`), read when it was known
            to be the server; None where ``/proc`` cannot tell.
    """
    if handle is not None:
        poller = select.poll()
        poller.register(handle, select.POLLIN)
        poller.poll()  # no timeout: returns when the process has exited
        os._exit(ORPHANED)
    while True:
        time.sleep(POLL_SECONDS)
        if _gone(pid, started):
            os._exit(ORPHANED)
