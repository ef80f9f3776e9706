"""``fdrtd-server audit verify`` on a real server's log: truncation, rewrites, crashes, forgeries.

The server signs a checkpoint of its audit log (record count and last hash)
with its identity key about a second after each record and when it stops;
``audit verify`` checks the log against it and says clearly what is wrong. A
server killed between a record and its checkpoint is not an alarm, and a
server will not start on (and sign over) a log that fails verification.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fdrtd_server.audit import AuditLog
from fdrtd_server.identity import Identity
from fdrtd_server.local import LocalFederation, LocalServer

TIMEOUT = 30.0


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fdrtd_server", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def solo(tmp_path: Path) -> Iterator[LocalServer]:
    with LocalFederation(tmp_path / "solo", names=("solo",)) as federation:
        yield federation.servers["solo"]


def some_records(server: LocalServer) -> None:
    with server.client(timeout=TIMEOUT) as client:
        handle = client.upload(np.array([1.0, 2.0, 3.0, 4.0]))
        assert client.compute("map", "aggregate", data=handle).result(TIMEOUT)["sum"] == 10.0


def rechain(lines: list[str]) -> str:
    """The same records with one principal changed and every hash recomputed: a valid chain."""
    previous, out = "0" * 64, []
    for number, line in enumerate(lines):
        body = {k: v for k, v in json.loads(line).items() if k != "hash"}
        body["prev"] = previous
        if number == 0:
            body["principal"] = "nobody"
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        previous = hashlib.sha256(text.encode()).hexdigest()
        out.append(f'{text[:-1]},"hash":"{previous}"}}\n')  # the writer's exact form
    return "".join(out)


def test_verify_detects_truncation_and_rewrites_and_the_server_refuses_them(
    solo: LocalServer, tmp_path: Path
) -> None:
    some_records(solo)
    solo.stop()  # a clean stop writes the final checkpoint
    log = solo.home / "audit.log"
    good = log.read_text("utf-8")
    lines = good.splitlines(keepends=True)

    intact = cli("audit", "verify", str(solo.home))
    assert intact.returncode == 0, intact.stderr
    report = intact.stdout.splitlines()
    assert report[0] == f"audit log intact: {len(lines)} records"
    assert report[1].startswith(f"anchored: the first {len(lines)} records match")
    assert len(report) == 2

    # pinned to the key the peers hold (the federation entry's sign_key)
    key = base64.b64encode(Identity.load(solo.home / "identity", "solo").sign_public).decode()
    assert cli("audit", "verify", str(solo.home), "--key", key).returncode == 0
    other = base64.b64encode(Identity.generate("solo").sign_public).decode()
    foreign = cli("audit", "verify", str(solo.home), "--key", other)
    assert foreign.returncode == 2 and "the identity was replaced" in foreign.stderr

    # an operator's copy of a checkpoint, kept elsewhere
    kept = cli("audit", "checkpoint", str(solo.home))
    assert kept.returncode == 0, kept.stderr
    assert json.loads(kept.stdout)["count"] == len(lines)
    (tmp_path / "kept.json").write_text(kept.stdout, "utf-8")

    log.write_text("".join(lines[:-1]), "utf-8")
    cut = cli("audit", "verify", str(solo.home))
    assert cut.returncode == 2
    assert "was truncated" in cut.stderr
    assert f"records {len(lines)} to {len(lines)} were removed" in cut.stderr
    assert "intact" not in cut.stdout

    log.write_text(rechain(lines), "utf-8")
    rewritten = cli("audit", "verify", str(solo.home))
    assert rewritten.returncode == 2
    assert f"was rewritten: record {len(lines)} does not hash" in rewritten.stderr

    # log and checkpoint both rolled back: only a checkpoint kept elsewhere sees it
    log.write_text("".join(lines[:-1]), "utf-8")
    (solo.home / "audit.checkpoint").unlink()
    gone = cli("audit", "verify", str(solo.home))
    assert gone.returncode == 2 and "has no checkpoint" in gone.stderr
    rolled = cli("audit", "verify", str(solo.home), "--checkpoint", str(tmp_path / "kept.json"))
    assert rolled.returncode == 2 and "kept.json" in rolled.stderr

    # the server does not start on a log that fails against its checkpoint
    log.write_text(good, "utf-8")
    (solo.home / "audit.checkpoint").write_text(kept.stdout, "utf-8")
    log.write_text("".join(lines[:-1]), "utf-8")
    with pytest.raises(RuntimeError, match="exited"):
        solo.start(ready_timeout=20)
    told = (solo.home / "server.log").read_text("utf-8", errors="replace")
    assert "was truncated" in told and "move both away" in told

    log.write_text(good, "utf-8")
    assert cli("audit", "verify", str(solo.home)).returncode == 0


def test_a_killed_server_leaves_records_unanchored_not_an_alarm(solo: LocalServer) -> None:
    some_records(solo)
    solo.stop(kill=True)  # no final checkpoint; maybe not even the periodic one
    after = cli("audit", "verify", str(solo.home))
    assert after.returncode == 0, after.stderr
    assert after.stdout.startswith("audit log intact: ")
    # the restarted server checks the log and anchors what was not anchored
    solo.start()
    solo.stop()
    again = cli("audit", "verify", str(solo.home))
    assert again.returncode == 0, again.stderr
    report = again.stdout.splitlines()
    assert report[1].startswith("anchored: the first"), again.stdout  # everything anchored
    # what the killed server wrote after its last checkpoint is listed (anyone could have)
    assert len(report) == 2 or (len(report) == 3 and report[2].startswith("found at start"))


def test_verify_refuses_a_duplicate_key_forgery_and_accepts_the_genuine_log(
    tmp_path: Path,
) -> None:
    home = tmp_path / "alpha"
    made = cli("init", str(home), "--name", "alpha")
    assert made.returncode == 0, made.stderr
    log = AuditLog(home / "audit.log", Identity.load(home / "identity", "alpha"), delay=3600)
    log.write("alice", "upload", "d-1", bytes=12)
    log.write("alice", "compute", "r-2", function="aggregate")
    log.close()
    genuine = (home / "audit.log").read_bytes()
    lines = genuine.splitlines(keepends=True)

    intact = cli("audit", "verify", str(home))
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout.startswith("audit log intact: ")

    # what grep shows first is the forgery; Python's last-wins reading sees the original
    forged = b'{"principal":"mallory","action":"FORGED",' + lines[-1][1:]
    (home / "audit.log").write_bytes(b"".join([*lines[:-1], forged]))
    refused = cli("audit", "verify", str(home))
    assert refused.returncode == 2
    assert f"broken at line {len(lines)}: a key appears twice" in refused.stderr
    assert "mallory" not in refused.stderr + refused.stdout
    assert "intact" not in refused.stdout

    (home / "audit.log").write_bytes(genuine)
    assert cli("audit", "verify", str(home)).returncode == 0
