"""SMPC protocols: k-th smallest element, median and quantiles over all parties' data.

Each party holds some values of one column; the functions here find order
statistics of the *joint* data (the union of all parties' values, duplicates
kept) while every party's own values stay on its server.

Search (the outer loop)
    Every non-NaN float64 has an order-preserving 64-bit key
    (:func:`fdrtd_server.sdk.ring.float_order_key`, IEEE 754 totalOrder, so
    ``-0.0`` sorts just before ``0.0``). Let ``S(t)`` be the joint number of
    values whose key is ``<= t``. The key of the k-th smallest value is
    ``a = min{t : S(t) >= k}``, found by binary search over the 2^64 keys in
    :data:`ROUNDS` = 64 rounds: round ``r`` probes the single threshold
    ``t = low + 2^(63-r) - 1`` and learns only the bit ``[S(t) >= k]``. That
    bit equals ``[a <= t]``, a function of the answer alone, so the whole
    search reveals the k-th smallest value and nothing else. Several order
    statistics (a median of an even count, quantiles) are searched in the
    same rounds, one comparison each per round. Binary search probes the
    fewest thresholds (64, against 240 for the 16-ary search of
    :meth:`SmpcSession.maximum_keys`); here each probe is a secure comparison
    costing ``2 L`` hashes onto the curve and ``4 L`` X25519 operations
    (against 4 operations for a probe of the secure OR there), so fewer
    probes win over fewer rounds.

Secure comparison (one per order statistic and round; stage names in :class:`Stage`)
    Two parties have a role: the *shifter* P_0 (first of the session's
    parties) and the *evaluator* E (last of them). With ``N`` the public
    joint count, let ``M = 2^L`` be the smallest power of two with
    ``M / 2 >= N``. Then ``D = S(t) - k`` lies in ``[-N, N)`` and
    ``D >= 0`` exactly when ``D mod M < M / 2``.

    1. ``COUNT``: every party i computes its count ``c_i(t)``; P_0 draws a
       fresh uniform ``rho`` in ``Z_2^64`` and uses ``c_0 - k + rho``. Every
       party but E sends its value, masked with the pairwise masks of the
       secure sum (:mod:`fdrtd_server.sdk.smpc`), to E only. E adds them to
       its own and learns ``z = D + rho mod 2^64``: uniformly random, as
       ``rho`` is P_0's secret.
    2. Now ``D >= 0`` iff ``z mod M`` lies in the cyclic interval
       ``[rho, rho + M/2)`` of ``Z_M``. P_0 splits that interval into at most
       ``L`` aligned dyadic blocks ``(level, prefix)`` and pads them with
       random dummies to exactly ``L``; E lists the ``L`` prefixes
       ``(level, z >> level)`` of ``z``. ``z`` is in the interval iff the two
       lists share an item, and then they share exactly one (the blocks are
       disjoint). This is the prefix-set idea of Lin and Tzeng's
       millionaires' protocol (ACNS 2005), applied to an interval.
    3. ``BLOCKS``, ``QUERY``, ``ANSWER``: private set-intersection cardinality
       by commutative blinding on Curve25519 (X25519) (:mod:`fdrtd_server.sdk.curve`,
       after Meadows 1986 and Huberman, Franklin and Hogg 1999). P_0 sends
       ``H(b)^beta`` for its shuffled blocks, E sends ``H(p)^alpha`` for its
       prefixes, P_0 returns them as ``H(p)^(alpha*beta)`` shuffled, E raises
       the blocks to ``alpha`` and counts matches: 1 means ``S(t) >= k``.
       Items carry the round and comparison number, so no item repeats.
    4. ``BITS``: E sends the bits to every other party.

Threat model and leakage
    Semi-honest servers; P_0 and E must not collude. Every party learns the
    joint count ``N`` and each order statistic searched (both neighbours of
    an interpolated quantile or of an averaged median); the client gets the
    result and ``N``. E sees uniformly random sums and, under the decisional
    Diffie-Hellman assumption with ``H`` a random oracle, blinded points that
    reveal only the size of each intersection, which is the output bit. P_0
    sees only blinded points, the other parties only the bits. Any coalition
    that does not contain both P_0 and E learns nothing more. P_0 and E
    together would learn ``S(t)`` at every probed threshold (64 per order
    statistic), i.e. the joint count of the other parties' values there (with
    three parties: the third party's own counts).

Cost (per search round, all order statistics together)
    ``2n + 1`` messages in 4 sequential hops; 64 rounds, after the joint
    count (one broadcast round of ``n(n-1)`` messages that also carries the
    options; the pairwise seeds come from key agreement, without messages).
    With ``J`` order statistics, E and P_0 each hash
    ``J * L`` items onto the curve and compute ``2 * J * L`` scalar
    multiplications (``L = ceil(log2 N) + 1``); messages carry ``32 * J * L``
    bytes of points.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fdrtd_server.sdk import (
    COLUMN,
    DATA,
    BadRequest,
    ComputationFailed,
    FdrtdError,
    Input,
    JobContext,
    Namespace,
    Output,
    SmpcSession,
    agree,
    check_joint_cohort,
    curve,
    declare,
    finite_result,
    numeric,
    ring,
    session_for,
    stages,
)
from fdrtd_server.sdk.stages import Message, StagedPeers
from protocols.smpc.common import COUNT, service

__all__ = [
    "KEY_BITS",
    "MAX_PROBABILITIES",
    "MEDIAN_CONVENTIONS",
    "ROUNDS",
    "OrderSearch",
    "Stage",
    "dyadic_cover",
    "interpolate",
    "quantile_ranks",
]

KEY_BITS = 64
"""Bits of an order key; the binary search takes one round per bit."""

ROUNDS = KEY_BITS
"""Search rounds of every order-statistic computation."""

MAX_PROBABILITIES = 100
"""Most probabilities one ``quantiles`` call accepts (each needs up to two searches)."""

MEDIAN_CONVENTIONS = ("average", "lower", "upper")
"""How ``median`` treats an even count: the mean of the two middle values, or one of them."""

U64 = npt.NDArray[np.uint64]
F64 = npt.NDArray[np.float64]
Progress = Callable[[float], Awaitable[None]]

_REAL = b"R"  # item tags: real items and dummies never encode alike
_DUMMY = b"D"
_POINT = curve.POINT_BYTES


_POINTS = Message.bytes(size="size")
"""Curve points, as many as the receiver expects (``size`` is their bytes)."""


class Stage(Namespace):
    """The stages of one comparison round; tags are suffixed with the round number."""

    COUNT = stages.Stage("order.count", Message.uint64_vector(length="length"), title="count")
    BLOCKS = stages.Stage("order.blocks", _POINTS, title="blocks message")
    QUERY = stages.Stage("order.query", _POINTS, title="query message")
    ANSWER = stages.Stage("order.answer", _POINTS, title="answer message")
    BITS = stages.Stage(
        "order.bits", Message.array(np.uint8, length="length"), title="comparison bits"
    )


def dyadic_cover(start: int, bits: int) -> list[tuple[int, int]]:
    """Split the cyclic half-interval ``[start, start + 2^(bits-1))`` of ``Z_2^bits`` into blocks.

    A block ``(level, prefix)`` is the aligned range of the ``2^level``
    numbers ``x`` with ``x >> level == prefix``. The blocks are disjoint,
    their union is the interval, and there are at most ``bits`` of them:
    for ``s = start mod 2^(bits-1)`` the greedy split takes
    ``popcount(2^(bits-1) - s) + popcount(s) <= bits`` blocks.

    Args:
        start: First element of the interval, ``0 <= start < 2^bits``.
        bits: ``L >= 1``; the ring is ``Z_2^L`` and the interval has ``2^(L-1)`` elements.

    Returns:
        The blocks, in increasing order of their numbers (wrapping at ``2^L``).
    """
    size = 1 << bits
    half = size >> 1
    if start + half <= size:
        segments = [(start, start + half)]
    else:
        segments = [(start, size), (0, start + half - size)]
    blocks: list[tuple[int, int]] = []
    for low, high in segments:
        while low < high:
            # the largest aligned block that starts at low and stays inside
            level = (low & -low).bit_length() - 1 if low else bits
            while low + (1 << level) > high:
                level -= 1
            blocks.append((level, low >> level))
            low += 1 << level
    return blocks


def quantile_ranks(count: int, probability: float) -> tuple[int, int, float]:
    """The 1-based ranks and the weight that numpy's ``linear`` quantile interpolates between.

    numpy (method ``"linear"``, Hyndman and Fan's type 7) puts the quantile at
    the 0-based virtual index ``v = (n - 1) * p`` and interpolates between the
    order statistics at ``floor(v)`` and ``floor(v) + 1`` with weight
    ``gamma = v - floor(v)``.

    Args:
        count: The number of values ``n >= 1``.
        probability: ``p`` in ``[0, 1]``.

    Returns:
        ``(lower, upper, gamma)``; ``lower == upper`` when no interpolation is
        needed (``gamma == 0`` or ``v`` at the last element).
    """
    virtual = (count - 1) * probability
    if virtual >= count - 1:
        return count, count, 0.0
    below = math.floor(virtual)
    gamma = virtual - below
    if gamma == 0:
        return below + 1, below + 1, 0.0
    return below + 1, below + 2, gamma


def interpolate(lower: float, upper: float, gamma: float) -> float:
    """Interpolate as numpy's ``_lerp`` does, so that results match it bit for bit."""
    difference = upper - lower
    if gamma >= 0.5:
        return upper - difference * (1 - gamma)
    return lower + difference * gamma


def _cut(blob: bytes) -> list[bytes]:
    """Split points, checked by their stage, into 32-byte points."""
    return [blob[i : i + _POINT] for i in range(0, len(blob), _POINT)]


def _shuffled_groups(items: list[bytes], size: int) -> list[bytes]:
    rng = secrets.SystemRandom()
    out: list[bytes] = []
    for start in range(0, len(items), size):
        group = items[start : start + size]
        rng.shuffle(group)
        out.extend(group)
    return out


class OrderSearch:
    """One party's side of the search for joint order statistics.

    Args:
        smpc: A session after :meth:`SmpcSession.setup`.
        values: This party's values (1-D, no NaN; may be empty).
        total: The joint number of values, already revealed to every party.
    """

    def __init__(self, smpc: SmpcSession, values: F64, total: int) -> None:
        if total < 1:
            raise ValueError("`total` must be at least 1")
        if len(smpc.peers.parties) < 2:
            raise BadRequest(
                "order statistics are a multi-party protocol: name two or more parties"
            )
        self.smpc = smpc
        self.peers = smpc.peers
        self.keys = np.sort(ring.float_order_key(values).reshape(-1))
        self.bits = (total - 1).bit_length() + 1  # M = 2^bits, M / 2 >= total
        self.pad = self.bits  # dyadic_cover never needs more blocks
        self.shifter = self.peers.parties[0]
        self.evaluator = self.peers.parties[-1]
        self._scalar = curve.random_scalar()
        session = hashlib.sha256(self.peers.id.encode()).digest()
        self._domain = b"fdrtd.smpc.order|" + session

    async def smallest_keys(self, ranks: Sequence[int], progress: Progress | None = None) -> U64:
        """Find the key of the k-th smallest joint value for each ``k`` in ``ranks``.

        Args:
            ranks: 1-based ranks, each between 1 and the joint count.
            progress: Called with the fraction done after some rounds.

        Returns:
            One ``uint64`` order key per rank, in the order of ``ranks``.
        """
        wanted = np.asarray(list(ranks), dtype=np.uint64)
        low = np.zeros(wanted.size, dtype=np.uint64)
        for round_number in range(ROUNDS):
            width = np.uint64(1 << (KEY_BITS - 1 - round_number))
            # the k-th key a is >= low + width exactly when S(low + width - 1) < k
            thresholds = low + width - np.uint64(1)
            at_least = await self._at_least(round_number, thresholds, wanted)
            low = low + np.where(at_least, np.uint64(0), width).astype(np.uint64)
            if progress is not None and round_number % 8 == 7:
                await progress(0.1 + 0.9 * (round_number + 1) / ROUNDS)
        return low

    async def _at_least(
        self, round_number: int, thresholds: U64, ranks: U64
    ) -> npt.NDArray[np.bool_]:
        """The bits ``[S(t_j) >= k_j]``, revealed to every party and nothing else."""
        me = self.peers.me
        counts = np.searchsorted(self.keys, thresholds, side="right").astype(np.uint64)
        count_tag = Stage.COUNT.tag_for(round_number)
        staged = StagedPeers(self.peers)
        if me == self.shifter:
            rho = np.frombuffer(secrets.token_bytes(8 * counts.size), dtype=np.uint64).copy()
            mine = counts - ranks + rho  # wraps modulo 2^64, as intended
        else:
            mine = counts
        masked = self.smpc.masked(count_tag, mine)
        if me != self.evaluator:
            await staged.send(self.evaluator, Stage.COUNT, masked, round_number)
        if me == self.evaluator:
            bits = await self._evaluate(round_number, masked)
            await staged.broadcast(Stage.BITS, bits.astype(np.uint8), round_number)
            return bits
        if me == self.shifter:
            await self._shift(round_number, rho)
        # the end of a chain (everyone -> E, E <-> P_0, E -> everyone): wait longer
        # than its links, so that the party next to a dropout names it first
        received = await staged.recv(
            self.evaluator, Stage.BITS, round_number, patience=3.0, length=counts.size
        )
        return np.asarray(received != 0)

    def _item(self, round_number: int, index: int, level: int, prefix: int) -> bytes:
        return _REAL + struct.pack(">BIBQ", round_number, index, level, prefix)

    async def _shift(self, round_number: int, rho: U64) -> None:
        """P_0: send the blinded interval blocks, then blind E's prefixes in return."""
        starts = (rho & np.uint64((1 << self.bits) - 1)).tolist()
        items: list[bytes] = []
        for index, start in enumerate(starts):
            group = [
                self._item(round_number, index, level, prefix)
                for level, prefix in dyadic_cover(int(start), self.bits)
            ]
            group += [_DUMMY + secrets.token_bytes(16) for _ in range(self.pad - len(group))]
            items.extend(group)
        items = _shuffled_groups(items, self.pad)
        blocks = await asyncio.to_thread(
            curve.hash_and_blind, items, self._scalar, self._domain, workers=1
        )
        staged = StagedPeers(self.peers)
        await staged.send(self.evaluator, Stage.BLOCKS, b"".join(blocks), round_number)
        query = _cut(
            await staged.recv(
                self.evaluator,
                Stage.QUERY,
                round_number,
                patience=2.0,
                size=len(starts) * self.bits * _POINT,
            )
        )
        try:
            answer = await asyncio.to_thread(curve.reblind, query, self._scalar, workers=1)
        except ValueError:
            raise ComputationFailed(f"party '{self.evaluator}' sent invalid curve points") from None
        answer = _shuffled_groups(answer, self.bits)
        await staged.send(self.evaluator, Stage.ANSWER, b"".join(answer), round_number)

    async def _evaluate(self, round_number: int, masked: U64) -> npt.NDArray[np.bool_]:
        """E: open z, send the blinded prefixes, and count the matches per comparison."""
        staged = StagedPeers(self.peers)
        total = masked.copy()
        counts = await staged.gather(Stage.COUNT, round_number, length=total.size)
        for theirs in counts.values():
            total += theirs
        shifted = (total & np.uint64((1 << self.bits) - 1)).tolist()
        items = [
            self._item(round_number, index, level, int(z) >> level)
            for index, z in enumerate(shifted)
            for level in range(self.bits)
        ]
        query = await asyncio.to_thread(
            curve.hash_and_blind, items, self._scalar, self._domain, workers=1
        )
        await staged.send(self.shifter, Stage.QUERY, b"".join(query), round_number)
        comparisons = len(shifted)
        blocks = _cut(
            await staged.recv(
                self.shifter, Stage.BLOCKS, round_number, size=comparisons * self.pad * _POINT
            )
        )
        try:
            blocks = await asyncio.to_thread(curve.reblind, blocks, self._scalar, workers=1)
        except ValueError:
            raise ComputationFailed(f"party '{self.shifter}' sent invalid curve points") from None
        answer = _cut(
            await staged.recv(
                self.shifter, Stage.ANSWER, round_number, size=comparisons * self.bits * _POINT
            )
        )
        bits = np.zeros(comparisons, dtype=bool)
        for index in range(comparisons):
            mine = set(answer[index * self.bits : (index + 1) * self.bits])
            theirs = blocks[index * self.pad : (index + 1) * self.pad]
            bits[index] = not mine.isdisjoint(theirs)
        return bits


# -- the microservice functions -------------------------------------------------------


def _values(dataset: Any, inputs: dict[str, Any]) -> F64:
    column = numeric(dataset.column(inputs.get("column")))
    if column.ndim != 1:
        raise BadRequest("order statistics need a column of single numbers")
    return column[~np.isnan(column)]


async def _order_statistics(
    ctx: JobContext,
    inputs: dict[str, Any],
    options: Callable[[], dict[str, Any]],
    ranks_for: Callable[[int], list[int]],
) -> tuple[int, dict[int, float]]:
    """Run setup, joint count and search; return the joint count and the values by rank.

    ``options()`` checks the function's own inputs and returns them; it runs,
    and the party's column is loaded, inside the session, so that if this
    party's input is refused (a bad ``k``, an unknown handle, a column of
    text) the other parties hear it at once instead of waiting for the
    session timeout. The options travel with the joint count
    (a deferred setup) and must be equal at every party. Disagreeing
    options, a cohort below the strictest party's minimum and a rank beyond
    the joint count are detected by every party alike from public data. Each
    party then leaves the session cleanly and raises the error afterwards:
    raising inside the session would broadcast an abort, and an abort that
    reaches a party still reading a message turns the precise error into
    "party ... ended the computation" there.
    """
    refusal: FdrtdError | None = None
    total, ranks = 0, [0]
    keys = np.zeros(1, dtype=np.uint64)
    async with session_for(ctx) as peers:
        declared = options()
        values = _values(await ctx.load_dataset(inputs.get("data")), inputs)
        smpc = SmpcSession(peers)
        await smpc.setup(declare(ctx, **declared), defer=True)
        encoded = ring.encode_int(np.array([values.size]), parties=smpc.parties)
        total = int(ring.decode_int(await smpc.sum_ring(encoded))[0])
        try:
            for key in declared:
                agree(smpc, key)
            check_joint_cohort(ctx, smpc, total)
            ranks = sorted(set(ranks_for(total)))
        except FdrtdError as error:
            refusal = error
        if refusal is None:
            await ctx.progress(0.1)
            keys = await OrderSearch(smpc, values, total).smallest_keys(ranks, ctx.progress)
    if refusal is not None:
        raise refusal
    found = ring.float_from_order_key(keys).tolist()
    return total, dict(zip(ranks, found, strict=True))


@service.job(
    "kth_smallest",
    inputs=[
        DATA,
        COLUMN,
        Input(
            "k",
            "integer",
            "the 1-based rank in the joint data (1 is the minimum); must agree",
            required=True,
            minimum=1,
            maximum=2**62 - 1,
        ),
    ],
    outputs=[
        Output("value", "number", "the k-th smallest value"),
        Output("k", "integer", "k"),
        COUNT,
    ],
)
async def kth_smallest(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """The k-th smallest value of a column over all parties' records.

    Inputs: ``data``; ``column`` (optional); ``k``: the 1-based rank in the
    joint data (``1`` is the minimum, the joint count is the maximum). NaN
    values are dropped; the order is IEEE 754 totalOrder (``-0.0`` before
    ``0.0``), which agrees with ``<`` everywhere else.

    Returns:
        ``{"value", "k", "count"}``: the value is one of the data values.

    Raises:
        BadRequest: If ``k`` is not a positive integer (checked before any
            exchange) or exceeds the joint count (checked by every party
            right after the joint count).
    """
    raw = inputs.get("k")
    k = raw if isinstance(raw, int) and not isinstance(raw, bool) else 0  # 0: refused below

    def options() -> dict[str, Any]:
        if not 1 <= k < 2**62:
            raise BadRequest("'k' must be a positive integer: the 1-based rank in the joint data")
        return {"function": "kth_smallest", "k": k}

    def ranks(total: int) -> list[int]:
        if k > total:
            raise BadRequest("'k' is larger than the number of records of all parties")
        return [k]

    total, found = await _order_statistics(ctx, inputs, options, ranks)
    return {"value": found[k], "k": k, "count": total}


@service.job(
    "median",
    inputs=[
        DATA,
        COLUMN,
        Input(
            "convention",
            "string",
            "for an even count n: the mean of the values of rank n/2 and n/2 + 1, or the "
            "lower or the upper one; must agree",
            default="average",
            choices=MEDIAN_CONVENTIONS,
        ),
    ],
    outputs=[
        Output("median", "number", "the joint median"),
        Output("convention", "string", "the convention used"),
        COUNT,
    ],
)
async def median(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """The median of a column over all parties' records.

    Inputs: ``data``; ``column`` (optional); ``convention`` for an even
    count ``n``: ``"average"`` (default, as :func:`numpy.median`: the mean
    of the values of rank ``n/2`` and ``n/2 + 1``), ``"lower"`` (rank
    ``n/2``) or ``"upper"`` (rank ``n/2 + 1``). For an odd count every
    convention gives the value of rank ``(n + 1) / 2``. NaN values are dropped.

    Returns:
        ``{"median", "convention", "count"}``.
    """
    convention = inputs.get("convention", "average")

    def options() -> dict[str, Any]:
        if convention not in MEDIAN_CONVENTIONS:
            raise BadRequest("'convention' must be 'average', 'lower' or 'upper'")
        return {"function": "median", "convention": convention}

    def middle(total: int) -> tuple[int, int]:
        if total % 2:
            return (total + 1) // 2, (total + 1) // 2
        if convention == "lower":
            return total // 2, total // 2
        if convention == "upper":
            return total // 2 + 1, total // 2 + 1
        return total // 2, total // 2 + 1

    total, found = await _order_statistics(ctx, inputs, options, lambda n: list(middle(n)))
    lower, upper = middle(total)
    if lower == upper:
        return {"median": found[lower], "convention": convention, "count": total}
    # the mean of two finite values can overflow (1.7e308 + 1.7e308); an infinite
    # data value stays a value, as kth_smallest gives it
    value = (found[lower] + found[upper]) / 2
    _refuse_overflow(value, (found[lower], found[upper]), "median", "median")
    return {"median": value, "convention": convention, "count": total}


def _refuse_overflow(value: float, between: tuple[float, float], key: str, function: str) -> None:
    """Refuse ``value`` if it is not finite although the order statistics it comes from are.

    Raises:
        ComputationFailed: (422, on every party alike) via :func:`finite_result`.
    """
    if all(math.isfinite(v) for v in between):
        finite_result({key: value}, f"'smpc.{function}'")


def _probabilities(raw: Any) -> list[float]:
    if not isinstance(raw, list | tuple) or not 1 <= len(raw) <= MAX_PROBABILITIES:
        raise BadRequest(
            f"'probabilities' must be a list of 1 to {MAX_PROBABILITIES} numbers from 0 to 1"
        )
    probabilities: list[float] = []
    for p in raw:
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
            raise BadRequest("every one of the 'probabilities' must be a number from 0 to 1")
        probabilities.append(float(p))
    return probabilities


@service.job(
    "quantiles",
    inputs=[
        DATA,
        COLUMN,
        Input(
            "probabilities",
            "array",
            "the probabilities, each from 0 to 1 (numpy.quantile's linear method); must agree",
            required=True,
            minimum=1,
            maximum=MAX_PROBABILITIES,
            items="number",
        ),
    ],
    outputs=[
        Output("quantiles", "array", "the quantiles, in the order of the probabilities"),
        Output("probabilities", "array", "the probabilities"),
        Output("method", "string", "'linear'"),
        COUNT,
    ],
)
async def quantiles(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Quantiles of a column over all parties' records, as ``numpy.quantile`` computes them.

    Inputs: ``data``; ``column`` (optional); ``probabilities``: a list of 1
    to :data:`MAX_PROBABILITIES` numbers in ``[0, 1]``. The method is
    numpy's default ``"linear"`` (Hyndman and Fan type 7): for ``n`` values
    and probability ``p``, with ``v = (n - 1) p``, the result interpolates
    between the order statistics of 0-based rank ``floor(v)`` and
    ``floor(v) + 1`` with weight ``v - floor(v)`` (see :func:`quantile_ranks`
    and :func:`interpolate`), so the result equals ``numpy.quantile(values,
    p)`` bit for bit on finite data. (With infinite values, where the
    quantile is a single order statistic, numpy's formula may compute
    ``inf - inf`` and return NaN; this returns the order statistic.) The
    parties learn the order statistics interpolated between. NaN values are
    dropped.

    Returns:
        ``{"quantiles", "probabilities", "method", "count"}``, the quantiles
        in the order of the probabilities.
    """
    probabilities: list[float] = []

    def options() -> dict[str, Any]:
        probabilities.extend(_probabilities(inputs.get("probabilities")))
        return {"function": "quantiles", "probabilities": probabilities}

    def ranks(total: int) -> list[int]:
        wanted: list[int] = []
        for p in probabilities:
            lower, upper, _ = quantile_ranks(total, p)
            wanted += [lower, upper]
        return wanted

    total, found = await _order_statistics(ctx, inputs, options, ranks)
    results: list[float] = []
    for p in probabilities:
        lower, upper, gamma = quantile_ranks(total, p)
        if lower == upper:
            results.append(found[lower])
            continue
        value = interpolate(found[lower], found[upper], gamma)
        _refuse_overflow(value, (found[lower], found[upper]), "quantiles", "quantiles")
        results.append(value)
    return {
        "quantiles": results,
        "probabilities": probabilities,
        "method": "linear",
        "count": total,
    }
