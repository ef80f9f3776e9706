"""The directory's listing, heartbeat format and settings, without servers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest

from fdrtd_server.config import init_home, load_settings
from fdrtd_server.directory import (
    SESSION,
    TAG,
    Directory,
    HeartbeatRefused,
    heartbeat_payload,
    parse_heartbeat,
)
from fdrtd_server.envelope import OpenedMessage


class Audit:
    def __init__(self) -> None:
        self.records: list[tuple[Any, ...]] = []

    def write(self, *args: Any, **extra: Any) -> None:
        self.records.append(args)


def message(payload: bytes, sender: str = "beta", tag: str = TAG) -> OpenedMessage:
    return OpenedMessage(sender=sender, session=SESSION, seq=1, tag=tag, payload=payload, ts=0.0)


def test_a_member_drops_out_after_three_silent_intervals_and_is_audited_on_return() -> None:
    audit = Audit()
    directory = Directory("alpha", audit)
    directory.record("beta", "http://b:1", 4, 2.0, sent=1.0, now=100.0)
    directory.record("beta", "http://b:1", 5, 2.0, sent=2.0, now=102.0)
    assert [m["datasets"] for m in directory.live({"beta"}, now=108.0)] == [5]
    assert directory.live({"beta"}, now=108.1) == []  # silent for more than 3 x 2 s
    directory.record("beta", "http://b:1", 5, 2.0, sent=3.0, now=200.0)
    assert [m["name"] for m in directory.live({"beta"}, now=200.0)] == ["beta"]
    assert [r[2] for r in audit.records] == ["beta", "beta"]  # joined, and joined again


def test_a_late_older_heartbeat_keeps_the_newest_url() -> None:
    directory = Directory("alpha", Audit())
    directory.record("beta", "http://new:1", None, 1.0, sent=5.0, now=10.0)
    directory.record("beta", "http://old:1", None, 1.0, sent=4.0, now=10.5)
    assert directory.live({"beta"}, now=13.4)[0]["url"] == "http://new:1"


def test_a_member_removed_from_the_federation_is_not_listed() -> None:
    directory = Directory("alpha", Audit())
    directory.record("beta", "http://b:1", None, 1.0, sent=1.0, now=1.0)
    assert directory.live({"alpha"}, now=1.0) == []
    assert "beta" not in directory.entries


def test_a_valid_heartbeat_parses() -> None:
    payload = heartbeat_payload("beta", "https://beta.example", 7, 10.0)
    assert parse_heartbeat(message(payload)) == ("https://beta.example", 7, 10.0)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"name": "gamma"}, "signed it"),
        ({"url": "ftp://beta"}, "url"),
        ({"url": 3}, "url"),
        ({"datasets": -1}, "datasets"),
        ({"datasets": True}, "datasets"),
        ({"interval": 0}, "interval"),
        ({"interval": float("nan")}, "interval"),
        ({"interval": 1e9}, "interval"),
        ({"extra": 1}, "exactly the fields"),
    ],
)
def test_a_malformed_heartbeat_is_refused(fields: dict[str, Any], words: str) -> None:
    payload = {"name": "beta", "url": "http://b:1", "datasets": None, "interval": 1.0, **fields}
    with pytest.raises(HeartbeatRefused, match=words):
        parse_heartbeat(message(msgpack.packb(payload)))


def test_garbage_and_other_tags_are_refused() -> None:
    with pytest.raises(HeartbeatRefused, match="msgpack map"):
        parse_heartbeat(message(b"\xc1"))
    with pytest.raises(HeartbeatRefused, match="tag"):
        parse_heartbeat(message(heartbeat_payload("beta", "http://b:1", None, 1.0), tag="x"))


def test_directory_settings(tmp_path: Path) -> None:
    init_home(tmp_path, "beta")
    settings = load_settings(tmp_path)
    assert (settings.directory, settings.directories, settings.directory_interval) == (
        False,
        (),
        10.0,
    )
    text = (tmp_path / "fdrtd.toml").read_text()
    (tmp_path / "fdrtd.toml").write_text(
        text.replace("[server]\n", '[server]\ndirectory = true\ndirectories = ["alpha", "beta"]\n')
    )
    settings = load_settings(tmp_path, environ={"FDRTD_DIRECTORY_INTERVAL": "0.5"})
    assert settings.directory and settings.directories == ("alpha", "beta")
    assert settings.directory_interval == 0.5
    settings = load_settings(tmp_path, environ={"FDRTD_DIRECTORIES": "gamma, delta"})
    assert settings.directories == ("gamma", "delta")
    with pytest.raises(ValueError, match="'directories' must list member names"):
        load_settings(tmp_path, environ={"FDRTD_DIRECTORIES": "Not A Name"})
    with pytest.raises(ValueError, match="'directory_interval'"):
        load_settings(tmp_path, environ={"FDRTD_DIRECTORY_INTERVAL": "0"})
    (tmp_path / "fdrtd.toml").write_text(text.replace("[server]\n", "[server]\ndirectories = 3\n"))
    with pytest.raises(ValueError, match="'directories' must be a list of names"):
        load_settings(tmp_path)
