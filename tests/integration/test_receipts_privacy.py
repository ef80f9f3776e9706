"""Receipts of differentially private results, on three real servers.

Each DP party's result carries its own ``privacy`` statement (its spend, its
noise, its budget), so the parties' values differ in that field and each
states its own ``output_sha256``; they agree on ``joint_sha256``, the digest
of the value without it. The client verifies such results by default: the
value it returns against its party's ``output_sha256`` and the joint digest,
every party's value when it fetches them all. A saved receipt verifies
offline; a value whose privacy block was altered does not.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fdrtd_client import ReceiptError, receipts
from fdrtd_server.local import LocalFederation


def _policy(epsilon: float, dp: bool = True) -> str:
    return f"""
version = "receipts-dp"

[defaults.privacy]
dp = {str(dp).lower()}
epsilon = {epsilon}
analyst_epsilon = 100.0
total_epsilon = 200.0

[defaults.bounds]
value = [0, 50]
"""


# every party's 'cohort' is DP, each with its own epsilon: three different privacy statements
POLICIES = {"alpha": _policy(0.5), "beta": _policy(0.25), "gamma": _policy(1.0)}
VALUES = {
    "alpha": np.arange(1.0, 41.0),
    "beta": np.linspace(3.0, 9.0, 25),
    "gamma": np.array([2.5, 7.0, 1.0, 4.0, 8.5, 3.0, 6.0, 9.0, 30.0, 12.0]),
}


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    with LocalFederation(tmp_path_factory.mktemp("receipts-dp"), policy=POLICIES) as federation:
        for name, values in VALUES.items():
            federation.servers[name].publish(values, "cohort")
        yield federation


def _cli_verify(receipt: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """``fdrtd-server receipt verify RECEIPT --home HOME``, as an auditor runs it."""
    command = ["receipt", "verify", str(receipt), "--home", str(home)]
    return subprocess.run(
        [sys.executable, "-m", "fdrtd_server", *command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _check(job: Any, values: list[Any], parties: list[str]) -> dict[str, Any]:
    """The verified receipt: cosigned by all, one joint digest, each value its party's."""
    receipt = job.receipt
    assert receipt is not None and set(receipt["cosignatures"]) == set(parties)
    statements = {name: entry["statement"] for name, entry in receipt["statements"].items()}
    for name, value in zip(parties, values, strict=False):
        assert statements[name]["output_sha256"] == receipts.output_sha256(value)
        assert statements[name]["joint_sha256"] == receipt["joint_sha256"]
        assert receipts.joint_sha256(value) == receipt["joint_sha256"]
    return dict(receipt)


def test_a_count_with_one_dp_party_verifies_by_default(local: LocalFederation) -> None:
    """The reviewer's case: alpha's dataset is DP, beta's and gamma's uploads are not."""
    with local.federation() as fed:
        own = fed.upload({"beta": VALUES["beta"], "gamma": VALUES["gamma"]})
        parties = {"alpha": {"data": "cohort"}, **{n: {"data": h} for n, h in own.items()}}
        job = fed.compute("smpc", "count", parties)
        value = job.result(timeout=120)  # raised ReceiptError 'common' before joint_sha256
        assert set(value["privacy"]) == {"cohort"} and isinstance(value["count"], int)
        receipt = _check(job, [value], fed.parties)
        # all three values: only alpha's holds a privacy block, and each verifies as its own
        every = job.results(timeout=120)
        assert "privacy" not in every[1] and "privacy" not in every[2]
        assert every[1] == every[2] == receipts.joint_value(value)
        _check(job, every, fed.parties)
        outputs = {e["statement"]["output_sha256"] for e in receipt["statements"].values()}
        assert len(outputs) == 2


@pytest.mark.parametrize("function", ["count", "secure_sum"])
def test_a_result_of_three_dp_parties_verifies_and_an_altered_privacy_block_fails(
    local: LocalFederation, tmp_path: Path, function: str
) -> None:
    options = {"column": "value"} if function == "secure_sum" else {}
    with local.federation() as fed:
        job = fed.compute("smpc", function, fed.dataset("cohort"), **options)
        every = job.results(timeout=120)
        keys = fed.receipt_keys()
    spent = [value["privacy"]["cohort"]["epsilon"] for value in every]
    assert spent == [0.5, 0.25, 1.0]  # each party states its own spend
    receipt = _check(job, every, list(local.servers))
    by_party = dict(zip(local.servers, every, strict=True))
    assert receipts.verify_receipt(receipt, keys, values=by_party) == list(local.servers)

    # a party's privacy block altered in its value (its spend understated): refused
    altered = copy.deepcopy(by_party["beta"])
    altered["privacy"]["cohort"]["epsilon"] = 0.0
    with pytest.raises(ReceiptError) as caught:
        receipts.verify_receipt(receipt, keys, values={**by_party, "beta": altered})
    assert caught.value.check == "output" and "beta" in str(caught.value)
    # the joint digest altered in the receipt: the statements no longer agree with it
    forged = {**copy.deepcopy(receipt), "joint_sha256": receipts.joint_sha256({"count": 0})}
    with pytest.raises(ReceiptError) as caught:
        receipts.verify_receipt(forged, keys)
    assert caught.value.check == "common"

    # saved, it verifies offline with a server's home (receipt_version 2)
    assert receipt["receipt_version"] == 2
    home = local.servers["gamma"].home
    done = _cli_verify(receipts.save(receipt, tmp_path / "dp.json"), home)
    assert done.returncode == 0, done.stderr
    assert f"smpc.{function}" in done.stdout and "joint sha256" in done.stdout
    done = _cli_verify(receipts.save(forged, tmp_path / "forged.json"), home)
    assert done.returncode == 1 and "'common'" in done.stderr


def test_a_value_of_another_party_does_not_pass_for_the_first(local: LocalFederation) -> None:
    """The client checks the value against the party that sent it, privacy block and all."""
    with local.federation() as fed:
        job = fed.compute("smpc", "count", fed.dataset("cohort"))
        every = job.results(timeout=120)
        keys = fed.receipt_keys()
    with pytest.raises(ReceiptError) as caught:
        receipts.verify_receipt(job.receipt, keys, values={"alpha": every[2]})
    assert caught.value.check == "output" and "alpha" in str(caught.value)
