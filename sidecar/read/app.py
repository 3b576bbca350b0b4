"""The read API on its own port: executions, projects, the changes over SSE, the board.

`start_api` serves it inside a sidecar (`TASK_TRACKING_API_ENABLED`) or standalone
(`task-tracking api`, `ReadApi`); it holds a Redis client of its own and the process's
one changes reader, both started and stopped with the app (`cleanup_ctx`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
from aiohttp import web

from sidecar.config import ConfigError, listen_problem
from sidecar.connections import connect
from sidecar.events import PROJECT_RE
from sidecar.read.changes import ChangesFeed, Subscriber, TooOld, stream_id
from sidecar.read.projection import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    BadCursor,
    ReadClient,
    changes_position,
    get_execution,
    list_executions,
    list_projects,
)

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 15.0
# The kubelet's probes carry no token; they tell nothing about the task data.
PROBES = ("/healthz", "/readyz")
# A client that cannot take a write (its socket buffer full) for this long is dropped.
WRITE_TIMEOUT_SECONDS = 5.0
# Writes of changes a second to all clients together, about, and the longest a client's
# next write waits (see `_stream`): 100 clients wait 5 ms, 1,000 and more 50 ms.
WRITES_PER_SECOND = 20_000
COALESCE_MAX_SECONDS = 0.05
PROJECT = r"[A-Za-z0-9][A-Za-z0-9-]{0,38}"
REPO = r"[A-Za-z0-9._-]{1,100}"

REDIS_KEY: web.AppKey[ReadClient] = web.AppKey("redis")
FEED_KEY: web.AppKey[ChangesFeed] = web.AppKey("feed")
TOKEN_KEY: web.AppKey[str | None] = web.AppKey("token")
HEARTBEAT_KEY: web.AppKey[float] = web.AppKey("heartbeat")


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, dumps=_dumps)


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


@web.middleware
async def require_token(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """`Authorization: Bearer <token>` on every request when a token is set; the board's
    page (`/`) may carry it as `?token=` (a link to open in a browser)."""
    token = request.app[TOKEN_KEY]
    if request.method not in ("GET", "HEAD"):
        return error(405, "only GET and HEAD")
    if token and request.path not in PROBES:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if request.path == "/" and not given:
            given = request.query.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return error(401, "missing or wrong token: send Authorization: Bearer <token>")
    return await handler(request)


def build_app(
    redis_url: str, *, token: str | None = None, heartbeat_seconds: float = HEARTBEAT_SECONDS
) -> web.Application:
    app = web.Application(middlewares=[require_token])
    app[TOKEN_KEY] = token or None
    app[HEARTBEAT_KEY] = heartbeat_seconds

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        redis = connect(redis_url, decode_responses=True)
        feed = ChangesFeed(redis)
        app[REDIS_KEY] = redis
        app[FEED_KEY] = feed
        await feed.start()
        yield
        await feed.stop()
        with contextlib.suppress(Exception):
            await redis.aclose()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/", board)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/v1/executions/{execution_id}", execution)
    app.router.add_get("/api/v1/projects", projects)
    project_path = f"/api/v1/projects/{{owner:{PROJECT}}}/{{repo:{REPO}}}/executions"
    app.router.add_get(project_path, executions)
    app.router.add_get("/api/v1/changes", changes)
    return app


async def board(request: web.Request) -> web.Response:
    page = importlib.resources.files("sidecar.read").joinpath("board.html").read_bytes()
    return web.Response(body=page, content_type="text/html", charset="utf-8")


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers (a Redis outage is /readyz's business)."""
    return web.json_response({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: Redis answers, and the changes reader has its position."""
    try:
        await request.app[REDIS_KEY].ping()
    except Exception as exc:
        return error(503, f"Redis: {exc}")
    if not request.app[FEED_KEY].started.is_set():
        return error(503, "the changes reader has not started yet")
    return web.json_response({"ok": True})


async def execution(request: web.Request) -> web.Response:
    execution_id = request.match_info["execution_id"]
    found = await get_execution(request.app[REDIS_KEY], execution_id)
    if found is None:
        return error(404, f"no execution {execution_id!r} in the projection")
    return web.json_response(found, dumps=_dumps)


async def projects(request: web.Request) -> web.Response:
    redis = request.app[REDIS_KEY]
    changes_id = await changes_position(redis)
    listed = await list_projects(redis)
    return web.json_response({"projects": listed, "changesId": changes_id}, dumps=_dumps)


async def executions(request: web.Request) -> web.Response:
    project = f"{request.match_info['owner']}/{request.match_info['repo']}"
    if project.split("/")[1] in (".", ".."):
        return error(404, "no such project")
    try:
        limit = int(request.query.get("limit", DEFAULT_LIMIT))
    except ValueError:
        return error(400, f"limit: an integer from 1 to {MAX_LIMIT}")
    if not 1 <= limit <= MAX_LIMIT:
        return error(400, f"limit: an integer from 1 to {MAX_LIMIT}")
    try:
        page = await list_executions(
            request.app[REDIS_KEY], project, limit=limit, before=request.query.get("before")
        )
    except BadCursor as exc:
        return error(400, str(exc))
    return web.json_response(page, dumps=_dumps)


def _reset(reason: str) -> bytes:
    return f"event: reset\ndata: {_dumps({'reason': reason})}\n\n".encode()


async def changes(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: each change after `Last-Event-ID` (or `?lastEventId=`), or after
    now; `reset` when that position cannot be resumed, or when the client falls behind."""
    feed = request.app[FEED_KEY]
    project = request.query.get("project") or None
    if project is not None and not PROJECT_RE.fullmatch(project):
        return error(400, f"project: {project!r} is not owner/repo")
    after = request.headers.get("Last-Event-ID") or request.query.get("lastEventId")
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
        }
    )
    await response.prepare(request)
    await feed.started.wait()
    with feed.subscribe(project) as subscriber:
        try:
            await response.write(b": connected\n\n")  # subscribed: nothing after is missed
            if after is not None:
                await feed.check_resumable(after)
            await _stream(request, response, feed, subscriber, after)
        except TooOld as exc:
            await _write(response, _reset(str(exc)))
        except ConnectionResetError:
            pass  # the client left
        except TimeoutError:  # the client stopped reading: its socket is full, cut it
            if request.transport is not None:
                request.transport.abort()
    response.force_close()  # the stream ends with the connection
    return response


async def _write(response: web.StreamResponse, data: bytes) -> None:
    async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
        await response.write(data)


async def _stream(
    request: web.Request,
    response: web.StreamResponse,
    feed: ChangesFeed,
    subscriber: Subscriber,
    after: str | None,
) -> None:
    """Without `after`, the feed's log alone: it holds every change since the
    subscription (reading the stream's position here instead would drop what came
    meanwhile). After a write, the next waits a moment that grows with the number of
    clients: what comes meanwhile goes out in one write, and a busy feed costs about
    `WRITES_PER_SECOND` writes, not one per change and client."""
    last = None
    if after is not None:
        last = stream_id(after)
        async for change in feed.since(after):
            if subscriber.project is None or change.project == subscriber.project:
                await _write(response, change.frame)
            last = change.position
    heartbeat = request.app[HEARTBEAT_KEY]
    clock = asyncio.get_running_loop().time
    quiet_until = clock() + heartbeat  # a heartbeat when nothing was written till then
    while True:
        await feed.wait(subscriber, max(0.0, quiet_until - clock()))
        fresh = feed.take(subscriber)
        if subscriber.overflowed:  # a slow client, or the feed itself was reset
            await _write(response, _reset("the client fell behind the changes"))
            return
        if last is not None:  # resumed: the stream's part may have reached into the log
            fresh = [change for change in fresh if change.position > last]
            if fresh:  # and so is every change after it
                last = None
        if fresh:
            await _write(response, b"".join(change.frame for change in fresh))
            await asyncio.sleep(
                min(COALESCE_MAX_SECONDS, len(feed.subscribers) / WRITES_PER_SECOND)
            )
            quiet_until = clock() + heartbeat
        elif clock() >= quiet_until:  # also for a project's client on a busy feed
            await _write(response, b": heartbeat\n\n")
            quiet_until = clock() + heartbeat


# Connections queued before they are accepted: aiohttp's TCPSite default, as before.
API_BACKLOG = 128


async def start_api(
    redis_url: str, host: str, port: int, *, token: str | None = None
) -> tuple[web.AppRunner, int]:
    """Serve the read app on host:port; returns the runner (`cleanup()` stops it) and the
    bound port (for port 0)."""
    # Bound before the app starts its changes reader: a taken port is one line and exit 2
    # (a reader started and then cancelled in its blocking read kept the process alive).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=API_BACKLOG)
    except OSError as exc:
        raise ConfigError(listen_problem("TASK_TRACKING_API_PORT", host, port, exc)) from exc
    # SSE handlers never finish by themselves: a stop cuts them after a moment (their
    # clients resume from their last id elsewhere).
    runner = web.AppRunner(
        build_app(redis_url, token=token), handle_signals=False, shutdown_timeout=0.5
    )
    await runner.setup()
    await web.SockSite(runner, sock).start()
    bound: int = sock.getsockname()[1]
    log.info("read API on %s:%s%s", host, bound, " (token required)" if token else "")
    return runner, bound
