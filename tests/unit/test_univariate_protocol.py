"""``univariate`` and ``bivariate`` end to end on the real job functions, in memory.

What the servers open matters as much as what the client gets: the sums
behind the harmonic and geometric means must not be opened unless the joint
minimum is positive (else a party's own sums of 1/x and log x leak while the
result shows NaN), and the sums must be exact whatever the scale of the data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from memory_peers import Peers, run_job

from fdrtd_server.sdk import ring
from protocols.smpc import service
from protocols.smpc.service import bivariate, univariate


@pytest.fixture(autouse=True)
def in_memory_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "session_for", lambda ctx: ctx.peers)


def opened_sums(views: dict[str, Peers], tag: str) -> list[float]:
    """What the parties' masked values for ``tag`` open to (as every party sees it)."""
    wire = next(iter(views.values())).wire
    sent: dict[str, list[bytes]] = {m.sender: m.value for m in wire.sent if m.tag == tag}
    assert set(sent) == set(views)  # every party's masked value, once each
    modulus = 1 << ring.EXACT_RING_BITS
    count = len(next(iter(sent.values())))
    total = [
        sum(int.from_bytes(value[k], "big") for value in sent.values()) % modulus
        for k in range(count)
    ]
    return ring.decode_big(total, frac_bits=ring.EXACT_FRAC_BITS, ring_bits=ring.EXACT_RING_BITS)


def last_bigsum(views: dict[str, Peers]) -> str:
    tags = [t for _, t, _ in views[next(iter(views))].received if t.startswith("bigsum.")]
    return tags[-1]


def test_no_party_s_reciprocal_or_log_sums_are_opened_when_another_holds_a_non_positive_value() -> (
    None
):
    inputs: dict[str, dict[str, Any]] = {
        "a": {"data": {"v": [-1.0, 2.0, 3.0]}, "column": "v"},
        "b": {"data": {"v": [4.0, 5.0, 8.0]}, "column": "v"},
    }
    results, views = run_job(univariate, inputs, min_cohort=1)
    for result in results.values():
        assert not isinstance(result, BaseException), result
        assert math.isnan(result["harmonic_mean"]) and math.isnan(result["geometric_mean"])
    opened = opened_sums(views, last_bigsum(views))
    assert opened[0] == 6.0 and opened[1] == pytest.approx(0.0, abs=1e-12)  # count, centred sum
    assert opened[7] == 0.0 and opened[8] == 0.0  # b's 0.575 and log(160) never opened


def test_positive_data_gives_the_harmonic_and_geometric_means() -> None:
    a, b = [1e-300, 2.0, 3.0], [4.0, 5.0, 8.0]
    inputs = {"a": {"data": {"v": a}, "column": "v"}, "b": {"data": {"v": b}, "column": "v"}}
    results, _ = run_job(univariate, inputs, min_cohort=1)
    everything = np.array(a + b)
    for result in results.values():
        assert result["harmonic_mean"] == pytest.approx(6 / np.sum(1 / everything), rel=1e-12)
        assert result["geometric_mean"] == pytest.approx(math.exp(np.log(everything).mean()))


@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e9])
def test_statistics_match_numpy_at_any_scale(scale: float) -> None:
    rng = np.random.default_rng(4)
    a, b, c = (rng.normal(0, scale, size) for size in (40, 25, 60))
    inputs = {
        name: {"data": {"v": values.tolist()}, "column": "v"}
        for name, values in zip("abc", (a, b, c), strict=True)
    }
    results, _ = run_job(univariate, inputs, min_cohort=1)
    everything = np.concatenate([a, b, c])
    d = everything - everything.mean()
    m2, m4 = np.mean(d**2), np.mean(d**4)
    for result in results.values():
        assert result["variance"] == pytest.approx(np.var(everything, ddof=1), rel=1e-12)
        assert result["kurtosis"] == pytest.approx(m4 / m2**2, rel=1e-9)
        assert (result["minimum"], result["maximum"]) == (everything.min(), everything.max())
    pairs = {
        name: {"data": {"x": values.tolist(), "y": (3 * values + scale).tolist()}}
        for name, values in zip("abc", (a, b, c), strict=True)
    }
    cross, _ = run_job(bivariate, pairs, min_cohort=1, x="x", y="y")
    for result in cross.values():
        assert not isinstance(result, BaseException), result
        assert result["correlation_coefficient"] == pytest.approx(1.0, rel=1e-12)
        assert result["regression_slope"] == pytest.approx(3.0, rel=1e-12)
