"""Elliptic-curve primitives for Diffie-Hellman private set intersection (DH-PSI).

What this is
    The group operations behind PSI by *commutative encryption*, the idea of
    Meadows (1986, "A more efficient cryptographic matchmaking protocol for use
    in the absence of a continuously available third party", IEEE S&P) and of
    Huberman, Franklin and Hogg (1999, "Enhancing privacy and trust in
    electronic communities", ACM EC). This module holds only pure functions;
    the message flow lives with the protocol that uses them.

The math
    Let ``G`` be the prime-order subgroup of Edwards25519, of order
    ``L = 2**252 + 27742317777372353535851937790883648493``, and let
    ``H: {0,1}* -> G`` be a hash onto the group. Party A draws a secret scalar
    ``a`` and party B a secret scalar ``b`` from ``[1, L)``. Because scalar
    multiplication in a cyclic group commutes::

        (H(x) ^ a) ^ b  ==  H(x) ^ (a * b mod L)  ==  (H(x) ^ b) ^ a

    (written multiplicatively; on the curve ``^`` is scalar multiplication). A
    sends ``{H(x)^a : x in X}``; B sends ``{H(y)^b : y in Y}``; each side raises
    what it received to its own scalar, and the doubly blinded sets meet exactly
    where ``x == y``. Every map ``P -> P^a`` with ``a != 0`` is a bijection of
    ``G``, so distinct items stay distinct (up to collisions of ``H``, which are
    negligible). Under the decisional Diffie-Hellman assumption in ``G`` with
    ``H`` modelled as a random oracle, a singly blinded point reveals nothing
    about its item to anyone who lacks the scalar. This is the semi-honest
    setting: the protocol does not stop a party from choosing its own set
    maliciously.

The hash onto the group
    ``hash_to_point`` computes ``h = SHA-512(len(domain) || domain || item)``,
    splits the 64 bytes into two 32-byte halves, maps each with libsodium's
    Elligator 2 map ``crypto_core_ed25519_from_uniform`` (which also clears the
    cofactor, so the result lies in ``G``), and adds the two points. This is the
    shape of the random-oracle construction of RFC 9380 (``hash_to_curve`` =
    ``map(u0) + map(u1)``). A single Elligator map covers only about half of
    the group and is therefore *not* a random oracle (RFC 9380, section 10),
    and the security argument above needs one. The output is not
    byte-compatible with RFC 9380 test vectors, since the RFC derives the field
    elements with ``expand_message_xmd``. Prefixing the domain with its length
    makes ``(domain, item)`` parse uniquely, so two domains never collide.

Why libsodium
    Every curve operation is done by libsodium through ``nacl.bindings``:
    constant-time, audited, and it refuses non-canonical encodings,
    small-order points and points outside ``G``. Nothing here implements
    curve arithmetic by hand, and nothing should.

Wire format
    A point is its 32-byte compressed Edwards encoding; a scalar is 32 bytes,
    little-endian, reduced modulo ``L``. Points received from a peer must pass
    :func:`validate_points` (or go through :func:`blind` / :func:`reblind`,
    which reject them the same way).

Parallelism
    One scalar multiplication costs about 150 microseconds, so a set of
    100,000 items costs seconds of CPU. :func:`hash_and_blind` and
    :func:`reblind` split lists of at least ``PARALLEL_THRESHOLD`` items into
    chunks for a ``ProcessPoolExecutor``. The pool is created lazily, reused,
    and closed by :func:`shutdown_pool`. It uses the ``forkserver`` start
    method (``spawn`` where that is missing): forking a process that runs an
    asyncio loop and threads is unsafe, and Python 3.12+ warns about it. These
    functions block, so an asyncio caller should run them through
    ``asyncio.to_thread``. The secret scalar is sent to the local worker
    processes through a pipe and never leaves the machine.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import secrets
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor

from nacl import bindings as _sodium
from nacl.exceptions import CryptoError

__all__ = [
    "PARALLEL_THRESHOLD",
    "POINT_BYTES",
    "SCALAR_BYTES",
    "blind",
    "default_workers",
    "encode_item",
    "hash_and_blind",
    "hash_to_point",
    "random_scalar",
    "reblind",
    "shutdown_pool",
    "validate_points",
]

POINT_BYTES = 32
"""Length of a compressed Edwards25519 point on the wire."""

SCALAR_BYTES = 32
"""Length of a scalar modulo the group order ``L``."""

PARALLEL_THRESHOLD = 5000
"""Lists shorter than this are processed in the calling process.

Below it, the cost of sending chunks to worker processes (and of starting the
pool the first time) outweighs the gain.
"""

_MAX_DOMAIN_BYTES = 255
_CHUNKS_PER_WORKER = 4  # several chunks per worker even out uneven progress
_ZERO_SCALAR = bytes(SCALAR_BYTES)

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
    different items. Both parties must encode with this function for their
    items to match.

    * ``bytes``: tag ``b`` plus the bytes unchanged.
    * ``str``: tag ``s`` plus UTF-8, exactly as given. There is no Unicode
      normalisation or case folding; the caller normalises if it wants to.
    * ``int``: tag ``i`` plus the decimal ASCII digits (with ``-`` for negative
      numbers). Any size is allowed.
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


def random_scalar() -> bytes:
    """Draw a secret blinding scalar uniformly from ``[1, L)``.

    PyNaCl does not expose ``crypto_core_ed25519_scalar_random``, so this
    reduces 64 bytes from :mod:`secrets` modulo ``L`` with
    ``crypto_core_ed25519_scalar_reduce``; the bias is below ``2**-250``.

    Returns:
        A 32-byte little-endian scalar, reduced and nonzero.
    """
    while True:
        scalar: bytes = _sodium.crypto_core_ed25519_scalar_reduce(secrets.token_bytes(64))
        if scalar != _ZERO_SCALAR:  # probability about 2**-252
            return scalar


def hash_to_point(item: bytes, domain: bytes) -> bytes:
    """Hash an item onto the prime-order subgroup of Edwards25519.

    Computes ``SHA-512(len(domain) || domain || item)``, maps each 32-byte half
    with ``crypto_core_ed25519_from_uniform`` (Elligator 2 plus cofactor
    clearing) and adds the two points, as described in the module docstring.

    Args:
        item: The encoded item, usually from :func:`encode_item`.
        domain: A domain-separation tag of 1 to 255 bytes, for example the
            protocol name and session id. Both parties must use the same tag.

    Returns:
        The 32-byte compressed encoding of ``H(item)``.

    Raises:
        ValueError: If ``domain`` is empty or longer than 255 bytes.
    """
    _check_domain(domain)
    return _hash_to_point(item, _domain_prefix(domain))


def blind(points: Sequence[bytes], scalar: bytes) -> list[bytes]:
    """Raise each point to the secret scalar, in the calling process.

    Computes ``P ^ scalar`` for each ``P`` with
    ``crypto_scalarmult_ed25519_noclamp``. Unlike the clamped X25519-style
    variant, this keeps the scalar as it is, so blinding commutes:
    ``blind(blind(P, a), b) == blind(blind(P, b), a)``.

    Args:
        points: Compressed points in the prime-order subgroup.
        scalar: A scalar from :func:`random_scalar`.

    Returns:
        The blinded points, in the input order.

    Raises:
        ValueError: If the scalar is not a nonzero reduced 32-byte scalar,
            or if a point is not a valid curve point (the message gives the
            index, never the bytes).
    """
    _check_scalar(scalar)
    return _blind_chunk(list(points), 0, scalar)


def hash_and_blind(
    items: Sequence[bytes],
    scalar: bytes,
    domain: bytes,
    *,
    workers: int | None = None,
) -> list[bytes]:
    """Hash each item onto the curve and blind it: ``H(x) ^ scalar``.

    This is the first step of each party in DH-PSI. Lists of at least
    ``PARALLEL_THRESHOLD`` items are processed in chunks by the shared process
    pool; shorter lists, or ``workers=1``, run in the calling process. The
    result is the same either way.

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
    """Blind a peer's points with this party's scalar: ``P ^ scalar``.

    This is the second step of DH-PSI, applied to the points received from the
    other party. It is :func:`blind` with the same parallel strategy as
    :func:`hash_and_blind`. libsodium rejects every invalid point on the way,
    so a separate :func:`validate_points` call is not needed first.

    Args:
        points: Compressed points received from the peer.
        scalar: This party's secret scalar from :func:`random_scalar`.
        workers: Number of worker processes. Defaults to
            :func:`default_workers`.

    Returns:
        The doubly blinded points, in the input order.

    Raises:
        ValueError: If the scalar is invalid, ``workers < 1``, or a point is
            not a valid curve point (the message gives the index, never the
            bytes).
    """
    _check_scalar(scalar)
    return _run(_blind_chunk, list(points), (scalar,), workers)


def validate_points(points: Sequence[bytes]) -> None:
    """Check that every point is a valid element of the prime-order subgroup.

    Uses ``crypto_core_ed25519_is_valid_point``, which rejects non-canonical
    encodings, points of small order (including the identity) and points
    outside the prime-order subgroup. Call this on points received from a peer
    before using them in anything other than :func:`reblind` or :func:`blind`
    (which check them anyway).

    Args:
        points: Compressed 32-byte points.

    Raises:
        ValueError: For the first invalid point; the message names its index
            and never echoes its bytes.
    """
    for index, point in enumerate(points):
        if not _is_valid_point(point):
            raise ValueError(_invalid_point_message(index))


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
    if scalar == _ZERO_SCALAR:
        raise ValueError("scalar must be nonzero; draw it with random_scalar()")
    reduced = _sodium.crypto_core_ed25519_scalar_reduce(scalar + bytes(32))
    if reduced != scalar:
        raise ValueError("scalar must be reduced modulo the group order; use random_scalar()")


def _check_domain(domain: bytes) -> None:
    if not isinstance(domain, bytes) or not 1 <= len(domain) <= _MAX_DOMAIN_BYTES:
        raise ValueError(
            f"domain must be 1 to {_MAX_DOMAIN_BYTES} bytes, e.g. b'fdrtd-psi/' + session id"
        )


def _domain_prefix(domain: bytes) -> bytes:
    return bytes([len(domain)]) + domain


def _hash_to_point(item: bytes, prefix: bytes) -> bytes:
    digest = hashlib.sha512(prefix + item).digest()
    p0 = _sodium.crypto_core_ed25519_from_uniform(digest[:32])
    p1 = _sodium.crypto_core_ed25519_from_uniform(digest[32:])
    point: bytes = _sodium.crypto_core_ed25519_add(p0, p1)
    return point


def _is_valid_point(point: object) -> bool:
    return (
        isinstance(point, bytes)
        and len(point) == POINT_BYTES
        and bool(_sodium.crypto_core_ed25519_is_valid_point(point))
    )


def _invalid_point_message(index: int) -> str:
    return (
        f"point at index {index} is not a valid curve point "
        f"(expected a {POINT_BYTES}-byte encoding of an element of the prime-order subgroup)"
    )


def _hash_and_blind_chunk(
    items: list[bytes], offset: int, scalar: bytes, domain: bytes
) -> list[bytes]:
    # Top-level so that worker processes can unpickle it by name. `offset` is
    # unused; it keeps the signature the same as _blind_chunk's for _run.
    del offset
    prefix = _domain_prefix(domain)
    mult = _sodium.crypto_scalarmult_ed25519_noclamp
    return [mult(scalar, _hash_to_point(item, prefix)) for item in items]


def _blind_chunk(points: list[bytes], offset: int, scalar: bytes) -> list[bytes]:
    # Top-level so that worker processes can unpickle it by name. `offset` is
    # the chunk's position in the full list, so errors name the global index.
    mult = _sodium.crypto_scalarmult_ed25519_noclamp
    out: list[bytes] = []
    for index, point in enumerate(points):
        if not isinstance(point, bytes) or len(point) != POINT_BYTES:
            raise ValueError(_invalid_point_message(offset + index))
        try:
            # libsodium refuses non-canonical, small-order and off-subgroup
            # points here; the scalar was checked, so any failure is the point.
            out.append(mult(scalar, point))
        except CryptoError:
            raise ValueError(_invalid_point_message(offset + index)) from None
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
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
            _pools[workers] = pool
        return pool


def _run(
    func: Callable[..., list[bytes]],  # a chunk function: (data, offset, *args)
    data: list[bytes],
    args: tuple[bytes, ...],
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
