"""End-to-end protected peer messages: sealed by one member, opened by another.

Servers of different parties exchange protocol messages (shares, masked
values, ciphertexts) through each other's peer gateway. TLS alone is not
enough: a gateway relays messages onto its own bus, and a message must be
bound to the member that wrote it, the member it is for, and the session and
step of the protocol it belongs to (invariant 4). An *envelope* does that.

Wire format (msgpack)::

    {"h": header_bytes, "c": ciphertext, "s": signature}

    header = {"v": 1, "from": sender, "to": receiver, "session": ..., "seq": ...,
              "tag": ..., "ts": unix seconds (float), "nonce": 12 random bytes}

Sealing:

1. ``header_bytes`` is the msgpack encoding of the header, keys in the order
   above. It is sent verbatim, so the receiver authenticates exactly the
   bytes that were signed; no re-encoding is ever compared.
2. ``key = HKDF-SHA256(X25519(own box key, peer box public),
   info = b"fdrtd peer v1" || 0x00 || name_lo || 0x00 || name_hi)``, where
   ``name_lo <= name_hi`` are the two member names sorted. Both directions
   of a pair share this static key: nonces are 96 random bits, so a repeat
   is negligible (birthday bound ~2**48 messages per pair). The direction is
   bound by the AAD instead, because the header holds ``from`` and ``to``.
3. ``ciphertext = ChaCha20-Poly1305(key).encrypt(nonce, payload, aad=header_bytes)``.
4. ``signature = Ed25519(sender sign key, b"fdrtd peer v1 sig" || 0x00 ||
   len(header_bytes) as 4 bytes big-endian || header_bytes ||
   SHA-256(ciphertext))``. The domain prefix keeps these signatures from
   being valid in any other use of the key; the length prefix fixes the
   header/ciphertext boundary. Signing the ciphertext's SHA-256 rather than
   the ciphertext itself is as strong (SHA-256 is collision resistant) and
   several times faster for megabyte messages: Ed25519 hashes what it signs
   twice with SHA-512, which has no hardware help here, while SHA-256 has.

Keys are made, stored and used to sign by the ``cryptography`` package
(:mod:`fdrtd_server.identity`). Signatures are *verified* by libsodium
(PyNaCl's ``crypto_sign_open``, already a dependency for the PSI curve): both
implement RFC 8032, libsodium in about half the CPU of OpenSSL's Ed25519 here
(65 against 125 microseconds, and a receiving gateway verifies every peer
message), and libsodium's check is the stricter one: it also refuses
public keys of small order and non-canonical encodings.

Why both a signature and an AEAD: the pair key is known to *both* ends, so a
tag alone would let the receiver forge messages "from" the sender towards
itself, and the signature gives the receiver evidence of who wrote what.
The AEAD keeps the payload secret from the gateways and the bus in between.
A member that re-signs another member's ciphertext under its own name fails
at decryption, because the receiver then derives a different pair key.

Opening checks, in this order, and raises the first that fails:

====================  ==================  ======================================
exception             ``reason``          meaning
====================  ==================  ======================================
MalformedEnvelope     malformed           not an envelope, bad field, too big
NotAMember            not_a_member        ``from`` is not in the federation
WrongRecipient        wrong_recipient     ``to`` is not this server
BadSignature          bad_signature       not signed by the claimed sender
StaleMessage          stale               ``ts`` further than ``max_age`` away
DecryptionFailed      decryption_failed   ciphertext does not authenticate
====================  ==================  ======================================

Replays are *not* detected here, since that needs shared state: the caller
records :func:`replay_key` of every opened message (for example in a NATS KV
bucket with a TTL of at least ``2 * max_age``) and refuses a key it has seen.
Messages older than ``max_age`` are refused anyway, so the record can expire.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.bindings import crypto_sign_open
from nacl.exceptions import CryptoError

from fdrtd_server.errors import PeerRejected
from fdrtd_server.identity import NAME_PATTERN, Identity, PeerEntry

__all__ = [
    "ENVELOPE_VERSION",
    "MAX_HEADER_BYTES",
    "SESSION_PATTERN",
    "TAG_PATTERN",
    "BadSignature",
    "DecryptionFailed",
    "MalformedEnvelope",
    "NotAMember",
    "OpenedMessage",
    "PeerMessageRejected",
    "StaleMessage",
    "WrongRecipient",
    "check_addressing",
    "open_envelope",
    "replay_key",
    "seal",
]

ENVELOPE_VERSION = 1
"""Value of the header's ``v`` field; any other version is refused."""

MAX_HEADER_BYTES = 1024
"""Largest encoded header accepted; a valid header is at most about 330 bytes."""

SESSION_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""A session id: 1 to 64 letters, digits, ``_`` or ``-``."""

TAG_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
"""A message tag (protocol step): 1 to 64 letters, digits, ``_``, ``.``, ``:`` or ``-``."""

_KDF_INFO = b"fdrtd peer v1"
_SIGNATURE_DOMAIN = b"fdrtd peer v1 sig\x00"
_NONCE_BYTES = 12
_SIGNATURE_BYTES = 64
_TAG_BYTES = 16  # Poly1305 tag appended to every ciphertext
_MAX_SEQ = 2**64 - 1
_HEADER_KEYS = frozenset({"v", "from", "to", "session", "seq", "tag", "ts", "nonce"})
_OUTER_KEYS = frozenset({"h", "c", "s"})


class PeerMessageRejected(PeerRejected):
    """A peer message failed verification; subclasses say which check.

    It is a :class:`fdrtd_server.errors.PeerRejected`, so it maps to HTTP 403.
    Messages never contain payload bytes. The ``sender`` is the name the
    message *claims*; it is authenticated only from ``BadSignature`` on in the
    order of checks, so treat it as a hint in logs.

    Attributes:
        reason: A short stable code for logs, metrics and the audit trail.
        sender: The claimed sender's name, if the header could be read.
    """

    reason: ClassVar[str] = "rejected"

    def __init__(self, message: str, *, sender: str | None = None) -> None:
        super().__init__(message)
        self.sender = sender


class MalformedEnvelope(PeerMessageRejected):
    """The data is not an envelope: not msgpack, missing or bad fields, too big."""

    reason = "malformed"


class NotAMember(PeerMessageRejected):
    """The claimed sender is not a member of this server's federation."""

    reason = "not_a_member"


class WrongRecipient(PeerMessageRejected):
    """The envelope is addressed to another member."""

    reason = "wrong_recipient"


class BadSignature(PeerMessageRejected):
    """The signature does not verify with the claimed sender's public key."""

    reason = "bad_signature"


class StaleMessage(PeerMessageRejected):
    """The timestamp is further from this server's clock than allowed."""

    reason = "stale"


class DecryptionFailed(PeerMessageRejected):
    """The ciphertext does not authenticate under the pair key and header."""

    reason = "decryption_failed"


@dataclass(frozen=True)
class OpenedMessage:
    """A verified, decrypted peer message.

    Attributes:
        sender: Name of the member that signed it.
        session: Session id of the computation it belongs to.
        seq: Sender's sequence number within the session.
        tag: Protocol step or message kind.
        payload: The decrypted payload.
        ts: Sender's clock when it was sealed (unix seconds).
    """

    sender: str
    session: str
    seq: int
    tag: str
    payload: bytes
    ts: float


def _check_session(session: object) -> str:
    if not isinstance(session, str) or SESSION_PATTERN.fullmatch(session) is None:
        raise ValueError("`session` must match ^[A-Za-z0-9_-]{1,64}$")
    return session


def _check_tag(tag: object) -> str:
    if not isinstance(tag, str) or TAG_PATTERN.fullmatch(tag) is None:
        raise ValueError("`tag` must match ^[A-Za-z0-9_.:-]{1,64}$")
    return tag


def _check_seq(seq: object) -> int:
    # bool is an int subclass; True as a sequence number is a bug, not a 1.
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= _MAX_SEQ:
        raise ValueError("`seq` must be an integer from 0 to 2**64 - 1")
    return seq


@functools.lru_cache(maxsize=1024)
def _pair_cipher(own: Identity, peer_name: str, peer_box_public: bytes) -> ChaCha20Poly1305:
    """Derive (once) the AEAD for the pair ``own``/``peer_name``.

    The cache key holds the peer's public key, so a member whose key changes in
    the federation file gets a fresh derivation, never a stale key.
    """
    shared = own.exchange(peer_box_public)
    low, high = sorted((own.name, peer_name))
    info = _KDF_INFO + b"\x00" + low.encode() + b"\x00" + high.encode()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)
    return ChaCha20Poly1305(key)


def _verified(sign_public: bytes, signature: bytes, signed: bytes) -> bool:
    """Whether ``signature`` is the Ed25519 signature of ``signed`` by ``sign_public``."""
    try:
        crypto_sign_open(signature + signed, sign_public)
    except (CryptoError, TypeError, ValueError):
        return False
    return True


def _signed_bytes(header_bytes: bytes, ciphertext: bytes) -> bytes:
    digest = hashlib.sha256(ciphertext).digest()
    return _SIGNATURE_DOMAIN + len(header_bytes).to_bytes(4, "big") + header_bytes + digest


def seal(
    sender: Identity,
    receiver: PeerEntry,
    *,
    session: str,
    seq: int,
    tag: str,
    payload: bytes,
    now: float | None = None,
) -> bytes:
    """Encrypt and sign a payload for one member of the federation.

    Args:
        sender: This server's identity.
        receiver: The member the message is for.
        session: Session id of the computation (``SESSION_PATTERN``).
        seq: Sequence number, unique per sender and session; the receiver
            refuses a repeated ``(sender, session, seq)``.
        tag: Protocol step or message kind (``TAG_PATTERN``).
        payload: The bytes to protect; any size the transport allows.
        now: Timestamp to put in the header; defaults to ``time.time()``.

    Returns:
        The envelope, ready to send to the receiver's peer gateway.

    Raises:
        ValueError: ``session``, ``tag`` or ``seq`` breaks its rule, or the
            receiver's X25519 key is unusable (low order).
        TypeError: ``payload`` is not bytes.
    """
    _check_session(session)
    _check_tag(tag)
    _check_seq(seq)
    if not isinstance(payload, bytes):
        raise TypeError("`payload` must be bytes")
    timestamp = time.time() if now is None else float(now)
    if not math.isfinite(timestamp):
        raise ValueError("`now` must be a finite number of seconds")
    nonce = os.urandom(_NONCE_BYTES)
    header_bytes = msgpack.packb(
        {
            "v": ENVELOPE_VERSION,
            "from": sender.name,
            "to": receiver.name,
            "session": session,
            "seq": seq,
            "tag": tag,
            "ts": timestamp,
            "nonce": nonce,
        }
    )
    cipher = _pair_cipher(sender, receiver.name, receiver.box_public)
    ciphertext = cipher.encrypt(nonce, payload, header_bytes)
    signature = sender.sign(_signed_bytes(header_bytes, ciphertext))
    packed: bytes = msgpack.packb({"h": header_bytes, "c": ciphertext, "s": signature})
    return packed


def _parse(data: bytes) -> tuple[bytes, bytes, bytes, dict[str, Any]]:
    """Split an envelope into header bytes, ciphertext, signature and header.

    Nothing here is authenticated yet, so the decoder runs with tight limits
    and every field's type and shape is checked before use.
    """
    if not isinstance(data, bytes):
        raise MalformedEnvelope("peer message rejected: the envelope must be bytes")
    try:
        outer = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=8,
            max_array_len=0,
            max_map_len=len(_OUTER_KEYS),
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException):
        raise MalformedEnvelope("peer message rejected: not a msgpack envelope") from None
    if not isinstance(outer, dict) or outer.keys() != _OUTER_KEYS:
        raise MalformedEnvelope("peer message rejected: the envelope must be a map of h, c, s")
    header_bytes, ciphertext, signature = outer["h"], outer["c"], outer["s"]
    if not isinstance(header_bytes, bytes) or len(header_bytes) > MAX_HEADER_BYTES:
        raise MalformedEnvelope(
            f"peer message rejected: the header must be at most {MAX_HEADER_BYTES} bytes"
        )
    if not isinstance(ciphertext, bytes) or len(ciphertext) < _TAG_BYTES:
        raise MalformedEnvelope("peer message rejected: the ciphertext is missing or too short")
    if not isinstance(signature, bytes) or len(signature) != _SIGNATURE_BYTES:
        raise MalformedEnvelope(
            f"peer message rejected: the signature must be {_SIGNATURE_BYTES} bytes"
        )
    try:
        header = msgpack.unpackb(
            header_bytes,
            raw=False,
            strict_map_key=True,
            max_str_len=128,
            max_bin_len=_NONCE_BYTES,
            max_array_len=0,
            max_map_len=len(_HEADER_KEYS),
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException):
        raise MalformedEnvelope("peer message rejected: the header is not msgpack") from None
    if not isinstance(header, dict) or header.keys() != _HEADER_KEYS:
        raise MalformedEnvelope(
            "peer message rejected: the header must have exactly the fields "
            + ", ".join(sorted(_HEADER_KEYS))
        )
    _check_header(header)
    return header_bytes, ciphertext, signature, header


def _check_header(header: dict[str, Any]) -> None:
    """Check the type and rule of each header field, raising MalformedEnvelope."""
    version = header["v"]
    if not isinstance(version, int) or isinstance(version, bool) or version != ENVELOPE_VERSION:
        raise MalformedEnvelope(
            f"peer message rejected: unsupported envelope version (this server speaks "
            f"version {ENVELOPE_VERSION})"
        )
    for field in ("from", "to"):
        value = header[field]
        if not isinstance(value, str) or NAME_PATTERN.fullmatch(value) is None:
            raise MalformedEnvelope(f"peer message rejected: `{field}` is not a member name")
    try:
        _check_session(header["session"])
        _check_tag(header["tag"])
        _check_seq(header["seq"])
    except ValueError as error:
        raise MalformedEnvelope(f"peer message rejected: {error}") from None
    timestamp = header["ts"]
    if (
        not isinstance(timestamp, int | float)
        or isinstance(timestamp, bool)
        or not math.isfinite(timestamp)
    ):
        raise MalformedEnvelope("peer message rejected: `ts` must be a finite number")
    nonce = header["nonce"]
    if not isinstance(nonce, bytes) or len(nonce) != _NONCE_BYTES:
        raise MalformedEnvelope(f"peer message rejected: `nonce` must be {_NONCE_BYTES} bytes")


def check_addressing(
    members: Mapping[str, PeerEntry], me: str, sender: str, receiver: str
) -> PeerEntry:
    """The sender's federation entry, if a message from ``sender`` to ``receiver`` may reach us.

    The first checks of :func:`open_envelope`; the gateway also runs them on
    an envelope's header alone, before it reads the rest.

    Raises:
        NotAMember: ``sender`` is not in ``members``.
        WrongRecipient: ``receiver`` is not ``me``.
    """
    entry = members.get(sender)
    # A mapping whose key disagrees with the entry's own name is a bug in the
    # caller; trusting either name alone could attribute a message wrongly.
    if entry is None or entry.name != sender:
        raise NotAMember(
            f"peer message rejected: sender {sender!r} is not a member of the federation",
            sender=sender,
        )
    if receiver != me:
        raise WrongRecipient(
            f"peer message rejected: addressed to {receiver!r}, but this server is {me!r}",
            sender=sender,
        )
    return entry


def open_envelope(
    receiver: Identity,
    members: Mapping[str, PeerEntry],
    data: bytes,
    *,
    now: float | None = None,
    max_age: float = 300.0,
) -> OpenedMessage:
    """Verify and decrypt an envelope that :func:`seal` produced.

    Args:
        receiver: This server's identity.
        members: The federation, by member name (see
            :func:`fdrtd_server.identity.load_federation`).
        data: The envelope as received.
        now: This server's clock; defaults to ``time.time()``.
        max_age: Largest allowed difference, in seconds and in either
            direction, between ``now`` and the sender's timestamp. It covers
            transit time and clock skew.

    Returns:
        The verified message. The caller must still refuse replays by
        :func:`replay_key`.

    Raises:
        MalformedEnvelope: ``data`` is not a well-formed envelope.
        NotAMember: The claimed sender is not in ``members``.
        WrongRecipient: The envelope is addressed to another member.
        BadSignature: The claimed sender did not sign this header and ciphertext.
        StaleMessage: The timestamp is more than ``max_age`` seconds from ``now``.
        DecryptionFailed: The ciphertext does not decrypt under the pair key.
    """
    header_bytes, ciphertext, signature, header = _parse(data)
    sender_name: str = header["from"]
    entry = check_addressing(members, receiver.name, sender_name, header["to"])
    if not _verified(entry.sign_public, signature, _signed_bytes(header_bytes, ciphertext)):
        raise BadSignature(
            f"peer message rejected: the signature does not verify with the key of "
            f"member {sender_name!r}",
            sender=sender_name,
        )
    timestamp = float(header["ts"])
    clock = time.time() if now is None else now
    if not abs(clock - timestamp) <= max_age:
        raise StaleMessage(
            f"peer message rejected: its timestamp is {clock - timestamp:+.0f} s from this "
            f"server's clock, beyond the allowed {max_age:g} s; check both clocks (NTP)",
            sender=sender_name,
        )
    try:
        cipher = _pair_cipher(receiver, sender_name, entry.box_public)
        payload = cipher.decrypt(header["nonce"], ciphertext, header_bytes)
    except (InvalidTag, ValueError):
        raise DecryptionFailed(
            f"peer message rejected: the ciphertext from {sender_name!r} does not decrypt "
            "with the key agreed with this server",
            sender=sender_name,
        ) from None
    return OpenedMessage(
        sender=sender_name,
        session=header["session"],
        seq=header["seq"],
        tag=header["tag"],
        payload=payload,
        ts=timestamp,
    )


def replay_key(msg: OpenedMessage) -> str:
    """Return a key that identifies a message for replay detection.

    It is the hex SHA-256 of the ``(sender, session, seq)`` triple, encoded
    unambiguously, so it contains only ``[0-9a-f]`` and is a valid NATS KV key
    and subject token.

    Args:
        msg: A message returned by :func:`open_envelope`.

    Returns:
        64 lowercase hex characters.
    """
    triple = msgpack.packb([msg.sender, msg.session, msg.seq])
    return hashlib.sha256(b"fdrtd replay v1\x00" + triple).hexdigest()
