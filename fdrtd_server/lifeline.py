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
there is no polling and no pid that could be recycled.

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
    # checked after the pidfd is open: if pid is our ancestor now, the pidfd is the server's
    if not _is_ancestor(pid):
        os._exit(ORPHANED)
    threading.Thread(
        target=_exit_when_gone, args=(pid, handle), name="fdrtd-lifeline", daemon=True
    ).start()


def _parent_of(pid: int) -> int | None:
    """The parent of ``pid`` from ``/proc`` (None where there is no ``/proc`` or no such pid)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            return int(stat.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _is_ancestor(pid: int) -> bool:
    """Whether ``pid`` is this process's parent or grandparent (True where that cannot be read)."""
    parent = os.getppid()
    if parent == pid:
        return True
    grandparent = _parent_of(parent)
    if grandparent is None:
        return not os.path.exists("/proc/self/stat")  # no /proc: cannot tell
    return grandparent == pid


def _exit_when_gone(pid: int, handle: int | None) -> None:
    if handle is not None:
        poller = select.poll()
        poller.register(handle, select.POLLIN)
        poller.poll()  # no timeout: returns when the process has exited
        os._exit(ORPHANED)
    while True:
        time.sleep(POLL_SECONDS)
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            os._exit(ORPHANED)
        except PermissionError:
            pass  # it exists, under another user
        if not _is_ancestor(pid):  # also catches a server that is a zombie
            os._exit(ORPHANED)
