"""Server identities and the federation file that lists the members' public keys.

Every fdrtd server of a federation owns one *identity*: a name and two key
pairs.

- An **Ed25519** key pair signs every peer message the server sends, so a
  receiver knows which member wrote it (invariant 4).
- An **X25519** key pair agrees a symmetric key with each other member, so
  the payload of a peer message is readable by its two ends only.

The private keys live in one file, ``<directory>/identity.key``, written with
mode ``0600``. It holds two unencrypted PKCS#8 PEM blocks, one per key, after
a comment line that names the identity::

    # fdrtd identity "hospital-a": Ed25519 signing key, X25519 key agreement key
    -----BEGIN PRIVATE KEY-----
    ...
    -----END PRIVATE KEY-----
    -----BEGIN PRIVATE KEY-----
    ...
    -----END PRIVATE KEY-----

PKCS#8 PEM was chosen over raw bytes because ``openssl pkey -in identity.key``
can read it, and because each block says which algorithm it belongs to, so a
file with the keys swapped or truncated is refused instead of misread. The
file is not encrypted: the server must start unattended, so the protection is
the file mode (checked again on load) and the host's disk encryption.

The public halves are shared out of band in the *federation file*, a TOML
document that every member keeps a copy of::

    [[member]]
    name = "hospital-a"
    url = "https://fdrtd.hospital-a.example:8443"
    sign_key = "base64 of the raw 32-byte Ed25519 public key"
    box_key = "base64 of the raw 32-byte X25519 public key"

Only the servers listed there are members; a peer message from anyone else is
refused (see :mod:`fdrtd_server.envelope`). :func:`load_federation` reads the
file strictly: an unknown key, a duplicate name or a malformed key is an error
that names the file, the member's position and the rule it breaks, so a typo
cannot silently drop a member.
"""

from __future__ import annotations

import base64
import binascii
import re
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)

from fdrtd_server._files import write_atomic

__all__ = [
    "IDENTITY_FILENAME",
    "NAME_PATTERN",
    "FederationFileError",
    "Identity",
    "PeerEntry",
    "add_member",
    "load_federation",
    "save_federation",
]

IDENTITY_FILENAME = "identity.key"
"""Name of the private key file inside an identity directory."""

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
"""A member name: lowercase letters, digits, ``_`` and ``-``; 1 to 63 characters."""

_NAME_RULE = (
    "must match ^[a-z0-9][a-z0-9_-]{0,62}$ (1 to 63 lowercase letters, digits, "
    "'_' or '-', starting with a letter or digit)"
)

# RFC 3986 characters: unreserved, reserved and '%'. Anything else (spaces,
# quotes, control characters, non-ASCII) has no business in a peer URL and
# would only make logs and the federation file harder to read safely.
_URL_CHARS = re.compile(r"^[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+$")
_URL_MAX_LENGTH = 2048
_URL_RULE = (
    f"must be an http:// or https:// URL with a host, at most {_URL_MAX_LENGTH} "
    "characters, without spaces, quotes or non-ASCII characters"
)

_KEY_BYTES = 32
_DICT_FIELDS = ("name", "url", "sign_key", "box_key")


def _check_name(name: object, field: str = "name") -> str:
    """Return ``name`` if it is a valid member name, else raise ValueError."""
    if not isinstance(name, str):
        raise ValueError(f"`{field}` must be a string {_NAME_RULE}")
    if NAME_PATTERN.fullmatch(name) is None:
        raise ValueError(f"`{field}` {_NAME_RULE}")
    return name


def _check_url(url: object) -> str:
    """Return ``url`` if it is an acceptable peer URL, else raise ValueError."""
    if not isinstance(url, str):
        raise ValueError(f"`url` must be a string and {_URL_RULE}")
    if len(url) > _URL_MAX_LENGTH or _URL_CHARS.fullmatch(url) is None:
        raise ValueError(f"`url` {_URL_RULE}")
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise ValueError(f"`url` {_URL_RULE}") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise ValueError(f"`url` {_URL_RULE}")
    return url


def _check_key(key: object, field: str) -> bytes:
    """Return ``key`` if it is exactly 32 raw bytes, else raise ValueError."""
    if not isinstance(key, bytes) or len(key) != _KEY_BYTES:
        raise ValueError(f"`{field}` must be {_KEY_BYTES} raw bytes")
    return key


def _decode_key(value: object, field: str) -> bytes:
    """Decode a base64 text public key, raising ValueError that names ``field``."""
    rule = f"`{field}` must be the standard base64 encoding of {_KEY_BYTES} bytes"
    # 44 characters encode 32 bytes; refusing longer text early also keeps a
    # huge value from being decoded at all.
    if not isinstance(value, str) or len(value) != 44:
        raise ValueError(rule)
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(rule) from None
    if len(raw) != _KEY_BYTES:
        raise ValueError(rule)
    return raw


def _encode_key(raw: bytes) -> str:
    """Encode raw key bytes as standard base64 text."""
    return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class PeerEntry:
    """One member of a federation, as the other members know it: public data only.

    The fields are checked when the entry is built, so an entry that exists is
    valid; :meth:`from_dict` is the way to build one from untrusted text.

    Attributes:
        name: The member's name, unique in the federation (see ``NAME_PATTERN``).
        url: Base URL of the member's peer gateway (``http://`` or ``https://``).
        sign_public: Raw 32-byte Ed25519 public key that verifies its messages.
        box_public: Raw 32-byte X25519 public key for key agreement with it.
    """

    name: str
    url: str
    sign_public: bytes
    box_public: bytes

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_url(self.url)
        _check_key(self.sign_public, "sign_public")
        _check_key(self.box_public, "box_public")

    def to_dict(self) -> dict[str, str]:
        """Return the entry as text fields, with the keys in base64.

        Returns:
            A dict with the keys ``name``, ``url``, ``sign_key`` and ``box_key``,
            the format of a ``[[member]]`` table and of :meth:`from_dict`.
        """
        return {
            "name": self.name,
            "url": self.url,
            "sign_key": _encode_key(self.sign_public),
            "box_key": _encode_key(self.box_public),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PeerEntry:
        """Build an entry from the text fields that :meth:`to_dict` writes.

        Args:
            data: A mapping with exactly the keys ``name``, ``url``,
                ``sign_key`` and ``box_key``; the keys are standard base64
                of 32 raw bytes.

        Returns:
            The validated entry.

        Raises:
            ValueError: A field is missing, unknown or breaks its rule. The
                message names the field and the rule but never repeats the
                value, which may be long or not meant for logs.
        """
        if not isinstance(data, Mapping):
            raise ValueError("a member entry must be a table/mapping of fields")
        missing = [field for field in _DICT_FIELDS if field not in data]
        if missing:
            raise ValueError(
                f"missing field(s) {', '.join(missing)}; a member needs all of "
                f"{', '.join(_DICT_FIELDS)}"
            )
        unknown = sorted(str(key)[:32] for key in data if key not in _DICT_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown field(s) {', '.join(unknown)}; a member has only "
                f"{', '.join(_DICT_FIELDS)}"
            )
        return cls(
            name=_check_name(data["name"]),
            url=_check_url(data["url"]),
            sign_public=_decode_key(data["sign_key"], "sign_key"),
            box_public=_decode_key(data["box_key"], "box_key"),
        )


class Identity:
    """A server's own name and private keys.

    The private key objects are kept inside; callers sign with :meth:`sign`
    and agree keys with :meth:`exchange`, so the secrets never need to be
    handed around. ``repr`` shows the name and a fingerprint of the public
    signing key, never private material.

    Args:
        name: The server's member name (see ``NAME_PATTERN``).
        sign_key: Ed25519 private key used to sign outgoing peer messages.
        box_key: X25519 private key used for key agreement with peers.

    Raises:
        ValueError: ``name`` is not a valid member name.
        TypeError: A key is not of the expected type.
    """

    def __init__(self, name: str, sign_key: Ed25519PrivateKey, box_key: X25519PrivateKey) -> None:
        _check_name(name)
        if not isinstance(sign_key, Ed25519PrivateKey):
            raise TypeError("`sign_key` must be an Ed25519PrivateKey")
        if not isinstance(box_key, X25519PrivateKey):
            raise TypeError("`box_key` must be an X25519PrivateKey")
        self._name = name
        self._sign_key = sign_key
        self._box_key = box_key
        self._sign_public = sign_key.public_key().public_bytes_raw()
        self._box_public = box_key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls, name: str) -> Identity:
        """Create a new identity with fresh random key pairs.

        Args:
            name: The server's member name.

        Returns:
            The new identity; nothing is written to disk until :meth:`save`.
        """
        return cls(name, Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    @property
    def name(self) -> str:
        """The server's member name."""
        return self._name

    @property
    def sign_public(self) -> bytes:
        """Raw 32-byte Ed25519 public key."""
        return self._sign_public

    @property
    def box_public(self) -> bytes:
        """Raw 32-byte X25519 public key."""
        return self._box_public

    @property
    def fingerprint(self) -> str:
        """Short hex fingerprint of the public signing key, safe to log."""
        return self._sign_public.hex()[:16]

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` with the Ed25519 private key.

        Args:
            data: The bytes to sign.

        Returns:
            The 64-byte Ed25519 signature.
        """
        return self._sign_key.sign(data)

    def exchange(self, peer_box_public: bytes) -> bytes:
        """Compute the X25519 shared secret with a peer's public key.

        Use the result only as input to a key derivation function.

        Args:
            peer_box_public: The peer's raw 32-byte X25519 public key.

        Returns:
            The 32-byte shared secret.

        Raises:
            ValueError: The public key is malformed or of low order (the
                shared secret would be all zeros).
        """
        return self._box_key.exchange(X25519PublicKey.from_public_bytes(peer_box_public))

    def public_entry(self, url: str) -> PeerEntry:
        """Return this server's public federation entry.

        Args:
            url: Base URL of this server's peer gateway, as the others reach it.

        Returns:
            The entry to add to every member's federation file.

        Raises:
            ValueError: ``url`` is not an acceptable peer URL.
        """
        return PeerEntry(self._name, url, self._sign_public, self._box_public)

    def save(self, directory: Path) -> Path:
        """Write the private keys to ``directory / "identity.key"`` with mode 0600.

        The directory is created (mode 0700) if needed. The file is written to
        a temporary file first and renamed over the old one, so a crash never
        leaves a half-written key, and it is never readable by others, not
        even for a moment.

        Args:
            directory: Where to keep the identity; usually the server's data
                directory.

        Returns:
            The path of the key file.
        """
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem_blocks = [
            key.private_bytes(
                encoding=serialization.Encoding.PEM,
                format=serialization.PrivateFormat.PKCS8,
                encryption_algorithm=serialization.NoEncryption(),
            )
            for key in (self._sign_key, self._box_key)
        ]
        header = (
            f'# fdrtd identity "{self._name}": Ed25519 signing key, X25519 key agreement key\n'
        ).encode()
        path = directory / IDENTITY_FILENAME
        write_atomic(path, header + b"".join(pem_blocks), mode=0o600)
        return path

    @classmethod
    def load(cls, directory: Path, name: str) -> Identity:
        """Read the identity that :meth:`save` wrote.

        Args:
            directory: The directory that holds ``identity.key``.
            name: The server's member name; the file holds only keys.

        Returns:
            The identity.

        Raises:
            FileNotFoundError: There is no ``identity.key`` in ``directory``.
            PermissionError: The file is readable or writable by group or
                others; fix it with ``chmod 600``.
            ValueError: The file does not hold exactly one Ed25519 and one
                X25519 private key in PEM, or ``name`` is invalid.
        """
        _check_name(name)
        path = Path(directory) / IDENTITY_FILENAME
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise PermissionError(
                f"identity file {path} has mode {mode:#o} and is accessible by group or "
                f"others; private keys must be mode 0600: run `chmod 600 {path}`"
            )
        text = path.read_bytes()
        blocks = re.findall(
            rb"-----BEGIN PRIVATE KEY-----\r?\n.*?-----END PRIVATE KEY-----", text, re.DOTALL
        )
        sign_keys: list[Ed25519PrivateKey] = []
        box_keys: list[X25519PrivateKey] = []
        for block in blocks:
            try:
                key = serialization.load_pem_private_key(block, password=None)
            except (ValueError, TypeError):
                raise ValueError(
                    f"identity file {path}: a PEM block is not a readable unencrypted "
                    "PKCS#8 private key"
                ) from None
            if isinstance(key, Ed25519PrivateKey):
                sign_keys.append(key)
            elif isinstance(key, X25519PrivateKey):
                box_keys.append(key)
            else:
                raise ValueError(
                    f"identity file {path}: holds a key that is neither Ed25519 nor X25519"
                )
        if len(sign_keys) != 1 or len(box_keys) != 1:
            raise ValueError(
                f"identity file {path}: must hold exactly one Ed25519 and one X25519 "
                f"private key in PEM (found {len(sign_keys)} and {len(box_keys)})"
            )
        return cls(name, sign_keys[0], box_keys[0])

    def __repr__(self) -> str:
        return f"Identity(name={self._name!r}, fingerprint={self.fingerprint!r})"

    def __reduce__(self) -> Any:
        # Pickling would copy private keys into whatever stores the pickle.
        raise TypeError("an Identity holds private keys and cannot be pickled")


def _verify_public_keys(entry: PeerEntry) -> None:
    """Check that the entry's key bytes load as public keys of their algorithm."""
    Ed25519PublicKey.from_public_bytes(entry.sign_public)
    X25519PublicKey.from_public_bytes(entry.box_public)


class FederationFileError(ValueError):
    """The federation file cannot be read, or one of its members is invalid.

    Attributes:
        path: The federation file.
        index: 1-based position of the offending ``[[member]]`` table, or
            ``None`` if the problem is not with one member.
    """

    def __init__(self, path: Path, message: str, index: int | None = None) -> None:
        where = f"federation file {path}"
        if index is not None:
            where += f", member #{index}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.index = index


def load_federation(path: Path) -> dict[str, PeerEntry]:
    """Read the federation file: the members and their public keys.

    Args:
        path: A TOML file of ``[[member]]`` tables, each with ``name``,
            ``url``, ``sign_key`` and ``box_key``. A file without members
            is a federation with no members.

    Returns:
        The members by name, in the order of the file.

    Raises:
        FileNotFoundError: The file does not exist.
        FederationFileError: The file is not TOML, has keys other than
            ``member``, or a member is invalid or named twice. The message
            names the file and the member's 1-based position.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise FederationFileError(path, f"not valid TOML ({error})") from None
    unknown = sorted(key[:32] for key in document if key != "member")
    if unknown:
        raise FederationFileError(
            path,
            f"unknown top-level key(s) {', '.join(unknown)}; the file holds only [[member]] tables",
        )
    members = document.get("member", [])
    if not isinstance(members, list):
        raise FederationFileError(path, "`member` must be an array of tables: write [[member]]")
    entries: dict[str, PeerEntry] = {}
    for index, table in enumerate(members, start=1):
        if not isinstance(table, dict):
            raise FederationFileError(path, "must be a [[member]] table", index)
        try:
            entry = PeerEntry.from_dict(table)
            _verify_public_keys(entry)
        except ValueError as error:
            raise FederationFileError(path, str(error), index) from None
        if entry.name in entries:
            raise FederationFileError(
                path, f"the name {entry.name!r} is already used by another member", index
            )
        entries[entry.name] = entry
    return entries


def _toml_string(value: str) -> str:
    """Quote ``value`` as a TOML basic string, escaping what TOML requires."""
    escaped: list[str] = []
    for char in value:
        if char == '"':
            escaped.append('\\"')
        elif char == "\\":
            escaped.append("\\\\")
        elif char == "\n":
            escaped.append("\\n")
        elif char == "\t":
            escaped.append("\\t")
        elif char == "\r":
            escaped.append("\\r")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04X}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def save_federation(path: Path, entries: Mapping[str, PeerEntry] | Iterable[PeerEntry]) -> None:
    """Write the federation file, replacing it atomically.

    Args:
        path: Where to write the TOML file.
        entries: The members, as a list or as the mapping that
            :func:`load_federation` returns; they are written in order.

    Raises:
        ValueError: Two entries have the same name.
    """
    values = list(entries.values()) if isinstance(entries, Mapping) else list(entries)
    seen: set[str] = set()
    lines = [
        "# fdrtd federation: the members and their public keys.",
        "# Every member keeps the same list; a peer not listed here is refused.",
    ]
    for entry in values:
        if entry.name in seen:
            raise ValueError(f"two members are named {entry.name!r}; names must be unique")
        seen.add(entry.name)
        lines.append("")
        lines.append("[[member]]")
        lines.extend(f"{key} = {_toml_string(value)}" for key, value in entry.to_dict().items())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the federation file holds public keys only; let everyone read it
    write_atomic(path, "\n".join(lines) + "\n", mode=0o644)


def add_member(path: Path, entry: PeerEntry) -> None:
    """Add a member to the federation file, or replace the member of that name.

    A replaced member keeps its position; a new one is appended. The file is
    created if it does not exist.

    Args:
        path: The federation file.
        entry: The member to add.

    Raises:
        FederationFileError: The existing file is invalid.
    """
    path = Path(path)
    members = load_federation(path) if path.exists() else {}
    members[entry.name] = entry
    save_federation(path, members)
