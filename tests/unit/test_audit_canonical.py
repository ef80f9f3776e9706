"""The audit verifier accepts a line only in the exact form the server writes.

A JSON object with a key twice means one thing to Python (the last value) and
another to a person or ``grep`` (the first), so a forger could put
``"principal":"mallory","action":"FORGED"`` in front of a genuine record and
the hash chain would still hold. The verifier re-serialises every record the
way the writer does and compares bytes; each test below edits one line of a
genuine, anchored log in a way that keeps its meaning to Python's reader and
expects the line to be refused by number, with the rule it breaks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fdrtd_server.audit import AuditError, AuditLog, verify, verify_anchored
from fdrtd_server.identity import Identity

SERVER = Identity.generate("alpha")


def genuine_log(path: Path) -> list[bytes]:
    """An anchored log of four records, one with non-ASCII text; returns its lines."""
    log = AuditLog(path, SERVER, delay=3600)
    log.write("alice", "upload", "d-1", bytes=12)
    log.write("bob", "compute", "r-2", function="aggregate", note="café ✓")
    log.write("carol", "release", "r-2", reasons={"b": 1, "a": 2}, shape=(2, 3))
    log.write("dave", "list", "data")
    log.close()
    return path.read_bytes().splitlines(keepends=True)


def tamper(path: Path, number: int, new_line: bytes) -> None:
    """Replace line ``number`` (1-based) of the log, keeping the checkpoint as it is."""
    lines = path.read_bytes().splitlines(keepends=True)
    lines[number - 1] = new_line
    path.write_bytes(b"".join(lines))


def refused(path: Path, number: int, rule: str) -> None:
    """Both the bare chain check and the anchored check refuse line ``number`` for ``rule``."""
    for check in (
        lambda: verify(path),
        lambda: verify_anchored(path, public_key=SERVER.sign_public, server="alpha"),
    ):
        with pytest.raises(AuditError, match=rf"broken at line {number}: .*{rule}"):
            check()


def test_a_genuine_log_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    genuine_log(path)
    assert verify(path) == 4
    report = verify_anchored(path, public_key=SERVER.sign_public, server="alpha").lines()
    assert report[0] == "audit log intact: 4 records"


def test_a_forged_duplicate_key_in_front_of_the_original_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = genuine_log(path)
    forged = b'{"principal":"mallory","action":"FORGED",' + lines[1][1:]
    tamper(path, 2, forged)
    refused(path, 2, "a key appears twice")


def test_a_duplicate_key_inside_a_nested_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = genuine_log(path)
    forged = lines[2].replace(b'"reasons":{', b'"reasons":{"a":9,')
    assert forged != lines[2]
    tamper(path, 3, forged)
    refused(path, 3, "a key appears twice")


def test_extra_whitespace_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = genuine_log(path)
    tamper(path, 1, lines[0].replace(b'","', b'", "', 1))
    space = lines[0].index(b'","') + 3  # 1-based: quote, comma, then the space
    refused(path, 1, f"not in the canonical form .* differs from that form at byte {space}\\)")


def test_trailing_whitespace_and_crlf_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = genuine_log(path)
    tamper(path, 4, lines[3][:-1] + b" \n")
    refused(path, 4, "not in the canonical form")
    tamper(path, 4, lines[3][:-1] + b"\r\n")
    refused(path, 4, "not in the canonical form")


def test_reordered_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = genuine_log(path)
    # "action" moved from the front to just before "hash": same keys, same values
    head, rest = lines[0][1:].split(b",", 1)
    assert head.startswith(b'"action"')
    body, hash_field = rest.rsplit(b',"hash":', 1)
    tamper(path, 1, b"{" + body + b"," + head + b',"hash":' + hash_field)
    refused(path, 1, "not in the canonical form")


def test_non_ascii_escapes_other_than_the_writers_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = genuine_log(path)
    assert b"caf\\u00e9 \\u2713" in lines[1]  # the writer's form: lowercase ASCII escapes
    for variant in (
        "café ✓".encode(),  # raw UTF-8
        b"caf\\u00E9 \\u2713",  # uppercase hex
        b"\\u0063af\\u00e9 \\u2713",  # an ASCII letter escaped
    ):
        tamper(path, 2, lines[1].replace(b"caf\\u00e9 \\u2713", variant))
        refused(path, 2, "not in the canonical form")


def test_an_empty_line_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = genuine_log(path)
    tamper(path, 3, b"\n" + lines[2])
    refused(path, 3, "not a record")


def test_a_record_with_a_field_named_hash_is_never_written(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    with pytest.raises(ValueError, match="field named 'hash'"):
        log.write("alice", "upload", "d-1", hash="x")
    log.write("alice", "upload", "d-1", keys={2: "b", 10: "a"})
    assert verify(tmp_path / "audit.log") == 1
