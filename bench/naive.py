"""The naive baseline: one entry at a time, every step its own round trip.

Read one entry, validate it with the model, compare with the projected state
(HMGET), replace the hash (DEL, HSET), update the index (ZADD GT), acknowledge
it: what a first implementation does. `python -m bench.naive URL` runs it
until stopped (the footprint case measures it as a process).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bench.workload import PROJECTOR_GROUP, STREAM
from sidecar import eventloop
from sidecar.events import STATUS_RANK, ValidEvent, decode_entry
from sidecar.keys import execution_key, project_index_key


async def apply_one(client: aioredis.Redis, event: ValidEvent) -> None:
    key = execution_key(event.execution_id)
    current = await client.hmget(key, ["occurredAtMs", "status", "eventId"])
    if current[0] is not None:
        rank = 0 if current[1] == b"in_progress" else 1
        held = (int(current[0]), rank, (current[2] or b"").decode())
        if event.ordering_key <= held:
            await client.zadd(
                project_index_key(event.project),
                {event.execution_id: event.occurred_at_ms},
                gt=True,
            )
            return
    mapping: dict[str, Any] = {
        name: value if isinstance(value, str) else orjson.dumps(value)
        for name, value in event.fields.items()
    }
    mapping["occurredAtMs"] = event.occurred_at_ms
    mapping["streamId"] = event.entry_id
    await client.delete(key)
    await client.hset(key, mapping=mapping)
    await client.zadd(
        project_index_key(event.project), {event.execution_id: event.occurred_at_ms}, gt=True
    )


async def consume(
    url: str,
    expected: int | None,
    *,
    on_applied: Any = None,
    stop: asyncio.Event | None = None,
    block_ms: int = 1000,  # below redis-py's default 5 s socket timeout
) -> float:
    """Consume `expected` entries (or until `stop`), one at a time; returns the seconds."""
    client = aioredis.Redis.from_url(url)
    try:
        with contextlib.suppress(ResponseError):  # the group exists already
            await client.xgroup_create(STREAM, PROJECTOR_GROUP, id="0", mkstream=True)
        started = time.perf_counter()
        done = 0
        while (expected is None or done < expected) and not (stop and stop.is_set()):
            response: Any = await client.xreadgroup(
                PROJECTOR_GROUP, "naive", {STREAM: ">"}, count=1, block=block_ms
            )
            if not response:
                continue
            raw_id, fields = response[0][1][0]
            entry_id = raw_id.decode()
            decoded = decode_entry(entry_id, fields)
            if isinstance(decoded, ValidEvent):
                await apply_one(client, decoded)
                if on_applied is not None:
                    on_applied(decoded)
            await client.xack(STREAM, PROJECTOR_GROUP, entry_id)
            done += 1
        return time.perf_counter() - started
    finally:
        await client.aclose()


assert STATUS_RANK  # the ordering key above uses the same ranks

if __name__ == "__main__":
    eventloop.run(consume(sys.argv[1], None))
