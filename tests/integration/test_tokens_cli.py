"""Token names are never handed on by accident; tokens rotate and revoke; workers need a home.

A token's name owns datasets and results, so ``token add`` refuses a name
that exists (or was revoked) unless ``--rotate`` says the same holder gets a
new secret; ``token revoke`` ends a token at once, on a running server too.
``fdrtd-server worker`` without ``--home`` would ignore the owner's policy,
so it is refused with exit code 2. Through the real command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
from _processes import cli

from fdrtd_server.config import TokenStore, init_home
from fdrtd_server.local import LocalServer


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "h"
    init_home(path, "tok")
    return path


def test_token_add_refuses_an_existing_name(home: Path) -> None:
    first = cli("token", "add", str(home), "ann")
    assert first.returncode == 0, first.stderr
    token = first.stdout.strip()
    again = cli("token", "add", str(home), "ann")
    assert again.returncode == 2
    assert "'ann' exists" in again.stderr and "--rotate" in again.stderr
    assert again.stdout == ""
    assert TokenStore(home).authenticate(token) == ("ann", "analyst")
    admin = cli("token", "add", str(home), "admin", "--role", "analyst")
    assert admin.returncode == 2  # not even to change a role


def test_rotate_replaces_the_secret_and_keeps_the_name_and_role(home: Path) -> None:
    old = cli("token", "add", str(home), "boss", "--role", "admin").stdout.strip()
    rotated = cli("token", "add", str(home), "boss", "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert new != old and len(new) >= 43
    store = TokenStore(home)
    assert store.authenticate(old) is None
    assert store.authenticate(new) == ("boss", "admin")
    demoted = cli("token", "add", str(home), "boss", "--rotate", "--role", "analyst")
    assert TokenStore(home).authenticate(demoted.stdout.strip()) == ("boss", "analyst")
    missing = cli("token", "add", str(home), "nobody", "--rotate")
    assert missing.returncode == 2 and "no token named 'nobody'" in missing.stderr


def test_revoke_ends_a_token_and_keeps_the_name_reserved(home: Path) -> None:
    token = cli("token", "add", str(home), "carl").stdout.strip()
    revoked = cli("token", "revoke", str(home), "carl")
    assert revoked.returncode == 0, revoked.stderr
    assert TokenStore(home).authenticate(token) is None
    reused = cli("token", "add", str(home), "carl")
    assert reused.returncode == 2 and "was revoked" in reused.stderr
    twice = cli("token", "revoke", str(home), "carl")
    assert twice.returncode == 2 and "already revoked" in twice.stderr
    unknown = cli("token", "revoke", str(home), "dora")
    assert unknown.returncode == 2 and "no token named 'dora'" in unknown.stderr
    back = cli("token", "add", str(home), "carl", "--rotate")
    assert back.returncode == 0, back.stderr
    assert TokenStore(home).authenticate(back.stdout.strip()) == ("carl", "analyst")
    entries = json.loads((home / "tokens.json").read_text("utf-8"))
    assert token not in json.dumps(entries)


def test_revoked_entry_matches_no_token(home: Path) -> None:
    store = TokenStore(home)
    store.add("eve")
    store.revoke("eve")
    entry = json.loads((home / "tokens.json").read_text("utf-8"))["eve"]
    assert "hash" not in entry and entry["revoked"]
    for guess in ("", "-" * 64, "0" * 64, "eve"):
        assert store.authenticate(guess) is None


def test_revoke_and_rotate_take_effect_on_a_running_server(server: LocalServer) -> None:
    name = "revokee"
    token = TokenStore(server.home).add(name)
    auth = {"authorization": f"Bearer {token}"}
    uploaded = requests.post(
        server.url + "/v1/data",
        params={"format": "raw", "dtype": "<f8"},
        data=np.arange(4.0).tobytes(),
        headers=auth,
        timeout=30,
    )
    assert uploaded.status_code == 201
    handle = uploaded.json()["handle"]
    assert cli("token", "revoke", str(server.home), name).returncode == 0
    assert requests.get(server.url + "/v1/data", headers=auth, timeout=30).status_code == 401
    # the same holder gets a new token: the name, and its dataset, are still there
    new = cli("token", "add", str(server.home), name, "--rotate").stdout.strip()
    listed = requests.get(
        server.url + "/v1/data", headers={"authorization": f"Bearer {new}"}, timeout=30
    )
    assert listed.status_code == 200
    assert [entry["handle"] for entry in listed.json()["datasets"]] == [handle]
    assert requests.get(server.url + "/v1/data", headers=auth, timeout=30).status_code == 401


def test_worker_without_home_is_refused(tmp_path: Path) -> None:
    refused = cli("worker", "--nats-url", "nats://127.0.0.1:1")
    assert refused.returncode == 2
    assert "--home" in refused.stderr and "policy" in refused.stderr
    gone = cli("worker", "--nats-url", "nats://127.0.0.1:1", "--name", "w")
    assert gone.returncode == 2  # --name is no more: the name comes from the home
    missing = cli("worker", "--nats-url", "nats://127.0.0.1:1", "--home", str(tmp_path / "x"))
    assert missing.returncode == 2 and "not a server home" in missing.stderr
