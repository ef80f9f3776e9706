"""The ``[identity]`` settings refuse what would weaken them; keys come from a file or a URL.

The key URL is served by a small HTTP server on 127.0.0.1 made here.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from jwts import AUDIENCE, ISSUER, Provider, identity_table

from fdrtd_server import oidc
from fdrtd_server.config import init_home, load_settings
from fdrtd_server.oidc import IdentityProvider, IdentitySettings, Refused


def settings_with(tmp_path: Path, table: str) -> Path:
    home = tmp_path / "h"
    init_home(home, "h")
    with (home / "fdrtd.toml").open("a", encoding="utf-8") as config:
        config.write(table)
    return home


def test_a_good_table_parses_with_defaults(tmp_path: Path) -> None:
    home = settings_with(tmp_path, identity_table('jwks_file = "keys.json"'))
    identity = load_settings(home, environ={}).identity
    assert identity is not None
    assert identity.jwks_file == home / "keys.json"
    assert identity.algorithms == ("RS256", "ES256", "EdDSA")
    assert identity.leeway == 30 and identity.name_claim == "sub"
    assert identity.roles["analyst"] == ("researchers",)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('algorithms = ["HS256"]', ("'HS256' is refused",)),
        ('algorithms = ["RS256", "HS512"]', ("'HS512' is refused",)),
        ('algorithms = ["none"]', ("'none' is refused",)),
        ("leeway = 600", ("'leeway' must be between 0 and 60",)),
        ('jwks_url = "https://login.example.org/keys"', ("exactly one of 'jwks_file'",)),
        ('colour = "blue"', ("unknown setting 'colour' in [identity]",)),
        ('name_claim = ""', ("'name_claim' must name a claim",)),
    ],
)
def test_weakening_settings_are_refused_naming_the_key(
    tmp_path: Path, line: str, words: tuple[str, ...]
) -> None:
    home = settings_with(tmp_path, identity_table(f'jwks_file = "keys.json"\n{line}'))
    with pytest.raises(ValueError) as caught:
        load_settings(home, environ={})
    for word in words:
        assert word in str(caught.value)


def test_issuer_audience_roles_and_url_scheme_are_required(tmp_path: Path) -> None:
    base = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "k.json"}
    roles = {"roles": {"analyst": ["researchers"]}}
    for missing in ("issuer", "audience"):
        table = {k: v for k, v in {**base, **roles}.items() if k != missing}
        with pytest.raises(ValueError, match=f"'{missing}' is required"):
            IdentitySettings.from_table(table, "f", tmp_path)
    with pytest.raises(ValueError, match=r"\[identity.roles\]"):
        IdentitySettings.from_table(base, "f", tmp_path)
    with pytest.raises(ValueError, match="unknown role 'root'"):
        IdentitySettings.from_table({**base, "roles": {"root": ["x"]}}, "f", tmp_path)
    plain = {**roles, "issuer": ISSUER, "audience": AUDIENCE}
    with pytest.raises(ValueError, match="https://"):
        IdentitySettings.from_table({**plain, "jwks_url": "http://idp.example/keys"}, "f", tmp_path)
    IdentitySettings.from_table({**plain, "jwks_url": "http://127.0.0.1:9/keys"}, "f", tmp_path)


def _settings(**values: object) -> IdentitySettings:
    return IdentitySettings(
        issuer=ISSUER,
        audience=AUDIENCE,
        roles={"analyst": ("researchers",), "admin": ("fdrtd-admins",)},
        **values,  # type: ignore[arg-type]
    )


def test_a_key_set_with_a_symmetric_key_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "key-1"}]}')
    provider = IdentityProvider(_settings(jwks_file=keys))
    with pytest.raises(Refused) as caught:
        provider.verify(Provider().token())
    assert caught.value.status == 503


def test_a_malformed_key_entry_is_skipped_and_the_others_still_verify(tmp_path: Path) -> None:
    import json

    good = Provider()
    keys = good.write_jwks(tmp_path / "keys.json")
    document = json.loads(keys.read_text("utf-8"))
    document["keys"].insert(0, {"kty": "RSA", "alg": ["RS256"], "kid": "odd", "n": "AQAB"})
    keys.write_text(json.dumps(document), "utf-8")
    provider = IdentityProvider(_settings(jwks_file=keys))
    assert provider.verify(good.token())  # an "alg" that is a list was a TypeError, a 500
    keys.write_text(json.dumps({"keys": [document["keys"][0]]}), "utf-8")
    with pytest.raises(Refused) as caught:
        IdentityProvider(_settings(jwks_file=keys)).verify(good.token())
    assert caught.value.status == 503  # no usable key: "no key set", not a 500


def test_the_key_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    old, new = Provider(kid="old"), Provider(kid="new")
    keys = old.write_jwks(tmp_path / "keys.json")
    provider = IdentityProvider(_settings(jwks_file=keys))
    assert provider.verify(old.token()) == ("oidc-ann", "analyst")
    new.write_jwks(keys)
    stamp = keys.stat().st_mtime_ns + 1_000_000
    import os

    os.utime(keys, ns=(stamp, stamp))  # a new modification time, whatever the clock's grain
    assert provider.verify(new.token()) == ("oidc-ann", "analyst")
    with pytest.raises(Refused, match="signing key"):
        provider.verify(old.token())


def test_nested_role_claims_and_one_string_work(tmp_path: Path) -> None:
    idp = Provider()
    keys = idp.write_jwks(tmp_path / "keys.json")
    provider = IdentityProvider(_settings(jwks_file=keys, role_claim="realm_access.roles"))
    claims = idp.claims(groups=None, realm_access={"roles": ["fdrtd-admins", "other"]})
    assert provider.verify(idp.token(claims)) == ("oidc-ann", "admin")
    assert provider.verify(idp.token(idp.claims(groups="researchers")))[1] == "analyst"


@contextlib.contextmanager
def _serve(status: int, document: list[bytes]) -> Iterator[tuple[str, list[int]]]:
    """A key URL on 127.0.0.1 answering ``status`` with ``document[0]``; and its request count."""
    hits = [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits[0] += 1
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(document[0])))
            self.end_headers()
            self.wfile.write(document[0])

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/keys", hits
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def served_keys() -> Iterator[tuple[str, list[bytes], list[int]]]:
    """A JWKS URL on 127.0.0.1; set the document in the list, read the request count."""
    document: list[bytes] = [b'{"keys": []}']
    with _serve(200, document) as (url, hits):
        yield url, document, hits


def test_keys_from_a_url_are_fetched_in_a_thread_and_on_an_unknown_kid(
    served_keys: tuple[str, list[bytes], list[int]],
) -> None:
    url, document, hits = served_keys
    first, second = Provider(kid="k1"), Provider(kid="k2")
    document[0] = first.jwks().encode()

    async def scenario() -> None:
        provider = await oidc.identity_provider(
            type("S", (), {"identity": _settings(jwks_url=url)})
        )
        assert provider is not None and hits[0] == 1
        token = first.token()
        await provider.prepare(token)
        assert hits[0] == 1  # cached
        assert provider.verify(token) == ("oidc-ann", "analyst")
        # the provider rotates its key; a token with the new kid fetches the set again
        document[0] = second.jwks().encode()
        provider._tried = 0.0  # past the cooldown
        await provider.prepare(second.token())
        assert hits[0] == 2
        assert provider.verify(second.token())[0] == "oidc-ann"
        # within the cooldown an unknown kid does not make it fetch again
        await provider.prepare(Provider(kid="k3").token())
        assert hits[0] == 2

    asyncio.run(scenario())


def test_an_unreachable_key_url_refuses_with_503() -> None:
    provider = IdentityProvider(_settings(jwks_url="http://127.0.0.1:9/keys"))
    provider.fetch()  # logs, keeps no keys
    with pytest.raises(Refused) as caught:
        provider.verify(Provider().token())
    assert caught.value.status == 503 and "could not be fetched" in caught.value.detail


def test_looks_like_jwt_never_matches_a_local_token() -> None:
    import secrets

    assert oidc.looks_like_jwt(Provider().token())
    assert oidc.looks_like_jwt("a.b.")  # alg none: still handled as a JWT (and refused)
    assert not any(oidc.looks_like_jwt(secrets.token_urlsafe(32)) for _ in range(100))


@pytest.mark.parametrize(
    "header",
    [
        {"alg": ["RS256"], "kid": "key-1"},
        {"alg": {"RS256": 1}, "kid": "key-1"},
        {"alg": 256, "kid": "key-1"},
        {"kid": "key-1"},
        {"alg": "RS256", "kid": ["key-1"]},
        {"alg": "RS256", "kid": {"id": "key-1"}},
        {"alg": "RS256", "kid": 1},
    ],
    ids=[
        "alg-list",
        "alg-object",
        "alg-number",
        "alg-missing",
        "kid-list",
        "kid-object",
        "kid-int",
    ],
)
def test_a_header_with_a_non_string_alg_or_kid_is_refused_as_malformed(
    tmp_path: Path, header: dict[str, object]
) -> None:
    idp = Provider()
    provider = IdentityProvider(_settings(jwks_file=idp.write_jwks(tmp_path / "keys.json")))
    with pytest.raises(Refused) as caught:
        provider.verify(idp.with_header(header))
    assert (caught.value.status, caught.value.reason) == (401, "malformed")
    # the same forms with string values pass: the refusal is about the types only
    assert provider.verify(idp.with_header({"alg": "RS256", "kid": "key-1"}))[0] == "oidc-ann"


def test_a_failing_key_url_is_fetched_at_most_once_per_cooldown() -> None:
    """Made-up JWTs (no valid signature needed) cannot make the server hammer a failing IdP."""
    bogus = "eyJhbGciOiJSUzI1NiJ9.e30.AAAA"  # JWT-shaped, unknown kid
    with _serve(503, [b"unavailable"]) as (url, hits):
        provider = IdentityProvider(_settings(jwks_url=url))

        async def scenario() -> None:
            await asyncio.gather(*(provider.prepare(bogus) for _ in range(50)))
            assert hits[0] == 1  # one ran; the others did not start a second one
            for _ in range(50):
                await provider.prepare(bogus)
            assert hits[0] == 1  # a failed fetch counts for the cooldown
            provider._tried -= oidc.KEYS_COOLDOWN  # the cooldown has passed
            await asyncio.gather(*(provider.prepare(bogus) for _ in range(50)))
            assert hits[0] == 2

        asyncio.run(scenario())
        with pytest.raises(Refused) as caught:
            provider.verify(Provider().token())
        assert caught.value.status == 503


def test_stale_keys_are_fetched_again_at_most_once_per_cooldown_while_the_url_fails(
    served_keys: tuple[str, list[bytes], list[int]],
) -> None:
    url, document, hits = served_keys
    idp = Provider()
    document[0] = idp.jwks().encode()
    provider = IdentityProvider(_settings(jwks_url=url))
    provider.fetch()
    assert hits[0] == 1
    document[0] = b"not a key set"  # the provider breaks; the keys we have go stale
    provider._fetched -= oidc.KEYS_LIFESPAN
    provider._tried -= oidc.KEYS_LIFESPAN

    async def scenario() -> None:
        for _ in range(50):
            await provider.prepare(idp.token())

    asyncio.run(scenario())
    assert hits[0] == 2
    assert provider.verify(idp.token()) == ("oidc-ann", "analyst")  # the old keys still serve
