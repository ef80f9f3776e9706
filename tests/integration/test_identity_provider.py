"""JWTs of an institution's identity provider, tried as an attacker would, on a real server.

One server is started with an ``[identity]`` table whose key set is a JWKS
file made here. A valid JWT reaches a data route; every forged, expired,
premature, misaddressed or role-less one is refused with a problem document
that names why, without echoing the token, and the refusal is audited.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import requests
from _processes import make_server
from jwts import ISSUER, Provider, identity_table

from fdrtd_server.config import TokenStore
from fdrtd_server.local import LocalServer

IDP = Provider()


@pytest.fixture(scope="module")
def idp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    root = tmp_path_factory.mktemp("identity")
    server = make_server(root, "idp")
    IDP.write_jwks(server.home / "idp-keys.json")
    with (server.home / "fdrtd.toml").open("a", encoding="utf-8") as config:
        config.write(identity_table('jwks_file = "idp-keys.json"'))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def call(server: LocalServer, token: str, path: str = "/v1/data") -> requests.Response:
    return requests.get(server.url + path, headers={"authorization": f"Bearer {token}"}, timeout=30)


def refused(answer: requests.Response, status: int, *words: str) -> str:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    detail: str = answer.json()["detail"]
    for word in words:
        assert word in detail, detail
    return detail


def audit_reasons(server: LocalServer) -> list[str]:
    lines = (server.home / "audit.log").read_text("utf-8").splitlines()
    return [
        record.get("reason", "")
        for record in map(json.loads, lines)
        if record["action"] == "authenticate"
    ]


def test_a_valid_jwt_reaches_a_data_route_as_prefixed_name(idp_server: LocalServer) -> None:
    answer = call(idp_server, IDP.token())
    assert answer.status_code == 200, answer.text
    # the provider's user is known by the prefixed name, so grants can name them
    assert TokenStore(idp_server.home).role_of("lab-ann") == "analyst"
    listed = {e["name"]: e for e in TokenStore(idp_server.home).listing()}
    assert listed["lab-ann"]["kind"] == "oidc"


@pytest.mark.parametrize(
    ("claims", "words"),
    [
        ({"exp": int(time.time()) - 3600}, ("expired",)),
        ({"nbf": int(time.time()) + 3600}, ("not yet valid",)),
        ({"iss": "https://evil.example.org"}, ("issued by", ISSUER)),
        ({"aud": "another-service"}, ("not meant for this server", "'fdrtd'")),
        ({"exp": None}, ("lacks the claim 'exp'",)),
        ({"iat": None}, ("lacks the claim 'iat'",)),
        ({"sub": None}, ("lacks the claim 'sub'",)),
    ],
    ids=["expired", "nbf-future", "wrong-issuer", "wrong-audience", "no-exp", "no-iat", "no-sub"],
)
def test_bad_claims_are_refused_with_the_reason(
    idp_server: LocalServer, claims: dict[str, object], words: tuple[str, ...]
) -> None:
    token = IDP.token(IDP.claims(**claims))
    detail = refused(call(idp_server, token), 401, *words)
    assert token not in detail and token.split(".")[2] not in detail


def test_a_token_of_another_key_under_the_providers_key_id_is_refused(
    idp_server: LocalServer,
) -> None:
    forger = Provider(kid=IDP.kid)  # same kid, the attacker's own key
    refused(call(idp_server, forger.token()), 401, "signature does not match")
    assert "bad signature" in audit_reasons(idp_server)


def test_unknown_key_id_is_refused(idp_server: LocalServer) -> None:
    refused(call(idp_server, Provider(kid="other").token()), 401, "signing key ('kid')")
    assert "unknown key id" in audit_reasons(idp_server)


def test_alg_none_and_key_confusion_are_refused(idp_server: LocalServer) -> None:
    refused(call(idp_server, IDP.unsigned()), 401, "'none'", "RS256")
    refused(call(idp_server, IDP.hs256_with_public_key()), 401, "'HS256'", "RS256")
    assert audit_reasons(idp_server).count("algorithm not accepted") >= 2


@pytest.mark.parametrize(
    "header",
    [{"alg": ["RS256"], "kid": "key-1"}, {"alg": {"RS256": 1}, "kid": "key-1"}],
    ids=["alg-list", "alg-object"],
)
def test_a_header_whose_alg_is_not_a_string_is_refused_and_audited(
    idp_server: LocalServer, header: dict[str, object]
) -> None:
    before = audit_reasons(idp_server).count("malformed")
    refused(call(idp_server, IDP.with_header(header)), 401, "not a well-formed JWT", "'alg'")
    assert audit_reasons(idp_server).count("malformed") == before + 1


def test_a_token_without_a_mapped_role_is_forbidden(idp_server: LocalServer) -> None:
    refused(call(idp_server, IDP.token(IDP.claims(groups=None))), 403, "no role was granted")
    unmapped = IDP.claims(groups=["cafeteria"], roles=["visitor"])
    refused(call(idp_server, IDP.token(unmapped)), 403, "no role was granted")
    both = IDP.claims(groups=["researchers", "fdrtd-admins"])
    refused(call(idp_server, IDP.token(both)), 403, "several roles", "admin, analyst")


def test_roles_come_from_the_mapping(idp_server: LocalServer) -> None:
    analyst = IDP.token()
    refused(call(idp_server, analyst, "/v1/sources"), 403, "for admins", "'analyst'")
    admin = IDP.token(IDP.claims(sub="boss", groups=None, roles=["fdrtd-admins"]))
    assert call(idp_server, admin, "/v1/sources").status_code == 200
    refused(call(idp_server, admin), 403, "'admin'")  # admins do not compute


def test_a_subject_that_makes_no_valid_name_is_refused(idp_server: LocalServer) -> None:
    token = IDP.token(IDP.claims(sub="Ann@Example.org"))
    detail = refused(call(idp_server, token), 403, "valid fdrtd name", "'lab-'")
    assert "Ann@Example.org" not in detail


def test_a_jwt_name_never_takes_over_a_local_token_name(idp_server: LocalServer) -> None:
    # made through the store, as a server without [identity] could have made it
    TokenStore(idp_server.home).add("lab-mallory")
    refused(call(idp_server, IDP.token(IDP.claims(sub="mallory"))), 403, "local token")
    assert "jwt name local" in audit_reasons(idp_server)


def test_revoking_a_provider_name_shuts_it_out_at_the_next_request(
    idp_server: LocalServer,
) -> None:
    token = IDP.token(IDP.claims(sub="leaver"))
    assert call(idp_server, token).status_code == 200
    TokenStore(idp_server.home).revoke("lab-leaver")
    refused(call(idp_server, token), 401, "revoked")


def test_refusals_are_audited_without_the_token(idp_server: LocalServer) -> None:
    token = IDP.token(IDP.claims(exp=int(time.time()) - 3600))
    call(idp_server, token)
    text = (idp_server.home / "audit.log").read_text("utf-8")
    assert "expired" in audit_reasons(idp_server)
    assert token.split(".")[2] not in text and token.split(".")[1] not in text
