"""The OpenAPI 3.1 document served at ``/v1/openapi.json``.

Written by hand, next to the routes in :mod:`fdrtd_server.app`, so that
clients in other languages (R, JavaScript, curl) can be generated from it.
"""

from __future__ import annotations

from typing import Any

from fdrtd_server.config import Settings

__all__ = ["document"]

_PROBLEM = {"$ref": "#/components/schemas/Problem"}
_ERRORS = {
    str(code): {"description": text, "content": {"application/problem+json": {"schema": _PROBLEM}}}
    for code, text in (
        (400, "malformed body or bad parameter"),
        (401, "missing or unknown token"),
        (403, "refused by the server owner's policy"),
        (404, "unknown handle, route or microservice"),
        (413, "body too large"),
        (415, "unsupported content type"),
    )
}
_HANDLE = {"name": "handle", "in": "path", "required": True, "schema": {"type": "string"}}
_WAIT_VALUE = [
    {
        "name": "wait",
        "in": "query",
        "description": "seconds (0 to 60, app.MAX_WAIT) to hold the request until the job ends",
        "schema": {"type": "number", "minimum": 0, "maximum": 60, "default": 0},
    },
    {
        "name": "value",
        "in": "query",
        "description": "include a finished job's value ('false' for only its state)",
        "schema": {"type": "boolean", "default": True},
    },
]
_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/Computation"}},
        "application/msgpack": {"schema": {"$ref": "#/components/schemas/Computation"}},
    },
}


def _op(summary: str, ok: str = "200", *, secured: bool = True, **more: Any) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {ok: {"description": "success"}, **_ERRORS},
        **more,
    }
    if not secured:
        operation["security"] = []
    return operation


def document(settings: Settings) -> dict[str, Any]:
    """Build the OpenAPI document for a server."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fdrtd",
            "version": "1",
            "description": (
                "Federated secure computing. Upload data to get a data handle (never "
                "downloadable); start computations to get result handles; fetch results."
            ),
        },
        "servers": [{"url": settings.url}],
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": _op("Liveness", secured=False)},
            "/readyz": {"get": _op("Readiness: NATS and the data microservice", secured=False)},
            "/v1/openapi.json": {"get": _op("This OpenAPI document", secured=False)},
            "/v1/identity": {"get": _op("This server's public peer entry", secured=False)},
            "/v1/microservices": {"get": _op("Running microservices and their functions")},
            "/v1/data": {
                "post": _op(
                    "Upload a dataset (streamed); returns a data handle",
                    "201",
                    parameters=[
                        {
                            "name": "format",
                            "in": "query",
                            "schema": {"enum": ["raw", "csv", "json", "msgpack"], "default": "raw"},
                        },
                        {"name": "dtype", "in": "query", "schema": {"type": "string"}},
                        {"name": "shape", "in": "query", "schema": {"type": "string"}},
                    ],
                    requestBody={"content": {"application/octet-stream": {}}},
                ),
                "get": _op("List your datasets (schemas only)"),
            },
            "/v1/data/{handle}": {
                "parameters": [_HANDLE],
                "get": _op("A dataset's schema; its content can never be read"),
                "delete": _op("Release a dataset"),
            },
            "/v1/compute": {
                "post": _op(
                    "Start a computation; returns a result handle (202), or with ?wait=seconds "
                    "the finished job's status and value (200) if it ends within that time",
                    "202",
                    requestBody=_BODY,
                    parameters=_WAIT_VALUE,
                    responses={
                        "200": {"description": "finished within 'wait': the result's view"},
                        "202": {"description": "started: {result, status}"},
                        **_ERRORS,
                    },
                )
            },
            "/v1/results/{handle}": {
                "parameters": [_HANDLE],
                "get": _op(
                    "Status, progress and (when done) the value; long-poll with ?wait=seconds",
                    parameters=_WAIT_VALUE,
                ),
                "delete": _op("Release a result"),
            },
            "/v1/results/{handle}/events": {
                "parameters": [_HANDLE],
                "get": _op("Server-sent events with status and progress until finished"),
            },
            "/v1/peer": {
                "post": _op(
                    "Peer gateway: signed and encrypted messages from member servers", secured=False
                )
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Problem": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                    },
                },
                "Computation": {
                    "type": "object",
                    "required": ["microservice", "function"],
                    "properties": {
                        "microservice": {"type": "string"},
                        "function": {"type": "string"},
                        "inputs": {"type": "object"},
                        "session": {
                            "type": "object",
                            "properties": {
                                "id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{22,64}$"},
                                "parties": {"type": "array", "items": {"type": "string"}},
                            },
                        },
                    },
                },
            },
        },
    }
