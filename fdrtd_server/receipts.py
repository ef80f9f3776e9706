"""Signed result receipts, the server's part: statements, cosignatures, offline verification.

The format and its checks live in :mod:`fdrtd_client.receipts`, shared with
the client. Here the server:

- records what a job ran, when the job starts (:func:`parameters_of`, stored
  in the job record with the session) and ends (its output's SHA-256, and
  that of the output without this party's own fields, common to all parties);
- signs its **statement** whenever it serves a finished job's view
  (:func:`signed_statement`). The controller signs, not the microservice,
  since microservices may run in workers without the identity key; Ed25519
  is deterministic, so every view of a job carries the same bytes;
- **cosigns** a receipt the client assembled from every party's statement
  (``POST /v1/receipts/cosign``, :func:`cosign`), once its own statement is the
  one it signs for the caller's job and every other party's statement is
  signed by the key its federation file holds for that party;
- verifies a saved receipt offline (``fdrtd-server receipt verify``,
  :func:`verify_file`).

A statement never holds a dataset's values: inputs are names, handles and
numbers, and an inline array or a long text appears only as its SHA-256.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fdrtd_client import receipts as format_
from fdrtd_server.bus import JobRecord
from fdrtd_server.identity import Identity, load_federation

__all__ = [
    "FEDERATION_FILE",
    "PARAMETERS_MAX",
    "joint_sha256",
    "member_keys",
    "output_sha256",
    "parameters_of",
    "signed_statement",
    "statement_of",
    "value_sha256s",
    "verify_file",
]

PARAMETERS_MAX = 8192
"""The most canonical bytes of stated inputs a job record keeps; beyond, only their digest."""
_TEXT_MAX = 256
_LIST_MAX = 64
FEDERATION_FILE = "federation.toml"
"""The federation file in a server home (as :mod:`fdrtd_server.gateway` reads it)."""

output_sha256 = format_.output_sha256
joint_sha256 = format_.joint_sha256
value_sha256s = format_.value_sha256s


def _digest(value: Any) -> dict[str, str]:
    try:
        return {"sha256": format_.output_sha256(value)}
    except (TypeError, ValueError, RecursionError):
        return {"sha256": ""}  # not plain data: the function refuses it anyway


def _stated(value: Any) -> Any:
    """An input as a statement shows it: a name, a number or a few names; else its digest."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str) and len(value) <= _TEXT_MAX:
        return value
    if (
        isinstance(value, list)
        and len(value) <= _LIST_MAX
        and all(isinstance(item, str) and len(item) <= _TEXT_MAX for item in value)
    ):
        return list(value)
    # an inline array, a map, bytes, a long text: only the digest (never data values)
    return _digest(value)


def parameters_of(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters a job's statement states: the digest of all inputs, and the inputs shown.

    Each input appears as it was given if it is a number, a boolean, a text of
    at most 256 characters or a list of at most 64 such texts (dataset names,
    handles, columns, options); anything else (an inline array, a map, bytes)
    as ``{"sha256": ...}``. If the inputs shown exceed :data:`PARAMETERS_MAX`
    canonical bytes, only the digest of all inputs is kept.
    """
    shown = {str(name): _stated(value) for name, value in inputs.items()}
    parameters: dict[str, Any] = {"sha256": _digest(dict(inputs))["sha256"], "inputs": shown}
    if len(format_.canonical(shown)) > PARAMETERS_MAX:
        parameters["inputs"] = None
    return parameters


def statement_of(name: str, key: bytes, handle: str, record: JobRecord) -> dict[str, Any]:
    """What server ``name`` (signing with ``key``) states about its finished job ``handle``."""
    return {
        "receipt_version": format_.RECEIPT_VERSION,
        "server": name,
        "key": base64.b64encode(key).decode("ascii"),
        "result": handle,
        "analyst": record.owner,
        "protocol": f"{record.microservice}.{record.function}",
        "parameters": record.parameters or None,
        "session": record.session or None,
        "datasets": record.datasets,
        "policy_version": record.policy_version,
        "output_sha256": record.output_sha256,
        "joint_sha256": record.joint_sha256,
        "time": record.updated,
    }


def signed_statement(identity: Identity, handle: str, record: JobRecord) -> dict[str, Any]:
    """The statement about ``handle`` and this server's signature: ``{statement, signature}``."""
    statement = statement_of(identity.name, identity.sign_public, handle, record)
    signature = identity.sign(format_.statement_bytes(statement))
    return {"statement": statement, "signature": base64.b64encode(signature).decode("ascii")}


def member_keys(home: Path, identity: Identity) -> dict[str, bytes]:
    """The signing key of every member of the federation file in ``home``, and ``identity``'s."""
    path = home / FEDERATION_FILE
    members = load_federation(path) if path.exists() else {}
    keys = {name: entry.sign_public for name, entry in members.items()}
    keys[identity.name] = identity.sign_public
    return keys


def verify_file(path: Path, *, federation: Path | None, home: Path | None) -> str:
    """Verify a saved receipt offline; return the one-line summary.

    Args:
        path: The receipt, as the client saves it (JSON).
        federation: A federation file that lists every party with its key.
        home: A server home: its federation file and its own identity.

    Raises:
        ReceiptError: The check that failed is named.
        FileNotFoundError: The federation file or the home's identity is missing.
    """
    if federation is not None:
        keys = format_.load_keys(federation)
    else:
        assert home is not None
        from fdrtd_server import config

        settings = config.load_settings(home)
        keys = member_keys(home, Identity.load(home / "identity", settings.name))
    receipt = format_.load(path)
    format_.verify_receipt(receipt, keys)
    return format_.summary(receipt)
