"""Reading the projection: executions in their JSON types, projects, cursor paging.

A hash keeps strings as they are and everything else JSON-encoded; its `jsonFields`
field (written by the projector's compare-and-set) lists the encoded ones. Hashes
written before that field existed are read with the fields the contract knows to be
JSON (`actor`, `prLinks`, `visibility`, a numeric `occurredAt`); unknown non-string
fields of such a hash stay strings.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from typing import Any

import orjson
from redis.asyncio import Redis, RedisCluster

from sidecar.keys import (
    CHANGES_KEY,
    JSON_FIELDS_FIELD,
    PROJECTS_KEY,
    execution_key,
    project_index_key,
)

LEGACY_JSON_FIELDS = ("actor", "prLinks", "visibility")
DEFAULT_LIMIT = 50
MAX_LIMIT = 500

Execution = dict[str, Any]
ReadClient = Redis | RedisCluster


class BadCursor(ValueError):
    """A `before=` cursor this API did not write."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


def decode_execution(stored: dict[Any, Any]) -> Execution:
    """A projection hash (bytes or str) as the execution's JSON object."""
    row = {_text(name): _text(value) for name, value in stored.items()}
    listed = row.pop(JSON_FIELDS_FIELD, None)
    if listed is not None:
        encoded: list[str] = orjson.loads(listed)
    else:
        encoded = [name for name in LEGACY_JSON_FIELDS if name in row]
        if row.get("occurredAt", "").isdigit():
            encoded.append("occurredAt")
    execution: Execution = dict(row)
    for name in encoded:
        if name in execution:
            with contextlib.suppress(orjson.JSONDecodeError):  # else kept as it stands
                execution[name] = orjson.loads(execution[name])
    if "occurredAtMs" in row:
        execution["occurredAtMs"] = int(row["occurredAtMs"])
    return execution


async def get_execution(redis: ReadClient, execution_id: str) -> Execution | None:
    stored: Any = await redis.hgetall(execution_key(execution_id))
    return decode_execution(stored) if stored else None


async def list_projects(redis: ReadClient) -> list[dict[str, Any]]:
    """Every project with its execution count and latest activity (the top score of its
    index: the projects index only lists the projects), most recent first."""
    members: Any = await redis.zrevrange(PROJECTS_KEY, 0, -1)  # ACL: ZREVRANGE, not ZRANGE
    projects = [_text(member) for member in members]
    async with redis.pipeline(transaction=False) as pipe:
        for project in projects:
            pipe.zcard(project_index_key(project))
            pipe.zrevrange(project_index_key(project), 0, 0, withscores=True)
        replies: list[Any] = await pipe.execute()
    listed = [
        {"project": project, "executionCount": count, "latestActivityMs": int(top[0][1])}
        for project, count, top in zip(projects, replies[0::2], replies[1::2], strict=True)
        if count > 0  # every execution trimmed by retention
    ]
    return sorted(listed, key=lambda project: -project["latestActivityMs"])


async def changes_position(redis: ReadClient) -> str:
    """The changes feed's last entry ID ("0-0" when empty): where to resume the feed to
    miss nothing that changes after a snapshot read from now on."""
    last: Any = await redis.xrevrange(CHANGES_KEY, "+", "-", count=1)
    return _text(last[0][0]) if last else "0-0"


def encode_cursor(score: int, execution_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([score, execution_id])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        value = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        score, execution_id = value
        if isinstance(score, int) and isinstance(execution_id, str):
            return score, execution_id
    except (binascii.Error, orjson.JSONDecodeError, TypeError, ValueError):
        pass
    raise BadCursor("before: not a cursor from this API (use the `next` of a previous page)")


async def _index_page(
    redis: ReadClient, key: str, limit: int, before: tuple[int, str] | None
) -> list[tuple[str, int]]:
    """Up to `limit` index entries after `before`, newest first (ties: ZREVRANGE order)."""
    if before is None:
        rows: Any = await redis.zrange(key, 0, limit - 1, desc=True, withscores=True)
        return [(_text(m), int(s)) for m, s in rows]
    score, member = before
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zscore(key, member)
        pipe.zrevrank(key, member)
        current, rank = await pipe.execute()
    if current is not None and int(current) == score and rank is not None:
        rows = await redis.zrange(key, rank + 1, rank + limit, desc=True, withscores=True)
        return [(_text(m), int(s)) for m, s in rows]
    # The cursor's execution moved (a newer event) or left the index: what follows it is
    # whatever ranks below (score, member) in ZREVRANGE order.
    found: list[tuple[str, int]] = []
    offset = 0
    while len(found) < limit:
        rows = await redis.zrevrangebyscore(
            key, score, "-inf", start=offset, num=limit, withscores=True
        )
        for m, s in rows:
            name, value = _text(m), int(s)
            if value < score or name < member:
                found.append((name, value))
        if len(rows) < limit:
            break
        offset += len(rows)
    return found[:limit]


async def list_executions(
    redis: ReadClient, project: str, *, limit: int = DEFAULT_LIMIT, before: str | None = None
) -> dict[str, Any]:
    """A page of a project's executions, newest first, with the cursor of the next page
    and `changesId`: the changes feed's position before the page was read (resume the
    feed there to miss nothing that changed after)."""
    changes_id = await changes_position(redis)
    cursor = None if before is None else decode_cursor(before)
    page = await _index_page(redis, project_index_key(project), limit + 1, cursor)
    more = len(page) > limit
    page = page[:limit]
    async with redis.pipeline(transaction=False) as pipe:
        for execution_id, _ in page:
            pipe.hgetall(execution_key(execution_id))
        stored: list[dict[Any, Any]] = await pipe.execute()
    # an index entry whose hash expired (TASK_TRACKING_PROJECTION_TTL_SECONDS) is skipped
    executions = [decode_execution(row) for row in stored if row]
    next_cursor = encode_cursor(page[-1][1], page[-1][0]) if more and page else None
    return {
        "project": project,
        "executions": executions,
        "next": next_cursor,
        "changesId": changes_id,
    }
