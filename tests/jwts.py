"""An identity provider made in the test: key pairs, a JWKS document and signed JWTs.

Nothing leaves the machine: the keys are generated here with
``cryptography`` and the tokens signed with PyJWT (or by hand, for the forms
PyJWT refuses to make, such as HS256 "signed" with a public key).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = ["AUDIENCE", "ISSUER", "Provider", "b64url", "identity_table"]

ISSUER = "https://login.example.org/realms/lab"
AUDIENCE = "fdrtd"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Provider:
    """One RSA signing key with a key id, as an identity provider publishes it."""

    kid: str = "key-1"
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )

    def jwk(self) -> dict[str, Any]:
        entry: dict[str, Any] = json.loads(
            jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key())
        )
        return {**entry, "kid": self.kid, "alg": "RS256", "use": "sig"}

    def jwks(self) -> str:
        return json.dumps({"keys": [self.jwk()]})

    def write_jwks(self, path: Path) -> Path:
        path.write_text(self.jwks(), "utf-8")
        return path

    def claims(self, sub: str = "ann", **overrides: Any) -> dict[str, Any]:
        """Valid claims for an analyst, with ``overrides`` (a value None removes the claim)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": sub,
            "iat": now,
            "exp": now + 600,
            "groups": ["researchers"],
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, claims: dict[str, Any] | None = None, *, kid: str | None = None) -> str:
        return jwt.encode(
            claims or self.claims(),
            self.key,
            algorithm="RS256",
            headers={"kid": kid or self.kid},
        )

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def hs256_with_public_key(self, claims: dict[str, Any] | None = None) -> str:
        """The key-confusion forgery: HS256 with the provider's public key as the secret."""
        header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": self.kid}).encode())
        body = b64url(json.dumps(claims or self.claims()).encode())
        signing = f"{header}.{body}".encode()
        signature = hmac.new(self.public_pem(), signing, hashlib.sha256).digest()
        return f"{header}.{body}.{b64url(signature)}"

    def with_header(self, header: dict[str, Any], claims: dict[str, Any] | None = None) -> str:
        """A token with any ``header`` (a list as 'alg', say), signed with this key."""
        signing = (
            b64url(json.dumps(header).encode())
            + "."
            + b64url(json.dumps(claims or self.claims()).encode())
        )
        signature = jwt.algorithms.RSAAlgorithm(jwt.algorithms.RSAAlgorithm.SHA256).sign(
            signing.encode(), self.key
        )
        return f"{signing}.{b64url(signature)}"

    def unsigned(self, claims: dict[str, Any] | None = None) -> str:
        """``alg: none``: no signature at all."""
        header = b64url(json.dumps({"alg": "none", "typ": "JWT", "kid": self.kid}).encode())
        body = b64url(json.dumps(claims or self.claims()).encode())
        return f"{header}.{body}."


def identity_table(source: str) -> str:
    """An ``[identity]`` table for ``fdrtd.toml``; ``source`` is a jwks_file or jwks_url line."""
    return (
        "\n[identity]\n"
        f'issuer = "{ISSUER}"\n'
        f'audience = "{AUDIENCE}"\n'
        f"{source}\n"
        'name_prefix = "lab-"\n'
        "\n[identity.roles]\n"
        'admin = ["fdrtd-admins"]\n'
        'owner = ["data-stewards"]\n'
        'analyst = ["researchers"]\n'
    )
