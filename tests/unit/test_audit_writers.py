"""Several processes append to one audit log: each record chains to whoever wrote last."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from fdrtd_server import audit
from fdrtd_server.audit import AuditError, AuditLog, verify, verify_anchored
from fdrtd_server.bus import now_iso
from fdrtd_server.identity import Identity

SERVER = Identity.generate("alpha")


def test_interleaved_writers_keep_one_chain_and_the_server_anchors_them(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    server = AuditLog(path, SERVER, delay=3600)
    other = AuditLog(path)  # what a command-line change opens
    for i in range(5):
        server.write("ann", "list", "data", n=i)
        other.write("cli:root", "grant", f"set{i}")
    assert verify(path) == 14  # and the server's note before each of its records after the first
    point = server.checkpoint()  # covers what the other writer appended, and says so first
    assert point is not None and point.count == 15
    verified = verify_anchored(path, public_key=SERVER.sign_public)
    assert verified.after_checkpoint == 0
    assert verified.foreign == 5 and verified.foreign_lines == ["2", "5", "8", "11", "14"]
    server.close()


def test_concurrent_writers_in_threads(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    logs = [AuditLog(path) for _ in range(4)]

    def hammer(log: AuditLog, who: int) -> None:
        for i in range(50):
            log.write(f"w{who}", "noop", str(i))

    threads = [threading.Thread(target=hammer, args=(log, n)) for n, log in enumerate(logs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert verify(path) == 200


def test_a_forged_append_by_another_process_stops_the_servers_checkpoints(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    server = AuditLog(path, SERVER, delay=3600)
    server.write("ann", "list", "data")
    server.checkpoint()
    with path.open("ab") as handle:  # not a record that continues the chain
        handle.write(b'{"action":"forged","hash":"00","prev":"00"}\n')
    server.write("ann", "list", "data")  # the request is still answered
    assert server.checkpoint() is None  # but the server signs nothing over the break
    server.close()


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def append_forged(path: Path, **fields: object) -> None:
    """What anyone who can write the log can do: a record that continues the chain."""
    last = records(path)[-1]["hash"] if path.stat().st_size else audit._GENESIS
    record = {"target": "", "outcome": "ok", **fields, "prev": last}
    body = json.dumps(record, sort_keys=True, separators=(",", ":"))
    with path.open("ab") as handle:
        handle.write(audit._line(body, hashlib.sha256(body.encode()).hexdigest()))


def test_a_well_chained_forged_record_is_anchored_only_as_foreign(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    server = AuditLog(path, SERVER, delay=3600)
    server.write("ann", "list", "data")
    server.checkpoint()
    stamp = records(path)[-1]["time"]
    append_forged(path, time=stamp, principal="admin", action="grant", grantee="mallory")
    server.checkpoint()  # the running server finds it within a second
    note = records(path)[-1]
    assert note["action"] == "audit-foreign" and note["principal"] == "server"
    assert (note["records"], note["first_line"], note["last_line"]) == (1, 2, 2)
    assert note["entries"] == [{"line": 2, "time": stamp, "principal": "admin", "action": "grant"}]
    verified = verify_anchored(path, public_key=SERVER.sign_public)
    assert verified.after_checkpoint == 0 and verified.foreign == 1
    assert any("foreign: 1 records were appended by other processes" in line and "(lines 2)"
               in line for line in verified.lines())  # fmt: skip
    server.close()


def test_records_written_while_the_server_was_stopped_are_foreign_at_its_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    AuditLog(path, SERVER, delay=3600).close()
    for _ in range(3):
        stamp = now_iso()
        append_forged(path, time=stamp, principal="admin", action="token-create")
    AuditLog(path, SERVER, delay=3600).close()
    note = records(path)[3]
    assert (
        note["action"] == "audit-foreign" and note["outcome"] == "found after the last checkpoint"
    )
    assert (note["records"], note["first_line"], note["last_line"]) == (3, 1, 3)
    assert verify_anchored(path, public_key=SERVER.sign_public).found_at_start == 3


def test_a_long_run_of_foreign_records_is_counted_and_listed_in_part(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    server = AuditLog(path, SERVER, delay=3600)
    other = AuditLog(path)
    for i in range(audit.FOREIGN_SHOWN + 5):
        other.write("w", "noop", str(i))
    server.checkpoint()
    note = records(path)[-1]
    assert note["records"] == audit.FOREIGN_SHOWN + 5 and note["more"] == 5
    assert len(note["entries"]) == audit.FOREIGN_SHOWN  # type: ignore[arg-type]
    server.close()


def test_a_backdated_record_breaks_the_log_and_is_never_anchored(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    server = AuditLog(path, SERVER, delay=3600)
    server.write("ann", "list", "data")
    server.checkpoint()
    append_forged(path, time="2000-01-01T00:00:00.000+00:00", principal="admin", action="grant")
    assert server.checkpoint() is None  # the server signs nothing over it
    with pytest.raises(AuditError, match=r"line 2: its time 2000-01-01T00:00:00\.000"):
        verify_anchored(path, public_key=SERVER.sign_public)
    server.close()


@pytest.mark.parametrize("stamp", ["yesterday", "2030-01-01T00:00:00", 5])
def test_a_record_without_a_valid_time_is_refused(tmp_path: Path, stamp: object) -> None:
    path = tmp_path / "audit.log"
    AuditLog(path).write("ann", "list", "data")
    append_forged(path, time=stamp, principal="admin", action="grant")
    with pytest.raises(AuditError, match="line 2: the record has no valid time"):
        verify(path)


def test_writers_never_go_back_in_time_when_the_clock_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.log"
    AuditLog(path).write("ann", "list", "data")
    first = records(path)[0]["time"]
    monkeypatch.setattr(audit, "now_iso", lambda: "2020-01-01T00:00:00.000+00:00")
    AuditLog(path).write("ann", "list", "data")  # a clock set back, e.g. by NTP
    assert records(path)[1]["time"] == first
    assert verify(path) == 2


def test_an_admin_change_is_not_made_when_the_log_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    AuditLog(path).write("ann", "list", "data")
    path.write_bytes(path.read_bytes().replace(b'"outcome":"ok"', b'"outcome":"OK"'))
    changed = []
    with pytest.raises(AuditError), audit.admin_change(tmp_path, "cli:x", "grant", "set"):
        changed.append(True)
    assert changed == [] and len(records(path)) == 1


def test_an_admin_change_that_fails_is_not_recorded(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with pytest.raises(KeyError), audit.admin_change(tmp_path, "cli:x", "revoke", "set"):
        raise KeyError("no such grant")
    assert not path.exists() or records(path) == []
    with audit.admin_change(tmp_path, "cli:x", "grant", "set") as record:
        record["grantee"] = "ann"
    assert records(path)[-1]["grantee"] == "ann"
    assert os.stat(path).st_mode & 0o777 == 0o600
