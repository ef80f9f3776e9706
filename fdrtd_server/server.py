"""Running a server: the controller (with or without in-process microservices) and workers.

``serve`` starts, in order: the embedded ``nats-server`` (unless a NATS URL is
given), then uvicorn with the controller app, whose lifespan connects to NATS,
starts the in-process microservices on their *own* NATS connection (so they
talk to the controller only through subjects, exactly as a worker would) and
the peer gateway. Stopping reverses that order and never leaves the NATS child
behind.

The NATS URL is a secret when it carries credentials (the embedded server's
always does: see :mod:`fdrtd_server._embedded_nats`). It stays in this
process's memory and is never logged; a ``nats_url`` setting or
``--nats-url`` of the form ``file:PATH`` is read from that file, so that a
worker's credentials need not be on its command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import Iterator

import uvicorn

from fdrtd_server.app import State, create_app
from fdrtd_server.bus import Bus, StoreLimits
from fdrtd_server.config import Settings
from fdrtd_server.microservice import (
    Environment,
    RunningMicroservices,
    discover,
    start_microservices,
)
from fdrtd_server.peers import PeerInbox

__all__ = ["environment", "run_worker", "serve"]

log = logging.getLogger("fdrtd.server")


class _Server(uvicorn.Server):
    """uvicorn, minus re-raising SIGTERM after shutdown.

    uvicorn re-raises the signal it caught once it has shut down, which kills
    the process before ``serve`` can stop its embedded nats-server and reap
    it. We stop gracefully and return instead.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {
            sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def environment(settings: Settings) -> Environment:
    """What microservices need to know of the server's settings and policy.

    Every field of :class:`Environment` but ``server`` (the server's name) is
    the setting of the same name, so a new policy switch needs no copying here.
    """
    shared = {f.name for f in dataclasses.fields(Environment)} - {"server"}
    return Environment(server=settings.name, **{k: getattr(settings, k) for k in shared})


async def _prepare_store(nats_url: str, name: str, limits: StoreLimits) -> None:
    """Connect once to create (or bound) every bucket with this server's limits.

    Done before anything serves, so that the buckets get the limits of the
    settings whichever connection comes first, and so that a wrong URL or
    wrong credentials stop the server with a clear message.
    """
    bus = await Bus.connect(nats_url, name=f"fdrtd-setup-{name}", limits=limits)
    await bus.close()


def serve(settings: Settings, *, local_microservices: bool = True) -> None:
    """Run the server until SIGINT/SIGTERM."""
    from fdrtd_server import gateway
    from fdrtd_server._embedded_nats import EmbeddedNats, resolve_nats_url

    embedded = None
    if settings.nats_url is None:
        embedded = EmbeddedNats(settings.home / "jetstream").start()
        nats_url = embedded.url
    else:
        nats_url = resolve_nats_url(settings.nats_url)
    limits = StoreLimits.from_settings(settings)
    try:
        asyncio.run(_prepare_store(nats_url, settings.name, limits))
        services: dict[str, RunningMicroservices] = {}

        async def on_start(state: State) -> None:
            if local_microservices:
                bus = await Bus.connect(
                    nats_url, name=f"fdrtd-microservices-{settings.name}", limits=limits
                )
                specs = discover(settings.microservices)
                services["running"] = await start_microservices(bus, environment(settings), specs)
                state.extra["microservice_bus"] = bus
            await gateway.start(state, nats_url)
            if local_microservices:
                # protocols in this process reach the gateway directly, and it them
                inbox = await PeerInbox.of(state.extra["microservice_bus"])
                await state.extra["gateway"].attach(inbox)

        async def on_stop(state: State) -> None:
            await gateway.stop(state)
            if "running" in services:
                await services["running"].stop()
                await state.extra["microservice_bus"].close()

        app = create_app(
            settings, nats_url, on_start=on_start, on_stop=on_stop, extra_routes=gateway.routes()
        )
        config = uvicorn.Config(
            gateway.PeerFastPath(app),
            host=settings.host,
            port=settings.port,
            loop="uvloop",
            http="httptools",
            log_level="warning",
            lifespan="on",
            access_log=False,
            # no "server" and "date" headers: nobody reads them, and every
            # peer message's answer is parsed by the sending gateway
            server_header=False,
            date_header=False,
        )
        _Server(config).run()
    finally:
        if embedded is not None:
            embedded.stop()


async def _worker(
    nats_url: str, env: Environment, allowed: tuple[str, ...], limits: StoreLimits | None
) -> None:
    bus = await Bus.connect(nats_url, name=f"fdrtd-worker-{env.server}", limits=limits)
    running = await start_microservices(bus, env, discover(allowed))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.warning("worker for '%s' serving %d microservices", env.server, len(running.services))
    await stop.wait()
    await running.stop()
    await bus.close()


def run_worker(
    nats_url: str,
    env: Environment,
    allowed: tuple[str, ...] = (),
    *,
    limits: StoreLimits | None = None,
) -> None:
    """Run microservices only, against an existing NATS, until SIGINT/SIGTERM.

    Args:
        nats_url: The NATS URL, or ``file:PATH`` to read it (with its
            credentials) from a file of mode 0600, such as the embedded
            server's ``HOME/jetstream/nats-client.url``.
        env: What the microservices need to know of the server's settings.
        allowed: The microservices to run (all installed ones if empty).
        limits: The bucket limits, should this worker create the buckets.
    """
    from fdrtd_server._embedded_nats import resolve_nats_url

    asyncio.run(_worker(resolve_nats_url(nats_url), env, allowed, limits))
