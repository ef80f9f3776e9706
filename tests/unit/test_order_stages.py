"""The secure comparisons of ``order`` refuse a malformed message by its stage, naming the sender.

The shifter (the first party) and the evaluator (the last) exchange blinded
points each round; every other message is a masked count or the round's
bits. Each is checked against its stage's form (``protocols.smpc.order.Stage``)
before the comparison uses it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from memory_peers import run_job

from fdrtd_server.errors import ComputationFailed
from protocols.smpc import order


@pytest.fixture(autouse=True)
def in_memory_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The job functions open the in-memory session of their context."""
    monkeypatch.setattr(order, "session_for", lambda ctx: ctx.peers)


@pytest.mark.parametrize(
    ("stage", "cheat", "honest", "bad", "words"),
    [
        ("order.count", "o1", "o2", np.zeros(5, np.uint64), "count"),
        ("order.count", "o1", "o2", {"v": 1}, "count"),
        ("order.blocks", "o0", "o2", b"\0" * 33, "blocks message"),
        ("order.query", "o2", "o0", "points", "query message"),
        ("order.answer", "o0", "o2", b"", "answer message"),
        ("order.bits", "o2", "o1", np.zeros(1, np.int8), "comparison bits"),
    ],
)
def test_a_malformed_comparison_message_is_refused_naming_its_stage(
    stage: str, cheat: str, honest: str, bad: Any, words: str
) -> None:
    def tamper(sender: str, to: str, tag: str, value: Any) -> Any:
        return bad if sender == cheat and tag.rsplit(".", 1)[0] == stage else value

    data = {f"o{j}": np.arange(10.0) + j for j in range(3)}
    own = {name: {"data": {"x": values}} for name, values in data.items()}
    results, _ = run_job(order.median, own, tamper=tamper)
    assert isinstance(results[honest], ComputationFailed), results
    assert f"party '{cheat}' sent a malformed {words} (stage '{stage}')" in str(results[honest])
