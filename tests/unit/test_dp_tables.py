"""Differentially private tables without servers: each DP party's cells are noisy before opening."""

from __future__ import annotations

import numpy as np
import pytest

from fdrtd_server.errors import BadRequest, Forbidden, OutOfRange
from fdrtd_server.policy import DatasetPolicy, Privacy
from fdrtd_server.sdk.testing import MemoryFederation
from protocols.smpc.service import service

POLICY = DatasetPolicy(privacy=Privacy(epsilon=1.0, analyst_epsilon=100.0))
LABELS = ["a", "b", "c"]
# large cells, so that none is suppressed and the opened table shows every cell
COLUMNS = {
    "alpha": ["a"] * 200 + ["b"] * 150 + ["c"] * 120 + ["z"] * 90,
    "beta": ["a"] * 100 + ["b"] * 110 + ["c"] * 130 + ["z"] * 80,
    "gamma": ["a"] * 90 + ["b"] * 140 + ["c"] * 100 + ["z"] * 70,
}


def _exact(party: str) -> list[int]:
    column = COLUMNS[party]
    return [column.count(label) for label in LABELS] + [column.count("z")]


def _federation(dp: tuple[str, ...]) -> MemoryFederation:
    return MemoryFederation(
        datasets={p: {"d": {"x": v, "y": v}} for p, v in COLUMNS.items()},
        policies={p: {"d": POLICY} for p in dp},
    )


def test_what_colluding_parties_learn_of_a_dp_partys_cells_is_already_noisy() -> None:
    # alpha's dataset needs DP; beta and gamma count their own data exactly, so the
    # opened table minus theirs is exactly what alpha put into the secret sharing
    fed = _federation(("alpha",))
    others = np.add(_exact("beta"), _exact("gamma"))
    shared = []
    for _ in range(4):
        result = fed.run_sync(service, "frequency_table", data="d", column="x", categories=LABELS)
        opened = [*result["beta"]["counts"], result["beta"]["other"]]
        assert None not in opened and result["alpha"]["suppressed"] == []
        shared.append(tuple(np.subtract(opened, others)))
        noisy_total = result["beta"]["total"] - sum(others)
        statement = result["alpha"]["privacy"]["d"]
        assert "privacy" not in result["beta"]
        assert set(statement["noise"]) == {"count", "table"}
        assert statement["noise"]["table"]["sensitivity"] == 1.0
        assert statement["noise"]["table"]["scale"] == pytest.approx(2.0)  # 1 / (1 / 2)
        assert abs(noisy_total - len(COLUMNS["alpha"])) < 200  # noise of scale 2
    assert all(s != tuple(_exact("alpha")) for s in shared)
    assert len(set(shared)) == 4  # fresh noise each run
    # each party's result is the same table
    assert result["alpha"]["counts"] == result["beta"]["counts"] == result["gamma"]["counts"]


def test_three_dp_parties_open_a_noisy_contingency_table_and_spend_each_budget() -> None:
    fed = _federation(("alpha", "beta", "gamma"))
    exact = np.zeros((3, 3), dtype=np.int64)
    for party in COLUMNS:
        for label in COLUMNS[party]:
            if label in LABELS:
                exact[LABELS.index(label), LABELS.index(label)] += 1
    results = [
        fed.run_sync(
            service,
            "contingency_table",
            data="d",
            x="x",
            y="y",
            x_categories=LABELS,
            y_categories=LABELS,
            epsilon=0.5,
        )
        for _ in range(2)
    ]
    for result in results:
        for party in COLUMNS:
            assert result[party]["privacy"]["d"]["epsilon"] == 0.5
        counts = result["alpha"]["counts"]
        # the empty off-diagonal cells: noisy, never below 0, and hidden as small ones
        shown = [c for row in counts for c in row if c is not None]
        assert all(c >= 0 for c in shown)
        assert any(counts[i][i] != exact[i, i] for i in range(3) if counts[i][i] is not None)
    for party in COLUMNS:
        spent = fed.ledgers[party].store.entries  # type: ignore[attr-defined]
        assert set(spent) == {"d"}  # each party spent on its own dataset, on its own ledger


def test_a_histogram_under_dp_is_noisy_and_the_vertical_table_is_refused() -> None:
    values = {p: np.linspace(0.0, 10.0, 300 + 10 * k) for k, p in enumerate(COLUMNS)}
    fed = MemoryFederation(
        datasets={p: {"d": {"x": v}} for p, v in values.items()},
        policies={"alpha": {"d": POLICY}},
    )
    result = fed.run_sync(service, "histogram", data="d", column="x", bins=[0, 5, 10])
    assert set(result["alpha"]["privacy"]["d"]["noise"]) == {"count", "table"}
    assert fed.ledgers["alpha"].store.entries  # type: ignore[attr-defined]
    vertical = MemoryFederation(
        ("alpha", "beta"),
        datasets={p: {"d": {"id": np.arange(50), "x": np.zeros(50)}} for p in ("alpha", "beta")},
        policies={"alpha": {"d": POLICY}},
    )
    with pytest.raises(Forbidden, match="requires differential privacy"):
        vertical.run_sync(
            service,
            "contingency_table_vertical",
            data="d",
            id="id",
            column="x",
            holders=["alpha", "beta"],
            x_categories=[0],
            y_categories=[0],
        )
    assert vertical.ledgers["alpha"].store.entries == {}  # type: ignore[attr-defined]


LOW_FLOOR = DatasetPolicy(privacy=Privacy(epsilon=1.0, min_epsilon=1e-30, analyst_epsilon=100.0))


def test_what_refuses_without_the_data_refuses_before_the_spend() -> None:
    fed = MemoryFederation(
        ("alpha", "beta"),
        datasets={p: {"d": {"x": COLUMNS[p]}} for p in ("alpha", "beta")},
        policies={p: {"d": LOW_FLOOR} for p in ("alpha", "beta")},
    )
    with pytest.raises(OutOfRange, match="above 2\\^50"):
        fed.run_sync(
            service, "frequency_table", data="d", column="x", categories=LABELS, epsilon=1e-24
        )
    with pytest.raises(BadRequest, match="numeric"):  # text column, numeric bins
        fed.run_sync(service, "histogram", data="d", column="x", bins=[0, 1])
    assert all(ledger.store.entries == {} for ledger in fed.ledgers.values())  # type: ignore[attr-defined]
