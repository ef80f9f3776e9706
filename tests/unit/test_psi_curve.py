"""Unit tests for protocols.psi.curve: the DH-PSI elliptic-curve primitives."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from nacl import bindings as sodium

from protocols.psi import curve
from protocols.psi.curve import (
    PARALLEL_THRESHOLD,
    blind,
    encode_item,
    hash_and_blind,
    hash_to_point,
    random_scalar,
    reblind,
    validate_points,
)

DOMAIN = b"fdrtd-psi-test/session-1"


@pytest.fixture(scope="module", autouse=True)
def _close_pool() -> Iterator[None]:
    yield
    curve.shutdown_pool()


def _items(n: int, prefix: str = "item") -> list[bytes]:
    return [encode_item(f"{prefix}-{i}") for i in range(n)]


def _invalid_points() -> list[bytes]:
    identity = bytes([1]) + bytes(31)  # small order: the neutral element
    # A point of order 8 (a torsion point, not in the prime-order subgroup).
    order8 = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")
    valid = hash_to_point(b"x", DOMAIN)
    # valid + order-8 point: on the curve but outside the prime-order subgroup.
    mixed = sodium.crypto_core_ed25519_add(valid, order8)
    p_plus = (2**255 - 19 + 2).to_bytes(32, "little")  # non-canonical y coordinate
    return [identity, order8, mixed, p_plus, b"\xff" * 32, valid[:31], b""]


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


# --- scalars and hashing ----------------------------------------------------------------


def test_random_scalar_is_reduced_nonzero_and_fresh() -> None:
    scalars = {random_scalar() for _ in range(50)}
    assert len(scalars) == 50
    for scalar in scalars:
        assert len(scalar) == 32
        assert scalar != bytes(32)
        assert sodium.crypto_core_ed25519_scalar_reduce(scalar + bytes(32)) == scalar


def test_hash_to_point_is_valid_deterministic_and_domain_separated() -> None:
    point = hash_to_point(b"alice", DOMAIN)
    assert len(point) == 32
    assert sodium.crypto_core_ed25519_is_valid_point(point)
    assert hash_to_point(b"alice", DOMAIN) == point
    assert hash_to_point(b"alice", b"other-domain") != point
    # The length prefix keeps (domain, item) unambiguous.
    assert hash_to_point(b"bc", b"a") != hash_to_point(b"c", b"ab")


def test_hash_to_point_matches_documented_construction() -> None:
    digest = hashlib.sha512(bytes([len(DOMAIN)]) + DOMAIN + b"alice").digest()
    expected = sodium.crypto_core_ed25519_add(
        sodium.crypto_core_ed25519_from_uniform(digest[:32]),
        sodium.crypto_core_ed25519_from_uniform(digest[32:]),
    )
    assert hash_to_point(b"alice", DOMAIN) == expected


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
    a, b = random_scalar(), random_scalar()
    items = _items(300)
    ab = reblind(hash_and_blind(items, a, DOMAIN), b)
    ba = reblind(hash_and_blind(items, b, DOMAIN), a)
    assert ab == ba
    # Blinding really changes the points, and depends on the scalar.
    assert hash_and_blind(items, a, DOMAIN) != [hash_to_point(x, DOMAIN) for x in items]
    assert hash_and_blind(items, a, DOMAIN) != hash_and_blind(items, b, DOMAIN)


def test_blind_equals_product_scalar() -> None:
    a, b = random_scalar(), random_scalar()
    point = hash_to_point(b"x", DOMAIN)
    ab = sodium.crypto_core_ed25519_scalar_mul(a, b)
    assert blind(blind([point], a), b) == blind([point], ab)


def test_hash_and_blind_equals_hash_then_blind() -> None:
    scalar = random_scalar()
    items = _items(50)
    expected = blind([hash_to_point(x, DOMAIN) for x in items], scalar)
    assert hash_and_blind(items, scalar, DOMAIN) == expected


@pytest.mark.parametrize(
    "scalar",
    [bytes(32), b"\x01" * 31, b"\xff" * 32],
    ids=["zero", "short", "unreduced"],
)
def test_bad_scalar_rejected(scalar: bytes) -> None:
    point = hash_to_point(b"x", DOMAIN)
    with pytest.raises(ValueError, match="scalar"):
        blind([point], scalar)
    with pytest.raises(ValueError, match="scalar"):
        hash_and_blind([b"x"], scalar, DOMAIN)


def test_hash_and_blind_rejects_non_bytes_item() -> None:
    with pytest.raises(TypeError, match="index 1"):
        hash_and_blind([b"a", "b"], random_scalar(), DOMAIN)  # type: ignore[list-item]


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers"):
        reblind([], random_scalar(), workers=0)


# --- validation -------------------------------------------------------------------------


def test_validate_points_accepts_valid_points() -> None:
    validate_points([hash_to_point(x, DOMAIN) for x in _items(20)])
    validate_points([])


@pytest.mark.parametrize("bad_index", range(7))
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
