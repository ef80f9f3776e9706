"""The receipt route: a server's signature over a whole receipt (``POST /v1/receipts/cosign``).

A finished job's view carries this server's signed statement
(:func:`view_receipt`, called by :func:`fdrtd_server.routes.results.view`);
the client gathers every party's into one receipt and asks each party to
cosign it. The format and its checks are :mod:`fdrtd_client.receipts`; what
a statement holds is :mod:`fdrtd_server.receipts`.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from fdrtd_client import receipts as format_
from fdrtd_client.errors import ReceiptError
from fdrtd_server import receipts
from fdrtd_server.bus import JobRecord, check_owner, parse_handle
from fdrtd_server.errors import BadRequest, Conflict, NotFound
from fdrtd_server.http_common import (
    State,
    audit_refusals,
    caller,
    read_body,
    refusals_end,
    respond,
    state_of,
)
from fdrtd_server.identity import Identity

__all__ = ["cosign", "view_receipt"]

log = logging.getLogger("fdrtd.controller")


def _identity(state: State) -> Identity | None:
    """This server's identity: the gateway's, else loaded once from the home (None if none)."""
    gateway = state.extra.get("gateway")
    if gateway is not None:
        identity: Identity = gateway.identity
        return identity
    if "receipt_identity" not in state.extra:
        try:
            state.extra["receipt_identity"] = Identity.load(
                state.settings.home / "identity", state.settings.name
            )
        except FileNotFoundError:
            log.warning("no identity in %s: results carry no receipt", state.settings.home)
            state.extra["receipt_identity"] = None
    found: Identity | None = state.extra["receipt_identity"]
    return found


def view_receipt(state: State, handle: str, record: JobRecord) -> dict[str, Any] | None:
    """The signed statement for a finished job's view; None if it failed, or nothing can sign."""
    if record.status != "done" or not record.output_sha256 or not record.joint_sha256:
        return None  # failed, or ended before this server stated both output digests
    identity = _identity(state)
    return None if identity is None else receipts.signed_statement(identity, handle, record)


def _member_keys(state: State, identity: Identity) -> dict[str, bytes]:
    """The public signing key of every member of this server's federation, and its own."""
    gateway = state.extra.get("gateway")
    if gateway is None:
        return receipts.member_keys(state.settings.home, identity)
    gateway.reload_members()  # the file as it is now, as for peer messages
    keys = {name: entry.sign_public for name, entry in gateway.members.items()}
    keys[identity.name] = identity.sign_public
    return keys


_BODY_RULE = (
    "the body must be {'receipt': ...}: the receipt assembled from every party's statement "
    "(see docs/api.md, 'Receipts')"
)


async def cosign(request: Request) -> Response:
    """Add this server's signature over a whole receipt the caller assembled.

    The server signs only if its own statement in the receipt is the one it
    signs for a finished job of the caller, and every statement of the
    receipt verifies against its federation file (the cosignatures aside).
    """
    state = state_of(request)
    body = await read_body(request)
    if not isinstance(body, dict) or set(body) != {"receipt"}:
        raise BadRequest(_BODY_RULE)
    receipt = body["receipt"]
    identity = _identity(state)
    if identity is None:
        raise NotFound("this server has no identity to sign with")
    try:
        return await _cosign(request, receipt, identity)
    except ReceiptError as error:
        raise BadRequest(f"{error}; {_BODY_RULE}") from None
    except (TypeError, ValueError, RecursionError):
        raise BadRequest(f"the receipt holds what is not plain data; {_BODY_RULE}") from None


async def _cosign(request: Request, receipt: Any, identity: Identity) -> Response:
    """:func:`cosign` once the body is read; ReceiptError and TypeError become 400 there."""
    principal, state = caller(request), state_of(request)
    format_.check_format(receipt)
    own = receipt["statements"].get(identity.name)
    if own is None:
        raise BadRequest(
            f"the receipt holds no statement of this server ('{identity.name}'): send each "
            "party the receipt of a job it took part in"
        )
    handle = parse_handle(own["statement"]["result"], "result", "statement.result")
    audit_refusals(request, "cosign", handle)
    current = await state.bus.get_job(handle)
    if current is None:
        raise NotFound("no result with this handle")
    record = current[0]
    check_owner(record.owner, principal.name, "result")
    if record.status != "done":
        raise Conflict("the job has not succeeded: only a released result has a receipt")
    expected = receipts.signed_statement(identity, handle, record)
    if format_.canonical(expected) != format_.canonical(own):
        raise Conflict(
            "this server's statement in the receipt is not the one it signs for the job: "
            "send the statement its result view carries, unchanged"
        )
    format_.verify_receipt(receipt, _member_keys(state, identity), cosignatures=False)
    signature = identity.sign(format_.cosigned_bytes(receipt))
    refusals_end(request)
    state.audit.write(principal.name, "cosign", handle)
    return respond(
        request,
        {"server": identity.name, "cosignature": base64.b64encode(signature).decode("ascii")},
    )
