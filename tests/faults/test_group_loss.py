"""Fault injection: the archiver group is destroyed while events keep coming.

The sidecar runs as a subprocess behind the S3 proxy (tests/faults/test_faults.py). The
group is destroyed after retention trimmed the stream (so the stream starts in the
middle of archived objects and a re-read from `0` would write part of them again),
once while the sidecar runs and once while it is down after a kill -9. The scenario
ends with the same invariant check and figures line as the other fault tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from sidecar.devserver import DevServer
from tests.conftest import MotoServer
from tests.faults.test_faults import (  # noqa: F401 - fixtures used by name
    check_invariant,
    fault_producer,
    redis_server,
    s3_proxy,
    sidecar,
)
from tests.helpers import ARCHIVER, STREAM, wait_for
from tests.s3proxy import S3Proxy

pytestmark = [pytest.mark.faults, pytest.mark.slow]

RECREATED = "re-created at the archive watermark"


async def _first_entry(client: aioredis.Redis) -> str | None:
    first: Any = await client.xrange(STREAM, count=1)
    return first[0][0].decode() if first else None


async def _trimmed_past(client: aioredis.Redis, entry_id: str) -> bool:
    first = await _first_entry(client)
    order = tuple(map(int, entry_id.split("-")))
    return first is not None and tuple(map(int, first.split("-"))) > order


async def _group_exists(client: aioredis.Redis) -> bool:
    groups: Any = await client.xinfo_groups(STREAM)
    return ARCHIVER.encode() in [info["name"] for info in groups]


async def test_archiver_group_destroyed_after_a_trim_while_publishing_and_after_a_kill(
    redis_server: DevServer,  # noqa: F811
    s3: MotoServer,
    s3_proxy: S3Proxy,  # noqa: F811
    tmp_path: Path,
) -> None:
    s3_proxy.delay = 0.05
    producer = fault_producer(redis_server.url, seed=11)
    process = sidecar(redis_server, s3_proxy, s3, tmp_path, "pod-a").start()
    client = aioredis.Redis.from_url(redis_server.url)
    producer.start()
    try:
        await wait_for(lambda: _first_entry(client), message="first entries")
        first = await _first_entry(client)
        assert first is not None
        # Retention runs every 15 s and trims what both groups acknowledged.
        await wait_for(lambda: _trimmed_past(client, first), 40, "the stream trimmed")
        await client.xgroup_destroy(STREAM, ARCHIVER)
        await wait_for(lambda: process.log().count(RECREATED) == 1, 20, "group re-created")
        await producer.published_more(600)  # publishing into the re-created group

        process.kill()  # kill -9 with buffers, uploads and acknowledgements in flight
        await wait_for(lambda: _group_exists(client), message="group there")
        await client.xgroup_destroy(STREAM, ARCHIVER)  # and lost again while it is down
        await producer.published_more(400)  # published while it is down
        process.start()
        await wait_for(lambda: process.log().count(RECREATED) == 2, 20, "re-created again")
        await producer.published_more(600)
        await producer.stop()
        s3_proxy.delay = 0
        figures = {"trimmed_before_loss": 1, "groups_destroyed": 2, "kills": 1}
        await check_invariant(redis_server.url, producer, s3, figures, [process])
        assert process.terminate() == 0, process.log()
        assert "Traceback" not in process.log()
    finally:
        process.kill()
        await client.aclose()
