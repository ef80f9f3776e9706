"""Unit tests for fdrtd_server.sdk.curve: the DH-PSI and mix-net primitives on Curve25519."""

from __future__ import annotations

import hashlib
import secrets
from collections import Counter
from collections.abc import Iterator

import pytest
from nacl import bindings as sodium

from fdrtd_server.sdk import curve
from fdrtd_server.sdk.curve import (
    ONION_LAYER_BYTES,
    PARALLEL_THRESHOLD,
    blind,
    decode_item,
    encode_item,
    hash_and_blind,
    hash_to_point,
    pad_item,
    peel_onions,
    random_scalar,
    reblind,
    seal_onions,
    unpad_item,
    validate_points,
)
from protocols.psi.service import secret_shuffle

DOMAIN = b"fdrtd-psi-test/session-1"


@pytest.fixture(scope="module", autouse=True)
def _close_pool() -> Iterator[None]:
    yield
    curve.shutdown_pool()


def _items(n: int, prefix: str = "item") -> list[bytes]:
    return [encode_item(f"{prefix}-{i}") for i in range(n)]


_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_ORDER8 = (
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
)


def _u(value: int) -> bytes:
    return value.to_bytes(32, "little")


def _invalid_points() -> list[bytes]:
    return [
        _u(0),  # order 2
        _u(1),  # order 4
        _u(_P - 1),  # order 4
        _u(_ORDER8[0]),  # order 8
        _u(_ORDER8[1]),  # order 8
        _u(_P + 4),  # non-canonical spelling of u = 4 (which is on the curve)
        _u(_P),  # non-canonical spelling of u = 0
        b"\xff" * 32,  # top bit set
        hash_to_point(b"x", DOMAIN)[:31],  # short
        b"",
    ]


# --- public API -------------------------------------------------------------------------


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(curve).items()
        if not name.startswith("_")
        and getattr(value, "__module__", curve.__name__) == curve.__name__
        and (callable(value) or name.isupper())
    }
    assert set(curve.__all__) == public


# --- encode_item --------------------------------------------------------------------------


def test_encode_item_distinguishes_types() -> None:
    encodings = [encode_item(1), encode_item("1"), encode_item(1.0), encode_item(b"1")]
    assert len(set(encodings)) == 4


def test_encode_item_is_deterministic_and_injective_within_a_type() -> None:
    assert encode_item("abc") == encode_item("abc")
    assert encode_item("abc") != encode_item("abd")
    assert encode_item(-5) != encode_item(5)
    assert encode_item(2**100) != encode_item(2**100 + 1)
    assert encode_item(0.1) != encode_item(0.1 + 2**-56)
    assert encode_item(b"") != encode_item("")


def test_encode_item_exact_format() -> None:
    assert encode_item(b"\x00\xff") == b"b\x00\xff"
    assert encode_item("é") == b"s\xc3\xa9"
    assert encode_item(-42) == b"i-42"
    assert encode_item(1.5) == b"f" + bytes.fromhex("3ff8000000000000")


def test_encode_item_negative_zero_equals_zero() -> None:
    assert encode_item(-0.0) == encode_item(0.0)


def test_encode_item_rejects_bool_nan_and_other_types() -> None:
    with pytest.raises(TypeError, match="bool"):
        encode_item(True)
    with pytest.raises(ValueError, match="NaN"):
        encode_item(float("nan"))
    with pytest.raises(TypeError, match="list"):
        encode_item([1])  # type: ignore[arg-type]


# --- decode_item and padding ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "é", "1", 0, -42, 2**70, 1.5, -0.5, float("inf"), b"\x00"])
def test_decode_item_inverts_encode_item(value: object) -> None:
    decoded = decode_item(encode_item(value))  # type: ignore[arg-type]
    assert decoded == value
    assert type(decoded) is type(value)


@pytest.mark.parametrize(
    "encoded",
    [
        b"",
        b"x1",
        b"s\xff",
        b"i",
        b"i01",
        b"i-0",
        b"i+1",
        b"i1.0",
        b"f\x00",
        b"f" + b"\x80" + bytes(7),
    ],
    ids=[
        "empty",
        "tag",
        "utf8",
        "no-digits",
        "leading-zero",
        "minus-zero",
        "plus",
        "dot",
        "short-float",
        "negative-zero-float",
    ],
)
def test_decode_item_refuses_non_canonical(encoded: bytes) -> None:
    with pytest.raises(ValueError, match="item"):
        decode_item(encoded)


def test_pad_and_unpad() -> None:
    assert pad_item(b"ab", 5) == b"ab\x80\x00\x00"
    assert unpad_item(pad_item(b"a\x00", 16)) == b"a\x00"
    assert unpad_item(pad_item(b"", 1)) == b""
    with pytest.raises(ValueError, match="does not fit"):
        pad_item(b"abcd", 4)
    with pytest.raises(ValueError, match="padding mark"):
        unpad_item(b"ab\x00\x00")


# --- scalars and hashing ----------------------------------------------------------------


def test_random_scalar_is_clamped_and_fresh() -> None:
    scalars = {random_scalar() for _ in range(50)}
    assert len(scalars) == 50
    for scalar in scalars:
        assert len(scalar) == 32
        assert scalar[0] & 7 == 0
        assert scalar[31] & 0xC0 == 0x40


def test_hash_to_point_is_valid_deterministic_and_domain_separated() -> None:
    point = hash_to_point(b"alice", DOMAIN)
    assert len(point) == 32
    validate_points([point])
    assert hash_to_point(b"alice", DOMAIN) == point
    assert hash_to_point(b"alice", b"other-domain") != point
    # The length prefix keeps (domain, item) unambiguous.
    assert hash_to_point(b"bc", b"a") != hash_to_point(b"c", b"ab")


def _libsodium_h(item: bytes, domain: bytes = DOMAIN) -> bytes:
    """H(item) = from_uniform(SHA-512(prefix || item)[:32]) in Edwards form, by libsodium."""
    digest = hashlib.sha512(bytes([len(domain)]) + domain + item).digest()
    return sodium.crypto_core_ed25519_from_uniform(digest[:32])


def _times(k: int, edwards: bytes) -> bytes:
    """u([k mod L] P) for an Edwards point P of the prime-order group, by libsodium."""
    scalar = (k % _L).to_bytes(32, "little")
    return sodium.crypto_sign_ed25519_pk_to_curve25519(
        sodium.crypto_scalarmult_ed25519_noclamp(scalar, edwards)
    )


def _edwards(y: int, x_sign: int = 0) -> bytes:
    """A compressed Edwards encoding with the given y and sign bit (not checked to be a point)."""
    return (y | x_sign << 255).to_bytes(32, "little")


def test_hash_matches_libsodium_from_uniform_and_pk_to_curve25519() -> None:
    items = [b"alice", b"", b"x" * 1000, encode_item(42), *_items(300)]
    edwards = [_libsodium_h(item) for item in items]
    expected = [sodium.crypto_sign_ed25519_pk_to_curve25519(e) for e in edwards]
    # Both signs of x occur, so the sign bit really is ignored by the map.
    assert {e[31] >> 7 for e in edwards} == {0, 1}
    assert [hash_to_point(item, DOMAIN) for item in items] == expected
    # The batch (one inversion for the whole list) gives the same as one at a time.
    assert curve._hash_to_points(items, bytes([len(DOMAIN)]) + DOMAIN, 0) == expected
    assert hash_to_point(b"alice", b"other") == sodium.crypto_sign_ed25519_pk_to_curve25519(
        _libsodium_h(b"alice", b"other")
    )


def test_edwards_to_u_matches_libsodium_on_random_points() -> None:
    # Points of the prime-order group that do not come from from_uniform: [k]B.
    scalars = [secrets.randbelow(_L - 1) + 1 for _ in range(500)] + [1, 2, 3, _L - 1]
    points = [sodium.crypto_scalarmult_ed25519_base_noclamp(_u(k)) for k in scalars]
    expected = [sodium.crypto_sign_ed25519_pk_to_curve25519(p) for p in points]
    assert curve._edwards_to_u(points, 0) == expected
    assert curve._edwards_to_u([], 0) == []


def test_blind_of_hash_equals_edwards_scalar_multiplication() -> None:
    # X25519 and crypto_scalarmult_ed25519 clamp the scalar alike, and H(x) is
    # already in the prime-order group, so blinding is plain [c(a)] H(x).
    scalar = random_scalar()
    for item in (b"alice", b"", b"x" * 1000, encode_item(42), *_items(50)):
        edwards = _libsodium_h(item)
        assert sodium.crypto_core_ed25519_is_valid_point(edwards)  # in the prime-order group
        expected = sodium.crypto_sign_ed25519_pk_to_curve25519(
            sodium.crypto_scalarmult_ed25519(scalar, edwards)
        )
        assert expected == _times(int.from_bytes(scalar, "little"), edwards)
        assert blind([hash_to_point(item, DOMAIN)], scalar) == [expected]
        assert hash_and_blind([item], scalar, DOMAIN) == [expected]


@pytest.mark.parametrize(
    ("y", "x_sign"),
    [(1, 0), (1, 1), (0, 0), (_P - 1, 0)],
    ids=["identity", "identity-sign", "order-4", "order-2"],
)
def test_edwards_to_u_refuses_identity_and_small_order_by_index(y: int, x_sign: int) -> None:
    good = [_libsodium_h(item) for item in _items(3)]
    with pytest.raises(ValueError, match="item at index 12 hashed to the identity") as e:
        curve._edwards_to_u([*good[:2], _edwards(y, x_sign), good[2]], 10)
    assert "use another domain" in str(e.value)


def test_hash_and_blind_names_the_item_that_hashed_to_the_identity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = sodium.crypto_core_ed25519_from_uniform
    bad = hashlib.sha512(bytes([len(DOMAIN)]) + DOMAIN + b"bad").digest()[:32]

    def from_uniform(r: bytes) -> bytes:
        return _edwards(1) if r == bad else real(r)

    monkeypatch.setattr(curve, "_from_uniform_for_thread", lambda: from_uniform)
    with pytest.raises(ValueError, match="item at index 3 hashed to the identity"):
        hash_and_blind([b"a", b"b", b"c", b"bad", b"d"], random_scalar(), DOMAIN, workers=1)
    with pytest.raises(ValueError, match="item at index 0 hashed to the identity"):
        hash_to_point(b"bad", DOMAIN)
    assert hash_to_point(b"a", DOMAIN) == sodium.crypto_sign_ed25519_pk_to_curve25519(
        _libsodium_h(b"a")
    )


def test_the_direct_from_uniform_is_libsodiums() -> None:
    function = curve._from_uniform_function()
    for item in _items(200):
        uniform = hashlib.sha512(item).digest()[:32]
        assert function(uniform) == sodium.crypto_core_ed25519_from_uniform(uniform)


def test_different_items_give_different_points() -> None:
    items = _items(2000)
    points = [hash_to_point(item, DOMAIN) for item in items]
    assert len(set(points)) == len(items)
    scalar = random_scalar()
    assert len(set(hash_and_blind(items, scalar, DOMAIN, workers=1))) == len(items)


@pytest.mark.parametrize("domain", [b"", b"x" * 256])
def test_hash_to_point_rejects_bad_domain(domain: bytes) -> None:
    with pytest.raises(ValueError, match="domain"):
        hash_to_point(b"a", domain)


# --- blinding ---------------------------------------------------------------------------


def test_blinding_commutes_for_many_items() -> None:
    a, b, c = random_scalar(), random_scalar(), random_scalar()
    items = _items(300)
    ab = reblind(hash_and_blind(items, a, DOMAIN), b)
    ba = reblind(hash_and_blind(items, b, DOMAIN), a)
    assert ab == ba
    assert reblind(ab, c) == reblind(reblind(hash_and_blind(items, c, DOMAIN), b), a)
    # Blinding really changes the points, and depends on the scalar.
    assert hash_and_blind(items, a, DOMAIN) != [hash_to_point(x, DOMAIN) for x in items]
    assert hash_and_blind(items, a, DOMAIN) != hash_and_blind(items, b, DOMAIN)
    validate_points(ab)  # blinded points stay on the curve, canonical


def test_blind_equals_product_of_clamped_scalars() -> None:
    a, b = random_scalar(), random_scalar()
    # X25519 clamps; random_scalar already returns the clamped integer.
    product = int.from_bytes(a, "little") * int.from_bytes(b, "little")
    expected = _times(product, _libsodium_h(b"x"))
    assert blind(blind([hash_to_point(b"x", DOMAIN)], a), b) == [expected]


def test_hash_and_blind_equals_hash_then_blind() -> None:
    scalar = random_scalar()
    items = _items(50)
    expected = blind([hash_to_point(x, DOMAIN) for x in items], scalar)
    assert hash_and_blind(items, scalar, DOMAIN) == expected


@pytest.mark.parametrize(
    "scalar",
    [
        b"\x40" * 31,
        bytes(31) + b"\x40" + b"\x00",
        b"\x01" + bytes(30) + b"\x40",
        bytes(31) + b"\xc0",
        bytes(32),
    ],
    ids=["short", "long", "low-bits", "top-bit", "bit-254-clear"],
)
def test_bad_scalar_rejected(scalar: bytes) -> None:
    point = hash_to_point(b"x", DOMAIN)
    with pytest.raises(ValueError, match="scalar"):
        blind([point], scalar)
    with pytest.raises(ValueError, match="scalar"):
        hash_and_blind([b"x"], scalar, DOMAIN)
    with pytest.raises(ValueError, match="scalar"):
        reblind([point], scalar)


def test_x25519_reports_a_zero_result() -> None:
    x25519 = curve._x25519_for_thread()
    assert x25519(random_scalar(), _u(0)) is None  # small order: libsodium refuses
    point = hash_to_point(b"x", DOMAIN)
    scalar = random_scalar()
    assert x25519(scalar, point) == sodium.crypto_scalarmult(scalar, point)


def test_hash_and_blind_rejects_non_bytes_item() -> None:
    with pytest.raises(TypeError, match="index 1"):
        hash_and_blind([b"a", "b"], random_scalar(), DOMAIN)  # type: ignore[list-item]


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers"):
        reblind([], random_scalar(), workers=0)


# --- validation -------------------------------------------------------------------------


def test_validate_points_accepts_valid_points() -> None:
    validate_points([hash_to_point(x, DOMAIN) for x in _items(20)])
    validate_points([_u(4), _u(9)])  # on the curve (9 is the X25519 base point)
    validate_points([])


@pytest.mark.parametrize("bad_index", range(len(_invalid_points())))
def test_invalid_points_rejected_by_index_without_echo(bad_index: int) -> None:
    bad = _invalid_points()[bad_index]
    good = [hash_to_point(x, DOMAIN) for x in _items(3)]
    points = [*good[:2], bad, good[2]]
    for check in (
        lambda: validate_points(points),
        lambda: blind(points, random_scalar()),
        lambda: reblind(points, random_scalar(), workers=1),
    ):
        with pytest.raises(ValueError, match="point at index 2 is not a valid curve point") as e:
            check()
        message = str(e.value)
        if bad:
            assert bad.hex() not in message
            assert repr(bad) not in message


def test_validate_points_rejects_non_bytes() -> None:
    with pytest.raises(ValueError, match="index 0"):
        validate_points(["00" * 32])  # type: ignore[list-item]


# --- onions -------------------------------------------------------------------------------


def test_onions_peel_in_order_to_the_padded_items() -> None:
    keys = [sodium.crypto_box_keypair() for _ in range(3)]
    items = [pad_item(encode_item(f"item-{i}"), 32) for i in range(20)]
    onions = seal_onions(items, [public for public, _ in keys])
    assert {len(onion) for onion in onions} == {32 + 3 * ONION_LAYER_BYTES}
    assert len(set(onions)) == len(onions)
    for _, secret in keys:
        onions = peel_onions(onions, secret)
    assert onions == items
    # Sealing is randomised: the same item gives a different onion each time.
    assert seal_onions(items[:1], [keys[0][0]]) != seal_onions(items[:1], [keys[0][0]])


def test_onions_refuse_wrong_key_tampering_and_bad_keys() -> None:
    (public, secret), (_, other) = sodium.crypto_box_keypair(), sodium.crypto_box_keypair()
    onions = seal_onions([b"a" * 16, b"b" * 16], [public])
    with pytest.raises(ValueError, match="onion at index 0 does not decrypt"):
        peel_onions(onions, other)
    tampered = onions[1][:-1] + bytes([onions[1][-1] ^ 1])
    with pytest.raises(ValueError, match="onion at index 1 does not decrypt"):
        peel_onions([onions[0], tampered], secret)
    with pytest.raises(ValueError, match="onion at index 1 does not decrypt"):
        peel_onions([onions[0], b"short"], secret)
    with pytest.raises(ValueError, match="public key at index 1"):
        seal_onions([b"a"], [public, _u(0)])
    with pytest.raises(ValueError, match="private key"):
        peel_onions(onions, b"short")


# --- parallel path ----------------------------------------------------------------------


def test_parallel_path_matches_sequential() -> None:
    n = PARALLEL_THRESHOLD + 1234  # above the threshold, not a multiple of the chunk size
    items = _items(n)
    a, b = random_scalar(), random_scalar()
    sequential = hash_and_blind(items, a, DOMAIN, workers=1)
    parallel = hash_and_blind(items, a, DOMAIN, workers=2)
    assert parallel == sequential
    assert reblind(parallel, b, workers=2) == reblind(sequential, b, workers=1)
    assert len(curve._pools) >= 1  # the pool really was used


def test_parallel_reblind_reports_global_index() -> None:
    n = PARALLEL_THRESHOLD + 10
    scalar = random_scalar()
    points = hash_and_blind(_items(n), scalar, DOMAIN, workers=1)
    points[n - 3] = b"\xff" * 32
    with pytest.raises(ValueError, match=f"point at index {n - 3} is not"):
        reblind(points, scalar, workers=2)


def test_parallel_validation_and_onions() -> None:
    n = PARALLEL_THRESHOLD + 7
    points = [hash_to_point(x, DOMAIN) for x in _items(n)]
    validate_points(points, workers=2)
    points[n - 1] = _u(_P)  # the non-canonical spelling of u = 0
    with pytest.raises(ValueError, match=f"point at index {n - 1} is not"):
        validate_points(points, workers=2)
    public, secret = sodium.crypto_box_keypair()
    items = [pad_item(x, 32) for x in _items(n)]
    onions = seal_onions(items, [public], workers=2)
    assert peel_onions(onions, secret, workers=2) == items


def test_shutdown_pool_is_idempotent_and_pool_restarts() -> None:
    curve.shutdown_pool()
    curve.shutdown_pool()
    assert curve._pools == {}
    items = _items(PARALLEL_THRESHOLD)
    scalar = random_scalar()
    assert hash_and_blind(items, scalar, DOMAIN, workers=2) == hash_and_blind(
        items, scalar, DOMAIN, workers=1
    )


# --- end to end -------------------------------------------------------------------------


def _two_party_psi(set_a: list[object], set_b: list[object]) -> set[object]:
    """Run DH-PSI between A and B in pure functions; return what A learns."""
    a, b = random_scalar(), random_scalar()
    enc_a = [encode_item(x) for x in set_a]  # type: ignore[arg-type]
    enc_b = [encode_item(y) for y in set_b]  # type: ignore[arg-type]
    # Round 1: each party blinds its own set and sends it.
    msg_a = hash_and_blind(enc_a, a, DOMAIN)
    msg_b = hash_and_blind(enc_b, b, DOMAIN)
    # Round 2: each validates and reblinds what it received; B returns A's set.
    validate_points(msg_a)
    validate_points(msg_b)
    a_double_from_b = reblind(msg_a, b)  # H(x)^a^b, in A's order
    b_double = set(reblind(msg_b, a))  # H(y)^b^a
    # A matches by position in its own list.
    return {x for x, p in zip(set_a, a_double_from_b, strict=True) if p in b_double}


def test_two_party_psi_recovers_exactly_the_intersection() -> None:
    set_a: list[object] = ["alice", "bob", "carol", 1, 2.5, b"raw", "1", 10**30]
    set_b: list[object] = ["bob", "dave", "carol", 1.0, 2.5, b"raw", 1, "eve", 10**30 + 1]
    # 1 matches 1, not 1.0; "1" matches nothing in B.
    assert _two_party_psi(set_a, set_b) == {"bob", "carol", 1, 2.5, b"raw"}


def test_two_party_psi_disjoint_and_identical_sets() -> None:
    set_a: list[object] = [f"a{i}" for i in range(100)]
    set_b: list[object] = [f"b{i}" for i in range(100)]
    assert _two_party_psi(set_a, set_b) == set()
    assert _two_party_psi(set_a, list(set_a)) == set(set_a)


# --- the service's secret shuffle --------------------------------------------------------


def test_secret_shuffle_is_a_uniform_permutation() -> None:
    items = list(range(1000))
    shuffled = secret_shuffle(items)
    assert sorted(shuffled) == items and shuffled != items and items == list(range(1000))
    assert secret_shuffle([]) == [] and secret_shuffle(["x"]) == ["x"]
    # each of the 6 orders of 3 items about 1000 times in 6000 (sd 29; 7 sd allowed)
    orders = Counter(tuple(secret_shuffle(["a", "b", "c"])) for _ in range(6000))
    assert len(orders) == 6
    assert all(800 < count < 1200 for count in orders.values()), orders
