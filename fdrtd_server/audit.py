"""An append-only, tamper-evident audit log (invariant 7).

Each line is a JSON record holding the SHA-256 of the line before it, so that
editing, removing or reordering any line breaks the chain, which
:func:`verify` detects. Records name who did what to which handle and how it
ended; they never hold data values.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from fdrtd_server.bus import now_iso

__all__ = ["AuditLog", "verify"]

_GENESIS = "0" * 64


class AuditLog:
    """Appends hash-chained records to ``path`` (created with mode 0600)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._last = _GENESIS
        if path is not None and path.exists():
            with path.open("rb") as handle:
                for line in handle:
                    if line.strip():
                        self._last = json.loads(line)["hash"]

    def write(
        self, principal: str, action: str, target: str = "", outcome: str = "ok", **extra: Any
    ) -> None:
        """Append one record."""
        if self.path is None:
            return
        with self._lock:
            record = {
                "time": now_iso(),
                "principal": principal,
                "action": action,
                "target": target,
                "outcome": outcome,
                **extra,
                "prev": self._last,
            }
            body = json.dumps(record, sort_keys=True, separators=(",", ":"))
            record["hash"] = hashlib.sha256(body.encode()).hexdigest()
            line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
            self._last = record["hash"]


def verify(path: Path) -> int:
    """Check the whole chain and return the number of records.

    Raises:
        ValueError: Naming the first line that was changed, removed or reordered.
    """
    previous = _GENESIS
    count = 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            claimed = record.pop("hash", None)
            body = json.dumps(record, sort_keys=True, separators=(",", ":"))
            if (
                record.get("prev") != previous
                or hashlib.sha256(body.encode()).hexdigest() != claimed
            ):
                raise ValueError(f"audit log {path} is broken at line {number}")
            previous = claimed
            count += 1
    return count
