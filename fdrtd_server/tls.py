"""TLS on the server's own port and on the peer gateway's connections.

A server can serve HTTPS itself (``tls_cert``, ``tls_key``) instead of
behind a reverse proxy, and its peer gateway can verify the other members
against the federation's own CA (``tls_ca``) rather than the system's
store. With ``tls_require_client_cert`` the server also takes only clients
(peers' gateways and analysts alike) that present a certificate signed by
that CA: mutual TLS. The gateway then presents ``tls_client_cert`` and
``tls_client_key`` (by default the server's own certificate and key, which
must then allow client authentication, or name no extended key usage).

Every path is a PEM file; a relative one is read from the server home. The
files are checked when the settings are loaded (:func:`check`), so that a
missing or unreadable file, a key that does not fit its certificate, or an
expired certificate stops the start naming the setting, not the first
handshake. Both directions use TLS 1.2 at least; the gateway checks the
peer's certificate chain and that it names the host of the peer's URL.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization

if TYPE_CHECKING:
    from fdrtd_server.config import Settings

__all__ = ["MINIMUM_VERSION", "TlsFiles", "check", "describe_error", "plain_members", "wants_https"]

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
"""The oldest TLS version spoken, on the server's port and to peers."""
_KEY_BLOCK = re.compile(
    rb"-----BEGIN ((?:[A-Z]+ )?PRIVATE KEY)-----\r?\n.*?-----END \1-----", re.DOTALL
)
"""A PEM private key (PKCS#8, encrypted PKCS#8, or the traditional RSA and EC forms)."""


@dataclass(frozen=True)
class TlsFiles:
    """The TLS files of one server, as absolute paths (None: not configured)."""

    cert: Path | None = None
    """The server's certificate chain (PEM), leaf first: served on its port."""
    key: Path | None = None
    """The private key of :attr:`cert` (None: it is in the certificate's file)."""
    ca: Path | None = None
    """The federation's CA bundle: peers' certificates (and clients', with mutual TLS)
    must chain to it. None: peers are verified against the system's store."""
    client_cert: Path | None = None
    """The certificate the gateway presents to peers (None: :attr:`cert`, if any)."""
    client_key: Path | None = None
    """The private key of :attr:`client_cert` (None: in its file, or :attr:`key`)."""
    require_client_cert: bool = False
    """Whether the server's port takes only clients with a certificate signed by :attr:`ca`."""

    @property
    def serves_tls(self) -> bool:
        """Whether the server's own port speaks HTTPS."""
        return self.cert is not None

    def server_context(self) -> ssl.SSLContext | None:
        """The context of the server's port (None: plain HTTP).

        Raises:
            ValueError: If a file cannot be used (see :func:`check`).
        """
        if self.cert is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = MINIMUM_VERSION
        _load_chain(context, self.cert, self.key, "tls_cert", "tls_key")
        if self.require_client_cert:
            assert self.ca is not None  # checked in check()
            _load_ca(context, self.ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def peer_context(self) -> ssl.SSLContext:
        """The context the gateway uses for ``https://`` peers.

        The chain must lead to :attr:`ca` (only it: the system's store is not
        used then) or, without it, to the system's store; the certificate
        must name the host of the peer's URL. The gateway presents
        :attr:`client_cert` (or the server's own) for peers that ask for one.

        Raises:
            ValueError: If a file cannot be used (see :func:`check`).
        """
        if self.ca is None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        else:
            # a bare client context trusts nothing until told: only the federation's CA
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            _load_ca(context, self.ca)
        context.minimum_version = MINIMUM_VERSION
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        if self.client_cert is not None:
            _load_chain(
                context, self.client_cert, self.client_key, "tls_client_cert", "tls_client_key"
            )
        elif self.cert is not None:
            _load_chain(context, self.cert, self.key, "tls_cert", "tls_key")
        return context


def _read(path: Path, setting: str) -> bytes:
    """The bytes of ``path``; ValueError naming ``setting`` if it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"setting '{setting}': {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"setting '{setting}': {path} is a directory, not a PEM file") from None
    except PermissionError:
        raise ValueError(
            f"setting '{setting}': {path} cannot be read (permission denied)"
        ) from None


def _certificates(path: Path, setting: str) -> list[x509.Certificate]:
    """The certificates of a PEM file, at least one; ValueError naming ``setting`` if none."""
    data = _read(path, setting)
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        found = []
    if not found:
        raise ValueError(f"setting '{setting}': {path} holds no PEM certificate")
    return found


def _check_key(path: Path, setting: str) -> None:
    """Whether ``path`` holds one unencrypted PEM private key; ValueError naming ``setting``."""
    block = _KEY_BLOCK.search(_read(path, setting))
    if block is None:
        raise ValueError(f"setting '{setting}': {path} holds no PEM private key")
    try:
        serialization.load_pem_private_key(block.group(0), password=None)
    except TypeError:
        raise ValueError(
            f"setting '{setting}': the private key in {path} is encrypted; fdrtd-server needs "
            "it unencrypted (keep the file readable by the server's user only, mode 0600)"
        ) from None
    except ValueError as error:
        raise ValueError(
            f"setting '{setting}': {path} holds no usable PEM private key ({error})"
        ) from None


def _check_current(certificate: x509.Certificate, path: Path, setting: str) -> None:
    """Refuse a certificate that has expired or is not valid yet, naming ``setting``."""
    now = datetime.now(UTC)
    if certificate.not_valid_after_utc < now:
        raise ValueError(
            f"setting '{setting}': the certificate in {path} expired on "
            f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if certificate.not_valid_before_utc > now:
        raise ValueError(
            f"setting '{setting}': the certificate in {path} is valid only from "
            f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )


def _load_chain(
    context: ssl.SSLContext, cert: Path, key: Path | None, cert_setting: str, key_setting: str
) -> None:
    """Load a certificate chain and its key, with errors naming the settings."""
    _check_current(_certificates(cert, cert_setting)[0], cert, cert_setting)
    _check_key(key or cert, key_setting if key is not None else cert_setting)

    def no_password() -> str:
        raise ValueError(f"setting '{key_setting}': the private key is encrypted")

    try:
        context.load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as error:
        if "KEY_VALUES_MISMATCH" in str(error) or error.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(
                f"setting '{key_setting}': the key in {key or cert} is not the key of the "
                f"certificate in {cert} (setting '{cert_setting}')"
            ) from None
        raise ValueError(
            f"setting '{cert_setting}': {cert} cannot be used as a certificate chain "
            f"({error.reason or error})"
        ) from None


def _load_ca(context: ssl.SSLContext, ca: Path) -> None:
    """Trust the CA bundle ``ca``, with errors naming the setting ``tls_ca``."""
    _certificates(ca, "tls_ca")
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as error:
        raise ValueError(
            f"setting 'tls_ca': {ca} cannot be used as a CA bundle ({error.reason or error})"
        ) from None


def _path(home: Path, value: str) -> Path | None:
    """A setting's path: None if unset, relative ones in the server home."""
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else home / path


def files_of(settings: Settings) -> TlsFiles:
    """The TLS files the settings name (not checked: see :func:`check`)."""
    home = settings.home
    return TlsFiles(
        cert=_path(home, settings.tls_cert),
        key=_path(home, settings.tls_key),
        ca=_path(home, settings.tls_ca),
        client_cert=_path(home, settings.tls_client_cert),
        client_key=_path(home, settings.tls_client_key),
        require_client_cert=settings.tls_require_client_cert,
    )


def wants_https(settings: Settings) -> bool:
    """Whether the server has TLS settings, so that its gateway sends to https:// members only."""
    return bool(settings.tls_cert or settings.tls_ca)


def plain_members(settings: Settings, urls: dict[str, str]) -> list[str]:
    """A warning for each member (name -> URL) its gateway will refuse: http:// under TLS."""
    if not wants_https(settings):
        return []
    return [
        f"federation member '{name}' has the plain http:// URL {url}, but this server has TLS "
        "settings ('tls_cert' or 'tls_ca'): its gateway refuses to send to it; give it its "
        "https:// URL"
        for name, url in sorted(urls.items())
        if not url.lower().startswith("https://")
    ]


def check(settings: Settings) -> None:
    """Check the TLS settings and their files; ValueError naming the setting if wrong.

    A key needs its certificate, mutual TLS needs the server to serve TLS and
    a CA to check clients against, and every file named must exist and hold
    what it should (the key that fits the certificate, unencrypted; a
    certificate that is valid now).
    """
    if settings.tls_key and not settings.tls_cert:
        raise ValueError(
            "setting 'tls_key' is set but 'tls_cert' is not: name the certificate of that key "
            "in 'tls_cert' (or remove 'tls_key')"
        )
    if settings.tls_client_key and not settings.tls_client_cert:
        raise ValueError(
            "setting 'tls_client_key' is set but 'tls_client_cert' is not: name the client "
            "certificate of that key in 'tls_client_cert' (or remove 'tls_client_key')"
        )
    if settings.tls_require_client_cert and not (settings.tls_cert and settings.tls_ca):
        missing = " and ".join(k for k in ("tls_cert", "tls_ca") if not getattr(settings, k))
        raise ValueError(
            f"setting 'tls_require_client_cert' needs {missing}: the server must serve TLS "
            "itself (tls_cert, tls_key) and check client certificates against the federation's "
            "CA (tls_ca)"
        )
    files = files_of(settings)
    files.server_context()
    files.peer_context()


def describe_error(error: BaseException) -> str:
    """What went wrong in a TLS handshake, for a person (the gateway's error details).

    Args:
        error: An exception of a connection or an exchange.
    """
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            f"its TLS certificate was not accepted ({error.verify_message}): it must be signed "
            "by the federation's CA (setting 'tls_ca') and name the host of its URL"
        )
    if isinstance(error, ssl.SSLError):
        reason = error.reason or str(error)
        if "CERTIFICATE_REQUIRED" in reason.upper() or "CERTIFICATE" in reason.upper():
            return (
                f"it refused this server's TLS client certificate ({reason}): set "
                "'tls_client_cert' and 'tls_client_key' to a certificate signed by the "
                "federation's CA"
            )
        return f"the TLS handshake failed ({reason})"
    return type(error).__name__
