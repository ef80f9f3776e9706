"""Frequency tables, histograms and contingency tables, against plaintext answers.

Real servers: the session's ``trio`` (3 parties, minimum cohort 3), plus a
module's own 2-party federation (p1, p2) and 5-party federation (a1..a5) in
which a5's policy asks for a minimum cohort of 5, so that all five parties
must apply the strictest minimum.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fdrtd_client import Federation
from fdrtd_client.errors import BadRequest, ComputationFailed, Forbidden
from fdrtd_server.local import LocalFederation
from protocols.smpc.tables import bin_index, category_index, suppress

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def duo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    with LocalFederation(tmp_path_factory.mktemp("duo"), names=("p1", "p2")) as federation:
        yield federation


@pytest.fixture(scope="module")
def quint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root: Path = tmp_path_factory.mktemp("quint")
    federation = LocalFederation(root, names=("a1", "a2", "a3", "a4", "a5"))
    envs = {name: {} for name in federation.servers} | {"a5": {"FDRTD_MIN_COHORT": "5"}}
    try:
        with ThreadPoolExecutor(5) as pool:
            list(
                pool.map(
                    lambda name: federation.servers[name].start(env=envs[name]),
                    federation.servers,
                )
            )
        yield federation
    finally:
        federation.stop()


# --- plaintext answers ---------------------------------------------------------------------


def hidden_cells(counts: Sequence[int], minimum: int) -> list[bool]:
    """Small cells, then the smallest other non-zero cells until the hidden ones are safe.

    Safe: none hidden, or at least two whose sum S is such that each could
    hold ``minimum`` (S - (hidden - 1) >= minimum); failing that, all cells.
    """
    hidden = [0 < c < minimum for c in counts]

    def safe() -> bool:
        h = sum(hidden)
        total = sum(c for c, x in zip(counts, hidden, strict=True) if x)
        return h == 0 or (h >= 2 and total - (h - 1) >= minimum)

    while not safe():
        others = [(c, k) for k, c in enumerate(counts) if c > 0 and not hidden[k]]
        if not others:
            return [True] * len(counts)
        hidden[min(others)[1]] = True
    return hidden


def one_way(cells: Sequence[int], minimum: int) -> tuple[list[int | None], list[int]]:
    hidden = hidden_cells(cells, minimum)
    shown = [None if h else c for c, h in zip(cells, hidden, strict=True)]
    return shown, [k for k, h in enumerate(hidden) if h]


def two_way(
    pairs: Sequence[tuple[Any, Any]], xs: Sequence[Any], ys: Sequence[Any], minimum: int
) -> dict[str, Any]:
    tally = Counter(pairs)
    flat = [tally[(x, y)] for x in xs for y in ys]
    shown, hidden = one_way(flat, minimum)
    return {
        "x_categories": list(xs),
        "y_categories": list(ys),
        "counts": [shown[i * len(ys) : (i + 1) * len(ys)] for i in range(len(xs))],
        "total": sum(flat),
        "suppressed": [[k // len(ys), k % len(ys)] for k in hidden],
    }


def histogram_cells(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    cells = [0] * len(edges)  # the last one is "other"
    for v in values:
        if v != v:  # NaN is not counted
            continue
        if edges[0] <= v <= edges[-1]:
            k = next(i for i in range(len(edges) - 1) if v < edges[i + 1] or i == len(edges) - 2)
            cells[k] += 1
        else:
            cells[-1] += 1
    return cells


def same_everywhere(job: Any) -> Any:
    results = job.results(timeout=TIMEOUT)
    assert all(r == results[0] for r in results), results
    return results[0]


def fails_everywhere(job: Any, error: type[Exception]) -> list[str]:
    details = []
    for party_job in job.jobs:
        with pytest.raises(error) as caught:
            party_job.result(timeout=TIMEOUT, progress=False)
        details.append(str(caught.value))
    return details


# --- pure parts ----------------------------------------------------------------------------


def test_uint64_matrix_product_wraps_modulo_2_64() -> None:
    rng = np.random.default_rng(7)
    a = rng.integers(0, 2**64, size=(9, 3), dtype=np.uint64, endpoint=False)
    b = rng.integers(0, 2**64, size=(9, 4), dtype=np.uint64, endpoint=False)
    product = a.T @ b
    expected = [
        [sum(int(a[k, i]) * int(b[k, j]) for k in range(9)) % 2**64 for j in range(4)]
        for i in range(3)
    ]
    assert product.dtype == np.uint64
    assert product.tolist() == expected


def test_suppress_small_cells_and_complements() -> None:
    # one small cell alone would be recoverable from the total: the next smallest goes too
    assert suppress([5, 2, 0, 7], 3).tolist() == [True, True, False, False]
    # 1 + 2 = 3 would show both to be below 3: the 4 goes too
    assert suppress([[1, 4], [2, 9]], 3).tolist() == [[True, True], [True, False]]
    assert suppress([0, 3, 4], 3).tolist() == [False, False, False]
    assert suppress([4, 2, 4], 3).tolist() == [True, True, False]  # first on ties
    assert suppress([1, 1, 100], 5).tolist() == [True, True, True]
    rng = random.Random(3)
    for _ in range(200):
        cells = [rng.choice([0, 1, 2, 3, 5, 8]) for _ in range(rng.randint(1, 6))]
        assert suppress(cells, 4).tolist() == hidden_cells(cells, 4)


def test_category_and_bin_index() -> None:
    texts = np.array(["b", "1", "zz", "a", "1.5"])
    assert category_index(texts, ["a", "b", 1, 1.5]).tolist() == [1, 2, -1, 0, 3]
    numbers = np.array([2.0, np.nan, 3.0, 1.0])
    assert category_index(numbers, [1, 2]).tolist() == [1, -2, -1, 0]
    values = np.array([0.0, 2.5, 4.9, 5.0, 10.0, 10.5, -0.1, np.nan])
    assert bin_index(values, [0.0, 2.5, 5.0, 10.0]).tolist() == [0, 1, 1, 2, 2, -1, -1, -2]


# --- frequency tables and histograms -------------------------------------------------------

COLOURS = {
    "alpha": ["red", "red", "blue", "green", "red", "purple"],
    "beta": ["blue", "blue", "red", "green"],
    "gamma": ["red", "blue", "yellow", "blue", "blue"],
}


def colour_table(federation: Federation, colours: dict[str, list[str]]) -> Any:
    """Upload each party's colours; start a frequency table of four of them."""
    handles = federation.upload({p: {"colour": c} for p, c in colours.items()})
    return federation.compute(
        "smpc",
        "frequency_table",
        {p: {"data": h} for p, h in handles.items()},
        column="colour",
        categories=["red", "blue", "green", "white"],
    )


def test_frequency_table_three_parties(trio: LocalFederation) -> None:
    job = colour_table(trio.federation(), COLOURS)
    # green 2 and other (purple, yellow) 2 are small: two cells, so no complement needed
    assert same_everywhere(job) == {
        "categories": ["red", "blue", "green", "white"],
        "counts": [5, 6, None, 0],
        "other": None,
        "total": 15,
        "suppressed": [2, 4],
    }


VALUES = {
    "p1": [0.5, 1.0, 2.5, 3.0, 9.9, 10.0, -1.0, float("nan")],
    "p2": [4.0, 4.5, 5.0, 7.0, 8.0, 12.0, 0.0],
}


def test_histogram_and_binned_frequency_table_two_parties(duo: LocalFederation) -> None:
    federation = duo.federation()
    handles = federation.upload({p: {"v": v} for p, v in VALUES.items()})
    inputs = {p: {"data": h} for p, h in handles.items()}
    edges = [0, 2.5, 5, 10]
    # cells [3, 4, 5], other 2: the small "other" and its complement (3) are hidden
    expected = {"counts": [None, 4, 5], "other": None, "total": 14, "suppressed": [0, 3]}
    hist = same_everywhere(federation.compute("smpc", "histogram", inputs, column="v", bins=edges))
    assert hist == {"edges": [0.0, 2.5, 5.0, 10.0], **expected}
    table = same_everywhere(
        federation.compute("smpc", "frequency_table", inputs, column="v", bins=edges)
    )
    assert table == {
        "categories": ["[0, 2.5)", "[2.5, 5)", "[5, 10]"],
        "edges": [0.0, 2.5, 5.0, 10.0],
        **expected,
    }


def test_histogram_five_parties_uses_the_strictest_minimum(quint: LocalFederation) -> None:
    federation = quint.federation()
    rng = random.Random(5)
    data = {p: [round(rng.gauss(50, 20), 1) for _ in range(12)] for p in federation.parties}
    data["a3"][0] = float("nan")
    edges = [0.0, 20.0, 40.0, 60.0, 70.0, 80.0, 100.0]
    handles = federation.upload({p: {"score": v} for p, v in data.items()})
    job = federation.compute(
        "smpc",
        "histogram",
        {p: {"data": h} for p, h in handles.items()},
        column="score",
        bins=edges,
    )
    cells = histogram_cells([v for vs in data.values() for v in vs], edges)
    shown, hidden = one_way(cells, 5)  # a5's policy: 5, although the others say 3
    assert any(0 < c < 5 for c in cells)  # the data does exercise suppression
    assert same_everywhere(job) == {
        "edges": edges,
        "counts": shown[:-1],
        "other": shown[-1],
        "total": 59,
        "suppressed": hidden,
    }


def test_secure_sum_refused_by_the_strictest_policy(quint: LocalFederation) -> None:
    # a1 meets its own minimum (3) and sends its masked sum with its count; a5's
    # policy asks for 5 and the joint count is 4, so every party refuses
    federation = quint.federation()
    data: dict[str, Any] = {p: {"v": np.array([])} for p in federation.parties}
    data["a1"] = {"v": [1.0, 2.0, 3.0]}
    data["a5"] = {"v": [4.0]}
    handles = federation.upload(data)
    job = federation.compute("smpc", "secure_sum", {p: {"data": h} for p, h in handles.items()})
    details = fails_everywhere(job, Forbidden)
    assert all("minimum cohort of 5" in d for d in details), details


def test_frequency_table_with_a_party_below_its_own_minimum(trio: LocalFederation) -> None:
    # gamma's two values do not meet its minimum of 3: it sends its counts only
    # after the joint count (12) has passed; alpha and beta send theirs at once
    job = colour_table(trio.federation(), {**COLOURS, "gamma": ["red", "yellow"]})
    # green 2 and other (purple, yellow) 2 are small
    assert same_everywhere(job) == {
        "categories": ["red", "blue", "green", "white"],
        "counts": [5, 3, None, 0],
        "other": None,
        "total": 12,
        "suppressed": [2, 4],
    }


def test_frequency_table_refused_below_minimum_cohort(trio: LocalFederation) -> None:
    federation = trio.federation()
    handles = federation.upload({p: {"colour": c} for p, c in COLOURS.items()})
    job = federation.compute(
        "smpc",
        "frequency_table",
        {p: {"data": h} for p, h in handles.items()},
        column="colour",
        categories=[1, 2],  # labels "1" and "2" in a text column: all values are "other"
    )
    assert same_everywhere(job)["other"] == 15
    empty = federation.upload(
        {p: {"colour": c[:1] if p == "beta" else []} for p, c in COLOURS.items()}
    )
    job = federation.compute(
        "smpc",
        "frequency_table",
        {p: {"data": h} for p, h in empty.items()},
        column="colour",
        categories=["red"],
    )
    details = fails_everywhere(job, Forbidden)
    assert all("minimum cohort of 3" in d for d in details)


def test_disagreement_on_categories_fails_every_party(trio: LocalFederation) -> None:
    federation = trio.federation()
    handles = federation.upload({p: {"colour": c} for p, c in COLOURS.items()})
    inputs: dict[str, dict[str, Any]] = {p: {"data": h} for p, h in handles.items()}
    inputs["gamma"]["categories"] = ["red", "green"]
    job = federation.compute(
        "smpc", "frequency_table", inputs, column="colour", categories=["red", "blue"]
    )
    details = fails_everywhere(job, ComputationFailed)
    assert all("disagree on 'categories'" in d for d in details)


def test_bad_bins_end_the_computation_for_all(trio: LocalFederation) -> None:
    federation = trio.federation()
    handles = federation.upload({p: {"v": [1.0, 2.0]} for p in federation.parties})
    inputs: dict[str, dict[str, Any]] = {p: {"data": h} for p, h in handles.items()}
    inputs["beta"]["bins"] = [0, 5, 5]
    job = federation.compute("smpc", "histogram", inputs, column="v", bins=[0, 5, 10])
    beta = federation.parties.index("beta")
    with pytest.raises(BadRequest, match="strictly increasing"):
        job.jobs[beta].result(timeout=TIMEOUT, progress=False)
    for k, party_job in enumerate(job.jobs):
        if k != beta:
            with pytest.raises(ComputationFailed, match="party 'beta' ended the computation"):
                party_job.result(timeout=TIMEOUT, progress=False)


# --- contingency tables, horizontal ---------------------------------------------------------

X_CATS = ["a", "b", "c"]
Y_CATS = [1, 2]


def horizontal_data(parties: Sequence[str], seed: int) -> dict[str, dict[str, list[Any]]]:
    rng = random.Random(seed)
    return {
        p: {
            "x": [rng.choice("aaabbcd") for _ in range(15)],
            "y": [float(rng.choice([1, 1, 2, 2, 2, 3])) for _ in range(15)],
        }
        for p in parties
    }


@pytest.mark.parametrize("fixture", ["trio", "quint"])
def test_contingency_table_horizontal(fixture: str, request: pytest.FixtureRequest) -> None:
    servers: LocalFederation = request.getfixturevalue(fixture)
    federation: Federation = servers.federation()
    data = horizontal_data(federation.parties, seed=len(federation.parties))
    handles = federation.upload(data)
    job = federation.compute(
        "smpc",
        "contingency_table",
        {p: {"data": h} for p, h in handles.items()},
        x="x",
        y="y",
        x_categories=X_CATS,
        y_categories=Y_CATS,
    )
    pairs = [(x, int(y)) for d in data.values() for x, y in zip(d["x"], d["y"], strict=True)]
    inside = [(x, y) for x, y in pairs if x in X_CATS and y in Y_CATS]
    expected = two_way(inside, X_CATS, Y_CATS, 3 if fixture == "trio" else 5)
    assert expected["suppressed"]  # the data does exercise suppression
    assert same_everywhere(job) == expected


# --- contingency tables, vertical -----------------------------------------------------------


def vertical_data(
    seed: int, x_cats: Sequence[str], y_cats: Sequence[str], numeric_ids: bool = False
) -> tuple[dict[str, list[Any]], dict[str, list[Any]], list[tuple[str, str]]]:
    """Two holders' columns over partly overlapping ids, in different orders."""
    rng = random.Random(seed)
    ids = list(range(1000, 1060))
    x_ids = rng.sample(ids[:45], 38)  # ids 1045.. only at y; some of 1000..1044 only at x
    y_ids = rng.sample(ids[10:], 40)
    x_value = {i: rng.choice([*x_cats[:4], *x_cats[-2:], "other"]) for i in x_ids}
    y_value = {i: rng.choice([*y_cats, "none"]) for i in y_ids}
    x = {
        "id": [float(i) if numeric_ids else str(i) for i in x_ids],
        "v": [x_value[i] for i in x_ids],
    }
    # numeric ids: floats at x meet integers at y (7.0 is 7; "7" would be another id)
    y = {"id": [i if numeric_ids else str(i) for i in y_ids], "w": [y_value[i] for i in y_ids]}
    joined = [(x_value[i], y_value[i]) for i in sorted(set(x_ids) & set(y_ids))]
    return x, y, [(a, b) for a, b in joined if a in x_cats and b in y_cats]


def run_vertical(
    federation: Federation,
    holders: list[str],
    x: dict[str, list[Any]],
    y: dict[str, list[Any]],
    **common: Any,
) -> Any:
    handles = federation.upload({holders[0]: x, holders[1]: y})
    inputs: dict[str, dict[str, Any]] = {p: {} for p in federation.parties}
    inputs[holders[0]] = {"data": handles[holders[0]], "id": "id", "column": "v"}
    inputs[holders[1]] = {"data": handles[holders[1]], "id": "id", "column": "w"}
    return federation.compute(
        "smpc", "contingency_table_vertical", inputs, holders=holders, **common
    )


def test_vertical_three_parties_with_a_dealer(trio: LocalFederation) -> None:
    x_cats, y_cats = ["u", "v", "w"], ["k", "l", "m", "n"]
    x, y, pairs = vertical_data(3, x_cats, y_cats)
    job = run_vertical(
        trio.federation(), ["gamma", "alpha"], x, y, x_categories=x_cats, y_categories=y_cats
    )
    expected = two_way(pairs, x_cats, y_cats, 3)
    assert expected["suppressed"] and expected["total"] >= 15
    assert same_everywhere(job) == expected


def test_vertical_two_parties_with_paillier(duo: LocalFederation) -> None:
    # 450 x-categories of 5 bits do not fit in one 2048-bit plaintext: 2 ciphertexts a record
    x_cats = [f"c{k}" for k in range(450)]
    y_cats = ["k", "l", "m"]
    x, y, pairs = vertical_data(2, x_cats, y_cats, numeric_ids=True)
    federation = duo.federation()
    job = run_vertical(federation, ["p1", "p2"], x, y, x_categories=x_cats, y_categories=y_cats)
    expected = two_way(pairs, x_cats, y_cats, 3)
    assert expected["total"] >= 15
    assert same_everywhere(job) == expected
    # a 1024-bit key is not offered to clients: refused at the start, by the declaration
    with pytest.raises(BadRequest, match=r"'paillier_bits' .*must be one of 2048, 3072, 4096"):
        run_vertical(
            federation,
            ["p1", "p2"],
            x,
            y,
            x_categories=["c0"],
            y_categories=["k"],
            paillier_bits=1024,
        )


def test_vertical_five_parties(quint: LocalFederation) -> None:
    x_cats, y_cats = ["u", "v", "w"], ["k", "l"]
    x, y, pairs = vertical_data(5, x_cats, y_cats)
    job = run_vertical(
        quint.federation(), ["a4", "a2"], x, y, x_categories=x_cats, y_categories=y_cats
    )
    expected = two_way(pairs, x_cats, y_cats, 5)
    assert expected["suppressed"]
    assert same_everywhere(job) == expected


def test_vertical_refused_for_a_small_intersection(trio: LocalFederation) -> None:
    x = {"id": ["a", "b", "c", "d"], "v": ["u", "u", "v", "v"]}
    y = {"id": ["c", "d", "e", "f"], "w": ["k", "k", "k", "k"]}
    job = run_vertical(
        trio.federation(), ["alpha", "beta"], x, y, x_categories=["u", "v"], y_categories=["k"]
    )
    details = fails_everywhere(job, Forbidden)
    assert all("minimum cohort of 3" in d for d in details)


def test_vertical_refused_for_few_records_in_the_categories(trio: LocalFederation) -> None:
    # 20 joined ids, but the x-category matches 2 of them: their y values stay hidden
    ids = [str(i) for i in range(20)]
    x = {"id": ids, "v": ["rare", "rare"] + ["common"] * 18}
    y = {"id": ids[::-1], "w": ["k", "l"] * 10}
    job = run_vertical(
        trio.federation(), ["alpha", "beta"], x, y, x_categories=["rare"], y_categories=["k", "l"]
    )
    details = fails_everywhere(job, Forbidden)
    assert all("minimum cohort of 3" in d for d in details)


def test_vertical_duplicate_ids_end_the_computation(trio: LocalFederation) -> None:
    x = {"id": ["a", "b", "a"], "v": ["u", "u", "v"]}
    y = {"id": ["a", "b", "c"], "w": ["k", "k", "k"]}
    job = run_vertical(
        trio.federation(), ["alpha", "beta"], x, y, x_categories=["u", "v"], y_categories=["k"]
    )
    with pytest.raises(BadRequest, match="duplicate"):
        job.jobs[0].result(timeout=TIMEOUT, progress=False)
    for party_job in job.jobs[1:]:
        with pytest.raises(ComputationFailed, match="party 'alpha' ended the computation"):
            party_job.result(timeout=TIMEOUT, progress=False)
