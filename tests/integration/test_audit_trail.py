"""Invariant 7 on a real server: results handed out, job ends, reads and refused logins are audited.

Every record names a principal, an action, a handle and an outcome; none
holds a value, a token or an error message. Job ends are reported by the
microservice on the bus (``fdrtd.audit.jobs``) and written by the controller
a moment later, so the tests wait for them.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from fdrtd_client.errors import ServerError
from fdrtd_server.audit import verify
from fdrtd_server.config import TokenStore
from fdrtd_server.local import LocalServer

TIMEOUT = 30.0
VALUES = np.array([7001.25, 2.5, 3.25, 4.0])  # sum 7011.0: "7011.0" cannot turn up in hex


def records(server: LocalServer) -> list[dict[str, Any]]:
    path = server.home / "audit.log"
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def find(server: LocalServer, *, deadline: float = 5.0, **fields: Any) -> list[dict[str, Any]]:
    """Records with these fields, waiting up to ``deadline`` s for them to appear."""
    end = time.monotonic() + deadline
    while True:
        found = [r for r in records(server) if all(r.get(k) == v for k, v in fields.items())]
        if found or time.monotonic() > end:
            return found
        time.sleep(0.02)


def test_a_result_handed_out_is_audited_each_way_without_its_value(server: LocalServer) -> None:
    with server.client(timeout=TIMEOUT) as client:
        handle = client.upload(VALUES)
        job = client.compute("map", "aggregate", data=handle)  # compute?wait answers 200
        assert job.result(TIMEOUT)["sum"] == 7011.0
    auth = {"authorization": f"Bearer {server.token}"}
    url = f"{server.url}/v1/results/{job.handle}"
    assert requests.get(url, headers=auth, timeout=TIMEOUT).json()["value"]["sum"] == 7011.0
    state_only = requests.get(url, params={"value": "false"}, headers=auth, timeout=TIMEOUT)
    assert "value" not in state_only.json()
    with requests.get(url + "/events", headers=auth, stream=True, timeout=TIMEOUT) as events:
        assert "7011.0" in events.text

    handed = find(server, action="result", target=job.handle)
    assert [(r["via"], r["value"], r["outcome"]) for r in handed] == [
        ("compute", True, "done"),
        ("poll", True, "done"),
        ("poll", False, "done"),
        ("events", True, "done"),
    ]
    assert {r["principal"] for r in handed} == {"analyst"}
    (ended,) = find(server, action="job-end", target=job.handle)
    assert (ended["outcome"], ended["microservice"], ended["function"]) == (
        "done",
        "map",
        "aggregate",
    )
    assert ended["principal"] == "analyst" and "error_class" not in ended
    text = (server.home / "audit.log").read_text("utf-8")
    assert "7011.0" not in text and "7001.25" not in text
    assert verify(server.home / "audit.log") >= len(handed) + 1


def test_how_a_failed_job_ended_is_audited_with_its_class_not_its_message(
    server: LocalServer,
) -> None:
    with server.client(timeout=TIMEOUT) as client:
        handle = client.upload(np.array([1.5, 2.5]))  # fewer records than min_cohort (3)
        job = client.compute("map", "aggregate", data=handle)
        with pytest.raises(ServerError, match=r"(?i)cohort|fewer"):
            job.result(TIMEOUT)
    (ended,) = find(server, action="job-end", target=job.handle)
    assert (ended["outcome"], ended["error_status"], ended["error_class"]) == (
        "failed",
        403,
        "CohortTooSmall",
    )
    failed = find(server, action="result", target=job.handle)
    assert failed and all((r["outcome"], r["error_status"]) == ("failed", 403) for r in failed)
    assert all("detail" not in r and "error" not in r for r in [ended, *failed])


def test_refused_logins_are_audited_without_the_token(server: LocalServer) -> None:
    wrong = secrets.token_urlsafe(32)
    answer = requests.get(
        server.url + "/v1/data", headers={"authorization": f"Bearer {wrong}"}, timeout=TIMEOUT
    )
    assert answer.status_code == 401
    assert requests.get(server.url + "/v1/compute", timeout=TIMEOUT).status_code in (401, 405)
    assert requests.get(server.url + "/v1/data", timeout=TIMEOUT).status_code == 401
    refused = find(server, action="authenticate")
    reasons = {(r["reason"], r["target"], r["method"]) for r in refused}
    assert ("unknown token", "/v1/data", "GET") in reasons
    assert ("no bearer token", "/v1/data", "GET") in reasons
    assert all(r["outcome"] == "refused" and r["principal"] == "anonymous" for r in refused)
    assert all(r["client"] == "127.0.0.1" for r in refused)
    text = (server.home / "audit.log").read_text("utf-8")
    assert wrong not in text and wrong[:12] not in text
    assert server.token not in text


def test_reads_and_refusals_of_handles_are_audited(server: LocalServer) -> None:
    with server.client(timeout=TIMEOUT) as client:
        handle = client.upload(VALUES)
        client.describe(handle)
        client.datasets()
    assert find(server, action="describe", target=handle, outcome="ok", principal="analyst")
    assert find(server, action="list", target="data", principal="analyst")

    stranger = {"authorization": "Bearer " + TokenStore(server.home).add("audit_stranger")}
    theirs = requests.get(f"{server.url}/v1/data/{handle}", headers=stranger, timeout=TIMEOUT)
    assert theirs.status_code == 404
    assert (
        find(server, action="describe", target=handle, principal="audit_stranger")[0]["outcome"]
        == "refused 404"
    )
    unknown = "r-" + secrets.token_hex(20)
    assert requests.get(f"{server.url}/v1/results/{unknown}", headers=stranger).status_code == 404
    assert find(server, action="result", target=unknown)[0]["outcome"] == "refused 404"
    junk = requests.get(f"{server.url}/v1/results/not-a-handle", headers=stranger, timeout=5)
    assert junk.status_code == 400
    assert find(server, action="result", target="(not a handle)", principal="audit_stranger")


@pytest.mark.parametrize("length", [21, 22])
def test_session_ids_need_22_characters(server: LocalServer, length: int) -> None:
    with server.client(timeout=TIMEOUT) as client:
        handle = client.upload(VALUES)
        sid = secrets.token_urlsafe(32)[:length]
        body = {
            "microservice": "smpc",
            "function": "count",
            "inputs": {"data": handle},
            "session": {"id": sid, "parties": ["beta", "gamma"]},  # not alpha: fails at once
        }
        auth = {"authorization": f"Bearer {server.token}"}
        answer = requests.post(f"{server.url}/v1/compute", json=body, headers=auth, timeout=30)
        if length < 22:
            assert answer.status_code == 400
            assert "'session.id' must be 22 to 64" in answer.json()["detail"]
        else:
            assert answer.status_code == 202  # the id passed; the job then fails on 'alpha'
            job = client.job(answer.json()["result"])
            with pytest.raises(ServerError, match="'alpha'"):
                job.result(TIMEOUT)


def test_the_audit_log_path_is_the_documented_one(server: LocalServer) -> None:
    assert (server.home / "audit.log").is_file()
    assert (server.home / "audit.checkpoint").is_file()
    point = json.loads(Path(server.home / "audit.checkpoint").read_text("utf-8"))
    assert point["format"] == "fdrtd-audit-checkpoint/1" and point["server"] == server.name
