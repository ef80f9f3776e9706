"""SMPC secure matrix product: ``A @ B`` between two parties' private matrices.

Used by ``linear_regression_vertical`` (the cross blocks of the Gram matrix)
and offered as the ``matrix_product`` function of the ``smpc`` microservice.
With three or more parties a third party deals a Beaver matrix triple (as
seeds); with two, the product runs under Paillier encryption (``phe``). The
pure arithmetic is in :mod:`protocols.smpc.matmul`; the threat model and the
round counts are in ``docs/protocols.md``. The product itself can disclose
an input (``B = I`` reveals ``A``), so ``matrix_product`` runs only where the
holders' policies allow it (``allow_matrix_product``).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import numpy.typing as npt
from phe import paillier

from fdrtd_server.sdk import (
    COLUMN,
    BadRequest,
    ComputationFailed,
    Input,
    JobContext,
    Output,
    PeerSession,
    SmpcSession,
    agree,
    declare,
    numeric,
    receive_bytes,
    ring,
    send_bytes,
    session_for,
)
from protocols.smpc import matmul
from protocols.smpc.common import PAILLIER_INPUT, paillier_bits, service

__all__ = [
    "Scaling",
    "product_options",
    "reveal_product",
    "secure_product",
    "seed_from",
    "uniform_scaling",
]

F64 = npt.NDArray[np.float64]
MAX_PRODUCT_TERMS = 1 << 27
"""Most multiply-adds of one ``matrix_product`` (about a minute of 256-bit arithmetic)."""


def integer_input(inputs: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    """The integer input ``key`` (or ``default``), refused unless in ``[low, high]``."""
    value = inputs.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(f"'{key}' must be an integer from {low} to {high}")
    return value


# -- message helpers ----------------------------------------------------------------------------


def _int_from(message: Any, key: str, sender: str) -> int:
    value = message.get(key) if isinstance(message, dict) else None
    if not isinstance(value, bytes) or not value:
        raise ComputationFailed(f"party '{sender}' sent a malformed message")
    return int.from_bytes(value, "little")


def _int_bytes(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "little")


def _unpack(blob: bytes, width: int, shape: tuple[int, ...], sender: str) -> matmul.ObjArray:
    try:
        values = matmul.ints_from_bytes(blob, width, math.prod(shape))
    except ValueError:
        raise ComputationFailed(f"party '{sender}' sent a matrix of the wrong size") from None
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out.reshape(shape)


def seed_from(message: Any, sender: str) -> bytes:
    """The 32-byte seed in a peer message from ``sender``; refuses anything else."""
    seed = message.get("seed") if isinstance(message, dict) else None
    if not isinstance(seed, bytes) or len(seed) != ring.SEED_BYTES:
        raise ComputationFailed(f"party '{sender}' sent a malformed seed")
    return seed


# -- secure matrix product ------------------------------------------------------------------


Scaling = tuple[list[int], list[int]]
"""Public exponents of a product ``A @ B``: one per row of ``A``, one per column of ``B``.

Entry ``(i, j)`` of the product is carried with ``rows[i] + cols[j]``
fractional bits (see :func:`protocols.smpc.matmul.encode_scaled`).
"""


def uniform_scaling(frac_bits: int, dims: tuple[int, int, int]) -> Scaling:
    """The same ``frac_bits`` for every entry of both operands of an ``m x k x n`` product."""
    return [frac_bits] * dims[0], [frac_bits] * dims[2]


def _encode(operand: F64 | None, scaling: Scaling, inner: int, left: bool) -> matmul.ObjArray:
    """``A`` (``left``) scaled by row, or ``B`` scaled by column, as ring integers."""
    if operand is None:
        raise ComputationFailed("a party of a matrix product has no matrix")
    rows, cols = scaling
    exponents = np.array(rows)[:, None] if left else np.array(cols)[None, :]
    # a ProductOverflow is an OutOfRange (422) with its own message
    return matmul.encode_scaled(operand, exponents, inner=inner)


def _check_ciphertexts(modulus: int, values: matmul.ObjArray, sender: str) -> None:
    if not matmul.valid_ciphertexts(modulus, values):
        raise ComputationFailed(
            f"party '{sender}' sent a malformed ciphertext (not a unit modulo N^2)"
        )


Share = tuple[matmul.ObjArray, int]


async def secure_product(
    peers: PeerSession,
    name: str,
    left: str,
    right: str,
    operand: F64 | None,
    dims: tuple[int, int, int],
    scaling: Scaling,
    paillier_bits: int,
) -> Share | None:
    """One party's side of the secure product ``A @ B`` (``A`` at ``left``, ``B`` at ``right``).

    Every party of the session calls it with the same public ``name``,
    ``dims = (m, k, n)``, ``scaling`` and options; ``operand`` is ``A`` at
    ``left``, ``B`` at ``right`` and None elsewhere. With three or more
    parties the first other party deals a Beaver matrix triple; with two,
    Paillier is used.

    Returns:
        ``(share, modulus)`` at ``left`` and ``right`` (the shares add up to
        the product, entry ``(i, j)`` with ``rows[i] + cols[j]`` fractional
        bits), None elsewhere.

    Raises:
        ComputationFailed: If an operand is out of the fixed-point range or a
            party sends something malformed.
    """
    m, k, n = dims
    me, tag = peers.me, f"mm.{name}"
    if len(peers.parties) >= 3:
        dealer = next(p for p in peers.parties if p not in (left, right))
        label = f"{peers.id}|matmul|{name}".encode()
        if me == dealer:
            seed_left, seed_right = ring.random_seed(), ring.random_seed()
            w_right = await asyncio.to_thread(
                matmul.dealer_share, seed_left, seed_right, label, m, k, n
            )
            await peers.send(left, f"{tag}.seed", {"seed": seed_left})
            await peers.send(right, f"{tag}.seed", {"seed": seed_right})
            await send_bytes(peers, right, f"{tag}.w", matmul.ints_to_bytes(w_right, 32))
            return None
        if me == left:
            a = _encode(operand, scaling, k, left=True)
            seed = seed_from(await peers.recv(dealer, f"{tag}.seed"), dealer)
            u, w_left = await asyncio.to_thread(matmul.left_masks, seed, label, m, k, n)
            e = matmul.masked(a, u)
            await send_bytes(peers, right, f"{tag}.e", matmul.ints_to_bytes(e, 32))
            blob = await receive_bytes(peers, right, f"{tag}.f", size=32 * k * n)
            f = _unpack(blob, 32, (k, n), right)
            return await asyncio.to_thread(matmul.left_share, a, f, w_left), matmul.MODULUS
        if me == right:
            b = _encode(operand, scaling, k, left=False)
            seed = seed_from(await peers.recv(dealer, f"{tag}.seed"), dealer)
            v = await asyncio.to_thread(matmul.right_mask, seed, label, k, n)
            f = matmul.masked(b, v)
            await send_bytes(peers, left, f"{tag}.f", matmul.ints_to_bytes(f, 32))
            blob = await receive_bytes(peers, dealer, f"{tag}.w", size=32 * m * n)
            w_right = _unpack(blob, 32, (m, n), dealer)
            blob = await receive_bytes(peers, left, f"{tag}.e", size=32 * m * k)
            e = _unpack(blob, 32, (m, k), left)
            return await asyncio.to_thread(matmul.right_share, e, v, w_right), matmul.MODULUS
        return None
    return await _paillier_product(peers, tag, left, right, operand, dims, scaling, paillier_bits)


async def _paillier_product(
    peers: PeerSession,
    tag: str,
    left: str,
    right: str,
    operand: F64 | None,
    dims: tuple[int, int, int],
    scaling: Scaling,
    paillier_bits: int,
) -> Share | None:
    m, k, n = dims
    me = peers.me
    if me not in (left, right):
        return None
    # encrypt the smaller operand: A (m x k) at left, or B' (n x k) at right
    left_encrypts = m * k <= k * n
    encryptor, evaluator = (left, right) if left_encrypts else (right, left)
    own = _encode(operand, scaling, k, left=me == left)
    if me == encryptor:
        key = await asyncio.to_thread(matmul.PaillierKey, paillier_bits)
        plain = own if left_encrypts else own.T
        cipher = await asyncio.to_thread(key.encrypt, plain)
        width = matmul.width_for(key.nsquare)
        await peers.send(evaluator, f"{tag}.key", {"n": _int_bytes(key.n)})
        await send_bytes(peers, evaluator, f"{tag}.c", matmul.ints_to_bytes(cipher, width))
        blob = await receive_bytes(peers, evaluator, f"{tag}.r", size=width * m * n)
        masked = _unpack(blob, width, (m, n), evaluator)
        _check_ciphertexts(key.n, masked, evaluator)
        return await asyncio.to_thread(key.decrypt, masked), key.n
    modulus = _int_from(await peers.recv(encryptor, f"{tag}.key"), "n", encryptor)
    if modulus.bit_length() < max(1024, paillier_bits - 8) or modulus % 2 == 0:
        raise ComputationFailed(f"party '{encryptor}' sent a Paillier key of the wrong size")
    width = matmul.width_for(modulus * modulus)
    rows = m if left_encrypts else n
    blob = await receive_bytes(peers, encryptor, f"{tag}.c", size=width * rows * k)
    cipher = _unpack(blob, width, (rows, k), encryptor)
    _check_ciphertexts(modulus, cipher, encryptor)
    plain = own if left_encrypts else own.T
    product = await asyncio.to_thread(matmul.encrypted_matmul, modulus, cipher, plain)
    if not left_encrypts:
        product = product.T
    public = paillier.PaillierPublicKey(modulus)
    masked, share = await asyncio.to_thread(matmul.mask_ciphertexts, public, product)
    await send_bytes(peers, encryptor, f"{tag}.r", matmul.ints_to_bytes(masked, width))
    return share, modulus


async def reveal_product(
    peers: PeerSession,
    name: str,
    holders: tuple[str, str],
    share: Share | None,
    shape: tuple[int, int],
    scaling: Scaling,
) -> F64:
    """Open a shared product to every party.

    The two holders swap their shares and add them; then both send the
    product to every other party, which checks that the two copies agree.
    The shares never reach a third party: the dealer, who knows the triple,
    could otherwise peel ``A @ V`` off a share and with it learn ``A``.
    """
    tag = f"open.{name}"
    left, right = holders
    if share is None:
        copies = []
        for holder in holders:
            copy = np.asarray(await peers.recv(holder, f"{tag}.result"))
            if copy.shape != shape or copy.dtype != np.float64:
                raise ComputationFailed(f"party '{holder}' sent a malformed product")
            copies.append(copy)
        if not np.array_equal(copies[0], copies[1], equal_nan=True):
            raise ComputationFailed("the two holders of a product opened different values")
        return copies[0]
    values, modulus = share
    other = right if peers.me == left else left
    width = matmul.width_for(modulus)
    await peers.send(other, f"{tag}.modulus", {"modulus": _int_bytes(modulus)})
    await send_bytes(peers, other, tag, matmul.ints_to_bytes(values, width))
    if _int_from(await peers.recv(other, f"{tag}.modulus"), "modulus", other) != modulus:
        raise ComputationFailed("the two holders of a product used different moduli")
    blob = await receive_bytes(peers, other, tag, size=width * math.prod(shape))
    theirs = _unpack(blob, width, shape, other)
    total = np.asarray((values + theirs) % modulus, dtype=object)
    product = matmul.decode_scaled(total, modulus, *scaling)
    rest = [party for party in peers.others if party not in holders]
    if rest:
        await peers.broadcast(f"{tag}.result", product, to=rest)
    return product


def _shape(smpc: SmpcSession, party: str) -> tuple[int, int]:
    shape = smpc.public[party].get("shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise ComputationFailed(f"party '{party}' sent a malformed matrix shape")
    return shape[0], shape[1]


def _check_precision(matrix: F64, frac_bits: int, side: str, party: str) -> None:
    """Refuse a row of ``A`` (or column of ``B``) that ``frac_bits`` would encode too coarsely.

    The fixed-point resolution ``2^-frac_bits`` is absolute; a line of small
    values would come out of the product with few correct digits, silently.
    Checked locally; failing reveals only that some line is that small.
    """
    axis, what = (1, "row") if side == "left" else (0, "column")
    coarse = matmul.coarse_lines(matrix, frac_bits, axis)
    if coarse:
        floor = math.ldexp(1.0, matmul.MIN_SIGNIFICANT_BITS - frac_bits)
        raise BadRequest(
            f"{what} {coarse[0] + 1} of the '{side}' matrix (party '{party}') is too small "
            f"for frac_bits={frac_bits}: its largest |value| is below {floor:.3g}, so it "
            f"would keep fewer than {matmul.MIN_SIGNIFICANT_BITS} significant bits and the "
            "product would be "
            f"imprecise; raise 'frac_bits' (at most {matmul.MAX_FRAC_BITS}) or scale the "
            "matrix up"
        )


def product_options(inputs: dict[str, Any]) -> tuple[int, int]:
    """The ``frac_bits`` and ``paillier_bits`` inputs of a secure product, checked."""
    frac_bits = integer_input(
        inputs, "frac_bits", matmul.DEFAULT_FRAC_BITS, 0, matmul.MAX_FRAC_BITS
    )
    return frac_bits, paillier_bits(inputs)


@service.job(
    "matrix_product",
    inputs=[
        Input("left", "string", "the party that holds A; must agree", required=True),
        Input("right", "string", "the party that holds B; must agree", required=True),
        Input("data", "data", "the dataset of the matrix (at left and right only)"),
        COLUMN,
        Input(
            "frac_bits",
            "integer",
            "fixed-point fractional bits of each operand; must agree",
            default=matmul.DEFAULT_FRAC_BITS,
            minimum=0,
            maximum=matmul.MAX_FRAC_BITS,
        ),
        PAILLIER_INPUT,
    ],
    outputs=[
        Output("product", "any", "the product A @ B, a typed array"),
        Output("shape", "array", "its shape [rows, columns]"),
    ],
    policy=["allow_matrix_product"],
)
async def matrix_product(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """The product ``A @ B`` of a matrix at party ``left`` and one at party ``right``.

    Inputs: ``left`` and ``right`` (party names, common); ``data`` and
    ``column`` (a 2-D numeric column) at those two parties; ``frac_bits``
    (default 40) and ``paillier_bits`` (default 2048, two parties only),
    common. Other parties give no data (one of them deals the triple).
    Revealed to everyone: both shapes and the product.

    The product can disclose an input whole (with ``B = I``, ``A @ B = A``),
    so a server holding one of the matrices takes part only where its
    policy sets ``allow_matrix_product = true``; otherwise it refuses
    (403), and the other parties hear why at once.
    """
    frac_bits, paillier_bits = product_options(inputs)
    left, right = inputs.get("left"), inputs.get("right")
    async with session_for(ctx) as peers:
        if not isinstance(left, str) or not isinstance(right, str) or left == right:
            raise BadRequest("'left' and 'right' must name two different parties")
        if left not in peers.parties or right not in peers.parties:
            raise BadRequest("'left' and 'right' must be parties of the session")
        if peers.me in (left, right):
            ctx.env.require(
                "allow_matrix_product",
                "matrix products",
                "a product can disclose a whole input: B = I reveals A",
            )
        matrix: F64 | None = None
        if peers.me in (left, right):
            dataset = await ctx.load_dataset(inputs.get("data"))
            matrix = numeric(dataset.column(inputs.get("column")), "matrix")
            if matrix.ndim != 2 or matrix.size == 0:
                raise BadRequest("the matrix must be a non-empty 2-D column")
            if not np.all(np.isfinite(matrix)):
                raise BadRequest("the matrix must not hold NaN or infinity")
            _check_precision(matrix, frac_bits, "left" if peers.me == left else "right", peers.me)
        smpc = SmpcSession(peers)
        await smpc.setup(
            declare(
                ctx,
                function="matrix_product",
                left=left,
                right=right,
                frac_bits=frac_bits,
                paillier_bits=paillier_bits,
                shape=None if matrix is None else list(matrix.shape),
            )
        )
        for key in ("function", "left", "right", "frac_bits", "paillier_bits"):
            agree(smpc, key)
        (m, k), (k_right, n) = _shape(smpc, left), _shape(smpc, right)
        if k != k_right:
            raise ComputationFailed(
                "the matrices do not fit: the columns of 'left' must equal the rows of 'right'"
            )
        if m * k * n > MAX_PRODUCT_TERMS:
            raise ComputationFailed(
                f"the product is too large: rows x inner x columns must be at most "
                f"{MAX_PRODUCT_TERMS}; split the matrices into blocks"
            )
        dims = (m, k, n)
        scaling = uniform_scaling(frac_bits, dims)
        await ctx.progress(0.1)
        share = await secure_product(peers, "ab", left, right, matrix, dims, scaling, paillier_bits)
        await ctx.progress(0.8)
        product = await reveal_product(
            peers, "ab", (left, right), share, (dims[0], dims[2]), scaling
        )
    return {"product": product, "shape": [m, n]}
