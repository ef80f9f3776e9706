"""Secure two-party matrix product: fixed point, Beaver matrix triples and Paillier.

The pure half of the secure matrix product used by :mod:`protocols.smpc.regression`
(the cross blocks ``X_a' X_b`` of vertical regression, and ``matrix_product``).
Party L holds ``A`` (``m x k``), party R holds ``B`` (``k x n``); at the end L
and R hold additive shares ``S_L + S_R = A @ B (mod M)`` of the product.
Nothing here does I/O; the message flow lives in the protocol module.

Fixed point
    A real ``x`` is encoded as the signed integer ``round(x * 2^f)``. For
    ``matrix_product`` ``f`` is the same for every entry, ``frac_bits``
    (default ``DEFAULT_FRAC_BITS = 40``, resolution ``2^-40 ~= 9.1e-13``); the
    product of two encodings carries ``2f`` fractional bits and is decoded by
    dividing by ``2^(2f)``. The error of one entry of the decoded product is
    at most ``sum_t (|a_t| + |b_t|) * 2^-(f+1) + k * 2^-(2f+2)`` from rounding
    the inputs, plus one float64 rounding (relative ``2^-53``) of the result.
    A fixed resolution is absolute: a row of ``A`` (or column of ``B``) whose
    largest ``|x|`` is below ``2^(MIN_SIGNIFICANT_BITS - f)`` would keep fewer
    than ``MIN_SIGNIFICANT_BITS`` significant bits, so :func:`coarse_lines`
    finds such lines and the protocol refuses them instead of returning a
    silently imprecise product.

Scaled fixed point (the Gram matrix of vertical regression)
    Each row ``i`` of ``A`` and column ``j`` of ``B`` gets its own exponent
    (``r_i``, ``c_j``): the entry ``(i, j)`` of the product carries ``r_i +
    c_j`` fractional bits and is decoded by dividing by ``2^(r_i + c_j)``
    (:func:`encode_scaled`, :func:`decode_scaled`). :func:`norm_exponents`
    picks the exponent of a column from its sum of squares so that its
    Euclidean norm is encoded with ``PRECISION_BITS = 80`` bits, whatever
    its scale (``1e-11`` or ``1e20``); the rounding error of an entry is then
    at most ``sqrt(k) * ||a|| * ||b|| * 2^-80``, below float64's own rounding
    of a dot product. The exponents are public: vertical regression derives
    them from the diagonal of the Gram matrix, which it opens anyway.

Range
    Shares live in ``Z_2^256`` (dealer path) or in the Paillier plaintext
    space ``Z_N`` with ``N >= 2^1023`` (two-party path), and each product
    entry must stay below ``2^255`` in magnitude so that it cannot wrap. A
    party only sees its own operand, so the bound is split between the two:
    with inner dimension ``k`` every encoded entry must satisfy ``|x * 2^f| <
    2^h`` with ``h = floor((255 - ceil(log2 k)) / 2)``. Then ``k * 2^h * 2^h
    <= 2^255``. For ``f = 40`` and ``k <= 2^20`` (a million records) that
    allows ``|x| < 2^77 ~= 1.5e23``; anything larger raises
    :class:`ProductOverflow` (a :class:`~fdrtd_server.sdk.ring.FixedPointOverflow`)
    instead of wrapping around to a wrong answer.

Dealer path (three or more parties): Beaver matrix triples
    A dealer D (a third party) draws ``U`` (``m x k``) and ``V`` (``k x n``)
    uniform in ``Z_2^256`` and splits ``W = U @ V`` into ``W_L + W_R``. It
    sends L one seed (from which L expands ``U`` and ``W_L``), and R one
    seed (for ``V``) plus the matrix ``W_R``. L sends ``E = A - U`` to R, R
    sends ``F = B - V`` to L, and then ``S_L = A @ F + W_L`` and ``S_R = E @
    V + W_R``, since ``A @ (B - V) + (A - U) @ V + U @ V = A @ B``. ``E``
    and ``F`` are uniform to their receivers (one-time pads in the ring);
    the dealer receives nothing. This is Beaver's multiplication triple
    (Beaver, CRYPTO 1991) lifted to matrices (e.g. Mohassel and Zhang,
    SecureML, S&P 2017); it is secure against one semi-honest party, not
    against the dealer colluding with L or R.

Paillier path (two parties)
    The party with the smaller operand (the *encryptor*, holding the key
    pair) sends its entries encrypted under Paillier (Paillier, EUROCRYPT
    1999). The *evaluator* computes ``Enc(P) @ Q`` homomorphically
    (``prod_t c_t^{q_t}``, negative exponents through one modular inverse
    per entry), multiplies every entry by a fresh encryption of a mask ``r``
    uniform in ``Z_N`` (which also re-randomises the ciphertext), keeps
    ``-r mod N`` as its share and returns the ciphertexts; the encryptor's
    share is their decryption, uniform in ``Z_N``. Encryption uses the
    private factorisation (CRT modulo ``p^2`` and ``q^2``), several times
    faster than with the public key alone.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import Any

import gmpy2
import numpy as np
import numpy.typing as npt
from phe import paillier

from fdrtd_server.sdk import OutOfRange, ring

__all__ = [
    "DEFAULT_FRAC_BITS",
    "MAX_FRAC_BITS",
    "MIN_SIGNIFICANT_BITS",
    "MODULUS",
    "PRECISION_BITS",
    "RING_BITS",
    "PaillierKey",
    "ProductOverflow",
    "coarse_lines",
    "dealer_share",
    "decode_product",
    "decode_scaled",
    "encode_operand",
    "encode_scaled",
    "encrypted_matmul",
    "ints_from_bytes",
    "ints_to_bytes",
    "left_masks",
    "left_share",
    "mask_ciphertexts",
    "masked",
    "max_operand",
    "norm_exponents",
    "operand_bound_bits",
    "right_mask",
    "right_share",
    "valid_ciphertexts",
    "width_for",
]

RING_BITS = 256
"""Bit width of the share ring of the dealer path."""

MODULUS = 1 << RING_BITS
"""``2^256``, the modulus of the dealer path's shares."""

DEFAULT_FRAC_BITS = 40
"""Fractional bits of each operand; the product carries twice as many."""

MAX_FRAC_BITS = 64
"""Largest accepted ``frac_bits``."""

MIN_SIGNIFICANT_BITS = 20
"""Fewest significant bits (about 6 decimal digits) a nonzero row or column may keep."""

PRECISION_BITS = 80
"""Bits given to a column's Euclidean norm by :func:`norm_exponents`."""

MAX_EXPONENT = 1 << 12
"""Largest ``|exponent|`` of a scaled encoding (float64 spans ``2^-1074`` to ``2^1024``)."""

ObjArray = npt.NDArray[np.object_]
F64Array = npt.NDArray[np.float64]


class ProductOverflow(ring.FixedPointOverflow):
    """An operand is too large for a fixed-point matrix product that cannot wrap.

    The message names the bound and the fix, never the offending value.
    """

    def __init__(self, *, bound: float, frac_bits: int, inner: int) -> None:
        self.bound = bound
        self.frac_bits = frac_bits
        self.parties = inner
        self.ring_bits = RING_BITS
        # the product's own message: FixedPointOverflow's speaks of a sum of parties
        OutOfRange.__init__(
            self,
            f"a value of the matrix is out of range for the secure matrix product: with "
            f"frac_bits={frac_bits} and {inner} terms per product entry, every |value| must "
            f"be below {bound:.6g} so that no entry can wrap around the ring; scale the data "
            "down or lower the 'frac_bits' input",
        )


def operand_bound_bits(inner: int) -> int:
    """Bits ``h`` allowed per encoded operand entry: ``|x * 2^f| < 2^h``.

    Args:
        inner: The inner dimension ``k`` (terms summed per product entry).

    Returns:
        ``floor((255 - ceil(log2 k)) / 2)``, so that ``k * 2^(2h) <= 2^255``.
    """
    if inner < 1:
        raise ValueError("the inner dimension must be at least 1")
    return (RING_BITS - 1 - math.ceil(math.log2(inner))) // 2


def max_operand(inner: int, frac_bits: int) -> float:
    """The (exclusive) bound on ``|x|`` for operands with inner dimension ``inner``."""
    return math.ldexp(1.0, operand_bound_bits(inner) - frac_bits)


def encode_operand(x: npt.ArrayLike, *, frac_bits: int, inner: int) -> ObjArray:
    """Encode a real matrix as signed fixed-point Python integers.

    Args:
        x: Finite floats of any shape.
        frac_bits: Fractional bits ``f`` (0 to :data:`MAX_FRAC_BITS`).
        inner: The product's inner dimension, for the range check.

    Returns:
        An object array of ``int`` ``round(x * 2^f)`` (half to even), same shape.

    Raises:
        ValueError: On NaN or infinity, or ``frac_bits`` out of range.
        ProductOverflow: If any ``|x * 2^f| >= 2^h`` (:func:`operand_bound_bits`).
    """
    if not 0 <= frac_bits <= MAX_FRAC_BITS:
        raise ValueError(f"`frac_bits` must be from 0 to {MAX_FRAC_BITS}")
    return encode_scaled(x, frac_bits, inner=inner)


def encode_scaled(x: npt.ArrayLike, exponents: npt.ArrayLike, *, inner: int) -> ObjArray:
    """Encode ``x`` as ``round(x * 2^e)`` with an exponent per entry (broadcast).

    Args:
        x: Finite floats of any shape.
        exponents: Integers broadcastable to ``x`` (a column for one exponent
            per row, a row for one per column), each at most
            :data:`MAX_EXPONENT` in magnitude.
        inner: The product's inner dimension, for the range check.

    Returns:
        An object array of ``int`` ``round(x * 2^e)`` (half to even), same shape.

    Raises:
        ValueError: On NaN or infinity, or an exponent out of range.
        ProductOverflow: If any ``|x * 2^e| >= 2^h`` (:func:`operand_bound_bits`).
    """
    values = np.asarray(x, dtype=np.float64)
    powers = np.broadcast_to(np.asarray(exponents, dtype=np.int64), values.shape)
    if powers.size and int(np.max(np.abs(powers))) > MAX_EXPONENT:
        raise ValueError(f"a scaling exponent must be at most {MAX_EXPONENT} in magnitude")
    if not np.all(np.isfinite(values)):
        raise ValueError("cannot encode NaN or infinity; remove or impute missing values first")
    with np.errstate(over="ignore"):  # inf fails the range check below
        scaled = np.rint(np.ldexp(values, powers))
    bits = operand_bound_bits(inner)
    over = np.abs(scaled) >= math.ldexp(1.0, bits)
    if np.any(over):
        # the bound of the first offending entry, never its value
        power = int(powers[np.unravel_index(int(np.argmax(over)), over.shape)])
        raise ProductOverflow(bound=max_operand(inner, power), frac_bits=power, inner=inner)
    # every scaled value is an integral float, so int() is exact
    out = np.empty(values.shape, dtype=object)
    out.reshape(-1)[:] = [int(v) for v in scaled.reshape(-1).tolist()]
    return out


def coarse_lines(x: npt.ArrayLike, frac_bits: int, axis: int) -> list[int]:
    """Rows (``axis=1``) or columns (``axis=0``) that ``frac_bits`` would encode too coarsely.

    A line is too coarse when it is not all zero but its largest ``|x|`` is
    below ``2^(MIN_SIGNIFICANT_BITS - frac_bits)``: its encodings would keep
    fewer than :data:`MIN_SIGNIFICANT_BITS` significant bits, and the product
    entries it takes part in would be wrong in the leading digits.

    Returns:
        The indices of such lines, in order (empty if every line is fine).
    """
    values = np.abs(np.asarray(x, dtype=np.float64))
    if values.ndim != 2 or values.size == 0:
        return []
    largest = values.max(axis=axis)
    floor = math.ldexp(1.0, MIN_SIGNIFICANT_BITS - frac_bits)
    return [int(i) for i in np.flatnonzero((largest > 0) & (largest < floor))]


def norm_exponents(squares: npt.ArrayLike, inner: int) -> list[int]:
    """Per-column exponents that encode each column's norm with :data:`PRECISION_BITS` bits.

    Args:
        squares: Each column's sum of squares ``||x_j||^2`` (public, e.g. the
            diagonal of a Gram matrix), finite and not negative.
        inner: The product's inner dimension (the length of the columns).

    Returns:
        ``e_j = b - ceil(E_j / 2)`` with ``b = min(PRECISION_BITS, h - 1)``
        (``h`` from :func:`operand_bound_bits`) and ``||x_j||^2 < 2^E_j``
        (``math.frexp``), so ``||x_j|| * 2^e_j < 2^b``: every entry then stays
        below ``2^(h-1)``, half the range, even if the float sum of squares was
        rounded down. A zero column gets exponent 0. Integer arithmetic on
        the float's exponent only, so every party gets the same answer.

    Raises:
        ValueError: If a sum of squares is negative, NaN or infinite.
    """
    target = min(PRECISION_BITS, operand_bound_bits(inner) - 1)
    exponents = []
    for value in np.asarray(squares, dtype=np.float64).reshape(-1).tolist():
        if not math.isfinite(value) or value < 0:
            raise ValueError("a column's sum of squares must be finite and not negative")
        if value == 0:
            exponents.append(0)
            continue
        _, power = math.frexp(value)  # value < 2^power
        exponents.append(target - (power + 1) // 2)  # (power + 1) // 2 == ceil(power / 2)
    return exponents


def decode_product(total: ObjArray, modulus: int, frac_bits: int) -> F64Array:
    """Decode a revealed product (``2 * frac_bits`` fractional bits) to floats.

    Args:
        total: Ring elements (reduced modulo ``modulus`` here).
        modulus: The share ring's modulus.
        frac_bits: The operands' fractional bits.

    Returns:
        ``v / 2^(2f)`` with ``v`` read as a signed residue, correctly rounded.
    """
    rows, cols = np.shape(total) if np.ndim(total) == 2 else (1, int(np.size(total)))
    decoded = decode_scaled(
        np.asarray(total, dtype=object).reshape(rows, cols),
        modulus,
        [frac_bits] * rows,
        [frac_bits] * cols,
    )
    return decoded.reshape(np.shape(total))


def decode_scaled(
    total: ObjArray, modulus: int, row_exponents: Sequence[int], col_exponents: Sequence[int]
) -> F64Array:
    """Decode a revealed ``m x n`` product of :func:`encode_scaled` operands to floats.

    Args:
        total: ``m x n`` ring elements (reduced modulo ``modulus`` here).
        modulus: The share ring's modulus.
        row_exponents: The exponent of each row of ``A`` (``m``).
        col_exponents: The exponent of each column of ``B`` (``n``).

    Returns:
        ``v_ij / 2^(r_i + c_j)`` with ``v_ij`` read as a signed residue.
    """
    half = modulus >> 1
    rows, cols = np.shape(total)
    out = np.empty((rows, cols), dtype=np.float64)
    grid = np.asarray(total, dtype=object).tolist()
    for i in range(rows):
        for j in range(cols):
            residue = int(grid[i][j]) % modulus
            signed = residue - modulus if residue >= half else residue
            # float() of an int below 2^255 is correctly rounded; ldexp is exact
            # unless the result is subnormal
            out[i, j] = math.ldexp(float(signed), -(row_exponents[i] + col_exponents[j]))
    return out


def width_for(modulus: int) -> int:
    """Bytes needed for one residue modulo ``modulus`` on the wire."""
    return max(1, ((modulus - 1).bit_length() + 7) // 8)


def ints_to_bytes(values: npt.ArrayLike | Sequence[int], width: int) -> bytes:
    """Pack non-negative integers as fixed-width little-endian bytes."""
    flat = np.asarray(values, dtype=object).reshape(-1).tolist()
    return b"".join(int(v).to_bytes(width, "little") for v in flat)


def ints_from_bytes(blob: bytes, width: int, count: int) -> list[int]:
    """Unpack :func:`ints_to_bytes`; raises ValueError if the length is not ``count`` items."""
    if len(blob) != width * count:
        raise ValueError("a packed integer vector has the wrong length")
    return [int.from_bytes(blob[i : i + width], "little") for i in range(0, len(blob), width)]


def _random(seed: bytes, label: bytes, shape: tuple[int, ...]) -> ObjArray:
    count = math.prod(shape)
    out = np.empty(count, dtype=object)
    out[:] = ring.prg_big(seed, label, count)
    return out.reshape(shape)


def _reduce(values: Any) -> ObjArray:
    return np.asarray(np.asarray(values, dtype=object) % MODULUS, dtype=object)


def masked(x: ObjArray, mask: ObjArray) -> ObjArray:
    """``x - mask (mod 2^256)``: an operand hidden by a uniform mask (``E`` or ``F``)."""
    return _reduce(x - mask)


def left_masks(seed: bytes, label: bytes, m: int, k: int, n: int) -> tuple[ObjArray, ObjArray]:
    """L's part of a Beaver matrix triple: ``U`` (``m x k``) and ``W_L`` (``m x n``)."""
    return _random(seed, label + b"|U", (m, k)), _random(seed, label + b"|W", (m, n))


def right_mask(seed: bytes, label: bytes, k: int, n: int) -> ObjArray:
    """R's mask ``V`` (``k x n``) of a Beaver matrix triple."""
    return _random(seed, label + b"|V", (k, n))


def dealer_share(
    seed_left: bytes, seed_right: bytes, label: bytes, m: int, k: int, n: int
) -> ObjArray:
    """The dealer's message to R: ``W_R = U @ V - W_L (mod 2^256)``."""
    u, w_left = left_masks(seed_left, label, m, k, n)
    v = right_mask(seed_right, label, k, n)
    return _reduce(u.dot(v) - w_left)


def left_share(a: ObjArray, f: ObjArray, w_left: ObjArray) -> ObjArray:
    """L's share ``A @ F + W_L (mod 2^256)``."""
    return _reduce(a.dot(f) + w_left)


def right_share(e: ObjArray, v: ObjArray, w_right: ObjArray) -> ObjArray:
    """R's share ``E @ V + W_R (mod 2^256)``."""
    return _reduce(e.dot(v) + w_right)


class PaillierKey:
    """A Paillier key pair (``phe``) with fast encryption by the key owner.

    Args:
        bits: Length of the modulus ``N``.
    """

    def __init__(self, bits: int) -> None:
        public, private = paillier.generate_paillier_keypair(n_length=bits)
        self.public: Any = public
        self.private: Any = private
        self.n = int(public.n)
        self.nsquare = int(public.nsquare)
        p, q = int(private.p), int(private.q)
        self._p2, self._q2 = gmpy2.mpz(p * p), gmpy2.mpz(q * q)
        # r^N mod p^2 = r^(N mod p(p-1)) mod p^2, since the group has order p(p-1)
        self._ep, self._eq = gmpy2.mpz(self.n % (p * (p - 1))), gmpy2.mpz(self.n % (q * (q - 1)))
        self._q2_inv = gmpy2.invert(self._q2, self._p2)

    def encrypt(self, values: npt.ArrayLike) -> ObjArray:
        """Encrypt signed integers (each reduced modulo ``N``), element by element.

        Returns:
            An object array of ciphertexts (ints modulo ``N^2``) of the same shape.
        """
        flat = np.asarray(values, dtype=object).reshape(-1).tolist()
        nsquare = gmpy2.mpz(self.nsquare)
        n = gmpy2.mpz(self.n)
        out = []
        for value in flat:
            r = gmpy2.mpz(secrets.randbelow(self.n - 1) + 1)
            rp = gmpy2.powmod(r, self._ep, self._p2)
            rq = gmpy2.powmod(r, self._eq, self._q2)
            rn = rq + self._q2 * ((rp - rq) * self._q2_inv % self._p2)  # CRT
            nude = (1 + n * (int(value) % self.n)) % nsquare
            out.append(int(nude * rn % nsquare))
        result = np.empty(len(out), dtype=object)
        result[:] = out
        return result.reshape(np.shape(values))

    def decrypt(self, ciphertexts: npt.ArrayLike) -> ObjArray:
        """Decrypt ciphertexts to residues in ``[0, N)``, same shape."""
        flat = np.asarray(ciphertexts, dtype=object).reshape(-1).tolist()
        result = np.empty(len(flat), dtype=object)
        result[:] = [int(self.private.raw_decrypt(int(c))) for c in flat]
        return result.reshape(np.shape(ciphertexts))


def valid_ciphertexts(n: int, ciphertexts: npt.ArrayLike) -> bool:
    """Whether every entry is a Paillier ciphertext under modulus ``n``.

    A ciphertext is a unit of ``Z_(N^2)``: ``0 < c < N^2`` and ``gcd(c, N) =
    1``. Anything else is no encryption of any plaintext; it would make the
    modular inverse in :func:`encrypted_matmul` fail, or decrypt to garbage.
    """
    nsquare = gmpy2.mpz(n) * gmpy2.mpz(n)
    modulus = gmpy2.mpz(n)
    for value in np.asarray(ciphertexts, dtype=object).reshape(-1).tolist():
        if not isinstance(value, int) or not 0 < value < nsquare:
            return False
        if gmpy2.gcd(value, modulus) != 1:
            return False
    return True


def encrypted_matmul(n: int, ciphertexts: ObjArray, plain: ObjArray) -> ObjArray:
    """Homomorphically compute ``Enc(P) @ Q`` for ciphertexts ``Enc(P)`` and integers ``Q``.

    Args:
        n: The public modulus ``N``.
        ciphertexts: ``a x k`` ciphertexts of ``P``.
        plain: ``k x b`` signed integers ``Q`` (short exponents).

    Returns:
        ``a x b`` ciphertexts of ``P @ Q (mod N)`` (not yet re-randomised).

    Raises:
        ValueError: If a ciphertext is not a unit modulo ``N^2`` (check them
            first with :func:`valid_ciphertexts` to name the sender).
    """
    nsquare = gmpy2.mpz(n * n)
    rows, inner = ciphertexts.shape
    cols = plain.shape[1]
    cipher = [[gmpy2.mpz(int(c)) for c in row] for row in ciphertexts.tolist()]
    exponents = [[int(e) for e in row] for row in plain.T.tolist()]  # column by column
    out = np.empty((rows, cols), dtype=object)
    for i in range(rows):
        row = cipher[i]
        for j in range(cols):
            positive, negative = gmpy2.mpz(1), gmpy2.mpz(1)
            for t, e in enumerate(exponents[j]):
                if e > 0:
                    positive = positive * gmpy2.powmod(row[t], e, nsquare) % nsquare
                elif e < 0:
                    negative = negative * gmpy2.powmod(row[t], -e, nsquare) % nsquare
            if inner and negative != 1:
                try:
                    positive = positive * gmpy2.invert(negative, nsquare) % nsquare
                except ZeroDivisionError:
                    # only if a ciphertext shares a factor with N: see valid_ciphertexts
                    raise ValueError("a ciphertext is not invertible modulo N^2") from None
            out[i, j] = int(positive)
    return out


def mask_ciphertexts(public: Any, ciphertexts: ObjArray) -> tuple[ObjArray, ObjArray]:
    """Add a fresh uniform mask to every ciphertext (which also re-randomises it).

    Args:
        public: The encryptor's ``phe`` public key.
        ciphertexts: Ciphertexts of the product.

    Returns:
        ``(masked ciphertexts, this party's shares -r mod N)``, both object arrays.
    """
    n = int(public.n)
    nsquare = int(public.nsquare)
    flat = np.asarray(ciphertexts, dtype=object).reshape(-1).tolist()
    out, shares = [], []
    for c in flat:
        r = secrets.randbelow(n)
        out.append(int(gmpy2.mpz(int(c)) * public.raw_encrypt(r) % nsquare))
        shares.append((-r) % n)
    masked_c = np.empty(len(out), dtype=object)
    masked_c[:] = out
    own = np.empty(len(shares), dtype=object)
    own[:] = shares
    shape = np.shape(ciphertexts)
    return masked_c.reshape(shape), own.reshape(shape)
