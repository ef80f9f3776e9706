"""Running a server: the controller (with or without in-process microservices) and workers.

With ``tls_cert`` set, the port serves HTTPS itself (see :mod:`fdrtd_server.tls`).

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
import time
from collections.abc import Callable, Iterator

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fdrtd_server._files import write_atomic
from fdrtd_server.app import create_app
from fdrtd_server.bus import Bus, StoreLimits
from fdrtd_server.config import PORT_FILE, Settings
from fdrtd_server.custody import configured_sources
from fdrtd_server.http_common import State
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
FAILURE_LOOKS = 20
"""How many times (:data:`WATCH_INTERVAL` apart) a failed start-up looks whether NATS is gone."""


def _nats_lost_message(what: str) -> str:
    """The ERROR line a controller logs when NATS is gone for good (a worker's says "worker").

    Args:
        what: What happened, as :class:`_NatsWatch` describes it.
    """
    return (
        f"the NATS server stopped ({what}); fdrtd-server exits with code {EXIT_NATS_LOST} so "
        "that a supervisor can restart it (datasets and results are kept in JetStream)"
    )


def _embedded_exited(address: str, code: int) -> str:
    """What happened, for a person: the embedded nats-server at ``address`` exited with ``code``."""
    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    return f"the embedded nats-server at {address} exited, {how}"


class _NatsWatch:
    """Tells whether NATS is gone for good: the embedded server exited, or reconnecting failed.

    An embedded ``nats-server`` that exited cannot come back (a new one would
    have new credentials), so that is final at once. A connection to an
    external NATS is given ``patience`` seconds to come back, so that a
    routine restart of NATS does not end every controller and worker.

    Args:
        buses: The connections to watch (read again on every look).
        exited: The embedded nats-server's exit code, None while it runs
            (always None for an external NATS).
        address: The NATS address without credentials, for the message.
        patience: Seconds a connection may be down before NATS counts as gone.
    """

    def __init__(
        self,
        buses: Callable[[], list[Bus]],
        exited: Callable[[], int | None],
        address: str,
        patience: float,
    ) -> None:
        self.buses, self.exited, self.address, self.patience = buses, exited, address, patience
        self._down_since: float | None = None

    def look(self) -> str | None:
        """Look once; return what happened, for a person, if NATS is gone for good."""
        code = self.exited()
        if code is not None:
            return _embedded_exited(self.address, code)
        buses = self.buses()
        if any(bus.lost for bus in buses):
            return f"the connection to NATS at {self.address} closed and reconnecting failed"
        if all(bus.connected for bus in buses):
            self._down_since = None
            return None
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        elif now - self._down_since >= self.patience:
            return (
                f"the connection to NATS at {self.address} closed and reconnecting failed "
                f"for {self.patience:g} s"
            )
        return None

    def down(self) -> str | None:
        """What :meth:`look` says, or that a connection is down now (for start-up and stop)."""
        what = self.look()
        if what is None and not all(bus.connected for bus in self.buses()):
            what = f"the connection to NATS at {self.address} closed"
        return what

    async def gone(self) -> str:
        """Wait until NATS is gone for good; return what happened, for a person."""
        while (what := self.look()) is None:
            await asyncio.sleep(WATCH_INTERVAL)
        return what

    async def explains_failure(self) -> str | None:
        """After a start-up step failed: whether NATS going away explains it, and how.

        An embedded nats-server's exit is seen a moment after its connections
        close, so this looks for up to :data:`FAILURE_LOOKS` times.
        """
        for _ in range(FAILURE_LOOKS):
            what = self.down()
            if what is not None:
                return what
            await asyncio.sleep(WATCH_INTERVAL)
        return None


class _QuietStartupFailure:
    """ASGI wrapper: a start-up that failed because NATS went away logs no traceback.

    uvicorn logs the traceback that Starlette sends with ``lifespan.startup.failed``;
    when NATS going away is the reason, the one ERROR line of :meth:`_Server.nats_lost`
    says all there is to say.

    Args:
        app: The ASGI application.
        gone: Says what happened if NATS is gone (None while it is not).
    """

    def __init__(self, app: ASGIApp, gone: Callable[[], str | None]) -> None:
        self.app, self.gone = app, gone

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass everything on; drop the traceback of a start-up that failed for want of NATS."""
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and self.gone() is not None:
                message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, sending)


TLS_GRACE = 10
"""Seconds a TLS server waits, when it stops, for answers still being sent."""


class _Server(uvicorn.Server):
    """uvicorn, minus re-raising SIGTERM after shutdown, plus a line once it listens.

    uvicorn re-raises the signal it caught once it has shut down, which kills
    the process before ``serve`` can stop its embedded nats-server and reap
    it. We stop gracefully and return instead.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        listening: Callable[[str], str],
        gone: Callable[[], str | None] = lambda: None,
    ) -> None:
        """Prepare to serve; nothing runs before :meth:`run`.

        Args:
            config: uvicorn's configuration, with the app.
            listening: Makes the line logged once the port is open, from the
                URL it listens on.
            gone: Says what happened if NATS is gone for good (None while it
                is not): a start-up that fails because of that exits with
                :data:`EXIT_NATS_LOST`, not uvicorn's code 3.
        """
        super().__init__(config)
        self.listening = listening
        self.gone = gone
        self.exit_code = 0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start serving, then log where (the port actually bound, should it be 0)."""
        try:
            await super().startup(sockets)
        except SystemExit:
            # the lifespan failed (uvicorn exits with code 3): say so plainly if NATS
            # going away is why, and exit for a supervisor to restart us
            what = self.gone()
            if what is None and not self.exit_code:
                raise
            self.nats_lost(what or "")
            return
        if self.started and not self.should_exit:
            bound = [sock.getsockname() for server in self.servers for sock in server.sockets]
            host, port = bound[0][:2] if bound else (self.config.host, self.config.port)
            host = f"[{host}]" if ":" in str(host) else host
            scheme = "https" if self.config.ssl else "http"
            log.info("%s", self.listening(f"{scheme}://{host}:{port}"))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop serving; over TLS, drop idle connections instead of closing them politely.

        A TLS connection closed politely waits for the other side's
        ``close_notify`` (up to 30 s in the event loop), and the peer gateways'
        idle keep-alive connections never send one: every TLS server took 30 s
        to stop. An idle connection has nothing left to say, so it is aborted;
        a connection in the middle of an answer finishes it, within
        :data:`TLS_GRACE`.
        """
        if self.config.ssl is not None:
            if self.config.timeout_graceful_shutdown is None:
                self.config.timeout_graceful_shutdown = TLS_GRACE
            for connection in list(self.server_state.connections):
                cycle = getattr(connection, "cycle", None)
                transport = getattr(connection, "transport", None)
                if transport is not None and (cycle is None or cycle.response_complete):
                    transport.abort()
        await super().shutdown(sockets)

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

    Every field of :class:`Environment` but ``server`` (the server's name) and
    ``small_cell`` (the owner's policy sets it per job) is the setting of the
    same name, so a new policy switch needs no copying here.
    """
    shared = {f.name for f in dataclasses.fields(Environment)} - {"server", "small_cell"}
    return Environment(server=settings.name, **{k: getattr(settings, k) for k in shared})


async def _prepare_store(nats_url: str, name: str, limits: StoreLimits) -> None:
    """Connect once to create (or bound) every bucket with this server's limits.

    Done before anything serves, so that the buckets get the limits of the
    settings whichever connection comes first, and so that a wrong URL or
    wrong credentials stop the server with a clear message.
    """
    bus = await Bus.connect(nats_url, name=f"fdrtd-setup-{name}", limits=limits)
    await bus.close()


def _bind(host: str) -> socket.socket:
    """A TCP socket bound to ``host`` on a port the system chooses (uvicorn listens on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings, *, local_microservices: bool = True) -> int:
    """Run the server until SIGINT/SIGTERM, or until NATS is gone for good.

    Returns:
        The exit code: 0 after SIGINT/SIGTERM, :data:`EXIT_NATS_LOST` if NATS
        went away for good.
    """
    from fdrtd_server import directory, gateway, tls
    from fdrtd_server._embedded_nats import EmbeddedNats, redact_url, resolve_nats_url

    embedded = None
    configured_sources(settings.home)  # a bad [sources] table stops the start, named
    listening: list[socket.socket] = []
    if settings.port == 0:
        # bound now, so that the URL peers and the OpenAPI document name has its port;
        # the port is written to DIR/port for whoever started this server
        listening.append(_bind(settings.host))
        settings = settings.with_overrides(port=listening[0].getsockname()[1])
        write_atomic(settings.home / PORT_FILE, f"{settings.port}\n", mode=0o644)
    if settings.nats_url is None:
        embedded = EmbeddedNats(settings.home / "jetstream").start()
        nats_url = embedded.url
    else:
        nats_url = resolve_nats_url(settings.nats_url)
    limits = StoreLimits.from_settings(settings)
    specs = discover(settings.microservices, settings.plugin_policy) if local_microservices else {}
    try:
        try:
            asyncio.run(_prepare_store(nats_url, settings.name, limits))
        except Exception:
            if embedded is None or embedded.returncode is None:
                raise  # a wrong URL or wrong credentials: the message says so
            what = _embedded_exited(embedded.address, embedded.returncode)
            log.error("%s", _nats_lost_message(what))
            return EXIT_NATS_LOST
        services: dict[str, RunningMicroservices] = {}
        tasks: list[asyncio.Task[None]] = []
        watching: list[asyncio.Task[None]] = []

        buses: list[Bus] = []
        watch = _NatsWatch(
            lambda: buses,
            lambda: embedded.returncode if embedded is not None else None,
            embedded.address if embedded is not None else redact_url(nats_url),
            settings.nats_reconnect_seconds,
        )

        async def on_start(state: State) -> None:
            buses.append(state.bus)
            # watched from the first step on, so that NATS going away while we start
            # ends the server as it would later (code 75), not with uvicorn's code 3
            watching.append(asyncio.create_task(watch_until_gone(state)))
            try:
                await start_parts(state)
            except Exception:
                what = await watch.explains_failure()
                if what is None:
                    raise
                lost(state, what)

        async def start_parts(state: State) -> None:
            if embedded is not None:
                # a freshly started embedded NATS has new credentials: no process of
                # an earlier start can reach it, so every job left unfinished fails
                # now, before the port opens (and the audit log, listening already,
                # records each end)
                await fail_orphaned_jobs(state.bus, everyone_gone=True, at_start=True)
            else:
                state.bus.keep_reconnecting()  # for nats_reconnect_seconds: see the watch
            if local_microservices:
                bus = await Bus.connect(
                    nats_url, name=f"fdrtd-microservices-{settings.name}", limits=limits
                )
                state.extra["microservice_bus"] = bus
                buses.append(bus)
                if embedded is None:
                    bus.keep_reconnecting()
                services["running"] = await start_microservices(bus, environment(settings), specs)
            await gateway.start(state, nats_url)
            if local_microservices:
                # protocols in this process reach the gateway directly, and it them
                inbox = await PeerInbox.of(state.extra["microservice_bus"])
                await state.extra["gateway"].attach(inbox)
            # the directory's listing, and heartbeats to every directory (through the gateway)
            await directory.start(state)
            # jobs of workers that died fail here (those of this process's earlier
            # starts failed above, or when start_microservices ran)
            own = (services["running"].runner,) if "running" in services else ()
            tasks.append(asyncio.create_task(sweep_forever(state.bus, own)))

        async def watch_until_gone(state: State) -> None:
            lost(state, await watch.gone())
            for bus in buses:
                # no more reconnect attempts: every wait on the bus ends now
                await bus.abandon()

        def lost(state: State, what: str) -> None:
            state.extra["nats_lost"] = what  # /healthz answers 503 from now on
            server.nats_lost(what)

        async def on_stop(state: State) -> None:
            # the watch goes on while we stop: should NATS go away now, the waits on
            # it end at once, and the exit code says so
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:
                await directory.stop(state)
                await gateway.stop(state)
                if "running" in services:
                    await services["running"].stop()
                if "microservice_bus" in state.extra:
                    bus = state.extra["microservice_bus"]
                    buses.remove(bus)  # closed on purpose: no loss
                    await bus.close()
            finally:
                for task in watching:
                    task.cancel()
                await asyncio.gather(*watching, return_exceptions=True)
                what = watch.down() if buses else None
                if what is not None:
                    lost(state, what)

        app = create_app(
            settings,
            nats_url,
            on_start=on_start,
            on_stop=on_stop,
            extra_routes=[*gateway.routes(), *directory.routes()],
        )
        config = uvicorn.Config(
            _QuietStartupFailure(gateway.PeerFastPath(app), watch.down),
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
        context = tls.files_of(settings).server_context()
        if context is not None:
            # our context, not uvicorn's: TLS 1.2 at least, client certificates if required
            config.load()
            config.ssl = context
        names = ", ".join(sorted(specs)) or "none in this process, workers serve them"
        where = "embedded" if embedded is not None else redact_url(nats_url)
        server = _Server(
            config,
            lambda url: (
                f"fdrtd-server '{settings.name}' listening on {url} "
                f"(microservices: {names}; NATS: {where})"
            ),
            watch.down,
        )
        server.run(sockets=listening or None)
        return server.exit_code
    finally:
        if embedded is not None:
            embedded.stop()


async def _worker(
    nats_url: str,
    env: Environment,
    allowed: tuple[str, ...],
    limits: StoreLimits | None,
    reconnect_seconds: float,
) -> int:
    from fdrtd_server._embedded_nats import redact_url

    bus = await Bus.connect(nats_url, name=f"fdrtd-worker-{env.server}", limits=limits)
    bus.keep_reconnecting()  # for reconnect_seconds: see the watch
    address = redact_url(nats_url)
    watch = _NatsWatch(lambda: [bus], lambda: None, address, reconnect_seconds)

    def lost(what: str) -> int:
        log.error("%s", _nats_lost_message(what).replace("fdrtd-server", "the worker"))
        return EXIT_NATS_LOST

    specs = discover(allowed, env.plugin_policy)
    try:
        running = await start_microservices(bus, env, specs)
    except Exception:
        what = await watch.explains_failure()
        if what is None:
            raise
        await bus.abandon()
        return lost(what)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "fdrtd worker for '%s' serving %s (NATS: %s)",
        env.server,
        ", ".join(sorted(specs)) or "no microservices",
        address,
    )
    stopping = asyncio.create_task(stop.wait())
    gone = asyncio.create_task(watch.gone())
    await asyncio.wait([stopping, gone], return_when=asyncio.FIRST_COMPLETED)
    for task in (stopping, gone):
        task.cancel()
    code = 0
    if gone.done() and not gone.cancelled():
        code = lost(gone.result())
        await bus.abandon()  # requests still waiting for an answer fail now
    await running.stop()
    if not code and (what := watch.down()) is not None:
        code = lost(what)  # NATS went away while the worker stopped
    await bus.close()
    return code


def run_worker(
    nats_url: str,
    env: Environment,
    allowed: tuple[str, ...] = (),
    *,
    limits: StoreLimits | None = None,
    reconnect_seconds: float = Settings.nats_reconnect_seconds,
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
        reconnect_seconds: How long a lost connection to NATS is tried again
            before the worker gives up (the ``nats_reconnect_seconds`` setting).

    Returns:
        The exit code: 0 after SIGINT/SIGTERM, :data:`EXIT_NATS_LOST` if NATS
        went away for good.
    """
    from fdrtd_server._embedded_nats import resolve_nats_url

    return asyncio.run(_worker(resolve_nats_url(nats_url), env, allowed, limits, reconnect_seconds))
