"""JSON never meets a float it cannot write: NaN and infinity in answers and in the audit log."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from fdrtd_client import wire
from fdrtd_server import audit
from fdrtd_server.audit import AuditLog, verify


def test_non_finite_floats_are_null_in_json_so_that_strict_json_never_fails() -> None:
    message = {"a": math.inf, "b": [np.float64(-math.inf), np.float32("nan")], "c": 1.5}
    jsonable = wire.to_jsonable(message)
    assert jsonable == {"a": None, "b": [None, None], "c": 1.5}
    json.dumps(jsonable, allow_nan=False)


def test_the_audit_writer_writes_standard_json_that_the_verifier_accepts(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.write("alice", "result", "r-1", inf=math.inf, values=[-math.inf, float("nan"), 1.5])
    log.write("alice", "result", "r-2", nan=np.float64("nan"))
    lines = path.read_bytes().splitlines()
    first = json.loads(lines[0], parse_constant=refuse)
    assert (first["inf"], first["values"]) == ("Infinity", ["-Infinity", "NaN", 1.5])
    assert json.loads(lines[1], parse_constant=refuse)["nan"] == "NaN"
    assert verify(path) == 2


def test_a_log_an_older_writer_wrote_with_a_bare_nan_still_verifies(tmp_path: Path) -> None:
    record = {
        "time": "2020-01-01T00:00:00.000+00:00",
        "principal": "alice",
        "action": "a",
        "target": "",
        "outcome": "ok",
    }
    body = json.dumps(
        {**record, "bytes": math.nan, "prev": audit._GENESIS}, sort_keys=True, separators=(",", ":")
    )
    digest = hashlib.sha256(body.encode()).hexdigest()
    path = tmp_path / "audit.log"
    path.write_bytes(audit._line(body, digest))
    assert b"NaN" in path.read_bytes()
    AuditLog(path).write("alice", "list", "data")
    assert verify(path) == 2


def refuse(name: str) -> None:
    raise AssertionError(f"the audit log holds the non-standard JSON constant {name}")
