"""Running a server: the controller (with or without in-process microservices) and workers.

``serve`` starts, in order: the embedded ``nats-server`` (unless a NATS URL is
given), then uvicorn with the controller app, whose lifespan connects to NATS,
starts the in-process microservices on their *own* NATS connection (so they
talk to the controller only through subjects, exactly as a worker would) and
the peer gateway. Stopping reverses that order and never leaves the NATS child
behind. Once listening, it logs one line saying where, under which name, with
which microservices and which NATS.

If NATS goes away for good (the embedded ``nats-server`` exited, or nats-py
gave up reconnecting to an external NATS), nothing this process does can
work any more: it logs one ERROR line saying so, ``/healthz`` answers 503,
and it stops (uvicorn stops cleanly, children are reaped) with the exit code
:data:`EXIT_NATS_LOST`, so that a supervisor (systemd ``Restart=on-failure``,
a container runtime) starts it again. Datasets and results are in JetStream
and survive; jobs that were running are marked failed on the next start
(:mod:`fdrtd_server.runners`). A worker does the same.

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
import socket
from collections.abc import Callable, Iterator

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
from fdrtd_server.runners import fail_orphaned_jobs, sweep_forever

__all__ = ["EXIT_NATS_LOST", "environment", "run_worker", "serve"]

log = logging.getLogger("fdrtd.server")

EXIT_NATS_LOST = 75
"""Exit code of ``serve`` and ``worker`` when NATS went away for good (``EX_TEMPFAIL``)."""
WATCH_INTERVAL = 0.1
"""Seconds between two looks at the NATS connections and the embedded nats-server."""
LOST_GRACE = 5
"""Seconds open HTTP requests get to end once NATS is lost, before they are cancelled."""


def _nats_lost_message(what: str) -> str:
    return (
        f"the NATS server stopped ({what}); fdrtd-server exits with code {EXIT_NATS_LOST} so "
        "that a supervisor can restart it (datasets and results are kept in JetStream)"
    )


async def _watch_nats(
    buses: Callable[[], list[Bus]], exited: Callable[[], int | None], address: str
) -> str:
    """Wait until NATS is gone for good; return what happened, for a person.

    Args:
        buses: The connections to watch (read again on every look).
        exited: The embedded nats-server's exit code, None while it runs
            (always None for an external NATS).
        address: The NATS address without credentials, for the message.
    """
    while True:
        code = exited()
        if code is not None:
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            return f"the embedded nats-server at {address} exited, {how}"
        if any(bus.lost for bus in buses()):
            return f"the connection to NATS at {address} closed and reconnecting failed"
        await asyncio.sleep(WATCH_INTERVAL)


class _Server(uvicorn.Server):
    """uvicorn, minus re-raising SIGTERM after shutdown, plus a line once it listens.

    uvicorn re-raises the signal it caught once it has shut down, which kills
    the process before ``serve`` can stop its embedded nats-server and reap
    it. We stop gracefully and return instead.
    """

    def __init__(self, config: uvicorn.Config, listening: Callable[[str], str]) -> None:
        super().__init__(config)
        self.listening = listening
        self.exit_code = 0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start serving, then log where (the port actually bound, should it be 0)."""
        await super().startup(sockets)
        if self.started:
            bound = [sock.getsockname() for server in self.servers for sock in server.sockets]
            host, port = bound[0][:2] if bound else (self.config.host, self.config.port)
            host = f"[{host}]" if ":" in str(host) else host
            log.info("%s", self.listening(f"http://{host}:{port}"))

    def nats_lost(self, what: str) -> None:
        """Stop because NATS is gone for good: log why, and exit with :data:`EXIT_NATS_LOST`."""
        if self.exit_code:
            return
        log.error("%s", _nats_lost_message(what))
        self.exit_code = EXIT_NATS_LOST
        # long polls and event streams would hold the shutdown up to their own end
        self.config.timeout_graceful_shutdown = LOST_GRACE
        self.should_exit = True

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


def serve(settings: Settings, *, local_microservices: bool = True) -> int:
    """Run the server until SIGINT/SIGTERM, or until NATS is gone for good.

    Returns:
        The exit code: 0 after SIGINT/SIGTERM, :data:`EXIT_NATS_LOST` if NATS
        went away for good.
    """
    from fdrtd_server import gateway
    from fdrtd_server._embedded_nats import EmbeddedNats, redact_url, resolve_nats_url

    embedded = None
    if settings.nats_url is None:
        embedded = EmbeddedNats(settings.home / "jetstream").start()
        nats_url = embedded.url
    else:
        nats_url = resolve_nats_url(settings.nats_url)
    limits = StoreLimits.from_settings(settings)
    specs = discover(settings.microservices) if local_microservices else {}
    try:
        asyncio.run(_prepare_store(nats_url, settings.name, limits))
        services: dict[str, RunningMicroservices] = {}
        tasks: list[asyncio.Task[None]] = []

        async def on_start(state: State) -> None:
            if embedded is not None:
                # a freshly started embedded NATS has new credentials: no process of
                # an earlier start can reach it, so every job left unfinished fails
                # now, before the port opens (and the audit log, listening already,
                # records each end)
                await fail_orphaned_jobs(state.bus, everyone_gone=True)
            if local_microservices:
                bus = await Bus.connect(
                    nats_url, name=f"fdrtd-microservices-{settings.name}", limits=limits
                )
                services["running"] = await start_microservices(bus, environment(settings), specs)
                state.extra["microservice_bus"] = bus
            await gateway.start(state, nats_url)
            if local_microservices:
                # protocols in this process reach the gateway directly, and it them
                inbox = await PeerInbox.of(state.extra["microservice_bus"])
                await state.extra["gateway"].attach(inbox)
            # jobs of workers that died fail here (those of this process's earlier
            # starts failed above, or when start_microservices ran)
            own = (services["running"].runner,) if "running" in services else ()
            tasks.append(asyncio.create_task(sweep_forever(state.bus, own)))
            tasks.append(asyncio.create_task(watch(state)))

        async def watch(state: State) -> None:
            buses = [state.bus]
            if "microservice_bus" in state.extra:
                buses.append(state.extra["microservice_bus"])
            what = await _watch_nats(
                lambda: buses,
                lambda: embedded.returncode if embedded is not None else None,
                embedded.address if embedded is not None else redact_url(nats_url),
            )
            state.extra["nats_lost"] = what  # /healthz answers 503 from now on
            server.nats_lost(what)
            for bus in buses:
                # no more reconnect attempts: every wait on the bus ends now
                await bus.abandon()

        async def on_stop(state: State) -> None:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
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
        names = ", ".join(sorted(specs)) or "none in this process, workers serve them"
        where = "embedded" if embedded is not None else redact_url(nats_url)
        server = _Server(
            config,
            lambda url: (
                f"fdrtd-server '{settings.name}' listening on {url} "
                f"(microservices: {names}; NATS: {where})"
            ),
        )
        server.run()
        return server.exit_code
    finally:
        if embedded is not None:
            embedded.stop()


async def _worker(
    nats_url: str, env: Environment, allowed: tuple[str, ...], limits: StoreLimits | None
) -> int:
    from fdrtd_server._embedded_nats import redact_url

    bus = await Bus.connect(nats_url, name=f"fdrtd-worker-{env.server}", limits=limits)
    specs = discover(allowed)
    running = await start_microservices(bus, env, specs)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    address = redact_url(nats_url)
    log.info(
        "fdrtd worker for '%s' serving %s (NATS: %s)",
        env.server,
        ", ".join(sorted(specs)) or "no microservices",
        address,
    )
    stopping = asyncio.create_task(stop.wait())
    lost = asyncio.create_task(_watch_nats(lambda: [bus], lambda: None, address))
    await asyncio.wait([stopping, lost], return_when=asyncio.FIRST_COMPLETED)
    for task in (stopping, lost):
        task.cancel()
    code = 0
    if lost.done() and not lost.cancelled():
        log.error("%s", _nats_lost_message(lost.result()).replace("fdrtd-server", "the worker"))
        code = EXIT_NATS_LOST
        await bus.abandon()  # requests still waiting for an answer fail now
    await running.stop()
    await bus.close()
    return code


def run_worker(
    nats_url: str,
    env: Environment,
    allowed: tuple[str, ...] = (),
    *,
    limits: StoreLimits | None = None,
) -> int:
    """Run microservices only, against an existing NATS, until SIGINT/SIGTERM.

    If NATS goes away for good, the worker logs why and stops with
    :data:`EXIT_NATS_LOST`, for a supervisor to start it again.

    Args:
        nats_url: The NATS URL, or ``file:PATH`` to read it (with its
            credentials) from a file of mode 0600, such as the embedded
            server's ``HOME/jetstream/nats-client.url``.
        env: What the microservices need to know of the server's settings.
        allowed: The microservices to run (all installed ones if empty).
        limits: The bucket limits, should this worker create the buckets.

    Returns:
        The exit code: 0 after SIGINT/SIGTERM, :data:`EXIT_NATS_LOST` if NATS
        went away for good.
    """
    from fdrtd_server._embedded_nats import resolve_nats_url

    return asyncio.run(_worker(resolve_nats_url(nats_url), env, allowed, limits))
