"""The sidecar on a real three-master Redis Cluster (`redis+cluster://`).

Every command the sidecar sends touches one key, so keys may live on any
master: the tests spread executions and projects over all three and check the
data really is on all three. The stream and its dead-letter stream hash to
different slots, so a cluster dead-letters with XADD then XACK (at least once)
instead of one MULTI.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import RedisCluster

from sidecar.cli import main as cli_main
from sidecar.projector import COMPARE_AND_SET
from tests.helpers import (
    ARCHIVER,
    DEAD_LETTER,
    PROJECTOR,
    STREAM,
    archive_objects_folder,
    check_exactly_once,
    event,
    expected_projection,
    group_done,
    publish,
    running_sidecar,
    wait_for,
)
from tests.integration.test_tls_acl import everything_the_sidecar_does
from tests.servers import ACL_PASSWORD, ACL_USER, RedisClusterServers, acl_refusals, create_acl_user

T0 = 1_773_568_800_000  # 2026-03-15T10:00:00Z


@pytest.fixture
async def client(cluster: RedisClusterServers) -> AsyncIterator[RedisCluster]:
    """A cluster client of an emptied cluster whose script caches are empty too, so the
    projector's load-on-NOSCRIPT path runs in every test."""
    cluster.flushall()
    cluster.run_on_all("SCRIPT", "FLUSH")
    client = RedisCluster.from_url(cluster.url.replace("redis+cluster://", "redis://"))
    yield client
    await client.aclose()


def spread_events(executions: int, projects: int) -> list[dict[str, Any]]:
    """in_progress then success for each execution, over `projects` projects."""
    events = []
    for n in range(executions):
        project = f"org{n % projects}/repo-{n % projects}"
        events.append(event(f"ex-{n}", "in_progress", T0 + n, project=project))
        events.append(event(f"ex-{n}", "success", T0 + n + 500, project=project))
    return events


def archive_settings(folder: Path) -> dict[str, Any]:
    return {
        "s3_archive_enabled": True,
        "archive_sink": "folder",
        "archive_folder": folder,
        "archive_flush_max_age_seconds": 0.5,
    }


async def stored_projection(client: RedisCluster, execution_ids: list[str]) -> dict[str, str]:
    """executionId -> eventId held by its projection hash."""
    held = {}
    for execution_id in execution_ids:
        value = await client.hget(f"task-tracking:execution:{execution_id}", "eventId")
        held[execution_id] = value.decode() if value else ""
    return held


async def all_done(client: RedisCluster) -> bool:
    return await group_done(client, STREAM, PROJECTOR) and await group_done(
        client, STREAM, ARCHIVER
    )


async def read_without_ack(client: RedisCluster, group: str, consumer: str) -> int:
    await client.xgroup_create(STREAM, group, id="0", mkstream=True)
    response = await client.xreadgroup(group, consumer, {STREAM: ">"}, count=10_000)
    return len(response[0][1]) if response else 0


async def test_projection_dead_letters_and_archive_span_all_three_masters(
    cluster: RedisClusterServers, client: RedisCluster, tmp_path: Path
) -> None:
    events = spread_events(120, projects=12)
    invalid: list[Any] = [b"not json", orjson.dumps(event(project="../x")), (("other", "x"),)]
    await publish(client, STREAM, events[:100] + invalid + events[100:])
    folder = tmp_path / "archive"
    async with running_sidecar(cluster.url, **archive_settings(folder)) as sidecar:
        await wait_for(lambda: all_done(client), message="both groups done")
        # the statistics sampler works on a cluster too
        await wait_for(
            lambda: (
                sidecar.stats.last.get(PROJECTOR, {}).get("lag") == 0
                and sidecar.stats.last.get(ARCHIVER, {}).get("pending") == 0
            ),
            message="stream statistics sampled",
        )
    expected = expected_projection(events)
    held = await stored_projection(client, list(expected))
    assert held == {k: v["eventId"] for k, v in expected.items()}
    # the data really is on every master, not on one slot by accident
    for pattern in ("task-tracking:execution:*", "task-tracking:project:*"):
        spread = cluster.keys_per_node(pattern)
        assert all(spread.values()), {port: len(keys) for port, keys in spread.items()}
    streams = cluster.keys_per_node("task-events:*")
    assert [port for port, keys in streams.items() if STREAM.encode() in keys] != [
        port for port, keys in streams.items() if DEAD_LETTER.encode() in keys
    ], "the test needs the stream and its dead-letter stream on different masters"
    # the script cache started empty: NOSCRIPT made the projector load it on every master
    sha = hashlib.sha1(COMPARE_AND_SET.encode()).hexdigest()
    for node in cluster.nodes:
        with node.client() as admin:
            assert admin.script_exists(sha) == [True], node.port
    index = await client.zrange("task-tracking:project:org3/repo-3:executions", 0, -1)
    assert len(index) == 10
    dead = await client.xrange(DEAD_LETTER)
    assert len(dead) == len(invalid)  # once each, with the fields of the contract
    assert {fields[b"group"] for _, fields in dead} == {PROJECTOR.encode()}
    assert [fields.get(b"event") for _, fields in dead] == [invalid[0], invalid[1], None]
    check_exactly_once(archive_objects_folder(folder), [orjson.dumps(e) for e in events])


async def test_two_sidecars_in_one_group_share_the_work(
    cluster: RedisClusterServers, client: RedisCluster, tmp_path: Path
) -> None:
    events = spread_events(150, projects=9)
    folder = tmp_path / "archive"
    async with (
        running_sidecar(
            cluster.url, redis_consumer_name="a", redis_batch_size=7, **archive_settings(folder)
        ),
        running_sidecar(
            cluster.url, redis_consumer_name="b", redis_batch_size=11, **archive_settings(folder)
        ),
    ):
        for start in range(0, len(events), 30):
            await publish(client, STREAM, events[start : start + 30])
            await asyncio.sleep(0)  # let both consumers read between chunks
        await wait_for(lambda: all_done(client), message="both groups done")
        consumers = await client.xinfo_consumers(STREAM, PROJECTOR)
    assert {c["name"] for c in consumers} == {b"a", b"b"}
    expected = expected_projection(events)
    assert await stored_projection(client, list(expected)) == {
        k: v["eventId"] for k, v in expected.items()
    }
    check_exactly_once(archive_objects_folder(folder), [orjson.dumps(e) for e in events])


async def test_a_restarted_sidecar_re_reads_its_pending_entries(
    cluster: RedisClusterServers, client: RedisCluster, tmp_path: Path
) -> None:
    events = spread_events(60, projects=6)
    await publish(client, STREAM, [*events, b"not json"])
    # A previous life of consumer "alakai" read everything in both groups and died.
    assert await read_without_ack(client, PROJECTOR, "alakai") == len(events) + 1
    assert await read_without_ack(client, ARCHIVER, "alakai") == len(events) + 1
    folder = tmp_path / "archive"
    async with running_sidecar(
        cluster.url, redis_consumer_name="alakai", **archive_settings(folder)
    ):
        await wait_for(lambda: all_done(client), message="pending entries settled")
    expected = expected_projection(events)
    assert await stored_projection(client, list(expected)) == {
        k: v["eventId"] for k, v in expected.items()
    }
    assert await client.xlen(DEAD_LETTER) == 1
    check_exactly_once(archive_objects_folder(folder), [orjson.dumps(e) for e in events])


async def test_a_dead_consumers_entries_are_claimed_and_it_is_removed(
    cluster: RedisClusterServers, client: RedisCluster
) -> None:
    events = spread_events(20, projects=4)
    await publish(client, STREAM, events)
    assert await read_without_ack(client, PROJECTOR, "dead-pod") == len(events)
    async with running_sidecar(
        cluster.url, redis_consumer_name="live-pod", redis_claim_idle_ms=1000
    ):
        await wait_for(lambda: group_done(client, STREAM, PROJECTOR), message="claimed")

        async def dead_consumer_gone() -> bool:
            names = [c["name"] for c in await client.xinfo_consumers(STREAM, PROJECTOR)]
            return b"dead-pod" not in names  # removed by a Lua script (XINFO + XGROUP)

        await wait_for(dead_consumer_gone, message="dead consumer removed")
    expected = expected_projection(events)
    assert await stored_projection(client, list(expected)) == {
        k: v["eventId"] for k, v in expected.items()
    }


async def test_cli_emits_and_reads_through_the_cluster(
    cluster: RedisClusterServers,
    client: RedisCluster,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TASK_TRACKING_REDIS_URL", cluster.url)
    emit = ["emit", "--execution-id", "cli-1", "--task", "deploy", "--project", "my-org/my-repo"]
    assert await asyncio.to_thread(cli_main, [*emit, "--status", "in_progress"]) == 0
    assert await asyncio.to_thread(cli_main, [*emit, "--status", "success"]) == 0
    async with running_sidecar(cluster.url):
        await wait_for(lambda: group_done(client, STREAM, PROJECTOR), message="projected")
    capsys.readouterr()
    assert await asyncio.to_thread(cli_main, ["status", "cli-1", "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["status"] == "success"
    assert await asyncio.to_thread(cli_main, ["list", "my-org/my-repo", "--json"]) == 0
    assert [row["executionId"] for row in orjson.loads(capsys.readouterr().out)] == ["cli-1"]


async def test_retention_and_the_least_privilege_user_work_on_the_cluster(
    cluster: RedisClusterServers, client: RedisCluster, tmp_path: Path
) -> None:
    for node in cluster.nodes:
        with node.client() as admin:
            create_acl_user(admin)
    url = cluster.url_as(ACL_USER, ACL_PASSWORD)
    # project, dead-letter, claim, archive, then trim the stream and the indexes (SCAN
    # over every master), all as the ACL user
    await everything_the_sidecar_does(url, client, tmp_path / "archive")
    for node in cluster.nodes:
        with node.client() as admin:
            assert acl_refusals(admin) == [], node.port
            admin.execute_command("ACL", "DELUSER", ACL_USER)


async def test_archiver_group_lost_on_a_cluster_is_re_created_at_the_watermark(
    cluster: RedisClusterServers, client: RedisCluster, tmp_path: Path
) -> None:
    """The stream and `<stream>:archived` on different masters: marks, then XACK."""
    folder = tmp_path / "archive"
    first = spread_events(100, projects=5)
    await publish(client, STREAM, first)
    async with running_sidecar(cluster.url, **archive_settings(folder)):
        await wait_for(lambda: all_done(client), message="both groups done")
    streams = cluster.keys_per_node("task-events:*")
    on = {key: port for port, keys in streams.items() for key in keys}
    assert on[STREAM.encode()] != on[f"{STREAM}:archived".encode()], "needs two masters"
    ids = [entry_id.decode() for entry_id, _ in await client.xrange(STREAM)]
    await client.xtrim(STREAM, minid=ids[len(ids) // 2])  # the stream now starts mid-object
    await client.xgroup_destroy(STREAM, ARCHIVER)
    second = spread_events(30, projects=3)
    await publish(client, STREAM, second)
    async with running_sidecar(cluster.url, **archive_settings(folder)) as sidecar:
        await wait_for(lambda: all_done(client), message="both groups done")
        assert sidecar.metrics.group_recreated.labels(ARCHIVER)._value.get() == 1
    check_exactly_once(archive_objects_folder(folder), [orjson.dumps(e) for e in first + second])
