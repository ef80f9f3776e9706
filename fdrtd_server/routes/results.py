"""The result routes: a computation's status and value, its events, its release.

Only the caller who started a computation reaches its result; a handle that
is not theirs is answered like one that does not exist. Handing out a job's
end (its value or its error) is audited, never the value itself.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from fdrtd_client import wire
from fdrtd_server.bus import JobRecord, check_owner, parse_handle
from fdrtd_server.errors import BadRequest, NotFound
from fdrtd_server.http_common import (
    State,
    audit_refusals,
    caller,
    handle_target,
    refusals_end,
    respond,
    state_of,
)
from fdrtd_server.routes.receipts import view_receipt

__all__ = [
    "MAX_WAIT",
    "SSE_LIMIT",
    "audit_result",
    "get_result",
    "release_result",
    "result_events",
    "view",
    "wait_and_value",
]

MAX_WAIT = 60.0
"""The longest ``?wait=`` a request may ask for, in seconds."""
SSE_LIMIT = 600.0
"""An event stream ends after this many seconds; reconnect to follow longer jobs."""


def wait_and_value(request: Request) -> tuple[float, bool]:
    """The ``wait`` (seconds, 0 to MAX_WAIT) and ``value`` (boolean) query parameters.

    Shared by ``POST /v1/compute`` and ``GET /v1/results/{handle}``.

    Raises:
        BadRequest: If either is malformed or out of range.
    """
    try:
        wait = float(request.query_params.get("wait", "0"))
    except ValueError:
        raise BadRequest("'wait' must be a number of seconds") from None
    if not 0 <= wait <= MAX_WAIT:  # also refuses nan and inf
        raise BadRequest(f"'wait' must be between 0 and {MAX_WAIT:g} seconds")
    with_value = request.query_params.get("value", "true").lower()
    if with_value not in ("true", "false", "1", "0"):
        raise BadRequest("'value' must be true or false")
    return wait, with_value in ("true", "1")


def audit_result(state: State, principal: str, handle: str, view: dict[str, Any], via: str) -> None:
    """Record that a job's end (its value, or its error) was handed to ``principal``.

    Only the status goes in the record, never the value. A view of a job still
    running hands out nothing but progress and is not recorded.
    """
    status = view["status"]
    if status == "done":
        state.audit.write(principal, "result", handle, "done", via=via, value="value" in view)
    elif status == "failed":
        error = view.get("error") or {}
        state.audit.write(
            principal, "result", handle, "failed", via=via, error_status=error.get("status")
        )


async def view(
    state: State, handle: str, record: JobRecord, with_value: bool = True
) -> dict[str, Any]:
    """A job as the client sees it: status, progress and, once it ended, its value or error."""
    answer: dict[str, Any] = {
        "result": handle,
        "status": record.status,
        "progress": record.progress,
        "microservice": record.microservice,
        "function": record.function,
        "created": record.created,
        "updated": record.updated,
    }
    if record.status == "done" and with_value:
        answer["value"] = await state.bus.job_result(handle, record)
    elif record.status == "failed":
        answer["error"] = {"status": record.error_status, "detail": record.error}
    if record.datasets:
        answer["datasets"] = record.datasets
    if record.policy_version:
        answer["policy_version"] = record.policy_version  # the owner's policy it ran under
    receipt = view_receipt(state, handle, record)
    if receipt is not None:
        answer["receipt"] = receipt  # this server's signed statement (docs/api.md, Receipts)
    return answer


async def _owned_job(request: Request, action: str) -> str:
    """The result handle in the path, if the caller owns it; a refusal is audited as ``action``."""
    principal = caller(request)
    state = state_of(request)
    text = request.path_params["handle"]
    audit_refusals(request, action, handle_target(text))
    handle = parse_handle(text, "result")
    current = await state.bus.get_job(handle)
    if current is None:
        raise NotFound("no result with this handle")
    check_owner(current[0].owner, principal.name, "result")
    refusals_end(request)
    return handle


async def get_result(request: Request) -> Response:
    """A computation's status and, once done, its value; ``?wait=s`` long-polls."""
    handle = await _owned_job(request, "result")
    state = state_of(request)
    wait, with_value = wait_and_value(request)
    record = await state.bus.wait_job(handle, wait)
    if record is None:
        raise NotFound("no result with this handle")
    answer = await view(state, handle, record, with_value)
    audit_result(state, caller(request).name, handle, answer, "poll")
    return respond(request, answer)


async def result_events(request: Request) -> Response:
    """Server-sent events: the status while running, then the final state."""
    handle = await _owned_job(request, "result")
    state, principal = state_of(request), caller(request)

    async def events() -> AsyncIterator[bytes]:
        async for record in state.bus.watch_job(handle, SSE_LIMIT):
            answer = await view(state, handle, record)
            payload = json.dumps(wire.to_jsonable(answer))
            if record.finished:
                audit_result(state, principal.name, handle, answer, "events")
            yield f"event: status\ndata: {payload}\n\n".encode()
            if record.finished:
                return
        yield b"event: timeout\ndata: {}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def release_result(request: Request) -> Response:
    """Delete a result the caller owns."""
    handle = await _owned_job(request, "release")
    state = state_of(request)
    await state.bus.delete_job(handle)
    state.audit.write(caller(request).name, "release", handle)
    return respond(request, {"result": handle, "released": True})
