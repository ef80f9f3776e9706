"""Writing a file atomically: a temporary file, flushed to disk, renamed over the old one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(
    path: Path, data: bytes | str, *, mode: int = 0o600, sync_dir: bool = False
) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old file or the new one.

    The temporary file is created next to ``path`` by :func:`tempfile.mkstemp`
    (a random name, ``O_EXCL``, mode 0600 from its first byte on, so nothing
    planted there is written through and no secret is ever readable by
    others), flushed to disk, given ``mode`` and renamed over ``path``.

    Args:
        path: The file to replace; its directory must exist.
        data: The new content (text is written as UTF-8, as given).
        mode: The file's permissions.
        sync_dir: Also flush the directory, so that the rename itself survives
            a crash (for files whose loss a reader would notice).
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if sync_dir:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
