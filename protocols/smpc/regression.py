"""SMPC regression: horizontal linear and logistic, vertical OLS.

Four functions of the ``smpc`` microservice; the threat model and the round
counts of each are in ``docs/protocols.md``.

``linear_regression`` (horizontal: every party holds whole records)
    The parties add their record counts (and check the joint cohort), then
    their local ``X'X``, ``X'y`` and ``y'y`` with one secure sum in the
    exact ring (:meth:`~fdrtd_server.sdk.smpc.SmpcSession.sum_big` with
    ``exact``: no rounding at any scale), and solve the normal equations.
    Revealed: these totals.

``logistic_regression`` (horizontal)
    Newton-Raphson at a public current ``beta``: each iteration adds the
    parties' local gradients ``X'(y - p)``, Hessians ``X'WX`` and
    log-likelihoods securely; the first party alone decides the next
    ``beta`` (or stop, or fail on separation) and tells the others
    (:class:`_Newton`). Revealed: those totals at every iterate.

``linear_regression_vertical`` (every party holds some columns of shared records)
    At least two parties give data; each declares the size of its id set,
    and all refuse if one is below the strictest minimum cohort. The data
    parties join their records on an ``id`` column by Diffie-Hellman PSI
    around their ring (:func:`_join`, on the curve of
    :mod:`fdrtd_server.sdk.curve`); the rows whose tag every data party holds,
    in tag order, form the joint design. The first data party learns which
    of its own ids each other data party holds (and, with three or more,
    the sizes of the overlaps among the others); it tells the others the
    size of the intersection, or refuses, before any common tag is sent;
    every other data party then learns which of its own ids are in the
    intersection; nobody can test an id it does not hold. The intercept
    column (when asked for) and ``y`` belong to the target holder's block.
    Before any Gram block is sent, every party checks that each party's
    block leaves at least the minimum cohort of records spare
    (:func:`_check_widths`). Diagonal blocks of the Gram matrix are local;
    each cross block ``Z_i' Z_j`` is a secure matrix product
    (:mod:`protocols.smpc.matmul`: a Beaver matrix triple from a third
    party with three or more parties, Paillier with two), each column
    scaled by a power of two from its public sum of squares. The whole Gram
    matrix (``X'X``, ``X'y``, ``y'y``, ``n``) is then revealed to all
    parties, as in the reference system, and the model is solved from it.
    A party without ``data`` takes part as a helper (dealer) only. An
    opened cross block lets a crafted column (the indicator of one record)
    read another party's values, so a data party takes part only where its
    policy sets ``allow_vertical_regression``.

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

import itertools
import math
from typing import Any

import numpy as np
import numpy.typing as npt

from fdrtd_server.sdk import (
    DATA,
    EPSILON,
    PRIVACY,
    BadRequest,
    ComputationFailed,
    Dataset,
    FdrtdError,
    Forbidden,
    Input,
    JobContext,
    OutOfRange,
    Output,
    SmpcSession,
    agree,
    canonical_ids,
    check_joint_cohort,
    declare,
    id_bytes,
    join_domain,
    join_ids,
    numeric,
    privacy,
    session_for,
)
from protocols.smpc import matmul
from protocols.smpc.common import PAILLIER_INPUT, paillier_bits, service
from protocols.smpc.product import (
    integer_input,
    reveal_product,
    secure_product,
)

__all__ = ["ols_from_gram"]

F64 = npt.NDArray[np.float64]
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


def _feature_names(value: Any) -> list[str]:
    """The ``x`` input; the name of the intercept's coefficient is reserved."""
    features = _names(value, "x")
    if INTERCEPT in features:
        raise BadRequest(
            f"a feature column may not be named '{INTERCEPT}': that is the name of the "
            "intercept's coefficient; rename the column"
        )
    return features


def _horizontal_data(dataset: Dataset, inputs: dict[str, Any]) -> tuple[F64, F64, list[str], bool]:
    """Design matrix (intercept first), target, names and the intercept flag.

    Only the rows with finite values are kept. Whether the first column is
    the intercept comes from the ``intercept`` flag, never from a name.
    """
    features = _feature_names(inputs.get("x"))
    intercept = _flag(inputs, "intercept", True)
    target = inputs.get("y")
    if not isinstance(target, str):
        raise BadRequest("'y' must name the target column")
    x = _columns(dataset, features, "x")
    y = _columns(dataset, [target], "y")[:, 0]
    keep = np.isfinite(x).all(axis=1) & np.isfinite(y)
    x, y = x[keep], y[keep]
    names = list(features)
    if intercept:
        x = np.column_stack([np.ones(x.shape[0]), x])
        names = [INTERCEPT, *names]
    if not names:
        raise BadRequest("give feature columns in 'x' or set 'intercept'")
    return x, y, names, intercept


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
    """Secure sum of local aggregates, exact at any scale; an infinity is a readable failure."""
    try:
        return await smpc.sum_big(values)
    except ValueError:  # NaN or an infinity: no finite float is out of the exact ring's range
        raise ComputationFailed(
            "the local aggregates overflowed to infinity; scale the data down"
        ) from None


# -- horizontal -------------------------------------------------------------------------------


def _x(what: str) -> Input:
    return Input("x", ("string", "array"), what, items="string")


_INTERCEPT = Input(
    "intercept",
    "boolean",
    "fit an intercept (a coefficient named 'intercept'); must agree",
    default=True,
)
_Y = Input("y", "string", "the target column", required=True)
_FIT = [
    Output("coefficients", "object", "coefficient by name ('intercept' first)"),
    Output("standard_errors", "object", "standard error by name"),
]
_SAMPLES = Output("samples", "integer", "the number of records used")
_OLS = [
    *_FIT,
    Output("t_values", "object", "t value by name"),
    Output("r_squared", "number", "R^2"),
    Output("adjusted_r_squared", "number", "adjusted R^2"),
    Output("residual_sum_of_squares", "number", "the residual sum of squares"),
    _SAMPLES,
    Output("degrees_of_freedom", "integer", "samples minus coefficients"),
]


DP_FRAC_BITS = 16
"""Fixed-point bits of a normalised value in a differentially private regression.

Every column is divided by the largest magnitude its bounds allow and
encoded as ``round(z * 2^16)``, so one record adds at most 2^32 units to
each of the sufficient statistics; coarser (:func:`_private_plan`) where the
number of statistics and the epsilon would need a noise scale above 2^50."""


class _PrivateGram:
    """A differentially private regression's release: its plan, scaling and columns.

    Attributes:
        plan: The release, checked and calibrated, not yet spent.
        frac_bits: The fixed-point bits of every normalised value.
        scales: The public divisor of each column of ``[X | y]`` (1 for the intercept).
        bounds: The owner's bounds of each column of ``[X | y]`` (``(1, 1)`` for the intercept).
        columns: The dataset's column names the release is stated for.
    """

    def __init__(
        self,
        plan: privacy.Plan,
        frac_bits: int,
        bounds: list[tuple[float, float]],
        columns: list[str],
    ) -> None:
        self.plan = plan
        self.frac_bits = frac_bits
        self.bounds = bounds
        self.scales = [max(abs(lo), abs(hi)) or 1.0 for lo, hi in bounds]
        self.columns = columns


def _gram_size(p: int) -> int:
    """How many sufficient statistics a regression with ``p`` coefficients sums (y'y, X'y, X'X)."""
    return 1 + p + p * (p + 1) // 2


def _private_plan(
    dataset: Dataset, inputs: dict[str, Any], names: list[str], intercept: bool
) -> _PrivateGram | None:
    """Check and calibrate a DP regression before the spend; None if the dataset needs no DP.

    Nothing here reads the records: the bounds of every feature and of the
    target (refused 403, naming the column, if the owner declared none), the
    owner's epsilon floor, the noise scales (at :data:`DP_FRAC_BITS`, or
    fewer bits where the scale would pass 2^50), and whether the bounds'
    products fit a float.

    The sufficient statistics of one record are the upper triangle of
    ``w w'`` for ``w = [x | y]`` (the intercept's 1 included), each element
    of ``w`` normalised to ``[-1, 1]`` by its public scale and encoded in
    ``2^f`` units: each of the ``K = 1 + p + p(p+1)/2`` elements changes by at
    most ``2^2f`` when one record is added or removed, so the vector's l1
    sensitivity is ``K * 2^2f`` and its l2 sensitivity ``sqrt(K) * 2^2f``
    (:class:`privacy.Statistic` per element); the count's is 1.
    """
    terms = dataset.privacy
    if terms is None:
        return None
    features = [n for n in names if not (intercept and n == INTERCEPT)]
    target = str(inputs.get("y"))
    bounds = [terms.bound(c, "a linear regression") for c in [*features, target]]
    if intercept:
        bounds = [(1.0, 1.0), *bounds]
    largest = max(max(abs(lo), abs(hi)) for lo, hi in bounds)
    if not largest * largest * 2.0**96 < 2.0**1000:
        raise OutOfRange(
            f"the declared bounds of dataset '{terms.dataset}' are too large for the products "
            "of a regression (their squares pass the float range); ask its owner for narrower "
            "bounds; nothing was spent"
        )
    size = _gram_size(len(names))
    epsilon = inputs.get("epsilon")
    for bits in range(DP_FRAC_BITS, -1, -1):
        statistics = [
            privacy.Statistic("count", 1),
            privacy.Statistic("gram", 1 << (2 * bits), size=size, unit=2.0 ** (-2 * bits)),
        ]
        try:
            plan = privacy.plan_release(dataset, epsilon, statistics, "'smpc.linear_regression'")
        except OutOfRange:
            if bits == 0:
                raise
            continue
        assert plan is not None  # the dataset has privacy terms
        return _PrivateGram(plan, bits, bounds, [*features, target])
    raise AssertionError("unreachable")  # pragma: no cover


def _exact_gram(w: npt.NDArray[np.int64]) -> list[int]:
    """The upper triangle of ``w'w`` as exact Python integers (int64 chunks, each exact)."""
    size = w.shape[1]
    total = np.zeros((size, size), dtype=object)
    step = 1 << 28  # 2^28 records of at most 2^32 units each stay below 2^63
    for start in range(0, w.shape[0], step):
        chunk = w[start : start + step]
        total = total + (chunk.T @ chunk).astype(object)
    return [int(v) for v in total[np.triu_indices(size)]]


def _noisy_sums(
    gram: _PrivateGram, release: privacy.Release, x: F64, y: F64
) -> tuple[float, list[float]]:
    """This party's noisy count and noisy ``[y'y, X'y, triu(X'X)]``, in the data's units.

    Clamped to the bounds, normalised, encoded and multiplied in exact
    integers; the count and the statistics get this party's own noise; only
    then are they scaled back to the data's units (post-processing) for the
    secure sum.
    """
    f = gram.frac_bits
    columns = np.column_stack([x, y])
    lows, highs = np.asarray(gram.bounds, dtype=np.float64).T
    # |clamped| <= scale, so every normalised value is within [-1, 1] (division is monotone)
    normalised = np.clip(columns, lows, highs) / np.asarray(gram.scales)
    w = privacy.fixed_units(normalised, f)
    (rows,) = release.noisy("count", [int(columns.shape[0])])
    exact = _exact_gram(w)  # upper triangle of [X | y]'[X | y], row by row
    noisy = release.noisy("gram", exact)
    size = len(gram.bounds)
    unit = 2.0 ** (-2 * f)
    scaled = np.zeros((size, size))
    scaled[np.triu_indices(size)] = [float(v) * unit for v in noisy]
    scaled *= np.outer(gram.scales, gram.scales)
    p = size - 1
    xtx, xty, yty = scaled[:p, :p], scaled[:p, p], scaled[p, p]
    return float(rows), [float(yty), *map(float, xty), *_triu(xtx)]


def _solve_private(
    xtx: F64, xty: F64, yty: float, n: int, names: list[str], intercept: bool
) -> dict[str, Any]:
    """OLS on noisy statistics: a noisy ``X'X`` that is not positive definite is a clear 422."""
    try:
        np.linalg.cholesky(xtx)
    except np.linalg.LinAlgError:
        raise ComputationFailed(
            "the noisy X'X is not positive definite: the noise outweighs what the records "
            "tell of the features; ask for a larger 'epsilon', fewer features, or more "
            "records (the budget spent is not returned)"
        ) from None
    return ols_from_gram(xtx, xty, yty, n, names, intercept=intercept)


@service.job(
    "linear_regression",
    inputs=[DATA, _x("the feature columns (a name or a list)"), _Y, _INTERCEPT, EPSILON],
    outputs=[*_OLS, PRIVACY],
)
async def linear_regression(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Ordinary least squares over the records of all parties (horizontal partition).

    Inputs: ``data``; ``x`` (feature column names) and ``y`` (target column);
    ``intercept`` (default true, must agree). Coefficients are named after the
    first party's columns. Records with a missing value are left out.

    On a named dataset whose owner requires differential privacy (``epsilon``:
    what the query spends), every feature and the target need declared
    bounds; this party's count and sufficient statistics get its own noise
    before they are shared (:func:`_private_plan`), and the model is solved
    from the noisy totals; its standard errors do not include the noise.
    """
    async with session_for(ctx) as peers:
        dataset = await ctx.load_dataset(inputs.get("data"), private=True)
        x, y, names, intercept = _horizontal_data(dataset, inputs)
        p = len(names)
        gram = _private_plan(dataset, inputs, names, intercept)
        release = None if gram is None else await gram.plan.spend()
        smpc = SmpcSession(peers)
        public = declare(
            ctx, function="linear_regression", intercept=intercept, features=p, names=names
        )
        await smpc.setup(public, defer=True)
        if gram is not None and release is not None:
            rows, local = _noisy_sums(gram, release, x, y)
        else:
            rows, local = float(x.shape[0]), [float(y @ y), *map(float, x.T @ y), *_triu(x.T @ x)]
        # the count first: nothing else is summed unless the cohort is large enough
        n = round((await _sum_big(smpc, [rows]))[0])
        for key in ("function", "intercept", "features"):
            agree(smpc, key)
        check_joint_cohort(ctx, smpc, n)
        names = _first_party_names(smpc, p)
        sums = await _sum_big(smpc, local)
    xty = np.array(sums[1 : 1 + p])
    xtx = _from_triu(sums[1 + p :], p)
    if release is None:
        return ols_from_gram(xtx, xty, sums[0], n, names, intercept=intercept)
    fitted = _solve_private(xtx, xty, sums[0], n, names, intercept)
    assert gram is not None
    return {**fitted, "privacy": {release.terms.dataset: release.statement(gram.columns)}}


def _logistic_local(x: F64, y: F64, beta: F64) -> list[float]:
    """Local gradient, Hessian (upper triangle) and log-likelihood at ``beta``."""
    eta = x @ beta
    prob = np.exp(-np.logaddexp(0.0, -eta))  # the logistic function without overflow
    weights = prob * (1.0 - prob)
    loglik = float(np.sum(y * eta - np.logaddexp(0.0, eta)))
    return [*map(float, x.T @ (y - prob)), *_triu((x * weights[:, None]).T @ x), loglik]


SEPARATION_LOGLIK = -0.5 * math.log(2.0)
"""A log-likelihood above this proves complete separation (see :class:`_Newton`)."""
MAX_HALVINGS = 10
"""Most times one Newton step is halved because it lowered the log-likelihood."""
SATURATION = 1e-6
"""Curvature along a Newton step, relative to that at ``beta = 0``, below which it is flat."""
SATURATED_STEPS = 3
"""Consecutive flat Newton steps that count as diverging coefficients."""


def _collective(error: FdrtdError) -> FdrtdError:
    """Mark an error that every party raises by itself from the same public values."""
    error.collective = True
    return error


class _Newton:
    """The first party's Newton-Raphson controller for ``logistic_regression``.

    Every party evaluates its local sums at the same public ``beta`` and the
    totals are opened to all; only the first party then decides what comes
    next and tells the others (``beta`` to evaluate next, stop, or fail). A
    decision taken by each party from its own ``np.linalg.solve`` could
    differ in the last bits between BLAS builds, so that one party stops
    while another goes on and waits for it in vain.

    Checks, in order, at each evaluation:

    * at the start, ``X'X / 4`` (the Hessian at ``beta = 0``) must be of full rank;
    * complete separation: for data that no hyperplane separates, every
      ``beta`` misclassifies (or puts on the boundary) some record, whose
      term in the log-likelihood is then at most ``-log 2``; so a total
      log-likelihood above ``-log 2`` (we use ``-log(2) / 2``, safe against
      rounding) proves that ``beta`` separates the records perfectly, and the
      maximum-likelihood coefficients are infinite;
    * step halving: a step that lowered the log-likelihood is halved (up to
      :data:`MAX_HALVINGS` times), as R's ``glm.fit`` does;
    * a Hessian that became singular or ill-conditioned (condition number
      above :data:`CONDITION_LIMIT` after scaling), or :data:`SATURATED_STEPS`
      Newton steps in a row along which the curvature ``s' H s`` fell below
      :data:`SATURATION` times its value at ``beta = 0``, mean that the
      weights ``p (1 - p)`` of the records the step moves went to zero while
      the coefficients grow: quasi-complete separation (the log-likelihood
      levels off below zero while a coefficient runs off to infinity).
    """

    def __init__(self, p: int, max_iterations: int, tolerance: float) -> None:
        self.beta = np.zeros(p)
        self.max_iterations, self.tolerance = max_iterations, tolerance
        self.accepted: tuple[F64, float] | None = None
        self.step = np.zeros(p)
        self.halvings = 0
        self.iterations = 0
        self.converged = False
        self.start = np.zeros((p, p))
        self.saturated = 0

    def decide(self, gradient: F64, hessian: F64, loglik: float) -> dict[str, Any]:
        """The next move after the sums at :attr:`beta` were opened."""
        if not (
            math.isfinite(loglik) and np.all(np.isfinite(gradient)) and np.all(np.isfinite(hessian))
        ):
            return _fail("the aggregates overflowed to infinity; scale the data down")
        if self.accepted is None:
            try:
                _check_full_rank(hessian)
            except ComputationFailed as error:
                return _fail(error.message)
            self.start = hessian
        if loglik > SEPARATION_LOGLIK:
            return _fail(
                "the records are perfectly separated: a combination of the features splits "
                "y = 0 from y = 1 exactly, so the maximum-likelihood coefficients are infinite; "
                "drop or merge the separating features, or collect more records"
            )
        if self.accepted is not None:
            previous_beta, previous_loglik = self.accepted
            if loglik < previous_loglik - 1e-9 * (1.0 + abs(previous_loglik)):
                # the step overshot: go back half of it
                if self.halvings == MAX_HALVINGS:
                    return _fail(_DIVERGED)
                self.halvings += 1
                self.step = self.step / 2.0
                self.beta = previous_beta + self.step
                self.converged = False
                return {"action": "step", "beta": self.beta}
        self.accepted, self.halvings = (self.beta, loglik), 0
        if self.converged or self.iterations == self.max_iterations:
            return {"action": "stop", "iterations": self.iterations, "converged": self.converged}
        scale = np.sqrt(np.abs(np.diag(hessian)))
        try:
            if np.any(scale <= 0):
                raise np.linalg.LinAlgError
            condition = float(np.linalg.cond(hessian / np.outer(scale, scale)))
            step = np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            return _fail(_DIVERGED)
        if not (math.isfinite(condition) and condition <= CONDITION_LIMIT) or not np.all(
            np.isfinite(step)
        ):
            return _fail(_DIVERGED)
        self.step = np.asarray(step, dtype=np.float64)
        # the curvature along the step, relative to the start (all weights 1/4):
        # near zero when every record that the step moves is already fitted as
        # 0 or 1, i.e. the likelihood is flat along a direction the coefficients run off to
        curvature = float(self.step @ hessian @ self.step)
        start = float(self.step @ self.start @ self.step)
        saturated = start > 0 and curvature < SATURATION * start
        self.saturated = self.saturated + 1 if saturated else 0
        if self.saturated >= SATURATED_STEPS:
            return _fail(_DIVERGED)
        self.beta = self.beta + self.step
        self.iterations += 1
        self.converged = float(np.max(np.abs(step))) < self.tolerance
        return {"action": "step", "beta": self.beta}


_DIVERGED = (
    "the coefficients diverge: the fitted probabilities of some records go to 0 or 1 "
    "(quasi-complete separation: a combination of the features splits y = 0 from y = 1 "
    "except for ties); drop or merge the separating features, or collect more records"
)


def _fail(reason: str) -> dict[str, Any]:
    return {"action": "fail", "reason": reason}


def _decision_from(message: Any, sender: str, p: int) -> dict[str, Any]:
    """The first party's Newton decision, checked."""
    action = message.get("action") if isinstance(message, dict) else None
    if action == "step":
        beta = message.get("beta")
        if (
            isinstance(beta, np.ndarray)
            and beta.dtype == np.float64
            and beta.shape == (p,)
            and np.all(np.isfinite(beta))
        ):
            return {"action": "step", "beta": beta}
    elif action == "stop":
        iterations, converged = message.get("iterations"), message.get("converged")
        if isinstance(iterations, int) and iterations >= 0 and isinstance(converged, bool):
            return {"action": "stop", "iterations": iterations, "converged": converged}
    elif action == "fail":
        reason = message.get("reason")
        if isinstance(reason, str):
            return {"action": "fail", "reason": reason[:300]}
    raise ComputationFailed(f"party '{sender}' sent a malformed Newton step")


@service.job(
    "logistic_regression",
    inputs=[
        DATA,
        _x("the feature columns (a name or a list)"),
        Input("y", "string", "the target column, holding 0 or 1", required=True),
        _INTERCEPT,
        Input(
            "max_iterations",
            "integer",
            "most Newton steps; must agree",
            default=25,
            minimum=1,
            maximum=200,
        ),
        Input(
            "tolerance",
            "number",
            "stop when no coefficient moves by more (between 0 and 1); must agree",
            default=1e-8,
            minimum=0,
            maximum=1,
            exclusive=True,
        ),
    ],
    outputs=[
        *_FIT,
        Output("z_values", "object", "z value by name"),
        Output("log_likelihood", "number", "the log-likelihood at the coefficients"),
        Output("iterations", "integer", "Newton steps taken"),
        Output("converged", "boolean", "whether the tolerance was reached"),
        _SAMPLES,
    ],
)
async def logistic_regression(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Logistic regression by Newton-Raphson over all parties' records (horizontal).

    Inputs: ``data``; ``x``, ``y`` (0/1); ``intercept`` (default true),
    ``max_iterations`` (default 25), ``tolerance`` (default 1e-8; stop when no
    coefficient moves by more); all but the column names must agree.

    Each iteration opens the summed gradient, Hessian and log-likelihood at
    the current ``beta``; the first party picks the next ``beta`` (or stops,
    or fails) and sends it to the others (:class:`_Newton`). Perfectly or
    quasi-perfectly separated records fail with a message saying so.

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
        x, y, names, intercept = _horizontal_data(dataset, inputs)
        if not np.all((y == 0) | (y == 1)):
            raise BadRequest("the target column of a logistic regression must hold 0 or 1")
        p = len(names)
        smpc = SmpcSession(peers)
        public = declare(
            ctx,
            function="logistic_regression",
            intercept=intercept,
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
        first = peers.parties[0]
        newton = _Newton(p, max_iterations, float(tolerance)) if peers.me == first else None
        beta = np.zeros(p)
        for evaluation in itertools.count():
            sums = await _sum_big(smpc, _logistic_local(x, y, beta))
            gradient, hessian = np.array(sums[:p]), _from_triu(sums[p:-1], p)
            if newton is not None:
                decision = newton.decide(gradient, hessian, sums[-1])
                await peers.broadcast(f"newton.{evaluation}", decision)
            else:
                message = await peers.recv(first, f"newton.{evaluation}")
                decision = _decision_from(message, first, p)
            if decision["action"] == "fail":
                raise _collective(ComputationFailed(decision["reason"]))
            if decision["action"] == "stop":
                break
            beta = decision["beta"]
            await ctx.progress(min(evaluation + 1, max_iterations) / (max_iterations + 1))
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
        "iterations": decision["iterations"],
        "converged": decision["converged"],
        "samples": n,
    }


# -- vertical ---------------------------------------------------------------------------------


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
    """Check the declared roles; return the target holder, names by party, data parties.

    Every party checks the same declarations, so all refuse alike (``collective``).
    """
    target = agree(smpc, "target_holder")
    parties = smpc.peers.parties
    if target not in parties:
        raise _collective(ComputationFailed("'target_holder' must name a party of the session"))
    names: dict[str, list[str]] = {}
    for party in parties:
        public = smpc.public[party]
        declared = public.get("names")
        if not isinstance(declared, list) or not all(isinstance(n, str) for n in declared):
            raise ComputationFailed(f"party '{party}' sent malformed column names")
        names[party] = declared
        if bool(public.get("has_y")) != (party == target):
            raise _collective(
                ComputationFailed("the target holder, and only it, must give the target column 'y'")
            )
        if declared and not public.get("has_data"):
            raise ComputationFailed(f"party '{party}' names columns but gives no 'data'")
        if INTERCEPT in declared:
            raise _collective(
                ComputationFailed(
                    f"party '{party}' names a feature column '{INTERCEPT}', the name of the "
                    "intercept's coefficient; rename the column"
                )
            )
    holders = [p for p in parties if smpc.public[p].get("has_data")]
    if target not in holders:
        raise _collective(ComputationFailed("the target holder must give 'data'"))
    if len(holders) < 2:
        raise _collective(
            ComputationFailed(
                "a vertical regression needs at least two parties with 'data' (each holding "
                "some columns of the same records); with all columns at one party, run "
                "'linear_regression' there"
            )
        )
    everything = [n for party in parties for n in names[party]]
    if len(set(everything)) != len(everything):
        raise _collective(
            ComputationFailed("feature names must be unique across parties; rename them")
        )
    return target, names, holders


def _strictest(ctx: JobContext, smpc: SmpcSession) -> int:
    """The largest minimum cohort any party declared (this server's included)."""
    declared = [p.get("min_cohort") for p in smpc.public.values()]
    valid = [m for m in declared if isinstance(m, int) and not isinstance(m, bool)]
    return max([ctx.env.min_cohort, *valid])


def _check_id_sets(smpc: SmpcSession, holders: list[str], minimum: int) -> None:
    """Refuse, before the join, if any data party brings fewer ids than ``minimum``.

    A holder with one id would learn from the join whether the others hold
    it: a membership test. (The same rule as ``protocols.psi``.)
    """
    for party in holders:
        size = smpc.public[party].get("ids")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ComputationFailed(f"party '{party}' declared a malformed number of ids")
        if size < minimum:
            raise _collective(
                Forbidden(
                    f"party '{party}' brings fewer ids than the minimum cohort of {minimum} "
                    "that the servers' policies require; a set that small would reveal "
                    "whether single ids are in the other parties' data"
                )
            )


def _check_widths(n: int, blocks: dict[str, list[int]], coefficients: int, minimum: int) -> None:
    """Refuse, before any cross product is opened, blocks too wide for the records.

    A party whose columns ``Z_a`` (with the intercept and ``y`` where it holds
    them) span ``n`` or more dimensions solves another party's ``Z_b`` from
    the opened ``Z_a' Z_b``; with ``p_a`` columns, ``n - p_a`` dimensions of
    ``Z_b`` stay hidden from it. We require that to be at least the minimum
    cohort for every party, and more records than coefficients overall.
    """
    if n <= coefficients:
        raise _collective(
            ComputationFailed("linear regression needs more records than coefficients")
        )
    for party, columns in blocks.items():
        if n - len(columns) < minimum:
            raise _collective(
                Forbidden(
                    f"party '{party}' has too many columns for the common records: the records "
                    f"must outnumber every party's columns (counting the intercept and 'y' at "
                    f"the target holder) by at least the minimum cohort of {minimum}, or that "
                    "party could solve the other parties' columns from the opened cross "
                    "products; add records or drop columns"
                )
            )


def _gram_block(value: Any, party: str, size: int) -> F64:
    """A party's diagonal Gram block as received, checked."""
    if (
        not isinstance(value, np.ndarray)
        or value.dtype.kind not in "iuf"
        or value.shape != (size, size)
    ):
        raise ComputationFailed(f"party '{party}' sent a malformed Gram block")
    block = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(block)):
        raise ComputationFailed(
            f"the sums of squares of party '{party}' overflowed to infinity; it must scale "
            "its columns down"
        )
    return block


@service.job(
    "linear_regression_vertical",
    inputs=[
        Input("data", "data", "this party's dataset (a helping party gives none)"),
        Input("id", "string", "the column that identifies a record (integers or text)"),
        _x("this party's feature columns (a name or a list; may be empty)"),
        Input("y", "string", "the target column, at the target holder only"),
        Input("target_holder", "string", "the party that holds y; must agree"),
        _INTERCEPT,
        PAILLIER_INPUT,
    ],
    outputs=_OLS,
    policy=["allow_vertical_regression"],
)
async def linear_regression_vertical(ctx: JobContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Ordinary least squares over records whose columns are spread over the parties.

    Inputs at each party: ``data``, ``id`` (the column that identifies a
    record: integers, whole numbers up to 2^53, or text), ``x`` (this party's
    feature columns, may be empty), ``y`` (the target column at
    ``target_holder``, else absent). Common: ``target_holder``, ``intercept``
    (default true), ``paillier_bits`` (default 2048, two parties only). A
    party with no ``data`` only helps (deals Beaver triples); at least two
    parties must give data. Records with a missing id or value at any data
    party are left out. Output as ``linear_regression``.

    Refused on every party (403) if a data party brings fewer ids than the
    strictest minimum cohort, if fewer records than that are common, or if
    some party's columns leave fewer than that many records spare (see
    :func:`_check_widths`), each before anything it would expose is sent.
    There is no ``frac_bits`` (refused as an unknown input): the cross
    products are exact to float64 precision whatever the scale of
    the columns: each column is scaled by a power of two chosen from its sum
    of squares (public in the Gram matrix), see :func:`matmul.norm_exponents`.
    """
    bits = paillier_bits(inputs)
    intercept = _flag(inputs, "intercept", True)
    async with session_for(ctx) as peers:
        own_names = _feature_names(inputs.get("x"))
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
            id_name = inputs.get("id")
            ids, has_id = canonical_ids(dataset.column(id_name), str(id_name))
            keep = np.isfinite(values).all(axis=1) & has_id
            kept = keep[has_id].tolist()  # of the rows with an id, those with every value
            keys = id_bytes([i for i, k in zip(ids, kept, strict=True) if k])
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
                paillier_bits=bits,
                names=own_names,
                has_y=target_name is not None,
                has_data=keys is not None,
                ids=None if keys is None else len(keys),
            )
        )
        for key in ("function", "paillier_bits"):
            agree(smpc, key)
        target, names, holders = _vertical_public(smpc)
        minimum = _strictest(ctx, smpc)
        _check_id_sets(smpc, holders, minimum)
        sizes = {party: smpc.public[party]["ids"] for party in holders}
        domain = join_domain(peers, "smpc.regression")
        n, rows = await join_ids(
            peers, holders, keys, sizes=sizes, min_cohort=minimum, domain=domain
        )
        check_joint_cohort(ctx, smpc, n)
        coefficients, blocks = _layout(peers.parties, names, target, intercept)
        p = len(coefficients)
        owners = [party for party in peers.parties if blocks[party]]
        _check_widths(n, {party: blocks[party] for party in owners}, p, minimum)
        await ctx.progress(0.2)
        me = peers.me
        if rows is not None:
            block = block[rows]
            if me == target and intercept:
                block = np.column_stack([np.ones(n), block])
        gram = np.zeros((p + 1,) * 2)
        # diagonal blocks are local and revealed as they are
        if me in owners:
            own_gram = block.T @ block
            await peers.broadcast("gram", own_gram, to=[p for p in peers.others])
            gram[np.ix_(blocks[me], blocks[me])] = _gram_block(own_gram, me, len(blocks[me]))
        for party in owners:
            if party != me:
                received = _gram_block(await peers.recv(party, "gram"), party, len(blocks[party]))
                gram[np.ix_(blocks[party], blocks[party])] = received
        # each column's scale, from its (public) sum of squares: the same on every party
        exponents = np.array(matmul.norm_exponents(np.diag(gram), n))
        pairs = [(a, b) for i, a in enumerate(owners) for b in owners[i + 1 :]]
        for number, (a, b) in enumerate(pairs):
            operand = block.T if me == a else block if me == b else None
            dims = (len(blocks[a]), n, len(blocks[b]))
            scaling = (exponents[blocks[a]].tolist(), exponents[blocks[b]].tolist())
            name = f"x{number}"
            share = await secure_product(peers, name, a, b, operand, dims, scaling, bits)
            cross = await reveal_product(peers, name, (a, b), share, (dims[0], dims[2]), scaling)
            gram[np.ix_(blocks[a], blocks[b])] = cross
            gram[np.ix_(blocks[b], blocks[a])] = cross.T
            await ctx.progress(0.2 + 0.7 * (number + 1) / len(pairs))
    return ols_from_gram(
        gram[:p, :p], gram[:p, p], float(gram[p, p]), n, coefficients, intercept=intercept
    )
