"""One SIMON (Federated Secure Computing) server, for the reference benchmarks.

    python bench/_simon_server.py --port 55501

The ``federatedsecure-server`` package ships only the server-side ``Bus``; its
web front end lived in a separate project (``federatedsecure/webserver-connexion``:
connexion + waitress, an OpenAPI spec with the ``representations`` routes).
This module serves the same REST API from a small Starlette app on uvicorn,
bound to 127.0.0.1 only, with the same JSON shapes as that project's
``default_controller.py``:

    GET    /representations                      -> {"type": "list", "list": [...]}
    POST   /representations   {"args", "kwargs"} -> {"type": "uuid", "uuid": ...}   create
    PUT    /representations   {"args", "kwargs"} -> {"type": "uuid", "uuid": ...}   upload
    PATCH  /representation/{uuid} {"args", ...}  -> {"type": "uuid"|"none", ...}    call
    GET    /representation/{uuid}                -> {"type": "object", "object": ...}
    DELETE /representation/{uuid}                -> {"type": "none"}
    GET    /representation/{uuid}/{member}       -> {"type": "uuid", "uuid": ...}   attribute

SIMON blocks and busy-waits inside its handlers (a party's ``compute`` waits
for the others over HTTP), so each Bus call runs in Starlette's thread pool,
as waitress ran them in its threads. The Bus
discovers the SIMON, Sync and Util microservices of the ``federatedsecure.services``
namespace package by itself (``federatedsecure_register(registry)``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio.to_thread
import uvicorn
from federatedsecure.server.bus import Bus
from federatedsecure.server.exceptions import handle_exception
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def _json(content: Any, status: int = 200) -> Response:
    # json.dumps, unlike Starlette's JSONResponse, allows NaN/Infinity, as Flask did
    return Response(json.dumps(content), status_code=status, media_type="application/json")


def create_app() -> Starlette:
    """Build the Starlette app around one SIMON ``Bus``.

    Returns:
        The app; its routes are those of the original connexion web server.
    """
    bus = Bus()

    def representations(method: str, params: dict[str, str], body: dict[str, Any]) -> Any:
        if method == "GET":
            return {"type": "list", "list": bus.list_representations()}
        if method == "POST":
            return {"type": "uuid", "uuid": bus.create_representation(body)}
        return {"type": "uuid", "uuid": bus.upload_representation(body)}

    def representation(method: str, params: dict[str, str], body: dict[str, Any]) -> Any:
        uuid = params["uuid"]
        if method == "PATCH":
            result = bus.call_representation(uuid, body)
            if result is None:
                return {"type": "none"}
            return {"type": "uuid", "uuid": result}
        if method == "GET":
            return {"type": "object", "object": bus.download_representation(uuid)}
        bus.release_representation(uuid)
        return {"type": "none"}

    def attribute(method: str, params: dict[str, str], body: dict[str, Any]) -> Any:
        uuid = bus.create_attribute(params["uuid"], params["member"], public=True)
        return {"type": "uuid", "uuid": uuid}

    def endpoint(handler: Callable[[str, dict[str, str], dict[str, Any]], Any]) -> Any:
        async def run(request: Request) -> Response:
            raw = await request.body()
            body = json.loads(raw) if raw else {}
            try:
                # SIMON blocks and busy-waits: run it in a worker thread
                content = await run_in_threadpool(
                    handler, request.method, dict(request.path_params), body
                )
                return _json(content)
            except Exception as exception:  # SIMON's own error-to-status mapping
                message, status = handle_exception(exception)
                return _json(message, status)

        return run

    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # parties wait for each other inside handlers: leave room for many
        anyio.to_thread.current_default_thread_limiter().total_tokens = 200
        yield

    return Starlette(
        routes=[
            Route("/representations", endpoint(representations), methods=["GET", "POST", "PUT"]),
            Route(
                "/representation/{uuid}",
                endpoint(representation),
                methods=["GET", "PATCH", "DELETE"],
            ),
            Route("/representation/{uuid}/{member}", endpoint(attribute), methods=["GET"]),
        ],
        lifespan=contextlib.asynccontextmanager(lifespan),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # SIMON logs every handled exception
    uvicorn.run(
        create_app(),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
