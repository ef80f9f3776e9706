"""The federation directory, against three real servers: alpha keeps it, all heartbeat.

Heartbeats travel through the signed peer channel (``POST /v1/peer``), so the
directory lists only members it verified: forged, replayed and non-member
registrations are refused, audited and never listed. A member that stops
drops out after three heartbeat intervals, and is listed again when it comes
back. Every wait is on a condition, bounded by a generous deadline that
measures nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import requests
from _processes import wait_for

from fdrtd_client import Client, Federation
from fdrtd_client.errors import FdrtdClientError, Unauthorized
from fdrtd_server._embedded_nats import free_port
from fdrtd_server.audit import verify
from fdrtd_server.directory import SESSION, TAG, heartbeat_envelope
from fdrtd_server.envelope import seal
from fdrtd_server.identity import Identity
from fdrtd_server.local import LocalFederation, LocalServer

INTERVAL = 0.5
MSGPACK = "application/msgpack"


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """alpha, beta, gamma; alpha keeps the directory, everyone heartbeats every 0.5 s."""
    root = tmp_path_factory.mktemp("directory")
    with LocalFederation(root, directories=("alpha",), directory_interval=INTERVAL) as running:
        yield running


def listing(server: LocalServer, token: str | None = None) -> dict[str, Any]:
    """``GET /v1/directory`` on ``server`` with its analyst token (or ``token``)."""
    response = requests.get(
        server.url + "/v1/directory",
        headers={"authorization": f"Bearer {token or server.token}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def listed(server: LocalServer) -> set[str]:
    return {member["name"] for member in listing(server)["members"]}


def keys_of(server: LocalServer) -> Identity:
    """The real identity (private keys) of ``server``."""
    return Identity.load(server.home / "identity", server.name)


def heartbeat(
    sender: Identity | LocalServer, to: LocalServer, payload: bytes | None = None
) -> bytes:
    """A heartbeat for ``to``, sealed with ``sender``'s real keys (a server) or the given ones.

    ``payload`` replaces the heartbeat's own.
    """
    keys = sender if isinstance(sender, Identity) else keys_of(sender)
    directory = keys_of(to).public_entry(to.url)  # what every member's federation file holds
    if payload is not None:
        return seal(keys, directory, session=SESSION, seq=time.time_ns(), tag=TAG, payload=payload)
    url = sender.url if isinstance(sender, LocalServer) else "http://127.0.0.1:9"
    return heartbeat_envelope(keys, directory, url=url, seq=time.time_ns(), interval=INTERVAL)


def deliver(to: LocalServer, body: bytes) -> requests.Response:
    """POST a sealed message to ``to``'s peer gateway."""
    return requests.post(
        to.url + "/v1/peer", data=body, headers={"content-type": MSGPACK}, timeout=10
    )


def assert_problem(response: requests.Response, status: int, *words: str) -> None:
    """An RFC 9457 problem document with ``status`` whose detail has every word."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == status
    for word in words:
        assert word in problem["detail"], problem["detail"]


def audit_records(server: LocalServer) -> list[dict[str, Any]]:
    path = server.home / "audit.log"
    verify(path)
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def rejected(server: LocalServer, principal: str) -> list[str]:
    """The audited rejections of peer messages claiming to come from ``principal``."""
    return [
        record["outcome"]
        for record in audit_records(server)
        if record["action"] == "peer-message" and record["principal"] == principal
    ]


def test_every_member_is_listed_after_its_first_heartbeat(federation: LocalFederation) -> None:
    alpha = federation.servers["alpha"]
    wait_for(lambda: listed(alpha) == {"alpha", "beta", "gamma"}, "all three members listed")
    answer = listing(alpha)
    assert answer["directory"] == "alpha"
    by_name = {member["name"]: member for member in answer["members"]}
    for name, server in federation.servers.items():
        member = by_name[name]
        assert set(member) == {"name", "url", "last_seen", "datasets"}
        assert member["url"] == server.url
        assert member["datasets"] is None  # how many datasets a server has is not told
        assert member["last_seen"].endswith("+00:00")
    # any authenticated token may ask: the admin's too
    assert {m["name"] for m in listing(alpha, alpha.admin_token)["members"]} >= {"alpha"}
    # the clients
    assert {m["name"] for m in alpha.client().directory()} == {"alpha", "beta", "gamma"}
    with federation.federation() as joint:
        assert {m["name"] for m in joint.directory()} == {"alpha", "beta", "gamma"}
    # joining is audited once per member, not on every heartbeat
    joins = [r["principal"] for r in audit_records(alpha) if r["action"] == "directory-register"]
    assert sorted(set(joins)) == ["alpha", "beta", "gamma"]
    assert len(joins) < 3 * 3  # several heartbeats each by now, far fewer records


def test_a_server_that_keeps_no_directory_answers_404(federation: LocalFederation) -> None:
    beta, gamma, alpha = (federation.servers[name] for name in ("beta", "gamma", "alpha"))
    response = requests.get(
        beta.url + "/v1/directory", headers={"authorization": f"Bearer {beta.token}"}, timeout=10
    )
    assert_problem(response, 404, "'beta' is not a directory")
    # a federation asks the first of its servers that keeps a directory
    with Federation({"beta": beta.client(), "alpha": alpha.client()}) as joint:
        assert "alpha" in {m["name"] for m in joint.directory()}
    # nor does a server that cannot be reached stop it (several directories, one down)
    down = Client(f"http://127.0.0.1:{free_port()}", "any", timeout=5)
    with Federation({"down": down, "alpha": alpha.client()}) as joint:
        assert "alpha" in {m["name"] for m in joint.directory()}
    with (
        Federation({"beta": beta.client(), "gamma": gamma.client()}) as joint,
        pytest.raises(FdrtdClientError, match="keeps a federation directory"),
    ):
        joint.directory()


def test_the_directory_needs_a_token(federation: LocalFederation) -> None:
    alpha = federation.servers["alpha"]
    response = requests.get(alpha.url + "/v1/directory", timeout=10)
    assert_problem(response, 401, "Bearer")
    response = requests.get(
        alpha.url + "/v1/directory", headers={"authorization": "Bearer nope"}, timeout=10
    )
    assert_problem(response, 401, "not valid")
    with pytest.raises(Unauthorized):
        Client(alpha.url, "nope").directory()


def test_a_heartbeat_to_a_server_that_keeps_no_directory_is_refused(
    federation: LocalFederation,
) -> None:
    beta, gamma = federation.servers["beta"], federation.servers["gamma"]
    assert_problem(deliver(beta, heartbeat(gamma, beta)), 404, "not a directory")
    assert "rejected not_a_directory" in rejected(beta, "gamma")


def test_a_heartbeat_that_names_another_member_is_refused(federation: LocalFederation) -> None:
    alpha, gamma = federation.servers["alpha"], federation.servers["gamma"]
    payload = msgpack.packb(
        {"name": "beta", "url": "http://127.0.0.1:9/", "datasets": 3, "interval": INTERVAL}
    )
    assert_problem(
        deliver(alpha, heartbeat(gamma, alpha, payload)), 400, "name the member that signed it"
    )
    assert "rejected malformed_heartbeat" in rejected(alpha, "gamma")
    beta = {m["name"]: m for m in listing(alpha)["members"]}.get("beta")
    assert beta is None or beta["url"] == federation.servers["beta"].url


def test_forged_replayed_and_outsider_registrations_are_refused_and_a_silent_member_drops_out(
    federation: LocalFederation,
) -> None:
    """Runs last in this module: it stops gamma (and starts it again at the end)."""
    alpha, gamma = federation.servers["alpha"], federation.servers["gamma"]
    wait_for(lambda: "gamma" in listed(alpha), "gamma listed")
    # a genuine heartbeat of gamma, sealed here with gamma's key: accepted once
    genuine = heartbeat(gamma, alpha)
    assert deliver(alpha, genuine).status_code == 202
    assert_problem(deliver(alpha, genuine), 409, "replay")

    gamma.stop()
    wait_for(lambda: "gamma" not in listed(alpha), "gamma to drop out of the listing")
    assert listed(alpha) >= {"alpha", "beta"}

    # a replay of its genuine heartbeat does not bring it back
    assert_problem(deliver(alpha, genuine), 409, "replay")
    # nor a heartbeat in its name signed with another key (a forgery)
    forged = heartbeat(Identity.generate("gamma"), alpha)
    assert_problem(deliver(alpha, forged), 403, "signature")
    # nor one from a server that is not a member
    foreign = heartbeat(Identity.generate("mallory"), alpha)
    assert_problem(deliver(alpha, foreign), 403, "not a member")
    members = listed(alpha)
    assert "gamma" not in members and "mallory" not in members
    outcomes = rejected(alpha, "gamma") + rejected(alpha, "peer")
    assert outcomes.count("rejected replay") >= 2
    assert "rejected bad_signature" in outcomes
    assert "rejected not_a_member" in outcomes

    # back again, with new heartbeats that are no replays of its earlier run
    gamma.start(env=federation.env_of("gamma"))
    wait_for(lambda: "gamma" in listed(alpha), "gamma listed again after its restart")
    joins = [
        r
        for r in audit_records(alpha)
        if r["action"] == "directory-register" and r["target"] == "gamma"
    ]
    assert len(joins) >= 2
