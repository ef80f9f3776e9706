"""Frequency tables, histograms and contingency tables, jointly over all parties.

Four functions of the ``smpc`` microservice live here. Each is one party's
side of a protocol run between the servers of a computation session.

``frequency_table`` and ``histogram`` (horizontal partitioning)
    Every party counts its own records per public category (or per bin of
    public edges), plus an "other" cell for values outside them. The joint
    number of records is found first by a secure sum and checked against the
    minimum cohort; only then is the vector of counts summed securely
    (pairwise-masked sums in ``Z_2^64``, :class:`~fdrtd_server.sdk.smpc.SmpcSession`).

``contingency_table`` (horizontal partitioning)
    The same, with the local ``kx x ky`` count matrix of two categorical
    columns that every party holds for its own records.

``contingency_table_vertical`` (vertical partitioning)
    Two parties (the *holders*) hold one column each of the same records,
    joined on an id column (ids compared exactly, by the one rule of
    :mod:`fdrtd_server.sdk.ids`: ``7.0`` is ``7``, ``"7"`` is not). Each
    step runs only once the one before has passed the strictest minimum
    cohort ``m``, and both holders decide on the same numbers, so every
    party refuses together (the x-holder tells the parties without data):

    1. *Sizes.* The holders exchange the sizes of their id sets; both must
       be at least ``m``. Nothing else has been sent yet.
    2. *In-category joint count.* The table counts only the joined records
       whose values are among the analyst's categories, which can be far
       fewer than the joined ids. Its total ``c`` is found first, by a
       private set intersection *cardinality* over Curve25519 (X25519)
       (:mod:`fdrtd_server.sdk.curve`; De Cristofaro, Gasti and Tsudik, 2012):
       each holder blinds the ids whose value is in its categories, padded
       with random dummy items to its whole id set; each blinds the other's
       points once more and returns them sorted, an order the other cannot
       link to what it sent. Each holder counts the matches and learns ``c``
       and nothing else (not which ids, not how many of the other's ids are
       in its categories). ``c`` must be at least ``m``.
    3. *Join.* The private join of every vertical protocol
       (:func:`fdrtd_server.sdk.join.join_ids`, a Diffie-Hellman PSI with
       fresh scalars): each holder learns which of its own ids the other
       holds (so the number ``n >= c`` of joined ids), but nothing about the
       other's ids outside the intersection, since a singly blinded point
       cannot be tested against guesses without the other's secret scalar.
       Both holders order the intersection by its doubly blinded points,
       which gives the same order of records on both sides without revealing
       any id. The x-holder sends ``n`` and ``c`` to the other parties.

    The table is then ``T = I_x^T I_y`` for the one-hot indicator matrices of
    the aligned records, computed by a secure two-party matrix product, and
    checked to add up to ``c``:

    * With three or more parties, the first non-holder of the session is a
      *dealer* of a Beaver-style matrix triple in ``Z_2^64``: it draws
      ``R_x`` (``n x kx``), ``R_y`` (``n x ky``) and ``C_x`` from fresh seeds,
      computes ``C = R_x^T R_y`` and sends ``(seed R_x, seed C_x)`` to the
      x-holder and ``(seed R_y, C_y = C - C_x)`` to the y-holder. The holders
      exchange ``E = I_x - R_x`` and ``F = I_y - R_y`` (each uniformly random
      to the other) and hold the shares ``Z_x = I_x^T F + C_x`` (which equals
      ``R_x^T F + E^T F + C_x``) and ``Z_y = E^T R_y + C_y``; then
      ``Z_x + Z_y = T``. The shares are opened between the two holders only:
      the dealer, who knows ``R_x`` and ``R_y``, would learn ``I_x^T R_y``
      from ``Z_y`` and thereby ``I_x``. The x-holder then sends ``T`` to the
      other parties. Secure against one semi-honest party; the dealer must
      not collude with a holder.
    * With exactly two parties there is no dealer, and additively
      homomorphic Paillier encryption (``phe``) does the product: the
      x-holder encrypts, for each aligned record, its one-hot row packed into
      one plaintext (slot ``s`` of ``b`` bits holds category ``s``, with
      ``2^b > n`` so that sums never carry into the next slot); the y-holder
      multiplies the ciphertexts of the records in each of its categories
      (adding the plaintexts), re-randomises every sum with a fresh
      encryption of zero, and sends them back; the x-holder decrypts the
      ``ky`` packed columns of ``T`` and sends ``T`` to the y-holder. The
      y-holder sees only ciphertexts; the x-holder sees only ``T``. The cost
      is one encryption per aligned record (about 80 per second and core at
      2048 bits, so about 13 s for 1000 records).

Differential privacy
    On a named dataset whose owner requires differential privacy, the three
    horizontal tables are released with noise (``epsilon``): the query's
    epsilon is spent from the dataset's budget on this server once every
    check that needs no data has passed, split evenly between the count and
    the cells; this party adds its own integer noise (OpenDP, the owner's
    mechanism) to its count and to each of its cells before anything is
    shared. One record is in at most one cell, so the cells have l1 and l2
    sensitivity 1 under adding or removing a record, as the count has.
    The opened count and cells are already noisy; the cohort check sees the
    noisy count; noisy cells below 0 are shown as 0, and then small (and
    empty) cells are suppressed as below (post-processing). The vertical
    table has no such release and is refused there (403).

Disclosure control (invariant 3)
    A table over fewer records than the minimum cohort is refused on every
    party, and no table (nor, for the vertical table, the join) is opened
    before its record count has passed. The minimum is the *largest*
    ``min_cohort`` among the parties' policies, exchanged in the setup round,
    so every party returns the same answer and every owner's policy holds.
    Cells with ``0 < count < small_cell`` are suppressed (``None``), the
    threshold being the strictest of the parties' minimum cohorts and their
    owners' ``small_cell`` (and where any party computes on an owner's named
    dataset, empty cells are hidden too, so that "none" and "a few" look
    alike), and because
    the total is released, further cells are suppressed until at least two
    are hidden and the hidden cells add up to enough that none of them is
    known to be below the minimum (complementary suppression,
    :func:`suppress`). The servers themselves see the table before
    suppression; suppression protects against the analyst. Each table is
    suppressed on its own: tables asked for with overlapping categories or
    bins can be differenced (``docs/protocols.md``).

Threat model, what each party learns, and round counts: ``docs/protocols.md``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from phe import paillier

from fdrtd_server.sdk import (
    COLUMN,
    DATA,
    EPSILON,
    PRIVACY,
    BadRequest,
    CohortTooSmall,
    ComputationFailed,
    Dataset,
    Input,
    JobContext,
    Output,
    PeerSession,
    SmpcSession,
    agree,
    canonical_ids,
    curve,
    declare,
    id_bytes,
    join_ids,
    numeric,
    points_from,
    privacy,
    private_release,
    receive_bytes,
    ring,
    send_bytes,
    session_for,
    suppress,
)
from fdrtd_server.sdk.ids import Id
from protocols.smpc.common import PAILLIER_INPUT, paillier_bits, service

__all__ = [
    "contingency_table",
    "contingency_table_vertical",
    "frequency_table",
    "histogram",
]

Label = str | int | float
U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

MAX_CATEGORIES = 10_000
"""Most categories (or bins) per dimension."""
MAX_CELLS = 1_000_000
"""Most cells of a contingency table."""

MAX_IDS = 10_000_000
"""Most points a holder may send the dealer in the count stage (bounds its memory)."""

_OTHER = -1  # category index of a value outside the categories or bins
_MISSING = -2  # category index of a missing value (NaN)


# --- inputs -------------------------------------------------------------------------------


def _labels(value: Any, name: str) -> list[Label]:
    """Check a list of public category labels (strings or finite numbers, distinct)."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_CATEGORIES:
        raise BadRequest(
            f"'{name}' must be a list of 1 to {MAX_CATEGORIES} category labels (strings or numbers)"
        )
    for label in value:
        if isinstance(label, bool) or not isinstance(label, str | int | float):
            raise BadRequest(f"every label in '{name}' must be a string or a number")
        if isinstance(label, float) and not math.isfinite(label):
            raise BadRequest(f"the labels in '{name}' must be finite numbers")
    # Python compares numbers exactly (2**60 + 1 != 2.0**60, while 2 == 2.0), so
    # the set of numbers is the set of distinct values without rounding
    numbers = [label for label in value if not isinstance(label, str)]
    if len({_text(label) for label in value}) != len(value) or len(set(numbers)) != len(numbers):
        raise BadRequest(f"the labels in '{name}' must be distinct")
    return list(value)


def _edges(value: Any) -> list[float]:
    """Check bin edges: at least two finite numbers, strictly increasing."""
    if (
        not isinstance(value, list)
        or not 2 <= len(value) <= MAX_CATEGORIES + 1
        or not all(isinstance(e, int | float) and not isinstance(e, bool) for e in value)
    ):
        raise BadRequest(f"'bins' must be a list of 2 to {MAX_CATEGORIES + 1} numbers (bin edges)")
    edges = [float(e) for e in value]
    if not all(math.isfinite(e) for e in edges) or any(
        b <= a for a, b in itertools.pairwise(edges)
    ):
        raise BadRequest("'bins' must be finite and strictly increasing")
    return edges


def _text(label: Label) -> str:
    """The text a label matches in a text column (``1`` matches ``"1"``)."""
    return label if isinstance(label, str) else repr(label)


def _name(inputs: dict[str, Any], key: str) -> str:
    name = inputs.get(key)
    if not isinstance(name, str) or not name:
        raise BadRequest(f"'{key}' must name a column of the dataset")
    return name


def _vector(dataset: Dataset, name: Any) -> npt.NDArray[Any]:
    column = dataset.column(name)
    if column.ndim != 1:
        raise BadRequest("tables need columns of single values, not of vectors")
    return column


def _lookup(values: npt.NDArray[Any], keys: npt.NDArray[Any]) -> I64:
    """Position of each value in ``keys``, or ``_OTHER`` (vectorised by binary search)."""
    if keys.size == 0:
        return np.full(values.shape, _OTHER, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    position = np.minimum(np.searchsorted(ordered, values), ordered.size - 1)
    hit = ordered[position] == values
    return np.where(hit, order[position], _OTHER).astype(np.int64)


def _exact_keys(labels: list[Label], dtype: np.dtype[Any]) -> tuple[npt.NDArray[Any], I64]:
    """The labels a column of ``dtype`` can hold exactly, as that dtype, and their positions.

    Comparing in float64 would make 2**60 and 2**60 + 1 one value (float64 has
    53 bits of mantissa), so an integer column is compared as integers and a
    label that the column's dtype cannot hold exactly (1.5 in an integer
    column, 2**60 + 1 in a float column, -1 in an unsigned one) matches
    nothing.
    """
    keys: list[int | float] = []
    where: list[int] = []
    for position, label in enumerate(labels):
        if isinstance(label, str):
            continue
        if dtype.kind == "f":
            try:
                exact: int | float = float(label)
            except OverflowError:  # an integer beyond the float range
                continue
        else:
            if isinstance(label, float) and not label.is_integer():
                continue
            exact = int(label)
            info = np.iinfo(dtype)
            if not int(info.min) <= exact <= int(info.max):
                continue
        if exact == label:  # exact comparison of int and float in Python
            keys.append(exact)
            where.append(position)
    return np.array(keys, dtype=dtype), np.array(where, dtype=np.int64)


def category_index(column: npt.NDArray[Any], labels: list[Label]) -> I64:
    """Map each record to the index of its category.

    A numeric column matches numeric labels by exact value (an integer column
    as integers, so 2**60 + 1 is not 2**60); a text column matches each
    label's text (numbers as ``repr``, so ``1`` matches ``"1"`` and ``1.5``
    matches ``"1.5"``).

    Returns:
        The index into ``labels``, ``-1`` for a value that is none of them and
        ``-2`` for a missing value (NaN in a numeric column).

    Raises:
        BadRequest: If a numeric column is given text labels.
    """
    kind = column.dtype.kind
    if kind in "biuf":
        if any(isinstance(label, str) for label in labels):
            raise BadRequest("a numeric column needs numeric category labels")
        values = column.astype(np.int64) if kind == "b" else column
        if kind == "f":
            values = values.astype(np.float64, copy=False)
        keys, where = _exact_keys(labels, values.dtype)
        found = _lookup(values, keys)
        index = np.where(found >= 0, where[np.maximum(found, 0)] if where.size else 0, found)
        if kind == "f":
            index[np.isnan(values)] = _MISSING
        return index.astype(np.int64)
    texts = column.astype(str)
    return _lookup(texts, np.array([_text(label) for label in labels], dtype=str))


def bin_index(column: npt.NDArray[Any], edges: list[float]) -> I64:
    """Map each record to its bin: ``[e0, e1), ..., [e_{k-1}, e_k]`` (the last one closed).

    Returns:
        The bin index, ``-1`` outside ``[e0, e_k]`` and ``-2`` for NaN.

    Raises:
        BadRequest: If the column is not numeric.
    """
    values = numeric(column, "binned column")
    bounds = np.asarray(edges, dtype=np.float64)
    index = (np.searchsorted(bounds, values, side="right") - 1).astype(np.int64)
    index[values == bounds[-1]] = bounds.size - 2
    index[(values < bounds[0]) | (values > bounds[-1])] = _OTHER
    index[np.isnan(values)] = _MISSING
    return index


def _bin_labels(edges: list[float]) -> list[Label]:
    last = len(edges) - 2
    return [
        f"[{a:g}, {b:g}{']' if k == last else ')'}"
        for k, (a, b) in enumerate(itertools.pairwise(edges))
    ]


def _threshold(smpc: SmpcSession) -> int:
    """The strictest minimum cohort among the parties' policies."""
    minimums = [public.get("min_cohort") for public in smpc.public.values()]
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in minimums):
        raise ComputationFailed("a party sent a malformed minimum cohort size")
    return max(int(m) for m in minimums)


def _declared(ctx: JobContext, private: bool = False) -> dict[str, Any]:
    """What this party declares for disclosure control: minimum cohort, small cells, named data.

    ``private``: this party's table is a differentially private release (of
    an owner's named dataset): empty cells are hidden too.
    """
    # an owner's named dataset: empty cells hidden too
    return declare(ctx, small_cell=ctx.env.small_cell, named=bool(ctx.versions) or private)


def _cells(smpc: SmpcSession) -> tuple[int, bool]:
    """The strictest small-cell threshold of the parties' policies, and whether to hide empties.

    A party that declared no ``small_cell`` stands for its minimum cohort.
    """
    declared = [
        public.get("small_cell", public.get("min_cohort")) for public in smpc.public.values()
    ]
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in declared):
        raise ComputationFailed("a party sent a malformed small-cell threshold")
    return max(int(m) for m in declared), any(
        public.get("named") is True for public in smpc.public.values()
    )


def _hide(counts: I64, hidden: npt.NDArray[np.bool_]) -> list[Any]:
    shown = counts.astype(object)
    shown[hidden] = None
    cells: list[Any] = shown.tolist()
    return cells


async def _count_and_table(
    ctx: JobContext,
    smpc: SmpcSession,
    records: int,
    local: I64,
    keys: tuple[str, ...],
    release: privacy.Release | None = None,
) -> tuple[int, I64, tuple[int, bool]]:
    """The joint number of records and the joint table; with the strictest small cells.

    One round where every party's own records meet its minimum cohort, else
    two (``SmpcSession.count_and_sum``). Before any table is opened, every
    party refuses together if the parties disagree on ``keys`` of their
    (deferred) setup or the joint count is below the strictest minimum.

    With a ``release`` (this party's dataset needs differential privacy) the
    count and every cell get this party's own noise before they are shared
    (:func:`_noisy_table`), and this party never sends its table early: whether
    it may would tell whether its exact count meets its minimum cohort. The
    opened count and cells are then noisy, and the cohort check sees the
    noisy count.
    """
    ready = records >= ctx.env.min_cohort
    if release is not None:
        records, local = _noisy_table(release, records, local)
        ready = False

    def vet(total: int) -> None:
        for key in keys:
            agree(smpc, key)
        minimum = _threshold(smpc)
        if total < minimum:
            error = CohortTooSmall(minimum)
            error.collective = True  # every party sees the same total: no abort needed
            raise error

    total, summed = await smpc.count_and_sum(
        records, ring.encode_int(local, parties=smpc.parties), ready=ready, vet=vet
    )
    # exact counts are never below 0; noisy ones below 0 are shown as 0 (post-processing)
    return total, np.maximum(ring.decode_int(summed), 0), _cells(smpc)


def _table_statistics(cells: int) -> list[privacy.Statistic]:
    """What a table releases under differential privacy, declared before the spend.

    One record is counted once and lies in at most one cell (``other``
    included): adding or removing it changes the count by 1 and the vector
    of cells by 1 in one cell, so l1 and l2 sensitivity 1 for each.
    """
    return [
        privacy.Statistic("count", 1),
        privacy.Statistic("table", 1, size=cells, per_element=False),
    ]


async def _private_table(
    dataset: Dataset, epsilon: Any, cells: int, function: str
) -> privacy.Release | None:
    """Plan and spend a table's release, if ``dataset`` needs differential privacy (else None).

    Everything that can refuse without the data (the owner's epsilon floor,
    the two noise scales) is checked by :func:`privacy.plan_release` before
    the spend; a table needs no bounds (it counts, it sums no values).
    """
    return await private_release(dataset, epsilon, _table_statistics(cells), f"'smpc.{function}'")


def _noisy_table(release: privacy.Release, records: int, local: I64) -> tuple[int, I64]:
    """This party's noisy count and noisy cells: exact in Python integers, then noised.

    The noisy cells are int64 where each fits (always, at a scale within
    2^50), else objects, which the ring's own check refuses: that check sees
    only noisy values.
    """
    (rows,) = release.noisy("count", [int(records)])
    noisy = release.noisy("table", np.asarray(local, dtype=object))
    return rows, np.array(noisy).reshape(local.shape)


def _stated(result: dict[str, Any], release: privacy.Release | None) -> dict[str, Any]:
    """``result`` with this party's statement of a differentially private release, if any."""
    if release is None:
        return result
    return {**result, "privacy": {release.terms.dataset: release.statement()}}


# --- frequency tables and histograms -------------------------------------------------------


async def _one_way(ctx: JobContext, inputs: dict[str, Any], function: str) -> dict[str, Any]:
    async with session_for(ctx) as peers:
        # Checked inside the session, so that a refusal here ends it for all parties at once.
        edges = _edges(inputs.get("bins")) if function == "histogram" else None
        categories = None
        if function == "frequency_table":
            if (inputs.get("categories") is None) == (inputs.get("bins") is None):
                raise BadRequest("give either 'categories' (labels) or 'bins' (numeric edges)")
            if inputs.get("categories") is not None:
                categories = _labels(inputs.get("categories"), "categories")
            else:
                edges = _edges(inputs.get("bins"))
        dataset = await ctx.load_dataset(inputs.get("data"), private=True)
        column = _vector(dataset, inputs.get("column"))
        index = (
            bin_index(column, edges)
            if edges is not None
            else category_index(column, categories or [])
        )
        cells = len(edges) - 1 if edges is not None else len(categories or [])
        # everything that can refuse without the data has run: only now is anything spent
        release = await _private_table(dataset, inputs.get("epsilon"), cells + 1, function)
        smpc = SmpcSession(peers)
        await smpc.setup(
            {
                "function": function,
                "categories": categories,
                "bins": edges,
                **_declared(ctx, release is not None),
            },
            defer=True,
        )
        present = index != _MISSING
        local = np.bincount(np.where(index == _OTHER, cells, index)[present], minlength=cells + 1)
        agreed = ("function", "categories", "bins")
        total, counts, (minimum, empty) = await _count_and_table(
            ctx, smpc, int(present.sum()), local.astype(np.int64), agreed, release
        )
    hidden = suppress(counts, minimum, empty=empty)
    shown = _hide(counts, hidden)
    result: dict[str, Any] = {
        "counts": shown[:cells],
        "other": shown[cells],
        "total": total,
        "suppressed": [int(i) for i in np.flatnonzero(hidden)],
    }
    if categories is not None:
        result = {"categories": categories, **result}
    elif function == "frequency_table":
        result = {"categories": _bin_labels(edges or []), "edges": edges, **result}
    else:
        result = {"edges": edges, **result}
    return _stated(result, release)


def _categories(name: str, what: str, required: bool = False) -> Input:
    return Input(
        name,
        "array",
        f"{what}: distinct labels (strings or numbers), the same on every party",
        required=required,
        minimum=1,
        maximum=MAX_CATEGORIES,
        items=("string", "number"),
    )


def _bins(required: bool) -> Input:
    return Input(
        "bins",
        "array",
        "bin edges e0 < ... < ek; bin i is [e_i, e_(i+1)), the last one closed; must agree",
        required=required,
        minimum=2,
        maximum=MAX_CATEGORIES + 1,
        items="number",
    )


_TABLE = [
    Output("counts", "array", "the joint count of each cell; null where suppressed"),
    Output("total", "integer", "the number of records counted"),
    Output("suppressed", "array", "the cells hidden because they are small"),
]
_ONE_WAY = [
    Output("categories", "array", "the categories (frequency_table)"),
    Output("edges", "array", "the bin edges (with bins)"),
    *_TABLE,
    Output("other", "integer", "the count of values in no category or bin; null if suppressed"),
    PRIVACY,
]
_TWO_WAY = [
    Output("x_categories", "array", "the categories of x (rows)"),
    Output("y_categories", "array", "the categories of y (columns)"),
    *_TABLE,
]


@service.job(
    "frequency_table",
    inputs=[
        DATA,
        COLUMN,
        _categories("categories", "the categories to count (or give bins)"),
        _bins(required=False),
        EPSILON,
    ],
    outputs=_ONE_WAY,
)
async def frequency_table(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Joint counts of a column's values per public category, with small cells suppressed.

    Inputs: ``data``; ``column``; either ``categories`` (labels, the same on
    every party) or ``bins`` (numeric edges, as for :func:`histogram`).

    Returns:
        ``{"categories", "counts", "other", "total", "suppressed"}`` (plus
        ``"edges"`` with bins). ``counts[i]`` counts ``categories[i]`` and
        ``other`` the values that are none of them; a suppressed cell is
        ``None``, and ``suppressed`` lists its index (``len(categories)``
        stands for ``other``). Missing values (NaN) are not counted. On a
        named dataset whose owner requires differential privacy, the count
        and the cells are noisy and ``privacy`` states the spend (``epsilon``:
        what the query spends; module docstring).
    """
    return await _one_way(ctx, inputs, "frequency_table")


@service.job("histogram", inputs=[DATA, COLUMN, _bins(required=True), EPSILON], outputs=_ONE_WAY)
async def histogram(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Joint histogram of a numeric column over public bin edges, small cells suppressed.

    Inputs: ``data``; ``column``; ``bins``: edges ``e0 < ... < ek``; bin ``i``
    is ``[e_i, e_{i+1})``, the last one closed.

    Returns:
        ``{"edges", "counts", "other", "total", "suppressed"}``: ``other``
        counts the values outside ``[e0, ek]``; as for :func:`frequency_table`
        (with differential privacy too).
    """
    return await _one_way(ctx, inputs, "histogram")


@service.job(
    "contingency_table",
    inputs=[
        DATA,
        Input("x", "string", "the column of the rows", required=True),
        Input("y", "string", "the column of the columns", required=True),
        _categories("x_categories", "the categories of x", required=True),
        _categories("y_categories", "the categories of y", required=True),
        EPSILON,
    ],
    outputs=[*_TWO_WAY, PRIVACY],
)
async def contingency_table(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Joint contingency table of two columns that every party holds for its own records.

    Inputs: ``data``; ``x`` and ``y`` (column names); ``x_categories`` and
    ``y_categories`` (labels, the same on every party). Records whose ``x``
    or ``y`` is not among the categories (or missing) are not counted.

    Returns:
        ``{"x_categories", "y_categories", "counts", "total", "suppressed"}``:
        ``counts[i][j]`` counts the records with ``x_categories[i]`` and
        ``y_categories[j]``, ``None`` if suppressed; ``suppressed`` lists
        ``[i, j]`` of each suppressed cell. With differential privacy as
        :func:`frequency_table`.
    """
    async with session_for(ctx) as peers:
        x_labels = _labels(inputs.get("x_categories"), "x_categories")
        y_labels = _labels(inputs.get("y_categories"), "y_categories")
        if len(x_labels) * len(y_labels) > MAX_CELLS:
            raise BadRequest(f"a contingency table may have at most {MAX_CELLS} cells")
        dataset = await ctx.load_dataset(inputs.get("data"), private=True)
        xi = category_index(_vector(dataset, _name(inputs, "x")), x_labels)
        yi = category_index(_vector(dataset, _name(inputs, "y")), y_labels)
        # everything that can refuse without the data has run: only now is anything spent
        release = await _private_table(
            dataset, inputs.get("epsilon"), len(x_labels) * len(y_labels), "contingency_table"
        )
        smpc = SmpcSession(peers)
        await smpc.setup(
            {
                "function": "contingency_table",
                "x_categories": x_labels,
                "y_categories": y_labels,
                **_declared(ctx, release is not None),
            },
            defer=True,
        )
        inside = (xi >= 0) & (yi >= 0)
        local = np.zeros((len(x_labels), len(y_labels)), dtype=np.int64)
        np.add.at(local, (xi[inside], yi[inside]), 1)
        agreed = ("function", "x_categories", "y_categories")
        total, counts, cells = await _count_and_table(
            ctx, smpc, int(inside.sum()), local, agreed, release
        )
    return _stated(_two_way_result(x_labels, y_labels, counts, total, cells), release)


def _two_way_result(
    x_labels: list[Label],
    y_labels: list[Label],
    counts: I64,
    total: int,
    cells: tuple[int, bool],
) -> dict[str, Any]:
    minimum, empty = cells
    hidden = suppress(counts, minimum, empty=empty)
    return {
        "x_categories": x_labels,
        "y_categories": y_labels,
        "counts": _hide(counts, hidden),
        "total": total,
        "suppressed": [[int(i), int(j)] for i, j in np.argwhere(hidden)],
    }


# --- vertical partitioning: long messages ------------------------------------------------


async def _send_matrix(peers: PeerSession, to: str, tag: str, matrix: U64) -> None:
    await send_bytes(peers, to, tag, np.ascontiguousarray(matrix, dtype="<u8").tobytes())


async def _recv_matrix(peers: PeerSession, sender: str, tag: str, shape: tuple[int, int]) -> U64:
    blob = await receive_bytes(peers, sender, tag, size=8 * shape[0] * shape[1])
    return np.frombuffer(blob, dtype="<u8").astype(np.uint64).reshape(shape)


def _prg_matrix(seed: Any, label: bytes, shape: tuple[int, int], sender: str) -> U64:
    if not isinstance(seed, bytes) or len(seed) != ring.SEED_BYTES:
        raise ComputationFailed(f"party '{sender}' sent a malformed seed")
    return ring.prg_uint64(seed, label, shape[0] * shape[1]).reshape(shape)


# --- vertical partitioning: the protocol ---------------------------------------------------


@dataclass
class _Holding:
    """A holder's own column: canonical ids and category indices, row by row."""

    ids: list[Id]
    index: I64


def _holding(
    ids: npt.NDArray[Any], column: npt.NDArray[Any], labels: list[Label], name: str = "id"
) -> _Holding:
    """A holder's canonical ids and the category index of each (rows without an id dropped).

    Raises:
        BadRequest: If an id repeats or is not an id (:func:`canonical_ids`), or
            the column does not match the labels.
    """
    canonical, present = canonical_ids(ids, name)
    index = category_index(column, labels)[present]
    if len(set(canonical)) != len(canonical):
        raise BadRequest("the id column has duplicate values; a vertical join needs unique ids")
    return _Holding(canonical, index)


async def _load_holding(ctx: JobContext, inputs: dict[str, Any], labels: list[Label]) -> _Holding:
    dataset = await ctx.load_dataset(inputs.get("data"))
    id_name = _name(inputs, "id")
    return _holding(
        _vector(dataset, id_name), _vector(dataset, _name(inputs, "column")), labels, id_name
    )


@dataclass
class _Vertical:
    """What every party of a vertical table knows after the setup round."""

    ctx: JobContext
    peers: PeerSession
    holders: list[str]
    shape: tuple[int, int]
    minimum: int
    bits: int

    @property
    def others(self) -> list[str]:
        return [p for p in self.peers.parties if p not in self.holders]

    @property
    def other_holder(self) -> str:
        return self.holders[1] if self.peers.me == self.holders[0] else self.holders[0]

    def label(self, what: str) -> bytes:
        return f"{self.peers.id}|tables.vertical|{what}".encode()

    def domain(self, what: str) -> bytes:
        """The hash-to-curve domain of one of the two joins, bound to the session."""
        session = hashlib.sha256(self.peers.id.encode()).hexdigest()
        return f"fdrtd/smpc/tables/{what}/{session}".encode()


def _refused(minimum: int) -> CohortTooSmall:
    error = CohortTooSmall(minimum)
    error.collective = True  # every party decides on the same numbers: no abort needed
    return error


async def _reblind_theirs(
    v: _Vertical, tag: str, mine: list[bytes], scalar: bytes, theirs_count: int
) -> list[bytes]:
    """Send my blinded points (sorted); return the other's, blinded by my scalar too.

    The other holder's points come back in the order received.
    """
    peers, other = v.peers, v.other_holder
    await send_bytes(peers, other, f"{tag}.blinded", b"".join(sorted(mine)))
    blob = await receive_bytes(
        peers, other, f"{tag}.blinded", size=theirs_count * curve.POINT_BYTES
    )
    theirs = points_from(blob, other, theirs_count)
    # strictly increasing: sorted (positions say nothing) and distinct
    if any(a >= b for a, b in itertools.pairwise(theirs)):
        raise ComputationFailed(f"party '{other}' sent blinded ids not sorted and distinct")
    try:
        return await asyncio.to_thread(curve.reblind, theirs, scalar)
    except ValueError:
        raise ComputationFailed(f"party '{other}' sent invalid curve points") from None


async def _joint_count(v: _Vertical, holding: _Holding, theirs_count: int) -> int:
    """How many ids both holders have with a value among their categories; nothing else.

    A private set intersection *cardinality* (De Cristofaro, Gasti and Tsudik,
    CANS 2012) of each holder's in-category ids, padded with random dummy
    items to its whole id set, so that the padded sets reveal only the sizes
    already exchanged. With a third party, both holders send it the other's
    points blinded by both scalars, sorted, and it counts the matches
    (:func:`_count_for_holders`): the holders hear the count only if it
    passes, and -1 otherwise. With two parties each holder returns the other's
    points blinded by both scalars in sorted order, which is a random order
    to the other: it can count the matches but not tell which of its ids they
    are. Fresh scalars (and a domain of its own) keep these points unlinkable
    to the join's.
    """
    peers, other = v.peers, v.other_holder
    inside = id_bytes(
        [i for i, k in zip(holding.ids, holding.index.tolist(), strict=True) if k >= 0]
    )
    # random bytes items: ids are encoded as text, so a dummy never matches one
    dummies = [
        curve.encode_item(secrets.token_bytes(32)) for _ in range(len(holding.ids) - len(inside))
    ]
    scalar = curve.random_scalar()
    items = inside + dummies
    mine = await asyncio.to_thread(curve.hash_and_blind, items, scalar, v.domain("count"))
    theirs_double = await _reblind_theirs(v, "vt.count", mine, scalar, theirs_count)
    if v.others:
        # a third party counts, so that a holder learns c only if it passes
        dealer = v.others[0]
        await peers.send(dealer, "vt.count.size", {"points": len(theirs_double)})
        await send_bytes(peers, dealer, "vt.count.list", b"".join(sorted(theirs_double)))
        verdict = await peers.recv(dealer, "vt.count.verdict")
        passed = verdict.get("count") if isinstance(verdict, dict) else None
        if verdict == {"ok": False}:
            return -1  # below the minimum; the dealer does not say by how much
        if not isinstance(passed, int) or isinstance(passed, bool) or passed < v.minimum:
            raise ComputationFailed(f"party '{dealer}' sent a malformed count")
        return passed
    # sorted: an order the other cannot link to the points it sent
    await send_bytes(peers, other, "vt.count.reblinded", b"".join(sorted(theirs_double)))
    blob = await receive_bytes(
        peers, other, "vt.count.reblinded", size=len(mine) * curve.POINT_BYTES
    )
    mine_double = points_from(blob, other, len(mine))
    if any(a >= b for a, b in itertools.pairwise(mine_double)):
        raise ComputationFailed(f"party '{other}' sent points that are not sorted and distinct")
    return len(set(mine_double) & set(theirs_double))


async def _join(v: _Vertical, holding: _Holding, theirs_count: int) -> npt.NDArray[np.intp]:
    """The private join with the other holder (:func:`join_ids`): my rows of the common records.

    Run only once the in-category joint count has passed, so the join itself
    passes the minimum cohort too (it holds at least as many records); if a
    holder lied and it does not, the x-holder tells the other parties.
    """
    me, other = v.peers.me, v.other_holder
    try:
        _, rows = await join_ids(
            v.peers,
            v.holders,
            id_bytes(holding.ids),
            sizes={me: len(holding.ids), other: theirs_count},
            min_cohort=v.minimum,
            domain=v.domain("join"),
            tag="vt.join",
            tell=[],
        )
    except CohortTooSmall:
        await _tell_others(v, {"ok": False})
        raise
    assert rows is not None  # a holder gets its rows
    return rows


def _one_hot(index: I64, width: int) -> U64:
    rows = np.flatnonzero(index >= 0)
    matrix = np.zeros((index.size, width), dtype=np.uint64)
    matrix[rows, index[rows]] = 1
    return matrix


async def _tell_others(v: _Vertical, go: dict[str, Any], *, dealer: bool = True) -> None:
    """The x-holder's verdict to the parties that hold no column: refuse, or go on.

    ``dealer=False`` leaves out the dealer, which heard the verdict already.
    """
    if v.peers.me == v.holders[0]:
        for party in v.others if dealer else v.others[1:]:
            await v.peers.send(party, "vt.go", go)


def _size(value: Any, sender: str) -> int:
    size = value.get("ids") if isinstance(value, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ComputationFailed(f"party '{sender}' sent a malformed id-set size")
    return size


async def _holder(v: _Vertical, holding: _Holding) -> tuple[int, int, U64]:
    """A holder's side: sizes, in-category joint count, join, then the product.

    Each step runs only if the one before passed the strictest minimum cohort,
    and both holders decide on the same numbers, so they refuse together; the
    x-holder tells the other parties.
    """
    peers = v.peers
    is_x = peers.me == v.holders[0]
    other = v.other_holder
    # 1. the id-set sizes (the point lists below would show them anyway)
    await peers.send(other, "vt.ids", {"ids": len(holding.ids)})
    theirs_count = _size(await peers.recv(other, "vt.ids"), other)
    sizes_pass = min(len(holding.ids), theirs_count) >= v.minimum
    if is_x and v.others:
        # the dealer counts in step 2, if the sizes pass
        await peers.send(v.others[0], "vt.sizes", {"ok": sizes_pass})
    if not sizes_pass:
        await _tell_others(v, {"ok": False}, dealer=False)
        raise _refused(v.minimum)
    # 2. the number of records the table would count, before anything else
    joint = await _joint_count(v, holding, theirs_count)
    if joint < v.minimum:
        await _tell_others(v, {"ok": False})
        raise _refused(v.minimum)
    await v.ctx.progress(0.2)
    # 3. the join itself: which of my rows are common, in a common order
    rows = await _join(v, holding, theirs_count)
    n = int(rows.size)
    if not joint <= n <= min(len(holding.ids), theirs_count):
        raise ComputationFailed(
            f"the joins with party '{other}' disagree; run the computation again"
        )
    await _tell_others(v, {"ok": True, "n": n, "count": joint})
    await v.ctx.progress(0.3)
    kx, ky = v.shape
    indicator = _one_hot(holding.index[rows], kx if is_x else ky)
    if v.others:
        dealer = v.others[0]
        triple = await peers.recv(dealer, "vt.triple")
        if not isinstance(triple, dict):
            raise ComputationFailed(f"party '{dealer}' sent a malformed triple")
        if is_x:
            e = indicator - _prg_matrix(triple.get("seed_r"), v.label("rx"), (n, kx), dealer)
            c_x = _prg_matrix(triple.get("seed_c"), v.label("cx"), (kx, ky), dealer)
            await _send_matrix(peers, other, "vt.masked", e)
            f = await _recv_matrix(peers, other, "vt.masked", (n, ky))
            share = indicator.T @ f + c_x  # = R_x^T F + E^T F + C_x
        else:
            r_y = _prg_matrix(triple.get("seed_r"), v.label("ry"), (n, ky), dealer)
            c_y = await _recv_matrix(peers, dealer, "vt.triple.c", (kx, ky))
            await _send_matrix(peers, other, "vt.masked", indicator - r_y)
            e = await _recv_matrix(peers, other, "vt.masked", (n, kx))
            share = e.T @ r_y + c_y
        await _send_matrix(peers, other, "vt.share", share)
        table = share + await _recv_matrix(peers, other, "vt.share", (kx, ky))
    elif is_x:
        table = await _paillier_x(v, indicator)
    else:
        table = await _paillier_y(v, holding.index[rows])
    if is_x:
        for party in (*v.others, *([] if v.others else [other])):
            await _send_matrix(peers, party, "vt.table", table)
    return n, joint, table


async def _count_for_holders(v: _Vertical) -> None:
    """The dealer's first task: count the matches of the holders' doubly blinded lists.

    Each holder sends the other's padded in-category ids blinded by both
    scalars, sorted. The dealer learns the number of matches c, and tells the
    holders c only if it reaches the strictest minimum cohort (else only
    that it does not), so that a holder of a refused run learns nothing of c.
    """
    lists: list[set[bytes]] = []
    for holder in v.holders:
        size = await v.peers.recv(holder, "vt.count.size")
        count = size.get("points") if isinstance(size, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_IDS:
            raise ComputationFailed(f"party '{holder}' sent a malformed list size")
        blob = await receive_bytes(v.peers, holder, "vt.count.list", size=count * curve.POINT_BYTES)
        points = points_from(blob, holder, count)
        if any(a >= b for a, b in itertools.pairwise(points)):
            raise ComputationFailed(
                f"party '{holder}' sent points that are not sorted and distinct"
            )
        lists.append(set(points))
    matches = len(lists[0] & lists[1])
    verdict = {"count": matches} if matches >= v.minimum else {"ok": False}
    for holder in v.holders:
        await v.peers.send(holder, "vt.count.verdict", verdict)


async def _bystander(v: _Vertical) -> tuple[int, int, U64]:
    """A party without a column: the x-holder's verdict; the first deals; all get the table."""
    x_holder = v.holders[0]
    if v.peers.me == v.others[0]:
        sizes = await v.peers.recv(x_holder, "vt.sizes")
        if not isinstance(sizes, dict) or not isinstance(sizes.get("ok"), bool):
            raise ComputationFailed(f"party '{x_holder}' sent a malformed verdict")
        if not sizes["ok"]:
            raise _refused(v.minimum)
        await _count_for_holders(v)
    go = await v.peers.recv(x_holder, "vt.go")
    if not isinstance(go, dict) or not isinstance(go.get("ok"), bool):
        raise ComputationFailed(f"party '{x_holder}' sent a malformed verdict")
    if not go["ok"]:
        raise _refused(v.minimum)
    n, joint = go.get("n"), go.get("count")
    if (
        not isinstance(n, int)
        or not isinstance(joint, int)
        or isinstance(n, bool)
        or isinstance(joint, bool)
        or not v.minimum <= joint <= n
    ):
        raise ComputationFailed(f"party '{x_holder}' sent a malformed verdict")
    if v.peers.me == v.others[0]:
        return n, joint, await _dealer(v, n)
    return n, joint, await _recv_matrix(v.peers, x_holder, "vt.table", v.shape)


async def _vertical(v: _Vertical, holding: _Holding | None) -> tuple[int, int, U64]:
    """This party's part of a vertical table: ``(joined ids, table total, table)``.

    Raises:
        CohortTooSmall: On every party alike, if a holder's id set or the
            in-category joint count is below the strictest minimum cohort;
            then nothing of the join or the table has been revealed.
    """
    if holding is not None:
        return await _holder(v, holding)
    return await _bystander(v)


async def _dealer(v: _Vertical, n: int) -> U64:
    """Deal a matrix triple ``C = R_x^T R_y`` to the holders, then receive ``T``."""
    kx, ky = v.shape
    x_holder, y_holder = v.holders
    seed_rx, seed_ry, seed_cx = ring.random_seed(), ring.random_seed(), ring.random_seed()
    r_x = ring.prg_uint64(seed_rx, v.label("rx"), n * kx).reshape(n, kx)
    r_y = ring.prg_uint64(seed_ry, v.label("ry"), n * ky).reshape(n, ky)
    c_x = ring.prg_uint64(seed_cx, v.label("cx"), kx * ky).reshape(kx, ky)
    c_y = r_x.T @ r_y - c_x  # uint64 arithmetic wraps modulo 2^64
    await v.peers.send(x_holder, "vt.triple", {"seed_r": seed_rx, "seed_c": seed_cx})
    await v.peers.send(y_holder, "vt.triple", {"seed_r": seed_ry})
    await _send_matrix(v.peers, y_holder, "vt.triple.c", c_y)
    return await _recv_matrix(v.peers, x_holder, "vt.table", v.shape)


def _slot_bits(n: int) -> int:
    return max(1, n.bit_length())  # every count is at most n < 2^bits


def _encrypt_rows(public_key: Any, index: I64, kx: int, n: int) -> tuple[list[int], int]:
    bits = _slot_bits(n)
    slots = (public_key.n.bit_length() - 1) // bits
    groups = -(-kx // slots)
    ciphertexts = []
    for category in index.tolist():
        for group in range(groups):
            inside = category >= 0 and category // slots == group
            plaintext = 1 << (bits * (category % slots)) if inside else 0
            ciphertexts.append(int(public_key.raw_encrypt(plaintext)))
    return ciphertexts, groups


def _pack(numbers: list[int], modulus: int) -> bytes:
    width = (modulus.bit_length() + 7) // 8
    return b"".join(number.to_bytes(width, "big") for number in numbers)


def _unpack(blob: bytes, modulus: int, count: int, sender: str) -> list[int]:
    width = (modulus.bit_length() + 7) // 8
    if len(blob) != width * count:
        raise ComputationFailed(f"party '{sender}' sent the wrong number of ciphertexts")
    numbers = [int.from_bytes(blob[k : k + width], "big") for k in range(0, len(blob), width)]
    if not all(0 < c < modulus for c in numbers):
        raise ComputationFailed(f"party '{sender}' sent malformed ciphertexts")
    return numbers


async def _paillier_x(v: _Vertical, indicator: U64) -> U64:
    """The key owner's side of the two-party product: encrypt rows, decrypt column sums."""
    peers, other = v.peers, v.holders[1]
    kx, ky = v.shape
    n = indicator.shape[0]
    index = np.where(indicator.any(axis=1), indicator.argmax(axis=1), _OTHER).astype(np.int64)
    public_key, private_key = await asyncio.to_thread(
        paillier.generate_paillier_keypair, None, v.bits
    )
    ciphertexts, groups = await asyncio.to_thread(_encrypt_rows, public_key, index, kx, n)
    modulus = int(public_key.n)
    await peers.send(other, "vt.he.key", {"n": modulus.to_bytes((modulus.bit_length() + 7) // 8)})
    await send_bytes(peers, other, "vt.he.rows", _pack(ciphertexts, int(public_key.nsquare)))
    await v.ctx.progress(0.6)
    nsquare = int(public_key.nsquare)
    width = (nsquare.bit_length() + 7) // 8
    blob = await receive_bytes(peers, other, "vt.he.sums", size=width * ky * groups)
    sums = _unpack(blob, nsquare, ky * groups, other)
    plaintexts = await asyncio.to_thread(lambda: [int(private_key.raw_decrypt(c)) for c in sums])
    bits = _slot_bits(n)
    slots = (modulus.bit_length() - 1) // bits
    if any(p >> (bits * slots) for p in plaintexts):
        raise ComputationFailed(f"party '{other}' sent sums that do not decrypt to counts")
    table = np.zeros((kx, ky), dtype=np.uint64)
    for j in range(ky):
        for i in range(kx):
            packed = plaintexts[j * groups + i // slots]
            table[i, j] = (packed >> (bits * (i % slots))) & ((1 << bits) - 1)
    return table


async def _paillier_y(v: _Vertical, index: I64) -> U64:
    """The other holder's side: add the encrypted rows per own category, re-randomise."""
    peers, owner = v.peers, v.holders[0]
    kx, ky = v.shape
    n = index.size
    key = await peers.recv(owner, "vt.he.key")
    if not isinstance(key, dict) or not isinstance(key.get("n"), bytes):
        raise ComputationFailed(f"party '{owner}' sent a malformed public key")
    modulus = int.from_bytes(key["n"])
    if modulus.bit_length() != v.bits:
        raise ComputationFailed(f"party '{owner}' sent a key of the wrong size")
    public_key = paillier.PaillierPublicKey(modulus)
    slots = (modulus.bit_length() - 1) // _slot_bits(n)
    groups = -(-kx // slots)
    nsquare = int(public_key.nsquare)
    width = (nsquare.bit_length() + 7) // 8
    blob = await receive_bytes(peers, owner, "vt.he.rows", size=width * n * groups)
    rows = _unpack(blob, nsquare, n * groups, owner)

    def add_up() -> list[int]:
        sums = [1] * (ky * groups)  # 1 is the (not yet randomised) encryption of 0
        for r, category in enumerate(index.tolist()):
            if category >= 0:
                for g in range(groups):
                    cell = category * groups + g
                    sums[cell] = sums[cell] * rows[r * groups + g] % nsquare
        # a fresh encryption of 0 hides which ciphertexts were multiplied
        return [s * int(public_key.raw_encrypt(0)) % nsquare for s in sums]

    sums = await asyncio.to_thread(add_up)
    await send_bytes(peers, owner, "vt.he.sums", _pack(sums, nsquare))
    return await _recv_matrix(peers, owner, "vt.table", v.shape)


def _holders(value: Any, parties: list[str]) -> list[str]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(p, str) and p in parties for p in value)
        or value[0] == value[1]
    ):
        raise BadRequest("'holders' must name two different parties of the session: [x, y]")
    return list(value)


@service.job(
    "contingency_table_vertical",
    inputs=[
        Input(
            "holders",
            "array",
            "the two parties that hold x and y: [x_party, y_party]; must agree",
            required=True,
            minimum=2,
            maximum=2,
            items="string",
        ),
        _categories("x_categories", "the categories of x", required=True),
        _categories("y_categories", "the categories of y", required=True),
        PAILLIER_INPUT,
        Input("data", "data", "a holder's dataset (other parties give none)"),
        Input("id", "string", "a holder's column of record ids"),
        COLUMN,
    ],
    outputs=_TWO_WAY,
)
async def contingency_table_vertical(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Contingency table of two columns held by two parties for the same records (by id).

    Common inputs: ``holders`` (``[x_party, y_party]``), ``x_categories``,
    ``y_categories``; ``paillier_bits`` (2048; only used with two parties).
    A holder's own inputs: ``data``, ``id`` (the id column), ``column`` (its
    categorical column). Other parties give no data: the first of them deals
    the correlated randomness, and all of them receive the table.

    Returns:
        As :func:`contingency_table`, over the records whose id both holders
        have and whose values are among the categories.
    """
    async with session_for(ctx) as peers:
        holders = _holders(inputs.get("holders"), peers.parties)
        x_labels = _labels(inputs.get("x_categories"), "x_categories")
        y_labels = _labels(inputs.get("y_categories"), "y_categories")
        if len(x_labels) * len(y_labels) > MAX_CELLS:
            raise BadRequest(f"a contingency table may have at most {MAX_CELLS} cells")
        bits = paillier_bits(inputs)
        holding = None
        if peers.me in holders:
            labels = x_labels if peers.me == holders[0] else y_labels
            holding = await _load_holding(ctx, inputs, labels)
        smpc = SmpcSession(peers)
        public: dict[str, Any] = {"function": "contingency_table_vertical", "holders": holders}
        public |= {"x_categories": x_labels, "y_categories": y_labels, "paillier_bits": bits}
        await smpc.setup({**public, **_declared(ctx)})
        for key in public:
            agree(smpc, key)
        v = _Vertical(ctx, peers, holders, (len(x_labels), len(y_labels)), _threshold(smpc), bits)
        n, joint, table = await _vertical(v, holding)
    counts = ring.decode_int(table)
    if counts.min() < 0 or int(counts.sum()) != joint or joint > n:
        raise ComputationFailed("the joint table is inconsistent; run the computation again")
    return _two_way_result(x_labels, y_labels, counts, joint, _cells(smpc))
