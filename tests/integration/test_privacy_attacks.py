"""Attacks on the differentially private releases, run as an analyst would, and seen to fail.

``alpha`` publishes datasets under ``dp = true`` and grants the analyst each;
in a joint computation the analyst's own upload of zeros on ``beta`` stands in
for the other party. Every attack here worked against the first DP release:

* **Saturated noise.** At a tiny epsilon OpenDP's i64 noise saturates at
  ±(2^63 - 1): ``map.aggregate`` released the exact count, sum and sum of
  squares plus a known constant. Now a query below the owner's floor
  (``min_epsilon``) is refused 400, and one whose noise scale would be
  above 2^50 integer units is refused 422, both before the spend.
* **Row count by refusal.** ``smpc.secure_sum`` refused, after the spend,
  when ``rows * sensitivity`` passed the ring, so bounds and ``frac_bits``
  chosen at a threshold told 4 rows from 5. Now the ring's room is checked
  before the spend on public terms only: same answer whatever the count.
* **Refusals that spend.** Bounds whose squares overflow the fixed-point
  encoding were refused after the spend; now before.
* **The catalogue's coarse count** (14 rows show 10, 15 show 20), and **the
  budget of others** shown to every analyst.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests

from fdrtd_client import Client, ServerError
from fdrtd_server.local import LocalFederation, LocalServer

POLICY = """
version = "dp-attacks"

[defaults.privacy]
epsilon = 0.5
analyst_epsilon = 100.0
total_epsilon = 200.0

[defaults.bounds]
value = [0, 50]

[datasets.lowfloor.privacy]
min_epsilon = 1e-30

[datasets.wide4.bounds]
value = [0, 1000000]

[datasets.wide5.bounds]
value = [0, 1000000]

[datasets.squares.bounds]
value = [0, 3000000000]
"""

SECRET = np.array([2.5, 7.0, 1.0, 4.0, 8.5, 3.0, 6.0, 9.0, 30.0, 12.0, 17.25])
"""The victim column (within the bounds [0, 50])."""


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("privacy-attacks")
    with LocalFederation(root, names=("alpha", "beta"), policy=POLICY) as federation:
        server = federation.servers["alpha"]
        with Client(server.url, server.owner_token) as owner:
            published = {
                "cohort": SECRET,
                "lowfloor": SECRET,
                "wide4": np.arange(1.0, 5.0),
                "wide5": np.arange(1.0, 6.0),
                "squares": SECRET,
                "rows14": np.arange(14.0),
                "rows15": np.arange(15.0),
            }
            for name, values in published.items():
                owner.publish(owner.upload({"value": values}), name)
                owner.grant(name, "analyst")
        yield federation


@pytest.fixture(scope="module")
def alpha(federation: LocalFederation) -> LocalServer:
    return federation.servers["alpha"]


@pytest.fixture(scope="module")
def zeros(federation: LocalFederation) -> str:
    """The analyst's own upload on beta: no DP, no budget."""
    with federation.servers["beta"].client() as client:
        return str(client.upload({"value": np.zeros(100)}))


def _joint(
    federation: LocalFederation, function: str, zeros: str, **inputs: Any
) -> tuple[int, str]:
    """A joint computation of alpha's dataset and beta's zeros: alpha's status and detail."""
    session = {"id": secrets.token_urlsafe(16), "parties": ["alpha", "beta"]}
    jobs = []
    for name, data in (("alpha", inputs.pop("data")), ("beta", zeros)):
        with federation.servers[name].client() as client:
            jobs.append(client.compute("smpc", function, session=session, data=data, **inputs))
    try:
        jobs[0].result(timeout=60)
    except ServerError as refused:
        return refused.status, refused.detail
    return 200, ""


def _compute(
    server: LocalServer, microservice: str, function: str, inputs: dict[str, Any], **extra: Any
) -> tuple[int, Any]:
    """The analyst's raw request: the status and the body (a result or a problem document)."""
    answer = requests.post(
        server.url + "/v1/compute",
        params={"wait": "60"},
        json={"microservice": microservice, "function": function, "inputs": inputs, **extra},
        headers={"authorization": f"Bearer {server.token}"},
        timeout=120,
    )
    body = answer.json()
    if answer.status_code == 200 and body.get("status") == "failed":  # ended in a refusal
        return int(body["error"]["status"]), body["error"]
    return answer.status_code, body


def _spent(server: LocalServer, name: str) -> float:
    with server.client() as client:
        found = {entry["name"]: entry for entry in client.budget()}
    return float(found[name]["spent"]["analyst"]["epsilon"])


@pytest.mark.parametrize("bins", [None, [0, 10, 20, 60]])
def test_a_tiny_epsilon_is_refused_before_the_spend_never_saturated(
    alpha: LocalServer, bins: list[float] | None
) -> None:
    inputs: dict[str, Any] = {"data": "cohort", "column": "value", "epsilon": 1e-24}
    if bins:
        inputs["bins"] = bins
    before = _spent(alpha, "cohort")
    status, body = _compute(alpha, "map", "aggregate", inputs)
    assert status == 400, body  # below the owner's floor (min_epsilon, 0.001 by default)
    assert "'epsilon'" in body["detail"] and "min_epsilon" in body["detail"]
    assert _spent(alpha, "cohort") == before


@pytest.mark.parametrize("function", ["aggregate", "count"])
def test_below_a_low_floor_a_scale_beyond_the_sampler_is_refused_before_the_spend(
    federation: LocalFederation, alpha: LocalServer, zeros: str, function: str
) -> None:
    # the owner allows epsilon 1e-30; at 1e-24 the noise scale would be ~1e24 units,
    # where OpenDP's i64 draws saturate and would hand out the exact values
    before = _spent(alpha, "lowfloor")
    inputs = {"data": "lowfloor", "column": "value", "epsilon": 1e-24}
    if function == "aggregate":
        status, body = _compute(alpha, "map", "aggregate", inputs)
        detail = body["detail"]
    else:
        status, detail = _joint(federation, "count", zeros, data="lowfloor", epsilon=1e-24)
    assert status == 422, detail
    assert "'epsilon' of at least about" in detail and "nothing was spent" in detail
    assert _spent(alpha, "lowfloor") == before


def test_whether_a_dp_sum_fits_the_ring_does_not_tell_the_row_count(
    federation: LocalFederation, alpha: LocalServer, zeros: str
) -> None:
    # bounds [0, 1e6] at frac_bits 40: one record is ~2^60 units, so 4 records fit in
    # 2^62 and 5 do not; the first release refused 5 and served 4, after the spend
    outcomes: dict[str, list[tuple[int, str]]] = {}
    for name in ("wide4", "wide5"):
        before = _spent(alpha, name)
        for frac_bits in (40, 39, 38, 28):
            outcomes.setdefault(name, []).append(
                _joint(
                    federation,
                    "secure_sum",
                    zeros,
                    data=name,
                    column="value",
                    frac_bits=frac_bits,
                    epsilon=0.5,
                )
            )
        assert _spent(alpha, name) == before  # refused before the spend
    assert outcomes["wide4"] == outcomes["wide5"]
    assert all(status == 422 for status, _ in outcomes["wide4"])
    # at 40 bits the noise alone is too wide for the sampler; at 28 the ring lacks room
    assert "fewer 'frac_bits'" in outcomes["wide4"][0][1]
    asked = re.search(r"ask for at most (\d+) 'frac_bits'", outcomes["wide4"][-1][1])
    assert asked is not None, outcomes["wide4"][-1]
    # at what the refusal asks for, both are served
    for name in ("wide4", "wide5"):
        served = _joint(
            federation,
            "secure_sum",
            zeros,
            data=name,
            column="value",
            frac_bits=int(asked[1]),
            epsilon=0.5,
        )
        assert served == (200, ""), served


def test_bounds_whose_squares_overflow_are_refused_before_the_spend(alpha: LocalServer) -> None:
    # [0, 3e9]: a square is 9e18, times 2^20 beyond 63 bits
    before = _spent(alpha, "squares")
    status, body = _compute(alpha, "map", "aggregate", {"data": "squares", "column": "value"})
    assert status == 422, body
    assert "bounds" in body["detail"]
    assert _spent(alpha, "squares") == before


def test_the_catalogue_shows_no_row_count_of_a_dp_dataset_but_to_its_owner(
    alpha: LocalServer,
) -> None:
    with alpha.client() as analyst:
        listed = {entry["name"]: entry for entry in analyst.catalogue()}
    for name in ("rows14", "rows15", "cohort"):
        assert listed[name]["rows"] is None and "private" in listed[name]["rows_note"]
    # the two differ in one record: nothing in their entries but the version tells them apart
    fourteen, fifteen = (
        {k: v for k, v in listed[n].items() if k not in ("name", "version")}
        for n in ("rows14", "rows15")
    )
    assert fourteen == fifteen
    with Client(alpha.url, alpha.owner_token) as owner:
        mine = {entry["name"]: entry for entry in owner.catalogue()}
    assert mine["rows14"]["rows"] == 10 and mine["rows15"]["rows"] == 20


def test_an_analyst_sees_her_own_budget_not_the_others(alpha: LocalServer) -> None:
    # a large epsilon: the noisy count of 11 records never falls under the cohort
    status, body = _compute(alpha, "map", "aggregate", {"data": "cohort", "epsilon": 30})
    assert status == 200, body
    stated = body["value"]["privacy"]["cohort"]["budget"]
    with alpha.client() as analyst:
        shown = {entry["name"]: entry for entry in analyst.budget()}["cohort"]
    for view in (stated, shown):
        for part in ("spent", "remaining", "caps"):
            assert set(view[part]) == {"analyst"}, view  # never "total"
    assert "analysts" not in shown
    with Client(alpha.url, alpha.owner_token) as owner:
        full = {entry["name"]: entry for entry in owner.budget()}["cohort"]
    assert set(full["spent"]) == {"analyst", "total"} and "analyst" in full["analysts"]
