"""The sidecar's HTTP endpoints: /metrics, /healthz (liveness) and /readyz (readiness).

The port faces every pod on the network, so the server bounds what a client can hold:
a request header must be complete within `HEADER_TIMEOUT_SECONDS` of the connection
opening (or of its first byte, for the next request on a kept-alive connection), an idle
kept-alive connection is closed after `KEEPALIVE_TIMEOUT_SECONDS`, and at most
`MAX_CONNECTIONS` are open at once. At the cap, a new connection displaces the oldest
one that is waiting for a request header (a slow, partial or idle client), so the kubelet's
probes and Prometheus's scrapes, which send their request at once, still get through;
only when every connection is in the middle of a request is the new one refused.
aiohttp bounds the header's size (8190-byte lines, 128 fields) but not the time it takes,
hence `ConnectionGuard`, a thin protocol in front of aiohttp's own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge

if TYPE_CHECKING:
    from sidecar.runtime import Sidecar

log = logging.getLogger(__name__)

# From the connection opening (or the first byte of a later request) to a complete header.
# Probes and scrapes send theirs in one packet; 10 s is Go's usual ReadHeaderTimeout.
HEADER_TIMEOUT_SECONDS = 10.0
# Above a 60 s scrape interval, so Prometheus keeps reusing its connection.
KEEPALIVE_TIMEOUT_SECONDS = 65.0
# Prometheus, the kubelet and a few people need a handful; 512 sockets stay far below
# common fd limits and cost a few MB.
MAX_CONNECTIONS = 512
# A connection whose header arrived this recently is being answered: not displaced.
# Every endpoint answers in milliseconds; later it is idle between requests.
BUSY_SECONDS = 5.0
# At most one "cap reached" warning this often; what happened meanwhile is counted.
CAP_LOG_INTERVAL_SECONDS = 60.0
ALLOWED_METHODS = ("GET", "HEAD")
# Connections the kernel completes before we accept them (capped by net.core.somaxconn):
# room for a burst, so a probe arriving with one is queued rather than dropped.
LISTEN_BACKLOG = 1024

SIDECAR_KEY: web.AppKey[Sidecar] = web.AppKey("sidecar")
GUARD_KEY: web.AppKey[ConnectionGuard] = web.AppKey("connection_guard")


def build_app(sidecar: Sidecar) -> web.Application:
    """The app with its routes; registers the HTTP metrics on the sidecar's registry."""
    guard = ConnectionGuard(sidecar.metrics.registry)
    app = web.Application(middlewares=[only_get_and_head])
    app[SIDECAR_KEY] = sidecar
    app[GUARD_KEY] = guard
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_server(sidecar: Sidecar, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve the app on host:port behind the connection guard; returns the runner (its
    `cleanup()` stops everything) and the bound port (for port 0)."""
    app = build_app(sidecar)
    runner = web.AppRunner(app, handle_signals=False, keepalive_timeout=KEEPALIVE_TIMEOUT_SECONDS)
    await runner.setup()
    site = GuardedSite(runner, host, port, app[GUARD_KEY])
    await site.start()
    log.info(
        "HTTP on %s:%s (request header within %ss, idle keep-alive %ss, at most %s connections)",
        host,
        site.port,
        HEADER_TIMEOUT_SECONDS,
        KEEPALIVE_TIMEOUT_SECONDS,
        MAX_CONNECTIONS,
    )
    return runner, site.port


@web.middleware
async def only_get_and_head(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """405 for any other method, on every path: the port only ever serves reads."""
    if request.method not in ALLOWED_METHODS:
        request.app[GUARD_KEY].refused.labels("method_not_allowed").inc()
        raise web.HTTPMethodNotAllowed(request.method, ALLOWED_METHODS)
    return await handler(request)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SIDECAR_KEY].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    """200 unless the process is wedged: a worker task died or the event loop stalls."""
    problems = request.app[SIDECAR_KEY].liveness_problems()
    return _answer(problems)


async def readyz(request: web.Request) -> web.Response:
    """200 when Redis answers, the groups exist, and an enabled archiver can write."""
    problems = request.app[SIDECAR_KEY].readiness_problems()
    return _answer(problems)


def _answer(problems: list[str]) -> web.Response:
    if problems:
        return web.json_response({"ok": False, "problems": problems}, status=503)
    return web.json_response({"ok": True})


# ---- connection limits -----------------------------------------------------


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a `ConnectionGuard` first."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard
    ) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        return self._port

    async def start(self) -> None:
        await super().start()  # registers the site with the runner, which stops it
        server = self._runner.server
        assert server is not None
        self._guard.handler_factory = server
        loop = asyncio.get_running_loop()
        listening = await loop.create_server(
            lambda: GuardedConnection(self._guard), self._host, self._port, backlog=LISTEN_BACKLOG
        )
        self._server = listening
        self._port = int(listening.sockets[0].getsockname()[1])  # port 0: the one chosen


class ConnectionGuard:
    """Open connections, oldest first: enforces the cap and counts what it closes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.handler_factory: Callable[[], asyncio.Protocol] | None = None
        self.max_connections = MAX_CONNECTIONS
        self.header_timeout = HEADER_TIMEOUT_SECONDS
        # Insertion order = when each began waiting for its current request (dicts keep it).
        self._open: dict[GuardedConnection, None] = {}
        self.refused = Counter(
            "task_tracking_http_refused_total",
            "HTTP connections closed or requests refused by the server's limits, by reason:"
            " header_timeout, displaced (at the connection cap), over_capacity,"
            " method_not_allowed.",
            ("reason",),
            registry=registry,
        )
        for reason in ("header_timeout", "displaced", "over_capacity", "method_not_allowed"):
            self.refused.labels(reason)
        Gauge(
            "task_tracking_http_connections",
            "Open connections to the HTTP port.",
            registry=registry,
        ).set_function(lambda: len(self._open))
        self._at_cap = False
        self._last_warning = -CAP_LOG_INTERVAL_SECONDS
        self._displaced = 0
        self._over_capacity = 0

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def admit(self, connection: GuardedConnection) -> bool:
        """Make room for `connection` if needed; False when it must be refused."""
        if len(self._open) >= self.max_connections:
            self._cap_reached()
            victim = self._oldest_waiting()
            if victim is None:
                self._over_capacity += 1
                self.refused.labels("over_capacity").inc()
                return False
            self._displaced += 1
            self.refused.labels("displaced").inc()
            self.forget(victim)
            victim.abort()
        self._open[connection] = None
        return True

    def began_request(self, connection: GuardedConnection) -> None:
        """A complete header arrived: the connection goes to the back of the queue."""
        if connection in self._open:
            del self._open[connection]
            self._open[connection] = None

    def forget(self, connection: GuardedConnection) -> None:
        self._open.pop(connection, None)
        if self._at_cap and len(self._open) <= self.max_connections // 2:
            self._at_cap = False
            log.info(
                "HTTP connections back under half the cap of %s: %s displaced and %s refused"
                " since the last report",
                self.max_connections,
                self._displaced,
                self._over_capacity,
            )
            self._displaced = self._over_capacity = 0

    def timed_out(self, connection: GuardedConnection) -> None:
        self.refused.labels("header_timeout").inc()
        self.forget(connection)

    def _oldest_waiting(self) -> GuardedConnection | None:
        now = time.monotonic()
        for connection in self._open:  # busy ones were moved to the back
            if connection.busy_until <= now:
                return connection
        return None

    def _cap_reached(self) -> None:
        if self._at_cap:
            return
        self._at_cap = True
        now = time.monotonic()
        if now - self._last_warning < CAP_LOG_INTERVAL_SECONDS:
            return  # counted, and reported with the "back under" line
        self._last_warning = now
        log.warning(
            "HTTP connections reached the cap of %s: new connections displace the oldest ones"
            " still waiting for a request header (slow, partial or idle clients), or are"
            " refused when every connection is busy; task_tracking_http_refused_total counts"
            " them. Look for a client opening connections without sending requests.",
            self.max_connections,
        )


class GuardedConnection(asyncio.Protocol):
    """One connection: admission at the cap, the header deadline, then aiohttp's handler."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes seen, for a header end split over two reads
        self.busy_until = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses).
        self._transport = cast(asyncio.Transport, transport)
        if not self._guard.admit(self):
            self._transport.abort()
            return
        assert self._guard.handler_factory is not None
        self._inner = self._guard.handler_factory()
        self._await_header()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._deadline is None:  # first bytes of the next request on this connection
            self._await_header()
        window = self._tail + data
        end = max(_end_of(window, b"\r\n\r\n"), _end_of(window, b"\n\n"))
        if end:
            self._header_complete()
            if end < len(window):  # a pipelined request has begun
                self._await_header()
        self._tail = window[max(end, len(window) - 3) :]  # a header end counts once
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self._guard.forget(self)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def abort(self) -> None:
        self._cancel_deadline()
        if self._transport is not None:
            self._transport.abort()

    def _await_header(self) -> None:
        self._cancel_deadline()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._guard.header_timeout, self._header_late)

    def _header_complete(self) -> None:
        self._cancel_deadline()
        self.busy_until = time.monotonic() + BUSY_SECONDS
        self._guard.began_request(self)

    def _header_late(self) -> None:
        self._deadline = None
        self._guard.timed_out(self)
        self.abort()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def _end_of(window: bytes, terminator: bytes) -> int:
    """Index just past the last `terminator` in `window`, 0 when absent."""
    at = window.rfind(terminator)
    return 0 if at < 0 else at + len(terminator)
