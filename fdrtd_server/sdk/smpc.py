"""The SMPC engine: secure sums, secure OR and secure maximum over a peer session.

All protocols in :mod:`protocols.smpc` are built from three primitives, run
between the servers of one computation session (semi-honest servers). For
the secure sum, any coalition of up to n-1 servers learns nothing beyond the
output, since every revealed value is masked with randomness of at least
one server outside it. The secure OR, and the secure maximum built on it,
give that guarantee to every coalition that does not hold both of its two
roles (the first and the last of the session's parties).

Setup (stage ``SEEDS``, one message round for the public metadata)
    Every pair of parties (i, j) shares a 32-byte seed ``s_ij`` from key
    agreement: each server's gateway derives it from its own X25519 key and
    the peer's public key in the federation file, bound to the session id by
    HKDF, so no message is needed and no session reuses a seed (session ids
    are refused on reuse). A seed is the compact form of a whole vector of
    additive shares: ``PRG(s_ij, label)`` expands it with AES-256-CTR
    (:func:`fdrtd_server.sdk.ring.prg_uint64`). The public metadata every
    party declares (shapes, options) is exchanged in the same round as the
    first secure sum when the caller defers it, else in a round of its own.

Secure sum (one broadcast round per sum)
    Party i publishes ``y_i = x_i - sum_j PRG(s_ij) + sum_j PRG(s_ji)`` (mod
    2^64, or mod 2^256 for the big ring). The masks cancel in the sum, so
    ``sum_i y_i = sum_i x_i``, while each ``y_i`` alone is uniformly random:
    this is additive secret sharing where each party sends one masked vector
    instead of n-1 shares (pairwise masking, as in Bonawitz et al., CCS 2017,
    without the dropout recovery). Labels bind the masks to the session, the
    operation's tag and the pair, so no mask is ever used twice.

Count and sum (one round where the minimum cohort allows, else two)
    The joint count goes out masked with every party's masked sum, except
    from parties whose own records do not yet meet their minimum cohort;
    those send theirs only once the opened count has passed the check
    (:meth:`SmpcSession.count_and_sum`, which says what that reveals).

Secure OR (three hops)
    To learn only whether *any* party holds a 1: every party sends its bit,
    masked as for a secure sum, to the evaluator E (the last party), and the
    comparer C (the first party) adds a secret uniform offset, so that E
    learns only a uniformly random residue; a Diffie-Hellman private
    equality test between E's residue and C's offset then tells C whether
    the bits sum to zero, and C sends the OR to every party
    (:meth:`SmpcSession.any_true`). Nobody learns which or how many parties
    hold a 1 unless C and E collude. (A cheaper OR, in which each party adds
    ``r_i * b_i`` to a secure sum, is *not* secure: a party that holds a 1
    subtracts its own term and learns whether anyone else does.)

Secure maximum (16 rounds of secure OR)
    The maximum of the parties' values is found by 16-ary search over the
    order-preserving 64-bit keys of float64 (:func:`fdrtd_server.sdk.ring.float_order_key`):
    each round tests 15 thresholds t with "is any party's maximum >= t?".
    Every bit revealed is a function of the maximum itself, so the parties
    and the client learn the maximum and nothing else (the reference system
    broadcast each party's own minimum and maximum in the clear).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fdrtd_server import provenance
from fdrtd_server.errors import ComputationFailed
from fdrtd_server.peers import PeerSession, both
from fdrtd_server.sdk import curve, ring
from fdrtd_server.sdk.namespace import Namespace
from fdrtd_server.sdk.stages import Message, Stage, StagedPeers

__all__ = ["CHUNK", "SmpcSession", "SmpcStage", "points_from"]

CHUNK = 128 * 1024
"""Elements per peer message (1 MiB of uint64), below the bus payload limit."""
SEND_WINDOW = 4
"""Pieces of one vector in flight at once, per receiving party."""
BIG_PIECE = 2048
"""Wide-ring elements per peer message (557 KiB in the exact ring), below the bus limit."""
SEARCH_BITS = 4
"""Bits of a key that each round of the secure maximum settles (15 thresholds a key)."""
SEARCH_ROUNDS = 64 // SEARCH_BITS
"""Rounds of secure OR in one secure maximum."""
U64 = npt.NDArray[np.uint64]


_PUBLIC = Message.map({"parties": Message.list_of(Message.text())}, open=True)
"""Public metadata a party declares: its own keys, and the session's parties in order."""
_PIECE = Message.uint64_vector(length="length")
"""One piece (at most :data:`CHUNK` elements) of a masked uint64 vector."""
_WIDE_ITEM = Message.bytes(size=ring.EXACT_RING_BITS // 8)
_WIDE = Message.list_of(_WIDE_ITEM, length="length")
"""Masked exact-ring values, one big-endian string of the ring's width each."""


def _with_public(tag: str, piece: Message) -> Stage:
    """The first piece of a sum that carries a deferred setup's public metadata."""
    form = Message.map({"v": piece, "public": _PUBLIC})
    return Stage(f"{tag} with metadata", form, tag=tag, title="masked vector")


def _gate_form(early: Message) -> Message:
    """The count gate's message: a masked count, maybe a sum, maybe public metadata."""
    return Message.map(
        {
            "count": Message.uint64_vector(length=1),
            "sum": Message.optional(early),
            "public": Message.optional(_PUBLIC, required="with_public"),
        }
    )


class SmpcStage(Namespace):
    """The engine's stages and their messages' forms (:mod:`fdrtd_server.sdk.stages`).

    Tags carry the operation's counter and, for long vectors, the piece:
    ``sum.7.0`` is the first piece of the session's seventh operation.
    """

    SEEDS = Stage("seeds", _PUBLIC, title="public metadata")
    SUM = Stage("sum", _PIECE, title="masked vector")
    SUM_FIRST = _with_public("sum", _PIECE)
    # the count gate's sum is checked for its length once the count has been
    # vetted, as the early sum below: a party whose declared shape differs is
    # refused by that vetting, with the reason
    GATE = Stage(
        "count gate",
        _gate_form(Message.list_of(Message.uint64_vector(), length=1)),
        tag="sum",
        title="masked count",
    )
    EARLY_SUM = Stage(
        "count gate's sum", Message.list_of(_PIECE, length=1), tag="sum", title="masked vector"
    )
    BIG_GATE = Stage(
        "exact count gate", _gate_form(Message.list_of(_WIDE_ITEM)), tag="sum", title="masked count"
    )
    EARLY_BIGSUM = Stage("exact count gate's sum", _WIDE, tag="sum", title="masked vector")
    BIGSUM = Stage("bigsum", _WIDE, title="masked vector")
    BIGSUM_FIRST = _with_public("bigsum", _WIDE)
    OR_SHARE = Stage(
        "or.count",
        Message.map(
            {
                "v": Message.uint64_vector(length="length"),
                "offer": Message.bytes(multiple=curve.POINT_BYTES),
            }
        ),
        tag="or",
        title="share of an OR",
    )
    OR_QUERY = Stage(
        "or.query", Message.bytes(size="size"), tag="or", title="list of points of an OR"
    )
    OR_BITS = Stage(
        "or.bits", Message.array(np.uint8, length="length"), tag="or", title="result of an OR"
    )


class SmpcSession:
    """Secure arithmetic between the parties of one :class:`PeerSession`."""

    def __init__(self, peers: PeerSession) -> None:
        self.peers = peers
        self.staged = StagedPeers(peers)
        self.parties = len(peers.parties)
        self._give: dict[str, bytes] = {}
        self._take: dict[str, bytes] = {}
        self._counter = 0
        self.public: dict[str, Any] = {}
        self._deferred: dict[str, Any] | None = None
        self._or_points: list[bytes] | None = None

    async def setup(
        self, public: dict[str, Any] | None = None, *, defer: bool = False
    ) -> dict[str, Any]:
        """Get the pairwise seeds, and exchange public metadata (shapes, options).

        Args:
            public: What this party declares to the others; compare it with
                ``protocols.smpc.service.agree``.
            defer: Send ``public`` along with the first secure sum instead of in
                a round of its own (saves a round); :attr:`public` is filled
                once that sum is done.

        Returns:
            Every party's ``public`` dict, by party name (only ours if deferred).
        """
        seeds = await self.peers.pair_seeds()
        for party in self.peers.others:
            seed = seeds.get(party)
            if not isinstance(seed, bytes) or len(seed) != ring.SEED_BYTES:
                raise ComputationFailed(f"no pairwise seed could be derived with party '{party}'")
            # one shared seed per pair; the labels tell the two directions apart
            self._give[party] = self._take[party] = seed
        # the parties' order gives roles (the OR's comparer and evaluator, order
        # statistics' shifter and evaluator), so every party must use the same
        mine = {**(public or {}), "parties": list(self.peers.parties)}
        found = provenance.bound(self.peers)
        if provenance.KEY not in mine and found is not None:
            mine[provenance.KEY] = found.declared()  # set up without declare()
        self.public = {self.peers.me: mine}
        if defer:
            self._deferred = mine
            return self.public
        self._store_public(await self.staged.exchange(SmpcStage.SEEDS, mine))
        self._vet_public()
        return self.public

    def _vet_public(self) -> None:
        """Every party's public metadata is known: refuse what no party may compute.

        Called before anything but the setup is opened. The rule of every
        multi-party function: a named dataset whose owner keeps
        ``analyst_inputs = false`` is not computed on exactly beside an upload
        of the caller's (:func:`fdrtd_server.provenance.vet`, from the
        declarations of ``fdrtd_server.sdk.declare``).
        """
        provenance.vet(self.public)

    def _store_public(self, received: dict[str, Any]) -> None:
        """Keep every party's public metadata (of the form ``_PUBLIC``, checked by its stage)."""
        for party, value in received.items():
            if value["parties"] != self.peers.parties:
                raise ComputationFailed(
                    f"party '{party}' lists the session's parties in another order; "
                    "every party must be given the same 'session.parties' list"
                )
            self.public[party] = value

    async def _send_deferred(self) -> None:
        """Exchange public metadata that a deferred setup still holds, in a round of its own."""
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            self._store_public(await self.staged.exchange(SmpcStage.SEEDS, deferred))
            self._vet_public()

    def _label(self, tag: str, giver: str, taker: str) -> bytes:
        return f"{self.peers.id}|{tag}|{giver}|{taker}".encode()

    def _next(self) -> int:
        """The next operation's number, part of its tags and mask labels."""
        self._counter += 1
        return self._counter

    def masked(self, tag: str, x: U64) -> U64:
        """``x`` under this party's pairwise masks for operation ``tag``.

        The masks of all parties cancel when the masked values of every party
        for the same ``tag`` are added, so a protocol may also send its masked
        value to a single party that adds them up (as ``order`` does).
        """
        y = x.copy()
        me = self.peers.me
        count = y.size
        for party, seed in self._give.items():
            y -= ring.prg_uint64(seed, self._label(tag, me, party), count).reshape(y.shape)
        for party, seed in self._take.items():
            y += ring.prg_uint64(seed, self._label(tag, party, me), count).reshape(y.shape)
        return y

    async def sum_ring(self, x: npt.ArrayLike) -> U64:
        """Secure sum of uint64 ring elements (any shape, same on every party)."""
        number = self._next()
        values = np.asarray(x, dtype=np.uint64)  # keeps 0-d shapes; masked() copies
        y = self.masked(SmpcStage.SUM.tag_for(number), values).reshape(-1)
        deferred, self._deferred = self._deferred, None
        received = await self._pieces(number, y, self.peers.others, deferred=deferred)
        if deferred is not None:
            for party, parts in received.items():
                self._store_public({party: parts[0]["public"]})
                parts[0] = parts[0]["v"]
            self._vet_public()
        received[self.peers.me] = _split(y)
        return _add(received, y.size).reshape(values.shape)

    async def count_and_sum(
        self,
        rows: int,
        x: npt.ArrayLike,
        *,
        ready: bool,
        vet: Callable[[int], None],
    ) -> tuple[int, U64]:
        """The joint record count and a secure sum of ``x``, in one round where policy allows.

        Every party sends its masked record count. A party that is ``ready``
        (its own records already meet its policy's minimum cohort, so the
        joint count will too) sends its masked ``x`` in the same message, if
        it fits in one. Then every party opens the count and calls
        ``vet(count)``, which raises to refuse (the cohort check; the public
        metadata of a deferred setup is in :attr:`public` by then). Only if
        it passes do the parties that held back send their masked ``x``, in a
        second round. When every party is ready, a sum costs one round.

        What a party that held back can learn from the ready parties' masked
        values before it refuses is the sum of their inputs, if it is the only
        one that held back (it knows its own masks with each; masks shared
        with another party that held back hide everything). That is an
        aggregate over at least as many records as each ready party's own
        policy demands, and no more than it would learn from a result it
        could reach by adding records of its own: a party's minimum cohort
        protects that party's records.

        Args:
            rows: This party's number of records.
            x: This party's uint64 ring elements (any shape, the same on every
                party; ``vet`` should refuse when the declared shapes differ).
            ready: Whether this party may send its masked ``x`` before the
                joint count is known.
            vet: Called with the joint count on every party; raises to refuse.

        Returns:
            The joint count and the sum of every party's ``x``.
        """
        count_number, sum_number = self._next(), self._next()
        values = np.asarray(x, dtype=np.uint64)
        y = self.masked(SmpcStage.SUM.tag_for(sum_number), values).reshape(-1)

        async def late(sources: list[str], send: bool) -> dict[str, list[Any]]:
            received = await self._pieces(sum_number, y, sources, send=send)
            return {**received, self.peers.me: _split(y)} if send else received

        early = _split(y) if ready and y.size <= CHUNK else None
        gate = (SmpcStage.GATE, SmpcStage.EARLY_SUM)
        total_rows, sums = await self._gate(
            gate, count_number, rows, early, vet, late, length=y.size
        )
        return total_rows, _add(sums, y.size).reshape(values.shape)

    async def count_and_sum_big(
        self,
        rows: int,
        values: Sequence[float],
        *,
        ready: bool,
        vet: Callable[[int], None],
    ) -> tuple[int, list[float]]:
        """:meth:`count_and_sum` for a few floats, summed exactly as :meth:`sum_big` does.

        Returns:
            The joint count and the sums of every party's ``values``.
        """
        count_number, sum_number = self._next(), self._next()
        wire_form = self._masked_big(SmpcStage.BIGSUM.tag_for(sum_number), values)
        length = len(wire_form)

        async def late(sources: list[str], send: bool) -> dict[str, list[Any]]:
            if send:
                await self.staged.broadcast(SmpcStage.BIGSUM, wire_form, sum_number)
            received = await self.staged.gather(
                SmpcStage.BIGSUM, sum_number, senders=sources, length=length
            )
            return {**received, self.peers.me: wire_form} if send else received

        early = wire_form if ready else None
        gate = (SmpcStage.BIG_GATE, SmpcStage.EARLY_BIGSUM)
        total_rows, sums = await self._gate(
            gate, count_number, rows, early, vet, late, length=length
        )
        return total_rows, _add_big(sums, len(wire_form))

    async def _gate(
        self,
        stages: tuple[Stage, Stage],
        number: int,
        rows: int,
        early: Any,
        vet: Callable[[int], None],
        late: Callable[[list[str], bool], Awaitable[dict[str, Any]]],
        *,
        length: int,
    ) -> tuple[int, dict[str, Any]]:
        """The round behind :meth:`count_and_sum`: count, ``early`` sums, ``vet``, the rest.

        Sends this party's masked count with ``early`` (its masked sum, or
        None to hold it back) and any deferred public metadata; opens the
        count and calls ``vet``; then ``late(sources, send)`` sends this
        party's sum if it held it back and receives those of the other
        parties that did. ``stages`` are the gate's and its early sum's
        (``GATE`` and ``EARLY_SUM``, or the exact ring's), whose sums have
        ``length`` elements. Returns the count and every party's masked sum.
        """
        stage, early_sum = stages
        count_tag = stage.tag_for(number)
        counted = self.masked(count_tag, ring.encode_int(np.array([rows]), parties=self.parties))
        deferred, self._deferred = self._deferred, None
        first = {"count": counted, "sum": early, "public": deferred}
        received = await self.staged.exchange(
            stage, first, number, length=length, with_public=deferred is not None
        )
        counts: dict[str, list[Any]] = {}
        sums: dict[str, Any] = {}
        for party, message in received.items():
            if deferred is not None and party != self.peers.me:
                self._store_public({party: message["public"]})
            counts[party] = [message["count"]]
            if message["sum"] is not None:
                sums[party] = message["sum"]
        if deferred is not None:
            self._vet_public()
        total_rows = int(ring.decode_int(_add(counts, 1))[0])
        vet(total_rows)
        for party in self.peers.others:
            if party in sums:
                early_sum.check(party, sums[party], {"length": length})
        held_back = [party for party in self.peers.parties if party not in sums]
        if held_back:
            sources = [party for party in held_back if party != self.peers.me]
            sums.update(await late(sources, self.peers.me in held_back))
        return total_rows, sums

    async def _pieces(
        self,
        number: int,
        y: U64,
        sources: Sequence[str],
        *,
        send: bool = True,
        deferred: dict[str, Any] | None = None,
    ) -> dict[str, list[Any]]:
        """Broadcast ``y`` (if ``send``) in pieces of :data:`CHUNK`; receive the sources' pieces.

        Every party's vector has ``y``'s size, so the sources send as many
        pieces. The first piece carries ``deferred`` public metadata, if
        given, as ``{"v": piece, "public": deferred}`` (stage ``SUM_FIRST``).
        Returns each source's pieces, each checked by its stage.
        """
        sizes = _sizes(y.size)
        pieces = len(sizes)
        window = asyncio.Semaphore(SEND_WINDOW)

        async def send_piece(k: int) -> None:
            piece = y[k * CHUNK : (k + 1) * CHUNK]
            first = k == 0 and deferred is not None
            async with window:
                await self.staged.broadcast(
                    SmpcStage.SUM,
                    {"v": piece, "public": deferred} if first else piece,
                    number,
                    k,
                )

        async def send_all() -> None:
            if send:
                # pieces go out a few at a time, so that sealing, HTTP and storage overlap
                await asyncio.gather(*(send_piece(k) for k in range(pieces)))

        async def receive_all() -> dict[str, list[Any]]:
            first = SmpcStage.SUM if deferred is None else SmpcStage.SUM_FIRST
            return {
                party: [
                    await self.staged.recv(
                        party, first if k == 0 else SmpcStage.SUM, number, k, length=sizes[k]
                    )
                    for k in range(pieces)
                ]
                for party in sources
            }

        _, received = await both(send_all(), receive_all())
        return received

    async def sum_fixed(
        self, x: npt.ArrayLike, frac_bits: int = ring.DEFAULT_FRAC_BITS
    ) -> npt.NDArray[np.float64]:
        """Secure sum of float arrays in 64-bit fixed point (overflow is refused, not wrapped)."""
        encoded = ring.encode_fixed(
            np.asarray(x, dtype=np.float64), frac_bits=frac_bits, parties=self.parties
        )
        return ring.decode_fixed(await self.sum_ring(encoded), frac_bits=frac_bits)

    async def sum_big(self, values: Sequence[float]) -> list[float]:
        """Secure sum of floats in the exact ring.

        The ring of :data:`ring.EXACT_RING_BITS` bits holds every finite
        float64 without rounding, so the sum is the exact sum of the inputs,
        rounded once to a float, whatever their scale (1e-300 or 1e300). Its
        masked values are 272 bytes an element and travel in pieces of
        :data:`BIG_PIECE` elements.
        """
        number = self._next()
        wire_form = self._masked_big(SmpcStage.BIGSUM.tag_for(number), values)
        deferred, self._deferred = self._deferred, None
        # pieces below the bus payload limit: the first under the plain tag
        starts = range(0, max(1, len(wire_form)), BIG_PIECE)
        suffixes = [(number,) if k == 0 else (number, k) for k in range(len(starts))]
        pieces = [wire_form[start : start + BIG_PIECE] for start in starts]
        for k, (suffix, piece) in enumerate(zip(suffixes, pieces, strict=True)):
            first = k == 0 and deferred is not None
            message = {"v": piece, "public": deferred} if first else piece
            await self.staged.broadcast(SmpcStage.BIGSUM, message, *suffix)
        received: dict[str, Any] = {self.peers.me: wire_form}
        for party in self.peers.others:
            parts: list[Any] = []
            for k, (suffix, piece) in enumerate(zip(suffixes, pieces, strict=True)):
                if k == 0 and deferred is not None:
                    message = await self.staged.recv(
                        party, SmpcStage.BIGSUM_FIRST, *suffix, length=len(piece)
                    )
                    self._store_public({party: message["public"]})
                    message = message["v"]
                else:
                    message = await self.staged.recv(
                        party, SmpcStage.BIGSUM, *suffix, length=len(piece)
                    )
                parts.extend(message)
            received[party] = parts
        if deferred is not None:
            self._vet_public()
        return _add_big(received, len(wire_form))

    def _masked_big(self, tag: str, values: Sequence[float]) -> list[bytes]:
        """``values`` in the exact ring under this party's masks, as big-endian byte strings."""
        bits = ring.EXACT_RING_BITS
        modulus = 1 << bits
        me = self.peers.me
        masked = list(
            ring.encode_big(
                values, parties=self.parties, frac_bits=ring.EXACT_FRAC_BITS, ring_bits=bits
            )
        )
        count = len(masked)
        for party, seed in self._give.items():
            mask = ring.prg_big(seed, self._label(tag, me, party), count, ring_bits=bits)
            masked = [(a - b) % modulus for a, b in zip(masked, mask, strict=True)]
        for party, seed in self._take.items():
            mask = ring.prg_big(seed, self._label(tag, party, me), count, ring_bits=bits)
            masked = [(a + b) % modulus for a, b in zip(masked, mask, strict=True)]
        return [v.to_bytes(bits // 8, "big") for v in masked]

    async def any_true(self, bits: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Secure OR of boolean arrays: only whether any party holds True is revealed.

        Elementwise over arrays of one shape on every party. Two parties have
        a role: the *comparer* ``C`` (the first of the session's parties) and
        the *evaluator* ``E`` (the last). For each element, with ``S`` the
        number of parties holding True and ``M`` the smallest power of two
        above the number of parties (so ``S = 0`` exactly when
        ``S = 0 mod M``):

        1. Every party sends its bit under the pairwise masks of the secure
           sum to ``E`` only; ``C`` adds a fresh uniform ``rho`` to its own.
           ``E`` adds them up and learns ``z = S + rho mod 2^64``, uniformly
           random since ``rho`` is ``C``'s secret. With its masked bit, ``C``
           sends ``T[rho mod M]^beta`` under a fresh scalar ``beta``, where
           ``T[v]`` is a public point of the curve per residue ``v``.
        2. ``E`` sends back ``T[z mod M]^alpha`` and ``(T[rho mod M]^beta)^alpha``
           under a fresh scalar ``alpha``: a Diffie-Hellman private equality
           test (after Meadows 1986 and Huberman, Franklin and Hogg 1999).
        3. ``C`` raises the first to ``beta``; equal points mean ``z = rho
           mod M``, that is ``S = 0``. ``C`` sends the OR to every party.

        ``E`` sees uniform residues and random points, ``C`` random points
        and the equality bit (the output), every other party only the
        output. Scalars are fresh per element, so equal residues never give
        equal points. Any coalition without both ``C`` and ``E`` learns
        nothing beyond the OR; ``C`` and ``E`` together would learn ``S``,
        the number of parties holding True. With two parties, ``C`` and
        ``E`` are all the parties, and neither learns more than the OR and
        its own bit imply.

        Cost: ``2n - 1`` messages in three hops (``n - 1`` to ``E``, one to
        ``C``, ``n - 1`` from ``C``); two X25519 multiplications per element
        on each of ``C`` and ``E``.

        Raises:
            ComputationFailed: Naming the party, if a message is malformed.
        """
        flags = np.asarray(bits, dtype=bool)
        count = flags.size
        await self._send_deferred()
        number = self._next()
        me, parties = self.peers.me, self.peers.parties
        comparer, evaluator = parties[0], parties[-1]
        mine = flags.reshape(-1).astype(np.uint64)
        offer = b""
        if me == comparer:
            rho = np.frombuffer(secrets.token_bytes(8 * count), dtype=np.uint64)
            mine = mine + rho  # wraps modulo 2^64, as intended
            residues = (rho & np.uint64(self._or_modulus() - 1)).tolist()
            betas = [curve.random_scalar() for _ in range(count)]
            table = self._or_table()
            offer = b"".join(curve.blind_each([table[v] for v in residues], betas))
        masked = self.masked(SmpcStage.OR_SHARE.tag_for(number, "count"), mine)
        if me == evaluator:
            found = await self._or_evaluate(number, masked)
        else:
            share = {"v": masked, "offer": offer}
            await self.staged.send(evaluator, SmpcStage.OR_SHARE, share, number, "count")
            if me == comparer:
                found = await self._or_compare(number, betas)
            else:
                # the bits come at the end of a chain: everyone -> evaluator ->
                # comparer -> us. Each link waits one session timeout longer than
                # the one before, so that the party next to a dropout names it
                received = await self.staged.recv(
                    comparer, SmpcStage.OR_BITS, number, "bits", patience=3.0, length=count
                )
                found = received != 0
        return np.asarray(found, dtype=bool).reshape(flags.shape)

    def _or_modulus(self) -> int:
        """``M``: the smallest power of two above the number of parties."""
        return 1 << self.parties.bit_length()

    def _or_table(self) -> list[bytes]:
        """The public points ``T[v]``, one per residue modulo ``M``, for this session."""
        if self._or_points is None:
            domain = b"fdrtd.smpc.or|" + hashlib.sha256(self.peers.id.encode()).digest()
            self._or_points = [
                curve.hash_to_point(v.to_bytes(2, "big"), domain) for v in range(self._or_modulus())
            ]
        return self._or_points

    async def _or_evaluate(self, number: int, masked: U64) -> npt.NDArray[np.bool_]:
        """``E``: open ``z``, answer the comparer's offer, and receive the OR."""
        comparer = self.peers.parties[0]
        count = masked.size
        total = masked.copy()
        offer: list[bytes] = []
        shares = await self.staged.gather(SmpcStage.OR_SHARE, number, "count", length=count)
        for party, message in shares.items():
            total += message["v"]
            if party == comparer:
                offer = points_from(message["offer"], party, count)
        residues = (total & np.uint64(self._or_modulus() - 1)).tolist()
        alphas = [curve.random_scalar() for _ in range(count)]
        table = self._or_table()
        query = curve.blind_each([table[v] for v in residues], alphas)
        try:
            answer = curve.blind_each(offer, alphas)
        except ValueError:
            raise ComputationFailed(f"party '{comparer}' sent invalid curve points") from None
        await self.staged.send(
            comparer, SmpcStage.OR_QUERY, b"".join(query + answer), number, "query"
        )
        received = await self.staged.recv(comparer, SmpcStage.OR_BITS, number, "bits", length=count)
        return np.asarray(received != 0)

    async def _or_compare(self, number: int, betas: list[bytes]) -> npt.NDArray[np.bool_]:
        """``C``: test the evaluator's points for equality and send the OR to every party."""
        evaluator = self.peers.parties[-1]
        count = len(betas)
        blob = await self.staged.recv(
            evaluator,
            SmpcStage.OR_QUERY,
            number,
            "query",
            patience=2.0,
            size=2 * count * curve.POINT_BYTES,
        )
        points = points_from(blob, evaluator)
        try:
            tested = curve.blind_each(points[:count], betas)
        except ValueError:
            raise ComputationFailed(f"party '{evaluator}' sent invalid curve points") from None
        found = np.array([a != b for a, b in zip(tested, points[count:], strict=True)], dtype=bool)
        await self.staged.broadcast(SmpcStage.OR_BITS, found.astype(np.uint8), number, "bits")
        return found

    async def maximum_keys(
        self, keys: npt.ArrayLike, present: npt.ArrayLike
    ) -> npt.NDArray[np.uint64]:
        """The maximum over parties of uint64 keys, elementwise, by 16-ary search.

        Each of :data:`SEARCH_ROUNDS` rounds settles :data:`SEARCH_BITS` bits
        of every key with one :meth:`any_true` over 15 thresholds per key.

        Args:
            keys: This party's candidate per element (its local maximum's key).
            present: Whether this party has a candidate at all (False for no data).
        """
        mine = np.asarray(keys, dtype=np.uint64).reshape(-1)
        has = np.asarray(present, dtype=bool).reshape(-1)
        low = np.zeros(mine.size, dtype=np.uint64)
        steps = np.arange(1, 1 << SEARCH_BITS, dtype=np.uint64)
        for round_number in range(SEARCH_ROUNDS):
            width = np.uint64(1 << (64 - SEARCH_BITS * (round_number + 1)))
            # low is a multiple of 2^SEARCH_BITS * width, so low + 15 * width never wraps
            table = low[:, None] + steps[None, :] * width  # (elements, 15) thresholds
            bits = (mine[:, None] >= table) & has[:, None]
            above = await self.any_true(bits)
            # thresholds increase along a row, so "some maximum >= t" is a prefix
            low = low + above.sum(axis=1).astype(np.uint64) * width
        return low.reshape(np.shape(keys))

    async def minimum_maximum(
        self, local_min: npt.ArrayLike, local_max: npt.ArrayLike, present: bool
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Joint minimum and maximum of float arrays; neither party's own is revealed."""
        lo = np.asarray(local_min, dtype=np.float64)
        hi = np.asarray(local_max, dtype=np.float64)
        # min(x) = -max(-x); both searches run in the same rounds
        keys = np.concatenate(
            [ring.float_order_key(-lo).reshape(-1), ring.float_order_key(hi).reshape(-1)]
        )
        found = await self.maximum_keys(keys, np.full(keys.size, present))
        values = ring.float_from_order_key(found)
        half = lo.size
        return (-values[:half]).reshape(lo.shape), values[half:].reshape(hi.shape)


def _sizes(size: int) -> list[int]:
    """The sizes of the pieces of a vector of ``size`` elements (one piece if empty)."""
    return [min(CHUNK, size - k) for k in range(0, max(size, 1), CHUNK)]


def _split(y: U64) -> list[Any]:
    """``y`` in the pieces :meth:`SmpcSession._pieces` sends."""
    return [y[k : k + CHUNK] for k in range(0, max(y.size, 1), CHUNK)]


def _add(received: dict[str, list[Any]], size: int) -> U64:
    """Add every party's pieces of a masked vector of ``size`` uint64 (mod 2^64).

    The pieces were checked by their stage (uint64, of the sizes of :func:`_sizes`).
    """
    total = np.zeros(size, dtype=np.uint64)
    for parts in received.values():
        for k, part in enumerate(parts):
            total[k * CHUNK : k * CHUNK + part.size] += part.reshape(-1)
    return total


def _add_big(received: dict[str, Any], count: int) -> list[float]:
    """Add every party's masked exact-ring values (``count`` byte strings each); decode.

    The values were checked by their stage (``count`` strings of the ring's width).
    """
    bits = ring.EXACT_RING_BITS
    modulus = 1 << bits
    total = [0] * count
    for items in received.values():
        total = [
            (t + int.from_bytes(b, "big")) % modulus for t, b in zip(total, items, strict=True)
        ]
    return ring.decode_big(total, frac_bits=ring.EXACT_FRAC_BITS, ring_bits=bits)


def points_from(blob: bytes, sender: str, count: int | None = None) -> list[bytes]:
    """Split a received blob into 32-byte curve points (``count`` of them, if given).

    Raises:
        ComputationFailed: Naming ``sender``, if the blob does not split so.
    """
    size = curve.POINT_BYTES
    if len(blob) % size or (count is not None and len(blob) != count * size):
        raise ComputationFailed(f"party '{sender}' sent a malformed list of points")
    return [blob[k : k + size] for k in range(0, len(blob), size)]
