"""Waiting on conditions instead of sleeping: one helper for every test directory.

A test that needs something to have happened first polls for it with
:func:`wait_for`. The deadline is generous on purpose and only bounds a hang;
no test measures how soon the condition held.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["wait_for"]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` s.

    The deadline is generous on purpose: it bounds a hang, it measures nothing.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
