"""What every route of the controller shares: the caller, the audit of refusals, the codec.

The route modules (:mod:`fdrtd_server.routes`), the peer gateway and the
directory import this module, and :mod:`fdrtd_server.app` mounts them all:
none of them imports the app, so there is no cycle.

A route of the table in :func:`fdrtd_server.app.create_app` runs inside
:func:`guarded`: the caller is authenticated against the route's roles
first, and from the moment the route names what it is about
(:func:`audit_refusals`) until it says it is done (:func:`refusals_end`),
a refusal (an :class:`~fdrtd_server.errors.FdrtdError`) is written to the
audit log once, there, before it becomes a problem document. A refused
authentication is audited by :func:`authenticate` itself.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import nats.errors
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fdrtd_client import wire
from fdrtd_server.audit import AuditLog
from fdrtd_server.bus import SERVICE_PREFIX, Bus
from fdrtd_server.config import Settings, TokenStore, expired
from fdrtd_server.custody import CustodyStore
from fdrtd_server.errors import (
    BadRequest,
    FdrtdError,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
    error_for_status,
)
from fdrtd_server.oidc import IdentityProvider, Refused, looks_like_jwt
from fdrtd_server.policy import PolicyStore

__all__ = [
    "ADMIN_ROLES",
    "ANY_ROLE",
    "BUS_TIMEOUT",
    "DATA_ROLES",
    "OWNER_ROLES",
    "PUBLIC",
    "Handler",
    "Principal",
    "Roles",
    "State",
    "audit_refusals",
    "authenticate",
    "bus_request",
    "call_service",
    "caller",
    "guarded",
    "handle_target",
    "prepare_identity",
    "problem",
    "read_body",
    "read_limited",
    "refusals_end",
    "respond",
    "state_of",
]

BUS_TIMEOUT = 30.0
"""Seconds the controller waits for a microservice's answer on the bus."""
_HANDLE_TEXT = re.compile(r"[dr]-[0-9a-f]{40}")
"""What a handle looks like: a path segment that is not one is not written to the log."""

Handler = Callable[[Request], Awaitable[Response]]
"""A route's endpoint, as Starlette calls it."""


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
    policy: PolicyStore
    identity: IdentityProvider | None = None
    """The institution's identity provider, if the server accepts its JWTs (``[identity]``)."""


def state_of(request: Request) -> State:
    """The controller's :class:`State`, set up by the app's lifespan."""
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


# -- who may call a route ----------------------------------------------------

Roles = tuple[str, ...] | None
"""The roles a route is for: a tuple of roles, :data:`ANY_ROLE` or :data:`PUBLIC`."""
PUBLIC: Final = None
"""No token needed (health, readiness, the API description, the identity)."""
ANY_ROLE: Final[tuple[str, ...]] = ()
"""Any valid token, whatever its role."""
DATA_ROLES = ("owner", "analyst")
"""Who uploads, computes and fetches results: owners and analysts, not admins."""
OWNER_ROLES = ("owner", "admin")
ADMIN_ROLES = ("admin",)


def authenticate(request: Request, roles: tuple[str, ...] | None = None) -> Principal:
    """The caller behind the ``Authorization: Bearer`` token, if its role is one of ``roles``.

    The bearer value is a token of this server, or a JWT of the institution's
    identity provider (:mod:`fdrtd_server.oidc`) where ``[identity]`` is set up;
    a value with a JWT's shape (three base64url parts joined by dots) is taken
    for a JWT, anything else for a local token.

    Raises:
        Unauthorized: If the header is missing, the token unknown or expired, or
            the JWT not valid (the reason is named and audited).
        Forbidden: If the token's role may not use the route, or a valid JWT
            grants no role here (audited).
    """
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        _audit_refused_login(request, "no bearer token")
        raise Unauthorized("send your token as 'Authorization: Bearer <token>'")
    state = state_of(request)
    if looks_like_jwt(token):
        principal = _jwt_principal(request, state, token)
    else:
        found = state.tokens.match(token)
        if found is None:
            _audit_refused_login(request, "unknown token")
            raise Unauthorized("the token is not valid on this server")
        if expired(found[2]):
            _audit_refused_login(request, "expired token")
            raise Unauthorized(
                f"the token expired at {found[2]}; ask the server's admin for a new one"
            )
        principal = Principal(found[0], found[1])
    request.state.principal = principal  # for the audit of a refusal further on
    if roles is not None and principal.role not in roles:
        state.audit.write(
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


def _jwt_principal(request: Request, state: State, token: str) -> Principal:
    """The caller behind a JWT of the identity provider, or a refusal naming why (audited)."""
    if state.identity is None:
        _audit_refused_login(request, "jwt without identity provider")
        raise Unauthorized(
            "this server accepts no JWTs (no identity provider is configured); use a token "
            "from its admin"
        )
    try:
        name, role = state.identity.verify(token)
    except Refused as refused:
        _audit_refused_login(request, refused.reason)
        raise error_for_status(refused.status, refused.detail) from None
    seen = state.tokens.external(name, role)
    if seen:
        _audit_refused_login(request, f"jwt name {seen}")
        if seen == "revoked":
            raise Unauthorized(f"the name '{name}' was revoked on this server; ask its admin")
        raise Forbidden(
            f"the name '{name}' is a local token's on this server; the admin must choose "
            "another [identity] name_prefix"
        )
    return Principal(name, role)


async def prepare_identity(request: Request) -> None:
    """Fetch the identity provider's keys a JWT needs, in a thread, if they are due."""
    state = state_of(request)
    if state.identity is None:
        return
    _, _, token = request.headers.get("authorization", "").partition(" ")
    if looks_like_jwt(token.strip()):
        await state.identity.prepare(token.strip())


def _audit_refused_login(request: Request, reason: str) -> None:
    """Record a refused authentication: route and client address, never the token."""
    client = request.client.host if request.client else ""
    state_of(request).audit.write(
        "anonymous",
        "authenticate",
        request.url.path[:200],
        "refused",
        reason=reason,
        method=request.method,
        client=client,
    )


def caller(request: Request) -> Principal:
    """The principal :func:`guarded` authenticated for this request."""
    principal: Principal = request.state.principal
    return principal


# -- the audit of refusals ---------------------------------------------------


def audit_refusals(request: Request, action: str, target: str) -> None:
    """From here on, a refusal of this request is audited as ``action`` on ``target``.

    The route says so once it knows what the request is about; what it refuses
    before (a malformed parameter, say) is answered but not audited.
    """
    request.state.refusal = (action, target)


def refusals_end(request: Request) -> None:
    """From here on, a refusal of this request is no longer audited (its outcome was)."""
    request.state.refusal = None


def handle_target(text: str) -> str:
    """A handle from the path as the audit names it: the handle, or "(not a handle)"."""
    return text if _HANDLE_TEXT.fullmatch(text) else "(not a handle)"


def guarded(handler: Handler, roles: Roles) -> Handler:
    """``handler`` behind authentication for ``roles`` and the audit of its refusals.

    Args:
        handler: The route's endpoint.
        roles: The roles it is for, :data:`ANY_ROLE` for any token, :data:`PUBLIC` for none.

    Returns:
        The endpoint to mount.
    """
    needed: tuple[str, ...] | None = roles or None

    @functools.wraps(handler)
    async def route(request: Request) -> Response:
        if roles is not PUBLIC:
            await prepare_identity(request)
            authenticate(request, needed)
        try:
            return await handler(request)
        except FdrtdError as error:
            refusal = getattr(request.state, "refusal", None)
            if refusal is not None:
                action, target = refusal
                state_of(request).audit.write(
                    caller(request).name, action, target, f"refused {error.status}"
                )
            raise

    return route


# -- the body and the bus ----------------------------------------------------


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
    body = await read_limited(request, state_of(request).settings.max_body_bytes, "request body")
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
        state_of(request).bus, f"{SERVICE_PREFIX}.{microservice}.{function}", message, bus_timeout
    )
