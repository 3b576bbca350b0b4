"""The read commands of the CLI: `status`, `list`, `watch` and `api` (cli.py parses the
arguments and calls these)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncGenerator
from typing import Any, TextIO

import orjson

from sidecar.connections import connect
from sidecar.event_fields import STATUS_RANK
from sidecar.keys import CHANGES_KEY, project_index_key
from sidecar.read.changes import ChangesFeed, read_change
from sidecar.read.projection import (
    changes_position,
    get_execution,
    list_executions,
    list_projects,
)
from sidecar.read.render import WatchPrinter, list_lines, status_lines

log = logging.getLogger(__name__)

JSON_OPTIONS = orjson.OPT_INDENT_2
# What a change source yields once it follows the changes (then the header is printed).
SUBSCRIBED: dict[str, Any] = {}


async def show_status(redis_url: str, execution_id: str, *, as_json: bool) -> int:
    redis = connect(redis_url, decode_responses=True)
    try:
        execution = await get_execution(redis, execution_id)
    finally:
        await redis.aclose()
    if execution is None:
        print(f"no execution {execution_id!r} in the projection", file=sys.stderr)
        return 1
    if as_json:
        print(orjson.dumps(execution, option=JSON_OPTIONS).decode())
    else:
        print("\n".join(status_lines(execution)))
    return 0


async def show_list(redis_url: str, project: str, *, limit: int, as_json: bool) -> int:
    redis = connect(redis_url, decode_responses=True)
    try:
        page = await list_executions(redis, project, limit=limit)
        total: int = await redis.zcard(project_index_key(project))
    finally:
        await redis.aclose()
    executions = page["executions"]
    if as_json:
        print(orjson.dumps(executions, option=JSON_OPTIONS).decode())
        return 0
    if not executions:
        print(f"no executions for {project}")
        return 0
    print("\n".join(list_lines(executions, more=total - len(executions))))
    return 0


# Rows `watch` lists before it follows the changes, as `kubectl get -w` lists first.
WATCH_ROWS = 20


async def watch(
    *,
    redis_url: str | None,
    api_url: str | None,
    token: str | None,
    project: str | None,
    count: int | None = None,
    rows: int = WATCH_ROWS,
    out: TextIO | None = None,
) -> int:
    """Print a header and the `rows` newest executions (oldest of them first), then a line
    per change after them until interrupted (or `count` changes). The changes are followed
    from the feed's position before the rows were read: none is missed, and one the rows
    already show is not printed again. `rows=0` follows the changes only."""
    out = out or sys.stdout
    printer = WatchPrinter()
    after = None
    shown: dict[str, tuple[int, int, str]] = {}
    if rows:
        listed, after = await (
            _snapshot_from_api(api_url, token, project, rows)
            if api_url
            else _snapshot_from_redis(redis_url or "", project, rows)
        )
        print(printer.header(), file=out, flush=True)
        for execution in reversed(listed):
            shown[str(execution.get("executionId"))] = _order(execution)
            print(printer.line(execution), file=out)
        out.flush()
    changes = (
        _changes_from_api(api_url, token, project, after)
        if api_url
        else _changes_from_redis(redis_url or "", project, after)
    )
    seen = 0
    header_printed = bool(rows)
    async with contextlib.aclosing(changes):
        async for execution in changes:
            if execution is SUBSCRIBED:  # from here on, no change is missed
                if not header_printed:
                    print(printer.header(), file=out, flush=True)
                    header_printed = True
                continue
            if execution is None:  # reset: what happened meanwhile is in the snapshot
                print("(the changes could not be resumed; run `task-tracking list`)", file=out)
                continue
            listed_as = shown.pop(str(execution.get("executionId")), None)
            if listed_as is not None and _order(execution) <= listed_as:
                shown[str(execution.get("executionId"))] = listed_as  # the rows show it
                continue
            print(printer.line(execution), file=out, flush=True)
            seen += 1
            if count is not None and seen >= count:
                return 0
    return 0


def _order(execution: dict[str, Any]) -> tuple[int, int, str]:
    """The ordering key of the event an execution's state holds (DESIGN.md)."""
    ms = execution.get("occurredAtMs")
    rank = STATUS_RANK.get(str(execution.get("status")), 0)
    return (ms if isinstance(ms, int) else 0, rank, str(execution.get("eventId", "")))


def _newest(executions: list[dict[str, Any]], rows: int) -> list[dict[str, Any]]:
    ordered = sorted(executions, key=lambda e: _order(e)[0], reverse=True)
    return ordered[:rows]


async def _snapshot_from_redis(
    redis_url: str, project: str | None, rows: int
) -> tuple[list[dict[str, Any]], str]:
    """The newest executions (of one project, or of all) and the feed's position before
    they were read. The newest `rows` of all are in the `rows` most recently active
    projects."""
    redis = connect(redis_url, decode_responses=True)
    try:
        if project is not None:
            page = await list_executions(redis, project, limit=rows)
            return page["executions"], page["changesId"]
        position = await changes_position(redis)
        listed: list[dict[str, Any]] = []
        for active in (await list_projects(redis))[:rows]:
            listed += (await list_executions(redis, active["project"], limit=rows))["executions"]
        return _newest(listed, rows), position
    finally:
        await redis.aclose()


async def _changes_from_redis(
    redis_url: str, project: str | None, after: str | None
) -> AsyncGenerator[dict[str, Any] | None, None]:
    """Straight from the changes stream (no API needed): XREAD BLOCK after `after`, or
    from now on."""
    redis = connect(redis_url, decode_responses=True)
    try:
        last = after or await ChangesFeed(redis).position()
        yield SUBSCRIBED
        while True:
            reply: Any = await redis.xread({CHANGES_KEY: last}, count=500, block=5000)
            for _, rows in reply or []:
                for entry_id, fields in rows:
                    change = await read_change(redis, entry_id, fields)
                    last = change.id
                    if project is None or change.project == project:
                        yield orjson.loads(change.state)
    finally:
        await redis.aclose()


def _api_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _refused(status: int) -> None:
    if status == 401:
        raise SystemExit("task-tracking: the API wants a token: --token or TASK_TRACKING_API_TOKEN")


async def _snapshot_from_api(
    api_url: str, token: str | None, project: str | None, rows: int
) -> tuple[list[dict[str, Any]], str]:
    """As `_snapshot_from_redis`, through the read API (retried until it answers)."""
    import aiohttp

    base = api_url.rstrip("/") + "/api/v1/projects"
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, headers=_api_headers(token)) as session:

        async def get(url: str) -> Any:
            async with session.get(url, params={"limit": str(rows)}) as reply:
                _refused(reply.status)
                reply.raise_for_status()
                return await reply.json(loads=orjson.loads)

        while True:
            try:
                if project is not None:
                    page = await get(f"{base}/{project}/executions")
                    return page["executions"], page["changesId"]
                index = await get(base)
                listed: list[dict[str, Any]] = []
                for active in index["projects"][:rows]:
                    listed += (await get(f"{base}/{active['project']}/executions"))["executions"]
                return _newest(listed, rows), index["changesId"]
            except (TimeoutError, aiohttp.ClientError) as exc:
                log.warning("executions: %s; retrying", exc)
            await asyncio.sleep(1)


async def _changes_from_api(
    api_url: str, token: str | None, project: str | None, after: str | None
) -> AsyncGenerator[dict[str, Any] | None, None]:
    """Through the read API's SSE after `after` (or from now on), reconnecting with the
    last id after a drop."""
    import aiohttp

    params = {"project": project} if project else {}
    last = after
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)  # heartbeats every 15 s
    async with aiohttp.ClientSession(timeout=timeout, headers=_api_headers(token)) as session:
        while True:
            resume = {"Last-Event-ID": last} if last else {}
            try:
                url = api_url.rstrip("/") + "/api/v1/changes"
                async with session.get(url, params=params, headers=resume) as reply:
                    _refused(reply.status)
                    reply.raise_for_status()
                    fields: dict[str, str] = {}
                    async for raw in reply.content:
                        line = raw.decode().rstrip("\n")
                        if line == ": connected":
                            yield SUBSCRIBED
                        if line:
                            if not line.startswith(":"):
                                name, _, value = line.partition(":")
                                fields[name] = value.removeprefix(" ")
                            continue
                        if fields.get("event") == "execution":
                            last = fields.get("id", last)
                            yield orjson.loads(fields["data"])
                        elif fields.get("event") == "reset":
                            last = None
                            yield None
                        fields = {}
            except (TimeoutError, aiohttp.ClientError) as exc:
                log.warning("changes: %s; reconnecting", exc)
            await asyncio.sleep(1)


async def serve_api(
    redis_url: str, host: str, port: int, token: str | None, stop: asyncio.Event
) -> None:
    """`task-tracking api`: the read app alone until `stop` is set."""
    from sidecar.read.app import start_api

    runner, _ = await start_api(redis_url, host, port, token=token)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
