"""Restarts, crashes and the ``fdrtd-server`` command line, with servers of our own.

These tests stop, kill and restart servers, so they never touch the
session's shared trio: each builds a :class:`LocalFederation` (or bare server
homes) in its own ``tmp_path``. The command line is run as a real
``python -m fdrtd_server`` process, the way an operator runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import reap_orphans

from fdrtd_client import Client
from fdrtd_server._embedded_nats import free_port
from fdrtd_server.audit import verify
from fdrtd_server.config import TokenStore
from fdrtd_server.identity import Identity, load_federation
from fdrtd_server.local import LocalFederation, LocalServer

TIMEOUT = 30.0
TOKEN_LINE = re.compile(r"^admin token \(shown once, store it safely\): (\S+)$", re.MULTILINE)


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m fdrtd_server ARGS`` and capture what it prints."""
    return subprocess.run(
        [sys.executable, "-m", "fdrtd_server", *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def solo(tmp_path: Path) -> Iterator[LocalServer]:
    """One running server of our own, stopped (if still running) at the end."""
    with LocalFederation(tmp_path / "solo", names=("solo",)) as federation:
        yield federation.servers["solo"]


# -- processes -----------------------------------------------------------------------


def _proc_state(pid: int) -> str | None:
    """The state letter of a process (``Z`` for a zombie), or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name may hold spaces and parentheses; the fields follow the last ")"
    return text[text.rindex(")") + 2 :].split()[0]


def _children(pid: int) -> list[int]:
    """Child process ids of ``pid``, from ``/proc`` (no psutil)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(child) for child in task.read_text().split()]
    if found:
        return found
    # kernels without CONFIG_PROC_CHILDREN: every process's stat names its parent
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = path.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(path.parent.name))
    return found


def _embedded_nats_pid(server: LocalServer) -> int:
    assert server.process is not None
    found = [
        child
        for child in _children(server.process.pid)
        if Path(f"/proc/{child}/comm").read_text().strip() == "nats-server"
    ]
    assert len(found) == 1, f"expected one nats-server child, found {found}"
    return found[0]


def _wait_gone_or_zombie(pid: int, seconds: float) -> str | None:
    deadline = time.monotonic() + seconds
    state = _proc_state(pid)
    while state not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
        state = _proc_state(pid)
    return state


# -- persistence -----------------------------------------------------------------------


def test_restart_keeps_data_and_results(solo: LocalServer, tmp_path: Path) -> None:
    client = solo.client(timeout=TIMEOUT)
    values = np.arange(40.0)
    # a result > 16 MiB (four 750,000-element vectors), kept in the results object store
    wide = np.arange(3 * 750_000, dtype=np.float64).reshape(3, 750_000)
    csv_path = tmp_path / "table.csv"
    csv_path.write_text("group,x\na,1.5\nb,2.5\na,\nc,4.0\n", "utf-8")
    handles = {
        "values": client.upload(values),
        "wide": client.upload(wide),
        "table": client.upload(csv_path),
    }
    described = {name: client.describe(handle) for name, handle in handles.items()}
    small = client.compute("map", "aggregate", data=handles["values"])
    large = client.compute("map", "aggregate", data=handles["wide"])
    table = client.compute("map", "aggregate", data=handles["table"], column="x")
    before = {job.handle: job.result(TIMEOUT) for job in (small, large, table)}
    assert before[small.handle]["sum"] == 780.0
    assert before[table.handle]["count"] == 3
    client.close()

    process = solo.process
    assert process is not None
    nats_pid = _embedded_nats_pid(solo)
    solo.stop()  # SIGTERM: a clean shutdown
    assert process.returncode == 0
    assert _wait_gone_or_zombie(nats_pid, 10) in (None, "Z")
    solo.start()

    client = solo.client(timeout=TIMEOUT)  # a new connection: the old server is gone
    for name, handle in handles.items():
        assert client.describe(handle) == described[name]
    assert {entry["handle"] for entry in client.datasets()} == set(handles.values())
    for handle, value in before.items():
        after = client.job(handle).result(TIMEOUT)
        assert set(after) == set(value)
        for key in value:
            np.testing.assert_array_equal(after[key], value[key])
    np.testing.assert_array_equal(before[large.handle]["sum"], wide.sum(axis=0))
    again = client.compute("map", "aggregate", data=handles["values"]).result(TIMEOUT)
    assert again == before[small.handle]
    rows = client.compute("map", "aggregate", data=handles["table"], column="x").result(TIMEOUT)
    assert (rows["count"], rows["sum"]) == (3, 8.0)
    client.close()

    # the audit chain goes on across the restart
    records = verify(solo.home / "audit.log")
    assert records == len((solo.home / "audit.log").read_text().splitlines())
    lines = (solo.home / "audit.log").read_text("utf-8").splitlines()
    started = [json.loads(line)["action"] for line in lines]
    assert started.count("upload") + started.count("compute") == 8  # 3 + 3 before, 2 after


def test_sigkill_takes_the_embedded_nats_server_down(solo: LocalServer) -> None:
    client = solo.client(timeout=TIMEOUT)
    handle = client.upload(np.arange(12.0))
    assert client.compute("map", "aggregate", data=handle).result(TIMEOUT)["count"] == 12
    client.close()
    nats_pid = _embedded_nats_pid(solo)
    assert _proc_state(nats_pid) not in (None, "Z")
    try:
        solo.stop(kill=True)
        state = _wait_gone_or_zombie(nats_pid, 10)
        assert state in (None, "Z"), f"nats-server {nats_pid} outlived its killed parent"
    finally:
        if _proc_state(nats_pid) not in (None, "Z"):
            os.kill(nats_pid, signal.SIGKILL)  # do not leak it into the rest of the suite
        _wait_gone_or_zombie(nats_pid, 5)
        # a multi-threaded process shows "Z" while its other threads still exit, and
        # cannot be reaped until they have: reap until it is gone (or 10 s have passed)
        deadline = time.monotonic() + 10
        reap_orphans()
        while _proc_state(nats_pid) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
            reap_orphans()
    assert _proc_state(nats_pid) is None  # reaped, not left as a zombie

    solo.start()
    client = solo.client(timeout=TIMEOUT)
    assert client.describe(handle)["rows"] == 12
    result = client.compute("map", "aggregate", data=handle).result(TIMEOUT)
    assert (result["count"], result["sum"]) == (12, 66.0)
    client.close()
    new_nats = _embedded_nats_pid(solo)
    assert new_nats != nats_pid


# -- command line ------------------------------------------------------------------


def test_init_prints_the_admin_token_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    port = free_port()
    done = cli("init", str(home), "--name", "x", "--port", str(port))
    assert done.returncode == 0, done.stderr
    match = TOKEN_LINE.search(done.stdout)
    assert match is not None, done.stdout
    token = match.group(1)
    assert len(token) >= 43  # 256 random bits, URL-safe base64
    assert done.stdout.count(token) == 1
    assert f"created server 'x' in {home}" in done.stdout
    assert token not in done.stderr

    stored = (home / "tokens.json").read_text("utf-8")
    assert token not in stored
    entries = json.loads(stored)
    assert entries["admin"].pop("created")  # when it was made; no expiry
    assert entries == {
        "admin": {"hash": hashlib.sha256(token.encode()).hexdigest(), "role": "admin"}
    }
    assert stat.S_IMODE((home / "tokens.json").stat().st_mode) == 0o600
    assert TokenStore(home).authenticate(token) == ("admin", "admin")
    settings = tomllib.loads((home / "fdrtd.toml").read_text("utf-8"))
    assert settings["server"] == {"name": "x", "host": "127.0.0.1", "port": port}
    assert (home / "identity").is_dir()

    again = cli("init", str(home), "--name", "x", "--port", str(port))
    assert again.returncode == 2
    assert again.stdout == ""
    assert "already holds a server" in again.stderr
    assert str(home) in again.stderr
    assert (home / "tokens.json").read_text("utf-8") == stored  # the first token still works

    bad = cli("init", str(tmp_path / "other"), "--name", "Not A Name")
    assert bad.returncode == 2
    assert "setting 'name'" in bad.stderr
    assert not (tmp_path / "other" / "fdrtd.toml").exists()


def test_token_add_serve_and_audit_verify(tmp_path: Path) -> None:
    home = tmp_path / "cli"
    port = free_port()
    created = cli("init", str(home), "--name", "cli", "--port", str(port))
    assert created.returncode == 0, created.stderr
    admin = TOKEN_LINE.search(created.stdout)
    assert admin is not None

    added = cli("token", "add", str(home), "carol")
    assert added.returncode == 0, added.stderr
    carol = added.stdout.strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43,}", carol)
    assert carol not in (home / "tokens.json").read_text("utf-8")

    server = LocalServer(home, "cli", port, carol, admin.group(1))
    server.start()
    try:
        for token, status in ((carol, 200), (admin.group(1), 403)):  # admins hold no data
            answer = requests.get(
                server.url + "/v1/data",
                headers={"authorization": f"Bearer {token}"},
                timeout=TIMEOUT,
            )
            assert answer.status_code == status
            assert status != 200 or answer.json() == {"datasets": []}
        wrong = requests.get(
            server.url + "/v1/data", headers={"authorization": "Bearer " + carol[::-1]}, timeout=5
        )
        assert wrong.status_code == 401

        # a token added while the server runs works at once
        late = cli("token", "add", str(home), "dave", "--role", "owner")
        assert late.returncode == 0, late.stderr
        with Client(server.url, late.stdout.strip(), timeout=TIMEOUT) as dave:
            handle = dave.upload([1.0, 2.0, 3.0, 4.0])
            assert dave.compute("map", "aggregate", data=handle).result(TIMEOUT)["sum"] == 10.0
        with server.client() as client:
            assert client.datasets() == []  # carol does not see dave's data
    finally:
        server.stop()

    verified = cli("audit", "verify", str(home))
    assert verified.returncode == 0, verified.stderr
    lines = (home / "audit.log").read_text("utf-8").splitlines()
    assert verified.stdout.splitlines()[0] == f"audit log intact: {len(lines)} records"
    actions = [json.loads(line)["action"] for line in lines]
    assert (actions.count("upload"), actions.count("compute")) == (1, 1)  # dave's

    record = json.loads(lines[0])
    record["principal"] = "mallory"
    (home / "audit.log").write_text(json.dumps(record) + "\n" + "\n".join(lines[1:]) + "\n")
    broken = cli("audit", "verify", str(home))
    assert broken.returncode == 2
    assert "broken at line 1" in broken.stderr
    assert "intact" not in broken.stdout

    nowhere = cli("token", "add", str(tmp_path / "nowhere"), "erin")
    assert nowhere.returncode == 2
    assert "not a server home" in nowhere.stderr


def test_federation_show_and_add(tmp_path: Path) -> None:
    ports = {"x": free_port(), "y": free_port()}
    for name, port in ports.items():
        created = cli("init", str(tmp_path / name), "--name", name, "--port", str(port))
        assert created.returncode == 0, created.stderr

    shown = cli("federation", "show", str(tmp_path / "x"))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("[[member]]\n")
    members = tomllib.loads(shown.stdout)["member"]
    url = f"http://127.0.0.1:{ports['x']}"
    expected = Identity.load(tmp_path / "x" / "identity", "x").public_entry(url)
    assert members == [expected.to_dict()]
    public = cli("federation", "show", str(tmp_path / "x"), "--url", "https://x.example.org")
    assert tomllib.loads(public.stdout)["member"][0]["url"] == "https://x.example.org"

    entry = tmp_path / "x.toml"
    entry.write_text(shown.stdout, "utf-8")
    added = cli("federation", "add", str(tmp_path / "y"), str(entry))
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == f"added 'x' ({url})"
    federation = load_federation(tmp_path / "y" / "federation.toml")
    assert federation == {"x": expected}

    # adding the same member again replaces it; stdin works as the file "-"
    again = cli("federation", "add", str(tmp_path / "y"), "-", stdin=public.stdout)
    assert again.returncode == 0, again.stderr
    assert load_federation(tmp_path / "y" / "federation.toml")["x"].url == "https://x.example.org"
    assert len(load_federation(tmp_path / "y" / "federation.toml")) == 1

    itself = cli("federation", "add", str(tmp_path / "x"), str(entry))
    assert itself.returncode == 2
    assert "cannot add itself" in itself.stderr
    x_federation = tmp_path / "x" / "federation.toml"
    assert not x_federation.exists() or "x" not in load_federation(x_federation)

    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing here\n", "utf-8")
    nothing = cli("federation", "add", str(tmp_path / "y"), str(empty))
    assert nothing.returncode == 2
    assert "no [[member]] entry" in nothing.stderr


def test_serve_refuses_a_directory_that_is_not_a_home(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    done = cli("serve", str(plain), "--port", str(free_port()))
    assert done.returncode == 2
    assert "is not a server home" in done.stderr
    assert f"run 'fdrtd-server init {plain}' first" in done.stderr
    assert not (plain / "jetstream").exists()
