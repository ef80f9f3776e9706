"""Differential privacy on real servers: noisy releases, the budget shown, spent and refused.

Three servers each publish a dataset ``cohort`` (a column ``value``) under the
built-in default ``dp = true``, with bounds and a budget in their policy
files; alpha also publishes ``race``, whose analyst budget allows exactly one
query, for the concurrency test.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests

from fdrtd_client import Client, Forbidden
from fdrtd_server.local import LocalFederation, LocalServer

POLICY = """
version = "dp-tests"

[defaults.privacy]
epsilon = 0.5
analyst_epsilon = 100.0
total_epsilon = 200.0

[defaults.bounds]
value = [0, 50]

[datasets.race.privacy]
epsilon = 0.25
analyst_epsilon = 0.25

[datasets.small.privacy]
epsilon = 0.5
analyst_epsilon = 1.0
"""

VALUES = {
    "alpha": np.arange(1.0, 41.0),
    "beta": np.linspace(3.0, 9.0, 25),
    "gamma": np.array([2.5, 7.0, 1.0, 4.0, 8.5, 3.0, 6.0, 9.0, 30.0, 12.0]),
}
EVERYTHING = np.concatenate(list(VALUES.values()))


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    with LocalFederation(tmp_path_factory.mktemp("privacy"), policy=POLICY) as federation:
        for name, values in VALUES.items():
            for dataset in ("cohort", "race", "small") if name == "alpha" else ("cohort",):
                federation.servers[name].publish(values, dataset)
        yield federation


def _budget(server: LocalServer, name: str) -> dict[str, Any]:
    with server.client() as client:
        found = {entry["name"]: entry for entry in client.budget()}
    return found[name]


def test_a_dp_count_sum_and_mean_are_noisy_and_state_the_spend(local: LocalFederation) -> None:
    alpha = local.servers["alpha"]
    before = _budget(alpha, "cohort")
    assert before["dp"] is True and before["mechanism"] == "laplace"
    with local.federation() as fed:
        cohort = fed.dataset("cohort")
        counted = fed.compute("smpc", "count", cohort).result(timeout=120)
        summed = fed.compute("smpc", "secure_sum", cohort, column="value").result(timeout=120)
        meaned = fed.compute("smpc", "mean", cohort, column="value").result(timeout=120)
    stated = counted["privacy"]["cohort"]
    assert stated["mechanism"] == "laplace" and stated["epsilon"] == 0.5
    assert stated["noise"]["count"]["scale"] == pytest.approx(2.0)
    # sum: bounds [0, 50], half of epsilon 0.5 -> scale 200, in the value's units
    noise = summed["privacy"]["cohort"]["noise"]
    assert noise["sum"]["sensitivity"] == 50.0 and noise["sum"]["scale"] == pytest.approx(200.0)
    assert summed["privacy"]["cohort"]["bounds"] == {"value": [0.0, 50.0]}
    assert isinstance(counted["count"], int)
    # noisy, but not absurd (three parties' noise; bounds on how far it strays are loose)
    assert abs(summed["sum"] - EVERYTHING.sum()) < 50 * 3 * 200
    assert meaned["mean"] == pytest.approx(meaned["sum"] / meaned["count"])
    after = _budget(alpha, "cohort")
    spent = after["spent"]["analyst"]["epsilon"] - before["spent"]["analyst"]["epsilon"]
    assert spent == pytest.approx(1.5)  # three queries of 0.5
    assert after["remaining"]["analyst"]["epsilon"] < before["remaining"]["analyst"]["epsilon"]


def test_no_server_sees_the_exact_sum_across_runs(local: LocalFederation) -> None:
    with local.federation() as fed:
        cohort = fed.dataset("cohort")
        sums = [
            fed.compute("smpc", "secure_sum", cohort, column="value").result(timeout=120)["sum"]
            for _ in range(3)
        ]
    assert all(s != pytest.approx(EVERYTHING.sum(), abs=1e-6) for s in sums)
    assert len(set(sums)) == 3  # fresh noise every time


def test_map_aggregate_noises_count_sum_and_histogram(local: LocalFederation) -> None:
    alpha = local.servers["alpha"]
    with alpha.client() as client:
        result = client.compute(
            "map", "aggregate", data="cohort", column="value", bins=[0, 10, 20, 30, 40]
        ).result(timeout=60)
    statement = result["privacy"]["cohort"]
    assert set(statement["noise"]) == {"count", "sum", "sum_squares", "histogram"}
    assert statement["noise"]["histogram"]["sensitivity"] == 1.0
    assert statement["noise"]["histogram"]["scale"] == pytest.approx(8.0)  # 1 / (0.5 / 4)
    assert len(result["histogram"]["counts"]) == 4


def test_a_function_without_dp_is_refused_naming_the_way_out(local: LocalFederation) -> None:
    with local.federation() as fed, pytest.raises(Forbidden) as refused:
        fed.compute("smpc", "univariate", fed.dataset("cohort"), column="value").result(timeout=120)
    detail = str(refused.value)
    assert "'cohort'" in detail and "requires differential privacy" in detail
    assert "smpc.secure_sum" in detail and "dp = false" in detail


def test_elementwise_on_a_dp_dataset_is_refused(local: LocalFederation) -> None:
    with local.federation() as fed, pytest.raises(Forbidden, match="elementwise"):
        fed.compute(
            "smpc", "secure_sum", fed.dataset("cohort"), column="value", elementwise=True
        ).result(timeout=120)


def test_an_exhausted_budget_is_refused_saying_what_remains(local: LocalFederation) -> None:
    alpha = local.servers["alpha"]
    with alpha.client() as client:
        first = client.compute("map", "aggregate", data="small", epsilon=0.75).result(timeout=60)
        assert first["privacy"]["small"]["remaining"]["epsilon"] == pytest.approx(0.25)
        with pytest.raises(Forbidden) as refused:
            client.compute("map", "aggregate", data="small", epsilon=0.5).result(timeout=60)
        # the last quarter is still there, and a query that asks for it is served
        client.compute("map", "aggregate", data="small", epsilon=0.25).result(timeout=60)
    detail = str(refused.value)
    assert "'small'" in detail and "needs epsilon 0.5" in detail
    assert "remains for you is epsilon 0.25" in detail
    shown = _budget(alpha, "small")
    assert shown["remaining"]["analyst"]["epsilon"] == 0.0
    assert shown["spent"]["analyst"]["epsilon"] == 1.0


def test_an_epsilon_that_is_not_positive_is_a_bad_request(local: LocalFederation) -> None:
    alpha = local.servers["alpha"]
    answer = requests.post(
        alpha.url + "/v1/compute",
        json={
            "microservice": "map",
            "function": "aggregate",
            "inputs": {"data": "cohort", "epsilon": 0},
        },
        headers={"authorization": f"Bearer {alpha.token}"},
        timeout=30,
    )
    assert answer.status_code == 400


def test_two_queries_racing_for_the_last_of_a_budget_exactly_one_wins(
    local: LocalFederation,
) -> None:
    alpha = local.servers["alpha"]
    outcomes: list[str] = []
    start = threading.Barrier(4)

    def query() -> None:
        with alpha.client() as client:
            start.wait()
            try:
                client.compute("map", "aggregate", data="race").result(timeout=60)
                outcomes.append("served")
            except Forbidden:
                outcomes.append("refused")

    threads = [threading.Thread(target=query) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused", "refused", "refused", "served"]
    shown = _budget(alpha, "race")
    assert shown["spent"]["analyst"]["epsilon"] == 0.25  # never more than the cap


def test_the_budget_route_is_for_analysts_and_owners(local: LocalFederation) -> None:
    alpha = local.servers["alpha"]
    with Client(alpha.url, alpha.owner_token) as owner:
        mine = {e["name"]: e for e in owner.budget()}
    assert "analyst" in mine["cohort"]["analysts"]  # the owner sees each analyst's spend
    answer = requests.get(
        alpha.url + "/v1/budget",
        headers={"authorization": f"Bearer {alpha.admin_token}"},
        timeout=30,
    )
    assert answer.status_code == 403
