"""Two attacks that worked before governance, run as an attacker would, and seen to fail.

Both are run against an owner's *published* dataset under the **default**
policy (no ``policy.toml``): the owner publishes, grants an analyst, and does
nothing else. ``docs/security.md`` says which rules stop which attack.

* **Histogram bisection.** One token, one server: ``map.aggregate`` with
  ``bins=[t, top]`` used to show an empty cell as ``0`` and a non-empty small
  cell as hidden; bisecting ``t`` on that recovered a whole 5-value column
  bit-exactly in 324 queries.
* **Zeros beside a victim.** An elementwise ``secure_sum`` where alpha holds
  the victim's ``[S1, S2, S3]`` and the analyst's own uploads of zeros stand
  in for the other two parties returned alpha's array bit-exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from fdrtd_client import Client, Forbidden, ServerError
from fdrtd_server.local import LocalFederation

SECRET = np.array([41_250.125, 52_000.5, 38_999.75, 61_120.0, 47_300.25])
"""The victim column: five salaries, each meant to stay hidden."""
TOP = 1e9
VICTIM = np.array([1234.5678, 8765.4321, 5555.125])


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    with LocalFederation(tmp_path_factory.mktemp("attacks")) as local:
        for name, values in (("alpha", SECRET), ("beta", VICTIM)):
            local.servers[name].publish(values, "salaries", "the staff's salaries")
        yield local


def _max_by_bisection(
    analyst: Client, low: float, high: float, queries: int
) -> tuple[float, int, ServerError | None]:
    """The attacker's loop: bisect on "is the cell [t, top] empty?" for the column's maximum.

    Returns the estimate, the queries answered, and the refusal that stopped it.
    """
    answered = 0
    for _ in range(queries):
        middle = (low + high) / 2
        try:
            result = analyst.compute(
                "map", "aggregate", data="salaries", bins=[middle, TOP]
            ).result(timeout=60)
        except ServerError as refused:
            if "minimum cohort" in str(refused):
                continue  # the noisy count fell under k: spent, and nothing learnt; go on
            return (low + high) / 2, answered, refused
        answered += 1
        cell = result["histogram"]["counts"][0]
        if cell == 0:  # the oracle the attack relied on: empty shows 0, small shows hidden
            high = middle
        else:
            low = middle
    return (low + high) / 2, answered, None


def test_histogram_bisection_on_a_published_dataset_fails(local: LocalFederation) -> None:
    analyst = local.servers["alpha"].client()
    # the default policy: differential privacy, and no bounds declared for the column, so
    # the aggregate has no sensitivity and is refused before anything is read or spent
    _, answered, refused = _max_by_bisection(analyst, 0.0, 100_000.0, queries=80)
    assert answered == 0
    assert isinstance(refused, Forbidden)
    assert "salaries" in str(refused) and "bounds" in str(refused)


def test_histogram_bisection_runs_into_the_budget_once_bounds_are_declared(
    local: LocalFederation,
) -> None:
    """The owner declares the column's bounds (as a DP publication does) and nothing else."""
    server = local.servers["alpha"]
    policy = server.home / "policy.toml"
    policy.write_text(
        'version = "bounds"\n[datasets.salaries.bounds]\nvalue = [0, 100000]\n', "utf-8"
    )
    try:
        analyst = server.client()
        estimate, answered, refused = _max_by_bisection(analyst, 0.0, 100_000.0, queries=80)
        # the budget ends the attack long before a bisection can converge ...
        assert refused is not None, "80 queries were answered: nothing limits the attacker"
        assert isinstance(refused, Forbidden)
        assert refused.status == 403
        assert "budget" in str(refused) and "remain" in str(refused)
        assert answered < 40
        # ... and what it learnt is not the value
        assert abs(estimate - SECRET.max()) > 1e-6
        # what was spent is shown to the analyst, and nothing is left
        budget = {entry["name"]: entry for entry in analyst.budget()}
        assert "salaries" in budget, budget
    finally:
        policy.unlink()


def test_a_published_histogram_hides_empty_cells_like_small_ones(local: LocalFederation) -> None:
    """Without DP (the owner turned it off), the bisection oracle itself is gone."""
    server = local.servers["alpha"]
    policy = server.home / "policy.toml"
    policy.write_text(
        'version = "exact-histograms"\n[datasets.salaries.privacy]\ndp = false\n', "utf-8"
    )
    try:
        analyst = server.client()
        seen = set()
        for threshold in (SECRET.max() + 1.0, SECRET.max() - 1.0, SECRET.min() - 1.0):
            histogram = analyst.compute(
                "map", "aggregate", data="salaries", bins=[threshold, TOP]
            ).result(timeout=60)["histogram"]
            seen.add(repr(histogram["counts"][0]))
        # an empty cell (above the maximum) and a cell of one value look alike; only a
        # cell of at least the small-cell threshold is shown
        assert "0" not in seen
    finally:
        policy.unlink()


def test_zeros_beside_a_victim_do_not_read_her_array(local: LocalFederation) -> None:
    with local.federation() as fed:
        zeros = {
            name: fed.clients[name].upload(np.zeros(VICTIM.size)) for name in ("alpha", "gamma")
        }
        inputs = {"beta": {"data": "salaries"}, **{n: {"data": h} for n, h in zeros.items()}}
        with pytest.raises(ServerError) as refused:
            fed.compute("smpc", "secure_sum", inputs, elementwise=True, frac_bits=40).result(
                timeout=60
            )
        assert refused.value.status == 403
        assert "salaries" in str(refused.value)
        # the plain (record-summing) sum of the same inputs: refused while the owner
        # declared no bounds for the column (no sensitivity, no noise), else noised
        try:
            value = fed.compute("smpc", "secure_sum", inputs, frac_bits=40).result(timeout=60)
        except Forbidden as error:
            assert "bound" in str(error)
        else:
            assert value["sum"] != VICTIM.sum()
            assert "privacy" in value


def test_zeros_beside_a_victim_are_refused_without_dp_too(local: LocalFederation) -> None:
    """The owner turned DP off: her exact data is still never beside the analyst's own."""
    policy = local.servers["beta"].home / "policy.toml"
    policy.write_text('version = "exact"\n[datasets.salaries.privacy]\ndp = false\n', "utf-8")
    try:
        with local.federation() as fed:
            zeros = {
                name: fed.clients[name].upload(np.zeros(VICTIM.size)) for name in ("alpha", "gamma")
            }
            inputs = {"beta": {"data": "salaries"}, **{n: {"data": h} for n, h in zeros.items()}}
            job = fed.compute("smpc", "secure_sum", inputs, elementwise=True, frac_bits=40)
            with pytest.raises(Forbidden) as refused:
                job.result(timeout=60)
            assert "salaries" in str(refused.value) and "analyst_inputs" in str(refused.value)
    finally:
        policy.unlink()
