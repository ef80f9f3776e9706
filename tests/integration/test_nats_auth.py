"""The embedded nats-server lets in only its own server, and its credentials never show.

One real ``fdrtd-server serve`` process (with its embedded ``nats-server``) on
127.0.0.1. Any local user can find the NATS port; without this server's
credentials a connection must be refused, because the bus carries every
uploaded dataset (the ``fdrtd_data`` object store) and every request under
any principal. The credentials are drawn anew on every start and live only
in files of mode 0600: never in a command line (``/proc/<pid>/cmdline``,
what ``ps`` shows) and never in the server's log.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
import nats.errors
import numpy as np
import pytest
from nats.aio.client import Client as NatsClient

from fdrtd_server._embedded_nats import CONFIG_FILE, EmbeddedNats
from fdrtd_server.bus import DATA_BUCKET
from fdrtd_server.local import LocalFederation, LocalServer

DEADLINE = 30.0


@pytest.fixture(scope="module")
def solo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """One server of its own: the last test here restarts it."""
    with LocalFederation(tmp_path_factory.mktemp("nats-auth"), names=("solo",)) as federation:
        yield federation.servers["solo"]


def nats_url(server: LocalServer) -> str:
    """The URL with credentials, as the server wrote it for its workers."""
    return server.nats_url_file.read_text("utf-8").strip()


def password(server: LocalServer) -> str:
    secret = urlsplit(nats_url(server)).password
    assert secret
    return secret


def without_credentials(url: str) -> str:
    parts = urlsplit(url)
    return f"nats://{parts.hostname}:{parts.port}"


def run(coro: Any) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(DEADLINE):
            return await coro

    return asyncio.run(bounded())


async def refused(url: str) -> str:
    """Try to connect (no retries); return why it failed, or fail the test."""
    errors: list[str] = []

    async def record(error: Exception) -> None:
        errors.append(str(error))

    nc = NatsClient()
    try:
        await nc.connect(
            url,
            connect_timeout=2,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            error_cb=record,
        )
    except (nats.errors.Error, OSError) as error:
        await nc.close()  # nats-py leaves the refused socket open otherwise
        return " ".join([*errors, str(error)])
    await nc.close()
    raise AssertionError("the embedded nats-server accepted a client without its credentials")


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        found += [int(child) for child in text.split()]
    return found


def nats_server_pid(server: LocalServer) -> int:
    assert server.process is not None
    for child in children(server.process.pid):
        if Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0].endswith(b"nats-server"):
            return child
    raise AssertionError("the server has no nats-server child")


def cmdlines_holding(secret: bytes) -> list[str]:
    """Every process of this user whose command line or environment holds ``secret``."""
    holding = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            for part in ("cmdline", "environ"):
                if secret in (entry / part).read_bytes():
                    holding.append(f"{entry.name}/{part}")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # exited meanwhile, or not ours to read
    return holding


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_credentials_are_on_no_command_line(solo: LocalServer) -> None:
    pid = nats_server_pid(solo)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[1:3] == [b"--config", str(solo.home / "jetstream" / CONFIG_FILE).encode()]
    assert cmdlines_holding(password(solo).encode()) == []


def test_a_client_without_credentials_is_refused(solo: LocalServer) -> None:
    url = nats_url(solo)
    assert urlsplit(url).hostname == "127.0.0.1"
    why = run(refused(without_credentials(url)))
    assert "Authorization" in why or "authorization" in why
    secret = password(solo)
    wrong = url.replace(secret, secret[::-1])
    run(refused(wrong))
    # and a "token" (a URL user without password) is no way in either
    run(refused(f"nats://{secret}@{urlsplit(url).netloc.split('@')[1]}"))


def test_the_right_credentials_reach_the_bounded_data_store(solo: LocalServer) -> None:
    async def look() -> int:
        nc = await nats.connect(nats_url(solo), connect_timeout=2, allow_reconnect=False)
        try:
            info = await nc.jetstream().stream_info(f"OBJ_{DATA_BUCKET}")
            return info.config.max_bytes or 0
        finally:
            await nc.close()

    assert run(look()) > 0


def test_credential_files_are_private(solo: LocalServer) -> None:
    store = solo.home / "jetstream"
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    for path in (store / CONFIG_FILE, solo.nats_url_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert password(solo) in (store / CONFIG_FILE).read_text("utf-8")


def test_credentials_are_not_in_the_server_log(solo: LocalServer) -> None:
    client = solo.client()
    handle = client.upload(np.arange(10.0))
    assert client.compute("map", "aggregate", data=handle).result(timeout=30)["count"] == 10
    # a refused client makes the server (and nats-server) log something
    run(refused(without_credentials(nats_url(solo))))
    log = (solo.home / "server.log").read_bytes()
    assert password(solo).encode() not in log


def test_a_worker_reads_its_credentials_from_a_file(solo: LocalServer) -> None:
    url = nats_url(solo)
    log = (solo.home / "worker.log").open("ab")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fdrtd_server",
            "worker",
            "--nats-url",
            f"file:{solo.nats_url_file}",
            "--home",
            str(solo.home),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()

    async def instances() -> int:
        nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
        try:
            inbox = nc.new_inbox()
            answers = await nc.subscribe(inbox)
            await nc.publish("$SRV.PING.fdrtd-data", b"", reply=inbox)
            count = 0
            with_deadline = time.monotonic() + 1.0
            while (left := with_deadline - time.monotonic()) > 0:
                try:
                    await answers.next_msg(timeout=left)
                    count += 1
                except nats.errors.TimeoutError:
                    break
            return count
        finally:
            await nc.close()

    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert worker.poll() is None, (solo.home / "worker.log").read_text("utf-8")
            # the server's own data microservice, and now the worker's
            if run(instances()) >= 2:
                break
            time.sleep(0.3)
        else:
            raise AssertionError(
                "the worker did not join the bus: " + (solo.home / "worker.log").read_text()
            )
        assert password(solo).encode() not in Path(f"/proc/{worker.pid}/cmdline").read_bytes()
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=5)
    assert password(solo).encode() not in (solo.home / "worker.log").read_bytes()


def test_every_start_draws_new_credentials(solo: LocalServer) -> None:
    old_url = nats_url(solo)
    solo.stop()
    assert not solo.nats_url_file.exists()  # the credentials died with the server
    solo.start()
    new_url = nats_url(solo)
    assert urlsplit(new_url).password != urlsplit(old_url).password
    # the old password does not open the new server (same home, new port or not)
    old_password = urlsplit(old_url).password
    assert old_password
    run(refused(new_url.replace(password(solo), old_password)))
    client = solo.client()
    assert client.upload(np.arange(3.0))


def test_a_standalone_embedded_nats_refuses_strangers(tmp_path: Path) -> None:
    with EmbeddedNats(tmp_path / "nats") as running:
        assert running.url != running.address and "***" not in repr(running)
        secret = urlsplit(running.url).password
        assert secret and secret not in repr(running)
        run(refused(running.address))
        stored = running.client_url_file.read_text("utf-8").strip()
        assert stored == running.url
    assert not running.client_url_file.exists()
