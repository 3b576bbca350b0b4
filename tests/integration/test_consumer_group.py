"""The shared consumer-group runner: recovery, claiming, replicas, outages, shutdown."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from sidecar.devserver import DevServer
from tests.helpers import (
    PROJECTOR,
    STREAM,
    SidecarProcess,
    event,
    expected_projection,
    group_done,
    group_pending,
    projection,
    projector_runner,
    publish,
    running_sidecar,
    sidecar_env,
    wait_for,
)

T0 = 1_700_000_000_000


async def read_without_ack(client: aioredis.Redis, consumer: str, count: int = 100) -> list:
    await client.xgroup_create(STREAM, PROJECTOR, id="0", mkstream=True)
    response = await client.xreadgroup(PROJECTOR, consumer, {STREAM: ">"}, count=count)
    return response[0][1] if response else []


async def test_own_pending_entries_are_re_read_on_start(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    events = [event(f"p{n}", "success") for n in range(20)]
    await publish(redis_client, STREAM, events)
    # A previous life of this consumer read them and died before acknowledging.
    assert len(await read_without_ack(redis_client, "alakai")) == 20
    async with running_sidecar(redis_url, redis_consumer_name="alakai"):
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR))
    state = await projection(redis_client, [f"p{n}" for n in range(20)])
    assert all(row["status"] == "success" for row in state.values())


async def test_entries_of_a_dead_consumer_are_claimed(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    await publish(redis_client, STREAM, [event(f"c{n}", "error") for n in range(10)])
    assert len(await read_without_ack(redis_client, "dead-pod")) == 10
    async with running_sidecar(redis_url, redis_consumer_name="live-pod", redis_claim_idle_ms=1000):
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR), message="claimed")

        # the dead consumer, now without pending entries, is eventually removed
        async def dead_consumer_gone() -> bool:
            names = [c["name"] for c in await redis_client.xinfo_consumers(STREAM, PROJECTOR)]
            return b"dead-pod" not in names

        await wait_for(dead_consumer_gone, message="dead consumer removed")
    state = await projection(redis_client, [f"c{n}" for n in range(10)])
    assert all(row["status"] == "error" for row in state.values())


async def test_two_projectors_in_one_group_reach_the_same_state_as_one(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    events = []
    for n in range(300):
        events += [
            event(f"r{n % 50}", "in_progress", T0 + n),
            event(f"r{n % 50}", "success", T0 + n),
        ]
    async with (
        running_sidecar(redis_url, redis_consumer_name="a", redis_batch_size=7),
        running_sidecar(redis_url, redis_consumer_name="b", redis_batch_size=11),
    ):
        for start in range(0, len(events), 40):
            await publish(redis_client, STREAM, events[start : start + 40])
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR))
    expected = expected_projection(events)
    state = await projection(redis_client, expected)
    assert {k: v["eventId"] for k, v in state.items()} == {
        k: v["eventId"] for k, v in expected.items()
    }
    consumers = await redis_client.xinfo_consumers(STREAM, PROJECTOR)
    assert {c["name"] for c in consumers} == {b"a", b"b"}


async def test_redis_restart_mid_run_loses_nothing_and_readiness_follows(
    persistent_server: DevServer,
) -> None:
    url = persistent_server.url
    client = aioredis.Redis.from_url(url)
    first = [event(f"s{n}", "in_progress", T0) for n in range(100)]
    second = [event(f"s{n}", "success", T0 + 1000) for n in range(100)]
    try:
        async with running_sidecar(url) as sidecar:
            await publish(client, STREAM, first)
            await wait_for(lambda: group_done(client, STREAM, PROJECTOR))
            await client.aclose()
            persistent_server.stop()
            await wait_for(lambda: bool(sidecar.readiness_problems()), message="not ready")
            ready_url = f"http://127.0.0.1:{sidecar.http_port}/readyz"
            async with aiohttp.ClientSession() as http, http.get(ready_url) as response:
                assert response.status == 503
            persistent_server.start()
            client = aioredis.Redis.from_url(url)
            await publish(client, STREAM, second)
            await wait_for(lambda: group_done(client, STREAM, PROJECTOR), timeout=30)
            await wait_for(lambda: not sidecar.readiness_problems(), message="ready again")
            assert sidecar.metrics.redis_reconnects.labels(PROJECTOR)._value.get() >= 1
        state = await projection(client, [f"s{n}" for n in range(100)])
        assert all(row["status"] == "success" for row in state.values())
    finally:
        await client.aclose()


async def test_sigterm_drains_and_exits_0_within_10_seconds(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    sidecar = SidecarProcess(sidecar_env(redis_url), tmp_path / "sidecar.log").start()
    try:
        await publish(redis_client, STREAM, [event(f"t{n}", "success") for n in range(2000)])
        await wait_for(
            lambda: _has_group(redis_client),
            message="group created",
        )
        started = time.monotonic()
        code = await asyncio.to_thread(sidecar.terminate, 15)
        assert code == 0, sidecar.log()
        assert time.monotonic() - started < 10
        assert await group_pending(redis_client, STREAM, PROJECTOR) == 0, sidecar.log()
        assert '"stopped"' in sidecar.log() or "stopped" in sidecar.log()
    finally:
        sidecar.kill()


async def _has_group(client: aioredis.Redis) -> bool:
    try:
        return any(g["name"] == PROJECTOR.encode() for g in await client.xinfo_groups(STREAM))
    except Exception:
        return False


async def test_an_idle_consumer_stops_without_waiting_for_its_blocking_read(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """Stop cuts the blocked read short and nothing is read after it; the client stays
    usable."""
    from sidecar.connections import connect
    from sidecar.consumer import RunnerOptions

    client = connect(redis_url)
    runner, _ = projector_runner(client, "idle", RunnerOptions(block_ms=5000))
    task = asyncio.create_task(runner.run())
    try:
        await wait_for(runner.ready.is_set, message="ready")
        await wait_for(lambda: _blocked_clients(redis_client), message="blocked in its read")
        await runner.stop()
        # well inside the 5 s block: the wait was cut, not waited out
        await asyncio.wait_for(task, 2.5)
        await publish(redis_client, STREAM, [event("after", "success")])
        assert await client.xlen(STREAM) == 1  # the shared client still works
        [group] = await redis_client.xinfo_groups(STREAM)
        assert group["pending"] == 0 and group["lag"] == 1  # the entry after stop: unread
    finally:
        task.cancel()
        await client.aclose()


async def _blocked_clients(client: aioredis.Redis) -> bool:
    return int((await client.info("clients"))["blocked_clients"]) > 0


async def test_idle_sigterm_exits_0_within_2_seconds_with_the_default_block(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    env = sidecar_env(redis_url)  # TASK_TRACKING_REDIS_BLOCK_MS unset: 5000
    sidecar = SidecarProcess(env, tmp_path / "sidecar.log").start()
    try:
        await wait_for(lambda: _has_group(redis_client), message="group created")
        await wait_for(lambda: _blocked_clients(redis_client), message="idle in its wait")
        started = time.monotonic()
        code = await asyncio.to_thread(sidecar.terminate, 15)
        elapsed = time.monotonic() - started
        assert code == 0, sidecar.log()
        assert elapsed < 2, f"idle SIGTERM took {elapsed:.1f}s"  # the budget, generous
        print(f"\nidle sigterm exit: {elapsed:.2f}s")
    finally:
        sidecar.kill()
