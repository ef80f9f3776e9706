"""Unit tests for fdrtd_server.sdk.ring: fixed point, PRG, shares, big ring, order keys."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fdrtd_server.sdk import ring

TWO_64 = 1 << 64
TWO_256 = 1 << 256


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


# --- fixed point -----------------------------------------------------------------------


def test_constants() -> None:
    assert ring.RING_BITS == 64
    assert ring.DEFAULT_FRAC_BITS == 20
    assert ring.BIG_RING_BITS == 256
    assert ring.BIG_FRAC_BITS == 64
    assert issubclass(ring.FixedPointOverflow, OverflowError)


def test_encode_fixed_exact_values() -> None:
    encoded = ring.encode_fixed(np.array([1.0, -1.0, 0.0, -0.0, 2.5, 2.0**-20]), parties=2)
    assert encoded.dtype == np.uint64
    assert encoded.tolist() == [2**20, TWO_64 - 2**20, 0, 0, 5 * 2**19, 1]


def test_encode_fixed_rounds_half_to_even() -> None:
    half_step = 2.0**-21
    encoded = ring.encode_fixed(np.array([half_step, 3 * half_step, -half_step]), parties=1)
    assert encoded.tolist() == [0, 2, 0]


def test_fixed_round_trip_precision(rng: np.random.Generator) -> None:
    values = rng.normal(0.0, 1000.0, size=10_000)
    decoded = ring.decode_fixed(ring.encode_fixed(values, parties=5))
    assert decoded.dtype == np.float64
    assert decoded.shape == values.shape
    assert np.max(np.abs(decoded - values)) <= 2.0**-21
    assert np.max(np.abs(decoded - values)) > 0.0  # the grid really is 2^-20


def test_fixed_other_frac_bits(rng: np.random.Generator) -> None:
    values = rng.uniform(-1.0, 1.0, size=100)
    for frac_bits in (0, 8, 40):
        decoded = ring.decode_fixed(
            ring.encode_fixed(values, frac_bits=frac_bits, parties=2), frac_bits=frac_bits
        )
        assert np.max(np.abs(decoded - values)) <= 2.0 ** -(frac_bits + 1)


def test_fixed_keeps_shape() -> None:
    matrix = np.arange(6.0).reshape(2, 3) - 2.5
    encoded = ring.encode_fixed(matrix, parties=3)
    assert encoded.shape == (2, 3)
    np.testing.assert_array_equal(ring.decode_fixed(encoded), matrix)
    scalar = ring.encode_fixed(-4.25, parties=3)
    assert isinstance(scalar, np.ndarray)
    assert scalar.shape == ()
    assert float(ring.decode_fixed(scalar)) == -4.25


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_encode_fixed_rejects_non_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="NaN or infinity"):
        ring.encode_fixed(np.array([1.0, bad]), parties=2)


def test_encode_fixed_overflow_boundary() -> None:
    # With 1024 parties the largest allowed integer is 2^53 - 1, exact in float64.
    largest = float(2**53 - 1) / 2**20
    ring.encode_fixed(np.array([largest, -largest]), parties=1024)
    with pytest.raises(ring.FixedPointOverflow):
        ring.encode_fixed(np.array([0.0, 2.0**53 / 2**20]), parties=1024)
    with pytest.raises(ring.FixedPointOverflow):
        ring.encode_fixed(np.array([-(2.0**53) / 2**20]), parties=1024)
    assert ring.max_encodable(parties=1024) == largest


def test_encode_fixed_overflow_depends_on_parties() -> None:
    value = 3e12  # below 2^43 / 2 = 4.4e12, above 2^43 / 3 = 2.9e12
    ring.encode_fixed(value, parties=2)
    with pytest.raises(ring.FixedPointOverflow) as caught:
        ring.encode_fixed(value, parties=3)
    assert caught.value.parties == 3
    assert caught.value.frac_bits == 20
    assert caught.value.ring_bits == 64
    assert caught.value.bound == pytest.approx(2.0**43 / 3)


def test_encode_fixed_huge_value_overflows_without_warning() -> None:
    with pytest.raises(ring.FixedPointOverflow):
        ring.encode_fixed(np.array([1e308]), parties=1)


def test_overflow_message_hides_value() -> None:
    secret = 123456789012345.67
    with pytest.raises(ring.FixedPointOverflow) as caught:
        ring.encode_fixed(np.array([1.0, secret]), parties=2)
    message = str(caught.value)
    for rendering in (str(secret), repr(secret), f"{secret:.6g}", f"{secret:e}", "123456789"):
        assert rendering not in message
    assert "parties=2" in message
    assert "frac_bits=20" in message
    assert "4.39805e+12" in message  # the bound 2^63 / (2 * 2^20)
    assert "scale the data down" in message
    assert "lower the 'frac_bits' input" in message


def test_sum_of_extreme_inputs_does_not_wrap() -> None:
    parties = 1024
    largest = float(2**53 - 1) / 2**20
    shares = [ring.encode_fixed(np.array([-largest, largest]), parties=parties)] * parties
    total = ring.decode_int(ring.combine(shares))
    assert total.tolist() == [-parties * (2**53 - 1), parties * (2**53 - 1)]


@pytest.mark.parametrize("parties", [0, -1])
def test_parties_must_be_positive(parties: int) -> None:
    with pytest.raises(ValueError, match="parties"):
        ring.encode_fixed(1.0, parties=parties)
    with pytest.raises(ValueError, match="parties"):
        ring.encode_int(1, parties=parties)
    with pytest.raises(ValueError, match="parties"):
        ring.encode_big([1.0], parties=parties)


@pytest.mark.parametrize("frac_bits", [-1, 63])
def test_frac_bits_range(frac_bits: int) -> None:
    with pytest.raises(ValueError, match="frac_bits"):
        ring.encode_fixed(1.0, frac_bits=frac_bits, parties=1)
    with pytest.raises(ValueError, match="frac_bits"):
        ring.decode_fixed(np.zeros(1, dtype=np.uint64), frac_bits=frac_bits)


def test_decode_requires_uint64() -> None:
    with pytest.raises(TypeError, match="uint64"):
        ring.decode_fixed(np.array([1, 2], dtype=np.int64))
    with pytest.raises(TypeError, match="uint64"):
        ring.decode_int(np.array([1.0]))


# --- integers ---------------------------------------------------------------------------


def test_int_round_trip(rng: np.random.Generator) -> None:
    values = rng.integers(-(2**40), 2**40, size=1000, dtype=np.int64)
    encoded = ring.encode_int(values, parties=7)
    assert encoded.dtype == np.uint64
    decoded = ring.decode_int(encoded)
    assert decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded, values)
    assert ring.encode_int(-1, parties=1).tolist() == TWO_64 - 1


def test_int_overflow_boundary() -> None:
    limit = (2**63 - 1) // 3
    ring.encode_int(np.array([limit, -limit], dtype=np.int64), parties=3)
    with pytest.raises(ring.FixedPointOverflow) as caught:
        ring.encode_int(np.array([limit + 1], dtype=np.int64), parties=3)
    assert str(limit + 1) not in str(caught.value)
    with pytest.raises(ring.FixedPointOverflow):
        ring.encode_int(np.array([-limit - 1], dtype=np.int64), parties=3)
    ring.encode_int(np.array([2**63 - 1, -(2**63) + 1], dtype=np.int64), parties=1)
    with pytest.raises(ring.FixedPointOverflow):
        ring.encode_int(np.array([-(2**63)], dtype=np.int64), parties=1)


def test_int_unsigned_and_python_ints() -> None:
    assert ring.encode_int(np.array([5], dtype=np.uint8), parties=2).tolist() == [5]
    with pytest.raises(ring.FixedPointOverflow):
        ring.encode_int(np.array([2**63], dtype=np.uint64), parties=1)
    with pytest.raises(ring.FixedPointOverflow):
        ring.encode_int([2**70, 1], parties=1)


def test_int_rejects_floats() -> None:
    with pytest.raises(TypeError, match="integers"):
        ring.encode_int(np.array([1.5]), parties=1)
    with pytest.raises(TypeError, match="integers"):
        ring.encode_int(np.array([True]), parties=1)


# --- randomness -------------------------------------------------------------------------


def test_random_seed() -> None:
    first, second = ring.random_seed(), ring.random_seed()
    assert isinstance(first, bytes)
    assert len(first) == 32 == ring.SEED_BYTES
    assert first != second


def test_prg_deterministic_and_label_separated() -> None:
    seed = ring.random_seed()
    first = ring.prg_uint64(seed, b"session-1/mask", 1000)
    assert first.dtype == np.uint64
    assert first.shape == (1000,)
    np.testing.assert_array_equal(first, ring.prg_uint64(seed, b"session-1/mask", 1000))
    other_label = ring.prg_uint64(seed, b"session-2/mask", 1000)
    other_seed = ring.prg_uint64(ring.random_seed(), b"session-1/mask", 1000)
    assert np.count_nonzero(first == other_label) < 3
    assert np.count_nonzero(first == other_seed) < 3
    # Counter mode: a shorter stream is a prefix of a longer one.
    np.testing.assert_array_equal(ring.prg_uint64(seed, b"session-1/mask", 10), first[:10])
    assert ring.prg_uint64(seed, b"x", 0).shape == (0,)


def test_prg_known_answer() -> None:
    # Pinned so that parties on different versions or platforms agree on masks.
    assert ring.prg_uint64(bytes(32), b"label", 3).tolist() == [
        7175909856113971813,
        17046620364598691046,
        12224908528988884341,
    ]
    assert ring.prg_big(bytes(32), b"label", 1) == [
        107608701710705286619428843244523899517321562868930722141688718286646581416601
    ]


def test_prg_matches_documented_construction() -> None:
    seed = bytes(range(32))
    label = b"abc"
    info = b"fdrtd.smpc.ring.prg_uint64.v1\x00" + label
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seed)
    encryptor = Cipher(algorithms.AES256(key), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(8 * 4))
    expected = [int.from_bytes(stream[i : i + 8], "little") for i in range(0, 32, 8)]
    assert ring.prg_uint64(seed, label, 4).tolist() == expected


def test_prg_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="seed"):
        ring.prg_uint64(b"short", b"label", 4)
    with pytest.raises(ValueError, match="count"):
        ring.prg_uint64(bytes(32), b"label", -1)
    with pytest.raises(ValueError, match="seed"):
        ring.prg_big(b"short", b"label", 4)


def _assert_uniform_looking(values: np.ndarray) -> None:
    """Every bit is set about half the time and the bytes are spread evenly."""
    count = values.size
    bits = (values[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    frequencies = bits.mean(axis=0)
    # 6 standard deviations of a binomial proportion.
    assert np.all(np.abs(frequencies - 0.5) < 6 * 0.5 / math.sqrt(count))
    byte_counts = np.bincount(values.view(np.uint8), minlength=256)
    expected = values.size * 8 / 256
    chi_square = float(np.sum((byte_counts - expected) ** 2 / expected))
    assert chi_square < 400  # 255 degrees of freedom; p < 1e-8 above 400


def test_prg_output_looks_uniform() -> None:
    _assert_uniform_looking(ring.prg_uint64(ring.random_seed(), b"uniform", 50_000))


# --- shares -----------------------------------------------------------------------------


def test_split_combine(rng: np.random.Generator) -> None:
    secret = ring.encode_fixed(rng.normal(size=(40, 3)), parties=4)
    before = secret.copy()
    for parties in (1, 2, 3, 7):
        shares = ring.split(secret, parties)
        assert len(shares) == parties
        assert all(share.dtype == np.uint64 and share.shape == (40, 3) for share in shares)
        np.testing.assert_array_equal(ring.combine(shares), secret)
    np.testing.assert_array_equal(secret, before)  # split does not touch its input


def test_split_single_share_is_a_copy() -> None:
    secret = np.array([1, 2, 3], dtype=np.uint64)
    (share,) = ring.split(secret, 1)
    np.testing.assert_array_equal(share, secret)
    assert share is not secret


def test_split_is_fresh_each_time() -> None:
    secret = np.zeros(100, dtype=np.uint64)
    first, second = ring.split(secret, 2), ring.split(secret, 2)
    assert np.count_nonzero(first[0] == second[0]) < 3


def test_shares_look_uniform() -> None:
    # Even for a constant secret each share, the last one included, is uniform.
    secret = np.full(50_000, 12345, dtype=np.uint64)
    shares = ring.split(secret, 3)
    for share in shares:
        _assert_uniform_looking(share)


def test_split_and_combine_scalars_wrap_silently() -> None:
    secret = np.array(TWO_64 - 1, dtype=np.uint64)
    shares = ring.split(secret, 4)
    assert all(share.shape == () for share in shares)
    assert int(ring.combine(shares)) == TWO_64 - 1
    wrapped = ring.combine([np.array(TWO_64 - 1, dtype=np.uint64), np.array(2, dtype=np.uint64)])
    assert int(wrapped) == 1


def test_combine_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        ring.combine([])
    with pytest.raises(ValueError, match="shape"):
        ring.combine([np.zeros(2, dtype=np.uint64), np.zeros(3, dtype=np.uint64)])
    with pytest.raises(TypeError, match="uint64"):
        ring.combine([np.zeros(2, dtype=np.int64)])
    with pytest.raises(ValueError, match="`n`"):
        ring.split(np.zeros(2, dtype=np.uint64), 0)


def test_secure_sum_of_fixed_point(rng: np.random.Generator) -> None:
    # Three parties each split their input; each party adds the shares it receives.
    inputs = [rng.normal(0.0, 100.0, size=50) for _ in range(3)]
    all_shares = [ring.split(ring.encode_fixed(x, parties=3), 3) for x in inputs]
    partial = [ring.combine([shares[j] for shares in all_shares]) for j in range(3)]
    result = ring.decode_fixed(ring.combine(partial))
    np.testing.assert_allclose(result, sum(inputs), rtol=0, atol=3 * 2.0**-21)


# --- big ring ---------------------------------------------------------------------------


def test_encode_big_is_exact() -> None:
    encoded = ring.encode_big([0.1, -0.1, 1.0, -1.0, 0.0], parties=3)
    exact = round(Fraction(0.1) * 2**64)
    assert encoded == [exact, TWO_256 - exact, 2**64, TWO_256 - 2**64, 0]
    assert all(0 <= value < TWO_256 for value in encoded)


def test_big_round_trip_exact(rng: np.random.Generator) -> None:
    # Floats of magnitude >= 2^-11 are multiples of 2^-64, so they survive exactly.
    magnitudes = 10.0 ** rng.uniform(-3, 40, size=500)
    values = [float(v) for v in magnitudes * rng.choice([-1.0, 1.0], size=500)]
    assert ring.decode_big(ring.encode_big(values, parties=5)) == values


def test_big_sum_is_exact_then_rounded_once() -> None:
    values = [0.1, 0.2, 1e20, -1e20, 1e-10]
    shares = [ring.split_big(ring.encode_big([v], parties=5), 3) for v in values]
    per_party = [ring.combine_big([s[j] for s in shares]) for j in range(3)]
    (total,) = ring.decode_big(ring.combine_big(per_party))
    exact = sum((round(Fraction(v) * 2**64) for v in values), 0)
    assert total == float(Fraction(exact, 2**64))
    assert total != sum(values)  # float addition loses 0.3 + 1e-10 to cancellation


def test_big_overflow() -> None:
    # parties=2: |x| * 2^64 * 2 < 2^255, i.e. |x| < 2^190.
    ring.encode_big([math.nextafter(2.0**190, 0.0), -math.nextafter(2.0**190, 0.0)], parties=2)
    secret = 2.0**190
    with pytest.raises(ring.FixedPointOverflow) as caught:
        ring.encode_big([1.0, secret], parties=2)
    assert caught.value.ring_bits == 256
    assert str(secret) not in str(caught.value)
    assert "2^255" in str(caught.value)
    with pytest.raises(ValueError, match="NaN or infinity"):
        ring.encode_big([math.nan], parties=2)


def test_decode_big_signed_and_rounding() -> None:
    assert ring.decode_big([TWO_256 - 1], frac_bits=0) == [-1.0]
    assert ring.decode_big([TWO_256 + 3], frac_bits=0) == [3.0]
    assert ring.decode_big([(1 << 255) - 1], frac_bits=0) == [float(2**255)]
    assert ring.decode_big([1 << 255], frac_bits=0) == [-float(2**255)]
    assert ring.decode_big([1], frac_bits=64) == [2.0**-64]


def test_prg_big() -> None:
    seed = ring.random_seed()
    values = ring.prg_big(seed, b"a", 200)
    assert len(values) == 200
    assert all(0 <= value < TWO_256 for value in values)
    assert values == ring.prg_big(seed, b"a", 200)
    assert values != ring.prg_big(seed, b"b", 200)
    assert max(values) > 2**255  # top bits are used
    assert ring.prg_big(seed, b"a", 0) == []


def test_split_big_combine_big() -> None:
    values = ring.encode_big([1.5, -2.25, 1e30], parties=4)
    for parties in (1, 2, 4):
        shares = ring.split_big(values, parties)
        assert len(shares) == parties
        assert all(len(share) == 3 for share in shares)
        assert ring.combine_big(shares) == values
    assert ring.split_big(values, 2)[0] != ring.split_big(values, 2)[0]
    with pytest.raises(ValueError, match="`n`"):
        ring.split_big(values, 0)
    with pytest.raises(ValueError, match="empty"):
        ring.combine_big([])
    with pytest.raises(ValueError, match="length"):
        ring.combine_big([[1, 2], [3]])


# --- order keys -------------------------------------------------------------------------

SPECIAL_FLOATS_ASCENDING = [
    -math.inf,
    -np.finfo(np.float64).max,
    -1e300,
    -1.0,
    -np.finfo(np.float64).tiny,  # smallest normal
    -np.finfo(np.float64).tiny / 2,  # subnormal
    -5e-324,  # smallest subnormal
    -0.0,
    0.0,
    5e-324,
    np.finfo(np.float64).tiny / 2,
    np.finfo(np.float64).tiny,
    1.0,
    1.0000000000000002,
    1e300,
    np.finfo(np.float64).max,
    math.inf,
]


def test_order_key_special_values() -> None:
    values = np.array(SPECIAL_FLOATS_ASCENDING)
    keys = ring.float_order_key(values)
    assert keys.dtype == np.uint64
    assert np.all(keys[1:] > keys[:-1])
    assert int(keys[0]) == ring.ORDER_KEY_NEG_INF
    assert int(keys[-1]) == ring.ORDER_KEY_POS_INF
    assert int(ring.float_order_key(-0.0)) + 1 == int(ring.float_order_key(0.0))
    back = ring.float_from_order_key(keys)
    assert back.dtype == np.float64
    np.testing.assert_array_equal(back.view(np.uint64), values.view(np.uint64))  # bitwise
    assert np.signbit(back[7]) and not np.signbit(back[8])


def test_order_key_random_order(rng: np.random.Generator) -> None:
    values = np.concatenate(
        [rng.normal(size=2000) * 10.0 ** rng.integers(-300, 300, size=2000), [0.0, -0.0]]
    )
    keys = ring.float_order_key(values)
    order = np.argsort(values, kind="stable")
    assert np.all(np.diff(keys[order].astype(np.float64)) >= 0)
    for first, second in zip(values[:200], values[200:400], strict=True):
        key_first, key_second = ring.float_order_key(np.array([first, second]))
        assert (first < second) == (key_first < key_second)
    np.testing.assert_array_equal(ring.float_from_order_key(keys), values)


def test_order_key_range_decodes_without_nan(rng: np.random.Generator) -> None:
    keys = rng.integers(
        ring.ORDER_KEY_NEG_INF, ring.ORDER_KEY_POS_INF, size=10_000, dtype=np.uint64, endpoint=True
    )
    assert not np.any(np.isnan(ring.float_from_order_key(keys)))


def test_order_key_shape_and_nan() -> None:
    assert ring.float_order_key(np.zeros((2, 3))).shape == (2, 3)
    assert ring.float_order_key(1.5).shape == ()
    with pytest.raises(ValueError, match="NaN"):
        ring.float_order_key(np.array([1.0, math.nan]))


def test_the_bound_max_encodable_returns_is_itself_encodable() -> None:
    # it used to round the bound to the nearest float, often just above it
    for parties in range(1, 65):
        for frac_bits in (0, 20, 40):
            bound = ring.max_encodable(parties=parties, frac_bits=frac_bits)
            ring.encode_fixed(np.array([bound, -bound]), frac_bits=frac_bits, parties=parties)
        wide = ring.max_encodable(parties=parties, frac_bits=64, ring_bits=ring.BIG_RING_BITS)
        ring.encode_big([wide, -wide], parties=parties)


def test_the_exact_ring_holds_every_finite_float() -> None:
    extremes = [5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -1e-300, 0.1]
    bits, frac = ring.EXACT_RING_BITS, ring.EXACT_FRAC_BITS
    encoded = ring.encode_big(extremes, parties=64, frac_bits=frac, ring_bits=bits)
    assert ring.decode_big(encoded, frac_bits=frac, ring_bits=bits) == extremes
    # a sum beyond the float range decodes to an infinity, not an error
    doubled = [(2 * e) % (1 << bits) for e in encoded]
    assert ring.decode_big(doubled, frac_bits=frac, ring_bits=bits)[3] == math.inf
    masks = ring.prg_big(b"s" * 32, b"label", 2, ring_bits=bits)
    assert all(0 <= m < 1 << bits for m in masks)
    assert ring.prg_big(b"s" * 32, b"label", 1) != [m % (1 << 256) for m in masks[:1]]
