"""``SmpcSession.count_and_sum``: the count and a sum in one round where the cohort allows.

The parties run the real engine through the in-memory peers of
``memory_peers``, which keep every message a party receives, so that a test
can count the rounds and take a party's place to see what its view gives
away.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from memory_peers import SESSION, Peers, run_parties, seed

from fdrtd_server.errors import CohortTooSmall, ComputationFailed
from fdrtd_server.sdk import ring
from fdrtd_server.sdk.smpc import CHUNK, SmpcSession

Vet = Callable[[str], Callable[[int], None]]


def cohort(minimum: int) -> Vet:
    """Every party refuses a joint count below ``minimum``, as ``check_joint_cohort`` does."""

    def for_party(_: str) -> Callable[[int], None]:
        def vet(total: int) -> None:
            if total < minimum:
                raise CohortTooSmall(minimum)

        return vet

    return for_party


def run(
    inputs: dict[str, tuple[int, Any, bool]], vet: Vet | None = None, *, big: bool = False
) -> tuple[dict[str, Any], dict[str, Peers]]:
    """Run ``count_and_sum`` (``count_and_sum_big`` if ``big``) for every party.

    ``inputs[party] = (rows, x, ready)``.

    Returns each party's outcome (``(count, sum)`` or the exception) and views.
    """
    checks = vet or cohort(0)

    async def step(smpc: SmpcSession, name: str) -> tuple[int, Any]:
        rows, x, ready = inputs[name]
        if big:
            return await smpc.count_and_sum_big(rows, x, ready=ready, vet=checks(name))
        return await smpc.count_and_sum(rows, x, ready=ready, vet=checks(name))

    return run_parties(list(inputs), step)


def encoded(values: Any, parties: int = 3) -> Any:
    return ring.encode_fixed(np.asarray(values, dtype=np.float64), parties=parties)


def tags(view: Peers) -> list[str]:
    return sorted({tag for _, tag, _ in view.received})


def test_every_party_ready_takes_one_round() -> None:
    inputs = {
        "a": (4, encoded([1.5, -2.0]), True),
        "b": (3, encoded([0.25, 8.0]), True),
        "c": (5, encoded([-1.0, 1.0]), True),
    }
    outcomes, views = run(inputs, cohort(3))
    for count, total in outcomes.values():
        assert count == 12
        np.testing.assert_array_equal(ring.decode_fixed(total), [0.75, 7.0])
    for view in views.values():
        assert tags(view) == ["sum.1"]  # the count's round carried the sums: one message each
        assert len(view.received) == 2


def test_parties_that_hold_back_send_after_the_count() -> None:
    # a meets the cohort of 3 alone; b and c do not, so they wait for the joint count
    inputs = {
        "a": (3, encoded(6.0), True),
        "b": (1, encoded(2.5), False),
        "c": (0, encoded(0.0), False),
    }
    outcomes, views = run(inputs, cohort(3))
    for count, total in outcomes.values():
        assert (count, float(ring.decode_fixed(total))) == (4, 8.5)
    assert tags(views["a"]) == ["sum.1", "sum.2.0"]
    # the late round comes from b and c only; a's sum went with its count
    late = sorted(sender for sender, tag, _ in views["b"].received if tag == "sum.2.0")
    assert late == ["c"]
    assert all(value["sum"] is None for sender, tag, value in views["a"].received if tag == "sum.1")


def test_a_refused_count_releases_no_held_back_input() -> None:
    inputs = {
        "a": (3, encoded(6.0), True),
        "b": (1, encoded(1000.0), False),
        "c": (1, encoded(2000.0), False),
    }
    outcomes, views = run(inputs, cohort(10))
    for outcome in outcomes.values():
        assert isinstance(outcome, CohortTooSmall)
    for view in views.values():
        assert tags(view) == ["sum.1"]  # nobody sent anything after the refusal


def test_what_a_held_back_party_can_unmask() -> None:
    """It learns the ready parties' sum (an aggregate their policies allow), not one input.

    a and b meet their own minimum cohorts; c's policy asks for 100 records,
    so c holds back and every party refuses (all apply the strictest declared
    minimum). From a's and b's masked sums and its own pairwise seeds, c
    computes a + b, but a's masked sum alone stays masked by the seed a
    shares with b.
    """
    inputs = {
        "a": (5, encoded(6.0), True),
        "b": (5, encoded(7.0), True),
        "c": (1, encoded(0.0), False),
    }
    outcomes, views = run(inputs, cohort(100))
    assert all(isinstance(outcome, CohortTooSmall) for outcome in outcomes.values())
    first = {sender: value for sender, tag, value in views["c"].received if tag == "sum.1"}
    masks = {
        party: ring.prg_uint64(seed(party, "c"), f"{SESSION}|sum.2|c|{party}".encode(), 1)
        - ring.prg_uint64(seed(party, "c"), f"{SESSION}|sum.2|{party}|c".encode(), 1)
        for party in ("a", "b")
    }
    unmasked = {party: first[party]["sum"][0] - masks[party] for party in ("a", "b")}
    together = ring.decode_fixed(unmasked["a"] + unmasked["b"])
    assert float(together[0]) == 13.0
    assert float(ring.decode_fixed(unmasked["a"])[0]) != 6.0


def test_a_large_vector_waits_for_the_count() -> None:
    size = CHUNK + 5
    x = {name: np.full(size, k + 1.0) for k, name in enumerate("ab")}
    inputs = {name: (4, encoded(values, 2), True) for name, values in x.items()}
    outcomes, views = run(inputs)
    for count, total in outcomes.values():
        assert count == 8
        np.testing.assert_array_equal(ring.decode_fixed(total), np.full(size, 3.0))
    assert tags(views["a"]) == ["sum.1", "sum.2.0", "sum.2.1"]


@pytest.mark.parametrize(
    "bad",
    [
        {"count": None, "sum": None, "public": {}},
        {"count": np.zeros(2, dtype=np.uint64), "sum": None, "public": {}},
        {"count": np.zeros(1, dtype=np.uint64), "sum": np.zeros(3, np.uint64), "public": {}},
        "not a message",
    ],
    ids=["no count", "two counts", "short sum", "garbage"],
)
def test_a_malformed_first_message_names_its_sender(bad: Any) -> None:
    parties = ["a", "b"]
    boxes: defaultdict[Any, asyncio.Queue[Any]] = defaultdict(asyncio.Queue)
    me = Peers(boxes, "a", parties)
    boxes[("a", "b", "sum.1")].put_nowait(bad)

    async def main() -> tuple[int, Any]:
        smpc = SmpcSession(me)  # type: ignore[arg-type]
        await smpc.setup({}, defer=True)
        return await smpc.count_and_sum(4, encoded([1.0, 2.0], 2), ready=True, vet=lambda _: None)

    with pytest.raises(ComputationFailed, match=r"party 'b' sent (a )?malformed"):
        asyncio.run(main())


def test_big_ring_sums_exactly_in_one_round_when_all_are_ready() -> None:
    inputs = {
        "a": (4, [1e15, 0.1], True),
        "b": (3, [1.0, 0.2], True),
        "c": (5, [-1e15, 0.3], True),
    }
    outcomes, views = run(inputs, cohort(3), big=True)
    for count, sums in outcomes.values():
        assert count == 12
        assert sums[0] == 1.0  # exact: no float rounding of 1e15 + 1 - 1e15
        assert sums[1] == pytest.approx(0.6, abs=1e-15)
    for view in views.values():
        assert tags(view) == ["sum.1"]


def test_big_ring_holds_back_until_the_count_has_passed() -> None:
    inputs = {"a": (3, [6.0], True), "b": (1, [2.5], False), "c": (0, [0.0], False)}
    outcomes, views = run(inputs, cohort(3), big=True)
    for count, sums in outcomes.values():
        assert (count, sums) == (4, [8.5])
    assert tags(views["a"]) == ["bigsum.2", "sum.1"]
    refused, views = run(inputs, cohort(10), big=True)
    assert all(isinstance(outcome, CohortTooSmall) for outcome in refused.values())
    for view in views.values():
        assert tags(view) == ["sum.1"]  # b's and c's sums never left them


def test_sum_fixed_for_plugins_adds_floats_in_one_round() -> None:
    """``sum_fixed``, the plain fixed-point sum a plugin may use after its own count."""
    x = {"a": [1.25, -3.0], "b": [2.0, 0.5], "c": [-0.25, 10.0]}

    async def step(smpc: SmpcSession, name: str) -> Any:
        return await smpc.sum_fixed(x[name])

    outcomes, views = run_parties(list(x), step)
    for total in outcomes.values():
        np.testing.assert_array_equal(total, [3.0, 7.5])
    for view in views.values():
        assert tags(view) == ["sum.1.0"]
