"""SMPC regression: horizontal linear and logistic, vertical OLS.

Four functions of the ``smpc`` microservice; the threat model and the round
counts of each are in ``docs/protocols.md``.

``linear_regression`` (horizontal: every party holds whole records)
    The parties add their record counts (and check the joint cohort), then
    their local ``X'X``, ``X'y`` and ``y'y`` with one secure sum in the
    256-bit ring (:meth:`~protocols.smpc.engine.SmpcSession.sum_big`, exact
    to float precision), and solve the normal equations. Revealed: these
    totals.

``logistic_regression`` (horizontal)
    Newton-Raphson at a public current ``beta``: each iteration adds the
    parties' local gradients ``X'(y - p)``, Hessians ``X'WX`` and
    log-likelihoods securely. Revealed: those totals at every iterate.

``linear_regression_vertical`` (every party holds some columns of shared records)
    The data parties join their records on an ``id`` column by
    Diffie-Hellman PSI around their ring (:func:`_join`, on the curve of
    :mod:`protocols.psi.curve`); the rows whose tag every data party holds,
    in tag order, form the joint design. The first data party learns the
    size of each other data party's id set and which of its own ids each of
    them holds; every other data party learns which of its own ids are in
    the intersection; nobody can test an id it does not hold. The intercept
    column (when asked for) and ``y`` belong to the target holder's block.
    Diagonal blocks of the Gram matrix are local; each cross block
    ``Z_i' Z_j`` is a secure matrix product (:mod:`protocols.smpc.matmul`: a
    Beaver matrix triple from a third party with three or more parties,
    Paillier with two). The whole Gram matrix (``X'X``, ``X'y``, ``y'y``,
    ``n``) is then revealed to all parties, as in the reference system, and
    the model is solved from it. A party without ``data`` takes part as a
    helper (dealer) only. An opened cross block lets a crafted column (the
    indicator of one record) read another party's values, so a data party
    takes part only where its policy sets ``allow_vertical_regression``.

``matrix_product``
    ``A @ B`` for ``A`` at party ``left`` and ``B`` at party ``right``, by the
    same secure product; the result is revealed to every party. The product
    itself can disclose an input (``B = I`` reveals ``A``), so it runs only
    where the holders' policies set ``allow_matrix_product``.

Standard errors (both OLS functions) come from the aggregates alone:
``RSS = y'y - 2 b'X'y + b'X'X b``, ``sigma^2 = RSS / (n - p)``,
``SE = sqrt(diag(sigma^2 (X'X)^-1))``. ``r_squared`` is centred with an
intercept and uncentred (``1 - RSS / y'y``) without one, as statsmodels does.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from typing import Any

import numpy as np
import numpy.typing as npt

from fdrtd_server.errors import BadRequest, ComputationFailed
from fdrtd_server.microservice import Dataset, JobContext
from fdrtd_server.peers import PeerSession
from protocols.psi import curve
from protocols.smpc import ring
from protocols.smpc._registry import service
from protocols.smpc.engine import SmpcSession, points_from
from protocols.smpc.product import (
    integer_input,
    product_options,
    recv_blob,
    reveal_product,
    secure_product,
    send_blob,
)
from protocols.smpc.service import agree, check_joint_cohort, declare, numeric, session_for

__all__ = ["ols_from_gram"]

F64 = npt.NDArray[np.float64]
BLOB_BYTES = 1 << 20
"""Bytes of packed integers per peer message (the bus carries up to 8 MiB)."""
MAX_PIECES = 1 << 16
CONDITION_LIMIT = 1e12
"""Largest condition number of the scaled ``X'X`` before it counts as singular."""
INTERCEPT = "intercept"
MAX_PRODUCT_TERMS = 1 << 27
"""Most multiply-adds of one ``matrix_product`` (about a minute of 256-bit arithmetic)."""


# -- inputs ---------------------------------------------------------------------------------


def _names(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"'{what}' must be a list of column names")
    if len(set(value)) != len(value):
        raise BadRequest(f"'{what}' names a column twice")
    return list(value)


def _flag(inputs: dict[str, Any], key: str, default: bool) -> bool:
    value = inputs.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"'{key}' must be true or false")
    return value


def _columns(dataset: Dataset, names: list[str], what: str) -> F64:
    """The named 1-D numeric columns as a ``rows x len(names)`` matrix."""
    columns = []
    for name in names:
        values = numeric(dataset.column(name), f"column in '{what}'")
        if values.ndim != 1:
            raise BadRequest(f"every column in '{what}' must hold single numbers")
        columns.append(values)
    return np.column_stack(columns) if columns else np.zeros((dataset.rows, 0))


def _horizontal_data(dataset: Dataset, inputs: dict[str, Any]) -> tuple[F64, F64, list[str]]:
    """Design matrix (intercept first) and target over the rows with finite values."""
    features = _names(inputs.get("x"), "x")
    target = inputs.get("y")
    if not isinstance(target, str):
        raise BadRequest("'y' must name the target column")
    x = _columns(dataset, features, "x")
    y = _columns(dataset, [target], "y")[:, 0]
    keep = np.isfinite(x).all(axis=1) & np.isfinite(y)
    x, y = x[keep], y[keep]
    names = list(features)
    if _flag(inputs, "intercept", True):
        x = np.column_stack([np.ones(x.shape[0]), x])
        names = [INTERCEPT, *names]
    if not names:
        raise BadRequest("give feature columns in 'x' or set 'intercept'")
    return x, y, names


def _first_party_names(smpc: SmpcSession, count: int) -> list[str]:
    """Coefficient names: the first party's (column names need not agree)."""
    names = smpc.public[smpc.peers.parties[0]].get("names")
    if (
        not isinstance(names, list)
        or len(names) != count
        or not all(isinstance(n, str) for n in names)
    ):
        raise ComputationFailed("the first party sent malformed coefficient names")
    return names


# -- linear algebra ---------------------------------------------------------------------------


def _triu(matrix: F64) -> list[float]:
    return [float(v) for v in matrix[np.triu_indices(matrix.shape[0])]]


def _from_triu(values: list[float], size: int) -> F64:
    matrix = np.zeros((size, size))
    matrix[np.triu_indices(size)] = values
    return matrix + np.triu(matrix, 1).T


def _check_full_rank(matrix: F64) -> None:
    if not np.all(np.isfinite(matrix)):
        raise ComputationFailed("the aggregates overflowed to infinity; scale the data down")
    scale = np.sqrt(np.diag(matrix))
    if np.any(scale <= 0):
        raise ComputationFailed(
            "a feature column is zero on every record; drop it (or the intercept)"
        )
    condition = float(np.linalg.cond(matrix / np.outer(scale, scale)))
    if not math.isfinite(condition) or condition > CONDITION_LIMIT:
        raise ComputationFailed(
            "the feature columns are linearly dependent (collinear, or constant besides "
            "the intercept); drop the redundant ones"
        )


def ols_from_gram(
    xtx: F64, xty: F64, yty: float, n: int, names: list[str], *, intercept: bool
) -> dict[str, Any]:
    """Least squares, standard errors and R^2 from the aggregated Gram matrix.

    Args:
        xtx: ``X'X`` (``p x p``).
        xty: ``X'y`` (``p``).
        yty: ``y'y``.
        n: Number of records.
        names: Coefficient names, in the columns' order.
        intercept: Whether the first column is the intercept (for the centred R^2).

    Returns:
        ``coefficients``, ``standard_errors``, ``t_values`` (by name),
        ``r_squared``, ``adjusted_r_squared``, ``residual_sum_of_squares``,
        ``samples`` and ``degrees_of_freedom``.

    Raises:
        ComputationFailed: If there are no more records than coefficients or
            the columns are linearly dependent.
    """
    p = len(names)
    dof = n - p
    if dof <= 0:
        raise ComputationFailed("linear regression needs more records than coefficients")
    _check_full_rank(xtx)
    try:
        beta = np.linalg.solve(xtx, xty)
        inverse = np.linalg.inv(xtx)
    except np.linalg.LinAlgError:
        raise ComputationFailed("X'X is singular; drop linearly dependent columns") from None
    rss = max(float(yty - 2.0 * beta @ xty + beta @ xtx @ beta), 0.0)
    sigma2 = rss / dof
    errors = np.sqrt(np.maximum(np.diag(inverse), 0.0) * sigma2)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_values = np.where(errors > 0, beta / errors, math.nan)
    total = float(yty - xty[0] ** 2 / n) if intercept else float(yty)
    r2 = 1.0 - rss / total if total > 0 else math.nan
    adjusted = 1.0 - (1.0 - r2) * (n - int(intercept)) / dof
    return {
        "coefficients": dict(zip(names, map(float, beta), strict=True)),
        "standard_errors": dict(zip(names, map(float, errors), strict=True)),
        "t_values": dict(zip(names, map(float, t_values), strict=True)),
        "r_squared": r2,
        "adjusted_r_squared": adjusted,
        "residual_sum_of_squares": rss,
        "samples": n,
        "degrees_of_freedom": dof,
    }


async def _sum_big(smpc: SmpcSession, values: list[float]) -> list[float]:
    """Secure sum of local aggregates; a range error becomes a readable failure."""
    try:
        return await smpc.sum_big(values)
    except ring.FixedPointOverflow as error:
        raise ComputationFailed(f"the local aggregates are too large: {error}") from None
    except ValueError:
        raise ComputationFailed(
            "the local aggregates overflowed to infinity; scale the data down"
        ) from None


# -- horizontal -------------------------------------------------------------------------------


@service.job("linear_regression")
async def linear_regression(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Ordinary least squares over the records of all parties (horizontal partition).

    Inputs: ``data``; ``x`` (feature column names) and ``y`` (target column);
    ``intercept`` (default true, must agree). Coefficients are named after the
    first party's columns. Records with a missing value are left out.
    """
    async with session_for(ctx) as peers:
        dataset = await ctx.load_dataset(inputs.get("data"))
        x, y, names = _horizontal_data(dataset, inputs)
        intercept = names[0] == INTERCEPT
        p = len(names)
        smpc = SmpcSession(peers)
        public = declare(
            ctx, function="linear_regression", intercept=intercept, features=p, names=names
        )
        await smpc.setup(public, defer=True)
        # the count first: nothing else is summed unless the cohort is large enough
        n = round((await _sum_big(smpc, [float(x.shape[0])]))[0])
        for key in ("function", "intercept", "features"):
            agree(smpc, key)
        check_joint_cohort(ctx, smpc, n)
        names = _first_party_names(smpc, p)
        sums = await _sum_big(smpc, [float(y @ y), *map(float, x.T @ y), *_triu(x.T @ x)])
    xty = np.array(sums[1 : 1 + p])
    xtx = _from_triu(sums[1 + p :], p)
    return ols_from_gram(xtx, xty, sums[0], n, names, intercept=intercept)


def _logistic_local(x: F64, y: F64, beta: F64) -> list[float]:
    """Local gradient, Hessian (upper triangle) and log-likelihood at ``beta``."""
    eta = x @ beta
    prob = np.exp(-np.logaddexp(0.0, -eta))  # the logistic function without overflow
    weights = prob * (1.0 - prob)
    loglik = float(np.sum(y * eta - np.logaddexp(0.0, eta)))
    return [*map(float, x.T @ (y - prob)), *_triu((x * weights[:, None]).T @ x), loglik]


@service.job("logistic_regression")
async def logistic_regression(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Logistic regression by Newton-Raphson over all parties' records (horizontal).

    Inputs: ``data``; ``x``, ``y`` (0/1); ``intercept`` (default true),
    ``max_iterations`` (default 25), ``tolerance`` (default 1e-8; stop when no
    coefficient moves by more); all but the column names must agree.

    Returns ``coefficients``, ``standard_errors`` and ``z_values`` (from the
    Hessian at the final coefficients), ``log_likelihood``, ``iterations``
    (Newton steps taken), ``converged`` and ``samples``.
    """
    max_iterations = integer_input(inputs, "max_iterations", 25, 1, 200)
    tolerance = inputs.get("tolerance", 1e-8)
    if not isinstance(tolerance, int | float) or not 0 < tolerance < 1:
        raise BadRequest("'tolerance' must be a number between 0 and 1")
    async with session_for(ctx) as peers:
        dataset = await ctx.load_dataset(inputs.get("data"))
        x, y, names = _horizontal_data(dataset, inputs)
        if not np.all((y == 0) | (y == 1)):
            raise BadRequest("the target column of a logistic regression must hold 0 or 1")
        p = len(names)
        smpc = SmpcSession(peers)
        public = declare(
            ctx,
            function="logistic_regression",
            intercept=names[0] == INTERCEPT,
            features=p,
            names=names,
            max_iterations=max_iterations,
            tolerance=float(tolerance),
        )
        await smpc.setup(public, defer=True)
        n = round((await _sum_big(smpc, [float(x.shape[0])]))[0])
        for key in ("function", "intercept", "features", "max_iterations", "tolerance"):
            agree(smpc, key)
        check_joint_cohort(ctx, smpc, n)
        names = _first_party_names(smpc, p)
        beta = np.zeros(p)
        iterations, converged = 0, False
        while True:
            sums = await _sum_big(smpc, _logistic_local(x, y, beta))
            gradient, hessian = np.array(sums[:p]), _from_triu(sums[p:-1], p)
            if iterations == 0:
                _check_full_rank(hessian)
            if converged or iterations == max_iterations:
                break
            try:
                step = np.linalg.solve(hessian, gradient)
            except np.linalg.LinAlgError:
                break
            if not np.all(np.isfinite(step)):
                break
            beta = beta + step
            iterations += 1
            converged = float(np.max(np.abs(step))) < tolerance
            await ctx.progress(iterations / (max_iterations + 1))
    try:
        errors = np.sqrt(np.maximum(np.diag(np.linalg.inv(hessian)), 0.0))
    except np.linalg.LinAlgError:
        errors = np.full(p, math.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        z_values = np.where(errors > 0, beta / errors, math.nan)
    return {
        "coefficients": dict(zip(names, map(float, beta), strict=True)),
        "standard_errors": dict(zip(names, map(float, errors), strict=True)),
        "z_values": dict(zip(names, map(float, z_values), strict=True)),
        "log_likelihood": sums[-1],
        "iterations": iterations,
        "converged": converged,
        "samples": n,
    }


# -- vertical ---------------------------------------------------------------------------------


def _id_keys(column: npt.NDArray[Any]) -> list[bytes | None]:
    """Canonical bytes of each id (None for a missing one); 7 and 7.0 are the same id."""
    if column.ndim != 1:
        raise BadRequest("the 'id' column must hold single values")
    keys: list[bytes | None] = []
    if column.dtype.kind in "biu":
        return [str(int(v)).encode() for v in column.tolist()]
    if column.dtype.kind == "f":
        for value in column.tolist():
            if not math.isfinite(value):
                keys.append(None)
            else:
                keys.append(str(int(value) if value.is_integer() else repr(value)).encode())
        return keys
    if column.dtype.kind in "US":
        for value in column.tolist():
            text = value.decode() if isinstance(value, bytes) else str(value)
            keys.append(text.encode() if text.strip() else None)
        return keys
    raise BadRequest("the 'id' column must hold numbers or text")


async def _blinded(
    peers: PeerSession, sender: str, tag: str, count: int | None = None
) -> list[bytes]:
    _, blob = await recv_blob(peers, sender, tag)
    return points_from(blob, sender, count)


async def _join(
    peers: PeerSession, holders: list[str], keys: list[bytes] | None
) -> tuple[int, npt.NDArray[np.intp] | None]:
    """Intersect the data parties' ids by Diffie-Hellman PSI around the ring of holders.

    Each holder hashes its ids onto the curve and blinds them with a secret
    scalar of its own (:mod:`protocols.psi.curve`), sorted so that the list
    hides the order of its rows. The lists travel the ring of holders at the
    same time, each holder blinding what it receives and passing it on, until
    every list comes back to its owner blinded by every holder's scalar. The
    fully blinded tags are equal exactly where the ids are; nobody can
    compute the tag of an id without every holder's scalar, so no holder can
    test a guessed id. The other holders send their tags to the first, which
    sends back the common ones, sorted: the common order of the joint design.

    Returns:
        The number of common records and, at a data party, the indices of its
        own rows for them in the common (tag) order.
    """
    me, first = peers.me, holders[0]
    helpers = [p for p in peers.parties if p not in holders]
    if keys is None:
        message = await peers.recv(first, "join.count")
        count = message.get("n") if isinstance(message, dict) else None
        if not isinstance(count, int) or count < 0:
            raise ComputationFailed(f"party '{first}' sent a malformed record count")
        return count, None
    if len(set(keys)) != len(keys):
        raise BadRequest("the 'id' column must not repeat an id")
    ring_size, place = len(holders), holders.index(me)
    successor, predecessor = holders[(place + 1) % ring_size], holders[place - 1]
    domain = b"fdrtd/smpc/vertical/" + hashlib.sha256(peers.id.encode()).hexdigest().encode()
    scalar = curve.random_scalar()
    items = [curve.encode_item(key) for key in keys]
    mine = await asyncio.to_thread(curve.hash_and_blind, items, scalar, domain)
    order = sorted(range(len(mine)), key=mine.__getitem__)  # hides the order of my rows
    await send_blob(peers, [successor], "join.ring.1", b"".join(mine[k] for k in order))
    for step in range(1, ring_size):
        # the list of holder (place - step), blinded by the holders in between
        points = await _blinded(peers, predecessor, f"join.ring.{step}")
        try:
            points = await asyncio.to_thread(curve.reblind, points, scalar)
        except ValueError:
            raise ComputationFailed(f"party '{predecessor}' sent invalid curve points") from None
        await send_blob(peers, [successor], f"join.ring.{step + 1}", b"".join(points))
    # my own list, back from the ring, blinded by every holder's scalar
    tags = await _blinded(peers, predecessor, f"join.ring.{ring_size}", len(order))
    row_of = {tag: order[k] for k, tag in enumerate(tags)}
    if len(row_of) != len(tags):
        raise ComputationFailed(f"party '{predecessor}' sent a malformed list of points")
    others = [p for p in holders if p != me]
    if me == first:
        common = set(row_of)
        for party in others:
            common &= set(await _blinded(peers, party, "join.tags"))
        ordered = sorted(common)
        await send_blob(peers, others, "join.common", b"".join(ordered))
        if helpers:
            await peers.broadcast("join.count", {"n": len(ordered)}, to=helpers)
    else:
        await send_blob(peers, [first], "join.tags", b"".join(sorted(row_of)))
        ordered = await _blinded(peers, first, "join.common")
        if ordered != sorted(set(ordered)) or not set(ordered) <= row_of.keys():
            raise ComputationFailed(f"party '{first}' sent a malformed list of common ids")
    return len(ordered), np.array([row_of[tag] for tag in ordered], dtype=np.intp)


def _layout(
    parties: list[str], names: dict[str, list[str]], target: str, intercept: bool
) -> tuple[list[str], dict[str, list[int]]]:
    """Coefficient names, and each party's block columns as indices into ``[X | y]``."""
    coefficients: list[str] = [INTERCEPT] if intercept else []
    blocks: dict[str, list[int]] = {party: [] for party in parties}
    if intercept:
        blocks[target].append(0)
    for party in parties:
        start = len(coefficients)
        coefficients += names[party]
        blocks[party] += list(range(start, len(coefficients)))
    blocks[target].append(len(coefficients))  # y
    return coefficients, blocks


def _vertical_public(smpc: SmpcSession) -> tuple[str, dict[str, list[str]], list[str]]:
    """Check the declared roles; return the target holder, names by party, data parties."""
    target = agree(smpc, "target_holder")
    parties = smpc.peers.parties
    if target not in parties:
        raise ComputationFailed("'target_holder' must name a party of the session")
    names: dict[str, list[str]] = {}
    for party in parties:
        public = smpc.public[party]
        declared = public.get("names")
        if not isinstance(declared, list) or not all(isinstance(n, str) for n in declared):
            raise ComputationFailed(f"party '{party}' sent malformed column names")
        names[party] = declared
        if bool(public.get("has_y")) != (party == target):
            raise ComputationFailed(
                "the target holder, and only it, must give the target column 'y'"
            )
        if declared and not public.get("has_data"):
            raise ComputationFailed(f"party '{party}' names columns but gives no 'data'")
    holders = [p for p in parties if smpc.public[p].get("has_data")]
    if target not in holders:
        raise ComputationFailed("the target holder must give 'data'")
    everything = [n for party in parties for n in names[party]]
    if agree(smpc, "intercept"):
        everything.append(INTERCEPT)
    if len(set(everything)) != len(everything):
        raise ComputationFailed(
            "feature names must be unique across parties (and not 'intercept'); rename them"
        )
    return target, names, holders


@service.job("linear_regression_vertical")
async def linear_regression_vertical(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Ordinary least squares over records whose columns are spread over the parties.

    Inputs at each party: ``data``, ``id`` (the column that identifies a
    record), ``x`` (this party's feature columns, may be empty), ``y`` (the
    target column at ``target_holder``, else absent). Common:
    ``target_holder``, ``intercept`` (default true), ``frac_bits`` (default
    40), ``paillier_bits`` (default 2048, two parties only). A party with no
    ``data`` only helps (deals Beaver triples). Records with a missing id or
    value at any data party are left out. Output as ``linear_regression``.
    """
    frac_bits, paillier_bits = product_options(inputs)
    intercept = _flag(inputs, "intercept", True)
    async with session_for(ctx) as peers:
        own_names = _names(inputs.get("x"), "x")
        target_name = inputs.get("y")
        if target_name is not None and not isinstance(target_name, str):
            raise BadRequest("'y' must name the target column")
        keys: list[bytes] | None = None
        block = np.zeros((0, 0))
        if inputs.get("data") is not None:
            ctx.env.require(
                "allow_vertical_regression",
                "vertical regressions",
                "the Gram matrix they open lets a crafted column read another party's values",
            )
            dataset = await ctx.load_dataset(inputs.get("data"))
            values = _columns(dataset, own_names + ([target_name] if target_name else []), "x")
            ids = _id_keys(dataset.column(inputs.get("id")))
            keep = np.isfinite(values).all(axis=1) & np.array([k is not None for k in ids])
            keys = [k for k, kept in zip(ids, keep.tolist(), strict=True) if kept and k]
            block = values[keep]
        elif own_names or target_name is not None:
            raise BadRequest("give 'data' with the columns in 'x' and 'y'")
        smpc = SmpcSession(peers)
        await smpc.setup(
            declare(
                ctx,
                function="linear_regression_vertical",
                target_holder=inputs.get("target_holder"),
                intercept=intercept,
                frac_bits=frac_bits,
                paillier_bits=paillier_bits,
                names=own_names,
                has_y=target_name is not None,
                has_data=keys is not None,
            )
        )
        for key in ("function", "frac_bits", "paillier_bits"):
            agree(smpc, key)
        target, names, holders = _vertical_public(smpc)
        n, rows = await _join(peers, holders, keys)
        check_joint_cohort(ctx, smpc, n)
        if n == 0:
            raise ComputationFailed("the parties have no record id in common")
        await ctx.progress(0.2)
        coefficients, blocks = _layout(peers.parties, names, target, intercept)
        me = peers.me
        if rows is not None:
            block = block[rows]
            if me == target and intercept:
                block = np.column_stack([np.ones(n), block])
        gram = np.zeros((len(coefficients) + 1,) * 2)
        owners = [p for p in peers.parties if blocks[p]]
        # diagonal blocks are local and revealed as they are
        if me in owners:
            own_gram = block.T @ block
            await peers.broadcast("gram", own_gram, to=[p for p in peers.others])
            gram[np.ix_(blocks[me], blocks[me])] = own_gram
        for party in owners:
            if party != me:
                received = np.asarray(await peers.recv(party, "gram"), dtype=np.float64)
                if received.shape != (len(blocks[party]),) * 2:
                    raise ComputationFailed(f"party '{party}' sent a malformed Gram block")
                gram[np.ix_(blocks[party], blocks[party])] = received
        pairs = [(a, b) for i, a in enumerate(owners) for b in owners[i + 1 :]]
        for number, (a, b) in enumerate(pairs):
            operand = block.T if me == a else block if me == b else None
            dims = (len(blocks[a]), n, len(blocks[b]))
            name = f"x{number}"
            share = await secure_product(peers, name, a, b, operand, dims, frac_bits, paillier_bits)
            cross = await reveal_product(peers, name, (a, b), share, (dims[0], dims[2]), frac_bits)
            gram[np.ix_(blocks[a], blocks[b])] = cross
            gram[np.ix_(blocks[b], blocks[a])] = cross.T
            await ctx.progress(0.2 + 0.7 * (number + 1) / len(pairs))
    p = len(coefficients)
    return ols_from_gram(
        gram[:p, :p], gram[:p, p], float(gram[p, p]), n, coefficients, intercept=intercept
    )
