"""Result receipts: what each server states it ran, signed, and checked without any server code.

A finished job's view carries its server's **statement**: the protocol
(``microservice.function``), the parameters (names and numbers as given,
arrays and long texts as SHA-256 digests), the session, the version of every
dataset read, the version of the server's policy, the SHA-256 of the result
value (``output_sha256``) and of the value without the fields that are each
party's own (``joint_sha256``, see :data:`PARTY_FIELDS`: a party's statement
of its differential-privacy spend differs from the others'), and the time
the job ended, signed by the server's Ed25519 key. The client gathers every
party's statement into one **receipt**, and each party then signs the whole
(a *cosignature*), having checked its own statement against its job and the
others' signatures against its federation file::

    {"receipt_version": 2, "protocol": "smpc.secure_sum",
     "session": {"id": "...", "parties": ["alpha", "beta"]} | null,
     "joint_sha256": "<hex>",
     "statements": {"alpha": {"statement": {...}, "signature": "<base64>"}, ...},
     "cosignatures": {"alpha": "<base64>", ...}}

A receipt of one server (no session) holds its one statement and no
cosignature: the statement is then that server's signature over all of it.

This module is shared by the client, the server's cosign route and the
``fdrtd-server receipt verify`` command, and imports nothing of the server.

**Canonical bytes.** Statements, receipts and result values are hashed and
signed as UTF-8 JSON with sorted keys, no spaces, non-ASCII characters as
they are, after :func:`normal` turned them into the form a JSON client
receives: NumPy scalars become Python numbers, tuples lists, bytes their
base64 text, non-finite floats ``null`` (JSON has no NaN), map keys text,
and a NumPy array ``{"__ndarray__": {"dtype", "shape", "sha256"}}`` with the
SHA-256 of its little-endian, C-ordered bytes. A JSON client and a msgpack
client therefore compute the same :func:`output_sha256` for the same answer.
:func:`joint_sha256` hashes the same way a map without its :data:`PARTY_FIELDS`.
Floats are written as Python writes them (the shortest text that reads back
as the same float). A signature signs a domain line (:data:`STATEMENT_DOMAIN`
or :data:`COSIGN_DOMAIN`) and then the canonical bytes, so that it can never
pass for a peer message's or an audit checkpoint's signature by the same key.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fdrtd_client.errors import ReceiptError
from fdrtd_client.wire import _array_to_parts

__all__ = [
    "COMMON_FIELDS",
    "COSIGN_DOMAIN",
    "PARTY_FIELDS",
    "RECEIPT_VERSION",
    "STATEMENT_DOMAIN",
    "STATEMENT_FIELDS",
    "assemble",
    "canonical",
    "check_format",
    "cosigned_bytes",
    "decode_b64",
    "joint_sha256",
    "joint_value",
    "load",
    "load_keys",
    "normal",
    "output_sha256",
    "save",
    "statement_bytes",
    "summary",
    "value_sha256s",
    "verify_receipt",
    "verify_statement",
]

RECEIPT_VERSION = 2
"""The receipt format this module writes and checks (2: statements state ``joint_sha256``)."""
STATEMENT_DOMAIN = b"fdrtd receipt statement v1\n"
"""What a server's statement signature signs first, before the statement's canonical bytes."""
COSIGN_DOMAIN = b"fdrtd receipt cosignature v1\n"
"""What a cosignature signs first, before the canonical bytes of the rest of the receipt."""
STATEMENT_FIELDS = (
    "receipt_version",
    "server",
    "key",
    "result",
    "analyst",
    "protocol",
    "parameters",
    "session",
    "datasets",
    "policy_version",
    "output_sha256",
    "joint_sha256",
    "time",
)
"""The fields of a statement, all required, no others."""
COMMON_FIELDS = ("receipt_version", "protocol", "session", "joint_sha256")
"""The fields every party's statement and the receipt itself must hold alike."""
PARTY_FIELDS = ("privacy",)
"""The fields of a result (a map) that are each party's own: its differential-privacy
statement (its spend, its noise, its budget). The parties' values may differ in these
alone; ``joint_sha256`` is the digest of the value without them."""
_RECEIPT_FIELDS = (*COMMON_FIELDS, "statements", "cosignatures")
_SIGNATURE_TEXT = 88
"""Base64 of a 64-byte Ed25519 signature is 88 characters."""
_MAX_PARTIES = 64


def normal(value: Any) -> Any:
    """``value`` as a JSON client receives it, arrays as digests (see the module docstring).

    Raises:
        TypeError: ``value`` holds something that is not plain data.
    """
    if isinstance(value, np.ndarray):
        dtype, shape, raw = _array_to_parts(value)
        digest = hashlib.sha256(raw).hexdigest()
        return {"__ndarray__": {"dtype": dtype, "shape": shape, "sha256": digest}}
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, dict):
        return {str(key): normal(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [normal(item) for item in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot hash an object of type {type(value).__name__}")


def canonical(value: Any) -> bytes:
    """The canonical bytes of ``value``: sorted-key, compact UTF-8 JSON of :func:`normal`."""
    text = json.dumps(
        normal(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def output_sha256(value: Any) -> str:
    """The SHA-256 (hex) of a result value's canonical bytes, as statements state it."""
    return hashlib.sha256(canonical(value)).hexdigest()


def joint_value(value: Any) -> Any:
    """The part of a result value every party releases alike: a map without :data:`PARTY_FIELDS`."""
    if isinstance(value, Mapping):
        return {key: item for key, item in value.items() if key not in PARTY_FIELDS}
    return value


def joint_sha256(value: Any) -> str:
    """The SHA-256 (hex) of :func:`joint_value`'s canonical bytes: common to every party."""
    return output_sha256(joint_value(value))


def value_sha256s(value: Any) -> tuple[str, str]:
    """:func:`output_sha256` and :func:`joint_sha256` of ``value``.

    A value that holds no party field is encoded once: the two are then the same.
    """
    whole = output_sha256(value)
    if isinstance(value, Mapping) and any(key in value for key in PARTY_FIELDS):
        return whole, joint_sha256(value)
    return whole, whole


def statement_bytes(statement: Mapping[str, Any]) -> bytes:
    """What a server signs for its statement."""
    return STATEMENT_DOMAIN + canonical(dict(statement))


def cosigned_bytes(receipt: Mapping[str, Any]) -> bytes:
    """What each party cosigns: the receipt without its cosignatures."""
    return COSIGN_DOMAIN + canonical({k: v for k, v in receipt.items() if k != "cosignatures"})


def assemble(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One receipt of the parties' signed statements (``{"statement", "signature"}``), by server.

    The common fields are taken from the first statement; :func:`verify_receipt`
    checks that every statement holds the same. No cosignature is in it yet.

    Raises:
        ReceiptError: No statement, or one that is not a map with a statement.
    """
    if not entries:
        raise ReceiptError("format", "no server sent a receipt statement with its result")
    first = next(iter(entries.values()))
    statement = first.get("statement") if isinstance(first, Mapping) else None
    if not isinstance(statement, Mapping):
        raise ReceiptError("format", "a server's receipt statement is not a map")
    # copies: a receipt shares no part with the views it was built from, nor its parts
    receipt: dict[str, Any] = {
        field: copy.deepcopy(statement.get(field)) for field in COMMON_FIELDS
    }
    receipt["statements"] = {name: copy.deepcopy(dict(entry)) for name, entry in entries.items()}
    receipt["cosignatures"] = {}
    return receipt


def _fail(check: str, message: str) -> ReceiptError:
    return ReceiptError(check, message)


def decode_b64(text: Any, size: int, what: str, check: str) -> bytes:
    """Standard base64 ``text`` of exactly ``size`` bytes, else a ReceiptError naming ``what``."""
    if not isinstance(text, str) or len(text) > 4 * size:
        raise _fail(check, f"{what} is not base64 of {size} bytes")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise _fail(check, f"{what} is not base64 of {size} bytes") from None
    if len(raw) != size:
        raise _fail(check, f"{what} is not base64 of {size} bytes")
    return raw


def _check_session(session: Any) -> list[str] | None:
    """The parties of a receipt's ``session`` (None for a single-server job)."""
    if session is None:
        return None
    parties = session.get("parties") if isinstance(session, Mapping) else None
    if (
        not isinstance(session, Mapping)
        or set(session) != {"id", "parties"}
        or not isinstance(session["id"], str)
        or not isinstance(parties, list)
        or not 2 <= len(parties) <= _MAX_PARTIES
        or not all(isinstance(party, str) for party in parties)
        or len(set(parties)) != len(parties)
    ):
        raise _fail("format", "'session' must be null or {id, parties} with 2 to 64 distinct names")
    return parties


def check_format(receipt: Any) -> list[str]:
    """Check a receipt's shape (not its signatures); return the parties that must have signed.

    Raises:
        ReceiptError: ``check == "format"`` for a malformed receipt, ``"parties"``
            if its statements are not exactly those of the session's parties.
    """
    if not isinstance(receipt, Mapping) or set(receipt) != set(_RECEIPT_FIELDS):
        raise _fail("format", f"a receipt is a map of exactly {', '.join(_RECEIPT_FIELDS)}")
    version = receipt["receipt_version"]
    if type(version) is not int or version != RECEIPT_VERSION:
        raise _fail("format", f"only receipt_version {RECEIPT_VERSION} is known")
    statements, cosignatures = receipt["statements"], receipt["cosignatures"]
    if not isinstance(statements, Mapping) or not isinstance(cosignatures, Mapping):
        raise _fail("format", "'statements' and 'cosignatures' must be maps by server name")
    for name, entry in statements.items():
        if (
            not isinstance(entry, Mapping)
            or set(entry) != {"statement", "signature"}
            or not isinstance(entry["statement"], Mapping)
            or set(entry["statement"]) != set(STATEMENT_FIELDS)
        ):
            raise _fail(
                "format",
                f"the statement of {str(name)[:64]!r} must be {{statement, signature}}, the "
                f"statement holding exactly {', '.join(STATEMENT_FIELDS)}",
            )
        server = entry["statement"]["server"]
        if not isinstance(name, str) or not isinstance(server, str) or server != name:
            raise _fail("parties", f"the statement filed under {str(name)[:64]!r} is another's")
    parties = _check_session(receipt["session"])
    if parties is None:
        if len(statements) != 1:
            raise _fail("parties", "a receipt without a session holds exactly one statement")
        if cosignatures:
            raise _fail("parties", "a receipt without a session holds no cosignatures")
        return list(statements)
    if set(statements) != set(parties):
        missing = sorted(set(parties) - set(statements))
        extra = sorted(str(name)[:64] for name in set(statements) - set(parties))
        raise _fail(
            "parties",
            f"the statements are not those of the session's parties (missing: "
            f"{', '.join(missing) or 'none'}; not a party: {', '.join(extra) or 'none'})",
        )
    return list(parties)


def verify_receipt(
    receipt: Any,
    keys: Mapping[str, bytes],
    *,
    value: Any = ...,
    values: Mapping[str, Any] | None = None,
    cosignatures: bool = True,
) -> list[str]:
    """Check a receipt; return the parties that signed it.

    Every check must pass: the shape; the statements are exactly the
    session's parties'; each statement names the key ``keys`` holds for its
    server and is signed by it; every statement holds the receipt's common
    fields; each party cosigned the whole (a receipt of several parties);
    and the values given hash to what was stated.

    Args:
        receipt: The receipt (a map, as :func:`load` reads it).
        keys: The raw 32-byte Ed25519 public key of each server, by name
            (:func:`load_keys` reads them from a federation file).
        value: A result value received from a party not named: it must hash
            to the receipt's ``joint_sha256``, and as a whole to some party's
            ``output_sha256`` (its own statement, :data:`PARTY_FIELDS` and all).
        values: Result values by the party that sent each: each must hash to
            that party's ``output_sha256`` and to the ``joint_sha256``.
        cosignatures: False checks everything but the cosignatures (what a
            server checks before it adds its own).

    Raises:
        ReceiptError: The first check that fails; its ``check`` attribute
            names it (``format``, ``parties``, ``key``, ``signature``,
            ``common``, ``cosignature`` or ``output``).
    """
    parties = check_format(receipt)
    for name in parties:
        statement = _check_statement(name, receipt["statements"][name], keys)
        for field in COMMON_FIELDS:
            # compared as canonical bytes: True == 1 and 1 == 1.0 in Python, not in JSON
            if canonical(statement[field]) != canonical(receipt[field]):
                raise _fail("common", f"{name!r}'s statement differs from the receipt in {field!r}")
    if cosignatures and len(parties) > 1:
        given = receipt["cosignatures"]
        if set(given) != set(parties):
            raise _fail("cosignature", "the cosignatures are not exactly the parties'")
        signed = cosigned_bytes(receipt)
        for name in parties:
            signature = decode_b64(given[name], 64, f"{name!r}'s cosignature", "cosignature")
            if not _valid(keys[name], signature, signed):
                raise _fail("cosignature", f"{name!r}'s cosignature is not valid")
    if value is not ...:
        stated = {receipt["statements"][name]["statement"]["output_sha256"] for name in parties}
        whole, joint = value_sha256s(value)
        if joint != receipt["joint_sha256"] or whole not in stated:
            raise _fail("output", "the result value does not hash to what the parties stated")
    for name, received in (values or {}).items():
        if name not in parties:
            raise _fail("output", f"a value is checked for {str(name)[:64]!r}, not a party")
        _check_value(receipt["statements"][name]["statement"], received)
    return parties


def _check_value(statement: Mapping[str, Any], value: Any) -> None:
    """Check a party's result value against its statement's two digests."""
    name = statement["server"]
    whole, joint = value_sha256s(value)
    if whole != statement["output_sha256"]:
        raise _fail("output", f"the value from {name!r} does not hash to its output_sha256")
    if joint != statement["joint_sha256"]:
        raise _fail("output", f"the value from {name!r} does not hash to the joint_sha256")


def _check_statement(name: str, entry: Mapping[str, Any], keys: Mapping[str, bytes]) -> Any:
    """Check that ``name``'s statement names its key and is signed by it; return the statement."""
    statement = entry["statement"]
    key = keys.get(name)
    if key is None:
        raise _fail("key", f"no public key is known for the server {name!r}")
    stated = decode_b64(statement["key"], 32, f"the key in {name!r}'s statement", "format")
    if stated != key:
        raise _fail(
            "key",
            f"{name!r}'s statement names the key {stated.hex()[:16]}, not the key "
            f"{key.hex()[:16]} known for it (federation file or GET /v1/identity)",
        )
    signature = decode_b64(entry["signature"], 64, f"{name!r}'s signature", "format")
    if not _valid(key, signature, statement_bytes(statement)):
        raise _fail("signature", f"{name!r}'s statement signature is not valid")
    return statement


def verify_statement(entry: Any, keys: Mapping[str, bytes], *, value: Any = ...) -> str:
    """Check one server's signed statement (part of a multi-party receipt); return its server.

    The checks of :func:`verify_receipt` that one statement allows: its shape,
    its key, its signature and, if ``value`` (this server's) is given, both
    digests of it.

    Raises:
        ReceiptError: As :func:`verify_receipt`.
    """
    if (
        not isinstance(entry, Mapping)
        or set(entry) != {"statement", "signature"}
        or not isinstance(entry["statement"], Mapping)
        or set(entry["statement"]) != set(STATEMENT_FIELDS)
        or not isinstance(entry["statement"]["server"], str)
    ):
        raise _fail("format", "a signed statement is {statement, signature} of a known shape")
    name = entry["statement"]["server"]
    statement = _check_statement(name, entry, keys)
    if value is not ...:
        _check_value(statement, value)
    return str(name)


def _valid(key: bytes, signature: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def load_keys(path: str | Path) -> dict[str, bytes]:
    """The Ed25519 public key of each member of a federation file, by name.

    The file is the one servers keep (``DIR/federation.toml``): ``[[member]]``
    tables with ``name`` and ``sign_key`` (base64 of 32 bytes); other fields
    are not needed here.

    Raises:
        ReceiptError: ``check == "federation"``: the file cannot be read, is not
            TOML, or a member lacks a name or a valid ``sign_key`` or is named twice.
    """
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise _fail("federation", f"cannot read the federation file {path}: {error}") from None
    members = document.get("member", [])
    keys: dict[str, bytes] = {}
    for index, member in enumerate(members if isinstance(members, list) else [None], start=1):
        name = member.get("name") if isinstance(member, dict) else None
        if not isinstance(name, str) or not name:
            raise _fail("federation", f"{path}: member #{index} has no name")
        if name in keys:
            raise _fail("federation", f"{path}: the name {name!r} is used twice")
        what = f"{path}: member #{index}'s sign_key"
        keys[name] = decode_b64(member.get("sign_key"), 32, what, "federation")
    return keys


def summary(receipt: Mapping[str, Any]) -> str:
    """One line about a (verified) receipt: protocol, parties, joint output digest."""
    statements = receipt.get("statements") or {}
    times = sorted(str(entry["statement"]["time"]) for entry in statements.values())
    return (
        f"receipt of {receipt.get('protocol')} signed by {', '.join(statements)}; joint "
        f"sha256 {str(receipt.get('joint_sha256'))[:16]}..., ended {times[-1] if times else '?'}"
    )


def save(receipt: Mapping[str, Any], path: str | Path) -> Path:
    """Write a receipt as JSON (readable by :func:`load` and ``fdrtd-server receipt verify``)."""
    path = Path(path)
    path.write_text(json.dumps(receipt, indent=2, sort_keys=True) + "\n", "utf-8")
    return path


def load(path: str | Path) -> Any:
    """Read a receipt file that :func:`save` wrote.

    Raises:
        ReceiptError: ``check == "format"``: the file is not JSON.
    """
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise _fail("format", f"the receipt file {path} is not JSON: {error}") from None
