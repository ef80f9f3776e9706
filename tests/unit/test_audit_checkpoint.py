"""The audit log's signed checkpoint: truncation and rewrites are caught, crashes are not alarms.

Each test attacks the log the way someone with write access to the server's
directory (but not its private key) could: cut records off the end, rewrite
the whole file with a fresh, valid chain, delete or forge the checkpoint, or
put an older log and checkpoint back together. A crash between a record and
the checkpoint that would cover it must not look like any of these.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import time
from pathlib import Path

import pytest

from fdrtd_server.audit import (
    UNANCHORED,
    AuditError,
    AuditLog,
    checkpoint_now,
    checkpoint_path,
    read_checkpoint,
    sign_checkpoint,
    verify,
    verify_anchored,
    write_checkpoint,
)
from fdrtd_server.identity import Identity

SERVER = Identity.generate("alpha")
MALLORY = Identity.generate("alpha")  # same name, another key: what an intruder can make


def anchored_log(path: Path, count: int = 5) -> AuditLog:
    """A log with ``count`` records and a checkpoint covering all of them (a clean stop)."""
    log = AuditLog(path, SERVER, delay=3600)
    for i in range(count):
        log.write(f"user{i}", "compute", f"r-{i:040x}", function="aggregate")
    log.close()
    return log


def check(path: Path, extra: tuple[Path, ...] = ()) -> list[str]:
    """The report of ``audit verify``, checked against the server's own key."""
    verified = verify_anchored(path, public_key=SERVER.sign_public, server="alpha", extra=extra)
    return verified.lines()


def lines_of(path: Path) -> list[str]:
    return path.read_text("utf-8").splitlines(keepends=True)


def rechain(records: list[dict[str, object]]) -> str:
    """A valid hash chain over ``records``: what an intruder writes to rewrite the log."""
    previous, out = "0" * 64, []
    for record in records:
        body = {k: v for k, v in record.items() if k != "hash"}
        body["prev"] = previous
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        previous = hashlib.sha256(text.encode()).hexdigest()
        out.append(f'{text[:-1]},"hash":"{previous}"}}\n')  # the writer's exact form
    return "".join(out)


def test_an_intact_log_passes_and_says_what_is_anchored(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    anchored_log(path)
    report = check(path)
    assert report[0] == "audit log intact: 5 records"
    assert "the first 5 records match the checkpoint signed by 'alpha'" in report[1]
    assert SERVER.sign_public.hex()[:16] in report[1]
    assert len(report) == 2  # nothing unanchored, no notes
    assert verify(path) == 5
    point = read_checkpoint(checkpoint_path(path))
    assert point is not None and point.count == 5
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("removed", [1, 2, 5])
def test_removing_the_last_records_is_detected(tmp_path: Path, removed: int) -> None:
    path = tmp_path / "audit.log"
    anchored_log(path)
    path.write_text("".join(lines_of(path)[:-removed]), "utf-8")
    assert verify(path) == 5 - removed  # the bare chain cannot see it ...
    with pytest.raises(AuditError, match="was truncated") as caught:
        check(path)  # ... the checkpoint does
    assert f"holds only {5 - removed}" in str(caught.value)
    assert f"records {6 - removed} to 5 were removed" in str(caught.value)


def test_emptying_or_deleting_the_log_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    anchored_log(path)
    path.write_text("", "utf-8")
    with pytest.raises(AuditError, match="holds only 0"):
        check(path)
    path.unlink()
    with pytest.raises(AuditError, match=r"is missing, but .* records 5 records"):
        check(path)
    with pytest.raises(AuditError, match="the log was removed"):
        AuditLog(path, SERVER)  # and the server will not start a new one over it


@pytest.mark.parametrize("extra", [0, 3])
def test_a_log_rewritten_from_the_start_is_detected(tmp_path: Path, extra: int) -> None:
    path = tmp_path / "audit.log"
    anchored_log(path)
    records = [json.loads(line) for line in lines_of(path)]
    records[0]["principal"] = "someone-else"
    records += [dict(records[-1], target=f"r-{i:040x}") for i in range(extra)]
    path.write_text(rechain(records), "utf-8")
    assert verify(path) == 5 + extra  # a valid chain
    with pytest.raises(AuditError, match="was rewritten: record 5 does not hash"):
        check(path)


def test_a_deleted_checkpoint_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    anchored_log(path)
    checkpoint_path(path).unlink()
    with pytest.raises(AuditError, match="holds 5 records but has no checkpoint"):
        check(path)


def test_an_edited_forged_or_foreign_checkpoint_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    anchored_log(path)
    point_file = checkpoint_path(path)
    original = point_file.read_text("utf-8")

    # cut the last record and lower the count to match, keeping the signature
    path.write_text("".join(lines_of(path)[:-1]), "utf-8")
    head = json.loads(lines_of(path)[-1])["hash"]
    point_file.write_text(json.dumps(dict(json.loads(original), count=4, head=head)), "utf-8")
    with pytest.raises(AuditError, match=r"signature does not match: .* forged or edited"):
        check(path)

    # garbage in place of the checkpoint
    point_file.write_text("{}", "utf-8")
    with pytest.raises(AuditError, match="not a well-formed audit checkpoint"):
        check(path)

    # signed anew with a key of one's own: not the server's key
    write_checkpoint(point_file, sign_checkpoint(MALLORY, 4, head))
    with pytest.raises(AuditError, match="not this server's checkpoint"):
        check(path)
    # (without the server's key to check against, only "some key signed it" is proven)
    assert verify_anchored(path).records == 4


def test_the_on_demand_checkpoint_never_signs_a_tampered_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    anchored_log(path)
    path.write_text("".join(lines_of(path)[:-2]), "utf-8")
    with pytest.raises(AuditError, match="was truncated"):
        checkpoint_now(path, SERVER)
    assert read_checkpoint(checkpoint_path(path)).count == 5  # type: ignore[union-attr]


def test_a_checkpoint_kept_elsewhere_detects_a_rollback(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    anchored_log(path, 3)
    old_log, old_point = tmp_path / "old.log", tmp_path / "old.checkpoint"
    shutil.copyfile(path, old_log)
    shutil.copyfile(checkpoint_path(path), old_point)
    log = AuditLog(path, SERVER, delay=3600)
    log.write("user9", "compute", "r-" + "9" * 40)
    log.close()
    _, kept = checkpoint_now(path, SERVER)  # the operator keeps this one off the machine
    kept_file = tmp_path / "kept.json"
    kept_file.write_text(json.dumps(kept.to_dict()), "utf-8")
    # the intruder puts the older log and its (genuine) checkpoint back
    shutil.copyfile(old_log, path)
    shutil.copyfile(old_point, checkpoint_path(path))
    assert check(path)[0] == "audit log intact: 3 records"  # consistent on its own ...
    with pytest.raises(AuditError, match=r"kept\.json of .* covers 4 records"):
        check(path, extra=(kept_file,))  # ... but not with the kept checkpoint


def test_a_crash_before_the_checkpoint_is_no_alarm(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    anchored_log(path, 2)
    log = AuditLog(path, SERVER, delay=3600)
    for i in range(3):
        log.write("late", "compute", f"r-{i:040x}")
    # killed here: no close(), no checkpoint for the last 3 records
    report = check(path)
    assert report[0] == "audit log intact: 5 records"
    assert "the first 2 records match" in report[1]
    assert "the last 3 records were written after that checkpoint" in report[2]
    # a crash in the middle of writing a line leaves an incomplete last line
    with path.open("ab") as handle:
        handle.write(b'{"action":"compute","outc')
    report = check(path)
    assert report[0] == "audit log intact: 5 records"
    assert any("incomplete line of 25 bytes" in line for line in report)
    # the restarted server cuts the fragment, says so, and anchors everything
    restarted = AuditLog(path, SERVER, delay=3600)
    restarted.close()
    report = check(path)
    assert report[0] == "audit log intact: 7 records"
    # the 3 unanchored records could have been written by anyone while no server ran
    assert report[2].startswith("found at start: 3 records were written after the last")
    assert len(report) == 3
    repair, found = (json.loads(line) for line in lines_of(path)[-2:])
    assert repair["action"] == "audit-repair" and found["action"] == "audit-foreign"


def test_a_crash_before_the_first_checkpoint_of_a_new_log_is_no_alarm(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, SERVER, delay=3600)  # a new log is anchored at 0 records at once
    log.write("first", "upload", "d-" + "0" * 40)
    report = check(path)
    assert report[0] == "audit log intact: 1 records"
    assert "the last 1 records were written after" in report[2]


def test_the_background_thread_anchors_without_a_further_write(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, SERVER, delay=0.05)
    try:
        for i in range(20):
            log.write("u", "compute", f"r-{i:040x}")
        deadline = time.monotonic() + 60  # bounds a hang; the delay is 0.05 s
        while time.monotonic() < deadline:
            point = read_checkpoint(checkpoint_path(path))
            if point is not None and point.count == 20:
                break
            time.sleep(0.02)
        assert point is not None and point.count == 20
        assert len(check(path)) == 2  # all anchored, while the log stays open
    finally:
        log.close()


def test_the_server_refuses_to_sign_over_a_tampered_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    anchored_log(path)
    path.write_text("".join(lines_of(path)[:-1]), "utf-8")
    with pytest.raises(AuditError, match=r"was truncated.*move both away"):
        AuditLog(path, SERVER)
    assert read_checkpoint(checkpoint_path(path)).count == 5  # type: ignore[union-attr]


def test_a_log_without_checkpoint_is_anchored_as_found_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    legacy = AuditLog(path)  # no identity: a bare chain, as before checkpoints existed
    for i in range(3):
        legacy.write("u", "compute", f"r-{i:040x}")
    with pytest.raises(AuditError, match="holds 3 records but has no checkpoint"):
        check(path)
    AuditLog(path, SERVER).close()
    report = check(path)
    assert report[0] == "audit log intact: 4 records"
    assert "line 4" in report[2] and "found 3 records that no checkpoint covered" in report[2]
    assert json.loads(lines_of(path)[-1])["action"] == UNANCHORED


def test_records_hold_no_extra_fields_that_name_values(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    anchored_log(path, 1)
    record = json.loads(lines_of(path)[0])
    assert set(record) == {
        "time",
        "principal",
        "action",
        "target",
        "outcome",
        "function",
        "prev",
        "hash",
    }
