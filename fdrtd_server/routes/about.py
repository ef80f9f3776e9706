"""The routes about this server itself: health, readiness, its API, identity and microservices."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import nats.errors
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fdrtd_client import wire
from fdrtd_server import openapi
from fdrtd_server.bus import SERVICE_PREFIX, Bus
from fdrtd_server.errors import NotFound
from fdrtd_server.http_common import State, caller, problem, respond, state_of
from fdrtd_server.inputs import Signature
from fdrtd_server.microservice import SIGNATURE_METADATA

__all__ = ["healthz", "identity", "list_microservices", "openapi_document", "readyz"]

log = logging.getLogger("fdrtd.controller")


async def healthz(request: Request) -> Response:
    """Liveness: the process answers and is connected to its NATS.

    A controller whose NATS went away for good cannot do anything but exit (it
    does, see :mod:`fdrtd_server.server`); until it has, it is not healthy.
    While it reconnects (an external NATS restarting, for up to
    ``nats_reconnect_seconds``) it is not healthy either, and is again once
    connected.
    """
    state = state_of(request)
    if state.extra.get("nats_lost") or state.bus.lost:
        return problem(503, "Not healthy", "the NATS server stopped; this server is exiting")
    if not state.bus.connected:
        return problem(503, "Not healthy", "reconnecting to NATS")
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Readiness: connected to NATS and the data microservice answers."""
    state = state_of(request)
    if not state.bus.connected:
        return problem(503, "Not ready", "not connected to NATS")
    try:
        await state.bus.nc.request(f"{SERVICE_PREFIX}.data.describe", wire.packb({}), timeout=2)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return problem(503, "Not ready", "the data microservice is not running")
    return JSONResponse({"status": "ready", "server": state.settings.name})


async def openapi_document(request: Request) -> Response:
    """The OpenAPI 3.1 description of this API, with the functions running on its bus."""
    state = state_of(request)
    return JSONResponse(openapi.document(state.settings, await _computations(state)))


async def identity(request: Request) -> Response:
    """This server's public peer entry (name, URL, public keys)."""
    entry = state_of(request).extra.get("public_entry")
    if entry is None:
        raise NotFound("this server has no identity")
    return respond(request, entry)


async def list_microservices(request: Request) -> Response:
    """The microservices running on this server's bus, from ``$SRV.INFO``."""
    state_of(request).audit.write(caller(request).name, "list", "microservices")
    found: dict[str, dict[str, Any]] = {}
    for info in await _service_infos(state_of(request).bus):
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
