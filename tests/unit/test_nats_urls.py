"""NATS URLs with credentials: redaction, ``file:`` indirection, private files, store limits.

No server runs here; the embedded server itself is tested in
``tests/integration/test_nats_auth.py``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fdrtd_server._embedded_nats import (
    read_url_file,
    redact_url,
    resolve_nats_url,
    write_private,
)
from fdrtd_server.bus import MIN_STORE_BYTES, GiB, StoreLimits
from fdrtd_server.config import Settings

SECRET = "s3cr3t-Pa55_word"


def test_redact_url_drops_user_and_password() -> None:
    assert redact_url(f"nats://fdrtd:{SECRET}@127.0.0.1:4222") == "nats://***@127.0.0.1:4222"
    assert redact_url(f"tls://{SECRET}@nats.example.org") == "tls://***@nats.example.org"
    assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
    assert SECRET not in redact_url(f"nats://u:{SECRET}@[::1]:4222")


def test_write_private_is_0600_even_over_a_wider_file(tmp_path: Path) -> None:
    target = tmp_path / "secret.url"
    target.write_text("old", "utf-8")
    os.chmod(target, 0o644)
    write_private(target, "new\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.read_text("utf-8") == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["secret.url"]  # no temporary left


def test_resolve_nats_url_reads_file_urls(tmp_path: Path) -> None:
    url = f"nats://fdrtd:{SECRET}@127.0.0.1:4222"
    path = tmp_path / "nats-client.url"
    write_private(path, url + "\n")
    assert resolve_nats_url(f"file:{path}") == url
    assert resolve_nats_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


def test_a_url_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nats-client.url"
    write_private(path, f"nats://fdrtd:{SECRET}@127.0.0.1:4222\n")
    os.chmod(path, 0o640)
    with pytest.raises(PermissionError, match="chmod 600") as caught:
        read_url_file(path)
    assert SECRET not in str(caught.value)


def test_a_url_file_without_a_nats_url_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nats-client.url"
    write_private(path, "http://example.org\n")
    with pytest.raises(ValueError, match="nats://"):
        read_url_file(path)
    with pytest.raises(FileNotFoundError):
        resolve_nats_url(f"file:{tmp_path / 'missing'}")


def test_store_limits_share_the_total_and_leave_headroom() -> None:
    limits = StoreLimits.of_total(64 * GiB)
    parts = limits.data + limits.results + limits.jobs + 2 * limits.records
    assert parts <= 64 * GiB
    assert limits.data > limits.results + limits.jobs + 2 * limits.records
    assert not limits.explicit
    with pytest.raises(ValueError, match="too small"):
        StoreLimits.of_total(1024)


def test_store_limits_from_settings(tmp_path: Path) -> None:
    def settings(**fields: int) -> Settings:
        return Settings(home=tmp_path, name="s", **fields)

    explicit = StoreLimits.from_settings(settings(max_store_bytes=4 * GiB))
    assert explicit.explicit and explicit == StoreLimits.of_total(4 * GiB, explicit=True)
    # without max_store_bytes: eight of the largest uploads, never below the minimum
    derived = StoreLimits.from_settings(settings(max_upload_bytes=2 * GiB))
    assert derived == StoreLimits.of_total(16 * GiB)
    tiny = StoreLimits.from_settings(settings(max_upload_bytes=1024, max_store_bytes=0))
    assert tiny == StoreLimits.of_total(MIN_STORE_BYTES)
