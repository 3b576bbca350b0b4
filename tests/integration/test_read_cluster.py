"""The read paths on a real three-master Redis Cluster: the changes feed (one stream on
one slot, written right after the per-slot script calls), the projects index, paging."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from redis.asyncio import RedisCluster

from tests.helpers import PROJECTOR, STREAM, event, group_done, publish, running_sidecar, wait_for
from tests.read_client import open_changes
from tests.servers import RedisClusterServers

T0 = 1_773_568_800_000


@pytest.fixture
async def client(cluster: RedisClusterServers) -> AsyncIterator[RedisCluster]:
    cluster.flushall()
    client = RedisCluster.from_url(cluster.url.replace("redis+cluster://", "redis://"))
    yield client
    await client.aclose()


async def test_snapshot_paging_projects_and_resumable_changes_on_a_cluster(
    cluster: RedisClusterServers, client: RedisCluster
) -> None:
    async with (
        running_sidecar(cluster.url, api_enabled=True, api_port=0) as sidecar,
        aiohttp.ClientSession() as session,
    ):
        base = f"http://127.0.0.1:{sidecar.api_port}"
        stream = await open_changes(session, base)
        events = [event(f"k{n}", "success", T0 + n, project=f"org{n % 4}/r") for n in range(60)]
        await publish(client, STREAM, events)
        got = await stream.take(60)
        assert sorted(e.data["executionId"] for e in got) == sorted(f"k{n}" for n in range(60))
        ids = [tuple(map(int, e.id.split("-"))) for e in got]
        assert ids == sorted(ids)
        stream.close()
        more = [event(f"k{n}", "error", T0 + 100 + n, project=f"org{n % 4}/r") for n in range(8)]
        await publish(client, STREAM, more)
        await wait_for(lambda: group_done(client, STREAM, PROJECTOR), message="projected")
        resumed = await open_changes(session, base, last_id=got[-1].id)
        again = await resumed.take(8)
        assert sorted(e.data["executionId"] for e in again) == sorted(f"k{n}" for n in range(8))
        assert all(e.data["status"] == "error" for e in again)
        resumed.close()
        async with session.get(f"{base}/api/v1/projects") as reply:
            projects = (await reply.json())["projects"]
        assert sorted((p["project"], p["executionCount"]) for p in projects) == [
            (f"org{n}/r", 15) for n in range(4)
        ]
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": "4"} | ({"before": cursor} if cursor else {})
            async with session.get(f"{base}/api/v1/projects/org1/r/executions", params=params) as r:
                page = await r.json()
            seen += [row["executionId"] for row in page["executions"]]
            cursor = page["next"]
            if cursor is None:
                break
        assert sorted(seen) == sorted(f"k{n}" for n in range(1, 60, 4))
