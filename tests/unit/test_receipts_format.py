"""Receipts without servers: canonical bytes, statements, and every way to alter one.

A receipt is built here as servers build it (:mod:`fdrtd_server.receipts`,
signed with real identities) and checked as the client checks it
(:mod:`fdrtd_client.receipts`). Every field of every statement, every
signature, every cosignature, the common fields, the output value, a party
removed and a party added: each alteration must fail verification.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fdrtd_client import ReceiptError, receipts, wire
from fdrtd_server.bus import JobRecord
from fdrtd_server.identity import Identity
from fdrtd_server.receipts import PARAMETERS_MAX, parameters_of, signed_statement

PARTIES = ("alpha", "beta", "gamma")
SESSION = {"id": "s" * 32, "parties": list(PARTIES)}
VALUE = {"sum": np.array([[1.5, -2.0], [np.nan, 4.0]]), "count": 7, "names": ("a", "b")}


def record_of(name: str, session: dict[str, Any] | None, value: Any) -> JobRecord:
    """A finished job record as a microservice leaves it."""
    record = JobRecord("ana", "smpc", "secure_sum", "done", created="2026-01-01T00:00:00Z")
    record.updated = f"2026-01-01T00:00:0{PARTIES.index(name) + 1}.000+00:00"
    record.parameters = parameters_of({"data": f"cohort-{name}", "elementwise": True})
    record.session = dict(session or {})
    record.datasets = {f"cohort-{name}": {"id": "ab" * 32, "time": "2026-01-01T00:00:00Z"}}
    record.policy_version = f"policy-{name}-3"
    record.output_sha256 = receipts.output_sha256(value)
    record.joint_sha256 = receipts.joint_sha256(value)
    return record


@pytest.fixture(scope="module")
def identities() -> dict[str, Identity]:
    return {name: Identity.generate(name) for name in PARTIES}


@pytest.fixture(scope="module")
def keys(identities: dict[str, Identity]) -> dict[str, bytes]:
    return {name: identity.sign_public for name, identity in identities.items()}


def cosign(receipt: dict[str, Any], identities: dict[str, Identity]) -> dict[str, Any]:
    signed = receipts.cosigned_bytes(receipt)
    receipt["cosignatures"] = {
        name: base64.b64encode(identities[name].sign(signed)).decode() for name in PARTIES
    }
    return receipt


@pytest.fixture(scope="module")
def joint(identities: dict[str, Identity]) -> dict[str, Any]:
    """A valid, cosigned receipt of the three parties."""
    entries = {
        name: signed_statement(identities[name], f"r-{index:040x}", record_of(name, SESSION, VALUE))
        for index, name in enumerate(PARTIES)
    }
    return cosign(receipts.assemble(entries), identities)


def test_a_valid_receipt_verifies_with_its_value(
    joint: dict[str, Any], keys: dict[str, bytes]
) -> None:
    assert receipts.verify_receipt(joint, keys, value=VALUE) == list(PARTIES)
    # as the client saves it and reads it back
    again = json.loads(json.dumps(joint))
    assert receipts.verify_receipt(again, keys, value=VALUE) == list(PARTIES)


def test_json_and_msgpack_answers_hash_the_same() -> None:
    digest = receipts.output_sha256(VALUE)
    as_msgpack = wire.unpackb(wire.packb(VALUE))
    as_json = wire.from_jsonable(json.loads(json.dumps(wire.to_jsonable(VALUE))))
    assert receipts.output_sha256(as_msgpack) == digest
    assert receipts.output_sha256(as_json) == digest
    # numpy scalars, tuples and big-endian arrays are written as the client receives them
    assert (
        receipts.output_sha256(
            {"sum": VALUE["sum"].astype(">f8"), "count": np.int64(7), "names": ["a", "b"]}
        )
        == digest
    )


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ({"x": 1}, {"x": 1.0}),  # an integer is not a float
        ({"x": True}, {"x": 1}),
        ({"x": np.zeros(2)}, {"x": np.zeros((1, 2))}),  # the shape counts
        ({"x": np.zeros(2)}, {"x": np.zeros(2, dtype=np.float32)}),  # and the dtype
        ({"x": [1, 2]}, {"x": [2, 1]}),
        ({"x": "é"}, {"x": "e"}),
    ],
)
def test_canonical_bytes_tell_values_apart(one: Any, other: Any) -> None:
    assert receipts.canonical(one) != receipts.canonical(other)


def test_canonical_bytes_are_sorted_compact_json() -> None:
    assert receipts.canonical({"b": 1, "a": [None, "é"]}) == '{"a":[null,"é"],"b":1}'.encode()
    with pytest.raises(TypeError):
        receipts.canonical({"x": object()})


def test_parameters_name_inputs_but_hash_arrays_and_long_texts() -> None:
    inputs = {
        "data": "cohort",
        "column": "age",
        "x": ["a", "b"],
        "frac_bits": 20,
        "values": [1.0, 2.0, 3.0],
        "matrix": np.eye(3),
        "blob": "z" * 300,
    }
    parameters = parameters_of(inputs)
    shown = parameters["inputs"]
    assert shown["data"] == "cohort" and shown["x"] == ["a", "b"] and shown["frac_bits"] == 20
    for name in ("values", "matrix", "blob"):
        assert set(shown[name]) == {"sha256"}
    assert shown["values"]["sha256"] == receipts.output_sha256([1.0, 2.0, 3.0])
    assert parameters["sha256"] == receipts.output_sha256(inputs)
    many = {f"input_{k}": "n" * 200 for k in range(PARAMETERS_MAX // 100)}
    assert parameters_of(many)["inputs"] is None  # too large to show: the digest only


def _fields() -> list[tuple[str, str]]:
    return [(party, field) for party in PARTIES for field in receipts.STATEMENT_FIELDS]


def _altered(value: Any) -> Any:
    """A different value of a similar kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, dict):
        return {**value, "extra": "x"}
    return "x"


@pytest.mark.parametrize(("party", "field"), _fields())
def test_each_field_of_each_statement_is_signed(
    joint: dict[str, Any], keys: dict[str, bytes], party: str, field: str
) -> None:
    tampered = copy.deepcopy(joint)
    statement = tampered["statements"][party]["statement"]
    statement[field] = _altered(statement[field])
    with pytest.raises(ReceiptError) as caught:
        receipts.verify_receipt(tampered, keys, value=VALUE)
    expected = {"server": "parties", "key": "format", "receipt_version": "signature"}
    assert caught.value.check == expected.get(field, "signature")


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(receipt: dict[str, Any]) -> None:
        target = receipt
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _drop(party: str) -> Callable[[dict[str, Any]], None]:
    def change(receipt: dict[str, Any]) -> None:
        del receipt["statements"][party]
        del receipt["cosignatures"][party]

    return change


def _add(receipt: dict[str, Any]) -> None:
    receipt["statements"]["delta"] = copy.deepcopy(receipt["statements"]["alpha"])
    receipt["statements"]["delta"]["statement"]["server"] = "delta"


OTHER_SIGNATURE = base64.b64encode(b"\x01" * 64).decode()
ALTERATIONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "receipt protocol": (_set(("protocol",), "smpc.count"), "common"),
    "receipt joint output": (_set(("joint_sha256",), "0" * 64), "common"),
    "a statement's joint output": (
        _set(("statements", "gamma", "statement", "joint_sha256"), "0" * 64),
        "signature",
    ),
    "receipt session id": (_set(("session", "id"), "t" * 32), "common"),
    "receipt version": (_set(("receipt_version",), receipts.RECEIPT_VERSION + 1), "format"),
    "the former receipt version": (_set(("receipt_version",), 1), "format"),
    "a party left out": (_drop("gamma"), "parties"),
    "a party added": (_add, "parties"),
    "session parties": (_set(("session", "parties"), ["alpha", "beta"]), "parties"),
    "statement signature": (
        _set(("statements", "beta", "signature"), OTHER_SIGNATURE),
        "signature",
    ),
    "signature not base64": (_set(("statements", "beta", "signature"), "!!"), "format"),
    "a cosignature": (_set(("cosignatures", "gamma"), OTHER_SIGNATURE), "cosignature"),
    "a cosignature missing": (lambda r: r["cosignatures"].pop("alpha"), "cosignature"),
    "statements swapped": (
        lambda r: r["statements"].update(
            alpha=r["statements"]["beta"], beta=r["statements"]["alpha"]
        ),
        "parties",
    ),
    "a field added": (_set(("statements", "alpha", "statement", "note"), "x"), "format"),
    "not a map": (lambda r: r.clear(), "format"),
}


@pytest.mark.parametrize("name", ALTERATIONS)
def test_every_alteration_of_the_receipt_fails(
    joint: dict[str, Any], keys: dict[str, bytes], name: str
) -> None:
    change, check = ALTERATIONS[name]
    tampered = copy.deepcopy(joint)
    change(tampered)
    with pytest.raises(ReceiptError) as caught:
        receipts.verify_receipt(tampered, keys, value=VALUE)
    assert caught.value.check == check


def test_cosignatures_over_a_changed_statement_fail(
    joint: dict[str, Any], identities: dict[str, Identity], keys: dict[str, bytes]
) -> None:
    """A statement re-signed by its server after the others cosigned: their cosignatures fail."""
    tampered = copy.deepcopy(joint)
    record = record_of("beta", SESSION, VALUE)
    record.policy_version = "policy-beta-4"
    tampered["statements"]["beta"] = signed_statement(
        identities["beta"], tampered["statements"]["beta"]["statement"]["result"], record
    )
    with pytest.raises(ReceiptError) as caught:
        receipts.verify_receipt(tampered, keys)
    assert caught.value.check == "cosignature"


def test_the_output_value_itself(joint: dict[str, Any], keys: dict[str, bytes]) -> None:
    changed = {**VALUE, "sum": VALUE["sum"] + 1e-12}
    with pytest.raises(ReceiptError) as caught:
        receipts.verify_receipt(joint, keys, value=changed)
    assert caught.value.check == "output"


def test_a_key_not_in_the_federation_fails(joint: dict[str, Any], keys: dict[str, bytes]) -> None:
    stranger = Identity.generate("beta").sign_public
    for known in ({**keys, "beta": stranger}, {k: v for k, v in keys.items() if k != "beta"}):
        with pytest.raises(ReceiptError) as caught:
            receipts.verify_receipt(joint, known)
        assert caught.value.check == "key"


def test_a_statement_re_signed_by_a_stranger_fails(
    joint: dict[str, Any], keys: dict[str, bytes]
) -> None:
    """A forger signing beta's statement with its own key, and naming that key."""
    forger = Identity.generate("beta")
    tampered = copy.deepcopy(joint)
    record = record_of("beta", SESSION, VALUE)
    tampered["statements"]["beta"] = signed_statement(forger, f"r-{1:040x}", record)
    with pytest.raises(ReceiptError) as caught:
        receipts.verify_receipt(tampered, keys)
    assert caught.value.check == "key"


def test_a_single_server_receipt_needs_no_cosignature(identities: dict[str, Identity]) -> None:
    entry = signed_statement(identities["alpha"], f"r-{5:040x}", record_of("alpha", None, 3.5))
    receipt = receipts.assemble({"alpha": entry})
    keys = {"alpha": identities["alpha"].sign_public}
    assert receipts.verify_receipt(receipt, keys, value=3.5) == ["alpha"]
    assert receipts.verify_statement(entry, keys, value=3.5) == "alpha"
    with pytest.raises(ReceiptError):
        receipts.verify_receipt({**receipt, "cosignatures": {"alpha": OTHER_SIGNATURE}}, keys)
    with pytest.raises(ReceiptError) as caught:
        receipts.verify_statement(entry, keys, value=3.25)
    assert caught.value.check == "output"


def test_signatures_are_domain_separated(identities: dict[str, Identity]) -> None:
    """A statement signature is no cosignature (nor a peer message's or a checkpoint's)."""
    entry = signed_statement(identities["alpha"], f"r-{5:040x}", record_of("alpha", None, 1))
    statement = entry["statement"]
    assert receipts.statement_bytes(statement).startswith(receipts.STATEMENT_DOMAIN)
    assert receipts.cosigned_bytes({"x": 1}).startswith(receipts.COSIGN_DOMAIN)
    assert not receipts.STATEMENT_DOMAIN.startswith(receipts.COSIGN_DOMAIN)


def test_federation_files_are_read_strictly(tmp_path: Any) -> None:
    key = base64.b64encode(b"\x02" * 32).decode()
    good = tmp_path / "good.toml"
    good.write_text(f'[[member]]\nname = "a"\nurl = "http://x"\nsign_key = "{key}"\n')
    assert receipts.load_keys(good) == {"a": b"\x02" * 32}
    for text in (
        "not toml [",
        f'[[member]]\nsign_key = "{key}"\n',
        '[[member]]\nname = "a"\nsign_key = "short"\n',
        f'[[member]]\nname = "a"\nsign_key = "{key}"\n[[member]]\nname = "a"\nsign_key = "{key}"\n',
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ReceiptError) as caught:
            receipts.load_keys(bad)
        assert caught.value.check == "federation"


def _private(spent: float) -> dict[str, Any]:
    """A party's statement of its differential-privacy release, as smpc.count states it."""
    return {
        "cohort": {
            "mechanism": "laplace",
            "epsilon": spent,
            "noise": {"count": {"scale": 1 / spent}},
            "remaining": {"epsilon": 1.0 - spent},
        }
    }


# one noisy count, released alike; alpha and gamma state their own spend, beta (no DP) none
DP_VALUES = {
    "alpha": {"count": 80, "privacy": _private(0.5)},
    "beta": {"count": 80},
    "gamma": {"count": 80, "privacy": _private(0.25)},
}


@pytest.fixture(scope="module")
def private(identities: dict[str, Identity]) -> dict[str, Any]:
    """A cosigned receipt of a DP count: the parties' values differ in their privacy field."""
    entries = {
        name: signed_statement(
            identities[name], f"r-{index:040x}", record_of(name, SESSION, DP_VALUES[name])
        )
        for index, name in enumerate(PARTIES)
    }
    return cosign(receipts.assemble(entries), identities)


def test_values_differing_only_in_party_fields_share_the_joint_digest(
    private: dict[str, Any], keys: dict[str, bytes]
) -> None:
    assert receipts.PARTY_FIELDS == ("privacy",)
    digests = {name: receipts.joint_sha256(value) for name, value in DP_VALUES.items()}
    assert len(set(digests.values())) == 1 == len({private["joint_sha256"], *digests.values()})
    outputs = {entry["statement"]["output_sha256"] for entry in private["statements"].values()}
    assert len(outputs) == 3  # each party states its own whole value
    assert receipts.verify_receipt(private, keys, values=DP_VALUES) == list(PARTIES)
    for value in DP_VALUES.values():  # a value of a party not named: some party's, whole
        assert receipts.verify_receipt(private, keys, value=value) == list(PARTIES)
    # a value that is not a map has no party fields: both digests are its own
    assert receipts.joint_sha256(3.5) == receipts.output_sha256(3.5)
    assert receipts.joint_sha256([{"privacy": 1}]) == receipts.output_sha256([{"privacy": 1}])


@pytest.mark.parametrize(
    ("party", "change"),
    [
        ("alpha", lambda v: v["privacy"]["cohort"].update(epsilon=0.125)),  # its spend understated
        ("gamma", lambda v: v["privacy"]["cohort"]["remaining"].update(epsilon=0.9)),
        ("alpha", lambda v: v.pop("privacy")),  # the privacy block dropped
        ("beta", lambda v: v.update(privacy=_private(0.5))),  # one added where none was
        ("gamma", lambda v: v.update(count=81)),  # the joint part itself
    ],
)
def test_a_party_value_altered_fails(
    private: dict[str, Any],
    keys: dict[str, bytes],
    party: str,
    change: Callable[[dict[str, Any]], Any],
) -> None:
    altered = copy.deepcopy(DP_VALUES[party])
    change(altered)
    with pytest.raises(ReceiptError) as caught:
        receipts.verify_receipt(private, keys, values={**DP_VALUES, party: altered})
    assert caught.value.check == "output" and party in str(caught.value)
    if altered not in DP_VALUES.values():  # alpha's without privacy is beta's, as beta sent it
        with pytest.raises(ReceiptError) as caught:
            receipts.verify_receipt(private, keys, value=altered)
        assert caught.value.check == "output"
    entry = private["statements"][party]
    with pytest.raises(ReceiptError) as caught:
        receipts.verify_statement(entry, keys, value=altered)
    assert caught.value.check == "output"


def test_a_value_is_checked_against_the_party_that_sent_it(
    private: dict[str, Any], keys: dict[str, bytes]
) -> None:
    """Gamma's value passed off as alpha's: the joint part agrees, the whole does not."""
    with pytest.raises(ReceiptError) as caught:
        receipts.verify_receipt(private, keys, values={"alpha": DP_VALUES["gamma"]})
    assert caught.value.check == "output" and "alpha" in str(caught.value)
    with pytest.raises(ReceiptError) as caught:
        receipts.verify_receipt(private, keys, values={"delta": DP_VALUES["alpha"]})
    assert caught.value.check == "output"


def test_the_joint_digest_of_a_dp_receipt_cannot_be_altered(
    private: dict[str, Any], identities: dict[str, Identity], keys: dict[str, bytes]
) -> None:
    """The receipt's joint digest, or one statement's re-signed by its own server."""
    tampered = copy.deepcopy(private)
    tampered["joint_sha256"] = receipts.joint_sha256({"count": 81})
    with pytest.raises(ReceiptError) as caught:
        receipts.verify_receipt(tampered, keys)
    assert caught.value.check == "common"
    # beta states another joint value, signed with its own key: it differs from the others'
    record = record_of("beta", SESSION, DP_VALUES["beta"])
    record.joint_sha256 = receipts.joint_sha256({"count": 81})
    tampered = copy.deepcopy(private)
    tampered["statements"]["beta"] = signed_statement(
        identities["beta"], tampered["statements"]["beta"]["statement"]["result"], record
    )
    with pytest.raises(ReceiptError) as caught:
        receipts.verify_receipt(tampered, keys, cosignatures=False)
    assert caught.value.check == "common" and "beta" in str(caught.value)


@pytest.mark.parametrize(
    "value",
    [
        {"count": 12},
        {"count": 12, "privacy": {"d": {"epsilon": 0.5}}},
        [1.0, 2.0],
        np.arange(3.0),
    ],
)
def test_both_digests_at_once_are_the_two_digests(value: object) -> None:
    assert receipts.value_sha256s(value) == (
        receipts.output_sha256(value),
        receipts.joint_sha256(value),
    )
