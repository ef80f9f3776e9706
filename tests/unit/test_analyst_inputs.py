"""The owner's ``analyst_inputs`` rule, in every multi-party function of ``smpc`` and ``psi``.

An analyst who brings an upload of her own to a multi-party computation
knows its part in every exact joint result and subtracts it (review F1: a
padding of 10 records in every bin lifted every cell of a joint histogram
over the small-cell threshold, and the result minus the padding was the
owner's histogram, small and empty cells included). A named dataset read
exactly (no differential privacy) whose owner keeps ``analyst_inputs =
false`` (the default) is therefore never computed beside an upload of the
caller's: every party refuses, from the declarations of the setup, before
anything else is opened.

Every job function of both microservices runs here with the SDK's testing
kit (each party's real job function, in-memory peers): alpha holds a named
dataset, beta an upload of the caller's, gamma a named dataset whose owner
allows analyst inputs (or, for the vertical functions, only deals).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import numpy as np
import pytest

from fdrtd_server.errors import ComputationFailed, Forbidden, PluginError
from fdrtd_server.microservice import Microservice, discover
from fdrtd_server.policy import DatasetPolicy, Privacy
from fdrtd_server.provenance import KEY, Provenance, vet
from fdrtd_server.sdk import SmpcSession, declare, session_for
from fdrtd_server.sdk.testing import MemoryContext, MemoryFederation
from protocols.psi import service as psi

EXACT = DatasetPolicy(privacy=Privacy(dp=False))
"""A named dataset without DP, its owner keeping the default ``analyst_inputs = false``."""
OPEN = DatasetPolicy(privacy=Privacy(dp=False), analyst_inputs=True)
"""A named dataset without DP whose owner accepts analyst inputs beside it."""
SWITCHES = {
    "allow_set_intersection": True,
    "allow_set_union": True,
    "allow_matrix_product": True,
    "allow_vertical_regression": True,
}
ROWS = 40


def table(shift: float) -> dict[str, Any]:
    """A party's dataset: numbers, a binary target, categories, ids, a 2-column matrix."""
    x = np.arange(1.0, ROWS + 1) + shift
    rng = np.random.default_rng(int(shift))
    return {
        "x": x,
        "x2": rng.normal(size=ROWS),
        "y": 2.0 * x + rng.normal(size=ROWS),
        "b": (np.arange(ROWS) % 2).astype(float),
        "c": np.array(["a", "b", "c", "d"] * (ROWS // 4)),
        "id": np.arange(ROWS),
        "m": np.column_stack([x, x / 2]),
    }


MATRIX = {"mt": {"m": np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])}}
"""Beta's right-hand matrix for ``matrix_product`` (2 x 3; alpha's is 40 x 2)."""


def common_inputs(function: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Inputs every party gives, and each party's own, for ``function`` to run to the end."""
    categories = {"x_categories": ["a", "b"], "y_categories": ["a", "b"]}
    own: dict[str, dict[str, Any]] = {}
    common: dict[str, Any]
    if function == "kth_smallest":
        common = {"data": "d", "column": "x", "k": 5}
    elif function == "quantiles":
        common = {"data": "d", "column": "x", "probabilities": [0.5]}
    elif function in ("minimum_maximum", "univariate", "median", "secure_sum", "mean"):
        common = {"data": "d", "column": "x"}
    elif function in ("intersection", "intersection_size", "union"):
        common = {"data": "d", "column": "id"}
    elif function == "count":
        common = {"data": "d"}
    elif function == "bivariate":
        common = {"data": "d", "x": "x", "y": "y"}
    elif function == "linear_regression":
        common = {"data": "d", "x": ["x"], "y": "y"}
    elif function == "logistic_regression":
        common = {"data": "d", "x": ["x"], "y": "b"}
    elif function == "frequency_table":
        common = {"data": "d", "column": "c", "categories": ["a", "b", "c", "d"]}
    elif function == "histogram":
        common = {"data": "d", "column": "x", "bins": [0.0, 20.0, 40.0, 80.0]}
    elif function == "contingency_table":
        common = {"data": "d", "x": "c", "y": "c", "x_categories": ["a", "b"]}
        common["y_categories"] = ["a", "b"]
    elif function == "matrix_product":
        common = {"left": "alpha", "right": "beta", "column": "m"}
        own = {"alpha": {"data": "d"}, "beta": {"data": "mt"}}
    elif function == "contingency_table_vertical":
        common = {"holders": ["alpha", "beta"], **categories}
        own = {
            "alpha": {"data": "d", "id": "id", "column": "c"},
            "beta": {"data": "d", "id": "id", "column": "c"},
        }
    elif function == "linear_regression_vertical":
        common = {"target_holder": "alpha"}
        own = {
            "alpha": {"data": "d", "id": "id", "x": ["x"], "y": "y"},
            "beta": {"data": "d", "id": "id", "x": ["x2"]},
        }
    else:  # a new multi-party function: give it inputs here
        raise AssertionError(f"no inputs for the multi-party function '{function}'")
    return common, own


@functools.cache
def services() -> dict[str, Microservice]:
    return discover()


def multiparty_jobs() -> list[tuple[str, str]]:
    """Every multi-party job function of ``smpc`` and ``psi``."""
    return [
        (name, function)
        for name in ("smpc", "psi")
        for function, signature in services()[name].signatures.items()
        if function in services()[name].jobs and signature.multiparty
    ]


VERTICAL = ("contingency_table_vertical", "linear_regression_vertical")


def federation(alpha: DatasetPolicy, *, dealer: bool) -> MemoryFederation:
    """Alpha: named dataset under ``alpha``; beta: uploads of the caller's; gamma: a named
    dataset whose owner accepts analyst inputs (or, with ``dealer``, no data at all)."""
    return MemoryFederation(
        ("alpha", "beta", "gamma"),
        env=SWITCHES,
        datasets={
            "alpha": {"d": table(0.0)},
            "beta": {"d": table(100.0), **MATRIX},
            "gamma": {} if dealer else {"d": table(200.0)},
        },
        policies={"alpha": {"d": alpha}, **({} if dealer else {"gamma": {"d": OPEN}})},
    )


def run(service: str, function: str, alpha: DatasetPolicy) -> dict[str, Any]:
    dealer = function in VERTICAL or function == "matrix_product"
    fed = federation(alpha, dealer=dealer)
    common, own = common_inputs(function)
    return asyncio.run(fed.outcomes(services()[service], function, own, **common))


@pytest.fixture(autouse=True)
def psi_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """PSI opens its own peer session (not ``session_for``): the kit's, here."""
    monkeypatch.setattr(psi, "_session", lambda ctx: ctx.peer_session())


def test_every_multiparty_function_is_covered() -> None:
    found = set(multiparty_jobs())
    assert {("smpc", "histogram"), ("smpc", "linear_regression"), ("psi", "union")} <= found
    assert len(found) == 20  # a new function gets its inputs in common_inputs
    for _, function in found:
        common_inputs(function)


@pytest.mark.parametrize(("service", "function"), multiparty_jobs())
def test_an_owners_exact_data_beside_an_analysts_upload_is_refused_on_every_party(
    service: str, function: str
) -> None:
    outcomes = run(service, function, EXACT)
    for party, outcome in outcomes.items():
        assert isinstance(outcome, Forbidden), (party, outcome)
        detail = str(outcome)
        assert "dataset 'd' (on party 'alpha')" in detail, detail
        assert "analyst_inputs = false" in detail and "'beta'" in detail, detail
        assert "analyst_inputs = true in [datasets.d]" in detail, detail


@pytest.mark.parametrize(("service", "function"), multiparty_jobs())
def test_with_analyst_inputs_true_the_same_computation_runs(service: str, function: str) -> None:
    outcomes = run(service, function, OPEN)
    failed = {p: o for p, o in outcomes.items() if isinstance(o, BaseException)}
    assert failed == {}, failed


def test_the_reviewers_padding_attack_recovers_nothing() -> None:
    """Review F1: alpha's histogram [1, 0, 25, 12] (small_cell 10) under beta's padding."""
    patients = np.concatenate([[5.0], np.full(25, 25.0), np.full(12, 35.0), [50.0, 60.0]])
    pad = np.concatenate([np.full(10, v) for v in (5.0, 15.0, 25.0, 35.0, 99.0)])
    edges = [0.0, 10.0, 20.0, 30.0, 40.0]
    policy = DatasetPolicy(small_cell=10, privacy=Privacy(dp=False))
    fed = MemoryFederation(
        ("alpha", "beta"),
        datasets={"alpha": {"patients": {"value": patients}}, "beta": {"pad": {"value": pad}}},
        policies={"alpha": {"patients": policy}},
    )
    inputs = {"alpha": {"data": "patients"}, "beta": {"data": "pad"}}
    outcomes = asyncio.run(
        fed.outcomes(services()["smpc"], "histogram", inputs, column="value", bins=edges)
    )
    assert all(isinstance(o, Forbidden) for o in outcomes.values()), outcomes
    assert "analyst_inputs" in str(outcomes["beta"])
    # nothing but the setup went out: no masked vector, no count
    assert {m.tag.split(".")[0] for m in fed.log} <= {"seeds", "sum", "end"}
    for message in fed.log:
        if message.tag.startswith("sum"):
            # the deferred setup rides on the count gate; it was not opened
            assert message.value["public"] is not None
    # the owner who accepts analyst inputs gets the padded (and subtractable) table
    fed.policies["alpha"]["patients"]["analyst_inputs"] = True
    result = fed.run_sync(services()["smpc"], "histogram", inputs, column="value", bins=edges)
    assert result["beta"]["counts"] == [11, 10, 35, 22]


def test_named_datasets_on_every_party_and_dp_releases_are_not_refused() -> None:
    fed = MemoryFederation(
        ("alpha", "beta"),
        datasets={p: {"d": table(10.0 * k)} for k, p in enumerate(("alpha", "beta"))},
        policies={"alpha": {"d": EXACT}, "beta": {"d": EXACT}},
    )
    assert fed.run_sync(services()["smpc"], "count", data="d")["alpha"] == {"count": 2 * ROWS}
    # a differentially private release beside an upload: the noise protects the owner's part
    private = DatasetPolicy(
        bounds={"x": (0.0, 200.0)}, privacy=Privacy(epsilon=1.0, analyst_epsilon=10.0)
    )
    fed = MemoryFederation(
        ("alpha", "beta"),
        datasets={p: {"d": table(10.0 * k)} for k, p in enumerate(("alpha", "beta"))},
        policies={"alpha": {"d": private}},
    )
    result = fed.run_sync(services()["smpc"], "secure_sum", data="d", column="x")
    assert "privacy" in result["alpha"]


def test_a_dataset_loaded_after_the_declaration_is_a_plugin_error() -> None:
    async def late(ctx: MemoryContext, inputs: dict[str, Any]) -> Any:
        async with session_for(ctx) as peers:
            smpc = SmpcSession(peers)
            await smpc.setup(declare(ctx, function="late"))
            await ctx.load_dataset("data")
            return {}

    fed = MemoryFederation(("alpha", "beta"), datasets={"alpha": {"x": [1.0]}, "beta": {"x": [2]}})
    outcomes = asyncio.run(fed.outcomes(late))
    assert any(isinstance(o, PluginError) for o in outcomes.values()), outcomes


def test_a_plugin_that_sets_up_without_declare_still_declares() -> None:
    async def undeclared(ctx: MemoryContext, inputs: dict[str, Any]) -> Any:
        dataset = await ctx.load_dataset(inputs["data"])
        async with session_for(ctx) as peers:
            smpc = SmpcSession(peers)
            await smpc.setup({"function": "undeclared"}, defer=True)
            rows = np.array([len(dataset.column("x"))])
            return {"n": int((await smpc.sum_ring(rows)).item())}

    fed = MemoryFederation(
        ("alpha", "beta"),
        datasets={"alpha": {"d": table(0.0)}, "beta": {"d": table(1.0)}},
        policies={"alpha": {"d": EXACT}},
    )
    outcomes = asyncio.run(fed.outcomes(undeclared, data="d"))
    assert all(isinstance(o, Forbidden) for o in outcomes.values()), outcomes
    fed.policies["alpha"]["d"]["analyst_inputs"] = True
    assert fed.run_sync(undeclared, data="d")["beta"] == {"n": 2 * ROWS}


@pytest.mark.parametrize(
    "declared",
    [
        "yes",
        {"supplied": 1, "guarded": []},
        {"supplied": False, "guarded": "d"},
        {"supplied": False, "guarded": [7]},
        {"supplied": False, "guarded": ["x" * 65]},
        {"supplied": False, "guarded": ["d"] * 65},
    ],
)
def test_a_malformed_declaration_is_refused(declared: Any) -> None:
    with pytest.raises(ComputationFailed, match="malformed 'provenance'"):
        vet({"alpha": {KEY: declared}, "beta": {KEY: {"supplied": True, "guarded": []}}})


def test_the_declaration_follows_what_was_loaded() -> None:
    mine = Provenance()
    mine.named("open", exact=True, analyst_inputs=True)
    mine.named("private", exact=False, analyst_inputs=False)
    assert mine.declared() == {"supplied": False, "guarded": []}
    mine = Provenance()
    mine.named("patients", exact=True, analyst_inputs=False)
    mine.upload()
    assert mine.declared() == {"supplied": True, "guarded": ["patients"]}
    # the same party holding both is refused too; neither alone is
    with pytest.raises(Forbidden, match="dataset 'patients'"):
        vet({"alpha": {KEY: mine.declared()}})
    vet({"alpha": {KEY: {"supplied": False, "guarded": ["patients"]}}, "beta": {}})
    vet({"alpha": {KEY: {"supplied": True, "guarded": []}}, "beta": {"parties": []}})
