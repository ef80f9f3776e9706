"""The API controller: the table of routes, the app's lifespan and its error handlers.

The controller holds no data. An upload's body is streamed chunk by chunk
into the JetStream object store; every other request becomes one NATS
request to a microservice, whether that microservice runs in this process
or in a worker elsewhere. Answers are handles, statuses, schemas and
results, never a dataset's content (invariant 1).

The routes live in :mod:`fdrtd_server.routes`, one module per resource;
:data:`ROUTES` says which method and path each answers and which roles may
call it. Every one of them runs inside
:func:`~fdrtd_server.http_common.guarded`, which authenticates the caller
and audits the route's refusals in one place.

Errors are JSON problem documents (RFC 9457) with a human ``detail``, mapped
from :mod:`fdrtd_server.errors` in one exception handler. Bodies are JSON or
msgpack, chosen by ``Content-Type``; answers are msgpack when ``Accept``
asks for ``application/msgpack``, else JSON.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats.errors
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fdrtd_client import wire
from fdrtd_server.audit import JOBS_SUBJECT, AuditLog
from fdrtd_server.bus import Bus, StoreLimits, parse_handle
from fdrtd_server.config import Settings, TokenStore
from fdrtd_server.custody import CustodyStore
from fdrtd_server.errors import FdrtdError
from fdrtd_server.http_common import (
    ADMIN_ROLES,
    ANY_ROLE,
    DATA_ROLES,
    OWNER_ROLES,
    PUBLIC,
    Handler,
    Roles,
    State,
    guarded,
    problem,
)
from fdrtd_server.identity import Identity
from fdrtd_server.oidc import identity_provider
from fdrtd_server.policy import PolicyStore
from fdrtd_server.routes import about, compute, custody, data, privacy, receipts, results

__all__ = ["ROUTES", "create_app", "internal_error", "open_audit_log"]

log = logging.getLogger("fdrtd.controller")

# The controller's routes: method, path, handler, and who may call it (PUBLIC: anyone,
# no token; ANY_ROLE: any valid token). Each runs inside guarded(handler, roles).
# fmt: off
ROUTES: tuple[tuple[str, str, Handler, Roles], ...] = (
    # method  path                            handler                   roles
    ("GET",    "/healthz",                     about.healthz,            PUBLIC),
    ("GET",    "/readyz",                      about.readyz,             PUBLIC),
    ("GET",    "/v1/openapi.json",             about.openapi_document,   PUBLIC),
    ("GET",    "/v1/identity",                 about.identity,           PUBLIC),
    ("GET",    "/v1/microservices",            about.list_microservices, ANY_ROLE),
    ("POST",   "/v1/data",                     data.upload,              DATA_ROLES),
    ("GET",    "/v1/data",                     data.list_data,           DATA_ROLES),
    ("GET",    "/v1/data/{handle}",            data.describe_data,       DATA_ROLES),
    ("DELETE", "/v1/data/{handle}",            data.release_data,        DATA_ROLES),
    ("POST",   "/v1/compute",                  compute.compute,          DATA_ROLES),
    ("GET",    "/v1/results/{handle}",         results.get_result,       DATA_ROLES),
    ("DELETE", "/v1/results/{handle}",         results.release_result,   DATA_ROLES),
    ("GET",    "/v1/results/{handle}/events",  results.result_events,    DATA_ROLES),
    ("POST",   "/v1/receipts/cosign",          receipts.cosign,          DATA_ROLES),
    ("GET",    "/v1/catalogue",                custody.catalogue,        ANY_ROLE),
    ("GET",    "/v1/budget",                   privacy.budget,           DATA_ROLES),
    ("POST",   "/v1/datasets",                 custody.publish,          ("owner",)),
    ("DELETE", "/v1/datasets/{name}",          custody.withdraw,         OWNER_ROLES),
    ("GET",    "/v1/grants",                   custody.list_grants,      OWNER_ROLES),
    ("POST",   "/v1/grants",                   custody.add_grant,        OWNER_ROLES),
    ("DELETE", "/v1/grants/{name}/{grantee}",  custody.revoke_grant,     OWNER_ROLES),
    ("GET",    "/v1/sources",                  custody.list_sources,     ADMIN_ROLES),
    ("POST",   "/v1/sources",                  custody.add_source,       ADMIN_ROLES),
    ("DELETE", "/v1/sources/{name}",           custody.remove_source,    ADMIN_ROLES),
)
# fmt: on


def mount(table: tuple[tuple[str, str, Handler, Roles], ...]) -> list[Route]:
    """The Starlette routes of ``table``: one per path, handing each method to its handler.

    Starlette answers a method that no route of a path takes from the first
    route whose path matches, so two routes for one path would answer 405
    with an ``Allow`` header naming only the first one's methods.
    """
    by_path: dict[str, dict[str, Handler]] = {}
    for method, path, handler, roles in table:
        by_path.setdefault(path, {})[method] = guarded(handler, roles)
    return [_route(path, by_method) for path, by_method in by_path.items()]


def _route(path: str, by_method: dict[str, Handler]) -> Route:
    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await by_method[method](request)

    endpoint.__name__ = endpoint.__qualname__ = "_".join(f.__name__ for f in by_method.values())
    return Route(path, endpoint, methods=list(by_method))


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
    """500 for an unexpected error, with an incident id; the log gets its type and frames."""
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
            state.policy.running.end(handle)  # counts no more against max_concurrent
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
    extra_routes: list[Route] | None = None,
) -> Starlette:
    """Build the controller app; its lifespan connects to NATS at ``nats_url``.

    The audit log is opened here, before anything serves: a log that does not
    match its signed checkpoint stops the server from starting.

    Raises:
        AuditError: If the audit log fails verification against its checkpoint.
        PermissionError: If the identity key file is readable by others.
    """
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
            policy=PolicyStore(settings.home, audit),
            identity=await identity_provider(settings),
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

    return Starlette(
        routes=[*mount(ROUTES), *(extra_routes or [])],
        lifespan=lifespan,
        exception_handlers={
            FdrtdError: fdrtd_error,
            wire.WireError: wire_error,
            HTTPException: http_error,
            **dict.fromkeys(_BUS_DOWN, bus_down),
            Exception: internal_error,
        },
    )
