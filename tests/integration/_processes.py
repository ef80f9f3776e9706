"""Helpers for tests that start, kill and restart real server and worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conditions import wait_for

from fdrtd_server._embedded_nats import EmbeddedNats, free_port, write_private
from fdrtd_server.config import TokenStore, init_home
from fdrtd_server.local import LocalServer

__all__ = [
    "NO_DP",
    "cli",
    "make_server",
    "start_worker",
    "start_worker_with_new_home",
    "wait_for",
    "without_dp",
]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``fdrtd-server ARGS`` and return what it printed and its exit code."""
    return subprocess.run(
        [sys.executable, "-m", "fdrtd_server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


NO_DP = 'version = "tests"\n\n[defaults]\nanalyst_inputs = true\n\n[defaults.privacy]\ndp = false\n'
"""A policy file that turns differential privacy off for every dataset, and lets exact
results of a named dataset be computed beside an analyst's uploads: for tests of exact
statistics on named datasets (``LocalFederation(policy=NO_DP)``, :func:`without_dp`)."""


def without_dp(home: Path) -> None:
    """Write :data:`NO_DP` as the policy file of the server home ``home``."""
    (home / "policy.toml").write_text(NO_DP, "utf-8")


def make_server(root: Path, name: str = "solo") -> LocalServer:
    """A fresh server home under ``root`` with an analyst token (not started).

    It binds port 0: the system chooses a free port when it first starts, and
    the server reports it (``LocalServer.port``, ``url``), so no two tests can
    be handed one port.
    """
    home = root / name
    admin = init_home(home, name, port=0)
    return LocalServer(home, name, 0, TokenStore(home).add("analyst"), admin)


def start_worker(home: Path, url_file: Path, log: Path) -> subprocess.Popen[bytes]:
    """``fdrtd-server worker`` for ``home``, its NATS URL read from ``url_file``.

    Its stdout and stderr go to ``log``.
    """
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fdrtd_server",
                "worker",
                "--nats-url",
                f"file:{url_file}",
                "--home",
                str(home),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def start_worker_with_new_home(
    root: Path, nats: EmbeddedNats, name: str = "solo"
) -> tuple[subprocess.Popen[bytes], Path]:
    """A worker for a fresh server home under ``root``, on the standalone NATS ``nats``.

    Returns:
        The worker process and its log file.
    """
    home = root / name
    init_home(home, name, port=free_port())
    url_file = root / "nats.url"
    write_private(url_file, nats.url + "\n")
    log = root / "worker.log"
    return start_worker(home, url_file, log), log
