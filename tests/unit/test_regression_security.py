"""Regression and secure product, attacked: what each party sees, and when it is refused.

Every party runs the real job function (``linear_regression_vertical``,
``logistic_regression``, ``matrix_product``...) in one event loop, through
``memory_peers.run_job``: its in-memory peers keep every message a party
receives (so a test can check what was opened to whom, not only which error
came out), can tamper with a message on the wire, and relay a failing
party's abort to the others as the real
:class:`~fdrtd_server.peers.PeerSession` does.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from typing import Any

import numpy as np
import pytest
from memory_peers import Peers, Tamper, run_job

import protocols.smpc.service  # noqa: F401  (first: it imports the function modules)
from fdrtd_server.errors import (
    BadRequest,
    CohortTooSmall,
    ComputationFailed,
    FdrtdError,
    Forbidden,
)
from fdrtd_server.sdk import canonical_ids
from protocols.smpc import matmul, product, regression


@pytest.fixture(autouse=True)
def in_memory_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The job functions open the in-memory session of their context."""
    for module in (regression, product):
        monkeypatch.setattr(module, "session_for", lambda ctx: ctx.peers)


def tags_seen(peers: dict[str, Peers]) -> set[str]:
    return {tag for view in peers.values() for _, tag, _ in view.received}


def assert_all_fail(outcomes: dict[str, Any], kind: type[FdrtdError], text: str) -> None:
    for party, outcome in outcomes.items():
        assert isinstance(outcome, kind), f"{party}: {outcome!r}"
        assert text in outcome.message, f"{party}: {outcome.message}"


def vertical_inputs(
    rng: np.random.Generator, ids: dict[str, list[int]], columns: dict[str, int], target: str
) -> tuple[dict[str, dict[str, Any]], dict[int, dict[str, float]]]:
    """Random columns per party over its ids; also every record's values by id."""
    truth: dict[int, dict[str, float]] = defaultdict(dict)
    inputs: dict[str, dict[str, Any]] = {}
    for party, own in ids.items():
        names = [f"{party}{k}" for k in range(columns[party])]
        data: dict[str, Any] = {"id": np.array(own)}
        for name in names:
            data[name] = rng.normal(0, 1, len(own))
        if party == target:
            data["y"] = rng.normal(0, 1, len(own))
        for row, record in enumerate(own):
            for name in [*names, "y"] if party == target else names:
                truth[record][name] = float(data[name][row])
        inputs[party] = {"data": data, "id": "id", "x": names}
        if party == target:
            inputs[party]["y"] = "y"
    return inputs, truth


# -- 1. the join: no id is revealed below the minimum cohort ------------------------------------


def test_a_holder_with_fewer_ids_than_the_cohort_is_refused_before_the_join() -> None:
    rng = np.random.default_rng(1)
    ids = {"a": [1, 2], "b": list(range(60)), "c": list(range(5, 70))}
    inputs, _ = vertical_inputs(rng, ids, {"a": 1, "b": 1, "c": 1}, "c")
    # the strictest policy applies: only 'b' asks for 3 (a's own policy would allow it)
    outcomes, peers = run_job(
        regression.linear_regression_vertical,
        inputs,
        min_cohort={"a": 1, "b": 3, "c": 1},
        target_holder="c",
    )
    assert_all_fail(outcomes, Forbidden, "party 'a' brings fewer ids than the minimum cohort of 3")
    # nothing of the join was sent: no party saw a single point
    assert not any(tag.startswith("join") for tag in tags_seen(peers))


def test_a_small_intersection_is_refused_before_any_common_id_is_revealed() -> None:
    rng = np.random.default_rng(2)
    ids = {"a": list(range(0, 30)), "b": list(range(28, 60))}  # two ids in common
    inputs, _ = vertical_inputs(rng, ids, {"a": 1, "b": 1}, "b")
    inputs["h"] = {}  # a helper
    outcomes, peers = run_job(
        regression.linear_regression_vertical, inputs, min_cohort=3, target_holder="b"
    )
    assert_all_fail(outcomes, CohortTooSmall, "minimum cohort of 3")
    assert "join.common.0" not in tags_seen(peers)  # b never learns which of its ids are shared
    counts = [
        value for view in peers.values() for _, tag, value in view.received if tag == "join.count"
    ]
    assert counts == [{"refused": True}] * 2  # to b and to the helper, without the count
    # the first holder has its intersection (inherent to computing it); nobody else does
    assert not any(tag.startswith("open") or tag == "gram" for tag in tags_seen(peers))


def test_the_count_comes_before_the_common_ids_and_the_join_still_works() -> None:
    rng = np.random.default_rng(3)
    ids = {"a": list(range(0, 40)), "b": list(range(10, 50))[::-1], "c": list(range(5, 45))}
    inputs, truth = vertical_inputs(rng, ids, {"a": 1, "b": 2, "c": 1}, "a")
    order: list[str] = []

    def watch(sender: str, receiver: str, tag: str, value: Any) -> Any:
        if receiver == "b" and tag.startswith("join."):
            order.append(tag)
        return value

    outcomes, _ = run_job(
        regression.linear_regression_vertical, inputs, tamper=watch, target_holder="a"
    )
    assert order.index("join.count") < order.index("join.common.0")
    common = sorted(set(ids["a"]) & set(ids["b"]) & set(ids["c"]))
    names = ["a0", "b0", "b1", "c0"]
    x = np.array([[truth[i][n] for n in names] for i in common])
    y = np.array([truth[i]["y"] for i in common])
    design = np.column_stack([np.ones(len(common)), x])
    beta = np.linalg.lstsq(design, y, rcond=None)[0]
    for outcome in outcomes.values():
        assert not isinstance(outcome, BaseException), outcome
        assert outcome["samples"] == len(common)
        got = [outcome["coefficients"][k] for k in ["intercept", *names]]
        np.testing.assert_allclose(got, beta, rtol=1e-9)


# -- 2. a block too wide for the records --------------------------------------------------------


def test_a_wide_block_is_refused_before_any_cross_product_is_opened() -> None:
    rng = np.random.default_rng(4)
    ids = {"a": list(range(12)), "b": list(range(12))}
    # 'a' has 10 columns for 12 records: its columns would leave 2 < 3 dimensions of b hidden
    inputs, _ = vertical_inputs(rng, ids, {"a": 10, "b": 0}, "b")
    inputs["h"] = {}
    outcomes, peers = run_job(
        regression.linear_regression_vertical, inputs, target_holder="b", intercept=False
    )
    assert_all_fail(outcomes, Forbidden, "party 'a' has too many columns for the common records")
    seen = tags_seen(peers)
    assert "join.common.0" in seen  # the join ran (12 >= 3 records in common)
    assert not any(tag.startswith(("mm.", "open.")) or tag == "gram" for tag in seen)


def test_more_coefficients_than_records_is_refused_before_any_cross_product() -> None:
    rng = np.random.default_rng(5)
    ids = {"a": list(range(8)), "b": list(range(8)), "c": list(range(8))}
    inputs, _ = vertical_inputs(rng, ids, {"a": 3, "b": 3, "c": 2}, "c")
    outcomes, peers = run_job(
        regression.linear_regression_vertical, inputs, min_cohort=1, target_holder="c"
    )
    assert_all_fail(outcomes, ComputationFailed, "more records than coefficients")
    assert not any(tag.startswith(("mm.", "open.")) for tag in tags_seen(peers))


# -- 4. malformed messages name their sender -----------------------------------------------------


def test_a_non_numeric_gram_block_names_its_sender() -> None:
    rng = np.random.default_rng(6)
    ids = {"a": list(range(20)), "b": list(range(20))}
    inputs, _ = vertical_inputs(rng, ids, {"a": 1, "b": 1}, "b")
    inputs["h"] = {}

    def garble(sender: str, receiver: str, tag: str, value: Any) -> Any:
        return np.array([["x"]]) if sender == "a" and tag == "gram" else value

    outcomes, _ = run_job(
        regression.linear_regression_vertical, inputs, tamper=garble, target_holder="b"
    )
    for party in ("b", "h"):
        assert isinstance(outcomes[party], ComputationFailed)
        assert "party 'a' sent a malformed Gram block" in outcomes[party].message


def _paillier_product(tamper: Tamper) -> dict[str, Any]:
    a = np.array([[1.0, 2.0, 3.0]])
    b = np.array([[1.0, 0.5], [2.0, -1.0], [0.25, 4.0]])
    inputs = {"p": {"data": {"m": a}, "column": "m"}, "q": {"data": {"m": b}, "column": "m"}}
    outcomes, _ = run_job(
        product.matrix_product, inputs, tamper=tamper, left="p", right="q", paillier_bits=2048
    )
    return outcomes


@pytest.mark.parametrize("bad", ["zero", "modulus", "too large"])
def test_a_malformed_ciphertext_names_its_sender(bad: str) -> None:
    # 'p' holds the smaller operand, so it encrypts; 'q' evaluates and answers
    def forge(value: Any, n: int) -> Any:
        width = matmul.width_for(n * n)
        forged = {"zero": 0, "modulus": n, "too large": n * n}[bad]
        data = forged.to_bytes(width, "little") + value["data"][width:]
        return {**value, "data": data}

    keys: dict[str, int] = {}

    def at_evaluator(sender: str, receiver: str, tag: str, value: Any) -> Any:
        if tag == "mm.ab.key":  # the key goes ahead of the ciphertexts
            keys["n"] = int.from_bytes(value["n"], "little")
        if tag == "mm.ab.c.0":
            return forge(value, keys["n"])
        return value

    outcomes = _paillier_product(at_evaluator)
    assert isinstance(outcomes["q"], ComputationFailed)
    assert "party 'p' sent a malformed ciphertext" in outcomes["q"].message

    def at_encryptor(sender: str, receiver: str, tag: str, value: Any) -> Any:
        if tag == "mm.ab.key":
            keys["n"] = int.from_bytes(value["n"], "little")
        if tag == "mm.ab.r.0":
            return forge(value, keys["n"])
        return value

    outcomes = _paillier_product(at_encryptor)
    assert isinstance(outcomes["p"], ComputationFailed)
    assert "party 'q' sent a malformed ciphertext" in outcomes["p"].message


def test_valid_ciphertexts_and_a_non_unit_never_reach_the_inverse() -> None:
    key = matmul.PaillierKey(1024)
    good = key.encrypt(np.array([[3, -4]], dtype=object))
    assert matmul.valid_ciphertexts(key.n, good)
    p = int(key.private.p)
    for bad in (0, key.n, p, 2 * p, key.nsquare, key.nsquare + 1):
        assert not matmul.valid_ciphertexts(key.n, np.array([[bad, good[0, 1]]], dtype=object))
    # had one slipped through: a clear ValueError, not a ZeroDivisionError
    with pytest.raises(ValueError, match="not invertible"):
        matmul.encrypted_matmul(
            key.n, np.array([[p]], dtype=object), np.array([[-1]], dtype=object)
        )


# -- 5. precision of the cross products --------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-11, 1e-30, 1e12])
def test_cross_products_keep_full_precision_whatever_the_scale(scale: float) -> None:
    rng = np.random.default_rng(7)
    n = 40
    ids = {"a": list(range(n)), "b": list(range(n))}
    inputs, _ = vertical_inputs(rng, ids, {"a": 2, "b": 1}, "b")
    small = inputs["a"]["data"]["a0"] * scale
    inputs["a"]["data"]["a0"] = small
    inputs["h"] = {}  # the dealer path
    outcomes, _ = run_job(regression.linear_regression_vertical, inputs, target_holder="b")
    data_a, data_b = inputs["a"]["data"], inputs["b"]["data"]
    x = np.column_stack([np.ones(n), data_a["a0"], data_a["a1"], data_b["b0"]])
    y = data_b["y"]
    # the same solver on the Gram matrix computed in the clear (lstsq itself
    # loses digits on columns this badly scaled)
    names = ["intercept", "a0", "a1", "b0"]
    expected = regression.ols_from_gram(x.T @ x, x.T @ y, float(y @ y), n, names, intercept=True)
    for outcome in outcomes.values():
        assert not isinstance(outcome, BaseException), outcome
        for key in ("coefficients", "standard_errors"):
            got, want = list(outcome[key].values()), list(expected[key].values())
            np.testing.assert_allclose(got, want, rtol=1e-9, err_msg=key)
        assert outcome["r_squared"] == pytest.approx(expected["r_squared"], rel=1e-9)


def test_scaled_encoding_is_exact_to_float_precision_and_deterministic() -> None:
    rng = np.random.default_rng(8)
    a = rng.normal(0, 1, (50, 3)) * np.array([1e-11, 1.0, 3e15])
    b = rng.normal(0, 1, (50, 2)) * np.array([1e-150, 7e150])
    inner = 50
    rows = matmul.norm_exponents((a * a).sum(axis=0), inner)
    cols = matmul.norm_exponents((b * b).sum(axis=0), inner)
    ea = matmul.encode_scaled(a.T, np.array(rows)[:, None], inner=inner)
    eb = matmul.encode_scaled(b, np.array(cols)[None, :], inner=inner)
    exact = np.asarray(ea.dot(eb), dtype=object) % matmul.MODULUS
    got = matmul.decode_scaled(exact, matmul.MODULUS, rows, cols)
    np.testing.assert_allclose(got, a.T @ b, rtol=1e-12)
    # every encoded entry keeps half of the range free
    bound = 2 ** (matmul.operand_bound_bits(inner) - 1)
    assert max(abs(int(v)) for v in [*ea.flat, *eb.flat]) < bound
    assert matmul.norm_exponents([0.0], inner) == [0]
    with pytest.raises(ValueError):
        matmul.norm_exponents([math.inf], inner)


def test_matrix_product_refuses_a_row_too_small_for_frac_bits() -> None:
    a = np.array([[1.0, 2.0], [3e-11, -1e-11]])
    b = np.array([[1.0, 0.0], [0.0, 1.0]])
    inputs = {
        "p": {"data": {"m": a}, "column": "m"},
        "q": {"data": {"m": b}, "column": "m"},
        "h": {},
    }
    outcomes, peers = run_job(product.matrix_product, inputs, left="p", right="q")
    assert isinstance(outcomes["p"], BadRequest)
    assert "row 2 of the 'left' matrix (party 'p') is too small" in outcomes["p"].message
    assert "party 'p' ended the computation" in outcomes["q"].message
    assert not any(tag.startswith("open.") for tag in tags_seen(peers))
    # with more fractional bits the same product is accurate
    outcomes, _ = run_job(product.matrix_product, inputs, left="p", right="q", frac_bits=64)
    np.testing.assert_allclose(outcomes["h"]["product"], a @ b, rtol=1e-6)
    assert matmul.coarse_lines(a, 40, axis=1) == [1]
    assert matmul.coarse_lines(a, 64, axis=1) == []
    assert matmul.coarse_lines(np.zeros((2, 2)), 40, axis=0) == []  # zeros are exact


# -- 6, 7. logistic regression: separation, and one decision for all ---------------------------


def _logistic_inputs(x: list[list[float]], y: list[list[float]]) -> dict[str, dict[str, Any]]:
    return {
        f"p{k}": {"data": {"x": np.array(xs), "y": np.array(ys)}, "x": ["x"], "y": "y"}
        for k, (xs, ys) in enumerate(zip(x, y, strict=True))
    }


def test_perfect_separation_fails_with_a_clear_message() -> None:
    inputs = _logistic_inputs(
        [[-3.0, -2.0, 5.0, 6.0], [-1.0, -4.0, 7.0, 3.0], [-2.5, 0.0, 4.0, 2.0]],
        [[0.0, 0.0, 1.0, 1.0]] * 3,
    )
    outcomes, _ = run_job(regression.logistic_regression, inputs)
    assert_all_fail(outcomes, ComputationFailed, "the records are perfectly separated")


def test_quasi_complete_separation_fails_with_a_clear_message() -> None:
    # x separates y except for the two records at x = 0, one of each class
    inputs = _logistic_inputs(
        [[-3.0, -2.0, 0.0, 1.0], [-1.0, 0.0, 2.0, 3.0]], [[0, 0, 0, 1], [0, 1, 1, 1]]
    )
    outcomes, _ = run_job(regression.logistic_regression, inputs, min_cohort=1)
    assert_all_fail(outcomes, ComputationFailed, "the coefficients diverge")


def test_every_party_follows_the_first_partys_newton_steps() -> None:
    """A party whose linear algebra differs in the last bits still stops with the others."""
    rng = np.random.default_rng(9)
    x = rng.normal(0, 1, (90, 2))
    y = (rng.uniform(size=90) < 1 / (1 + np.exp(-(x @ [1.5, -0.7])))).astype(float)
    inputs = {
        f"p{k}": {"data": {"u": x[rows, 0], "v": x[rows, 1], "t": y[rows]}, "x": ["u", "v"]}
        for k, rows in enumerate(np.array_split(np.arange(90), 3))
    }
    solve = np.linalg.solve

    def drifting(a: Any, b: Any) -> Any:
        task = asyncio.current_task()
        noise = 1e-9 if task is not None and task.get_name() != "p0" else 0.0
        return solve(a, b) * (1 + noise)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(np.linalg, "solve", drifting)
        outcomes, _ = run_job(regression.logistic_regression, inputs, y="t", tolerance=1e-12)
    results = list(outcomes.values())
    assert not any(isinstance(r, BaseException) for r in results), results
    assert all(r["coefficients"] == results[0]["coefficients"] for r in results)
    assert all(r["iterations"] == results[0]["iterations"] for r in results)
    assert results[0]["converged"] is True


def test_a_diverging_newton_step_is_halved() -> None:
    newton = regression._Newton(1, 25, 1e-8)
    hessian = np.array([[4.0]])
    assert newton.decide(np.array([2.0]), hessian, -10.0)["action"] == "step"
    assert newton.beta.tolist() == [0.5]
    # the log-likelihood fell: go back half way
    decision = newton.decide(np.array([1.0]), hessian, -12.0)
    assert decision["action"] == "step" and decision["beta"].tolist() == [0.25]
    assert newton.iterations == 1 and newton.converged is False


# -- 8. the intercept comes from the flag, never from a name ------------------------------------


@pytest.mark.parametrize("intercept", [True, False])
def test_a_feature_named_intercept_is_refused(intercept: bool) -> None:
    rng = np.random.default_rng(10)
    inputs = {
        f"p{k}": {"data": {"intercept": rng.normal(size=9), "y": rng.normal(size=9)}}
        for k in range(2)
    }
    outcomes, _ = run_job(
        regression.linear_regression, inputs, x=["intercept"], y="y", intercept=intercept
    )
    assert_all_fail(outcomes, BadRequest, "may not be named 'intercept'")


def test_without_intercept_r_squared_is_uncentred_whatever_the_first_name() -> None:
    rng = np.random.default_rng(11)
    x = rng.normal(2, 1, (30, 2))
    y = x @ [1.0, -0.5] + rng.normal(0, 0.1, 30)
    inputs = {
        f"p{k}": {"data": {"a": x[r, 0], "b": x[r, 1], "y": y[r]}}
        for k, r in enumerate(np.array_split(np.arange(30), 2))
    }
    outcomes, _ = run_job(
        regression.linear_regression, inputs, x=["a", "b"], y="y", intercept=False
    )
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    rss = float(((y - x @ beta) ** 2).sum())
    for outcome in outcomes.values():
        assert outcome["r_squared"] == pytest.approx(1 - rss / float(y @ y), rel=1e-9)
        assert list(outcome["coefficients"]) == ["a", "b"]


def test_vertical_refuses_a_feature_named_intercept() -> None:
    rng = np.random.default_rng(12)
    ids = {"a": list(range(20)), "b": list(range(20))}
    inputs, _ = vertical_inputs(rng, ids, {"a": 1, "b": 1}, "b")
    inputs["a"]["data"]["intercept"] = inputs["a"]["data"]["a0"]
    inputs["a"]["x"] = ["intercept"]
    outcomes, _ = run_job(
        regression.linear_regression_vertical, inputs, target_holder="b", intercept=False
    )
    assert isinstance(outcomes["a"], BadRequest)
    assert "may not be named 'intercept'" in outcomes["a"].message
    assert "party 'a' ended the computation" in outcomes["b"].message


# -- 9. one data holder --------------------------------------------------------------------------


def test_vertical_with_one_data_holder_fails_at_once() -> None:
    rng = np.random.default_rng(13)
    inputs, _ = vertical_inputs(rng, {"a": list(range(20))}, {"a": 2}, "a")
    inputs["h"] = {}
    outcomes, peers = run_job(regression.linear_regression_vertical, inputs, target_holder="a")
    assert_all_fail(outcomes, ComputationFailed, "at least two parties with 'data'")
    assert not any(tag.startswith("join") for tag in tags_seen(peers))


# -- 10. ids ---------------------------------------------------------------------------------------


def test_ids_are_exact_or_refused() -> None:
    ids, present = canonical_ids(np.array([7.0, -3.0, math.nan, 2.0**53]), "id")
    assert ids == [7, -3, 2**53] and present.tolist() == [True, True, False, True]
    big = np.array([2**62 + 1, 2**62 + 2], dtype=np.int64)  # integers stay exact
    assert canonical_ids(big, "id")[0] == [2**62 + 1, 2**62 + 2]
    for bad in ([2.0**53 + 2], [-(2.0**60)], [math.inf]):
        with pytest.raises(BadRequest, match="upload the ids as integers or as text"):
            canonical_ids(np.array(bad), "id")
    # a fraction is exact as it is (one rule for joins and PSI's measured values)
    assert canonical_ids(np.array([1.5]), "id")[0] == [1.5]


def test_frac_bits_is_refused_for_vertical_regression() -> None:
    # every column is scaled to full precision by itself: the declaration has no frac_bits
    signature = regression.service.signatures["linear_regression_vertical"]
    with pytest.raises(BadRequest, match="'frac_bits' is not an input"):
        signature.validate({"frac_bits": 40}, "'smpc.linear_regression_vertical'")


@pytest.mark.parametrize("scale", [1e-12, 1e12])
def test_horizontal_regression_is_exact_at_any_scale(scale: float) -> None:
    # the 256-bit ring rounded X'X to 2^-64 (entries of 1e-24 became 0) and
    # refused squares above 2^191; the exact ring keeps both
    rng = np.random.default_rng(8)
    parts = {}
    for name, size in (("p", 30), ("q", 25), ("r", 40)):
        x = rng.normal(0, scale, (size, 2))
        y = x @ np.array([2.0, -3.0]) + rng.normal(0, scale * 0.01, size)
        parts[name] = (x, y)
    inputs = {
        name: {"data": {"a": x[:, 0].tolist(), "b": x[:, 1].tolist(), "y": y.tolist()}}
        for name, (x, y) in parts.items()
    }
    outcomes, _ = run_job(regression.linear_regression, inputs, x=["a", "b"], y="y")
    x = np.vstack([x for x, _ in parts.values()])
    y = np.concatenate([y for _, y in parts.values()])
    design = np.column_stack([np.ones(len(y)), x])
    expected = np.linalg.lstsq(design, y, rcond=None)[0]
    for outcome in outcomes.values():
        assert not isinstance(outcome, BaseException), outcome
        found = [outcome["coefficients"][name] for name in ("intercept", "a", "b")]
        np.testing.assert_allclose(found[1:], expected[1:], rtol=1e-8)
        assert found[0] == pytest.approx(expected[0], abs=1e-8 * scale)
