"""The SDK's testing kit: every party's real job function, in memory.

Built-in jobs of the ``smpc`` microservice run on it as a plugin's would:
their results must be the right ones, a party that fails must end the
computation for the others with its reason, and what a server would refuse
(an undeclared input, a value that cannot travel, a reused session) must be
refused here too.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from fdrtd_server import sdk
from fdrtd_server.errors import (
    BadRequest,
    CohortTooSmall,
    ComputationFailed,
    Conflict,
    NotFound,
    PartyTimeout,
)
from fdrtd_server.microservice import JobContext
from fdrtd_server.sdk.testing import MemoryFederation, MemoryPeerSession
from protocols.smpc.service import service as smpc

DATA = {
    "alpha": {"v": [1.0, 2.0, 3.0, 4.0]},
    "beta": {"v": [10.0, 20.0, 30.0]},
    "gamma": {"v": [100.0, 200.0, 300.0, 400.0, 500.0]},
}


def test_secure_sum_of_the_real_job_matches_numpy() -> None:
    results = MemoryFederation(datasets=DATA).run_sync(smpc, "secure_sum", column="v")
    expected = sum(float(np.sum(columns["v"])) for columns in DATA.values())
    assert results == {party: {"sum": expected, "count": 12} for party in DATA}


def test_count_and_the_messages_that_travelled() -> None:
    fed = MemoryFederation(datasets=DATA)
    assert fed.run_sync(smpc, "count") == {party: {"count": 12} for party in DATA}
    # one round of masked counts (with the public metadata), then the end round
    assert fed.tags("alpha") == ["sum.1.0", "sum.1.0", "end", "end"]
    masked = [m.value["v"] for m in fed.log if m.tag != "end"]
    assert all(value.tolist() != [12] for value in masked)
    # every party received what the others sent, through the wire codec (read-only arrays)
    received = fed.contexts["beta"].sessions[0].received
    assert [sender for sender, _, _ in received] == ["alpha", "gamma", "alpha", "gamma"]
    assert not received[0][2]["v"].flags.writeable


def test_a_party_that_fails_ends_the_computation_for_the_others() -> None:
    data = {**DATA, "beta": {"v": ["a", "b", "c"]}}  # beta's column is text
    fed = MemoryFederation(datasets=data)
    with pytest.raises(BadRequest, match="must be numeric"):
        fed.run_sync(smpc, "secure_sum", column="v")
    outcomes = asyncio.run(fed.outcomes(smpc, "secure_sum", column="v"))
    assert isinstance(outcomes["beta"], BadRequest)
    for party in ("alpha", "gamma"):
        assert isinstance(outcomes[party], ComputationFailed)
        assert str(outcomes[party].message).startswith("party 'beta' ended the computation: ")
    assert fed.aborted() == ["beta"]


def test_a_refusal_every_party_reaches_alike_is_raised_by_each() -> None:
    fed = MemoryFederation(datasets=DATA, env={"min_cohort": 20})
    outcomes = asyncio.run(fed.outcomes(smpc, "count"))
    assert all(isinstance(outcome, CohortTooSmall) for outcome in outcomes.values())
    assert fed.aborted() == []  # a collective refusal needs no abort message


def test_the_strictest_minimum_cohort_of_any_party_holds() -> None:
    fed = MemoryFederation(datasets=DATA, envs={"gamma": {"min_cohort": 13}})
    with pytest.raises(CohortTooSmall):
        fed.run_sync(smpc, "secure_sum", column="v")


def test_inputs_are_checked_against_the_declaration_first() -> None:
    fed = MemoryFederation(datasets=DATA)
    inputs = {"alpha": {"colum": "v"}}  # a misspelling at one party
    outcomes = asyncio.run(fed.outcomes(smpc, "secure_sum", inputs, column="v"))
    assert isinstance(outcomes["alpha"], BadRequest)
    assert "'colum' is not an input" in outcomes["alpha"].message
    assert "party 'alpha' ended the computation" in outcomes["beta"].message
    with pytest.raises(BadRequest, match="'frac_bits'"):
        fed.run_sync(smpc, "secure_sum", column="v", frac_bits=99)


def test_a_party_that_never_sends_times_out_naming_it() -> None:
    async def job(ctx: JobContext, inputs: dict[str, Any]) -> int:
        async with sdk.session_for(ctx) as peers:
            if peers.me == "beta":
                return 0  # leaves without sending anything
            return len(await peers.exchange("hello", peers.me))

    outcomes = asyncio.run(MemoryFederation(timeout=0.2).outcomes(job))
    assert isinstance(outcomes["alpha"], PartyTimeout)
    assert "party 'beta' did not send its 'hello' message" in outcomes["alpha"].message


def test_a_result_or_a_message_that_cannot_travel_is_refused() -> None:
    async def job(ctx: JobContext, inputs: dict[str, Any]) -> Any:
        return {"value": object()}

    with pytest.raises(TypeError, match="cannot encode"):
        MemoryFederation().run_sync(job)

    async def chatty(ctx: JobContext, inputs: dict[str, Any]) -> Any:
        async with sdk.session_for(ctx) as peers:
            await peers.exchange("x", {1, 2} if peers.me == "alpha" else object())

    with pytest.raises(TypeError):
        MemoryFederation().run_sync(chatty)


def test_results_come_back_as_a_client_receives_them() -> None:
    async def job(ctx: JobContext, inputs: dict[str, Any]) -> Any:
        return {"v": np.arange(3.0), "t": (1, 2), "n": np.int64(5)}

    result = MemoryFederation(("a", "b")).run_sync(job)["a"]
    assert result["t"] == [1, 2] and result["n"] == 5 and type(result["n"]) is int
    assert np.array_equal(result["v"], [0.0, 1.0, 2.0])


def test_a_session_is_opened_once() -> None:
    async def job(ctx: JobContext, inputs: dict[str, Any]) -> None:
        async with sdk.session_for(ctx):
            pass
        async with sdk.session_for(ctx):
            pass

    with pytest.raises(Conflict, match="already used"):
        MemoryFederation(("a", "b")).run_sync(job)


def test_datasets_by_name_and_columns_as_asked() -> None:
    seen: dict[str, Any] = {}

    async def job(ctx: JobContext, inputs: dict[str, Any]) -> int:
        dataset = await ctx.load_dataset(inputs["data"], columns=["x"])
        seen[ctx.env.server] = dataset
        count = await ctx.load_dataset(inputs["data"], columns=[])
        await ctx.progress(1.0)
        return count.rows

    datasets = {
        "a": {"visits": {"x": [[1, 2], [3, 4]], "y": ["p", "q"]}, "other": {"z": [1]}},
        "b": {"visits": {"x": [[5, 6]], "y": ["r"]}},
    }
    fed = MemoryFederation(("a", "b"), datasets=datasets)
    assert fed.run_sync(job, data="visits") == {"a": 2, "b": 1}
    assert seen["a"].columns["x"].shape == (2, 2) and set(seen["a"].columns) == {"x"}
    assert fed.contexts["b"].reported == [1.0]
    with pytest.raises(NotFound, match="no dataset named 'nothing'"):
        fed.run_sync(job, data="nothing")


def test_a_tampered_message_reaches_the_receiver_changed() -> None:
    def tamper(sender: str, to: str, tag: str, value: Any) -> Any:
        return "forged" if sender == "a" and tag == "x" else value

    async def job(ctx: JobContext, inputs: dict[str, Any]) -> Any:
        async with sdk.session_for(ctx) as peers:
            return await peers.exchange("x", peers.me)

    results = MemoryFederation(("a", "b"), tamper=tamper).run_sync(job)
    assert results["b"] == {"a": "forged", "b": "b"}


def test_the_federation_refuses_what_a_server_would_not_start_with() -> None:
    with pytest.raises(TypeError):
        MemoryFederation(env={"min_cohrt": 1})  # a misspelt environment field
    with pytest.raises(ValueError, match="no party named delta"):
        MemoryFederation(datasets={"delta": {"v": [1]}})
    with pytest.raises(ValueError, match="at least two parties"):
        MemoryFederation(("solo",))
    with pytest.raises(ValueError, match="has no job 'nothing'"):
        MemoryFederation().run_sync(smpc, "nothing")


def test_peer_sessions_are_what_the_smpc_engine_needs() -> None:
    async def job(ctx: JobContext, inputs: dict[str, Any]) -> float:
        async with sdk.session_for(ctx) as peers:
            assert isinstance(peers, MemoryPeerSession)
            smpc_session = sdk.SmpcSession(peers)  # type: ignore[arg-type]
            await smpc_session.setup({"k": 1})
            total = await smpc_session.sum_fixed(np.array([peers.index + 0.5]))
            return float(total[0])

    assert MemoryFederation().run_sync(job) == dict.fromkeys(("alpha", "beta", "gamma"), 4.5)
