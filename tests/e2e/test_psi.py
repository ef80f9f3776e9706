"""End-to-end tests of the ``psi`` microservice: real servers, compared with Python sets."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from fdrtd_client import FederatedJob, Federation, Job, errors
from fdrtd_server.errors import BadRequest, ComputationFailed
from fdrtd_server.local import LocalFederation
from fdrtd_server.sdk import curve
from protocols.psi import service

pytestmark = pytest.mark.slow


UNION = {"FDRTD_ALLOW_SET_UNION": "true"}
POLICY = {**UNION, "FDRTD_ALLOW_SET_INTERSECTION": "true"}
"""Both input-revealing psi functions allowed (the shared ``trio`` allows them too)."""


@pytest.fixture(scope="module")
def duo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """p1 (minimum cohort 2) and p2 (the default 3) allow intersections; p3 does not.

    The two-party tests run between p1 and p2; p3 joins only to refuse.
    """
    federation = LocalFederation(tmp_path_factory.mktemp("psi-duo"), names=("p1", "p2", "p3"))
    try:
        with ThreadPoolExecutor(3) as pool:
            started = [
                pool.submit(
                    federation.servers["p1"].start, env={"FDRTD_MIN_COHORT": "2", **POLICY}
                ),
                pool.submit(federation.servers["p2"].start, env=POLICY),
                pool.submit(federation.servers["p3"].start, env=UNION),
            ]
            for future in started:
                future.result()
        yield federation
    finally:
        federation.stop()


@pytest.fixture(scope="module")
def quintet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    names = ("a1", "a2", "a3", "a4", "a5")
    with LocalFederation(
        tmp_path_factory.mktemp("psi-five"), names=names, env=POLICY
    ) as federation:
        yield federation


def clients_of(federation: LocalFederation, names: Sequence[str]) -> Federation:
    """A client federation of some of the servers (a session needs not all of them)."""
    return Federation({name: federation.servers[name].client(30) for name in names})


def start(
    federation: LocalFederation,
    function: str,
    sets: Mapping[str, Any],
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> FederatedJob:
    """Upload each party's set as column 'v' and start ``function`` among those parties."""
    clients = clients_of(federation, list(sets))
    handles = clients.upload({name: {"v": values} for name, values in sets.items()})
    inputs = {
        name: {"data": handles[name], "column": "v", **(options or {}).get(name, {})}
        for name in sets
    }
    return clients.compute("psi", function, inputs)


def run(
    federation: LocalFederation,
    function: str,
    sets: Mapping[str, Any],
    timeout: float = 90.0,
) -> list[Any]:
    """Upload each party's set as column 'v' and run ``function``; every party's result."""
    return start(federation, function, sets).results(timeout)


def refusals(job: FederatedJob) -> list[errors.ServerError]:
    """Every party's error; fails if any party returned a result."""
    found = []
    for each in job.jobs:
        with pytest.raises(errors.ServerError) as error:
            each.result(60)
        found.append(error.value)
    return found


def expect_everywhere(results: Sequence[Any], expected: Any) -> None:
    assert len(results) >= 2
    for result in results:
        assert result == expected


def python_sorted(values: set[Any]) -> list[Any]:
    return sorted(values, key=service.sort_key)


# --- two parties --------------------------------------------------------------------------


def test_two_parties_text(duo: LocalFederation) -> None:
    # empty text is a missing id, as in every join: dropped
    p1 = ["alice", "bob", "carol", "dave", "ève", ""]
    p2 = ["bob", "ève", "frank", "carol", "Bob", ""]
    expected = python_sorted((set(p1) & set(p2)) - {""})
    assert expected == ["bob", "carol", "ève"]
    expect_everywhere(
        run(duo, "intersection", {"p1": p1, "p2": p2}),
        {"intersection": expected, "size": 3},
    )
    expect_everywhere(run(duo, "intersection_size", {"p1": p1, "p2": p2}), {"size": 3})
    union = python_sorted((set(p1) | set(p2)) - {""})
    expect_everywhere(run(duo, "union", {"p1": p1, "p2": p2}), {"union": union, "size": 7})


def test_text_one_is_not_number_one(duo: LocalFederation) -> None:
    text = ["1", "2", "3", "x"]
    numbers = np.array([1, 2, 3, 4], dtype=np.int64)
    # No common item: an empty intersection is below the minimum cohort, refused as such.
    for refused in refusals(start(duo, "intersection", {"p1": text, "p2": numbers})):
        assert refused.status == 403
        assert "fewer items than the minimum cohort of 3" in str(refused)
    union = run(duo, "union", {"p1": text, "p2": numbers})
    expect_everywhere(union, {"union": [1, 2, 3, 4, "1", "2", "3", "x"], "size": 8})


def test_numbers_compare_by_value(duo: LocalFederation) -> None:
    # Integers from an int64 array meet integral floats from a list (uploaded as float64);
    # NaN is dropped, duplicates are removed (fractions are refused: the id rule of every join).
    ints = np.array([1, 3, 7, 7, -2, 10**12], dtype=np.int64)
    floats = [1.0, 5.0, 3.0, 7.0, -2.0, 1e12, float("nan"), 5.0]
    expected = python_sorted({1, 3, 7, -2, 10**12} & {1.0, 5.0, 3.0, 7.0, -2.0, 1e12})
    (first, second) = run(duo, "intersection", {"p1": ints, "p2": floats})
    assert first == second == {"intersection": [-2, 1, 3, 7, 10**12], "size": 5}
    assert expected == first["intersection"]
    assert all(type(v) is int for v in first["intersection"])
    union = run(duo, "union", {"p1": ints, "p2": floats})
    expect_everywhere(union, {"union": [-2, 1, 3, 5, 7, 10**12], "size": 6})


def start_pair(duo: LocalFederation, p1: list[str], p2: list[str]) -> tuple[Job, Job]:
    clients = clients_of(duo, ("p1", "p2"))
    handles = clients.upload({"p1": {"v": p1}, "p2": {"v": p2}})
    inputs = {name: {"data": handles[name], "column": "v"} for name in handles}
    first, second = clients.compute("psi", "intersection", inputs).jobs
    return first, second


def assert_ended_by_p2(job: Job) -> None:
    # p1 hears p2's refusal at once (a policy refusal may keep its 403), never a result.
    with pytest.raises(errors.ServerError, match="party 'p2' ended the computation") as error:
        job.result(60)
    assert error.value.status in (403, 422)


def test_own_set_below_minimum_cohort_is_refused(duo: LocalFederation) -> None:
    on_p1, on_p2 = start_pair(duo, ["a", "b", "c"], ["a", "b"])
    with pytest.raises(errors.Forbidden, match="minimum cohort of 3"):
        on_p2.result(60)
    assert_ended_by_p2(on_p1)


def test_another_partys_small_set_is_refused_by_policy(duo: LocalFederation) -> None:
    # p1 allows sets of 2; p2 does not, and refuses to intersect its data with one.
    on_p1, on_p2 = start_pair(duo, ["a", "b"], ["a", "b", "c", "d"])
    with pytest.raises(errors.Forbidden, match="party 'p1' brings fewer items than the minimum"):
        on_p2.result(60)
    assert_ended_by_p2(on_p1)


def test_parties_must_run_the_same_function(duo: LocalFederation) -> None:
    p1 = duo.servers["p1"].client()
    p2 = duo.servers["p2"].client()
    h1, h2 = p1.upload({"v": ["a", "b", "c"]}), p2.upload({"v": ["a", "b", "c"]})
    session = {"id": "psi-mismatch-" + secrets.token_hex(16), "parties": ["p1", "p2"]}
    j1 = p1.compute("psi", "intersection", session=session, data=h1)
    j2 = p2.compute("psi", "union", session=session, data=h2)
    for job in (j1, j2):
        with pytest.raises(errors.ComputationFailed, match=r"disagree|ended the computation"):
            job.result(60)


def test_refused_input_ends_the_session_for_everyone_at_once(duo: LocalFederation) -> None:
    clients = clients_of(duo, ("p1", "p2"))
    handles = clients.upload({"p1": {"v": ["a", "b", "c"]}, "p2": {"v": ["a", "b", "c"]}})
    inputs: dict[str, dict[str, Any]] = {
        "p1": {"data": handles["p1"], "column": "nope"},
        "p2": {"data": handles["p2"]},
    }
    job = clients.compute("psi", "intersection_size", inputs)
    with pytest.raises(errors.BadRequest, match="no column of that name"):
        job.jobs[0].result(60)
    # p1's refusal ends it for p2, named (not the session timeout, a PartyTimeout)
    with pytest.raises(errors.ComputationFailed, match="party 'p1' ended the computation"):
        job.jobs[1].result(60)


def test_single_server_without_session_is_a_bad_request(duo: LocalFederation) -> None:
    client = duo.servers["p1"].client()
    handle = client.upload({"v": ["a", "b", "c"]})
    with pytest.raises(errors.BadRequest, match="session"):
        client.compute("psi", "intersection", data=handle).result(30)


def test_intersection_needs_every_partys_policy(duo: LocalFederation) -> None:
    # p1 and p2 allow intersections, p3 does not: p3 refuses, and both others end with it.
    sets = {name: ["a", "b", "c", "d"] for name in ("p1", "p2", "p3")}
    on_p1, on_p2, on_p3 = start(duo, "intersection", sets).jobs
    with pytest.raises(errors.Forbidden, match="allow_set_intersection = true"):
        on_p3.result(60)
    for job in (on_p1, on_p2):
        with pytest.raises(errors.ServerError, match="party 'p3' ended the computation") as error:
            job.result(60)
        assert error.value.status == 403
    # The size alone is governed by the minimum cohort only: p3 takes part.
    pair = {"p1": sets["p1"], "p3": sets["p3"]}
    expect_everywhere(run(duo, "intersection_size", pair), {"size": 4})


def test_small_intersection_is_refused_on_every_party(duo: LocalFederation) -> None:
    def refused_alike(function: str, p1: list[str], p2: list[str]) -> str:
        found = refusals(start(duo, function, {"p1": p1, "p2": p2}))
        assert all(isinstance(error, errors.Forbidden) for error in found)
        assert len({error.detail for error in found}) == 1  # the same refusal on every party
        return found[0].detail

    # One common item under p2's minimum cohort of 3: no items, no size, for anyone.
    message = refused_alike("intersection", ["a", "b", "c"], ["a", "x", "y"])
    assert "fewer items than the minimum cohort of 3" in message
    assert "party 'p2'" in message
    # Two common items satisfy p1's own minimum (2), not the strictest one (p2's 3).
    assert "cohort of 3" in refused_alike("intersection_size", ["a", "b", "c"], ["a", "b", "y"])
    # Padding attack: junk plus one target is refused alike whether p2 holds the target or not.
    junk_and_target = ["junk-1", "junk-2", "target"]
    held = refused_alike("intersection_size", junk_and_target, ["target", "x", "y"])
    not_held = refused_alike("intersection_size", junk_and_target, ["other", "x", "y"])
    assert held == not_held


def test_union_pads_every_item_to_the_common_length(duo: LocalFederation) -> None:
    short = ["a", "b", "c"]
    long = ["x" * 100, "y" * 100, "z"]
    union = python_sorted(set(short) | set(long))
    expect_everywhere(run(duo, "union", {"p1": short, "p2": long}), {"union": union, "size": 6})
    # An item longer than max_item_bytes: every party refuses alike, naming nobody.
    bound = {"p1": {"max_item_bytes": 64}, "p2": {"max_item_bytes": 64}}
    found = refusals(start(duo, "union", {"p1": short, "p2": long}, bound))
    assert all(isinstance(error, errors.BadRequest) for error in found)
    assert len({error.detail for error in found}) == 1
    assert "longer than 'max_item_bytes' (64" in found[0].detail
    assert "p1" not in found[0].detail and "p2" not in found[0].detail
    # The parties must agree on the bound.
    mismatch = {"p1": {"max_item_bytes": 128}}
    for error in refusals(start(duo, "union", {"p1": short, "p2": long}, mismatch)):
        assert isinstance(error, errors.ComputationFailed)
        assert "disagree on 'max_item_bytes'" in str(error)


# --- three parties (the shared trio) -------------------------------------------------------


def test_three_parties_text_and_size_and_union(trio: LocalFederation) -> None:
    sets = {
        "alpha": [f"k{i}" for i in range(0, 60)],
        "beta": [f"k{i}" for i in range(20, 90)] + ["only-beta"],
        "gamma": [f"k{i}" for i in range(10, 50, 2)] + ["k75"],
    }
    joint = set(sets["alpha"]) & set(sets["beta"]) & set(sets["gamma"])
    expected = python_sorted(joint)
    assert len(expected) == 15
    expect_everywhere(
        run(trio, "intersection", sets), {"intersection": expected, "size": len(expected)}
    )
    expect_everywhere(run(trio, "intersection_size", sets), {"size": 15})
    union = python_sorted(set(sets["alpha"]) | set(sets["beta"]) | set(sets["gamma"]))
    expect_everywhere(run(trio, "union", sets), {"union": union, "size": 91})


def test_three_parties_numbers(trio: LocalFederation) -> None:
    sets = {
        "alpha": np.arange(0, 300, 3, dtype=np.int64),
        "beta": [float(v) for v in range(0, 300, 2)] + [1e6],
        "gamma": np.arange(0, 300, 5, dtype=np.uint32),
    }
    expected = list(range(0, 300, 30))
    expect_everywhere(
        run(trio, "intersection", sets), {"intersection": expected, "size": len(expected)}
    )


def test_three_parties_empty_intersection_is_refused(trio: LocalFederation) -> None:
    sets = {name: [f"{name}-{i}" for i in range(5)] + ["shared-by-two"] for name in trio.servers}
    sets["gamma"] = ["g1", "g2", "g3"]
    for function in ("intersection", "intersection_size"):
        for refused in refusals(start(trio, function, sets)):
            assert isinstance(refused, errors.Forbidden)
            assert "fewer items than the minimum cohort of 3" in str(refused)


def test_three_parties_all_sets_equal(trio: LocalFederation) -> None:
    values = ["same", "set", "everywhere", "same"]  # a duplicate, removed locally
    sets = {name: list(values) for name in trio.servers}
    expected = ["everywhere", "same", "set"]
    expect_everywhere(run(trio, "intersection", sets), {"intersection": expected, "size": 3})
    expect_everywhere(run(trio, "union", sets), {"union": expected, "size": 3})


def test_three_parties_union_of_long_items_in_several_messages(trio: LocalFederation) -> None:
    # 2500 items of ~200 bytes per party: the mix-net batches (7500 onions of 400 bytes)
    # and the broadcast union (~1.1 MB) take several messages each.
    def item(i: int) -> str:
        return f"{i:06d}-" + "x" * 193

    sets = {
        name: [item(i) for i in range(k * 1000, k * 1000 + 2500)]
        for k, name in enumerate(trio.servers)
    }
    union = sorted(set().union(*map(set, sets.values())))
    assert len(union) == 4500
    expect_everywhere(run(trio, "union", sets), {"union": union, "size": 4500})


def test_three_parties_20000_items(trio: LocalFederation) -> None:
    n = 20_000
    shared = [f"customer-{i:08d}" for i in range(0, n, 4)]
    sets = {
        name: shared + [f"{name}-{i:08d}" for i in range(n - len(shared))] for name in trio.servers
    }
    started = time.perf_counter()
    results = run(trio, "intersection", sets, timeout=110)
    elapsed = time.perf_counter() - started
    print(f"\nPSI intersection, 3 parties x {n} items: {elapsed:.2f} s")
    expected = sorted(shared)
    for result in results:
        assert result["size"] == len(shared)
        assert result["intersection"] == expected


# --- five parties --------------------------------------------------------------------------


def test_five_parties(quintet: LocalFederation) -> None:
    sets: dict[str, Any] = {
        f"a{p}": [f"v{i}" for i in range(100) if i % (p + 1) == 0 or i % 7 == 0] + [f"own{p}"]
        for p in range(1, 6)
    }
    values = [set(v) for v in sets.values()]
    joint = python_sorted(set.intersection(*values))
    assert len(joint) > 3
    expect_everywhere(
        run(quintet, "intersection", sets), {"intersection": joint, "size": len(joint)}
    )
    expect_everywhere(run(quintet, "intersection_size", sets), {"size": len(joint)})
    union = python_sorted(set.union(*values))
    expect_everywhere(run(quintet, "union", sets), {"union": union, "size": len(union)})


def test_five_parties_numbers(quintet: LocalFederation) -> None:
    sets = {f"a{p}": np.arange(p, 200, dtype=np.int64) for p in range(1, 6)}
    expected = list(range(5, 200))
    expect_everywhere(
        run(quintet, "intersection", sets), {"intersection": expected, "size": len(expected)}
    )


# --- unit level: what a peer sends is checked ---------------------------------------------


def test_invalid_points_from_a_peer_are_rejected() -> None:
    scalar = curve.random_scalar()
    good = curve.hash_and_blind([curve.encode_item(f"x{i}") for i in range(3)], scalar, b"t")
    non_canonical = (2**255 - 19 + 9).to_bytes(32, "little")  # u = 9 spelt u + p
    small = bytes(32)  # u = 0, a point of order 2
    for bad in (non_canonical, small, b"\xff" * 32):
        message = {"points": b"".join([good[0], bad, good[2]])}
        points = service.parse_points(message, 3, "beta")
        with pytest.raises(ComputationFailed, match="party 'beta' sent invalid data") as error:
            asyncio.run(service._crypto("beta", curve.reblind, points, scalar))
        assert "index 1" in error.value.message
        assert bad.hex() not in error.value.message
        with pytest.raises(ComputationFailed, match="party 'beta'"):
            asyncio.run(service._crypto("beta", curve.validate_points, points))


@pytest.mark.parametrize(
    "message",
    [
        {"points": b"\x01" * 95},
        {"points": b"\x01" * 128},
        {"points": "text"},
        {"other": b""},
        [b"\x01" * 96],
        None,
    ],
    ids=["short", "long", "text", "no-points", "list", "none"],
)
def test_malformed_point_messages_are_rejected(message: Any) -> None:
    with pytest.raises(ComputationFailed, match="party 'gamma' sent a malformed message"):
        service.parse_points(message, 3, "gamma")


def test_column_items_normalises_and_refuses() -> None:
    items = service.column_items(np.array([2.0, float("nan"), -0.0, 2.0, 2.0**53]))
    assert sorted(items, key=service.sort_key) == [0, 2, 2**53]
    assert all(type(v) is int for v in items)
    for bad in (1e30, float("inf")):
        with pytest.raises(BadRequest, match=r"id column 'v' holds numbers that are infinite"):
            service.column_items(np.array([1.0, bad]), "v")
    # a fraction (a measured value) is an item as its exact float
    assert service.column_items(np.array([2.5, 2.5, 1.0])) in ([2.5, 1], [1, 2.5])
    assert sorted(service.column_items(np.array(["b", "a", "b"]))) == ["a", "b"]
    assert sorted(service.column_items(np.array([3, 1, 3], dtype=np.uint8))) == [1, 3]
    with pytest.raises(BadRequest, match="not booleans"):
        service.column_items(np.array([True, False]))
    with pytest.raises(BadRequest, match="not a matrix"):
        service.column_items(np.zeros((3, 2)))
