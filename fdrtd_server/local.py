"""Several real servers on this machine: for the demo, the tests and the benchmarks.

:class:`LocalFederation` creates a server home per party under one directory,
makes every server a member of every other's federation, gives each an
analyst token (named ``analyst``) and an owner token (named ``owner``),
starts each as its own ``fdrtd-server serve`` process (with
its own embedded ``nats-server``, its own ports and its own JetStream
directory) on 127.0.0.1, and stops them all on exit.

Each embedded ``nats-server`` requires the credentials its server drew at
start; they are in :attr:`LocalServer.nats_url_file` (mode 0600) while it
runs, for a worker started with ``--nats-url file:PATH``, and never on a
command line.

With ``tls=`` (a :class:`LocalTls`) the servers serve HTTPS themselves on
``https://127.0.0.1:PORT``, verify each other against the given CA, and may
require client certificates; the clients this module makes (and its
readiness checks) verify against that CA and present the client certificate.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from fdrtd_client import Client, Federation
from fdrtd_server._embedded_nats import CLIENT_URL_FILE, free_port
from fdrtd_server.config import PORT_FILE, TokenStore, init_home
from fdrtd_server.identity import Identity, add_member
from fdrtd_server.policy import POLICY_FILE

__all__ = ["LocalFederation", "LocalServer", "LocalTls"]


@dataclass(frozen=True)
class LocalTls:
    """TLS for local servers: PEM files on this machine (see :mod:`fdrtd_server.tls`).

    The servers' certificate must name ``127.0.0.1`` (an IP subject alternative
    name) and, since each gateway presents it to its peers, allow client
    authentication too (or name no extended key usage).
    """

    ca: Path
    """The federation's CA bundle (``tls_ca``); clients verify the servers against it."""
    cert: Path
    """The servers' certificate chain (``--tls-cert``)."""
    key: Path
    """Its private key (``--tls-key``)."""
    client_cert: Path | None = None
    """The certificate the clients made here (and the readiness checks) present."""
    client_key: Path | None = None
    """Its private key (None: in the certificate's file)."""
    require_client_cert: bool = False
    """Whether the servers take only clients with a certificate (``tls_require_client_cert``)."""

    def requests_options(self) -> dict[str, Any]:
        """``verify`` and ``cert`` for ``requests`` (and :class:`fdrtd_client.Client`)."""
        if self.client_cert is None:
            return {"verify": str(self.ca), "cert": None}
        if self.client_key is None:
            return {"verify": str(self.ca), "cert": str(self.client_cert)}
        return {"verify": str(self.ca), "cert": (str(self.client_cert), str(self.client_key))}


class LocalServer:
    """One server process of a :class:`LocalFederation`.

    Args:
        tls: Serve HTTPS with these files (None: plain HTTP).
    """

    def __init__(
        self,
        home: Path,
        name: str,
        port: int,
        token: str,
        admin_token: str,
        *,
        tls: LocalTls | None = None,
    ) -> None:
        self.home, self.name, self.port = home, name, port
        self.token, self.admin_token = token, admin_token
        self.owner_token = ""
        """A token of the role ``owner`` (named ``owner``), if the federation made one."""
        self.process: subprocess.Popen[bytes] | None = None
        self.extra_args: list[str] = []
        self.tls = tls
        """The TLS files of the next start (None: plain HTTP); the URL's scheme follows it."""

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def requests_options(self) -> dict[str, Any]:
        """``verify`` and ``cert`` for ``requests`` to reach this server (empty without TLS)."""
        return self.tls.requests_options() if self.tls is not None else {}

    def _tls_args(self) -> tuple[list[str], dict[str, str]]:
        """The command-line options and environment that make ``serve`` speak TLS."""
        if self.tls is None:
            return [], {}
        args = ["--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key)]
        env = {
            "FDRTD_TLS_CA": str(self.tls.ca),
            "FDRTD_TLS_REQUIRE_CLIENT_CERT": str(self.tls.require_client_cert).lower(),
        }
        return args, env

    @property
    def nats_url_file(self) -> Path:
        """The file with the URL and credentials of this server's embedded NATS.

        It exists while the server runs (it is written anew, with new
        credentials, on every start); pass ``--nats-url file:<this path>``
        to a worker.
        """
        return self.home / "jetstream" / CLIENT_URL_FILE

    def write_policy(self, text: str) -> None:
        """Write ``text`` as the owner's ``policy.toml`` (replaced at once, never half-written).

        A running server follows it from its next request on.
        """
        path = self.home / POLICY_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(text, "utf-8")
        temporary.replace(path)

    def publish(
        self, data: Any, name: str, description: str = "", *, grantee: str | None = "analyst"
    ) -> None:
        """The owner uploads ``data``, publishes it as ``name`` and grants ``grantee`` its use."""
        with Client(self.url, self.owner_token, **self.requests_options()) as owner:
            owner.publish(owner.upload(data), name, description)
            if grantee is not None:
                owner.grant(name, grantee)

    def client(self, timeout: float = 30.0) -> Client:
        """A client with this server's analyst token (verifying and presenting as ``tls`` says)."""
        return Client(self.url, self.token, timeout=timeout, **self.requests_options())

    def start(self, *, ready_timeout: float = 30.0, env: dict[str, str] | None = None) -> None:
        """Start ``fdrtd-server serve`` and wait for ``/readyz``.

        A server made with port 0 binds a port the system chooses and reports it
        in ``DIR/port``; it is read here, and later starts ask for the same port
        again (clients made before a restart still reach it).
        """
        log = (self.home / "server.log").open("ab")
        port_file = self.home / PORT_FILE
        port_file.unlink(missing_ok=True)
        port_args = ["--port", str(self.port)] if self.port else []
        tls_args, tls_env = self._tls_args()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fdrtd_server",
                "serve",
                str(self.home),
                *port_args,
                *tls_args,
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **tls_env, **(env or {})},
        )
        options = self.requests_options()
        log.close()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server '{self.name}' exited; see {self.home / 'server.log'}")
            if not self.port:
                text = port_file.read_text("ascii").strip() if port_file.exists() else ""
                if not text.isdigit():
                    time.sleep(0.05)
                    continue
                self.port = int(text)
            try:
                if requests.get(self.url + "/readyz", timeout=1, **options).status_code == 200:
                    # make sure it is our process that answers on this port
                    identity = requests.get(self.url + "/v1/identity", timeout=1, **options)
                    name = identity.json().get("name")
                    if name == self.name and self.process.poll() is None:
                        return
                    self.stop()
                    raise RuntimeError(
                        f"another server answers on port {self.port} instead of '{self.name}'"
                    )
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"server '{self.name}' did not become ready; see {self.home / 'server.log'}"
        )

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL with ``kill``)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


class LocalFederation:
    """N servers on 127.0.0.1 that are members of each other's federation.

    Args:
        root: Directory for the server homes (one subdirectory per party).
        names: The parties' server names.
        env: Extra environment for every server process (``FDRTD_*`` settings).
        directories: The servers that keep the federation directory; every
            server registers with each of them (``directory``, ``directories``).
        directory_interval: Seconds between heartbeats (``directory_interval``),
            if ``directories`` are given; None keeps the setting's default.
        policy: The text of the owner's ``policy.toml`` (:mod:`fdrtd_server.policy`)
            written into every server home before the start, or a map of server
            name to text for some of them (:meth:`LocalServer.write_policy`);
            None: the built-in defaults.
        tls: Every server serves HTTPS with these files, and the federation
            files name ``https://`` URLs (None: plain HTTP).
    """

    def __init__(
        self,
        root: Path,
        names: Sequence[str] = ("alpha", "beta", "gamma"),
        env: dict[str, str] | None = None,
        *,
        directories: Sequence[str] = (),
        directory_interval: float | None = None,
        policy: str | Mapping[str, str] | None = None,
        tls: LocalTls | None = None,
    ) -> None:
        self.root = root
        self.env = dict(env or {})
        self.directories = tuple(directories)
        if self.directories:
            self.env["FDRTD_DIRECTORIES"] = ",".join(self.directories)
            if directory_interval is not None:
                self.env["FDRTD_DIRECTORY_INTERVAL"] = f"{directory_interval:g}"
        self.servers: dict[str, LocalServer] = {}
        for name in names:
            home = root / name
            port = free_port()
            admin = init_home(home, name, port=port)
            token = TokenStore(home).add("analyst")
            self.servers[name] = LocalServer(home, name, port, token, admin, tls=tls)
            self.servers[name].owner_token = TokenStore(home).add("owner", "owner")
            text = policy.get(name) if isinstance(policy, Mapping) else policy
            if text is not None:
                self.servers[name].write_policy(text)
        for server in self.servers.values():
            identity = Identity.load(server.home / "identity", server.name)
            for other in self.servers.values():
                if other is not server:
                    add_member(other.home / "federation.toml", identity.public_entry(server.url))

    def start(self) -> LocalFederation:
        """Start every server (in parallel) and wait until all are ready."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(self.servers)) as pool:
            list(
                pool.map(
                    lambda server: server.start(env=self.env_of(server.name)), self.servers.values()
                )
            )
        return self

    def env_of(self, name: str) -> dict[str, str]:
        """The extra environment of the server ``name`` (a directory is told it is one)."""
        if name in self.directories:
            return {**self.env, "FDRTD_DIRECTORY": "true"}
        return self.env

    def stop(self) -> None:
        """Stop every server."""
        for server in self.servers.values():
            server.stop()

    def __enter__(self) -> LocalFederation:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def federation(self, timeout: float = 30.0) -> Federation:
        """A client :class:`Federation` holding the analyst token of every server."""
        return Federation({name: s.client(timeout) for name, s in self.servers.items()})
