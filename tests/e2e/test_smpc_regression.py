"""End-to-end tests of the SMPC regression functions and the secure matrix product.

Real servers (2, 3 and 5 parties) run ``linear_regression``,
``logistic_regression``, ``linear_regression_vertical`` and
``matrix_product``; results are checked against plain numpy on the pooled
data (least squares by ``np.linalg.lstsq``, standard errors and Newton's
method written out here).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fdrtd_client import FederatedJob
from fdrtd_client.errors import BadRequest, ComputationFailed, ResultTimeout
from fdrtd_server.local import LocalFederation
from protocols.smpc import matmul

F = matmul.DEFAULT_FRAC_BITS
PRODUCTS = {"FDRTD_ALLOW_MATRIX_PRODUCT": "true", "FDRTD_ALLOW_VERTICAL_REGRESSION": "true"}
"""The policy that lets ``matrix_product`` and ``linear_regression_vertical`` run.

Both are off by default: ``B = I`` reveals ``A``, and a crafted column reads
another party's values from the Gram matrix a vertical regression opens.
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    with LocalFederation(
        tmp_path_factory.mktemp("reg2"), names=("p1", "p2"), env=PRODUCTS
    ) as federation:
        yield federation


@pytest.fixture(scope="module")
def five(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    names = ("a1", "a2", "a3", "a4", "a5")
    with LocalFederation(tmp_path_factory.mktemp("reg5"), names=names, env=PRODUCTS) as federation:
        yield federation


@pytest.fixture(params=["pair", "trio", "five"])
def any_federation(request: pytest.FixtureRequest) -> LocalFederation:
    federation: LocalFederation = request.getfixturevalue(request.param)
    return federation


# -- references ---------------------------------------------------------------------------------


def ols_reference(
    x: np.ndarray, y: np.ndarray, names: list[str], intercept: bool
) -> dict[str, Any]:
    design = np.column_stack([np.ones(len(y)), x]) if intercept else x
    beta = np.linalg.lstsq(design, y, rcond=None)[0]
    residuals = y - design @ beta
    n, p = design.shape
    rss = float(residuals @ residuals)
    sigma2 = rss / (n - p)
    errors = np.sqrt(np.diag(sigma2 * np.linalg.inv(design.T @ design)))
    total = float(((y - y.mean()) ** 2).sum()) if intercept else float(y @ y)
    keys = (["intercept"] if intercept else []) + names
    return {
        "coefficients": dict(zip(keys, beta, strict=True)),
        "standard_errors": dict(zip(keys, errors, strict=True)),
        "t_values": dict(zip(keys, beta / errors, strict=True)),
        "r_squared": 1 - rss / total,
        "samples": n,
        "degrees_of_freedom": n - p,
    }


def assert_ols(result: dict[str, Any], expected: dict[str, Any], rtol: float) -> None:
    assert result["samples"] == expected["samples"]
    assert result["degrees_of_freedom"] == expected["degrees_of_freedom"]
    for key in ("coefficients", "standard_errors", "t_values"):
        assert list(result[key]) == list(expected[key])
        got = np.array(list(result[key].values()))
        want = np.array(list(expected[key].values()))
        np.testing.assert_allclose(got, want, rtol=rtol, err_msg=key)
    assert result["r_squared"] == pytest.approx(expected["r_squared"], rel=rtol)


def newton_reference(x: np.ndarray, y: np.ndarray, tol: float = 1e-8) -> dict[str, Any]:
    design = np.column_stack([np.ones(len(y)), x])
    beta = np.zeros(design.shape[1])
    iterations = 0
    while iterations < 25:
        iterations += 1
        prob = 1 / (1 + np.exp(-(design @ beta)))
        hessian = (design * (prob * (1 - prob))[:, None]).T @ design
        step = np.linalg.solve(hessian, design.T @ (y - prob))
        beta = beta + step
        if np.max(np.abs(step)) < tol:
            break
    prob = 1 / (1 + np.exp(-(design @ beta)))
    hessian = (design * (prob * (1 - prob))[:, None]).T @ design
    errors = np.sqrt(np.diag(np.linalg.inv(hessian)))
    loglik = float(np.sum(y * np.log(prob) + (1 - y) * np.log(1 - prob)))
    return {"beta": beta, "errors": errors, "iterations": iterations, "loglik": loglik}


def split_rows(total: int, parties: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Unequal, non-empty contiguous row blocks, one per party."""
    cuts = np.sort(rng.choice(np.arange(5, total - 5), size=parties - 1, replace=False))
    return np.split(np.arange(total), cuts)


def every_party_fails(job: FederatedJob, text: str) -> None:
    """Every party's job ends with a clear 400/422 error (none hangs, none succeeds)."""
    for handle in job.jobs:
        try:
            value = handle.result(45)
        except (ComputationFailed, BadRequest) as error:
            assert text in error.detail
        except ResultTimeout:
            view = handle.status()
            pytest.fail(f"{handle!r} still {view['status']} after 45 s ({view.get('progress')})")
        else:
            pytest.fail(f"{handle!r} returned {value!r} instead of failing")


# -- horizontal linear regression ---------------------------------------------------------


def test_linear_regression_matches_lstsq(any_federation: LocalFederation) -> None:
    rng = np.random.default_rng(len(any_federation.servers))
    federation = any_federation.federation()
    total = 120
    x = np.column_stack([rng.normal(50, 10, total), rng.uniform(-3, 3, total)])
    y = 4.0 + 0.3 * x[:, 0] - 1.7 * x[:, 1] + rng.normal(0, 2.0, total)
    parts = split_rows(total, len(federation.parties), rng)
    data = {
        name: {"x1": x[rows, 0], "x2": x[rows, 1], "y": y[rows]}
        for name, rows in zip(federation.parties, parts, strict=True)
    }
    handles = federation.upload(data)
    job = federation.compute(
        "smpc",
        "linear_regression",
        {name: {"data": h} for name, h in handles.items()},
        x=["x1", "x2"],
        y="y",
    )
    results = job.results(timeout=60)
    assert all(result == results[0] for result in results)
    assert_ols(results[0], ols_reference(x, y, ["x1", "x2"], True), rtol=1e-9)
    assert set(results[0]) == {
        "coefficients",
        "standard_errors",
        "t_values",
        "r_squared",
        "adjusted_r_squared",
        "residual_sum_of_squares",
        "samples",
        "degrees_of_freedom",
    }


def test_linear_regression_without_intercept_and_missing_values(trio: LocalFederation) -> None:
    rng = np.random.default_rng(7)
    federation = trio.federation()
    x = rng.normal(0, 1, (60, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + rng.normal(0, 0.3, 60)
    x_missing = x.copy()
    x_missing[[3, 25], 1] = np.nan  # such records are left out by the party holding them
    parts = split_rows(60, 3, rng)
    data = {
        name: {"a": x_missing[r, 0], "b": x_missing[r, 1], "c": x_missing[r, 2], "t": y[r]}
        for name, r in zip(federation.parties, parts, strict=True)
    }
    handles = federation.upload(data)
    job = federation.compute(
        "smpc",
        "linear_regression",
        {name: {"data": h} for name, h in handles.items()},
        x=["a", "b", "c"],
        y="t",
        intercept=False,
    )
    keep = np.isfinite(x_missing).all(axis=1)
    assert_ols(job.result(60), ols_reference(x[keep], y[keep], ["a", "b", "c"], False), 1e-9)


def test_linear_regression_refuses_overflow_and_disagreement(pair: LocalFederation) -> None:
    federation = pair.federation()
    # the sums are exact at any scale (1e30 squared is fine); only a local
    # aggregate beyond float64 (1e160 squared) is refused
    huge = {
        "p1": {"x": [1e160, 2e160, 3e160], "y": [1.0, 2.0, 4.0]},
        "p2": {"x": [1.0, 2.0], "y": [0.0, 1.0]},
    }
    handles = federation.upload(huge)
    inputs = {name: {"data": h} for name, h in handles.items()}
    job = federation.compute("smpc", "linear_regression", inputs, x=["x"], y="y")
    every_party_fails(job, "overflowed to infinity")
    disagreeing: dict[str, dict[str, Any]] = {
        "p1": {"data": handles["p1"], "intercept": False},
        "p2": {"data": handles["p2"]},
    }
    job = federation.compute("smpc", "linear_regression", disagreeing, x=["x"], y="y")
    every_party_fails(job, "disagree on 'intercept'")


# -- logistic regression ----------------------------------------------------------------------


def test_logistic_regression_matches_newton(any_federation: LocalFederation) -> None:
    rng = np.random.default_rng(100 + len(any_federation.servers))
    federation = any_federation.federation()
    total = 150
    x = np.column_stack([rng.normal(0, 1, total), rng.normal(2, 1.5, total)])
    prob = 1 / (1 + np.exp(-(-0.5 + 1.2 * x[:, 0] - 0.4 * x[:, 1])))
    y = (rng.uniform(size=total) < prob).astype(float)
    parts = split_rows(total, len(federation.parties), rng)
    data = {
        name: {"u": x[rows, 0], "v": x[rows, 1], "label": y[rows]}
        for name, rows in zip(federation.parties, parts, strict=True)
    }
    handles = federation.upload(data)
    job = federation.compute(
        "smpc",
        "logistic_regression",
        {name: {"data": h} for name, h in handles.items()},
        x=["u", "v"],
        y="label",
    )
    results = job.results(timeout=60)
    assert all(result == results[0] for result in results)
    result, expected = results[0], newton_reference(x, y)
    assert list(result["coefficients"]) == ["intercept", "u", "v"]
    np.testing.assert_allclose(list(result["coefficients"].values()), expected["beta"], rtol=1e-8)
    np.testing.assert_allclose(
        list(result["standard_errors"].values()), expected["errors"], rtol=1e-8
    )
    assert result["iterations"] == expected["iterations"]
    assert result["converged"] is True
    assert result["samples"] == total
    assert result["log_likelihood"] == pytest.approx(expected["loglik"], rel=1e-10)


def test_logistic_regression_refuses_separation_and_reports_non_convergence(
    trio: LocalFederation,
) -> None:
    federation = trio.federation()
    # perfectly separated: the likelihood has no maximum
    data: dict[str, Any] = {}
    data["alpha"] = {"x": [-3.0, -2.0, 5.0, 6.0], "y": [0.0, 0.0, 1.0, 1.0]}
    data["beta"] = {"x": [-1.0, -4.0, 7.0, 3.0], "y": [0.0, 0.0, 1.0, 1.0]}
    data["gamma"] = {"x": [-2.5, 0.0, 4.0, 2.0], "y": [0.0, 0.0, 1.0, 1.0]}
    handles = federation.upload(data)
    inputs = {name: {"data": h} for name, h in handles.items()}
    job = federation.compute("smpc", "logistic_regression", inputs, x=["x"], y="y")
    every_party_fails(job, "the records are perfectly separated")
    data["alpha"]["y"] = [0.0, 1.0, 0.0, 1.0]  # no longer separated
    handles = federation.upload(data)
    inputs = {name: {"data": h} for name, h in handles.items()}
    job = federation.compute(
        "smpc", "logistic_regression", inputs, x=["x"], y="y", max_iterations=1
    )
    results = job.results(timeout=60)
    assert all(result == results[0] for result in results)
    assert results[0]["converged"] is False
    assert results[0]["iterations"] == 1
    job = federation.compute("smpc", "logistic_regression", inputs, x=["y"], y="x")
    every_party_fails(job, "must hold 0 or 1")


# -- vertical linear regression -----------------------------------------------------------------


def vertical_data(
    rng: np.random.Generator, total: int, features: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.arange(1000, 1000 + total)
    x = rng.normal(0, 1, (total, features)) * rng.uniform(0.5, 20, features) + rng.uniform(
        -5, 5, features
    )
    y = 3.0 + x @ rng.uniform(-1, 1, features) + rng.normal(0, 1.5, total)
    return ids, x, y


def subset(rng: np.random.Generator, total: int, keep: float) -> np.ndarray:
    """A random subset of row numbers in a random order (ids differ in order and overlap)."""
    rows = np.flatnonzero(rng.uniform(size=total) < keep)
    return rng.permutation(rows)


def test_vertical_two_parties_paillier(pair: LocalFederation) -> None:
    rng = np.random.default_rng(2)
    federation = pair.federation()
    ids, x, y = vertical_data(rng, 70, 3)
    r1, r2 = subset(rng, 70, 0.85), subset(rng, 70, 0.8)
    data = {
        "p1": {"id": ids[r1], "a": x[r1, 0], "b": x[r1, 1]},
        "p2": {"id": ids[r2].astype(float), "c": x[r2, 2], "y": y[r2]},  # ids as floats
    }
    handles = federation.upload(data)
    job = federation.compute(
        "smpc",
        "linear_regression_vertical",
        {
            "p1": {"data": handles["p1"], "id": "id", "x": ["a", "b"]},
            "p2": {"data": handles["p2"], "id": "id", "x": ["c"], "y": "y"},
        },
        target_holder="p2",
        paillier_bits=2048,
    )
    results = job.results(timeout=90)
    assert results[0] == results[1]
    common = np.intersect1d(r1, r2)
    assert_ols(results[0], ols_reference(x[common], y[common], ["a", "b", "c"], True), 1e-7)


def test_vertical_three_parties_dealer(trio: LocalFederation) -> None:
    rng = np.random.default_rng(3)
    federation = trio.federation()
    ids, x, y = vertical_data(rng, 90, 4)
    text = np.array([f"rec-{i:05d}" for i in ids])
    ra, rb, rc = subset(rng, 90, 0.9), subset(rng, 90, 0.85), subset(rng, 90, 0.9)
    data = {
        "alpha": {"key": text[ra].tolist(), "x1": x[ra, 0]},
        "beta": {"key": text[rb].tolist(), "x2": x[rb, 1], "x3": x[rb, 2]},
        "gamma": {"key": text[rc].tolist(), "x4": x[rc, 3], "target": y[rc]},
    }
    handles = federation.upload(data)
    job = federation.compute(
        "smpc",
        "linear_regression_vertical",
        {
            "alpha": {"data": handles["alpha"], "id": "key", "x": ["x1"]},
            "beta": {"data": handles["beta"], "id": "key", "x": ["x2", "x3"]},
            "gamma": {"data": handles["gamma"], "id": "key", "x": ["x4"], "y": "target"},
        },
        target_holder="gamma",
    )
    results = job.results(timeout=60)
    assert all(result == results[0] for result in results)
    common = np.intersect1d(np.intersect1d(ra, rb), rc)
    expected = ols_reference(x[common], y[common], ["x1", "x2", "x3", "x4"], True)
    assert_ols(results[0], expected, 1e-7)


def test_vertical_with_helper_party_and_no_intercept(trio: LocalFederation) -> None:
    rng = np.random.default_rng(4)
    federation = trio.federation()
    ids, x, y = vertical_data(rng, 50, 2)
    rb, rc = subset(rng, 50, 0.9), subset(rng, 50, 0.9)
    data = {
        "beta": {"id": ids[rb], "u": x[rb, 0]},
        "gamma": {"id": ids[rc], "v": x[rc, 1], "y": y[rc]},
    }
    handles = federation.upload(data)
    job = federation.compute(
        "smpc",
        "linear_regression_vertical",
        {
            "alpha": {},  # no data: deals the Beaver triple only
            "beta": {"data": handles["beta"], "id": "id", "x": ["u"]},
            "gamma": {"data": handles["gamma"], "id": "id", "x": ["v"], "y": "y"},
        },
        target_holder="gamma",
        intercept=False,
    )
    results = job.results(timeout=60)
    assert all(result == results[0] for result in results)
    common = np.intersect1d(rb, rc)
    assert_ols(results[0], ols_reference(x[common], y[common], ["u", "v"], False), 1e-7)


def test_vertical_rejects_duplicate_ids(pair: LocalFederation) -> None:
    federation = pair.federation()
    handles = federation.upload(
        {
            "p1": {"id": [1.0, 2.0, 2.0, 3.0], "a": [1.0, 2.0, 3.0, 4.0]},
            "p2": {"id": [1.0, 2.0, 3.0, 4.0], "y": [1.0, 0.0, 2.0, 1.0]},
        }
    )
    job = federation.compute(
        "smpc",
        "linear_regression_vertical",
        {
            "p1": {"data": handles["p1"], "id": "id", "x": ["a"]},
            "p2": {"data": handles["p2"], "id": "id", "y": "y"},
        },
        target_holder="p2",
        paillier_bits=2048,
    )
    every_party_fails(job, "must not repeat an id")


def test_vertical_needs_two_data_holders(trio: LocalFederation) -> None:
    federation = trio.federation()
    handles = federation.upload({"gamma": {"id": [1, 2, 3, 4, 5], "y": [1.0, 0.0, 2.0, 1.0, 3.0]}})
    job = federation.compute(
        "smpc",
        "linear_regression_vertical",
        {"alpha": {}, "beta": {}, "gamma": {"data": handles["gamma"], "id": "id", "y": "y"}},
        target_holder="gamma",
    )
    every_party_fails(job, "at least two parties with 'data'")


# -- secure matrix product ----------------------------------------------------------------------


def error_bound(a: np.ndarray, b: np.ndarray, frac_bits: int) -> np.ndarray:
    """The documented bound on the error of a fixed-point product entry."""
    delta = 2.0 ** -(frac_bits + 1)
    k = a.shape[1]
    terms = np.abs(a).sum(axis=1)[:, None] * delta + np.abs(b).sum(axis=0)[None, :] * delta
    return np.asarray(terms + k * delta**2 + np.abs(a @ b) * 2.0**-52)


def start_product(
    federation: LocalFederation,
    left: str,
    right: str,
    a: np.ndarray,
    b: np.ndarray,
    **common: Any,
) -> FederatedJob:
    client = federation.federation()
    ha = federation.servers[left].client().upload(a)
    hb = federation.servers[right].client().upload(b)
    inputs: dict[str, dict[str, Any]] = {name: {} for name in client.parties}
    inputs[left] = {"data": ha}
    inputs[right] = {"data": hb}
    return client.compute("smpc", "matrix_product", inputs, left=left, right=right, **common)


def run_product(
    federation: LocalFederation,
    left: str,
    right: str,
    a: np.ndarray,
    b: np.ndarray,
    **common: Any,
) -> list[Any]:
    return start_product(federation, left, right, a, b, **common).results(timeout=90)


@pytest.mark.parametrize(
    ("fixture", "left", "right", "extra"),
    [
        ("trio", "beta", "alpha", {}),
        ("five", "a4", "a2", {}),
        ("pair", "p1", "p2", {"paillier_bits": 2048}),
        ("pair", "p2", "p1", {"paillier_bits": 2048}),
    ],
)
def test_matrix_product(
    request: pytest.FixtureRequest, fixture: str, left: str, right: str, extra: dict[str, Any]
) -> None:
    federation: LocalFederation = request.getfixturevalue(fixture)
    rng = np.random.default_rng(11)
    a = rng.normal(-2, 30, (4, 7))
    b = rng.normal(1, 0.01, (7, 2)) - rng.uniform(0, 3, (7, 2))
    if right == "p1":  # the other orientation: right's operand is the smaller one
        a, b = rng.normal(0, 5, (2, 6)), rng.normal(0, 5, (6, 5))
    results = run_product(federation, left, right, a, b, **extra)
    assert all(np.array_equal(r["product"], results[0]["product"]) for r in results)
    product = results[0]["product"]
    assert results[0]["shape"] == [a.shape[0], b.shape[1]]
    assert product.shape == (a.shape[0], b.shape[1])
    assert np.all(np.abs(product - a @ b) <= error_bound(a, b, F))


def test_matrix_product_precision_bound_is_tight(trio: LocalFederation) -> None:
    rng = np.random.default_rng(12)
    # every row and column keeps at least 20 significant bits (else it is refused)
    a, b = rng.normal(0, 300, (3, 40)), rng.normal(0, 300, (40, 3))
    product = run_product(trio, "alpha", "gamma", a, b, frac_bits=12)[0]["product"]
    error = np.abs(product - a @ b)
    assert np.all(error <= error_bound(a, b, 12))
    assert np.max(error) > 1e-4  # 12 fractional bits are visibly coarse


def test_matrix_product_default_paillier_key(pair: LocalFederation) -> None:
    a = np.array([[1.5, -2.0, 0.25]])
    b = np.array([[-1.0, 4.0], [0.5, -0.5], [8.0, 2.0]])
    result = run_product(pair, "p1", "p2", a, b)[0]
    np.testing.assert_allclose(result["product"], a @ b, rtol=0, atol=1e-11)


@pytest.mark.parametrize(
    ("fixture", "left", "right"), [("trio", "alpha", "beta"), ("pair", "p2", "p1")]
)
def test_matrix_product_overflow_is_refused(
    request: pytest.FixtureRequest, fixture: str, left: str, right: str
) -> None:
    federation: LocalFederation = request.getfixturevalue(fixture)
    a = np.array([[1.0, 2.0], [3.0, 1e30]])
    b = np.eye(2)
    job = start_product(federation, left, right, a, b, paillier_bits=2048)
    every_party_fails(job, "out of range for the secure matrix product")


def test_matrix_product_shape_mismatch_and_size_limit(trio: LocalFederation) -> None:
    job = start_product(trio, "alpha", "beta", np.ones((2, 3)), np.ones((4, 2)))
    every_party_fails(job, "do not fit")
    job = start_product(trio, "alpha", "beta", np.ones((512, 512)), np.ones((512, 520)))
    every_party_fails(job, "the product is too large")


# -- the primitive without servers --------------------------------------------------------------


def test_beaver_triple_and_paillier_primitives() -> None:
    rng = np.random.default_rng(13)
    a, b = rng.normal(0, 100, (3, 9)), rng.normal(0, 100, (9, 4))
    ea = matmul.encode_operand(a, frac_bits=F, inner=9)
    eb = matmul.encode_operand(b, frac_bits=F, inner=9)
    exact = ea.dot(eb)  # the product of the encodings, as Python integers
    seeds, label = (secrets.token_bytes(32), secrets.token_bytes(32)), b"t"
    u, w_left = matmul.left_masks(seeds[0], label, 3, 9, 4)
    v = matmul.right_mask(seeds[1], label, 9, 4)
    w_right = matmul.dealer_share(*seeds, label, 3, 9, 4)
    left = matmul.left_share(ea, matmul.masked(eb, v), w_left)
    right = matmul.right_share(matmul.masked(ea, u), v, w_right)
    total = (left + right) % matmul.MODULUS
    assert [int(t) for t in total.flat] == [int(e) % matmul.MODULUS for e in exact.flat]
    key = matmul.PaillierKey(1024)
    assert [int(d) for d in key.decrypt(key.encrypt(ea)).flat] == [int(e) % key.n for e in ea.flat]
    masked, share = matmul.mask_ciphertexts(
        key.public, matmul.encrypted_matmul(key.n, key.encrypt(ea), eb)
    )
    opened = (key.decrypt(masked) + share) % key.n
    np.testing.assert_allclose(matmul.decode_product(opened, key.n, F), a @ b, rtol=1e-12)
    assert matmul.operand_bound_bits(1) == 127
    assert matmul.operand_bound_bits(2**20) == 117
    assert math.isclose(matmul.max_operand(2**20, 40), 2.0**77)
    with pytest.raises(matmul.ProductOverflow):
        matmul.encode_operand(np.array([2.0**77]), frac_bits=40, inner=2**20)
