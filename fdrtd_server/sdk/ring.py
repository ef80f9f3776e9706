"""Ring arithmetic for additive secret sharing: encoding, PRG, split and combine.

Every secure-sum style protocol in :mod:`protocols.smpc` works on additive
shares in a ring of integers modulo a power of two. This module holds that
arithmetic as pure functions, with no I/O and no state, so that it can be
tested on its own and reused by every protocol.

The 64-bit ring
    Values live in ``Z_2^64``, represented as numpy ``uint64`` arrays whose
    machine arithmetic wraps modulo ``2^64``. A secret ``x`` is split into
    ``n`` shares ``x_1, ..., x_n`` with ``x_1 + ... + x_n = x (mod 2^64)``:
    the first ``n - 1`` shares are uniform random ring elements and the last
    one is ``x`` minus their sum. Any ``n - 1`` shares are then uniformly
    distributed and independent of ``x`` (additive secret sharing, see e.g.
    Cramer, Damgard and Nielsen, *Secure Multiparty Computation and Secret
    Sharing*, 2015, ch. 3). The reference system SIMON masked values with
    random integers from a bounded range added over the plain integers; such
    a sum is *not* uniform (a mask near the edge of its range reveals whether
    the secret is large or small), so it leaks statistically. Here every
    addition is reduced modulo the ring size, which is what makes the shares
    perfectly hiding.

Fixed point
    A real number ``x`` is encoded as the signed integer
    ``round(x * 2^f)`` with ``f = DEFAULT_FRAC_BITS = 20`` fractional bits,
    stored in two's complement (negative values map to the top half of the
    ring). The absolute rounding error per encoded value is at most
    ``2^-(f+1)``; the resolution is ``2^-20 ~= 9.5e-7``. Decoding
    interprets a ring element as a signed 64-bit integer and divides by
    ``2^f``, so results are exact up to float64 rounding.

Overflow bound
    A sum of ``parties`` encoded inputs must not wrap around the ring, or the
    decoded result would be silently wrong. :func:`encode_fixed` therefore
    requires ``|round(x * 2^f)| * parties < 2^63`` for every element and
    raises :class:`FixedPointOverflow` otherwise. With ``f = 20`` that allows
    ``|x| < 2^43 / parties``: about ``4.4e12`` for two parties, ``2.9e12`` for
    three and ``8.8e11`` for ten. The same rule with ``f = 0`` applies to
    :func:`encode_int`. Note that the bound protects a sum of one input per
    party; a protocol that adds more terms must pass the number of terms as
    ``parties``.

The wide rings
    A few scalars need far more range than 64 bits give, for instance the
    sums behind a regression. For those, :func:`encode_big` and friends work
    in ``Z_2^256`` on Python integers with ``BIG_FRAC_BITS = 64`` fractional
    bits (resolution ``2^-64 ~= 5.4e-20``). Conversion goes through
    :class:`fractions.Fraction`, so the float is converted exactly before
    rounding. The allowed range is ``|x| < 2^191 / parties`` (about
    ``3.1e57`` for one party).

    The same functions take ``ring_bits`` and ``frac_bits``; the *exact ring*
    (:data:`EXACT_RING_BITS` = 2176, :data:`EXACT_FRAC_BITS` = 1074) holds
    every finite float64 without rounding (each is an integer multiple of
    ``2^-1074`` below ``2^1024``), so a sum of up to ``2^77`` of them is exact
    and decodes with one rounding. The power sums up to ``x^6`` behind
    kurtosis and hyper-flatness use it: in the 256-bit ring, data with a
    standard deviation of ``1e-6`` lost its fourth powers to the ``2^-64``
    grid and data spread over ``1e9`` overflowed.

Randomness
    Fresh randomness comes from :mod:`secrets` (the OS CSPRNG). Long mask
    vectors are expanded from a 32-byte seed by :func:`prg_uint64`: AES-256 in
    counter mode, keyed by HKDF-SHA256 of the seed with the caller's label as
    ``info``. Equal ``(seed, label)`` pairs give equal streams on every
    machine (the keystream is read as little-endian words), and distinct
    labels give independent streams, which is what pairwise masking needs.

Order keys
    :func:`float_order_key` maps float64 values to ``uint64`` keys so that
    the integer order of keys is the numeric order of the floats. Protocols
    that find a minimum or maximum by bisection over public thresholds can
    then bisect over 64-bit integers and map the threshold back with
    :func:`float_from_order_key`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Sequence
from fractions import Fraction

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fdrtd_server.errors import OutOfRange

__all__ = [
    "BIG_FRAC_BITS",
    "BIG_RING_BITS",
    "DEFAULT_FRAC_BITS",
    "EXACT_FRAC_BITS",
    "EXACT_RING_BITS",
    "ORDER_KEY_NEG_INF",
    "ORDER_KEY_POS_INF",
    "RING_BITS",
    "SEED_BYTES",
    "FixedPointOverflow",
    "NotFinite",
    "combine",
    "combine_big",
    "decode_big",
    "decode_fixed",
    "decode_int",
    "encode_big",
    "encode_fixed",
    "encode_int",
    "float_from_order_key",
    "float_order_key",
    "max_encodable",
    "prg_big",
    "prg_uint64",
    "random_seed",
    "split",
    "split_big",
]

RING_BITS = 64
"""Bit width of the main ring ``Z_2^64`` (numpy ``uint64``)."""

DEFAULT_FRAC_BITS = 20
"""Fractional bits of the 64-bit fixed-point encoding (resolution ``2^-20``)."""

BIG_RING_BITS = 256
"""Bit width of the big ring ``Z_2^256`` (Python ``int``)."""

BIG_FRAC_BITS = 64
"""Fractional bits of the 256-bit fixed-point encoding (resolution ``2^-64``)."""

EXACT_RING_BITS = 2176
"""Bit width of the exact ring: every sum of up to ``2^77`` finite float64 fits."""

EXACT_FRAC_BITS = 1074
"""Fractional bits of the exact ring: every finite float64 is a multiple of ``2^-1074``."""

SEED_BYTES = 32
"""Length of the seeds returned by :func:`random_seed`."""

_MIN_SEED_BYTES = 16
_BIG_MODULUS = 1 << BIG_RING_BITS
_SIGN_BIT = np.uint64(1 << 63)
# Domain separation: the two PRGs never share a key even for equal seed and label.
_PRG64_INFO = b"fdrtd.smpc.ring.prg_uint64.v1\x00"
_PRGBIG_INFO = b"fdrtd.smpc.ring.prg_big.v1\x00"
_PRGWIDE_INFO = b"fdrtd.smpc.ring.prg_big.%d.v1\x00"  # the other wide rings, by width
_SPLIT_LABEL = b"split"

U64Array = npt.NDArray[np.uint64]
F64Array = npt.NDArray[np.float64]
I64Array = npt.NDArray[np.int64]


class FixedPointOverflow(OutOfRange, OverflowError):
    """A value is too large to be encoded without risking a wrap-around.

    An :class:`~fdrtd_server.errors.OutOfRange` (422): raised wherever a
    protocol encodes its data, it answers every function with the same
    clear problem, and a party that raises it inside a peer session tells
    the other parties, whose computation fails with the same reason. It is
    still an :class:`OverflowError` for code that does arithmetic only.

    The message names the input, the allowed range, the rule and the fix; it
    never contains the offending value, because that value is private data.

    Attributes:
        bound: Largest magnitude that can be encoded (exclusive), in the
            caller's units (before scaling by ``2^frac_bits``).
        frac_bits: Fractional bits of the attempted encoding.
        parties: Number of inputs the encoded values must be summable over.
        ring_bits: Bit width of the ring.
    """

    def __init__(self, *, bound: float, frac_bits: int, parties: int, ring_bits: int) -> None:
        self.bound = bound
        self.frac_bits = frac_bits
        self.parties = parties
        self.ring_bits = ring_bits
        fix = "scale the data down (e.g. divide it by 1000 and multiply the result back)"
        if frac_bits > 0 and ring_bits == RING_BITS:
            fix += f" or lower the 'frac_bits' input (now {frac_bits}; each bit less doubles it)"
        super().__init__(
            f"a value of the 'data' input is out of range for the {ring_bits}-bit fixed-point "
            f"encoding: with frac_bits={frac_bits} and parties={parties} every |value| must "
            f"be below {bound:.6g} (|value| * 2^{frac_bits} * {parties} < 2^{ring_bits - 1}) "
            f"so that the sum of {parties} inputs cannot wrap around; {fix}"
        )


class NotFinite(OutOfRange, ValueError):
    """A value to encode is NaN or infinite (an :class:`~fdrtd_server.errors.OutOfRange`, 422).

    Either the data holds one, or a local aggregate of it (a sum, a sum of
    powers) went beyond the float64 range.
    """

    def __init__(self) -> None:
        super().__init__(
            "a value of the 'data' input, or a local sum of its values, is NaN or infinity "
            "(beyond the float64 range), which a fixed-point encoding cannot hold; remove or "
            "impute missing values, or scale the data down"
        )


def _check_parties(parties: int) -> None:
    if parties < 1:
        raise ValueError("`parties` must be at least 1")


def _check_frac_bits(frac_bits: int, ring_bits: int) -> None:
    if not 0 <= frac_bits <= ring_bits - 2:
        raise ValueError(f"`frac_bits` must be between 0 and {ring_bits - 2}")


def _check_ring_bits(ring_bits: int) -> None:
    if ring_bits < 64 or ring_bits % 8:
        raise ValueError("`ring_bits` must be a multiple of 8, at least 64")


def _max_magnitude(parties: int, ring_bits: int) -> int:
    # Largest integer m with m * parties < 2^(ring_bits - 1).
    return ((1 << (ring_bits - 1)) - 1) // parties


def max_encodable(
    *, parties: int, frac_bits: int = DEFAULT_FRAC_BITS, ring_bits: int = RING_BITS
) -> float:
    """Return the largest magnitude that the fixed-point encoding accepts.

    Values with ``|x| <= max_encodable(...)`` can be encoded (the bound is
    rounded down to a float); the sum of ``parties`` of them never wraps.

    Args:
        parties: Number of inputs that will be added in the ring.
        frac_bits: Fractional bits of the encoding.
        ring_bits: Ring width, :data:`RING_BITS` or :data:`BIG_RING_BITS`.

    Returns:
        The bound ``floor((2^(ring_bits-1) - 1) / parties) / 2^frac_bits``.

    Raises:
        ValueError: If ``parties < 1`` or ``frac_bits`` is out of range.
    """
    _check_parties(parties)
    _check_frac_bits(frac_bits, ring_bits)
    exact = Fraction(_max_magnitude(parties, ring_bits), 1 << frac_bits)
    bound = float(exact)  # rounded to nearest: step back if that rounded up
    return math.nextafter(bound, 0.0) if bound > exact else bound


def _overflow(parties: int, frac_bits: int, ring_bits: int) -> FixedPointOverflow:
    return FixedPointOverflow(
        bound=float(Fraction(1 << (ring_bits - 1), parties << frac_bits)),
        frac_bits=frac_bits,
        parties=parties,
        ring_bits=ring_bits,
    )


def encode_fixed(x: npt.ArrayLike, *, frac_bits: int = DEFAULT_FRAC_BITS, parties: int) -> U64Array:
    """Encode real numbers as fixed-point elements of ``Z_2^64``.

    Each element becomes ``round(x * 2^frac_bits)`` (round half to even) in
    two's complement. Scaling by a power of two is exact in float64, so the
    only error is the final rounding, at most ``2^-(frac_bits+1)``.

    Args:
        x: A float or an array of floats of any shape.
        frac_bits: Number of fractional bits ``f``.
        parties: Number of encoded inputs that will be summed in the ring;
            the encoding guarantees that such a sum cannot wrap.

    Returns:
        A ``uint64`` array of the same shape as ``x`` (0-d for a scalar).

    Raises:
        NotFinite: If ``x`` contains NaN or infinity (a ``ValueError``).
        ValueError: If the parameters are
            out of range.
        FixedPointOverflow: If any ``|round(x * 2^f)| * parties >= 2^63``.
    """
    _check_parties(parties)
    _check_frac_bits(frac_bits, RING_BITS)
    values = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):  # a scaled value of inf fails the range check below
        scaled = np.ldexp(values, frac_bits, out=np.empty_like(values))  # an array, even 0-d
    np.rint(scaled, out=scaled)
    # one pass for both checks: the largest magnitude is NaN or inf if any value is
    peak = float(np.max(np.abs(scaled))) if scaled.size else 0.0
    if not math.isfinite(peak):
        if not np.all(np.isfinite(values)):
            raise NotFinite()
        raise _overflow(parties, frac_bits, RING_BITS)
    # ``peak`` is an integer-valued float; Python compares it with the int exactly,
    # and below 2^63 the cast to int64 is exact as well
    if peak > _max_magnitude(parties, RING_BITS):
        raise _overflow(parties, frac_bits, RING_BITS)
    return np.asarray(scaled.astype(np.int64).view(np.uint64))


def decode_fixed(v: npt.ArrayLike, *, frac_bits: int = DEFAULT_FRAC_BITS) -> F64Array:
    """Decode fixed-point ring elements to float64.

    The element is read as a signed 64-bit integer (two's complement) and
    divided by ``2^frac_bits``. The division is exact; converting integers
    above ``2^53`` to float64 rounds to the nearest representable value.

    Args:
        v: ``uint64`` ring elements (any shape).
        frac_bits: Number of fractional bits used to encode them.

    Returns:
        A float64 array of the same shape.

    Raises:
        ValueError: If ``frac_bits`` is out of range.
        TypeError: If ``v`` is not a ``uint64`` array.
    """
    _check_frac_bits(frac_bits, RING_BITS)
    signed = _as_ring(v).view(np.int64)
    return np.asarray(np.ldexp(signed.astype(np.float64), -frac_bits))


def encode_int(x: npt.ArrayLike, *, parties: int) -> U64Array:
    """Encode integers as elements of ``Z_2^64`` (two's complement).

    Args:
        x: An integer or an array of integers (any integer dtype).
        parties: Number of encoded inputs that will be summed in the ring.

    Returns:
        A ``uint64`` array of the same shape as ``x``.

    Raises:
        TypeError: If ``x`` does not hold integers.
        ValueError: If ``parties < 1``.
        FixedPointOverflow: If any ``|x| * parties >= 2^63``.
    """
    _check_parties(parties)
    values = np.asarray(x)
    if values.dtype == np.object_:
        # Python ints beyond 64 bits end up as objects.
        if all(isinstance(item, int) for item in values.flat):
            raise _overflow(parties, 0, RING_BITS)
        raise TypeError("`x` must hold integers")
    if values.dtype.kind not in "iu":
        raise TypeError("`x` must hold integers; encode real numbers with encode_fixed")
    limit = _max_magnitude(parties, RING_BITS)
    if values.dtype.kind == "u":
        if np.any(values > np.uint64(limit)):
            raise _overflow(parties, 0, RING_BITS)
        return np.asarray(values.astype(np.uint64))
    integers = values.astype(np.int64)
    if np.any(integers > limit) or np.any(integers < -limit):
        raise _overflow(parties, 0, RING_BITS)
    return np.asarray(integers.view(np.uint64))


def decode_int(v: npt.ArrayLike) -> I64Array:
    """Decode ring elements to signed 64-bit integers (two's complement).

    Args:
        v: ``uint64`` ring elements (any shape).

    Returns:
        An int64 array of the same shape.

    Raises:
        TypeError: If ``v`` is not a ``uint64`` array.
    """
    return np.asarray(_as_ring(v).view(np.int64))


def _as_ring(v: npt.ArrayLike) -> U64Array:
    array = np.asarray(v)
    if array.dtype != np.uint64:
        raise TypeError("ring elements must be a numpy uint64 array")
    return array


def random_seed() -> bytes:
    """Return a fresh 32-byte seed from the operating system's CSPRNG.

    Returns:
        :data:`SEED_BYTES` random bytes from :func:`secrets.token_bytes`.
    """
    return secrets.token_bytes(SEED_BYTES)


def _keystream(seed: bytes, info: bytes, nbytes: int) -> memoryview:
    if len(seed) < _MIN_SEED_BYTES:
        raise ValueError(f"`seed` must be at least {_MIN_SEED_BYTES} bytes long")
    if nbytes < 0:
        raise ValueError("`count` must not be negative")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seed)
    # The key is unique per (seed, label), so a fixed all-zero counter block
    # never repeats a (key, nonce) pair.
    encryptor = Cipher(algorithms.AES256(key), modes.CTR(bytes(16))).encryptor()
    # encrypt zeros straight into one buffer: ``np.zeros`` maps zero pages lazily,
    # and ``update_into`` saves the copies of ``update(...) + finalize()``
    # (``update_into`` wants 15 spare bytes, a block less one)
    out = bytearray(nbytes + 15)
    encryptor.update_into(np.zeros(nbytes, dtype=np.uint8).data, out)
    encryptor.finalize()
    return memoryview(out)[:nbytes]


def prg_uint64(seed: bytes, label: bytes, count: int) -> U64Array:
    """Expand a seed into ``count`` uniform elements of ``Z_2^64``.

    The stream is AES-256-CTR under the key ``HKDF-SHA256(seed, info=label)``
    (with a fixed domain-separation prefix on ``info``), read as
    little-endian 64-bit words. It is deterministic: parties holding the same
    seed and label derive the same mask on any platform. Different labels give
    computationally independent streams.

    Args:
        seed: Secret seed, at least 16 bytes (use :func:`random_seed`).
        label: Public context, e.g. the session id and the purpose of the mask.
        count: Number of ring elements to produce.

    Returns:
        A ``uint64`` array of shape ``(count,)``.

    Raises:
        ValueError: If the seed is shorter than 16 bytes or ``count < 0``.
    """
    stream = _keystream(seed, _PRG64_INFO + label, 8 * count)
    # a writable view of the fresh buffer, no copy (uint64 is "<u8" on every platform
    # numpy supports here; a big-endian one would need the byte swap below)
    words = np.frombuffer(stream, dtype="<u8")
    return words if words.dtype == np.uint64 else words.astype(np.uint64)


def split(x: npt.ArrayLike, n: int) -> list[U64Array]:
    """Split ring elements into ``n`` additive shares.

    Shares ``0 .. n-2`` are uniform, expanded by :func:`prg_uint64` from
    fresh random seeds; share ``n-1`` is ``x - sum(others) mod 2^64``. Any
    ``n - 1`` of the shares are uniform and independent of ``x``.

    Args:
        x: ``uint64`` ring elements of any shape.
        n: Number of shares, at least 1.

    Returns:
        ``n`` ``uint64`` arrays of the shape of ``x`` whose sum modulo
        ``2^64`` is ``x``.

    Raises:
        ValueError: If ``n < 1``.
        TypeError: If ``x`` is not a ``uint64`` array.
    """
    if n < 1:
        raise ValueError("`n` must be at least 1")
    secret = _as_ring(x)
    shares = [
        prg_uint64(random_seed(), _SPLIT_LABEL, secret.size).reshape(secret.shape)
        for _ in range(n - 1)
    ]
    last = secret.copy()
    with np.errstate(over="ignore"):  # wrapping modulo 2^64 is the point
        for share in shares:
            np.subtract(last, share, out=last)
    shares.append(last)
    return shares


def combine(shares: Sequence[npt.ArrayLike]) -> U64Array:
    """Add shares modulo ``2^64``.

    Args:
        shares: One or more ``uint64`` arrays of equal shape.

    Returns:
        Their sum modulo ``2^64``.

    Raises:
        ValueError: If ``shares`` is empty or the shapes differ.
        TypeError: If a share is not a ``uint64`` array.
    """
    if len(shares) == 0:
        raise ValueError("`shares` must not be empty")
    arrays = [_as_ring(share) for share in shares]
    total = arrays[0].copy()
    with np.errstate(over="ignore"):  # wrapping modulo 2^64 is the point
        for array in arrays[1:]:
            if array.shape != total.shape:
                raise ValueError("all shares must have the same shape")
            np.add(total, array, out=total)
    return total


def encode_big(
    values: Iterable[float],
    *,
    parties: int,
    frac_bits: int = BIG_FRAC_BITS,
    ring_bits: int = BIG_RING_BITS,
) -> list[int]:
    """Encode floats exactly as fixed-point elements of ``Z_2^256`` (or another wide ring).

    Each value becomes ``round(Fraction(value) * 2^frac_bits) mod 2^ring_bits``;
    the float is converted without loss before the single rounding step. In
    the exact ring (:data:`EXACT_RING_BITS`, :data:`EXACT_FRAC_BITS`) there is
    no rounding at all, and no finite float overflows.

    Args:
        values: Finite floats (a sequence or a 1-D float array).
        parties: Number of encoded inputs that will be summed in the ring.
        frac_bits: Number of fractional bits.
        ring_bits: Ring width, a multiple of 8.

    Returns:
        One integer in ``[0, 2^ring_bits)`` per value.

    Raises:
        ValueError: If a value is NaN or infinite, or the parameters are out
            of range.
        FixedPointOverflow: If any ``|round(x * 2^f)| * parties >= 2^(ring_bits - 1)``.
    """
    _check_parties(parties)
    _check_ring_bits(ring_bits)
    _check_frac_bits(frac_bits, ring_bits)
    limit = _max_magnitude(parties, ring_bits)
    modulus = 1 << ring_bits
    scale = 1 << frac_bits
    encoded = []
    for value in values:
        number = float(value)
        if not math.isfinite(number):
            raise NotFinite()
        integer = round(Fraction(number) * scale)
        if abs(integer) > limit:
            raise _overflow(parties, frac_bits, ring_bits)
        encoded.append(integer % modulus)
    return encoded


def decode_big(
    values: Iterable[int], *, frac_bits: int = BIG_FRAC_BITS, ring_bits: int = BIG_RING_BITS
) -> list[float]:
    """Decode elements of ``Z_2^256`` (or another wide ring) to floats, correctly rounded.

    Args:
        values: Ring elements; they are reduced modulo ``2^ring_bits`` first.
        frac_bits: Number of fractional bits used to encode them.
        ring_bits: Ring width, a multiple of 8.

    Returns:
        ``v / 2^frac_bits`` rounded once to the nearest float, where ``v`` is
        the element read as a signed ``ring_bits``-bit integer (a sum beyond
        the float range decodes to an infinity).

    Raises:
        ValueError: If ``frac_bits`` or ``ring_bits`` is out of range.
    """
    _check_ring_bits(ring_bits)
    _check_frac_bits(frac_bits, ring_bits)
    modulus = 1 << ring_bits
    half = modulus >> 1
    decoded = []
    for value in values:
        integer = int(value) % modulus
        if integer >= half:
            integer -= modulus
        try:
            decoded.append(float(Fraction(integer, 1 << frac_bits)))
        except OverflowError:
            decoded.append(math.inf if integer > 0 else -math.inf)
    return decoded


def prg_big(seed: bytes, label: bytes, count: int, *, ring_bits: int = BIG_RING_BITS) -> list[int]:
    """Expand a seed into ``count`` uniform elements of ``Z_2^256`` (or another wide ring).

    Same construction as :func:`prg_uint64` (with its own domain separation,
    which names the ring width for rings other than 256 bits), each element
    read from ``ring_bits / 8`` little-endian bytes of keystream.

    Args:
        seed: Secret seed, at least 16 bytes.
        label: Public context of the mask.
        count: Number of ring elements to produce.
        ring_bits: Ring width, a multiple of 8.

    Returns:
        ``count`` integers in ``[0, 2^ring_bits)``.

    Raises:
        ValueError: If the seed is shorter than 16 bytes, ``count < 0`` or
            ``ring_bits`` is out of range.
    """
    _check_ring_bits(ring_bits)
    width = ring_bits // 8
    info = _PRGBIG_INFO if ring_bits == BIG_RING_BITS else _PRGWIDE_INFO % ring_bits
    stream = _keystream(seed, info + label, width * count)
    return [
        int.from_bytes(stream[index : index + width], "little")
        for index in range(0, len(stream), width)
    ]


def split_big(values: Sequence[int], n: int) -> list[list[int]]:
    """Split elements of ``Z_2^256`` into ``n`` additive shares.

    Args:
        values: Ring elements (reduced modulo ``2^256``).
        n: Number of shares, at least 1.

    Returns:
        ``n`` lists, each as long as ``values``; element-wise their sum
        modulo ``2^256`` is ``values``. Any ``n - 1`` of them are uniform.

    Raises:
        ValueError: If ``n < 1``.
    """
    if n < 1:
        raise ValueError("`n` must be at least 1")
    shares = [prg_big(random_seed(), _SPLIT_LABEL, len(values)) for _ in range(n - 1)]
    last = [
        (int(value) - sum(share[index] for share in shares)) % _BIG_MODULUS
        for index, value in enumerate(values)
    ]
    shares.append(last)
    return shares


def combine_big(shares: Sequence[Sequence[int]]) -> list[int]:
    """Add shares element-wise modulo ``2^256``.

    Args:
        shares: One or more equally long lists of ring elements.

    Returns:
        The element-wise sum modulo ``2^256``.

    Raises:
        ValueError: If ``shares`` is empty or the lengths differ.
    """
    if len(shares) == 0:
        raise ValueError("`shares` must not be empty")
    length = len(shares[0])
    if any(len(share) != length for share in shares):
        raise ValueError("all shares must have the same length")
    return [sum(int(share[index]) for share in shares) % _BIG_MODULUS for index in range(length)]


def float_order_key(x: npt.ArrayLike) -> U64Array:
    """Map float64 values to ``uint64`` keys with the same order.

    For a non-negative float (sign bit clear) the key is its bit pattern with
    the top bit set; for a negative float it is the bitwise complement of its
    bit pattern. Then ``a < b`` implies ``key(a) < key(b)`` for all non-NaN
    floats, including infinities and subnormals. The map is a bijection on
    bit patterns, so ``-0.0`` and ``0.0`` get distinct, adjacent keys
    (``key(-0.0) + 1 == key(0.0)``).

    Args:
        x: Float values (any shape), no NaN.

    Returns:
        ``uint64`` keys of the same shape.

    Raises:
        ValueError: If ``x`` contains NaN.
    """
    values = np.asarray(x, dtype=np.float64)
    if np.any(np.isnan(values)):
        raise ValueError("NaN has no place in the order of floats; remove missing values first")
    bits = values.view(np.uint64)
    negative = (bits & _SIGN_BIT) != 0
    return np.asarray(np.where(negative, ~bits, bits | _SIGN_BIT))


def float_from_order_key(k: npt.ArrayLike) -> F64Array:
    """Invert :func:`float_order_key`.

    Every key between :data:`ORDER_KEY_NEG_INF` and :data:`ORDER_KEY_POS_INF`
    (inclusive) decodes to a non-NaN float; keys outside that range decode to
    NaN bit patterns.

    Args:
        k: ``uint64`` keys (any shape).

    Returns:
        The float64 values with those keys.

    Raises:
        TypeError: If ``k`` is not a ``uint64`` array.
    """
    keys = _as_ring(k)
    positive = (keys & _SIGN_BIT) != 0
    bits = np.where(positive, keys & ~_SIGN_BIT, ~keys)
    return np.asarray(bits.view(np.float64))


ORDER_KEY_NEG_INF = int(float_order_key(-math.inf))
"""Key of ``-inf``: the smallest key of any non-NaN float."""

ORDER_KEY_POS_INF = int(float_order_key(math.inf))
"""Key of ``+inf``: the largest key of any non-NaN float."""
