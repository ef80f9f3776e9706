"""The API controller: authenticate, validate, put on the bus, answer with a handle.

The controller holds no data. An upload's body is streamed chunk by chunk
into the JetStream object store; every other request becomes one NATS
request to a microservice, whether that microservice runs in this process
or in a worker elsewhere. Answers are handles, statuses, schemas and
results, never a dataset's content (invariant 1).

Errors are JSON problem documents (RFC 9457) with a human ``detail``, mapped
from :mod:`fdrtd_server.errors` in one exception handler. Bodies are JSON or
msgpack, chosen by ``Content-Type``; answers are msgpack when ``Accept``
asks for ``application/msgpack``, else JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fdrtd_client import wire
from fdrtd_server import openapi
from fdrtd_server.audit import JOBS_SUBJECT, AuditLog
from fdrtd_server.bus import (
    SERVICE_PREFIX,
    Bus,
    JobRecord,
    StoreLimits,
    check_owner,
    new_handle,
    parse_handle,
)
from fdrtd_server.config import NAME_RULE as SERVER_NAME
from fdrtd_server.config import Settings, TokenStore
from fdrtd_server.custody import CustodyStore
from fdrtd_server.errors import (
    BadRequest,
    Conflict,
    FdrtdError,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
    error_for_status,
)
from fdrtd_server.identity import Identity
from fdrtd_server.inputs import Signature, sent_name
from fdrtd_server.microservice import SIGNATURE_METADATA

__all__ = ["Principal", "bus_request", "create_app"]

log = logging.getLogger("fdrtd.controller")
NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
BUS_TIMEOUT = 30.0
MAX_WAIT = 60.0
SSE_LIMIT = 600.0
"""An event stream ends after this many seconds; reconnect to follow longer jobs."""
_HANDLE_TEXT = re.compile(r"[dr]-[0-9a-f]{40}")
"""What a handle looks like: a path segment that is not one is not written to the log."""
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{22,64}")
"""A session id: at least 22 characters (128 bits if drawn at random, e.g.
``secrets.token_urlsafe(16)``; ``secrets.token_hex(16)`` gives 32), so that no
client can guess, pre-claim or collide with another's id."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name and role."""

    name: str
    role: str


@dataclass
class State:
    """What the running controller holds: connections, never data."""

    settings: Settings
    bus: Bus
    tokens: TokenStore
    audit: AuditLog
    extra: dict[str, Any]
    custody: CustodyStore


def _state(request: Request) -> State:
    state: State = request.app.state.fdrtd
    return state


def problem(status: int, title: str, detail: str) -> JSONResponse:
    """An RFC 9457 problem document."""
    return JSONResponse(
        {"type": "about:blank", "title": title, "status": status, "detail": detail},
        status_code=status,
        media_type="application/problem+json",
    )


def respond(request: Request, body: Any, status: int = 200) -> Response:
    """Answer in msgpack if the client accepts it, else JSON."""
    if wire.MSGPACK in request.headers.get("accept", ""):
        return Response(wire.packb(body), status_code=status, media_type=wire.MSGPACK)
    return JSONResponse(wire.to_jsonable(body), status_code=status)


DATA_ROLES = ("owner", "analyst")
"""Who uploads, computes and fetches results: owners and analysts, not admins."""
OWNER_ROLES = ("owner", "admin")
ADMIN_ROLES = ("admin",)


def authenticate(request: Request, roles: tuple[str, ...] | None = None) -> Principal:
    """The caller behind the ``Authorization: Bearer`` token, if its role is one of ``roles``.

    Raises:
        Unauthorized: If the header is missing or the token unknown.
        Forbidden: If the token's role may not use the route (audited).
    """
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        _audit_refused_login(request, "no bearer token")
        raise Unauthorized("send your token as 'Authorization: Bearer <token>'")
    found = _state(request).tokens.authenticate(token.strip())
    if found is None:
        _audit_refused_login(request, "unknown token")
        raise Unauthorized("the token is not valid on this server")
    principal = Principal(*found)
    request.state.principal = principal  # for the audit of a refusal further on
    if roles is not None and principal.role not in roles:
        _state(request).audit.write(
            principal.name,
            "authorize",
            request.url.path[:200],
            "refused 403",
            role=principal.role,
            method=request.method,
        )
        raise Forbidden(
            f"this route is for {' and '.join(r + 's' for r in roles)}; the role of your "
            f"token is '{principal.role}'"
        )
    return principal


def _audit_refused_login(request: Request, reason: str) -> None:
    """Record a refused authentication: route and client address, never the token."""
    client = request.client.host if request.client else ""
    _state(request).audit.write(
        "anonymous",
        "authenticate",
        request.url.path[:200],
        "refused",
        reason=reason,
        method=request.method,
        client=client,
    )


def _audit_result(
    state: State, principal: str, handle: str, view: dict[str, Any], via: str
) -> None:
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


async def read_limited(request: Request, limit: int, what: str) -> bytes:
    """The whole body, refused as soon as it is known to exceed ``limit`` bytes.

    Raises:
        PayloadTooLarge: Naming ``what`` and the limit.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"{what} is larger than the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"{what} is larger than the limit of {limit} bytes")
    return bytes(body)


async def read_body(request: Request) -> Any:
    """Read and decode a JSON or msgpack body within the size limit.

    Raises:
        PayloadTooLarge, UnsupportedMediaType, BadRequest.
    """
    body = await read_limited(request, _state(request).settings.max_body_bytes, "request body")
    media = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if media == wire.MSGPACK:
        return wire.unpackb(bytes(body))
    if media in ("application/json", ""):
        return wire.json_loads(bytes(body))
    raise UnsupportedMediaType("send the body as application/json or application/msgpack")


async def bus_request(
    bus: Bus, subject: str, message: dict[str, Any], timeout: float = BUS_TIMEOUT
) -> Any:
    """Send one request on the bus and decode the answer or raise its error.

    Raises:
        NotFound: If no microservice listens on ``subject``.
        ServiceUnavailable: If it does not answer in time.
        FdrtdError: Whatever the microservice raised, rebuilt from status and message.
    """
    try:
        payload = wire.packb(message)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(
            "the request holds a value that cannot be sent on (e.g. an integer beyond 64 bits)"
        ) from None
    try:
        reply = await bus.nc.request(subject, payload, timeout=timeout)
    except nats.errors.NoRespondersError:
        parts = subject.split(".")
        raise NotFound(
            f"no microservice '{parts[2]}' with a function '{parts[3]}' runs on this server"
        ) from None
    except nats.errors.TimeoutError:
        raise ServiceUnavailable("the microservice did not answer in time; try again") from None
    headers = reply.headers or {}
    if "Nats-Service-Error-Code" in headers:
        code = headers["Nats-Service-Error-Code"]
        status = int(code) if code.isdigit() else 500
        raise error_for_status(status, headers.get("Nats-Service-Error", "microservice error"))
    return wire.unpackb(reply.data)


async def call_service(
    request: Request,
    microservice: str,
    function: str,
    inputs: dict[str, Any],
    *,
    principal: Principal | None = None,
    bus_timeout: float = BUS_TIMEOUT,
    **extra: Any,
) -> Any:
    """Call ``fdrtd.svc.<microservice>.<function>`` for ``principal`` (authenticated if None)."""
    principal = principal or authenticate(request)
    message = {"principal": principal.name, "role": principal.role, "inputs": inputs, **extra}
    return await bus_request(
        _state(request).bus, f"{SERVICE_PREFIX}.{microservice}.{function}", message, bus_timeout
    )


# -- routes ------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    """Liveness: the process answers and is connected to its NATS.

    A controller whose NATS went away for good cannot do anything but exit (it
    does, see :mod:`fdrtd_server.server`); until it has, it is not healthy.
    While it reconnects (an external NATS restarting, for up to
    ``nats_reconnect_seconds``) it is not healthy either, and is again once
    connected.
    """
    state = _state(request)
    if state.extra.get("nats_lost") or state.bus.lost:
        return problem(503, "Not healthy", "the NATS server stopped; this server is exiting")
    if not state.bus.connected:
        return problem(503, "Not healthy", "reconnecting to NATS")
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Readiness: connected to NATS and the data microservice answers."""
    state = _state(request)
    if not state.bus.connected:
        return problem(503, "Not ready", "not connected to NATS")
    try:
        await state.bus.nc.request(f"{SERVICE_PREFIX}.data.describe", wire.packb({}), timeout=2)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return problem(503, "Not ready", "the data microservice is not running")
    return JSONResponse({"status": "ready", "server": state.settings.name})


async def openapi_document(request: Request) -> Response:
    """The OpenAPI 3.1 description of this API, with the functions running on its bus."""
    state = _state(request)
    return JSONResponse(openapi.document(state.settings, await _computations(state)))


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
    record always says what became of the upload.
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
    principal = authenticate(request, DATA_ROLES)
    state = _state(request)
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
    try:
        size = await state.bus.put_stream(handle, request.stream(), limit)
    except PayloadTooLarge:
        state.audit.write(principal.name, "upload", handle, "refused 413")
        raise PayloadTooLarge(refusal) from None
    except FdrtdError as error:  # a full store (507), the bus gone (503)
        state.audit.write(principal.name, "upload", handle, f"refused {error.status}")
        raise
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
    principal = authenticate(request, DATA_ROLES)
    answer = await call_service(request, "data", "list", {}, principal=principal)
    _state(request).audit.write(principal.name, "list", "data")
    return respond(request, answer)


async def describe_data(request: Request) -> Response:
    """A dataset's schema: columns, dtypes, row count. Never its content."""
    principal = authenticate(request, DATA_ROLES)
    state = _state(request)
    handle = request.path_params["handle"]
    # a handle that is not one is named as such: the path is the client's text
    target = handle if _HANDLE_TEXT.fullmatch(handle) else "(not a handle)"
    try:
        answer = await call_service(
            request, "data", "describe", {"handle": handle}, principal=principal
        )
    except FdrtdError as error:
        state.audit.write(principal.name, "describe", target, f"refused {error.status}")
        raise
    state.audit.write(principal.name, "describe", target)
    return respond(request, answer)


async def release_data(request: Request) -> Response:
    """Delete a dataset the caller owns (unpublish it first if it is published)."""
    principal = authenticate(request, DATA_ROLES)
    handle = request.path_params["handle"]
    try:
        published = [
            name
            for name, entry in _state(request).custody.datasets().items()
            if entry.handle == handle and entry.owner == principal.name
        ]
        if published:
            raise Conflict(
                f"this upload is published as the dataset '{published[0]}': withdraw it first "
                f"(DELETE /v1/datasets/{published[0]})"
            )
        answer = await call_service(
            request, "data", "release", {"handle": handle}, principal=principal
        )
    except FdrtdError as error:
        target = handle if _HANDLE_TEXT.fullmatch(handle) else "(not a handle)"
        _state(request).audit.write(principal.name, "release", target, f"refused {error.status}")
        raise
    _state(request).audit.write(principal.name, "release", handle)
    return respond(request, answer)


def _check_session(session: Any) -> dict[str, Any] | None:
    if session is None:
        return None
    if not isinstance(session, dict):
        raise BadRequest("'session' must be a map with 'id' and 'parties'")
    _refuse_unknown_keys(session, SESSION_KEYS, "'session'")
    sid, parties = session.get("id"), session.get("parties")
    if not isinstance(sid, str) or not SESSION_ID.fullmatch(sid):
        raise BadRequest(
            "'session.id' must be 22 to 64 letters, digits, '-' or '_', drawn at random "
            "(at least 128 bits, e.g. Python's secrets.token_urlsafe(16)) so that nobody "
            "can guess it"
        )
    if (
        not isinstance(parties, list)
        or not 2 <= len(parties) <= 64
        or not all(isinstance(p, str) and SERVER_NAME.fullmatch(p) for p in parties)
        or len(set(parties)) != len(parties)
    ):
        raise BadRequest("'session.parties' must list 2 to 64 distinct server names")
    return {"id": sid, "parties": parties}


COMPUTE_KEYS = ("microservice", "function", "inputs", "session")
"""The keys of a ``POST /v1/compute`` body."""
SESSION_KEYS = ("id", "parties")
"""The keys of its ``session``."""
_INT64 = (-(2**63), 2**64 - 1)
"""The integers msgpack (and so the bus) carries: int64 and uint64."""


def _refuse_unknown_keys(body: dict[Any, Any], known: tuple[str, ...], where: str) -> None:
    """Refuse a key of ``body`` that is not one of ``known`` (named if it looks like a name).

    Raises:
        BadRequest: Naming ``where``, the key and the accepted keys.
    """
    unknown = [key for key in body if key not in known]
    if unknown:
        named = sent_name(unknown[0], "a key")
        raise BadRequest(
            f"{where} has {named} that is not one of its keys; its keys are "
            f"{', '.join(known)}: check the spelling, or move the value under 'inputs'"
        )


def _wide_ints_as_floats(value: Any) -> Any:
    """``value`` with integers beyond 64 bits as floats, which the bus can carry.

    JSON has one kind of number: ``1e30`` and ``1000000000000000000000000000000``
    are the same value, and the second is sent on as the first. A declared
    ``integer`` input refuses it then by its range, with a message naming it.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
        try:
            return float(value)
        except OverflowError:
            return value  # beyond the float range too: refused by bus_request
    if isinstance(value, dict):
        return {key: _wide_ints_as_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_wide_ints_as_floats(item) for item in value]
    return value


def _strings(value: Any, depth: int = 0) -> set[str]:
    """The short strings in ``value`` (the dataset names a request may mention)."""
    if isinstance(value, str):
        return {value} if len(value) <= 63 else set()
    if depth > 8:
        return set()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        found: set[str] = set()
        for item in value[:4096]:
            found |= _strings(item, depth + 1)
        return found
    return set()


def _wait_and_value(request: Request) -> tuple[float, bool]:
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


async def compute(request: Request) -> Response:
    """Start a computation; answer its result handle (202), or its end (200).

    ``?wait=s`` holds the request up to ``s`` seconds for the job to end: a
    job that finished (done or failed) by then is answered 200 with the view
    ``GET /v1/results/{handle}`` gives (its value left out with
    ``&value=false``), so that a fast computation costs one request.
    Otherwise, and with the default ``wait=0``, the answer is 202 ``{result,
    status}``. Both parameters are checked before anything starts.

    The microservice itself holds its answer (the bus request's ``wait``) and
    sends the final record along, having written it once: no "running" record,
    no watch on the jobs bucket and no second read for a fast job.
    """
    principal = authenticate(request, DATA_ROLES)
    state = _state(request)
    wait, with_value = _wait_and_value(request)
    body = await read_body(request)
    if not isinstance(body, dict):
        raise BadRequest("body must be a map with 'microservice', 'function' and 'inputs'")
    _refuse_unknown_keys(body, COMPUTE_KEYS, "the body")
    names: list[str] = []
    for key in ("microservice", "function"):
        value = body.get(key)
        if not isinstance(value, str) or not NAME.fullmatch(value):
            raise BadRequest(f"'{key}' must be a name of lowercase letters, digits and '_'")
        names.append(value)
    microservice, function = names
    inputs = body.get("inputs", {})
    if not isinstance(inputs, dict):
        raise BadRequest("'inputs' must be a map")
    inputs = _wide_ints_as_floats(inputs)
    allowed = state.settings.microservices
    if allowed and microservice not in allowed:
        raise NotFound(f"no microservice '{microservice}' is enabled on this server")
    session = _check_session(body.get("session"))
    handle = new_handle("result")
    try:
        answer = await call_service(
            request,
            microservice,
            function,
            inputs,
            principal=principal,
            result=handle,
            session=session,
            datasets=state.custody.usable(
                principal.name, principal.role, microservice, function, _strings(inputs)
            ),
            bus_timeout=BUS_TIMEOUT + wait,
            **({"wait": wait, "value": with_value} if wait > 0 else {}),
        )
    except FdrtdError as error:
        state.audit.write(
            principal.name, "compute", f"{microservice}.{function}", f"refused {error.status}"
        )
        raise
    state.audit.write(
        principal.name, "compute", handle, microservice=microservice, function=function
    )
    if not isinstance(answer, dict) or answer.get("result") != handle:
        raise BadRequest(f"'{microservice}.{function}' is not a computation; it cannot be started")
    final = answer.get("record")
    if isinstance(final, dict):
        record = JobRecord.from_dict(final)
        if record.finished:
            view = await _view(state, handle, record, with_value)
            _audit_result(state, principal.name, handle, view, "compute")
            return respond(request, view)
    return respond(request, {"result": handle, "status": answer.get("status", "queued")}, 202)


async def _owned_job(request: Request, action: str) -> tuple[State, str, Principal]:
    """The result handle in the path, if the caller owns it; a refusal is audited."""
    principal = authenticate(request, DATA_ROLES)
    state = _state(request)
    text = request.path_params["handle"]
    try:
        handle = parse_handle(text, "result")
        current = await state.bus.get_job(handle)
        if current is None:
            raise NotFound("no result with this handle")
        check_owner(current[0].owner, principal.name, "result")
    except FdrtdError as error:
        target = text if _HANDLE_TEXT.fullmatch(text) else "(not a handle)"
        state.audit.write(principal.name, action, target, f"refused {error.status}")
        raise
    return state, handle, principal


async def _view(
    state: State, handle: str, record: JobRecord, with_value: bool = True
) -> dict[str, Any]:
    view: dict[str, Any] = {
        "result": handle,
        "status": record.status,
        "progress": record.progress,
        "microservice": record.microservice,
        "function": record.function,
        "created": record.created,
        "updated": record.updated,
    }
    if record.status == "done" and with_value:
        view["value"] = await state.bus.job_result(handle, record)
    elif record.status == "failed":
        view["error"] = {"status": record.error_status, "detail": record.error}
    if record.datasets:
        view["datasets"] = record.datasets
    return view


async def _job_view(
    state: State, handle: str, wait: float, with_value: bool = True
) -> dict[str, Any]:
    record = await state.bus.wait_job(handle, wait)
    if record is None:
        raise NotFound("no result with this handle")
    return await _view(state, handle, record, with_value)


async def get_result(request: Request) -> Response:
    """A computation's status and, once done, its value; ``?wait=s`` long-polls."""
    state, handle, principal = await _owned_job(request, "result")
    wait, with_value = _wait_and_value(request)
    view = await _job_view(state, handle, wait, with_value)
    _audit_result(state, principal.name, handle, view, "poll")
    return respond(request, view)


async def result_events(request: Request) -> Response:
    """Server-sent events: the status while running, then the final state."""
    state, handle, principal = await _owned_job(request, "result")

    async def events() -> AsyncIterator[bytes]:
        async for record in state.bus.watch_job(handle, SSE_LIMIT):
            view = await _view(state, handle, record)
            payload = json.dumps(wire.to_jsonable(view))
            if record.finished:
                _audit_result(state, principal.name, handle, view, "events")
            yield f"event: status\ndata: {payload}\n\n".encode()
            if record.finished:
                return
        yield b"event: timeout\ndata: {}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def release_result(request: Request) -> Response:
    """Delete a result the caller owns."""
    state, handle, principal = await _owned_job(request, "release")
    await state.bus.delete_job(handle)
    state.audit.write(principal.name, "release", handle)
    return respond(request, {"result": handle, "released": True})


async def _service_infos(bus: Bus) -> list[dict[str, Any]]:
    """The ``$SRV.INFO`` answers of the fdrtd microservices on the bus (one per instance)."""
    inbox = bus.nc.new_inbox()
    infos: list[dict[str, Any]] = []
    sub = await bus.nc.subscribe(inbox)
    try:
        await bus.nc.publish("$SRV.INFO", b"", reply=inbox)
        deadline = asyncio.get_running_loop().time() + 1.0
        with contextlib.suppress(asyncio.TimeoutError, nats.errors.TimeoutError):
            # collect replies until none came for 0.25 s, or for 1 s in all
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                msg = await sub.next_msg(timeout=min(0.25, left))
                with contextlib.suppress(ValueError):
                    info = json.loads(msg.data)
                    if isinstance(info, dict) and (info.get("metadata") or {}).get(
                        "fdrtd.microservice"
                    ):
                        infos.append(info)
    finally:
        await sub.unsubscribe()
    return infos


async def list_microservices(request: Request) -> Response:
    """The microservices running on this server's bus, from ``$SRV.INFO``."""
    principal = authenticate(request)
    _state(request).audit.write(principal.name, "list", "microservices")
    found: dict[str, dict[str, Any]] = {}
    for info in await _service_infos(_state(request).bus):
        name = info["metadata"]["fdrtd.microservice"]
        entry = found.setdefault(
            name,
            {
                "name": name,
                "version": info.get("version"),
                "description": info.get("description"),
                "functions": {},
                "instances": 0,
            },
        )
        entry["instances"] += 1
        for endpoint in info.get("endpoints", []):
            entry["functions"][endpoint["name"]] = (endpoint.get("metadata") or {}).get(
                "kind", "job"
            )
    return respond(request, {"microservices": sorted(found.values(), key=lambda e: str(e["name"]))})


async def _computations(state: State) -> dict[str, dict[str, Signature]]:
    """The jobs of the microservices on the bus, with the signatures they declared.

    Read from the endpoint metadata, so that the functions of microservices
    that run in workers elsewhere are described as well as those in this
    process. A function whose metadata carries no signature (an older
    worker) is described as taking any inputs.
    """
    allowed = state.settings.microservices
    functions: dict[str, dict[str, Signature]] = {}
    for info in await _service_infos(state.bus):
        name = str(info["metadata"]["fdrtd.microservice"])
        if allowed and name not in allowed:
            continue
        endpoints = info.get("endpoints")
        for endpoint in endpoints if isinstance(endpoints, list) else []:
            if not isinstance(endpoint, dict):
                continue
            metadata = endpoint.get("metadata") or {}
            if not isinstance(metadata, dict) or metadata.get("kind", "job") != "job":
                continue
            function = str(endpoint.get("name"))
            functions.setdefault(name, {})[function] = _signature(name, function, metadata)
    return functions


def _signature(microservice: str, function: str, metadata: dict[str, Any]) -> Signature:
    """The signature in an endpoint's metadata, or an undeclared one if it is missing or broken.

    The metadata comes from a plugin, possibly an old or a broken one: whatever
    it holds, ``/v1/openapi.json`` must still be served. A broken declaration
    is logged (by name only) and the function described as taking any map.
    """
    text = metadata.get(SIGNATURE_METADATA)
    if text is None:
        return Signature()  # an older worker: nothing declared
    try:
        signature = Signature.from_dict(json.loads(text))
        # what document() will ask of it, so that it cannot fail there
        signature.inputs_schema()
        signature.outputs_schema()
        return signature
    except Exception as error:  # any bug of a plugin: only its endpoint is degraded
        log.warning(
            "the declaration of %s.%s in its endpoint metadata is broken (%s); it is "
            "described as taking any inputs: fix the plugin's inputs= and outputs=",
            microservice[:64],
            function[:64],
            type(error).__name__,
        )
        return Signature()


async def identity(request: Request) -> Response:
    """This server's public peer entry (name, URL, public keys)."""
    entry = _state(request).extra.get("public_entry")
    if entry is None:
        raise NotFound("this server has no identity")
    return respond(request, entry)


# -- errors ------------------------------------------------------------------


async def fdrtd_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, FdrtdError)
    return problem(error.status, error.title, error.message)


async def wire_error(request: Request, error: Exception) -> Response:
    return problem(400, "Bad request", str(error))


async def http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    detail = {
        404: "no such route; see /v1/openapi.json",
        405: "this route does not accept that method",
    }
    answer = problem(
        error.status_code, "HTTP error", detail.get(error.status_code, str(error.detail))
    )
    # e.g. the Allow header of a 405 (RFC 9110, section 15.5.6)
    answer.headers.update(error.headers or {})
    return answer


_BUS_DOWN: tuple[type[Exception], ...] = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoServersError,
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,
)
"""What nats-py raises when NATS (or JetStream) does not answer: the bus is away, not
our code broken. Where a route expects one of these it handles it itself."""


async def bus_down(request: Request, error: Exception) -> Response:
    """503 for a request that met a closed or unanswering bus (NATS stopped or restarting)."""
    return problem(
        503,
        "Service unavailable",
        "this server cannot reach its NATS server right now; try again in a minute",
    )


async def internal_error(request: Request, error: Exception) -> Response:
    if isinstance(error, _BUS_DOWN):  # the peer fast path calls this handler directly
        return await bus_down(request, error)
    incident = secrets.token_hex(6)
    # the message of an unexpected error may hold data: log its type and frames only
    log.error(
        "internal error %s on %s %s: %s\n%s",
        incident,
        request.method,
        request.url.path,
        type(error).__name__,
        "".join(traceback.format_tb(error.__traceback__)),
    )
    return problem(
        500, "Internal error", f"internal error (incident {incident}); the server log has details"
    )


ExtraRoutes = list[Route]


def _route(path: str, **by_method: Callable[[Request], Awaitable[Response]]) -> Route:
    """One route for ``path`` that hands each method to its endpoint.

    Starlette answers a method that no route of a path takes from the first
    route whose path matches, so two routes for one path would answer 405
    with an ``Allow`` header naming only the first one's methods.
    """

    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await by_method[method](request)

    endpoint.__name__ = endpoint.__qualname__ = "_".join(f.__name__ for f in by_method.values())
    return Route(path, endpoint, methods=list(by_method))


def open_audit_log(settings: Settings) -> AuditLog:
    """The audit log of ``settings.home``, its checkpoints signed by the server's identity."""
    try:
        signer: Identity | None = Identity.load(settings.home / "identity", settings.name)
    except FileNotFoundError:
        signer = None
        log.warning(
            "no identity in %s: the audit log is a bare hash chain without signed checkpoints",
            settings.home / "identity",
        )
    return AuditLog(settings.home / "audit.log", signer)


def _job_ended(state: State) -> Callable[[Any], Awaitable[None]]:
    """A callback that records the end of a job, as a microservice reported it."""

    async def record(msg: Any) -> None:
        try:
            event = wire.unpackb(msg.data)
            handle = parse_handle(event.get("result"), "result")
            status = event.get("status")
            if status not in ("done", "failed"):
                raise ValueError("unknown status")
            extra: dict[str, Any] = {
                "microservice": str(event.get("microservice", ""))[:64],
                "function": str(event.get("function", ""))[:64],
            }
            if status == "failed":
                extra["error_status"] = int(event.get("error_status", 0))
                extra["error_class"] = str(event.get("error_class", ""))[:64]
            datasets = event.get("datasets")
            if isinstance(datasets, dict) and datasets:
                extra["datasets"] = ",".join(
                    f"{str(name)[:64]}@{str(version)[:16]}" for name, version in datasets.items()
                )
            state.audit.write(
                str(event.get("principal", ""))[:64], "job-end", handle, status, **extra
            )
        except Exception as error:  # a malformed report must not stop the subscription
            log.warning(
                "ignored a malformed job report on %s: %s", JOBS_SUBJECT, type(error).__name__
            )

    return record


def create_app(
    settings: Settings,
    nats_url: str,
    *,
    on_start: Callable[[State], Awaitable[None]] | None = None,
    on_stop: Callable[[State], Awaitable[None]] | None = None,
    extra_routes: ExtraRoutes | None = None,
) -> Starlette:
    """Build the controller app; its lifespan connects to NATS at ``nats_url``.

    The audit log is opened here, before anything serves: a log that does not
    match its signed checkpoint stops the server from starting.

    Raises:
        AuditError: If the audit log fails verification against its checkpoint.
        PermissionError: If the identity key file is readable by others.
    """
    from fdrtd_server import custody_api  # local: it imports this module

    audit = open_audit_log(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        bus = await Bus.connect(
            nats_url,
            name=f"fdrtd-controller-{settings.name}",
            limits=StoreLimits.from_settings(settings),
        )
        state = State(
            settings=settings,
            bus=bus,
            tokens=TokenStore(settings.home),
            audit=audit,
            extra={},
            custody=CustodyStore(settings.home),
        )
        app.state.fdrtd = state

        # how each job ended, reported by the microservices wherever they run
        await bus.nc.subscribe(JOBS_SUBJECT, queue="fdrtd-audit", cb=_job_ended(state))
        try:
            if on_start is not None:
                await on_start(state)
            yield
        finally:
            try:
                if on_stop is not None:
                    await on_stop(state)
                await bus.close()  # drains: job ends reported while stopping are recorded
            finally:
                audit.close()  # the final checkpoint

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/v1/openapi.json", openapi_document),
        Route("/v1/identity", identity),
        Route("/v1/microservices", list_microservices),
        _route("/v1/data", POST=upload, GET=list_data),
        _route("/v1/data/{handle}", GET=describe_data, DELETE=release_data),
        Route("/v1/compute", compute, methods=["POST"]),
        _route("/v1/results/{handle}", GET=get_result, DELETE=release_result),
        Route("/v1/results/{handle}/events", result_events, methods=["GET"]),
        *custody_api.routes(),
        *(extra_routes or []),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            FdrtdError: fdrtd_error,
            wire.WireError: wire_error,
            HTTPException: http_error,
            **dict.fromkeys(_BUS_DOWN, bus_down),
            Exception: internal_error,
        },
    )
