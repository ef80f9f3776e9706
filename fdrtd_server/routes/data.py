"""The data routes: upload a dataset, list the caller's, describe one, release one.

An upload's body is streamed chunk by chunk into the JetStream object store
and then registered by the ``data`` microservice; the other routes are one
bus request each. Answers are handles and schemas, never a dataset's
content (invariant 1).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from fdrtd_server.bus import SERVICE_PREFIX, new_handle
from fdrtd_server.errors import (
    BadRequest,
    Conflict,
    FdrtdError,
    PayloadTooLarge,
    ServiceUnavailable,
)
from fdrtd_server.http_common import (
    BUS_TIMEOUT,
    Principal,
    State,
    audit_refusals,
    bus_request,
    call_service,
    caller,
    handle_target,
    refusals_end,
    respond,
    state_of,
)

__all__ = [
    "MAX_SHAPE_DIMS",
    "PARSED_FORMATS",
    "REGISTER_BUDGET",
    "UPLOAD_FORMATS",
    "describe_data",
    "list_data",
    "release_data",
    "upload",
]

UPLOAD_FORMATS = ("raw", "csv", "parquet", "msgpack", "json")
PARSED_FORMATS = ("msgpack", "json")
"""Upload formats parsed whole in memory, so limited to ``max_parse_bytes``; csv and
parquet are converted in bounded memory, raw arrays are never parsed."""
MAX_SHAPE_DIMS = 8
"""The most dimensions of a raw array (as :mod:`fdrtd_client.wire` accepts)."""
REGISTER_BUDGET = BUS_TIMEOUT - 5.0
"""Seconds the data microservice may take to register an upload. It records nothing
after that, so that when the controller stops waiting (at :data:`BUS_TIMEOUT`, 5 s
later) and deletes the upload, no dataset of it can appear afterwards."""
_RAW_HINT = (
    "send large numeric data as a raw array instead (format=raw; Client.upload(numpy_array) "
    "does), which is stored without being parsed"
)


def _upload_limit(state: State, fmt: str, used: int) -> tuple[int, str]:
    """The most bytes this upload may have, and the refusal to give if it has more."""
    settings = state.settings
    limits = [
        (
            settings.max_upload_bytes,
            f"upload is larger than this server's limit of {settings.max_upload_bytes} bytes",
        )
    ]
    if fmt in PARSED_FORMATS:
        limits.append(
            (
                settings.max_parse_bytes,
                f"{fmt} uploads are limited to {settings.max_parse_bytes} bytes on this server "
                f"(its max_parse_bytes setting), because they are parsed in memory; {_RAW_HINT}",
            )
        )
    quota = settings.max_client_bytes
    limits.append(
        (
            max(0, quota - used),
            f"this upload would take your datasets on this server over your quota of {quota} "
            f"bytes (they take {used} bytes now): release datasets you no longer need "
            "(DELETE /v1/data/{handle}), or ask the server's owner to raise max_client_bytes",
        )
    )
    return min(limits, key=lambda limit: limit[0])


async def _register(
    state: State, principal: Principal, handle: str, inputs: dict[str, Any]
) -> dict[str, Any]:
    """Have the data microservice register an upload; audit and clean up by the outcome.

    Runs to its end even if the HTTP request is given up, so that the audit
    record always says what became of the upload: it is a task of its own, so
    it writes its records itself (with the upload's size), not through the
    route's audit of refusals.
    """
    size = inputs["size"]
    message = {"principal": principal.name, "role": principal.role, "inputs": inputs}
    subject = f"{SERVICE_PREFIX}.data.register"
    try:
        described: dict[str, Any] = await bus_request(state.bus, subject, message, BUS_TIMEOUT)
    except ServiceUnavailable as error:
        # the microservice gave up, or we stopped waiting after its budget was over:
        # either way it records nothing now, and what it stored is deleted here
        await state.bus.delete_set(handle)
        await state.bus.delete_object(handle)
        state.audit.write(principal.name, "upload", handle, f"refused {error.status}", bytes=size)
        raise
    except FdrtdError as error:
        await state.bus.delete_object(handle)  # the microservice deleted it too
        state.audit.write(principal.name, "upload", handle, f"refused {error.status}", bytes=size)
        raise
    except BaseException:
        # stopping: the outcome is not known here (the microservice cleans up its failures)
        state.audit.write(principal.name, "upload", handle, "interrupted", bytes=size)
        raise
    state.audit.write(principal.name, "upload", handle, bytes=size)
    return described


async def upload(request: Request) -> Response:
    """Stream a dataset into the object store and register it; answer its handle.

    Every limit is checked before anything is stored when the body's length is
    declared, and while it streams otherwise: the upload size, the parse limit
    for json and msgpack (csv and parquet are converted in bounded memory), and
    what is left of the client's quota.
    """
    principal = caller(request)
    state = state_of(request)
    params = request.query_params
    fmt = params.get("format", "raw")
    if fmt not in UPLOAD_FORMATS:
        raise BadRequest(f"'format' must be one of {', '.join(UPLOAD_FORMATS)}")
    inputs: dict[str, Any] = {"format": fmt}
    if "dtype" in params:
        inputs["dtype"] = params["dtype"]
    if "shape" in params:
        try:
            inputs["shape"] = [int(n) for n in params["shape"].split(",") if n.strip()]
        except ValueError:
            raise BadRequest("'shape' must be comma-separated non-negative integers") from None
        if not all(0 <= n < 2**62 for n in inputs["shape"]):
            raise BadRequest("'shape' must hold non-negative integers below 2^62")
        if not 1 <= len(inputs["shape"]) <= MAX_SHAPE_DIMS:
            raise BadRequest(
                f"'shape' must give 1 to {MAX_SHAPE_DIMS} comma-separated sizes (e.g. shape=1000,3)"
            )
    usage = await call_service(request, "data", "usage", {}, principal=principal)
    limit, refusal = _upload_limit(state, fmt, int(usage["bytes"]))
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(refusal)
    handle = new_handle("data")
    audit_refusals(request, "upload", handle)  # a full store (507), the bus gone (503), 413
    try:
        size = await state.bus.put_stream(handle, request.stream(), limit)
    except PayloadTooLarge:
        raise PayloadTooLarge(refusal) from None
    refusals_end(request)  # from here on, _register audits the outcome
    inputs.update(
        handle=handle,
        size=size,
        max_parse_bytes=state.settings.max_parse_bytes,
        max_client_bytes=state.settings.max_client_bytes,
        budget=REGISTER_BUDGET,
    )
    registering = asyncio.ensure_future(_register(state, principal, handle, inputs))
    # if the request is given up, the outcome is still audited by _register: retrieve it here
    registering.add_done_callback(lambda task: task.cancelled() or task.exception())
    # shielded: a request given up half-way must not leave the upload half-registered
    described = await asyncio.shield(registering)
    return respond(request, described, 201)


async def list_data(request: Request) -> Response:
    """The caller's datasets with their schemas."""
    principal = caller(request)
    answer = await call_service(request, "data", "list", {}, principal=principal)
    state_of(request).audit.write(principal.name, "list", "data")
    return respond(request, answer)


async def describe_data(request: Request) -> Response:
    """A dataset's schema: columns, dtypes, row count. Never its content."""
    principal = caller(request)
    handle = request.path_params["handle"]
    # a handle that is not one is named as such: the path is the client's text
    target = handle_target(handle)
    audit_refusals(request, "describe", target)
    answer = await call_service(
        request, "data", "describe", {"handle": handle}, principal=principal
    )
    state_of(request).audit.write(principal.name, "describe", target)
    return respond(request, answer)


async def release_data(request: Request) -> Response:
    """Delete a dataset the caller owns (unpublish it first if it is published)."""
    principal = caller(request)
    handle = request.path_params["handle"]
    audit_refusals(request, "release", handle_target(handle))
    published = [
        name
        for name, entry in state_of(request).custody.datasets().items()
        if entry.handle == handle and entry.owner == principal.name
    ]
    if published:
        raise Conflict(
            f"this upload is published as the dataset '{published[0]}': withdraw it first "
            f"(DELETE /v1/datasets/{published[0]})"
        )
    answer = await call_service(request, "data", "release", {"handle": handle}, principal=principal)
    state_of(request).audit.write(principal.name, "release", handle)
    return respond(request, answer)
