"""The sidecar's HTTP endpoints: /metrics, /healthz (liveness) and /readyz (readiness).

Three GET endpoints that answer from memory need little of HTTP, so this is a small
HTTP/1.1 server on asyncio's protocols rather than a web framework: aiohttp alone would
be ~11 MiB of every pod's RSS, and the pod count multiplies it (the read API, a process
of its own when enabled, keeps aiohttp). It serves GET and HEAD (405 with `Allow` for any
other method), keeps connections alive and answers pipelined requests in order.

The port faces every pod on the network, so the server bounds what a client can hold:
a request header must be complete within `HEADER_TIMEOUT_SECONDS` of the connection
opening (or of its first byte, for the next request on a kept-alive connection) and
within `MAX_HEADER_BYTES`; an idle kept-alive connection is closed after
`KEEPALIVE_TIMEOUT_SECONDS`; at most `MAX_CONNECTIONS` are open at once. At the cap, a
new connection displaces the oldest one that is waiting for a request header (a slow,
partial or idle client), so the kubelet's probes and Prometheus's scrapes, which send
their request at once, still get through; only when every connection is in the middle of
a request is the new one refused. A client that does not read its answers stops being
read from until it does. Requests with a body are answered, then the connection closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge

from sidecar.config import ConfigError, listen_problem

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
# A request line and its header fields, at most (aiohttp's and Go's limits are of this
# order); more is answered 431 and the connection closed.
MAX_HEADER_BYTES = 16384
MAX_HEADER_FIELDS = 128
# A connection whose header arrived this recently is being answered: not displaced.
# Every endpoint answers in milliseconds; later it is idle between requests.
BUSY_SECONDS = 5.0
# At most one "cap reached" warning this often; what happened meanwhile is counted.
CAP_LOG_INTERVAL_SECONDS = 60.0
ALLOWED_METHODS = (b"GET", b"HEAD")
# Connections the kernel completes before we accept them (capped by net.core.somaxconn):
# room for a burst, so a probe arriving with one is queued rather than dropped.
LISTEN_BACKLOG = 1024

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
JSON = "application/json; charset=utf-8"
TEXT = "text/plain; charset=utf-8"


class Response:
    """What an endpoint answers: status, content type, body, extra header fields."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self, status: int, content_type: str, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        self.status = status
        self.content_type = content_type
        self.body = body
        self.headers = headers or {}


class HealthServer:
    """The listening socket, its connections and the three endpoints."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.guard = ConnectionGuard(sidecar.metrics.registry)
        self.name = ""  # http://host:port once started
        self._server: asyncio.Server | None = None
        self._routes: dict[bytes, Callable[[], Response]] = {
            b"/metrics": self.metrics,
            b"/healthz": self.healthz,
            b"/readyz": self.readyz,
        }

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port; returns the bound port (the chosen one for port 0)."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: HttpConnection(self), host, port, backlog=LISTEN_BACKLOG
            )
        except OSError as exc:  # the port taken, an address not of this machine
            raise ConfigError(listen_problem("TASK_TRACKING_HTTP_PORT", host, port, exc)) from exc
        bound = int(self._server.sockets[0].getsockname()[1])
        self.name = f"http://{host}:{bound}"
        log.info(
            "HTTP on %s:%s (request header within %ss, idle keep-alive %ss,"
            " at most %s connections)",
            host,
            bound,
            self.guard.header_timeout,
            self.guard.keepalive_timeout,
            self.guard.max_connections,
        )
        return bound

    async def close(self) -> None:
        """Stop listening and close every open connection."""
        if self._server is None:
            return
        self._server.close()
        self.guard.close_all()
        await self._server.wait_closed()

    def answer(self, method: bytes, target: bytes) -> Response:
        if method not in ALLOWED_METHODS:
            self.guard.refused.labels("method_not_allowed").inc()
            allow = ",".join(m.decode() for m in ALLOWED_METHODS)
            return _text(405, "405: Method Not Allowed", {"Allow": allow})
        route = self._routes.get(target.partition(b"?")[0])
        return route() if route is not None else _text(404, "404: Not Found")

    def metrics(self) -> Response:
        return Response(200, CONTENT_TYPE_LATEST, self.sidecar.metrics.exposition())

    def healthz(self) -> Response:
        """200 unless the process is wedged: a worker task died or the event loop stalls."""
        return _problems(self.sidecar.liveness_problems())

    def readyz(self) -> Response:
        """200 when Redis answers, the groups exist, and an enabled archiver can write."""
        return _problems(self.sidecar.readiness_problems())


def _problems(problems: list[str]) -> Response:
    if problems:
        return Response(503, JSON, json.dumps({"ok": False, "problems": problems}).encode())
    return Response(200, JSON, b'{"ok": true}')


def _text(status: int, text: str, headers: dict[str, str] | None = None) -> Response:
    return Response(status, TEXT, text.encode(), headers)


# ---- connections -----------------------------------------------------------


class ConnectionGuard:
    """Open connections, oldest first: enforces the cap and counts what it closes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.max_connections = MAX_CONNECTIONS
        self.header_timeout = HEADER_TIMEOUT_SECONDS
        self.keepalive_timeout = KEEPALIVE_TIMEOUT_SECONDS
        # Insertion order = when each began waiting for its current request (dicts keep it).
        self._open: dict[HttpConnection, None] = {}
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

    @property
    def connections(self) -> list[HttpConnection]:
        return list(self._open)

    def admit(self, connection: HttpConnection) -> bool:
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

    def began_request(self, connection: HttpConnection) -> None:
        """A complete header arrived: the connection goes to the back of the queue."""
        if connection in self._open:
            del self._open[connection]
            self._open[connection] = None

    def forget(self, connection: HttpConnection) -> None:
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

    def timed_out(self, connection: HttpConnection) -> None:
        self.refused.labels("header_timeout").inc()
        self.forget(connection)

    def close_all(self) -> None:
        for connection in list(self._open):
            connection.abort()
        self._open.clear()

    def _oldest_waiting(self) -> HttpConnection | None:
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


class HttpConnection(asyncio.Protocol):
    """One connection: admission at the cap, the header deadline, the requests in order."""

    def __init__(self, server: HealthServer) -> None:
        self._server = server
        self._guard = server.guard
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_for_header = False  # the timer is the header deadline (else keep-alive)
        self._paused = False  # the client does not read: nothing more is answered
        self._closing = False
        self.busy_until = 0.0

    @property
    def unsent_bytes(self) -> int:
        """Answers written but not yet taken by the client."""
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses).
        self._transport = cast(asyncio.Transport, transport)
        if not self._guard.admit(self):
            self._closing = True
            self._transport.abort()
            return
        self._await_header()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._waiting_for_header:  # first bytes of the next request on this connection
            self._await_header()
        self._buffer += data
        self._answer_complete_requests()

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself: nothing more can arrive

    def pause_writing(self) -> None:
        self._paused = True
        if self._transport is not None:
            self._transport.pause_reading()
        self._await_keepalive()  # a client that never reads again is closed in the end

    def resume_writing(self) -> None:
        self._paused = False
        if self._transport is not None and not self._closing:
            self._transport.resume_reading()
            self._answer_complete_requests()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._cancel_timer()
        self._guard.forget(self)

    def abort(self) -> None:
        self._closing = True
        self._cancel_timer()
        if self._transport is not None:
            self._transport.abort()

    def _answer_complete_requests(self) -> None:
        start = 0  # of the next request: the buffer is cut once, not after each request
        while not self._paused and not self._closing:
            end = _end_of_header(self._buffer, start)
            # Over the limit whether or not its end has arrived (one packet can hold it all).
            if (end if end >= 0 else len(self._buffer)) - start > MAX_HEADER_BYTES:
                self._respond(_text(431, "431: Request Header Fields Too Large"), b"GET")
                self._close()
                break
            if end < 0:
                if start == len(self._buffer):
                    self._await_keepalive()
                break
            header, start = self._buffer[start:end], end
            self._cancel_timer()
            self.busy_until = time.monotonic() + BUSY_SECONDS
            self._guard.began_request(self)
            self._answer(header)
            if start < len(self._buffer) and not self._closing and not self._paused:
                self._await_header()  # a pipelined request has begun
        self._buffer = self._buffer[start:]

    def _answer(self, header: bytes) -> None:
        request = _parse(header)
        if request is None:
            self._respond(_text(400, "400: Bad Request"), b"GET")
            self._close()
            return
        method, target, keep_alive = request
        self._respond(self._server.answer(method, target), method, keep_alive)
        if not keep_alive:
            self._close()

    def _respond(self, response: Response, method: bytes, keep_alive: bool = False) -> None:
        assert self._transport is not None
        fields = [
            f"HTTP/1.1 {response.status} {REASONS[response.status]}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Connection: keep-alive" if keep_alive else "Connection: close",
            *(f"{name}: {value}" for name, value in response.headers.items()),
        ]
        head = ("\r\n".join(fields) + "\r\n\r\n").encode("latin-1")
        self._transport.write(head if method == b"HEAD" else head + response.body)

    def _close(self) -> None:
        self._closing = True
        self._cancel_timer()
        if self._transport is not None:
            self._transport.close()  # after what is written has gone out
            if self.unsent_bytes:  # unless the client never takes it
                self._set_timer(self._guard.keepalive_timeout, self.abort)

    def _await_header(self) -> None:
        self._set_timer(self._guard.header_timeout, self._header_late)
        self._waiting_for_header = True

    def _await_keepalive(self) -> None:
        self._set_timer(self._guard.keepalive_timeout, self._idle_too_long)
        self._waiting_for_header = False

    def _idle_too_long(self) -> None:
        self._timer = None
        if self.unsent_bytes:  # close() would wait for a client that does not read
            self.abort()
        else:
            self._close()

    def _header_late(self) -> None:
        self._timer = None
        self._guard.timed_out(self)
        self.abort()

    def _set_timer(self, delay: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _end_of_header(buffer: bytes, start: int) -> int:
    """Index just past the first blank line in `buffer` from `start` (CRLF or bare LF), -1
    when absent."""
    crlf, lf = buffer.find(b"\r\n\r\n", start), buffer.find(b"\n\n", start)
    ends = [at + n for at, n in ((crlf, 4), (lf, 2)) if at >= 0]
    return min(ends) if ends else -1


def _parse(header: bytes) -> tuple[bytes, bytes, bool] | None:
    """(method, target, keep-alive) of a request header; None when it is not HTTP/1.x or
    has too many fields. A request with a body is not kept alive (its body is not read)."""
    lines = header.rstrip(b"\r\n").split(b"\n")
    parts = lines[0].rstrip(b"\r").split(b" ")
    if (
        len(parts) != 3
        or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0")
        or len(lines) > 1 + MAX_HEADER_FIELDS
    ):
        return None
    method, target, version = parts
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.rstrip(b"\r").partition(b":")
        if not colon or not name or name != name.strip():
            return None
        fields[name.lower()] = value.strip().lower()
    connection = fields.get(b"connection", b"")
    keep_alive = connection != b"close" if version == b"HTTP/1.1" else connection == b"keep-alive"
    has_body = fields.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in fields
    return method, target, keep_alive and not has_body
