"""The example plugin on the SDK's testing kit: every party's real job, in memory."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

# these tests also run from a checkout in which the plugin is not installed (no
# conftest.py here: the main suite's `from conftest import ...` must find its own)
if importlib.util.find_spec("vector_mean") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vector_mean import service

from fdrtd_server.sdk import BadRequest, CohortTooSmall, ComputationFailed, OutOfRange
from fdrtd_server.sdk.testing import MemoryFederation

RNG = np.random.default_rng(7)
VECTORS = {
    "alpha": RNG.normal(size=(5, 3)),
    "beta": RNG.normal(size=(4, 3)) * 100,
    "gamma": RNG.normal(size=(6, 3)) - 50,
}


def federation(envs: dict[str, dict[str, int]] | None = None) -> MemoryFederation:
    """The three parties, each with its column ``x`` of 3-vectors."""
    datasets = {party: {"x": rows} for party, rows in VECTORS.items()}
    return MemoryFederation(datasets=datasets, envs=envs)


def test_the_mean_is_the_mean_of_all_records() -> None:
    results = federation().run_sync(service, "mean", column="x")
    expected = np.concatenate(list(VECTORS.values())).mean(axis=0)
    for result in results.values():
        assert result["count"] == 15
        np.testing.assert_allclose(result["mean"], expected, atol=1e-6)


def test_several_numeric_columns_form_the_vectors() -> None:
    datasets = {
        party: {"a": rows[:, 0], "b": rows[:, 1], "label": ["t"] * len(rows)}
        for party, rows in VECTORS.items()
    }
    results = MemoryFederation(datasets=datasets).run_sync(service, "mean", column=["a", "b"])
    expected = np.concatenate(list(VECTORS.values()))[:, :2].mean(axis=0)
    np.testing.assert_allclose(results["beta"]["mean"], expected, atol=1e-6)


def test_rows_that_are_not_finite_are_left_out() -> None:
    datasets = {party: {"x": rows} for party, rows in VECTORS.items()}
    datasets["alpha"] = {"x": np.vstack([VECTORS["alpha"], [[np.nan, 1.0, 1.0]], [[np.inf] * 3]])}
    results = MemoryFederation(datasets=datasets).run_sync(service, "mean", column="x")
    assert results["alpha"]["count"] == 15
    expected = np.concatenate(list(VECTORS.values())).mean(axis=0)
    np.testing.assert_allclose(results["gamma"]["mean"], expected, atol=1e-6)


def test_a_party_that_refuses_its_input_ends_it_for_everyone() -> None:
    datasets = {party: {"x": rows} for party, rows in VECTORS.items()}
    datasets["beta"] = {"x": np.array(["a", "b", "c"])}
    fed = MemoryFederation(datasets=datasets)
    with pytest.raises(BadRequest, match="must be numeric"):
        fed.run_sync(service, "mean", column="x")
    outcomes = asyncio.run(fed.outcomes(service, "mean", column="x"))
    assert "party 'beta' ended the computation" in outcomes["alpha"].message


def test_below_the_minimum_cohort_nothing_is_opened() -> None:
    fed = federation(envs={"gamma": {"min_cohort": 16}})
    with pytest.raises(CohortTooSmall):
        fed.run_sync(service, "mean", column="x")
    # only the masked counts travelled: gamma's own records are below its minimum,
    # so it never sent its sum, and the others' sums alone open to nothing of gamma's
    assert all(m.value.get("sum") is None for m in fed.log if m.sender == "gamma")


def test_a_sum_too_large_for_the_ring_is_a_4xx_before_anything_is_sent() -> None:
    datasets = {party: {"x": rows} for party, rows in VECTORS.items()}
    datasets["alpha"] = {"x": np.full((5, 3), 1e12)}  # with frac_bits 20, 3 parties: < 2.9e12
    fed = MemoryFederation(datasets=datasets)
    with pytest.raises(OutOfRange, match="out of range") as refused:
        fed.run_sync(service, "mean", column="x")
    assert refused.value.status == 422
    assert fed.aborted() == ["alpha"]  # the refusing party told the others
    assert not [m for m in fed.log if m.sender == "alpha"]  # and sent nothing else
    # with fewer fractional bits the same data fits
    results = fed.run_sync(service, "mean", column="x", frac_bits=16)
    assert results["alpha"]["count"] == 15


def test_the_parties_must_agree_on_the_dimension() -> None:
    datasets = {party: {"x": rows} for party, rows in VECTORS.items()}
    datasets["gamma"] = {"x": VECTORS["gamma"][:, :2]}
    with pytest.raises(ComputationFailed, match="disagree on 'dimension'"):
        MemoryFederation(datasets=datasets).run_sync(service, "mean", column="x")


def test_frac_bits_must_agree() -> None:
    fed = federation()
    inputs = {"alpha": {"frac_bits": 10}}
    with pytest.raises(ComputationFailed, match="disagree on 'frac_bits'"):
        fed.run_sync(service, "mean", inputs, column="x")


def test_inputs_outside_the_declaration_are_refused() -> None:
    with pytest.raises(BadRequest, match="'frac_bits'"):
        federation().run_sync(service, "mean", column="x", frac_bits=41)


def test_two_parties_need_the_owners_switch() -> None:
    """With two parties each would learn the other's sum: off unless both owners allow it."""
    datasets = {party: {"x": VECTORS[party]} for party in ("alpha", "beta")}
    with pytest.raises(Exception, match="allow_two_parties"):
        MemoryFederation(parties=("alpha", "beta"), datasets=datasets).run_sync(
            service, "mean", column="x"
        )
    allowed = {"plugin_policy": {"vector_mean": {"allow_two_parties": True}}}
    results = MemoryFederation(parties=("alpha", "beta"), datasets=datasets, env=allowed).run_sync(
        service, "mean", column="x"
    )
    expected = np.concatenate([VECTORS["alpha"], VECTORS["beta"]]).mean(axis=0)
    np.testing.assert_allclose(results["alpha"]["mean"], expected, atol=1e-6)
