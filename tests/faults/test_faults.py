"""Fault injection: sidecars run as subprocesses while a producer keeps adding events.

Each scenario ends with the same invariant check: the projection is what the
ordering key demands from every valid event; every valid event is in exactly
one archived object; every invalid entry is in the dead-letter stream, once;
nothing is left pending. The figures are printed (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from sidecar.devserver import DevServer
from tests.conftest import MotoServer, s3_environment
from tests.helpers import (
    ARCHIVER,
    PROJECTOR,
    STREAM,
    Producer,
    SidecarProcess,
    archive_objects_s3,
    check_exactly_once,
    event,
    expected_projection,
    group_done,
    projection,
    sidecar_env,
    wait_for,
)
from tests.s3proxy import S3Proxy
from tests.servers import start_server

pytestmark = [pytest.mark.faults, pytest.mark.slow]

BUCKET = "history"
DAY = 86_400_000
T0 = 1_773_568_800_000


def fault_producer(url: str, seed: int, rate: int = 400) -> Producer:
    """A steady mix of valid and invalid events (`rate` a second), over a client of its own."""
    rng = random.Random(seed)

    def make(_: int) -> bytes | dict[str, Any]:
        if rng.random() < 0.1:
            return rng.choice(
                [b"not json", b"[]", orjson.dumps(event(project="../x")), b'{"eventId": 1}']
            )
        execution = f"f{rng.randrange(300)}"
        return event(
            execution,
            rng.choice(["in_progress", "success", "error"]),
            T0 + rng.randrange(3) * DAY + rng.randrange(5000),
            project=f"org{rng.randrange(4)}/repo",
        )

    client = aioredis.Redis.from_url(url)
    return Producer(client, make, batch=max(1, rate // 20), owns_client=True)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[DevServer]:
    server = start_server(folder=tmp_path / "redis", persistent=True)
    yield server
    server.kill()


@pytest.fixture
def s3_proxy(s3: MotoServer) -> Iterator[S3Proxy]:
    s3.client().create_bucket(Bucket=BUCKET)
    proxy = S3Proxy(s3.port).start()
    yield proxy
    proxy.stop()


def sidecar(
    server: DevServer, proxy: S3Proxy, s3: MotoServer, tmp_path: Path, name: str
) -> SidecarProcess:
    env = sidecar_env(
        server.url,
        s3_archive_enabled=True,
        s3_bucket=BUCKET,
        redis_consumer_name=name,
        redis_block_ms=200,
        redis_claim_idle_ms=2000,
        archive_flush_max_events=40,
        archive_flush_max_age_seconds=0.5,
        log_level="info",
    )
    env.update(s3_environment(s3))
    env["AWS_ENDPOINT_URL_S3"] = proxy.url
    return SidecarProcess(env, tmp_path / f"{name}.log")


async def check_invariant(
    url: str,
    producer: Producer,
    s3: MotoServer,
    figures: dict[str, Any],
    processes: list[SidecarProcess],
) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        await wait_for(lambda: group_done(client, STREAM, PROJECTOR), 90, "projector drained")
        await wait_for(lambda: group_done(client, STREAM, ARCHIVER), 90, "archiver drained")
        expected = expected_projection(producer.valid)
        state = await projection(client, expected)
        wrong = [k for k, v in expected.items() if state[k].get("eventId") != v["eventId"]]
        assert not wrong, f"{len(wrong)} executions not in the ordering key's state: {wrong[:5]}"
        dead = Counter(
            fields[b"sourceId"].decode()
            for _, fields in await client.xrange(f"{STREAM}:dead-letter")
        )
        assert set(dead) == set(producer.invalid_ids)
        assert max(dead.values(), default=1) == 1, "an invalid entry was dead-lettered twice"
        # bounded: once both groups have everything, retention trims the stream (every 15 s)
        await wait_for(lambda: _stream_empty(client), 40, "the stream trimmed")
    finally:
        await client.aclose()
    archive = check_exactly_once(archive_objects_s3(s3.client(), BUCKET), producer.valid_raw)
    figures.update(
        events=len(producer.valid),
        invalid=len(producer.invalid_ids),
        objects=archive["objects"],
        lost=archive["missing"],
        duplicated=archive["duplicated"],
        # objects a retry found already written by an attempt cut short (exactly-once recovery)
        found_written=sum(p.log().count("already holds") for p in processes),
    )
    print("\nfault figures:", " ".join(f"{k}={v}" for k, v in figures.items()))


async def _stream_empty(client: aioredis.Redis) -> bool:
    return int(await client.xlen(STREAM)) == 0


async def test_repeated_sigkill_while_uploads_are_in_flight(
    redis_server: DevServer, s3: MotoServer, s3_proxy: S3Proxy, tmp_path: Path
) -> None:
    rng = random.Random(1)
    s3_proxy.delay = 0.15  # widen the window between a write and its acknowledgement
    producer = fault_producer(redis_server.url, seed=1)
    process = sidecar(redis_server, s3_proxy, s3, tmp_path, "pod-a").start()
    producer.start()
    kills = 0
    try:
        for _ in range(12):
            await asyncio.sleep(rng.uniform(0.4, 1.6))
            process.kill()
            kills += 1
            process.start()
        await producer.stop()
        s3_proxy.delay = 0
        await check_invariant(redis_server.url, producer, s3, {"kills": kills}, [process])
        assert process.terminate() == 0, process.log()

        # A lost Redis is recovered from the archive: wipe the projection, replay, compare.
        client = aioredis.Redis.from_url(redis_server.url)
        expected = expected_projection(producer.valid)
        before = await projection(client, expected)
        await client.delete(*await client.keys("task-tracking:*"))
        replay_env = process.env | {"TASK_TRACKING_LOG_LEVEL": "warning"}
        replay = subprocess.run(
            [sys.executable, "-m", "sidecar", "replay", "--no-progress"],
            env=replay_env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert replay.returncode == 0, replay.stderr
        print(replay.stdout.strip())
        after = await projection(client, expected)
        await client.aclose()
        for execution_id in expected:
            rebuilt, original = dict(after[execution_id]), dict(before[execution_id])
            assert rebuilt.pop("streamId").startswith("archive:")
            original.pop("streamId")
            assert rebuilt == original
    finally:
        process.kill()


async def test_redis_restart_and_s3_outage_mid_run(
    redis_server: DevServer, s3: MotoServer, s3_proxy: S3Proxy, tmp_path: Path
) -> None:
    producer = fault_producer(redis_server.url, seed=2)
    process = sidecar(redis_server, s3_proxy, s3, tmp_path, "pod-a").start()
    producer.start()
    try:
        await asyncio.sleep(2)
        producer.paused.set()
        await asyncio.to_thread(redis_server.restart)
        producer.paused.clear()
        await asyncio.sleep(2)
        s3_proxy.set_down(True)
        await asyncio.sleep(30)  # S3 unreachable for 30 seconds while events keep coming
        s3_proxy.set_down(False)
        await asyncio.sleep(2)
        await producer.stop()
        assert process.running(), process.log()
        await check_invariant(
            redis_server.url, producer, s3, {"redis_restarts": 1, "s3_outage_s": 30}, [process]
        )
    finally:
        process.kill()


async def test_three_replicas_one_killed_for_good(
    redis_server: DevServer, s3: MotoServer, s3_proxy: S3Proxy, tmp_path: Path
) -> None:
    s3_proxy.delay = 0.05
    producer = fault_producer(redis_server.url, seed=3, rate=600)
    replicas = [sidecar(redis_server, s3_proxy, s3, tmp_path, f"pod-{n}").start() for n in "abc"]
    producer.start()
    try:
        await asyncio.sleep(3)
        replicas[0].kill()  # its pending entries must be claimed by the others
        await asyncio.sleep(4)
        await producer.stop()
        s3_proxy.delay = 0
        await check_invariant(
            redis_server.url, producer, s3, {"replicas": 3, "killed": 1}, replicas
        )
    finally:
        for replica in replicas:
            replica.kill()
