"""``PeerFastPath``: POST /v1/peer skips Starlette's routing, with the app's own error answers.

The real route is exercised end to end by the integration and e2e suites
(garbage, oversized, replayed and forged envelopes against running servers);
these tests drive the ASGI wrapper directly for the cases a running server
cannot show on demand: a gateway that has not started, an unexpected error,
and which requests it must leave to the app.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fdrtd_server import gateway
from fdrtd_server.audit import AuditLog
from fdrtd_server.config import Settings, TokenStore
from fdrtd_server.custody import CustodyStore
from fdrtd_server.http_common import State
from fdrtd_server.policy import PolicyStore


def _app(tmp_path: Path, extra: dict[str, Any]) -> Starlette:
    async def other(request: Any) -> PlainTextResponse:
        return PlainTextResponse(f"app saw {request.method} {request.url.path}")

    app = Starlette(
        routes=[Route("/v1/other", other, methods=["GET", "POST"]), *gateway.routes()],
    )
    app.state.fdrtd = State(
        settings=Settings(home=tmp_path, name="probe"),
        bus=None,  # type: ignore[arg-type]  # never reached by these requests
        tokens=TokenStore(tmp_path),
        audit=AuditLog(tmp_path / "audit.log"),
        extra=extra,
        custody=CustodyStore(tmp_path),
        policy=PolicyStore(tmp_path),
    )
    return app


def _call(app: Any, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    sent: list[dict[str, Any]] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = sent[0]
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def test_other_routes_and_methods_reach_the_app(tmp_path: Path) -> None:
    app = gateway.PeerFastPath(_app(tmp_path, {}))
    assert _call(app, "GET", "/v1/other") == (
        200,
        {"content-length": "21", "content-type": "text/plain; charset=utf-8"},
        b"app saw GET /v1/other",
    )
    status, _, _body = _call(app, "GET", "/v1/peer")
    assert status == 405  # the app's answer: the route exists for POST only
    assert _call(app, "POST", "/v1/peer/more")[0] == 404


def test_a_gateway_not_started_yet_is_a_503_problem(tmp_path: Path) -> None:
    status, headers, body = _call(gateway.PeerFastPath(_app(tmp_path, {})), "POST", "/v1/peer")
    assert status == 503
    assert headers["content-type"] == "application/problem+json"
    problem = json.loads(body)
    assert problem["status"] == 503 and "not running" in problem["detail"]


def test_an_unexpected_error_is_a_500_with_an_incident_and_no_details(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = str(12000 + 345)  # computed, so that no source line in the traceback holds it

    async def broken(request: Any) -> Any:
        raise RuntimeError(f"secret value {secret}")

    monkeypatch.setattr(gateway, "receive", broken)
    status, _headers, body = _call(gateway.PeerFastPath(_app(tmp_path, {})), "POST", "/v1/peer")
    assert status == 500
    problem = json.loads(body)
    assert "incident" in problem["detail"] and secret not in problem["detail"]
    incident = problem["detail"].split("incident ")[1].split(")")[0]
    assert any(incident in record.getMessage() for record in caplog.records)
    assert not any(secret in record.getMessage() for record in caplog.records)


def test_a_refused_envelope_is_answered_on_the_fast_path(tmp_path: Path) -> None:
    """A running gateway refuses garbage with 403, without Starlette's routing."""

    class Unrouted(Starlette):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            raise AssertionError("the peer route must not go through the app")

    app = _app(tmp_path, {})

    class FakeGateway:  # only what receive() touches before refusing
        identity = None
        members: dict[str, Any] = {}
        reading = reading_bytes = 0
        rejections = gateway._RejectionAudit(app.state.fdrtd.audit)

        def reload_members(self) -> None:
            pass

    app.state.fdrtd.extra["gateway"] = FakeGateway()
    unrouted = Unrouted()
    unrouted.state.fdrtd = app.state.fdrtd
    status, _headers, body = _call(gateway.PeerFastPath(unrouted), "POST", "/v1/peer", b"garbage")
    assert status == 403
    assert json.loads(body)["title"] == "Peer message rejected"
    assert "rejected malformed" in (tmp_path / "audit.log").read_text()
