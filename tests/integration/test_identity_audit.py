"""What the audit log says about changes from outside the server, tried as an attacker would.

Through the real command line and a real running server: whoever can write
the server's home can append well-chained records to its audit log, but the
server lists every record it did not write before it anchors it, and
``fdrtd-server audit verify`` reports them as appended by other processes; a
backdated record breaks the log. The command line names its user by the
process's uid, not by ``$USER``, and changes nothing it cannot audit.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from _processes import cli, make_server, wait_for

from fdrtd_server.config import init_home
from fdrtd_server.custody import CustodyStore
from fdrtd_server.local import LocalServer


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "h"
    init_home(path, "aud")
    return path


@pytest.fixture
def running(tmp_path: Path) -> Iterator[LocalServer]:
    server = make_server(tmp_path, "aud")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def records(home: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (home / "audit.log").read_bytes().splitlines()]


def forge(home: Path, time: str) -> int:
    """Append a record that continues the chain, as a local attacker can; its line number."""
    lines = (home / "audit.log").read_bytes().splitlines()
    record = {
        "time": time,
        "principal": "admin",
        "action": "grant",
        "target": "registry",
        "outcome": "ok",
        "grantee": "mallory",
        "prev": json.loads(lines[-1])["hash"],
    }
    body = json.dumps(record, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(body.encode()).hexdigest()
    with (home / "audit.log").open("ab") as log:
        log.write(f'{body[:-1]},"hash":"{digest}"}}\n'.encode())
    return len(lines) + 1


def touch(server: LocalServer) -> None:
    answer = requests.get(
        server.url + "/v1/data", headers={"authorization": f"Bearer {server.token}"}, timeout=30
    )
    assert answer.status_code == 200


def test_a_forged_record_appended_while_the_server_runs_is_reported_as_foreign(
    running: LocalServer,
) -> None:
    touch(running)
    last = records(running.home)[-1]["time"]
    assert isinstance(last, str)
    line = forge(running.home, last)
    wait_for(
        lambda: any(r["action"] == "audit-foreign" for r in records(running.home)),
        "the server to find the record it did not write",
    )
    note = next(r for r in records(running.home) if r["action"] == "audit-foreign")
    assert (note["records"], note["first_line"], note["last_line"]) == (1, line, line)
    assert note["entries"] == [
        {"line": line, "time": last, "principal": "admin", "action": "grant"}
    ]
    wait_for(
        lambda: "not anchored" not in cli("audit", "verify", str(running.home)).stdout,
        "the server to anchor it",
    )
    verified = cli("audit", "verify", str(running.home))
    assert verified.returncode == 0, verified.stderr
    assert (
        f"foreign: 1 records were appended by other processes than the server (lines {line})"
        in (verified.stdout)
    )


def test_a_change_from_the_command_line_while_the_server_runs_is_foreign_too(
    running: LocalServer,
) -> None:
    touch(running)
    assert cli("token", "create", str(running.home), "reader").returncode == 0
    touch(running)  # the server catches up before it writes its own record
    notes = [r for r in records(running.home) if r["action"] == "audit-foreign"]
    assert notes and notes[-1]["entries"][0]["action"] == "token-create"  # type: ignore[index]
    wait_for(
        lambda: "not anchored" not in cli("audit", "verify", str(running.home)).stdout,
        "the server to anchor it",
    )
    assert "foreign: 1 records" in cli("audit", "verify", str(running.home)).stdout


def test_records_appended_while_the_server_is_stopped_are_listed_at_its_start(
    running: LocalServer,
) -> None:
    touch(running)
    running.stop()
    line = forge(running.home, str(records(running.home)[-1]["time"]))
    running.start()
    running.stop()
    verified = cli("audit", "verify", str(running.home))
    assert verified.returncode == 0, verified.stderr
    assert f"found at start: 1 records were written after the last checkpoint (lines {line})" in (
        verified.stdout
    )


def test_a_backdated_record_is_refused_by_verify(home: Path) -> None:
    assert cli("token", "create", str(home), "reader").returncode == 0
    line = forge(home, "2000-01-01T00:00:00.000+00:00")
    verified = cli("audit", "verify", str(home))
    assert verified.returncode != 0
    assert f"line {line}: its time 2000-01-01T00:00:00.000+00:00 is before" in verified.stderr
    assert "backdated" in verified.stderr


def test_the_command_line_names_its_user_by_uid_not_by_the_environment(home: Path) -> None:
    environment = {**os.environ, "USER": "alice", "LOGNAME": "alice", "USERNAME": "alice"}
    done = subprocess.run(
        [sys.executable, "-m", "fdrtd_server", "token", "create", str(home), "reader"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    record = records(home)[-1]
    assert record["action"] == "token-create"
    assert record["principal"] == f"cli:{pwd.getpwuid(os.getuid()).pw_name}" != "cli:alice"
    assert record["uid"] == os.getuid()


@pytest.mark.parametrize(
    "command",
    [
        ("token", "create", "{home}", "ghost", "--role", "admin"),
        ("token", "create", "{home}", "victim", "--rotate"),
        ("token", "revoke", "{home}", "victim"),
        ("grant", "add", "{home}", "cohort", "victim"),
        ("grant", "revoke", "{home}", "cohort", "victim"),
        (
            "source",
            "add",
            "{home}",
            "other",
            "--owner",
            "steward",
            "--kind",
            "csv",
            "--path",
            "{csv}",
        ),
        ("source", "remove", "{home}", "cohort"),
    ],
    ids=["create", "rotate", "revoke", "grant", "grant-revoke", "source-add", "source-remove"],
)
def test_nothing_is_changed_while_the_audit_log_is_broken(
    home: Path, tmp_path: Path, command: tuple[str, ...]
) -> None:
    csv = tmp_path / "cohort.csv"
    csv.write_text("age\n" + "\n".join(str(30 + i) for i in range(20)) + "\n")
    for setup in (
        ("token", "create", str(home), "victim"),
        ("token", "create", str(home), "steward", "--role", "owner"),
        (
            "source",
            "add",
            str(home),
            "cohort",
            "--owner",
            "steward",
            "--kind",
            "csv",
            "--path",
            str(csv),
        ),
        ("grant", "add", str(home), "cohort", "victim"),
    ):
        assert cli(*setup).returncode == 0
    log = home / "audit.log"
    log.write_bytes(log.read_bytes().replace(b'"outcome":"ok"', b'"outcome":"OK"', 1))
    state = {path.name: path.read_bytes() for path in (log, home / "tokens.json")}
    grants = CustodyStore(home).grants()
    sources = CustodyStore(home).datasets()

    done = cli(*(part.format(home=home, csv=csv) for part in command))
    assert done.returncode == 2
    assert done.stdout == ""  # no token printed for a change that was not made
    assert "audit log" in done.stderr and "broken at line 1" in done.stderr
    assert "Nothing was changed" in done.stderr
    assert {path.name: path.read_bytes() for path in (log, home / "tokens.json")} == state
    assert CustodyStore(home).grants() == grants and CustodyStore(home).datasets() == sources
