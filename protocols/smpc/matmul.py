"""Secure two-party matrix product: fixed point, Beaver matrix triples and Paillier.

The pure half of the secure matrix product used by :mod:`protocols.smpc.regression`
(the cross blocks ``X_a' X_b`` of vertical regression, and ``matrix_product``).
Party L holds ``A`` (``m x k``), party R holds ``B`` (``k x n``); at the end L
and R hold additive shares ``S_L + S_R = A @ B (mod M)`` of the product.
Nothing here does I/O; the message flow lives in the protocol module.

Fixed point
    A real ``x`` is encoded as the signed integer ``round(x * 2^f)`` with
    ``f = DEFAULT_FRAC_BITS = 40`` fractional bits (resolution ``2^-40 ~=
    9.1e-13``); the product of two encodings carries ``2f`` fractional bits
    and is decoded by dividing by ``2^(2f)``. The error of one entry of the
    decoded product is at most ``sum_t (|a_t| + |b_t|) * 2^-(f+1) + k *
    2^-(2f+2)`` from rounding the inputs, plus one float64 rounding
    (relative ``2^-53``) of the result.

Range
    Shares live in ``Z_2^256`` (dealer path) or in the Paillier plaintext
    space ``Z_N`` with ``N >= 2^1023`` (two-party path), and each product
    entry must stay below ``2^255`` in magnitude so that it cannot wrap. A
    party only sees its own operand, so the bound is split between the two:
    with inner dimension ``k`` every encoded entry must satisfy ``|x * 2^f| <
    2^h`` with ``h = floor((255 - ceil(log2 k)) / 2)``. Then ``k * 2^h * 2^h
    <= 2^255``. For ``f = 40`` and ``k <= 2^20`` (a million records) that
    allows ``|x| < 2^77 ~= 1.5e23``; anything larger raises
    :class:`ProductOverflow` (a :class:`~protocols.smpc.ring.FixedPointOverflow`)
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

from protocols.smpc import ring

__all__ = [
    "DEFAULT_FRAC_BITS",
    "MAX_FRAC_BITS",
    "MODULUS",
    "RING_BITS",
    "PaillierKey",
    "ProductOverflow",
    "dealer_share",
    "decode_product",
    "encode_operand",
    "encrypted_matmul",
    "ints_from_bytes",
    "ints_to_bytes",
    "left_masks",
    "left_share",
    "mask_ciphertexts",
    "masked",
    "max_operand",
    "operand_bound_bits",
    "right_mask",
    "right_share",
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
        OverflowError.__init__(
            self,
            f"value out of range for the secure matrix product: with frac_bits={frac_bits} "
            f"and {inner} terms per product entry, every |value| must be below {bound:.6g} "
            "so that no entry can wrap around the ring; scale the data down or use fewer "
            "fractional bits",
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
    values = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("cannot encode NaN or infinity; remove or impute missing values first")
    with np.errstate(over="ignore"):  # inf fails the range check below
        scaled = np.rint(np.ldexp(values, frac_bits))
    bits = operand_bound_bits(inner)
    if values.size and float(np.max(np.abs(scaled))) >= math.ldexp(1.0, bits):
        raise ProductOverflow(bound=max_operand(inner, frac_bits), frac_bits=frac_bits, inner=inner)
    # every scaled value is an integral float, so int() is exact
    out = np.empty(values.shape, dtype=object)
    out.reshape(-1)[:] = [int(v) for v in scaled.reshape(-1).tolist()]
    return out


def decode_product(total: ObjArray, modulus: int, frac_bits: int) -> F64Array:
    """Decode a revealed product (``2 * frac_bits`` fractional bits) to floats.

    Args:
        total: Ring elements (reduced modulo ``modulus`` here).
        modulus: The share ring's modulus.
        frac_bits: The operands' fractional bits.

    Returns:
        ``v / 2^(2f)`` with ``v`` read as a signed residue, correctly rounded.
    """
    half = modulus >> 1
    flat = []
    for value in np.asarray(total, dtype=object).reshape(-1).tolist():
        residue = int(value) % modulus
        signed = residue - modulus if residue >= half else residue
        flat.append(math.ldexp(float(signed), -2 * frac_bits))
    return np.array(flat, dtype=np.float64).reshape(np.shape(total))


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


def encrypted_matmul(n: int, ciphertexts: ObjArray, plain: ObjArray) -> ObjArray:
    """Homomorphically compute ``Enc(P) @ Q`` for ciphertexts ``Enc(P)`` and integers ``Q``.

    Args:
        n: The public modulus ``N``.
        ciphertexts: ``a x k`` ciphertexts of ``P``.
        plain: ``k x b`` signed integers ``Q`` (short exponents).

    Returns:
        ``a x b`` ciphertexts of ``P @ Q (mod N)`` (not yet re-randomised).
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
                positive = positive * gmpy2.invert(negative, nsquare) % nsquare
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
