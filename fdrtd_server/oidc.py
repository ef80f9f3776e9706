"""Institutional identity: JWTs from an OpenID Connect identity provider.

An institution that runs an identity provider (Keycloak, Entra ID, ...)
configures it in the ``[identity]`` table of ``fdrtd.toml``; its users then
call the API with the provider's access token (a JWT) instead of a token made
by ``fdrtd-server token create``::

    [identity]
    issuer = "https://login.example.org/realms/lab"   # pinned: "iss" must equal it
    audience = "fdrtd"                                 # pinned: "aud" must hold it
    jwks_file = "/etc/fdrtd/idp-keys.json"             # or jwks_url = "https://..."
    # algorithms = ["RS256", "ES256", "EdDSA"]         # never HS*, never "none"
    # leeway = 30                                      # seconds of clock skew, at most 60
    # name_claim = "sub"                               # which claim names the person
    # name_prefix = "oidc-"                            # fdrtd name = prefix + that claim
    # role_claim = "roles"                             # dotted paths work: realm_access.roles
    # groups_claim = "groups"

    [identity.roles]                                   # claim values -> fdrtd roles
    admin = ["fdrtd-admins"]
    owner = ["data-stewards"]
    analyst = ["researchers"]

How a JWT is checked (:meth:`IdentityProvider.verify`):

* The algorithm in its header must be one of ``algorithms``, which admits
  only asymmetric ones: a server that also took HS256 could be handed a
  token "signed" with its own public key as an HMAC secret (key confusion).
* Its ``kid`` must name a key of the provider's key set (JWKS), and the
  algorithm must be that key's; the key set holds no symmetric (``oct``) key.
* ``exp``, ``iat``, ``iss``, ``aud`` and ``sub`` must be present; ``iss`` must be
  ``issuer`` and ``aud`` must hold ``audience``; ``exp`` and ``nbf`` are
  honoured with ``leeway`` seconds of clock skew.
* The values of ``role_claim`` and ``groups_claim`` are looked up in
  ``[identity.roles]``: they must grant exactly one fdrtd role. None is
  refused (403, "no role was granted"); several are refused too, as
  ambiguous, because fdrtd's roles are not ranked (an admin may not compute,
  an analyst may not grant): the provider must give a person one role for
  this audience.
* The person's fdrtd name is ``name_prefix`` followed by the ``name_claim``
  value, and must be a valid fdrtd name (lowercase letters, digits, ``-``,
  ``_``); nothing is lowercased or replaced, so that two subjects never map to
  one name. The prefix keeps these names apart from local token names:
  ``token create`` refuses names that start with it, and a JWT whose name is
  a local token's is refused.

A refusal is a :class:`Refused` with a short ``reason`` for the audit log and
a ``detail`` for the person; neither ever holds the token.

Keys come from ``jwks_file`` (read again when its modification time
changes) or ``jwks_url`` (fetched with :class:`jwt.PyJWKClient` in a thread,
never on the event loop: at start, every five minutes, and when a token
names a key id the set lacks; never while a fetch runs, and at most once
every 30 seconds, whether the last attempt failed or not).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt

from fdrtd_server.config import NAME_RULE, ROLES

__all__ = [
    "DEFAULT_ALGORITHMS",
    "IdentityProvider",
    "IdentitySettings",
    "Refused",
    "identity_provider",
    "looks_like_jwt",
]

log = logging.getLogger("fdrtd.oidc")

DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA")
ASYMMETRIC = frozenset(
    {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES256K",
        "ES384",
        "ES512",
        "EdDSA",
    }
)
"""The algorithms ``algorithms`` may list: public-key signatures only."""
REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub")
MAX_LEEWAY = 60.0
KEYS_LIFESPAN = 300.0
"""Seconds a key set fetched from ``jwks_url`` is used before it is fetched again."""
KEYS_COOLDOWN = 30.0
"""Seconds between two fetches for a key id the set lacks (a token cannot make us hammer it)."""
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_KEYS = (
    "issuer",
    "audience",
    "jwks_file",
    "jwks_url",
    "algorithms",
    "leeway",
    "name_claim",
    "name_prefix",
    "role_claim",
    "groups_claim",
    "roles",
)


def looks_like_jwt(token: str) -> bool:
    """Whether a bearer value has a JWT's shape: three base64url parts joined by dots.

    fdrtd's own tokens are base64url without dots, so the two never mix up.
    """
    return _JWT_SHAPE.fullmatch(token) is not None


class Refused(Exception):
    """A JWT that does not let its bearer in.

    Attributes:
        status: 401 (the token is not valid) or 403 (valid, but grants no use here).
        reason: A few words for the audit log (``expired``, ``wrong issuer``, ...).
        detail: What is wrong and what to do, for the person; never the token.
    """

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


@dataclass(frozen=True)
class IdentitySettings:
    """The ``[identity]`` table of ``fdrtd.toml``, checked on construction."""

    issuer: str
    audience: str
    jwks_file: Path | None = None
    jwks_url: str = ""
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway: float = 30.0
    name_claim: str = "sub"
    name_prefix: str = "oidc-"
    """Put before every name from the provider; ``token create`` refuses names that start so."""
    role_claim: str = "roles"
    groups_claim: str = "groups"
    roles: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """fdrtd role -> the claim values (roles or groups) that grant it."""

    def __post_init__(self) -> None:
        where = "[identity]"
        if not self.issuer:
            raise ValueError(
                f"{where} 'issuer' is required: the provider's issuer URL, as in 'iss'"
            )
        if not self.audience:
            raise ValueError(
                f"{where} 'audience' is required: the 'aud' the provider issues for fdrtd"
            )
        if (self.jwks_file is None) == (not self.jwks_url):
            raise ValueError(
                f"{where} needs exactly one of 'jwks_file' (a local copy of the provider's "
                "key set) and 'jwks_url' (where the provider publishes it)"
            )
        if self.jwks_url:
            parts = urlsplit(self.jwks_url)
            if parts.scheme != "https" and not (
                parts.scheme == "http" and _is_loopback(parts.hostname or "")
            ):
                raise ValueError(
                    f"{where} 'jwks_url' must be an https:// URL (plain http only on this "
                    "machine's loopback): keys fetched in the clear could be replaced"
                )
        if not self.algorithms:
            raise ValueError(f"{where} 'algorithms' must list at least one algorithm")
        for name in self.algorithms:
            if name not in ASYMMETRIC:
                raise ValueError(
                    f"{where} 'algorithms' may list only public-key algorithms "
                    f"({', '.join(sorted(ASYMMETRIC))}); '{name[:16]}' is refused: HS* would let "
                    "a public key serve as an HMAC secret, and 'none' signs nothing"
                )
        if not 0 <= self.leeway <= MAX_LEEWAY:
            raise ValueError(f"{where} 'leeway' must be between 0 and {MAX_LEEWAY:g} seconds")
        for key in ("name_claim", "role_claim", "groups_claim"):
            if not getattr(self, key):
                raise ValueError(f"{where} '{key}' must name a claim")
        if not NAME_RULE.fullmatch(self.name_prefix) or len(self.name_prefix) > 20:
            raise ValueError(
                f"{where} 'name_prefix' must be 1-20 lowercase letters, digits, '-' or '_' "
                "(starting with a letter or digit): it keeps provider names apart from "
                "local token names"
            )
        if not any(self.roles.values()):
            raise ValueError(
                f"{where} needs an [identity.roles] table mapping claim values to fdrtd roles "
                f'({", ".join(ROLES)}), e.g. analyst = ["researchers"]: without it no '
                "token would grant a role"
            )

    @classmethod
    def from_table(cls, table: Mapping[str, Any], source: str, home: Path) -> IdentitySettings:
        """Parse the ``[identity]`` table; ``source`` names the file in messages.

        A relative ``jwks_file`` is taken relative to the server home.

        Raises:
            ValueError: Naming the key and the rule it breaks (an unknown key too).
        """
        values: dict[str, Any] = {"issuer": "", "audience": ""}  # required: checked below
        for key, value in table.items():
            if key not in _KEYS:
                raise ValueError(
                    f"{source}: unknown setting '{key}' in [identity] (known: {', '.join(_KEYS)})"
                )
            values[key] = value
        for key in ("issuer", "audience", "jwks_url", "name_claim", "name_prefix", "role_claim",
                    "groups_claim", "jwks_file"):  # fmt: skip
            if key in values and not isinstance(values[key], str):
                raise ValueError(f"{source}: [identity] '{key}' must be a string")
        if "jwks_file" in values:
            path = Path(values["jwks_file"]).expanduser()
            values["jwks_file"] = path if path.is_absolute() else home / path
        if "algorithms" in values:
            algorithms = values["algorithms"]
            if not isinstance(algorithms, list) or not all(isinstance(a, str) for a in algorithms):
                raise ValueError(f"{source}: [identity] 'algorithms' must be a list of names")
            values["algorithms"] = tuple(algorithms)
        if "leeway" in values:
            leeway = values["leeway"]
            if not isinstance(leeway, int | float) or isinstance(leeway, bool):
                raise ValueError(f"{source}: [identity] 'leeway' must be a number of seconds")
            values["leeway"] = float(leeway)
        roles = values.get("roles", {})
        if not isinstance(roles, dict):
            raise ValueError(f"{source}: [identity.roles] must be a table")
        mapped: dict[str, tuple[str, ...]] = {}
        for role, claim_values in roles.items():
            if role not in ROLES:
                raise ValueError(
                    f"{source}: unknown role '{role}' in [identity.roles] "
                    f"(the roles are {', '.join(ROLES)})"
                )
            if not isinstance(claim_values, list) or not all(
                isinstance(v, str) and v for v in claim_values
            ):
                raise ValueError(
                    f"{source}: [identity.roles] '{role}' must be a list of claim values "
                    "(role or group names)"
                )
            mapped[role] = tuple(claim_values)
        values["roles"] = mapped
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    """The claim at a dotted ``path`` (``realm_access.roles``), or None."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _values(claim: Any) -> set[str]:
    """A role or groups claim as a set of strings (one string, or a list of them)."""
    if isinstance(claim, str):
        return {claim}
    if isinstance(claim, list):
        return {item for item in claim if isinstance(item, str)}
    return set()


def _key_set(text: str, source: str) -> dict[str, jwt.PyJWK]:
    """The signing keys of a JWKS document by key id; symmetric keys are refused.

    Raises:
        ValueError: If the document is not a usable key set.
    """
    try:
        document = json.loads(text)
        entries = document["keys"]
        if not isinstance(entries, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{source} is not a JWKS document (a JSON object with 'keys')") from None
    if any(isinstance(e, dict) and e.get("kty") == "oct" for e in entries):
        raise ValueError(
            f"{source} holds a symmetric ('oct') key: an identity provider's key set has "
            "public keys only; refusing the whole set"
        )
    keys: dict[str, jwt.PyJWK] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK.from_dict(entry)
        except (jwt.PyJWTError, TypeError, ValueError, KeyError):
            # an algorithm this server cannot use (as PyJWKSet does), or a malformed
            # entry (an "alg" that is a list...): the other keys still count
            continue
        keys[str(key.key_id or "")] = key
    if not keys:
        raise ValueError(f"{source} holds no usable signing key")
    return keys


def _explain(error: jwt.PyJWTError, settings: IdentitySettings) -> tuple[str, str]:
    """Why PyJWT refused a token: a reason for the audit and a detail for the person."""
    if isinstance(error, jwt.ExpiredSignatureError):
        return "expired", "the token expired; get a new one from your identity provider"
    if isinstance(error, jwt.ImmatureSignatureError):
        return "not yet valid", "the token is not yet valid (its 'nbf' or 'iat' is in the future)"
    if isinstance(error, jwt.InvalidIssuerError):
        return "wrong issuer", (
            f"the token was not issued by '{settings.issuer}', the identity provider this "
            "server trusts"
        )
    if isinstance(error, jwt.InvalidAudienceError):
        return "wrong audience", (
            f"the token is not meant for this server: its 'aud' must hold '{settings.audience}'"
        )
    if isinstance(error, jwt.InvalidSignatureError):
        return "bad signature", "the token's signature does not match the identity provider's key"
    return "invalid", "the token is not valid (its algorithm, key or claims do not check out)"


class IdentityProvider:
    """Verifies the provider's JWTs and maps them to an fdrtd name and role."""

    def __init__(self, settings: IdentitySettings) -> None:
        self.settings = settings
        self._keys: dict[str, jwt.PyJWK] = {}
        self._stamp: float | None = None
        self._fetched = 0.0
        self._tried = 0.0
        self._fetching = threading.Lock()
        self._client = (
            jwt.PyJWKClient(settings.jwks_url, cache_jwk_set=False, timeout=10)
            if settings.jwks_url
            else None
        )

    # -- keys ----------------------------------------------------------------

    def _file_keys(self) -> dict[str, jwt.PyJWK]:
        """The key file's keys, read again when its modification time changes."""
        path = self.settings.jwks_file
        assert path is not None
        try:
            stamp = path.stat().st_mtime
        except FileNotFoundError:
            raise Refused(
                503, "no key set", "the identity provider's key set is missing on this server"
            ) from None
        if stamp != self._stamp:
            try:
                self._keys = _key_set(path.read_text("utf-8"), str(path))
            except (OSError, ValueError) as error:
                log.error("cannot use the identity provider's key set: %s", error)
                raise Refused(
                    503, "no key set", "the identity provider's key set on this server is broken"
                ) from None
            self._stamp = stamp
        return self._keys

    def fetch(self) -> None:
        """Fetch the key set from ``jwks_url`` now (blocking: call it from a thread).

        A failure keeps the keys fetched before and is logged.
        """
        with self._fetching:
            self._fetch()

    def _fetch(self) -> None:
        """Fetch the key set; the caller holds ``_fetching``."""
        assert self._client is not None
        self._tried = time.monotonic()
        try:
            document = self._client.fetch_data()
            self._keys = _key_set(json.dumps(document), self.settings.jwks_url)
            self._fetched = time.monotonic()
        except (jwt.PyJWTError, ValueError, OSError) as error:
            log.warning("fetching the identity provider's keys failed: %s", error)

    async def prepare(self, token: str) -> None:
        """Make sure the keys ``token`` needs are here, fetching them in a thread if due.

        A no-op for a key file. For a key URL: fetched when the set is
        missing or older than :data:`KEYS_LIFESPAN`, or when the token's key
        id is unknown, but in every case at most once per
        :data:`KEYS_COOLDOWN` seconds (counted from the last attempt, failed
        or not) and never while another fetch runs: tokens, which anyone can
        make up, cannot make the server hammer a failing provider.
        """
        if self._client is None:
            return
        now = time.monotonic()
        kid = ""
        with contextlib.suppress(jwt.PyJWTError):
            kid = str(jwt.get_unverified_header(token).get("kid") or "")
        stale = not self._keys or now - self._fetched >= KEYS_LIFESPAN
        unknown = kid not in self._keys
        if not (stale or unknown) or now - self._tried < KEYS_COOLDOWN:
            return
        if not self._fetching.acquire(blocking=False):
            return  # a fetch runs: this request uses the keys at hand
        try:
            self._tried = now
            await asyncio.to_thread(self._fetch)
        finally:
            self._fetching.release()

    def _current_keys(self) -> dict[str, jwt.PyJWK]:
        if self._client is None:
            return self._file_keys()
        if not self._keys:
            raise Refused(
                503,
                "no key set",
                "the identity provider's keys could not be fetched; try again later",
            )
        return self._keys

    # -- tokens --------------------------------------------------------------

    def verify(self, token: str) -> tuple[str, str]:
        """The fdrtd ``(name, role)`` of a valid JWT of the provider.

        Raises:
            Refused: Saying why (expired, not yet valid, wrong issuer, wrong
                audience, bad signature, unknown key id, missing claim, no role).
        """
        settings = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Refused(401, "malformed", "the token is not a well-formed JWT") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        if not isinstance(algorithm, str) or not isinstance(kid, str | None):
            raise Refused(
                401,
                "malformed",
                "the token is not a well-formed JWT: its header's 'alg' (and 'kid', if present) "
                "must be strings",
            )
        if algorithm not in settings.algorithms:
            shown = algorithm if algorithm in ASYMMETRIC or algorithm in ("none", "HS256",
                    "HS384", "HS512") else "another"  # fmt: skip
            raise Refused(
                401,
                "algorithm not accepted",
                f"the token is signed with '{shown}'; this server accepts "
                f"{', '.join(settings.algorithms)} only",
            )
        keys = self._current_keys()
        if kid is None and len(keys) == 1:
            key = next(iter(keys.values()))
        elif kid is not None and kid in keys:
            key = keys[kid]
        else:
            raise Refused(
                401,
                "unknown key id",
                "the token names a signing key ('kid') the identity provider's key set on this "
                "server does not hold: it was signed by another key, or the key set is out of "
                "date",
            )
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=settings.leeway,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except jwt.MissingRequiredClaimError as error:
            raise Refused(
                401,
                "missing claim",
                f"the token lacks the claim '{error.claim}', which this server requires",
            ) from None
        except jwt.PyJWTError as error:
            reason, detail = _explain(error, settings)
            raise Refused(401, reason, detail) from None
        return self._principal(claims)

    def _principal(self, claims: Mapping[str, Any]) -> tuple[str, str]:
        """The fdrtd name and the one role the verified ``claims`` map to."""
        settings = self.settings
        subject = _claim(claims, settings.name_claim)
        name = settings.name_prefix + subject if isinstance(subject, str) else ""
        if not NAME_RULE.fullmatch(name):
            raise Refused(
                403,
                "unusable name",
                f"the token's '{settings.name_claim}' claim does not make a valid fdrtd name "
                f"after the prefix '{settings.name_prefix}' (up to 63 lowercase letters, digits, "
                "'-' or '_'): the server's admin sets name_claim to a claim that does",
            )
        held = _values(_claim(claims, settings.role_claim)) | _values(
            _claim(claims, settings.groups_claim)
        )
        granted = sorted(role for role, wanted in settings.roles.items() if held & set(wanted))
        if not granted:
            raise Refused(
                403,
                "no role granted",
                f"no role was granted: none of the token's '{settings.role_claim}' or "
                f"'{settings.groups_claim}' values is mapped to an fdrtd role on this server; "
                "ask its admin",
            )
        if len(granted) > 1:
            raise Refused(
                403,
                "ambiguous role",
                f"the token grants several roles ({', '.join(granted)}); fdrtd gives a caller "
                "exactly one: the identity provider must give you one of them for this audience",
            )
        return name, granted[0]


async def identity_provider(settings: Any) -> IdentityProvider | None:
    """The provider of ``settings.identity`` with its keys at hand, or None if there is none.

    A key URL is fetched once now, in a thread; if that fails the server
    starts all the same (local tokens work) and tries again on a JWT
    :data:`KEYS_COOLDOWN` seconds later.
    """
    if settings.identity is None:
        return None
    provider = IdentityProvider(settings.identity)
    if provider.settings.jwks_url:
        await asyncio.to_thread(provider.fetch)
    return provider
