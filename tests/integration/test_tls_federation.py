"""Servers that serve HTTPS themselves, against a private federation CA made here.

Three real servers serve TLS with certificates of the federation's CA (SAN
IP 127.0.0.1 and DNS localhost) and compute a secure sum between them; the
analyst's client verifies them against that CA, and the directory's
heartbeats travel between them over TLS too. Plain HTTP to such a server
fails and the server keeps serving; a client that does not trust the CA is
refused. A member whose certificate is of another CA is refused by every
other gateway: the computation fails on every party, saying why, within the
session timeout. With mutual TLS, a client without a certificate of the CA
is refused in the handshake, and one with it computes as before. Everything
is on 127.0.0.1.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from certificates import make_ca
from conditions import wait_for

from fdrtd_client import Client, Federation
from fdrtd_client.errors import ConnectError, ServerError
from fdrtd_server.identity import Identity, add_member, load_federation
from fdrtd_server.local import LocalFederation, LocalServer, LocalTls

SESSION_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The federation's CA with a server and an analyst certificate; another CA with one."""
    root = tmp_path_factory.mktemp("pki")
    ca = make_ca(root / "ca")
    other = make_ca(root / "other", "someone else's CA")
    return {
        "ca": ca,
        "server": ca.issue(root / "ca", "server"),
        "analyst": ca.issue(root / "ca", "analyst", server=False, ips=(), dns=()),
        "other": other,
        "rogue": other.issue(root / "other", "rogue"),
        "rogue_analyst": other.issue(root / "other", "rogue-analyst", server=False),
    }


def tls_of(pki: dict[str, Any], **knobs: Any) -> LocalTls:
    return LocalTls(ca=pki["ca"].cert, cert=pki["server"].cert, key=pki["server"].key, **knobs)


def secure_sum(federation: Federation, timeout: float = 60) -> list[Any]:
    handles = federation.upload({name: np.arange(1.0, 5.0) for name in federation.parties})
    job = federation.compute("smpc", "secure_sum", {n: {"data": h} for n, h in handles.items()})
    return job.results(timeout=timeout, progress=False)


def failing_sum(federation: LocalFederation) -> tuple[Federation, dict[str, str]]:
    """A secure sum that fails on every party: the analyst's federation, each party's detail."""
    fed = federation.federation(timeout=20)
    handles = fed.upload({name: np.arange(1.0, 5.0) for name in fed.parties})
    job = fed.compute("smpc", "secure_sum", {n: {"data": h} for n, h in handles.items()})
    details = {}
    for name, one in zip(fed.parties, job.jobs, strict=True):
        with pytest.raises(ServerError) as failed:
            one.result(timeout=60, progress=False)
        details[name] = failed.value.detail
    return fed, details


def healthy(server: LocalServer) -> bool:
    """The server answers ``/readyz`` over TLS, verified against the CA."""
    options = server.requests_options()
    return requests.get(server.url + "/readyz", timeout=5, **options).status_code == 200


@pytest.fixture(scope="module")
def secure(
    tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Any]
) -> Iterator[LocalFederation]:
    """alpha, beta, gamma on HTTPS; alpha keeps the directory."""
    root = tmp_path_factory.mktemp("tls")
    with LocalFederation(
        root, tls=tls_of(pki), directories=("alpha",), directory_interval=0.5
    ) as federation:
        yield federation


def test_three_parties_compute_over_tls(secure: LocalFederation) -> None:
    for name, server in secure.servers.items():
        assert server.url.startswith("https://127.0.0.1:")
        members = load_federation(server.home / "federation.toml")
        assert all(member.url.startswith("https://") for member in members.values()), name
    with secure.federation(timeout=20) as federation:
        assert secure_sum(federation) == [{"sum": 30.0, "count": 12}] * 3


def test_directory_heartbeats_travel_over_tls(secure: LocalFederation) -> None:
    client = secure.servers["alpha"].client(timeout=20)

    def everyone_listed() -> bool:
        return sorted(member["name"] for member in client.directory()) == [
            "alpha",
            "beta",
            "gamma",
        ]

    wait_for(everyone_listed, "every member to heartbeat to alpha's directory")
    assert all(member["url"].startswith("https://") for member in client.directory())


def test_plain_http_to_a_tls_server_fails_and_it_keeps_serving(secure: LocalFederation) -> None:
    server = secure.servers["beta"]
    plain = f"http://127.0.0.1:{server.port}"
    with pytest.raises(requests.ConnectionError):
        requests.get(plain + "/readyz", timeout=10)
    with pytest.raises(ConnectError):
        Client(plain, server.token, timeout=10).identity()
    # a raw plain-text request: the server drops it without an HTTP answer
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not raw.recv(1024).startswith(b"HTTP/")
    assert healthy(server)
    with secure.federation(timeout=20) as federation:
        assert secure_sum(federation) == [{"sum": 30.0, "count": 12}] * 3


def test_a_client_that_does_not_trust_the_federation_ca_is_refused(
    secure: LocalFederation, pki: dict[str, Any]
) -> None:
    server = secure.servers["alpha"]
    with pytest.raises(ConnectError, match=r"TLS handshake .* verify="):
        Client(server.url, server.token, timeout=10).identity()  # the system's store
    stranger = Client(server.url, server.token, timeout=10, verify=str(pki["other"].cert))
    with pytest.raises(ConnectError, match="TLS handshake"):
        stranger.identity()
    assert Client(server.url, server.token, verify=str(pki["ca"].cert)).identity()["name"] == (
        "alpha"
    )


def test_a_peer_with_a_certificate_of_another_ca_is_refused(
    tmp_path: Path, pki: dict[str, Any]
) -> None:
    federation = LocalFederation(
        tmp_path, tls=tls_of(pki), env={"FDRTD_SESSION_TIMEOUT": f"{SESSION_TIMEOUT:g}"}
    )
    # gamma is a member (its keys are in everyone's federation file), but its TLS
    # certificate is of another CA, which it trusts alone
    rogue = federation.servers["gamma"]
    rogue.tls = LocalTls(ca=pki["other"].cert, cert=pki["rogue"].cert, key=pki["rogue"].key)
    with federation:
        fed, details = failing_sum(federation)
        # every party says why: a certificate was refused (its own send, or the abort
        # of a party whose send failed)
        for name, detail in details.items():
            assert "certificate was not accepted" in detail, (name, detail)
            assert "'tls_ca'" in detail, (name, detail)
        assert "cannot reach party 'gamma'" in details["alpha"] + details["beta"], details
        # nobody is hurt: the honest members still compute between themselves
        for server in federation.servers.values():
            assert healthy(server)
        both = Federation({name: fed.clients[name] for name in ("alpha", "beta")})
        assert secure_sum(both) == [{"sum": 20.0, "count": 8}] * 2
        fed.close()


def test_a_member_with_a_plain_http_url_is_refused_not_sent_in_the_clear(
    tmp_path: Path, pki: dict[str, Any]
) -> None:
    federation = LocalFederation(
        tmp_path, tls=tls_of(pki), env={"FDRTD_SESSION_TIMEOUT": f"{SESSION_TIMEOUT:g}"}
    )
    # gamma serves plain HTTP and is listed under its http:// URL by alpha and beta,
    # which have TLS settings: nothing of theirs may travel to it in the clear
    plain = federation.servers["gamma"]
    plain.tls = None
    entry = Identity.load(plain.home / "identity", "gamma").public_entry(plain.url)
    for name in ("alpha", "beta"):
        add_member(federation.servers[name].home / "federation.toml", entry)
    with federation:
        for name in ("alpha", "beta"):
            told = (federation.servers[name].home / "server.log").read_text("utf-8")
            warned = [line for line in told.splitlines() if "plain http:// URL" in line]
            assert len(warned) == 1 and "WARNING" in warned[0] and "'gamma'" in warned[0], told
        fed, details = failing_sum(federation)
        # every party fails saying why, naming the setting; the TLS members name gamma's URL
        for name, detail in details.items():
            assert "'tls_ca'" in detail, (name, detail)
        told = details["alpha"] + details["beta"]
        assert f"cannot reach party 'gamma': its URL {plain.url} is plain http://" in told, details
        fed.close()


@pytest.fixture(scope="module")
def mutual(
    tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Any]
) -> Iterator[LocalFederation]:
    """Three servers that take only clients with a certificate of the federation's CA."""
    tls = tls_of(
        pki,
        client_cert=pki["analyst"].cert,
        client_key=pki["analyst"].key,
        require_client_cert=True,
    )
    with LocalFederation(tmp_path_factory.mktemp("mtls"), tls=tls) as federation:
        yield federation


def _handshake(
    server: LocalServer, pki: dict[str, Any], client: Any = None, *, tls_1_2: bool = False
) -> bytes:
    """A raw TLS handshake and request to ``server``; the first bytes of its answer."""
    context = ssl.create_default_context(cafile=str(pki["ca"].cert))
    if tls_1_2:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as wrapped,
    ):
        wrapped.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        try:
            return wrapped.recv(1024)
        except ConnectionResetError:
            return b""


@pytest.mark.parametrize("presents", ["nothing", "rogue_analyst"])
def test_mutual_tls_refuses_a_client_without_a_certificate_of_the_ca(
    mutual: LocalFederation, pki: dict[str, Any], presents: str
) -> None:
    server = mutual.servers["alpha"]
    client = pki.get(presents)
    # TLS 1.2: the server's verdict on the client's certificate is part of the handshake
    with pytest.raises(OSError):  # ssl.SSLError, or the connection reset
        _handshake(server, pki, client, tls_1_2=True)
    # TLS 1.3: the client's side of the handshake ends first; the server then closes
    # without reading the request, let alone answering it
    try:
        answer = _handshake(server, pki, client)
    except OSError:
        answer = b""
    assert answer == b""
    assert _handshake(server, pki, pki["analyst"], tls_1_2=True).startswith(b"HTTP/1.1 200")
    assert _handshake(server, pki, pki["analyst"]).startswith(b"HTTP/1.1 200")
    # the thin client says what to do
    with pytest.raises(ConnectError, match="cert="):
        Client(server.url, server.token, timeout=10, verify=str(pki["ca"].cert)).identity()
    assert healthy(server)


def test_mutual_tls_with_a_client_certificate_computes(mutual: LocalFederation) -> None:
    # the analyst presents her certificate; each gateway presents its server's
    with mutual.federation(timeout=20) as federation:
        assert secure_sum(federation) == [{"sum": 30.0, "count": 12}] * 3
