"""Curve25519 primitives for private set intersection and the set-union mix-net.

What this is
    The group operations behind PSI by *commutative encryption*, the idea of
    Meadows (1986, "A more efficient cryptographic matchmaking protocol for use
    in the absence of a continuously available third party", IEEE S&P) and of
    Huberman, Franklin and Hogg (1999, "Enhancing privacy and trust in
    electronic communities", ACM EC), plus the layered sealed boxes of the
    union's decryption mix-net (Chaum 1981, "Untraceable electronic mail,
    return addresses, and digital pseudonyms", CACM). This module holds only
    pure functions; the message flow lives in :mod:`protocols.psi.service`.

The math
    Let ``G`` be the prime-order subgroup of Curve25519, of order
    ``L = 2**252 + 27742317777372353535851937790883648493``, and ``H`` a hash
    onto ``G``. Each party ``i`` draws a secret scalar ``a_i``. X25519 (RFC
    7748) computes ``[c(a)]P`` from the u-coordinate of ``P``, where ``c``
    *clamps* the scalar (clears its three low bits, sets bit 254). Clamping is
    a fixed function of the scalar, and multiplication by integers commutes::

        X25519(b, X25519(a, u(P)))  ==  u([c(b) * c(a)] P)  ==  X25519(a, X25519(b, u(P)))

    so the order in which parties blind does not matter. ``c(a)`` is never a
    multiple of ``L`` (it is a multiple of 8 below ``2**255 < 8 L`` and ``L``
    is odd), so ``P -> [c(a)]P`` is a bijection of ``G``: distinct items stay
    distinct (up to collisions of ``H``, probability about ``n**2 / 2**252``).
    Under the decisional Diffie-Hellman assumption in ``G``, with ``H`` as
    below, a blinded point reveals nothing about its item to anyone who lacks
    the scalar. This is the semi-honest setting.

    A u-coordinate identifies ``P`` and ``-P``. That is harmless: ``H`` is
    only ever compared after blinding, ``[k](-P) = -[k]P`` keeps the pair
    together, and a collision ``H(x) = -H(y)`` is as unlikely as
    ``H(x) = H(y)``.

The hash onto the group
    ``H(x)`` is libsodium's ``crypto_core_ed25519_from_uniform(r)``, with
    ``r`` the first 32 bytes of ``SHA-512(len(domain) || domain || x)``.
    libsodium reads the low 255 bits of ``r`` as a field element (reduced
    modulo p, bias below ``2**-250``) and the top bit as the sign of the
    Edwards x-coordinate, applies Elligator 2 exactly as RFC 9380, section
    6.7.1 (``map_to_curve_elligator2``, ``Z = 2``), and multiplies the result
    by the cofactor 8: RFC 9380's ``encode_to_curve`` shape (map, then clear
    the cofactor). So ``H(x)`` is a point of ``G``, as an Edwards point. The
    length prefix makes ``(domain, x)`` parse uniquely, so two domains never
    collide.

    ``hash_to_point(x)`` is the Montgomery u-coordinate of ``H(x)``, by the
    birational map of RFC 7748, section 4.1: ``u = (1 + y) / (1 - y) mod p``,
    where ``y`` is the low 255 bits of the compressed Edwards encoding (the
    top bit, the sign of x, does not matter: ``P`` and ``-P`` share ``u``).
    This is coordinate arithmetic only, no group law: it needs no
    decompression, and a whole list shares one modular inversion
    (Montgomery's trick). It gives what libsodium's
    ``crypto_sign_ed25519_pk_to_curve25519`` gives, which the unit tests
    check, without that function's decompression and subgroup check (58
    microseconds a point). Only the identity (``y = 1``) has no u-coordinate;
    it, or a point of small order, is refused with a ``ValueError`` naming
    the item, though ``H`` reaches one with negligible probability.

    Cost: ``from_uniform`` takes about 27 microseconds per item on the
    reference machine and the map to ``u`` about 3, against 6 for the
    hand-written ``gmpy2`` Elligator 2 that this module used before. We
    accept the difference because nothing of the curve is hand-written now,
    and libsodium's map is constant-time, which the Python one was not.

    *One map, not two.* RFC 9380 builds a random oracle as ``map(u0) +
    map(u1)``, because one Elligator map reaches only about half of the curve
    and so is not indifferentiable from a random oracle. libsodium's
    ``from_uniform`` is a single Elligator 2 map followed by cofactor
    clearing, and we argue that one map suffices here: ``f = [8] o
    Elligator2`` is a *weak encoding* in the sense of Brier, Coron, Icart,
    Madore, Randriam and Tibouchi ("Efficient indifferentiable hashing into
    ordinary elliptic curves", CRYPTO 2010): efficiently computable,
    bounded-to-one (at most 16 preimages, field element and sign bit, per
    point) and samplable (Elligator 2 is invertible, so a preimage of a given
    point can be drawn with the right distribution by rejection sampling).
    For such an ``f``, ``f(h(x))`` with ``h`` a random oracle can stand in
    for a random oracle onto ``G`` in proofs that program the oracle as
    ``H(x) = [r]B`` for a random known ``r``, which is how the DDH-based
    simulation proofs of DH-PSI use it. A second map would need a second
    ``from_uniform`` and an Edwards point addition, and would double the
    cost of hashing.

    The birational map runs in Python, and ``gmpy2``'s arithmetic, its
    modular inversion above all, is not constant-time, so a process on the
    same host that can time this finely could learn bits of ``H(x)`` for our
    own items. The server host is trusted in this threat model; the hash
    onto the curve and the scalar multiplications, which involve the
    secrets, are libsodium's constant-time code.

Why libsodium and X25519
    Every scalar multiplication is libsodium's constant-time X25519,
    ``crypto_scalarmult`` (36 microseconds on the reference machine, against
    115 for ``crypto_scalarmult_ed25519_noclamp``, which decompresses and
    checks the subgroup on every call). It is called through PyNaCl's own
    cffi handle (``nacl._sodium``) with a reused output buffer, which saves 3
    microseconds per call over ``nacl.bindings``; if that private module ever
    goes away, ``nacl.bindings`` is used. Nothing here implements curve
    arithmetic by hand; the only field arithmetic in Python is the
    birational map from an Edwards y-coordinate to a Montgomery u-coordinate.

Points received from a peer
    :func:`validate_points` (and :func:`reblind`, which runs the same check in
    the worker processes) accepts a 32-byte string only if it is the canonical
    encoding (``u < p``, top bit clear) of a u-coordinate other than those of
    the points of small order (of the curve and of its twist). Torsion
    components are not detected, and need not be: a clamped scalar is a
    multiple of the cofactor 8, so ``[c(a)](P + T) = [c(a)]P`` wipes them.
    Nor are points of the quadratic twist: X25519 is twist-secure (the twist's
    order is 4 times a prime of 253 bits), so with a clamped scalar no input,
    on the curve or not, reveals anything about the scalar (Bernstein,
    "Curve25519: new Diffie-Hellman speed records", PKC 2006; RFC 7748,
    section 7), and an honest party's points, all on the curve, never equal a
    point of the twist, so such a point can only remove the sender's own items
    from the result. Session 1 also tested "on the curve" with a Legendre
    symbol; at 3 microseconds a point, that was 1.7 s of the 42 s of CPU of a
    three-party intersection of 100,000 items each, for no security gain. The
    checks catch malformed messages early and keep the equality of byte
    strings equal to the equality of points.

The mix-net layers
    :func:`seal_onions` wraps each (padded) item in one libsodium sealed box
    (``crypto_box_seal``: an ephemeral X25519 key, XSalsa20-Poly1305) per
    party, the first party's layer outermost; :func:`peel_onions` removes
    one layer. Every layer adds :data:`ONION_LAYER_BYTES`, and items are padded
    to one length (:func:`pad_item`) so sizes reveal nothing.

Parallelism
    :func:`hash_and_blind`, :func:`reblind`, :func:`validate_points`,
    :func:`seal_onions` and :func:`peel_onions` split lists of at least
    ``PARALLEL_THRESHOLD`` items into chunks for a ``ProcessPoolExecutor``. The
    pool is created lazily, reused, and closed by :func:`shutdown_pool`. It
    uses the ``forkserver`` start method (``spawn`` where that is missing):
    forking a process that runs an asyncio loop and threads is unsafe. Each
    worker runs :func:`fdrtd_server.lifeline.exit_with`, so that none outlives
    the server, even one killed with SIGKILL (and with the workers go the fork
    server and the resource tracker). These
    functions block, so an asyncio caller runs them through
    ``asyncio.to_thread``. Secret scalars and keys go to the local worker
    processes through a pipe and never leave the machine.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import re
import secrets
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor
from typing import Any

import gmpy2
from nacl import bindings as _sodium
from nacl.exceptions import CryptoError

from fdrtd_server.lifeline import exit_with

__all__ = [
    "ONION_LAYER_BYTES",
    "PARALLEL_THRESHOLD",
    "POINT_BYTES",
    "SCALAR_BYTES",
    "blind",
    "blind_each",
    "decode_item",
    "default_workers",
    "encode_item",
    "hash_and_blind",
    "hash_to_point",
    "pad_item",
    "peel_onions",
    "random_scalar",
    "reblind",
    "seal_onions",
    "shutdown_pool",
    "unpad_item",
    "validate_points",
]

POINT_BYTES = 32
"""Length of a point on the wire: its little-endian Montgomery u-coordinate."""

SCALAR_BYTES = 32
"""Length of an X25519 scalar."""

ONION_LAYER_BYTES = 48
"""Bytes one sealed-box layer adds: an ephemeral public key and a Poly1305 tag."""

PARALLEL_THRESHOLD = 5000
"""Lists shorter than this are processed in the calling process.

Below it, the cost of sending chunks to worker processes (and of starting the
pool the first time) outweighs the gain.
"""

_P = 2**255 - 19
_Y_MASK = (1 << 255) - 1  # the y-coordinate in a compressed Edwards point; bit 255 is x's sign
_P_MPZ = gmpy2.mpz(_P)
_ONE = gmpy2.mpz(1)
# u-coordinates of the points of small order on Curve25519 and its twist
# (canonical encodings only; non-canonical ones fail the u < p check).
_SMALL_ORDER_U = frozenset(
    {
        0,
        1,
        _P - 1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
    }
)
_MAX_DOMAIN_BYTES = 255
_CHUNKS_PER_WORKER = 4  # several chunks per worker even out uneven progress
_PAD_MARK = b"\x80"  # ISO/IEC 7816-4 padding: 0x80, then zeros
_INT_TEXT = re.compile(rb"-?(0|[1-9][0-9]*)")

# Type tags for encode_item: one byte in front of the payload, so values of
# different types never encode alike (1, 1.0, "1" and b"1" are four items).
_TAG_BYTES = b"b"
_TAG_STR = b"s"
_TAG_INT = b"i"
_TAG_FLOAT = b"f"

_pools: dict[int, ProcessPoolExecutor] = {}
_pools_lock = threading.Lock()


def encode_item(value: str | int | float | bytes) -> bytes:
    """Encode a value as the canonical bytes that PSI hashes.

    The encoding is a one-byte type tag followed by a payload, so values of
    different types never collide: ``1``, ``1.0``, ``"1"`` and ``b"1"`` are four
    different items. All parties must encode with this function for their
    items to match (the service turns integral floats into ints first).

    * ``bytes``: tag ``b`` plus the bytes unchanged.
    * ``str``: tag ``s`` plus UTF-8, exactly as given. There is no Unicode
      normalisation or case folding; the caller normalises if it wants to.
    * ``int``: tag ``i`` plus the decimal ASCII digits (with ``-`` for negative
      numbers).
    * ``float``: tag ``f`` plus IEEE 754 binary64, big-endian. ``-0.0`` is
      encoded as ``0.0`` because the two compare equal.

    Args:
        value: The item to encode.

    Returns:
        The canonical encoding of ``value``.

    Raises:
        TypeError: If ``value`` is a ``bool`` (ambiguous with ``int``) or of
            any other unsupported type.
        ValueError: If ``value`` is a NaN float (NaN equals nothing, so it
            cannot be intersected), or a ``str`` that is not valid Unicode
            (a lone surrogate).
    """
    # bool is a subclass of int; check it before int so True never becomes 1.
    if isinstance(value, bool):
        raise TypeError("encode_item does not accept bool; convert it to int or str first")
    if isinstance(value, bytes):
        return _TAG_BYTES + value
    if isinstance(value, str):
        return _TAG_STR + value.encode("utf-8")
    if isinstance(value, int):
        return _TAG_INT + str(value).encode("ascii")
    if isinstance(value, float):
        if math.isnan(value):
            raise ValueError("encode_item does not accept NaN; drop or replace NaN values first")
        # Adding 0.0 turns -0.0 into 0.0 and leaves every other value unchanged.
        return _TAG_FLOAT + struct.pack(">d", value + 0.0)
    raise TypeError(
        f"encode_item accepts str, int, float or bytes, not {type(value).__name__}; "
        "convert the value first"
    )


def decode_item(encoded: bytes) -> str | int | float | bytes:
    """Invert :func:`encode_item`, accepting only canonical encodings.

    ``encode_item(decode_item(e)) == e`` holds for every accepted ``e``, so a
    decoded item is never a second spelling of another one.

    Args:
        encoded: Bytes produced by :func:`encode_item`.

    Returns:
        The value.

    Raises:
        ValueError: If ``encoded`` is not a canonical encoding (unknown tag,
            invalid UTF-8, malformed integer, wrong float length, NaN or
            ``-0.0``). The message never echoes the bytes.
    """
    if not isinstance(encoded, bytes) or not encoded:
        raise ValueError("an encoded item must be non-empty bytes")
    tag, payload = encoded[:1], encoded[1:]
    if tag == _TAG_BYTES:
        return payload
    if tag == _TAG_STR:
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("an encoded text item is not valid UTF-8") from None
    if tag == _TAG_INT:
        if not _INT_TEXT.fullmatch(payload) or payload == b"-0":
            raise ValueError("an encoded integer item is not canonical decimal digits")
        return int(payload)
    if tag == _TAG_FLOAT:
        if len(payload) != 8:
            raise ValueError("an encoded float item must have 8 bytes")
        value: float = struct.unpack(">d", payload)[0]
        if math.isnan(value) or payload == struct.pack(">d", -0.0):
            raise ValueError("an encoded float item must not be NaN or -0.0")
        return value
    raise ValueError("an encoded item has an unknown type tag")


def random_scalar() -> bytes:
    """Draw a secret blinding scalar: 32 random bytes, clamped as X25519 does.

    Clamping here, as well as inside X25519, gives each scalar one canonical
    representation; it keeps 251 random bits.

    Returns:
        A 32-byte clamped scalar.
    """
    scalar = bytearray(secrets.token_bytes(SCALAR_BYTES))
    scalar[0] &= 248
    scalar[31] &= 127
    scalar[31] |= 64
    return bytes(scalar)


def hash_to_point(item: bytes, domain: bytes) -> bytes:
    """Hash an item onto the prime-order subgroup of Curve25519.

    ``H(item)`` is libsodium's ``crypto_core_ed25519_from_uniform`` (Elligator
    2, then cofactor clearing) on the first 32 bytes of
    ``SHA-512(len(domain) || domain || item)``; the result is its Montgomery
    u-coordinate (see the module docstring).

    Args:
        item: The encoded item, usually from :func:`encode_item`.
        domain: A domain-separation tag of 1 to 255 bytes, for example the
            protocol name and session id. All parties must use the same tag.

    Returns:
        The 32-byte u-coordinate of ``H(item)``.

    Raises:
        ValueError: If ``domain`` is empty or longer than 255 bytes, or (with
            negligible probability) the item hashes to the identity.
    """
    _check_domain(domain)
    return _hash_to_points([item], _domain_prefix(domain), 0)[0]


def blind(points: Sequence[bytes], scalar: bytes) -> list[bytes]:
    """Multiply each point by the secret scalar with X25519, in the calling process.

    Args:
        points: u-coordinates of points on Curve25519.
        scalar: A scalar from :func:`random_scalar`.

    Returns:
        The blinded points (in the prime-order subgroup), in the input order.

    Raises:
        ValueError: If the scalar is not 32 clamped bytes, or if a point is not
            valid (see :func:`validate_points`; the message gives the index,
            never the bytes).
    """
    _check_scalar(scalar)
    return _blind_chunk(list(points), 0, scalar)


def blind_each(points: Sequence[bytes], scalars: Sequence[bytes]) -> list[bytes]:
    """Multiply each point by a scalar of its own with X25519, in the calling process.

    For protocols that need a fresh scalar per point (an equality test per
    point, as the secure OR of :mod:`fdrtd_server.sdk.smpc` runs), so that
    equal points do not give equal results.

    Args:
        points: u-coordinates of points on Curve25519, e.g. from a peer.
        scalars: One scalar from :func:`random_scalar` per point.

    Returns:
        ``X25519(scalars[i], points[i])`` for each ``i``.

    Raises:
        ValueError: If the lengths differ, a scalar is not 32 clamped bytes,
            or a point is not valid (see :func:`validate_points`; the message
            gives the index, never the bytes).
    """
    if len(points) != len(scalars):
        raise ValueError(f"{len(points)} points but {len(scalars)} scalars")
    x25519 = _x25519_for_thread()
    out: list[bytes] = []
    for index, (point, scalar) in enumerate(zip(points, scalars, strict=True)):
        _check_scalar(scalar)
        blinded = x25519(scalar, point) if _is_valid_u(point) else None
        if blinded is None:  # a zero result cannot happen after the check
            raise ValueError(_invalid_point_message(index))
        out.append(blinded)
    return out


def hash_and_blind(
    items: Sequence[bytes],
    scalar: bytes,
    domain: bytes,
    *,
    workers: int | None = None,
) -> list[bytes]:
    """Hash each item onto the curve and blind it: ``X25519(scalar, H(x))``.

    Lists of at least ``PARALLEL_THRESHOLD`` items are processed in chunks by
    the shared process pool; shorter lists, or ``workers=1``, run in the
    calling process. The result is the same either way.

    Args:
        items: Encoded items (see :func:`encode_item`).
        scalar: This party's secret scalar from :func:`random_scalar`.
        domain: The domain-separation tag (see :func:`hash_to_point`).
        workers: Number of worker processes. Defaults to
            :func:`default_workers`.

    Returns:
        The blinded points, in the input order.

    Raises:
        ValueError: If the scalar or domain is invalid, or ``workers < 1``.
        TypeError: If an item is not ``bytes``.
    """
    _check_scalar(scalar)
    _check_domain(domain)
    items = list(items)
    for index, item in enumerate(items):
        if not isinstance(item, bytes):
            raise TypeError(
                f"item at index {index} is {type(item).__name__}, not bytes; "
                "encode items with encode_item first"
            )
    return _run(_hash_and_blind_chunk, items, (scalar, domain), workers)


def reblind(
    points: Sequence[bytes],
    scalar: bytes,
    *,
    workers: int | None = None,
) -> list[bytes]:
    """Validate a peer's points and blind them with this party's scalar.

    It is :func:`blind` with the parallel strategy of :func:`hash_and_blind`;
    every point passes the checks of :func:`validate_points` first.

    Args:
        points: u-coordinates received from a peer.
        scalar: This party's secret scalar from :func:`random_scalar`.
        workers: Number of worker processes. Defaults to
            :func:`default_workers`.

    Returns:
        The blinded points, in the input order.

    Raises:
        ValueError: If the scalar is invalid, ``workers < 1``, or a point is
            not valid (the message gives the index, never the bytes).
    """
    _check_scalar(scalar)
    return _run(_blind_chunk, list(points), (scalar,), workers)


def validate_points(points: Sequence[bytes], *, workers: int | None = None) -> None:
    """Check that every point is a canonical u-coordinate of a point not of small order.

    A point is accepted if it is 32 bytes, the canonical encoding of a field
    element (``u < 2**255 - 19``), and not the u-coordinate of a point of
    small order. Torsion components and points of the twist are not detected;
    see the module docstring for why they do no harm.

    Args:
        points: 32-byte u-coordinates.
        workers: Number of worker processes for long lists. Defaults to
            :func:`default_workers`.

    Raises:
        ValueError: For the first invalid point; the message names its index
            and never echoes its bytes.
    """
    _run(_validate_chunk, list(points), (), workers)


def pad_item(item: bytes, length: int) -> bytes:
    """Pad an item to ``length`` bytes: the item, ``0x80``, then zeros (ISO/IEC 7816-4).

    Args:
        item: The encoded item.
        length: The padded length; at least ``len(item) + 1``.

    Returns:
        The padded item.

    Raises:
        ValueError: If the item does not fit.
    """
    if len(item) + 1 > length:
        raise ValueError(f"an item of {len(item)} bytes does not fit a padded length of {length}")
    return item + _PAD_MARK + bytes(length - len(item) - 1)


def unpad_item(padded: bytes) -> bytes:
    """Remove the padding added by :func:`pad_item`.

    Args:
        padded: A padded item.

    Returns:
        The item.

    Raises:
        ValueError: If the padding is malformed.
    """
    stripped = padded.rstrip(b"\x00")
    if not stripped.endswith(_PAD_MARK):
        raise ValueError("a padded item does not end with the 0x80 padding mark")
    return stripped[:-1]


def seal_onions(
    items: Sequence[bytes],
    public_keys: Sequence[bytes],
    *,
    workers: int | None = None,
) -> list[bytes]:
    """Wrap each item in one sealed box per public key, the first key's layer outermost.

    The result for item ``x`` is ``seal(k_0, seal(k_1, ... seal(k_last, x)))``,
    ``len(x) + ONION_LAYER_BYTES * len(public_keys)`` bytes long, so the owner
    of ``k_0`` peels first.

    Args:
        items: Padded items (all of one length, so that onions are alike).
        public_keys: The X25519 public keys of the mix-net's parties, in order.
        workers: Number of worker processes. Defaults to :func:`default_workers`.

    Returns:
        The onions, in the input order.

    Raises:
        ValueError: If a public key is not a valid point (by index).
    """
    keys = list(public_keys)
    for index, key in enumerate(keys):
        if not _is_valid_u(key):
            raise ValueError(f"public key at index {index} is not a valid curve point")
    return _run(_seal_chunk, list(items), (b"".join(keys),), workers)


def peel_onions(
    onions: Sequence[bytes],
    private_key: bytes,
    *,
    workers: int | None = None,
) -> list[bytes]:
    """Remove this party's (outermost) sealed-box layer from each onion.

    Args:
        onions: Onions whose outermost layer was sealed to ``private_key``.
        private_key: This party's 32-byte X25519 private key.
        workers: Number of worker processes. Defaults to :func:`default_workers`.

    Returns:
        The inner onions (or padded items, for the last party), in input order.

    Raises:
        ValueError: If the key is not 32 bytes, or an onion does not decrypt
            (the message gives the index).
    """
    if not isinstance(private_key, bytes) or len(private_key) != SCALAR_BYTES:
        raise ValueError(f"private key must be {SCALAR_BYTES} bytes")
    return _run(_peel_chunk, list(onions), (private_key,), workers)


def default_workers() -> int:
    """Return the number of worker processes used when none is given.

    Returns:
        The number of CPUs this process may run on (its affinity mask where
        the platform reports one, else ``os.cpu_count()``), at least 1.
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def shutdown_pool() -> None:
    """Shut down the shared worker pools and wait for their processes to exit.

    Safe to call at any time and more than once; the next parallel call
    starts a fresh pool. Call it from the server's shutdown hook and at the
    end of test sessions.
    """
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


# --- internals -------------------------------------------------------------------------


def _check_scalar(scalar: bytes) -> None:
    if not isinstance(scalar, bytes) or len(scalar) != SCALAR_BYTES:
        raise ValueError(f"scalar must be {SCALAR_BYTES} bytes; draw it with random_scalar()")
    if scalar[0] & 7 or scalar[31] & 128 or not scalar[31] & 64:
        raise ValueError("scalar must be clamped as X25519 does; draw it with random_scalar()")


def _check_domain(domain: bytes) -> None:
    if not isinstance(domain, bytes) or not 1 <= len(domain) <= _MAX_DOMAIN_BYTES:
        raise ValueError(
            f"domain must be 1 to {_MAX_DOMAIN_BYTES} bytes, e.g. b'fdrtd-psi/' + session id"
        )


def _domain_prefix(domain: bytes) -> bytes:
    return bytes([len(domain)]) + domain


def _hash_to_points(items: list[bytes], prefix: bytes, offset: int) -> list[bytes]:
    """u-coordinates of ``H(item) = from_uniform(SHA-512(prefix || item)[:32])``.

    ``offset`` is the position of ``items[0]`` in the caller's list, so that an
    error names the global index.
    """
    sha512, from_uniform = hashlib.sha512, _from_uniform_for_thread()
    edwards = [from_uniform(sha512(prefix + item).digest()[:POINT_BYTES]) for item in items]
    return _edwards_to_u(edwards, offset)


def _edwards_to_u(points: list[bytes], offset: int) -> list[bytes]:
    """Map compressed Edwards points to Montgomery u-coordinates: ``u = (1 + y) / (1 - y)``.

    This is the birational map of RFC 7748, section 4.1: coordinate arithmetic
    only, no group law, and no decompression (``y`` is the low 255 bits of the
    encoding; the sign of x does not change ``u``). Montgomery's trick shares
    one ``gmpy2.invert`` among the whole list, at three multiplications per
    point. The points must be canonical encodings of points of the
    prime-order subgroup, as ``from_uniform`` returns; nothing else is
    checked.

    Raises:
        ValueError: If a point is the identity (``y = 1``, which has no
            u-coordinate) or maps to the u-coordinate of a point of small
            order; the message names the item's index ``offset + i``.
    """
    mpz, p = gmpy2.mpz, _P_MPZ
    ys = [mpz(int.from_bytes(point, "little") & _Y_MASK) for point in points]
    for index, y in enumerate(ys):
        if y == 1:
            raise ValueError(_small_order_hash_message(offset + index))
    denominators = [(1 - y) % p for y in ys]
    prefix_products = [_ONE] * len(denominators)
    accumulated = _ONE
    for index, denominator in enumerate(denominators):
        prefix_products[index] = accumulated
        accumulated = accumulated * denominator % p
    inverse = gmpy2.invert(accumulated, p)
    out = [b""] * len(denominators)
    for index in range(len(denominators) - 1, -1, -1):
        u = int((1 + ys[index]) * (inverse * prefix_products[index]) % p)
        inverse = inverse * denominators[index] % p
        if u in _SMALL_ORDER_U:
            raise ValueError(_small_order_hash_message(offset + index))
        out[index] = u.to_bytes(POINT_BYTES, "little")
    return out


def _small_order_hash_message(index: int) -> str:
    # H reaches the identity or a point of small order with negligible probability.
    return (
        f"item at index {index} hashed to the identity or another point of small order; "
        "use another domain"
    )


def _x25519_function() -> Callable[[bytes, bytes], bytes | None]:
    """X25519 through PyNaCl's cffi handle with a reused buffer; None for a zero result."""
    try:
        from nacl._sodium import ffi, lib
    except ImportError:  # pragma: no cover - only if PyNaCl reorganises its internals

        def portable(scalar: bytes, point: bytes) -> bytes | None:
            try:
                result: bytes = _sodium.crypto_scalarmult(scalar, point)
            except (CryptoError, RuntimeError):
                return None
            return result

        return portable

    buffer = ffi.new("unsigned char[32]")
    view = ffi.buffer(buffer)
    mult = lib.crypto_scalarmult

    def direct(scalar: bytes, point: bytes) -> bytes | None:
        # libsodium refuses (returns -1 for) an all-zero result: a small-order input.
        if mult(buffer, scalar, point) != 0:
            return None
        result: bytes = view[:]
        return result

    return direct


def _from_uniform_function() -> Callable[[bytes], bytes]:
    """``crypto_core_ed25519_from_uniform`` through PyNaCl's cffi handle with a reused buffer.

    2 of the 26 microseconds a call costs through ``nacl.bindings`` are its
    argument checks and buffer; the input here is always 32 bytes of SHA-512.
    """
    try:
        from nacl._sodium import ffi, lib
    except ImportError:  # pragma: no cover - only if PyNaCl reorganises its internals
        portable: Callable[[bytes], bytes] = _sodium.crypto_core_ed25519_from_uniform
        return portable

    buffer = ffi.new("unsigned char[32]")
    view = ffi.buffer(buffer)
    core = lib.crypto_core_ed25519_from_uniform

    def direct(uniform: bytes) -> bytes:
        core(buffer, uniform)  # always 0: every 32-byte string maps to a point
        result: bytes = view[:]
        return result

    return direct


_x25519_local = threading.local()
_from_uniform_local = threading.local()


def _from_uniform_for_thread() -> Callable[[bytes], bytes]:
    """This thread's ``from_uniform`` function (each has its own output buffer)."""
    function: Callable[[bytes], bytes] | None = getattr(_from_uniform_local, "function", None)
    if function is None:
        function = _from_uniform_local.function = _from_uniform_function()
    return function


def _x25519_for_thread() -> Callable[[bytes, bytes], bytes | None]:
    """This thread's X25519 function (each has its own output buffer)."""
    function: Callable[[bytes, bytes], bytes | None] | None = getattr(
        _x25519_local, "function", None
    )
    if function is None:
        function = _x25519_local.function = _x25519_function()
    return function


def _is_valid_u(point: object) -> bool:
    if not isinstance(point, bytes) or len(point) != POINT_BYTES:
        return False
    u = int.from_bytes(point, "little")
    return u < _P and u not in _SMALL_ORDER_U


def _invalid_point_message(index: int) -> str:
    return (
        f"point at index {index} is not a valid curve point "
        f"(expected the {POINT_BYTES}-byte canonical u-coordinate of a point not of small order)"
    )


# Chunk functions: top-level so that worker processes can unpickle them by
# name; `offset` is the chunk's position in the full list, so errors name the
# global index.


def _hash_and_blind_chunk(
    items: list[bytes], offset: int, scalar: bytes, domain: bytes
) -> list[bytes]:
    x25519 = _x25519_for_thread()
    out: list[bytes] = []
    for index, point in enumerate(_hash_to_points(items, _domain_prefix(domain), offset)):
        blinded = x25519(scalar, point)
        if blinded is None:
            # Cannot happen: H(x) is a point of G other than the identity, and
            # a clamped scalar is never a multiple of L.
            raise ValueError(_small_order_hash_message(offset + index))
        out.append(blinded)
    return out


def _blind_chunk(points: list[bytes], offset: int, scalar: bytes) -> list[bytes]:
    x25519 = _x25519_for_thread()
    out: list[bytes] = []
    for index, point in enumerate(points):
        blinded = x25519(scalar, point) if _is_valid_u(point) else None
        if blinded is None:  # a zero result cannot happen after the check
            raise ValueError(_invalid_point_message(offset + index))
        out.append(blinded)
    return out


def _validate_chunk(points: list[bytes], offset: int) -> list[bytes]:
    for index, point in enumerate(points):
        if not _is_valid_u(point):
            raise ValueError(_invalid_point_message(offset + index))
    return []


def _seal_chunk(items: list[bytes], offset: int, keys: bytes) -> list[bytes]:
    del offset  # sealing cannot fail on valid keys
    seal = _sodium.crypto_box_seal
    layers = [keys[k : k + POINT_BYTES] for k in range(len(keys) - POINT_BYTES, -1, -POINT_BYTES)]
    out: list[bytes] = []
    for item in items:
        onion = item
        for key in layers:  # innermost (last party's) layer first
            onion = seal(onion, key)
        out.append(onion)
    return out


def _peel_chunk(onions: list[bytes], offset: int, private_key: bytes) -> list[bytes]:
    public_key = _sodium.crypto_scalarmult_base(private_key)
    open_ = _sodium.crypto_box_seal_open
    out: list[bytes] = []
    for index, onion in enumerate(onions):
        try:
            if not isinstance(onion, bytes) or len(onion) < ONION_LAYER_BYTES:
                raise CryptoError
            out.append(open_(onion, public_key, private_key))
        except (CryptoError, TypeError):
            raise ValueError(
                f"onion at index {offset + index} does not decrypt with this party's key"
            ) from None
    return out


def _get_pool(workers: int) -> ProcessPoolExecutor:
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            # forkserver: children fork from a clean single-threaded server, not
            # from this (possibly threaded, asyncio-running) process.
            methods = multiprocessing.get_all_start_methods()
            method = "forkserver" if "forkserver" in methods else "spawn"
            context = multiprocessing.get_context(method)
            # the workers are the fork server's children, not ours: each ends
            # itself when this process is gone, even after a SIGKILL
            pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=context,
                initializer=exit_with,
                initargs=(os.getpid(),),
            )
            _pools[workers] = pool
        return pool


def _run(
    func: Callable[..., list[bytes]],  # a chunk function: (data, offset, *args)
    data: list[bytes],
    args: tuple[Any, ...],
    workers: int | None,
) -> list[bytes]:
    if workers is None:
        workers = default_workers()
    if not isinstance(workers, int) or workers < 1:
        raise ValueError("workers must be a positive integer or None (one per CPU)")
    if workers == 1 or len(data) < PARALLEL_THRESHOLD:
        return func(data, 0, *args)

    pool = _get_pool(workers)
    size = math.ceil(len(data) / (workers * _CHUNKS_PER_WORKER))
    futures: list[Future[list[bytes]]] = []
    for start in range(0, len(data), size):
        futures.append(pool.submit(func, data[start : start + size], start, *args))
    out: list[bytes] = []
    try:
        for future in futures:
            out.extend(future.result())
    except BrokenExecutor:
        # A worker died (e.g. killed for memory); drop the pool so the next
        # call starts a fresh one instead of failing forever.
        with _pools_lock:
            if _pools.get(workers) is pool:
                del _pools[workers]
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        for future in futures:
            future.cancel()
    return out
