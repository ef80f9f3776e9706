"""Sealed peer messages: round trips and every way an envelope must be refused."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fdrtd_server.envelope import (
    MAX_HEADER_BYTES,
    BadSignature,
    DecryptionFailed,
    MalformedEnvelope,
    NotAMember,
    OpenedMessage,
    PeerMessageRejected,
    StaleMessage,
    WrongRecipient,
    _pair_cipher,
    _signed_bytes,
    open_envelope,
    replay_key,
    seal,
)
from fdrtd_server.errors import FdrtdError, PeerRejected
from fdrtd_server.identity import Identity, PeerEntry

NOW = 1_700_000_000.0
PAYLOAD = b"secret share \x00\x01\x02" * 8


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate("alice")


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity.generate("bob")


@pytest.fixture(scope="module")
def carol() -> Identity:
    return Identity.generate("carol")


@pytest.fixture(scope="module")
def members(alice: Identity, bob: Identity, carol: Identity) -> dict[str, PeerEntry]:
    return {
        identity.name: identity.public_entry(f"https://{identity.name}.example")
        for identity in (alice, bob, carol)
    }


def seal_ab(
    alice: Identity, members: dict[str, PeerEntry], *, to: str = "bob", **overrides: Any
) -> bytes:
    arguments: dict[str, Any] = {
        "session": "sess-1",
        "seq": 7,
        "tag": "sum.share:0",
        "payload": PAYLOAD,
        "now": NOW,
    }
    arguments.update(overrides)
    return seal(alice, members[to], **arguments)


def unpack(envelope: bytes) -> tuple[dict[str, Any], bytes, bytes, bytes]:
    outer = msgpack.unpackb(envelope)
    return msgpack.unpackb(outer["h"]), outer["h"], outer["c"], outer["s"]


def repack(header: bytes, ciphertext: bytes, signature: bytes) -> bytes:
    packed: bytes = msgpack.packb({"h": header, "c": ciphertext, "s": signature})
    return packed


def flip(data: bytes, index: int = -1) -> bytes:
    mutable = bytearray(data)
    mutable[index] ^= 0x01
    return bytes(mutable)


# --- round trips ---------------------------------------------------------------------


def test_round_trip(alice: Identity, bob: Identity, members: dict[str, PeerEntry]) -> None:
    envelope = seal_ab(alice, members)
    message = open_envelope(bob, members, envelope, now=NOW + 1)
    assert message == OpenedMessage(
        sender="alice", session="sess-1", seq=7, tag="sum.share:0", payload=PAYLOAD, ts=NOW
    )
    assert PAYLOAD not in envelope  # the payload travels encrypted


def test_both_directions_and_empty_payload(
    alice: Identity, bob: Identity, members: dict[str, PeerEntry]
) -> None:
    reply = seal(bob, members["alice"], session="s", seq=0, tag="t", payload=b"")
    message = open_envelope(alice, members, reply)
    assert (message.sender, message.payload, message.seq) == ("bob", b"", 0)
    assert abs(message.ts - time.time()) < 5


def test_large_payload_and_max_seq(
    alice: Identity, bob: Identity, members: dict[str, PeerEntry]
) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    envelope = seal_ab(alice, members, payload=payload, seq=2**64 - 1)
    message = open_envelope(bob, members, envelope, now=NOW)
    assert message.payload == payload
    assert message.seq == 2**64 - 1


def test_nonce_is_fresh(alice: Identity, members: dict[str, PeerEntry]) -> None:
    first, second = seal_ab(alice, members), seal_ab(alice, members)
    assert unpack(first)[0]["nonce"] != unpack(second)[0]["nonce"]
    assert unpack(first)[2] != unpack(second)[2]


def test_header_fields(alice: Identity, members: dict[str, PeerEntry]) -> None:
    header = unpack(seal_ab(alice, members))[0]
    assert header == {
        "v": 1,
        "from": "alice",
        "to": "bob",
        "session": "sess-1",
        "seq": 7,
        "tag": "sum.share:0",
        "ts": NOW,
        "nonce": header["nonce"],
    }
    assert isinstance(header["ts"], float)
    assert len(header["nonce"]) == 12


def test_wire_format_matches_the_documented_construction(
    alice: Identity, bob: Identity, members: dict[str, PeerEntry]
) -> None:
    # Rebuild the pair key and the signed bytes from the module docstring's
    # recipe, independently of the module's helpers, and check the envelope.
    envelope = seal(alice, members["bob"], session="s", seq=1, tag="t", payload=b"m", now=NOW)
    header, header_bytes, ciphertext, signature = unpack(envelope)
    info = b"fdrtd peer v1\x00alice\x00bob"
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
        bob.exchange(alice.box_public)
    )
    assert ChaCha20Poly1305(key).decrypt(header["nonce"], ciphertext, header_bytes) == b"m"
    signed = b"fdrtd peer v1 sig\x00" + len(header_bytes).to_bytes(4, "big")
    Ed25519PublicKey.from_public_bytes(alice.sign_public).verify(
        signature, signed + header_bytes + hashlib.sha256(ciphertext).digest()
    )


# --- tampering -----------------------------------------------------------------------


def test_tampered_ciphertext(alice: Identity, bob: Identity, members: dict[str, PeerEntry]) -> None:
    _, header, ciphertext, signature = unpack(seal_ab(alice, members))
    for index in (0, len(ciphertext) // 2, -1):
        tampered = repack(header, flip(ciphertext, index), signature)
        with pytest.raises(BadSignature):
            open_envelope(bob, members, tampered, now=NOW)
    with pytest.raises(BadSignature):
        open_envelope(bob, members, repack(header, ciphertext + b"\x00", signature), now=NOW)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seq", 8),
        ("session", "sess-2"),
        ("tag", "sum.share:1"),
        ("ts", NOW + 1),
        ("nonce", b"\x00" * 12),
    ],
)
def test_tampered_header(
    alice: Identity, bob: Identity, members: dict[str, PeerEntry], field: str, value: object
) -> None:
    header, _, ciphertext, signature = unpack(seal_ab(alice, members))
    header[field] = value
    tampered = repack(msgpack.packb(header), ciphertext, signature)
    with pytest.raises(BadSignature) as info:
        open_envelope(bob, members, tampered, now=NOW)
    assert info.value.reason == "bad_signature"
    assert info.value.sender == "alice"


def test_tampered_recipient(
    alice: Identity, bob: Identity, carol: Identity, members: dict[str, PeerEntry]
) -> None:
    # Sealed for carol, readdressed to bob: the signature no longer matches.
    header, _, ciphertext, signature = unpack(seal_ab(alice, members, to="carol"))
    header["to"] = "bob"
    with pytest.raises(BadSignature):
        open_envelope(bob, members, repack(msgpack.packb(header), ciphertext, signature), now=NOW)


def test_header_reencoding_is_refused(
    alice: Identity, bob: Identity, members: dict[str, PeerEntry]
) -> None:
    # Same header values, different bytes (another key order): the signature
    # covers the bytes, so this is refused too.
    header, _, ciphertext, signature = unpack(seal_ab(alice, members))
    reordered = msgpack.packb(dict(reversed(list(header.items()))))
    with pytest.raises(BadSignature):
        open_envelope(bob, members, repack(reordered, ciphertext, signature), now=NOW)


def test_tampered_signature(alice: Identity, bob: Identity, members: dict[str, PeerEntry]) -> None:
    _, header, ciphertext, signature = unpack(seal_ab(alice, members))
    for index in (0, 31, 63):
        with pytest.raises(BadSignature):
            open_envelope(bob, members, repack(header, ciphertext, flip(signature, index)), now=NOW)
    with pytest.raises(BadSignature):
        open_envelope(bob, members, repack(header, ciphertext, bytes(64)), now=NOW)


# --- who may send, who may read ------------------------------------------------------


def test_non_member_sender(alice: Identity, bob: Identity, members: dict[str, PeerEntry]) -> None:
    mallory = Identity.generate("mallory")  # valid keys, but not in the federation
    envelope = seal(mallory, members["bob"], session="s", seq=1, tag="t", payload=b"x", now=NOW)
    with pytest.raises(NotAMember) as info:
        open_envelope(bob, members, envelope, now=NOW)
    assert info.value.reason == "not_a_member"
    assert info.value.sender == "mallory"
    assert "mallory" in str(info.value)


def test_removed_member_is_refused(
    alice: Identity, bob: Identity, members: dict[str, PeerEntry]
) -> None:
    envelope = seal_ab(alice, members)
    without_alice = {name: e for name, e in members.items() if name != "alice"}
    with pytest.raises(NotAMember):
        open_envelope(bob, without_alice, envelope, now=NOW)


def test_mapping_name_mismatch_is_not_a_member(
    alice: Identity, bob: Identity, members: dict[str, PeerEntry]
) -> None:
    # A buggy mapping that files carol's entry under "alice" must not let a
    # message claiming to be from alice verify with carol's key.
    envelope = seal_ab(alice, members)
    broken = {**members, "alice": members["carol"]}
    with pytest.raises(NotAMember):
        open_envelope(bob, broken, envelope, now=NOW)


def test_sealed_for_bob_cannot_be_opened_by_carol(
    alice: Identity, carol: Identity, members: dict[str, PeerEntry]
) -> None:
    envelope = seal_ab(alice, members)
    with pytest.raises(WrongRecipient) as info:
        open_envelope(carol, members, envelope, now=NOW)
    assert info.value.reason == "wrong_recipient"
    # Readdressing it to carol breaks the signature.
    header, _, ciphertext, signature = unpack(envelope)
    header["to"] = "carol"
    with pytest.raises(BadSignature):
        open_envelope(carol, members, repack(msgpack.packb(header), ciphertext, signature), now=NOW)
    # And carol cannot decrypt the ciphertext even if she skips every check:
    # her key with alice is not the alice-bob key.
    _, header_bytes, ciphertext, _ = unpack(envelope)
    nonce = unpack(envelope)[0]["nonce"]
    with pytest.raises(InvalidTag):
        _pair_cipher(carol, "alice", members["alice"].box_public).decrypt(
            nonce, ciphertext, header_bytes
        )


def test_reflected_message_is_refused(
    alice: Identity, bob: Identity, members: dict[str, PeerEntry]
) -> None:
    # A message from alice to bob sent back to alice is not for alice.
    with pytest.raises(WrongRecipient):
        open_envelope(alice, members, seal_ab(alice, members), now=NOW)


def test_forged_sender_name(alice: Identity, bob: Identity, members: dict[str, PeerEntry]) -> None:
    # Carol (or anyone) makes her own key pair under the name "alice".
    fake_alice = Identity.generate("alice")
    envelope = seal(fake_alice, members["bob"], session="s", seq=1, tag="t", payload=b"x", now=NOW)
    with pytest.raises(BadSignature):
        open_envelope(bob, members, envelope, now=NOW)


def test_member_cannot_reattribute_ciphertext(
    alice: Identity, bob: Identity, carol: Identity, members: dict[str, PeerEntry]
) -> None:
    # Carol, a member, intercepts alice's message to bob, rewrites `from` to
    # herself and signs it with her real key. The signature is valid, but the
    # payload was encrypted under the alice-bob key, so bob cannot decrypt it.
    header, _, ciphertext, _ = unpack(seal_ab(alice, members))
    header["from"] = "carol"
    header_bytes = msgpack.packb(header)
    signature = carol.sign(_signed_bytes(header_bytes, ciphertext))
    with pytest.raises(DecryptionFailed) as info:
        open_envelope(bob, members, repack(header_bytes, ciphertext, signature), now=NOW)
    assert info.value.reason == "decryption_failed"
    assert info.value.sender == "carol"


def test_sender_signed_garbage_ciphertext(
    alice: Identity, bob: Identity, members: dict[str, PeerEntry]
) -> None:
    _, header_bytes, ciphertext, _ = unpack(seal_ab(alice, members))
    garbage = flip(ciphertext)
    signature = alice.sign(_signed_bytes(header_bytes, garbage))
    with pytest.raises(DecryptionFailed):
        open_envelope(bob, members, repack(header_bytes, garbage, signature), now=NOW)


# --- freshness -----------------------------------------------------------------------


@pytest.mark.parametrize("skew", [300.5, -300.5, 1e9, -1e9])
def test_stale_message(
    alice: Identity, bob: Identity, members: dict[str, PeerEntry], skew: float
) -> None:
    envelope = seal_ab(alice, members)
    with pytest.raises(StaleMessage, match="NTP") as info:
        open_envelope(bob, members, envelope, now=NOW + skew)
    assert info.value.reason == "stale"


@pytest.mark.parametrize("skew", [300.0, -300.0, 0.0])
def test_fresh_at_the_limit(
    alice: Identity, bob: Identity, members: dict[str, PeerEntry], skew: float
) -> None:
    assert open_envelope(bob, members, seal_ab(alice, members), now=NOW + skew).seq == 7


def test_custom_max_age(alice: Identity, bob: Identity, members: dict[str, PeerEntry]) -> None:
    envelope = seal_ab(alice, members)
    with pytest.raises(StaleMessage):
        open_envelope(bob, members, envelope, now=NOW + 11, max_age=10)
    assert open_envelope(bob, members, envelope, now=NOW + 9, max_age=10).seq == 7


def test_stale_is_checked_after_signature(
    alice: Identity, bob: Identity, members: dict[str, PeerEntry]
) -> None:
    # An attacker cannot learn anything from the clock check with a forgery.
    _, header, ciphertext, signature = unpack(seal_ab(alice, members))
    with pytest.raises(BadSignature):
        open_envelope(bob, members, repack(header, ciphertext, flip(signature)), now=NOW + 1e6)


# --- malformed -----------------------------------------------------------------------


def _valid_parts(alice: Identity, members: dict[str, PeerEntry]) -> dict[str, Any]:
    header, _, ciphertext, signature = unpack(seal_ab(alice, members))
    return {"header": header, "c": ciphertext, "s": signature}


MUTATIONS: list[tuple[str, Callable[[dict[str, Any]], bytes]]] = [
    ("not msgpack", lambda p: b"\xc1"),
    ("empty", lambda p: b""),
    ("truncated", lambda p: repack(msgpack.packb(p["header"]), p["c"], p["s"])[:-1]),
    ("trailing data", lambda p: repack(msgpack.packb(p["header"]), p["c"], p["s"]) + b"\x00"),
    ("not a map", lambda p: msgpack.packb([1, 2, 3])),
    ("missing field", lambda p: msgpack.packb({"h": msgpack.packb(p["header"]), "c": p["c"]})),
    (
        "extra field",
        lambda p: msgpack.packb(
            {"h": msgpack.packb(p["header"]), "c": p["c"], "s": p["s"], "x": 1}
        ),
    ),
    ("header as str", lambda p: msgpack.packb({"h": "x", "c": p["c"], "s": p["s"]})),
    (
        "header too big",
        lambda p: repack(
            msgpack.packb({**p["header"], "pad": b"x" * MAX_HEADER_BYTES}), p["c"], p["s"]
        ),
    ),
    ("header not msgpack", lambda p: repack(b"\xc1", p["c"], p["s"])),
    ("header not a map", lambda p: repack(msgpack.packb(["alice"]), p["c"], p["s"])),
    ("short signature", lambda p: repack(msgpack.packb(p["header"]), p["c"], p["s"][:63])),
    ("short ciphertext", lambda p: repack(msgpack.packb(p["header"]), b"x" * 15, p["s"])),
]


def _header_mutation(field: str, value: object) -> Callable[[dict[str, Any]], bytes]:
    def mutate(parts: dict[str, Any]) -> bytes:
        header = dict(parts["header"])
        if value is KeyError:
            del header[field]
        else:
            header[field] = value
        return repack(msgpack.packb(header), parts["c"], parts["s"])

    return mutate


HEADER_MUTATIONS = [
    ("v", 2),
    ("v", True),
    ("v", KeyError),
    ("from", "Alice"),
    ("from", b"alice"),
    ("to", 5),
    ("session", "bad session"),
    ("session", "x" * 65),
    ("tag", ""),
    ("tag", "a/b"),
    ("seq", -1),
    ("seq", 1.0),
    ("seq", True),
    ("ts", float("nan")),
    ("ts", float("inf")),
    ("ts", "1700000000"),
    ("nonce", b"\x00" * 11),
    ("nonce", "x" * 12),
    ("extra", 1),
]


@pytest.mark.parametrize(
    "mutate",
    [m for _, m in MUTATIONS] + [_header_mutation(f, v) for f, v in HEADER_MUTATIONS],
    ids=[name for name, _ in MUTATIONS] + [f"header {f}={v!r}"[:40] for f, v in HEADER_MUTATIONS],
)
def test_malformed(
    alice: Identity,
    bob: Identity,
    members: dict[str, PeerEntry],
    mutate: Callable[[dict[str, Any]], bytes],
) -> None:
    data = mutate(_valid_parts(alice, members))
    with pytest.raises(MalformedEnvelope) as info:
        open_envelope(bob, members, data, now=NOW)
    assert info.value.reason == "malformed"


def test_non_bytes_data(bob: Identity, members: dict[str, PeerEntry]) -> None:
    with pytest.raises(MalformedEnvelope):
        open_envelope(bob, members, "text", now=NOW)  # type: ignore[arg-type]


def test_ext_types_and_deep_nesting_are_malformed(
    bob: Identity, members: dict[str, PeerEntry]
) -> None:
    ext = msgpack.packb(msgpack.ExtType(5, b"x" * 100))
    deep = b"\x91" * 100_000 + b"\xc0"  # 100k nested one-element arrays
    for data in (ext, deep):
        with pytest.raises(MalformedEnvelope):
            open_envelope(bob, members, data, now=NOW)


# --- sealing arguments ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"session": ""}, "`session`"),
        ({"session": "a b"}, "`session`"),
        ({"session": "s" * 65}, "`session`"),
        ({"session": "s.1"}, "`session`"),
        ({"tag": ""}, "`tag`"),
        ({"tag": "a/b"}, "`tag`"),
        ({"tag": "t" * 65}, "`tag`"),
        ({"seq": -1}, "`seq`"),
        ({"seq": 2**64}, "`seq`"),
        ({"seq": True}, "`seq`"),
        ({"seq": 1.0}, "`seq`"),
        ({"now": float("nan")}, "`now`"),
    ],
)
def test_seal_validates(
    alice: Identity, members: dict[str, PeerEntry], overrides: dict[str, Any], pattern: str
) -> None:
    with pytest.raises(ValueError, match=pattern):
        seal_ab(alice, members, **overrides)


def test_seal_requires_bytes(alice: Identity, members: dict[str, PeerEntry]) -> None:
    with pytest.raises(TypeError, match="`payload`"):
        seal_ab(alice, members, payload="text")


# --- errors --------------------------------------------------------------------------


def test_exception_tree_and_reasons() -> None:
    classes = [
        MalformedEnvelope,
        NotAMember,
        WrongRecipient,
        BadSignature,
        StaleMessage,
        DecryptionFailed,
    ]
    reasons = [cls.reason for cls in classes]
    assert len(set(reasons)) == len(classes)
    for cls in classes:
        assert issubclass(cls, PeerMessageRejected)
        assert issubclass(cls, PeerRejected)
        assert issubclass(cls, FdrtdError)
        assert cls("m").status == 403
        assert re.fullmatch(r"[a-z_]+", cls.reason)


def test_errors_never_echo_payload(
    alice: Identity, bob: Identity, carol: Identity, members: dict[str, PeerEntry]
) -> None:
    marker = b"PRIVATE-MARKER-1234"
    envelope = seal_ab(alice, members, payload=marker)
    _, header, ciphertext, signature = unpack(envelope)
    attempts: list[tuple[Identity, bytes, float]] = [
        (carol, envelope, NOW),
        (bob, envelope, NOW + 1e4),
        (bob, repack(header, flip(ciphertext), signature), NOW),
    ]
    for receiver, data, now in attempts:
        with pytest.raises(PeerMessageRejected) as info:
            open_envelope(receiver, members, data, now=now)
        text = str(info.value) + repr(info.value)
        assert "PRIVATE-MARKER" not in text
        assert ciphertext.hex()[:16] not in text


# --- replay keys ---------------------------------------------------------------------


def test_replay_key() -> None:
    message = OpenedMessage("alice", "sess-1", 7, "t", b"", NOW)
    key = replay_key(message)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    # Independent of tag, payload and timestamp: a replay with another
    # timestamp is still the same message.
    assert replay_key(OpenedMessage("alice", "sess-1", 7, "u", b"x", NOW + 9)) == key
    others = [
        OpenedMessage("alice", "sess-1", 8, "t", b"", NOW),
        OpenedMessage("alice", "sess-2", 7, "t", b"", NOW),
        OpenedMessage("bob", "sess-1", 7, "t", b"", NOW),
        # The triple is encoded with lengths: ("sess-1", 7) and ("sess-17", 7)
        # would collide if the fields were simply concatenated as text.
        OpenedMessage("alice", "sess-17", 7, "t", b"", NOW),
        OpenedMessage("alice", "sess-1", 77, "t", b"", NOW),
    ]
    assert len({replay_key(m) for m in others} | {key}) == len(others) + 1


def test_replayed_envelope_has_same_key(
    alice: Identity, bob: Identity, members: dict[str, PeerEntry]
) -> None:
    envelope = seal_ab(alice, members)
    first = open_envelope(bob, members, envelope, now=NOW)
    again = open_envelope(bob, members, envelope, now=NOW + 5)
    assert replay_key(first) == replay_key(again)
