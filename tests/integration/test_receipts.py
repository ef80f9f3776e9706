"""Signed result receipts end to end, on three real servers.

The client verifies every result's receipt by default: a single server's
statement, or the joint receipt of a multi-party computation that every
party has cosigned. A saved receipt verifies offline with ``fdrtd-server
receipt verify``; one altered, or checked against a federation file that
holds another key for a party, fails and names the check. The cosign route
signs only the caller's own, unaltered statement of a finished job, and
answers everything else with a 4xx problem document.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from fdrtd_client import Client, Federation, ReceiptError, receipts, wire
from fdrtd_server.config import TokenStore
from fdrtd_server.identity import Identity, PeerEntry, save_federation
from fdrtd_server.local import LocalFederation

DATA = {
    "alpha": np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
    "beta": np.array([[0.5, -1.0], [2.0, 2.0], [7.0, 1.0]]),
    "gamma": np.array([[1.5, 0.0], [0.0, 3.0], [2.0, 9.0]]),
}


def inputs(federation: Federation) -> dict[str, dict[str, str]]:
    """Each party's data handle, uploaded to its own server."""
    return {name: {"data": handle} for name, handle in federation.upload(DATA).items()}


def federation_file(local: LocalFederation, path: Path, fake: str | None = None) -> Path:
    """A federation file of every party; ``fake``'s key replaced by a fresh one."""
    entries = []
    for name, server in local.servers.items():
        identity = (
            Identity.generate(name)
            if name == fake
            else Identity.load(server.home / "identity", name)
        )
        entries.append(identity.public_entry(server.url))
    save_federation(path, entries)
    return path


def cli_verify(receipt: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fdrtd_server", "receipt", "verify", str(receipt), *options],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def joint(trio: LocalFederation) -> tuple[Federation, Any, Any]:
    """One secure sum of the three parties' arrays: (federation, its job, its value)."""
    federation = trio.federation()
    job = federation.compute("smpc", "secure_sum", inputs(federation), elementwise=True)
    value = job.result(timeout=45)
    return federation, job, value


def test_a_joint_result_is_verified_and_cosigned_by_default(
    joint: tuple[Federation, Any, Any], trio: LocalFederation, tmp_path: Path
) -> None:
    _, job, value = joint
    np.testing.assert_allclose(value["sum"], sum(DATA.values()), atol=1e-5)
    receipt = job.receipt
    assert receipt is not None
    assert set(receipt["statements"]) == set(receipt["cosignatures"]) == set(trio.servers)
    assert receipt["protocol"] == "smpc.secure_sum"
    assert receipt["session"] == {"id": job.session, "parties": list(trio.servers)}
    for name, entry in receipt["statements"].items():
        statement = entry["statement"]
        assert statement["server"] == name
        assert statement["result"] == job.jobs[list(trio.servers).index(name)].handle
        # the data handle is named; the inline option too; no data value is in it
        assert statement["parameters"]["inputs"]["elementwise"] is True
        assert statement["parameters"]["inputs"]["data"].startswith("d-")
    # the keys pinned from each server's /v1/identity, or a federation file: the same
    keys = receipts.load_keys(federation_file(trio, tmp_path / "federation.toml"))
    assert receipts.verify_receipt(receipt, keys, value=value) == list(trio.servers)


def test_the_saved_receipt_verifies_offline_and_a_tampered_one_names_its_check(
    joint: tuple[Federation, Any, Any], trio: LocalFederation, tmp_path: Path
) -> None:
    _, job, _ = joint
    saved = receipts.save(job.receipt, tmp_path / "receipt.json")
    good = federation_file(trio, tmp_path / "federation.toml")
    done = cli_verify(saved, "--federation", str(good))
    assert done.returncode == 0, done.stderr
    assert "smpc.secure_sum" in done.stdout and "alpha, beta, gamma" in done.stdout
    # a server's home: its federation file (the others) and its own identity
    done = cli_verify(saved, "--home", str(trio.servers["beta"].home))
    assert done.returncode == 0, done.stderr

    altered = copy.deepcopy(job.receipt)
    altered["statements"]["gamma"]["statement"]["datasets"] = {"x": {"id": "0" * 64, "time": "t"}}
    done = cli_verify(receipts.save(altered, tmp_path / "altered.json"), "--federation", str(good))
    assert done.returncode == 1
    assert "'signature'" in done.stderr and "gamma" in done.stderr


def test_a_receipt_signed_by_a_key_not_in_the_federation_file_fails(
    joint: tuple[Federation, Any, Any], trio: LocalFederation, tmp_path: Path
) -> None:
    _, job, _ = joint
    fake = federation_file(trio, tmp_path / "fake.toml", fake="beta")
    with pytest.raises(ReceiptError) as caught:
        receipts.verify_receipt(job.receipt, receipts.load_keys(fake))
    assert caught.value.check == "key"
    done = cli_verify(receipts.save(job.receipt, tmp_path / "r.json"), "--federation", str(fake))
    assert done.returncode == 1 and "'key'" in done.stderr and "beta" in done.stderr
    # the client refuses the result itself when its federation file disagrees
    clients = {name: server.client() for name, server in trio.servers.items()}
    with Federation(clients, federation=fake) as federation:
        started = federation.compute("smpc", "secure_sum", inputs(federation), elementwise=True)
        with pytest.raises(ReceiptError, match="beta"):
            started.result(timeout=45)
        # and the opt-out keeps the result, and an unchecked receipt without cosignatures
        np.testing.assert_allclose(
            started.result(timeout=45, verify_receipt=False)["sum"], sum(DATA.values()), atol=1e-5
        )
        assert started.receipt is not None and started.receipt["cosignatures"] == {}


def test_json_and_msgpack_clients_hash_the_same_output(
    joint: tuple[Federation, Any, Any], trio: LocalFederation
) -> None:
    _, job, _ = joint
    server = trio.servers["alpha"]
    url = f"{server.url}/v1/results/{job.jobs[0].handle}"
    auth = {"authorization": f"Bearer {server.token}"}
    as_json = requests.get(url, headers=auth, timeout=10)
    as_msgpack = requests.get(url, headers={**auth, "accept": wire.MSGPACK}, timeout=10)
    json_view = wire.from_jsonable(as_json.json())
    msgpack_view = wire.unpackb(as_msgpack.content)
    assert isinstance(msgpack_view["value"]["sum"], np.ndarray)
    stated = msgpack_view["receipt"]["statement"]["output_sha256"]
    assert json_view["receipt"] == msgpack_view["receipt"]  # signed the same at every view
    assert receipts.output_sha256(json_view["value"]) == stated
    assert receipts.output_sha256(msgpack_view["value"]) == stated


def test_a_single_server_result_carries_its_statement(
    trio: LocalFederation, tmp_path: Path
) -> None:
    server = trio.servers["alpha"]
    client = server.client()
    data = client.upload(np.arange(12.0).reshape(6, 2))
    job = client.compute("map", "aggregate", data=data)
    value = job.result(timeout=30)
    assert job.receipt is not None and job.receipt["session"] is None
    assert list(job.receipt["statements"]) == ["alpha"] and job.receipt["cosignatures"] == {}
    saved = receipts.save(job.receipt, tmp_path / "single.json")
    assert cli_verify(saved, "--home", str(server.home)).returncode == 0
    # the client checks the value it received against the stated digest
    with pytest.raises(ReceiptError) as caught:
        receipts.verify_receipt(
            job.receipt, client.receipt_keys(), value={**value, "count": value["count"] + 1}
        )
    assert caught.value.check == "output"
    # another server's home knows alpha's key from its federation file
    assert cli_verify(saved, "--home", str(trio.servers["gamma"].home)).returncode == 0


def _cosign(server_url: str, token: str | None, body: Any, raw: bytes | None = None) -> Any:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    if raw is not None:
        return requests.post(
            server_url + "/v1/receipts/cosign", data=raw, headers=headers, timeout=10
        )
    return requests.post(server_url + "/v1/receipts/cosign", json=body, headers=headers, timeout=10)


def test_the_cosign_route_signs_only_the_callers_unaltered_statement(
    joint: tuple[Federation, Any, Any], trio: LocalFederation
) -> None:
    _, job, _ = joint
    server = trio.servers["beta"]
    unsigned = {**copy.deepcopy(job.receipt), "cosignatures": {}}

    answer = _cosign(server.url, server.token, {"receipt": unsigned})
    assert answer.status_code == 200, answer.text
    assert answer.json()["cosignature"] == job.receipt["cosignatures"]["beta"]  # deterministic

    refusals: list[tuple[int, Any, str | None]] = []
    # no token; another analyst's token: the job is not theirs (answered as unknown)
    refusals.append((401, {"receipt": unsigned}, None))
    eve = TokenStore(server.home).add("eve-receipts")
    refusals.append((404, {"receipt": unsigned}, eve))
    # not a receipt at all
    for body in ([], {"receipt": unsigned, "more": 1}, {"receipt": "x"}, {"receipt": {}}):
        refusals.append((400, body, server.token))
    # beta's own statement altered: not the one it signs for the job
    mine = copy.deepcopy(unsigned)
    mine["statements"]["beta"]["statement"]["time"] = "2000-01-01T00:00:00.000+00:00"
    refusals.append((409, {"receipt": mine}, server.token))
    # another party's statement altered: its signature no longer verifies
    theirs = copy.deepcopy(unsigned)
    theirs["statements"]["alpha"]["statement"]["policy_version"] = "forged"
    refusals.append((400, {"receipt": theirs}, server.token))
    # a party left out, a party added, a statement moved under another name
    fewer = copy.deepcopy(unsigned)
    del fewer["statements"]["gamma"]
    refusals.append((400, {"receipt": fewer}, server.token))
    more = copy.deepcopy(unsigned)
    more["statements"]["delta"] = copy.deepcopy(more["statements"]["alpha"])
    refusals.append((400, {"receipt": more}, server.token))
    # a receipt that does not hold this server's statement at all
    alone = copy.deepcopy(unsigned)
    alone["session"] = None
    alone["statements"] = {"alpha": alone["statements"]["alpha"]}
    refusals.append((400, {"receipt": alone}, server.token))
    for status, body, token in refusals:
        answer = _cosign(server.url, token, body)
        assert answer.status_code == status, (status, answer.text)
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert answer.json()["detail"]
    for raw in (b"{", b"\xff" * 10, json.dumps({"receipt": [[[[]]]] * 3}).encode()):
        answer = _cosign(server.url, server.token, None, raw)
        assert answer.status_code == 400, answer.text


def test_a_client_pins_the_key_each_server_shows(trio: LocalFederation) -> None:
    server = trio.servers["gamma"]
    client = Client(server.url, server.token)
    keys = client.receipt_keys()
    entry = PeerEntry.from_dict(requests.get(server.url + "/v1/identity", timeout=5).json())
    assert keys == {"gamma": entry.sign_public}
