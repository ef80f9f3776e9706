"""A private CA for the TLS tests, made with ``cryptography`` (no openssl, no network).

:func:`make_ca` writes a self-signed CA certificate; :meth:`Authority.issue`
writes a certificate it signs, with the subject alternative names the tests
reach their servers by (IP 127.0.0.1 and DNS localhost) and the extended key
usages asked for. Every key is ECDSA P-256, unencrypted PEM (PKCS#8).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Authority", "Issued", "make_ca"]


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    """A CA: its certificate file (the bundle others trust), and what it needs to sign."""

    cert: Path
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    def issue(
        self,
        directory: Path,
        name: str,
        *,
        server: bool = True,
        client: bool = True,
        ips: tuple[str, ...] = ("127.0.0.1",),
        dns: tuple[str, ...] = ("localhost",),
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> Issued:
        """Sign a certificate for ``name``; writes ``directory/name.pem`` and ``name.key``.

        Args:
            server: Allow TLS server authentication (extended key usage).
            client: Allow TLS client authentication (a gateway presents its
                server's certificate to peers that require one).
            ips: IP subject alternative names.
            dns: DNS subject alternative names.
            not_before: Start of validity (default: an hour ago).
            not_after: End of validity (default: in a day).
        """
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        usages = [
            *([ExtendedKeyUsageOID.SERVER_AUTH] if server else []),
            *([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []),
        ]
        names: list[x509.GeneralName] = [
            *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips),
            *(x509.DNSName(host) for host in dns),
        ]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - timedelta(hours=1))
            .not_valid_after(not_after or now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        cert = directory / f"{name}.pem"
        cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return Issued(cert, _write_key(key, directory / f"{name}.key"))


def make_ca(directory: Path, name: str = "fdrtd test federation CA") -> Authority:
    """A new self-signed CA; its certificate is ``directory/ca.pem``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert = directory / "ca.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return Authority(cert, key, certificate)
