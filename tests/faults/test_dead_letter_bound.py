"""A flood of invalid entries, some of them oversized, against a small dead-letter bound:
the dead-letter stream stays near its bound (approximate trim), every entry is
acknowledged, no payload is kept whole, and the length metric follows the stream."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from sidecar.devserver import free_port
from sidecar.events import DEAD_LETTER_EVENT_BYTES
from tests.helpers import (
    DEAD_LETTER,
    PROJECTOR,
    STREAM,
    SidecarProcess,
    event,
    group_done,
    sidecar_env,
    wait_for,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]

BOUND = 500
FLOOD = 10_000


async def _scraped_length(port: int) -> float | None:
    """task_tracking_dead_letter_length as the sidecar exports it."""
    url = f"http://127.0.0.1:{port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("task_tracking_dead_letter_length "):
            return float(line.split()[1])
    return None


async def test_ten_thousand_invalid_entries_leave_the_dead_letter_stream_near_its_bound(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    oversized = b'{"blob": "' + b"z" * (2 * 1024 * 1024) + b'"}'
    async with redis_client.pipeline(transaction=False) as pipe:
        for n in range(FLOOD):
            payload = oversized if n % 1000 == 999 else b"not json %d" % n
            pipe.xadd(STREAM, {"event": payload})
        pipe.xadd(STREAM, {"event": orjson.dumps(event("after-the-flood", "success"))})
        await pipe.execute()
    port = free_port()
    env = sidecar_env(redis_url, dead_letter_maxlen=BOUND, redis_block_ms=200, http_port=port)
    process = SidecarProcess(env, tmp_path / "sidecar.log").start()
    try:
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR), 120, "drained")
        length = int(await redis_client.xlen(DEAD_LETTER))
        # MAXLEN ~ trims whole nodes of the stream (100 entries by default)
        assert BOUND <= length <= BOUND + 100, length
        newest = await redis_client.xrevrange(DEAD_LETTER, count=FLOOD)
        assert all(len(fields[b"event"]) <= DEAD_LETTER_EVENT_BYTES for _, fields in newest)
        assert await redis_client.hget("task-tracking:execution:after-the-flood", "status") == (
            b"success"
        )
        await wait_for(lambda: _length_matches(port, length), 30, "the length metric follows")
        memory = await redis_client.memory_usage(DEAD_LETTER)
        print(f"\ndead-letter figures: flood={FLOOD} bound={BOUND} length={length} bytes={memory}")
        assert process.terminate() == 0, process.log()
    finally:
        process.kill()


async def _length_matches(port: int, length: int) -> bool:
    return await _scraped_length(port) == length
