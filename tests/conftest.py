"""Shared fixtures: real servers, real NATS, real HTTP on 127.0.0.1.

Servers are started as real ``fdrtd-server serve`` processes through
:class:`fdrtd_server.local.LocalFederation`, each with its own embedded
``nats-server``. Session-scoped federations are shared between tests for
speed; tests that stop, kill or reconfigure servers build their own.

The pytest process makes itself a "child subreaper", so that a
``nats-server`` orphaned by a test that SIGKILLs its parent is re-parented
to pytest and reaped here instead of lingering as a zombie.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import subprocess
import sys
import tomllib
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from postgres import postgres_dsn  # noqa: F401  (a real PostgreSQL, for the whole suite)

from fdrtd_server._embedded_nats import EmbeddedNats
from fdrtd_server.local import LocalFederation, LocalServer

PLUGINS = (
    (Path(__file__).parent / "plugins" / "example", "fdrtd_example"),
    (Path(__file__).resolve().parents[1] / "examples" / "vector_mean", "vector_mean"),
)
"""The plugin packages every server of the tests has installed: (source, package)."""


def _make_subreaper() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


def reap_orphans() -> None:
    """Collect exited children we inherited (orphaned nats-servers)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


_make_subreaper()


@pytest.fixture(scope="session", autouse=True)
def _reaper() -> Iterator[None]:
    yield
    reap_orphans()


def _installed_is_current(source: Path, package: str) -> bool:
    """Whether the plugin at ``source`` is installed as it is there (or editable from there)."""
    project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    try:
        installed = importlib.metadata.distribution(project["name"])
    except importlib.metadata.PackageNotFoundError:
        return False
    if installed.version != project["version"]:
        return False
    origin = json.loads(installed.read_text("direct_url.json") or "{}")
    if origin.get("dir_info", {}).get("editable"):
        return Path(urllib.parse.urlparse(origin.get("url", "")).path) == source.resolve()
    files = {str(file): file for file in installed.files or ()}
    for module in (source / package).rglob("*.py"):
        listed = files.get(module.relative_to(source).as_posix())
        if (
            listed is None
            or Path(installed.locate_file(listed)).read_bytes() != module.read_bytes()
        ):
            return False
    return True


@pytest.fixture(scope="session")
def example_plugin() -> None:
    """Install the plugins the servers must find: tests/plugins/example and examples/vector_mean.

    Installed again whenever the installed copy differs from the source, so that a
    venv kept from an earlier checkout never tests an old plugin; an editable
    install of this checkout's copy is current by definition.
    """
    for source, package in PLUGINS:
        if not _installed_is_current(source, package):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-deps",
                    "--force-reinstall",
                    str(source),
                ],
                check=True,
            )


@pytest.fixture(scope="session")
def trio(
    tmp_path_factory: pytest.TempPathFactory, example_plugin: None
) -> Iterator[LocalFederation]:
    """Three parties (alpha, beta, gamma), shared by the whole session."""
    policy = {
        "FDRTD_ALLOW_SET_UNION": "true",
        "FDRTD_ALLOW_SET_INTERSECTION": "true",
        "FDRTD_ALLOW_MATRIX_PRODUCT": "true",
        "FDRTD_ALLOW_VERTICAL_REGRESSION": "true",
    }
    # exact statistics on named datasets in the shared servers: differential privacy off,
    # and named datasets may meet the analysts' uploads
    no_dp = (
        'version = "tests"\n\n[defaults]\nanalyst_inputs = true\n\n[defaults.privacy]\ndp = false\n'
    )
    with LocalFederation(tmp_path_factory.mktemp("trio"), env=policy, policy=no_dp) as federation:
        yield federation


@pytest.fixture(scope="session")
def server(trio: LocalFederation) -> LocalServer:
    """One running server (alpha of the shared trio) for single-server tests."""
    return trio.servers["alpha"]


@pytest.fixture
def api(server: LocalServer) -> Iterator[requests.Session]:
    """A raw HTTP session with the analyst token of ``server``; use ``server.url + path``."""
    with requests.Session() as session:
        session.headers["authorization"] = f"Bearer {server.token}"
        yield session


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A standalone nats-server with JetStream, for workers and external-NATS tests."""
    with EmbeddedNats(tmp_path / "nats") as running:
        yield running


def assert_healthy(server: LocalServer) -> None:
    """The server still answers and is ready."""
    assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
    assert requests.get(server.url + "/readyz", timeout=5).status_code == 200
