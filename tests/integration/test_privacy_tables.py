"""Differentially private tables and linear regression on real servers.

Three servers each publish ``survey`` (a category ``group`` of 0, 1 and 2, numbers ``x1``,
``x2`` and ``y``) under the built-in default ``dp = true``, with bounds and a
budget in their policy files. The analyst queries all three named datasets
together, and alpha's named dataset beside her own uploads on beta and gamma.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fdrtd_client import Forbidden
from fdrtd_server.local import LocalFederation, LocalServer

POLICY = """
version = "dp-tables"

[defaults.privacy]
epsilon = 0.5
analyst_epsilon = 100.0
total_epsilon = 200.0

[defaults.bounds]
x1 = [0, 10]
x2 = [0, 10]
y = [-20, 40]
"""

TIMEOUT = 120
GROUPS = [0, 1, 2]
TRUTH = (1.0, 2.0, -0.5)


def _survey(rows: int, seed: int) -> dict[str, Any]:
    generator = np.random.default_rng(seed)
    x1, x2 = generator.uniform(0, 10, rows), generator.uniform(0, 10, rows)
    y = TRUTH[0] + TRUTH[1] * x1 + TRUTH[2] * x2 + generator.normal(0, 1, rows)
    group = np.arange(rows) % 3
    return {"group": group, "x1": x1, "x2": x2, "y": y}


DATA = {name: _survey(20_000 + 2000 * k, k) for k, name in enumerate(("alpha", "beta", "gamma"))}


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    with LocalFederation(tmp_path_factory.mktemp("dptables"), policy=POLICY) as federation:
        for name, data in DATA.items():
            federation.servers[name].publish(data, "survey")
        yield federation


def _spent(server: LocalServer) -> float:
    with server.client() as client:
        found = {entry["name"]: entry for entry in client.budget()}
    return float(found["survey"]["spent"]["analyst"]["epsilon"])


def test_noisy_tables_of_three_dp_datasets_state_the_spend(local: LocalFederation) -> None:
    before = {name: _spent(server) for name, server in local.servers.items()}
    exact = sum(len(d["group"]) for d in DATA.values())
    with local.federation() as fed:
        survey = fed.dataset("survey")
        table = fed.compute(
            "smpc", "frequency_table", survey, column="group", categories=GROUPS
        ).result(timeout=TIMEOUT)
        histogram = fed.compute(
            "smpc", "histogram", survey, column="x1", bins=[0, 5, 10], epsilon=0.25
        ).result(timeout=TIMEOUT)
        crossed = fed.compute(
            "smpc",
            "contingency_table",
            survey,
            x="group",
            y="group",
            x_categories=GROUPS,
            y_categories=GROUPS,
        ).result(timeout=TIMEOUT)
    statement = table["privacy"]["survey"]
    assert statement["epsilon"] == 0.5 and set(statement["noise"]) == {"count", "table"}
    assert statement["noise"]["table"] == {
        "scale": pytest.approx(4.0),  # sensitivity 1 at half of epsilon 0.5
        "sensitivity": 1.0,
        "epsilon": 0.25,
        "delta": 0.0,
    }
    assert table["total"] != exact or table["counts"] != [exact // 3] * 3
    assert abs(table["total"] - exact) < 400  # three parties' noise of scale 4
    assert all(c is None or c >= 0 for c in table["counts"])
    assert histogram["privacy"]["survey"]["epsilon"] == 0.25
    # the off-diagonal cells are empty: noisy, at least 0, and hidden as small ones
    assert all(crossed["counts"][i][i] is not None for i in range(3))
    assert all(c is None or c >= 0 for row in crossed["counts"] for c in row)
    for name, server in local.servers.items():
        assert _spent(server) - before[name] == pytest.approx(1.25)  # 0.5 + 0.25 + 0.5


def test_a_dp_dataset_beside_the_analysts_uploads(local: LocalFederation) -> None:
    alpha = local.servers["alpha"]
    before = _spent(alpha)
    with local.federation() as fed:
        handles = fed.upload({name: DATA[name] for name in ("beta", "gamma")})
        inputs = {"alpha": {"data": "survey"}, **{n: {"data": h} for n, h in handles.items()}}
        # only alpha's result states a spend, so the parties' output digests differ and the
        # joint receipt cannot verify (so for every DP function; reported to the lead)
        table = fed.compute(
            "smpc", "frequency_table", inputs, column="group", categories=GROUPS
        ).result(timeout=TIMEOUT, verify_receipt=False)
        fitted = fed.compute("smpc", "linear_regression", inputs, x=["x1", "x2"], y="y").result(
            timeout=TIMEOUT, verify_receipt=False
        )
    assert set(table["privacy"]) == {"survey"}  # alpha's statement; the uploads are hers
    assert set(fitted["privacy"]["survey"]["noise"]) == {"count", "gram"}
    assert fitted["privacy"]["survey"]["bounds"] == {
        "x1": [0.0, 10.0],
        "x2": [0.0, 10.0],
        "y": [-20.0, 40.0],
    }
    assert _spent(alpha) - before == pytest.approx(1.0)


def test_a_dp_regression_of_three_datasets_is_near_the_truth(local: LocalFederation) -> None:
    before = _spent(local.servers["gamma"])
    with local.federation() as fed:
        fitted = fed.compute(
            "smpc", "linear_regression", fed.dataset("survey"), x=["x1", "x2"], y="y", epsilon=20.0
        ).result(timeout=TIMEOUT, verify_receipt=False)  # alpha's remainder differs (above)
    coefficients = fitted["coefficients"]
    # 66,000 records, each party's noise of scale 1 (l1 sensitivity 10 at epsilon 10, in
    # units of the bounds' products): by the spread measured in tests/unit/test_dp_regression.py
    # the slopes stray by about 0.005 and the intercept (y's bound 40 weighs on it) by
    # about 0.04; the margins are twenty and twelve of those
    assert coefficients["x1"] == pytest.approx(TRUTH[1], abs=0.1)
    assert coefficients["x2"] == pytest.approx(TRUTH[2], abs=0.1)
    assert coefficients["intercept"] == pytest.approx(TRUTH[0], abs=0.5)
    assert fitted["privacy"]["survey"]["epsilon"] == 20.0
    assert fitted["privacy"]["survey"]["noise"]["gram"]["scale"] == pytest.approx(1.0)
    assert _spent(local.servers["gamma"]) - before == pytest.approx(20.0)


def test_regression_functions_without_a_dp_release_stay_refused(local: LocalFederation) -> None:
    before = _spent(local.servers["alpha"])
    with local.federation() as fed, pytest.raises(Forbidden) as refused:
        fed.compute("smpc", "logistic_regression", fed.dataset("survey"), x=["x1"], y="y").result(
            timeout=TIMEOUT
        )
    detail = str(refused.value)
    assert "requires differential privacy" in detail and "smpc.linear_regression" in detail
    assert _spent(local.servers["alpha"]) == before
