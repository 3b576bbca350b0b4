"""The archive watermark: a lost archiver group is re-created where archival stood.

Each scenario ends with the exactly-once check of every archived line; the group is
destroyed with `XGROUP DESTROY`, as a mistaken cleanup would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from sidecar.archiver import S3TaskHistoryArchiver
from sidecar.config import FlushPolicy
from sidecar.consumer import ConsumerGroupRunner, RunnerOptions
from sidecar.metrics import Metrics
from sidecar.sinks import FolderSink
from sidecar.watermark import ADVANCE_MARKS, MAX_SEQUENCE, ArchiveWatermark, just_below
from tests.helpers import (
    ARCHIVER,
    PROJECTOR,
    STREAM,
    archive_objects_folder,
    check_exactly_once,
    event,
    group_done,
    group_pending,
    group_read_all,
    group_unacked,
    publish,
    running_sidecar,
    wait_for,
)

MARKS = f"{STREAM}:archived"
DAY = 86_400_000
T0 = 1_773_568_800_000  # 2026-03-15T10:00:00Z


def folder_settings(folder: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "s3_archive_enabled": True,
        "archive_sink": "folder",
        "archive_folder": folder,
        **overrides,
    }


async def marks(client: aioredis.Redis) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (await client.hgetall(MARKS)).items()}


async def advance(client: aioredis.Redis, through: str, *pairs: str) -> dict[str, str]:
    await client.eval(ADVANCE_MARKS, 1, MARKS, through, *pairs)
    return await marks(client)


def recreated(sidecar: Any) -> float:
    value: float = sidecar.metrics.group_recreated.labels(ARCHIVER)._value.get()
    return value


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and text in r.getMessage()
    ]


async def test_marks_move_forward_only_and_fields_below_the_through_mark_are_dropped(
    redis_client: aioredis.Redis,
) -> None:
    assert await advance(redis_client, "5-0", "a/b/2026-03-15", "10-0") == {
        "*": "5-0",
        "a/b/2026-03-15": "10-0",
    }
    # backwards: nothing moves; a field at or below the through mark is not written
    assert await advance(redis_client, "3-0", "a/b/2026-03-15", "7-0", "c/d/2026-03-15", "5-0") == {
        "*": "5-0",
        "a/b/2026-03-15": "10-0",
    }
    # compared as (ms, seq) numbers, not as text: 10-0 < 9-5 as strings, not as IDs
    assert (await advance(redis_client, "9-5", "a/b/2026-03-15", "10-10"))["a/b/2026-03-15"] == (
        "10-10"
    )
    assert (await advance(redis_client, "", "a/b/2026-03-15", "100-2"))["a/b/2026-03-15"] == "100-2"
    # a 64-bit sequence (just below an ID ending in -0) compares right (Lua has doubles)
    below = just_below((100, 0))
    assert below == (99, MAX_SEQUENCE)
    state = await advance(redis_client, f"{below[0]}-{below[1]}", "e/f/2026-03-16", "99-7")
    assert state == {"*": f"99-{MAX_SEQUENCE}", "a/b/2026-03-15": "100-2"}
    # the through mark passing a field drops it, and the redelivery bound with it
    await advance(redis_client, "", "*redelivery", "100-1")
    assert (await marks(redis_client))["*redelivery"] == "100-1"
    assert await advance(redis_client, "100-2") == {"*": "100-2"}


async def test_group_destroyed_mid_run_across_projects_and_days_archives_exactly_once(
    redis_url: str,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    folder = tmp_path / "archive"
    rng = random.Random(7)
    published: list[dict[str, Any]] = []
    stopping = asyncio.Event()

    async def produce() -> None:
        # org0 is busy (its buffers fill and flush by count), the others trickle in and
        # flush by age: buffers of different projects and days flush at different times.
        while not stopping.is_set():
            batch = []
            for _ in range(20):
                project = "org0/repo" if rng.random() < 0.7 else f"org{rng.randrange(1, 4)}/repo"
                at = T0 + rng.randrange(3) * DAY + rng.randrange(1000)
                name = f"x{len(published) + len(batch)}"
                batch.append(event(name, "success", at, project=project))
            published.extend(batch)
            await publish(redis_client, STREAM, batch)
            await asyncio.sleep(0.02)

    settings = folder_settings(
        folder, archive_flush_max_events=30, archive_flush_max_age_seconds=0.8
    )
    async with running_sidecar(redis_url, **settings) as sidecar:
        producer = asyncio.create_task(produce())
        try:
            # marks above the through mark: some buffers flushed, others not yet
            await wait_for(lambda: _per_buffer_marks(redis_client), message="per-buffer marks")
            # Retention trims what both groups acknowledged, so the stream now starts in
            # the middle of objects: re-read from there, runs would start at other entries
            # than the objects do, and the read-back could not find them.
            await wait_for(lambda: sidecar.retention.trim_stream(), message="a trim")
            await redis_client.xgroup_destroy(STREAM, ARCHIVER)
            await wait_for(lambda: recreated(sidecar) == 1, message="group re-created")
            # publishing goes on into the re-created group
            mark = len(published)
            await wait_for(lambda: len(published) >= mark + 1000, message="1000 more events")
        finally:
            stopping.set()
            await producer
        await wait_for(lambda: group_done(redis_client, STREAM, ARCHIVER), 30, "archived")
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR), 30, "projected")
        skipped = sidecar.metrics.archive_watermark_skipped._value.get()
    figures = check_exactly_once(
        archive_objects_folder(folder), [orjson.dumps(e) for e in published]
    )
    print(f"\nwatermark figures: events={len(published)} skipped={skipped} {figures}")
    assert recreated(sidecar) == 1
    assert len(warnings_about(caplog, "re-created at the archive watermark")) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "no traceback"


async def _per_buffer_marks(client: aioredis.Redis) -> bool:
    return len([name for name in await marks(client) if not name.startswith("*")]) >= 2


async def test_group_destroyed_while_the_sidecar_is_stopped_is_re_created_at_the_watermark(
    redis_url: str,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder = tmp_path / "archive"
    settings = folder_settings(
        folder, archive_flush_max_events=40, archive_flush_max_age_seconds=0.5
    )
    first = [
        event(f"a{n}", "success", T0 + (n % 2) * DAY + n, project=f"org{n % 3}/repo")
        for n in range(300)
    ]
    await publish(redis_client, STREAM, first)
    async with running_sidecar(redis_url, **settings):
        await wait_for(lambda: group_done(redis_client, STREAM, ARCHIVER), message="archived")
    through = (await marks(redis_client))["*"]
    ids = [entry_id.decode() for entry_id, _ in await redis_client.xrange(STREAM)]
    assert through == ids[-1]  # nothing buffered, nobody else pending: the last entry

    # As retention does once both groups acknowledged them: the stream then starts in the
    # middle of objects (a group re-created at 0 would write the rest again).
    await redis_client.xtrim(STREAM, minid=ids[150])
    await redis_client.xgroup_destroy(STREAM, ARCHIVER)
    second = [event(f"b{n}", "success", T0 + n, project="org1/repo") for n in range(50)]
    await publish(redis_client, STREAM, second)
    caplog.clear()
    async with running_sidecar(redis_url, **settings) as sidecar:
        await wait_for(lambda: group_done(redis_client, STREAM, ARCHIVER), message="archived")
        assert recreated(sidecar) == 1
    check_exactly_once(archive_objects_folder(folder), [orjson.dumps(e) for e in first + second])
    (line,) = warnings_about(caplog, "re-created at the archive watermark")
    assert through in line


async def test_a_lost_group_without_a_watermark_starts_at_0_and_says_what_that_means(
    redis_url: str,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A restore that lost both the group and the watermark: created at `0`, as before.
    The same flush settings cut the same runs, so the read-back finds every object."""
    folder = tmp_path / "archive"
    settings = folder_settings(folder, archive_flush_max_events=1000)
    events = [event(f"r{n}", "success", T0 + n, project=f"org{n % 2}/repo") for n in range(200)]
    await publish(redis_client, STREAM, events)
    async with running_sidecar(redis_url, **settings):  # stopping flushes both buffers
        await wait_for(lambda: group_read_all(redis_client, STREAM, ARCHIVER), message="read")
    await redis_client.xgroup_destroy(STREAM, ARCHIVER)
    await redis_client.delete(MARKS)
    caplog.clear()
    async with running_sidecar(redis_url, **settings) as sidecar:
        await wait_for(lambda: group_read_all(redis_client, STREAM, ARCHIVER), message="read")
    assert await group_pending(redis_client, STREAM, ARCHIVER) == 0
    assert recreated(sidecar) == 0
    assert sidecar.metrics.archive_already_present._value.get() == 2  # one per project
    (line,) = warnings_about(caplog, "no archive watermark")
    assert "200 entries" in line and "read-back" in line
    check_exactly_once(archive_objects_folder(folder), [orjson.dumps(e) for e in events])


async def test_a_fresh_stream_is_created_at_0_without_a_warning(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running_sidecar(redis_url, **folder_settings(tmp_path / "archive")):
        await wait_for(lambda: _group_exists(redis_client), message="group created")
    assert not warnings_about(caplog, "consumer group")
    assert not await redis_client.exists(MARKS)


async def _group_exists(client: aioredis.Redis) -> bool:
    with contextlib.suppress(Exception):
        return ARCHIVER.encode() in [g["name"] for g in await client.xinfo_groups(STREAM)]
    return False


async def test_the_through_mark_stays_below_what_another_consumer_holds_pending(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """With several replicas the through mark must hold for the whole group: a consumer
    that read entries and stopped (they are pending, unarchived) keeps it below them."""
    folder = tmp_path / "archive"
    events = [event(f"p{n}", "success", T0 + n, project=f"org{n % 2}/repo") for n in range(60)]
    ids = await publish(redis_client, STREAM, events)
    await redis_client.xgroup_create(STREAM, ARCHIVER, id="0")
    await redis_client.xreadgroup(ARCHIVER, "dead-pod", {STREAM: ">"}, count=5)
    settings = folder_settings(folder, archive_flush_max_age_seconds=0.3)
    async with running_sidecar(redis_url, **settings, redis_claim_idle_ms=60_000):
        await wait_for(lambda: _archived_all_but(redis_client, 5), message="the rest archived")
        assert (await marks(redis_client))["*"] == _below(ids[0])
    # A replica that claims them (idle past the claim time) archives them: the mark moves
    # past them, to the last entry this replica was handed.
    more = [event(f"q{n}", "success", T0 + n, project="org0/repo") for n in range(10)]
    async with running_sidecar(redis_url, **settings, redis_claim_idle_ms=1000):
        await wait_for(lambda: _pending_is(redis_client, 0), message="claimed and archived")
        ids += await publish(redis_client, STREAM, more)
        await wait_for(lambda: group_done(redis_client, STREAM, ARCHIVER), message="archived")
        await wait_for(lambda: _through_is(redis_client, ids[-1]), message="through the last")
    events += more
    check_exactly_once(archive_objects_folder(folder), [orjson.dumps(e) for e in events])


def _below(entry_id: str) -> str:
    millis, sequence = map(int, entry_id.split("-"))
    return "-".join(map(str, just_below((millis, sequence))))


async def _archived_all_but(client: aioredis.Redis, count: int) -> bool:
    return await group_pending(client, STREAM, ARCHIVER) == count and "*" in await marks(client)


async def _read_all_pending(client: aioredis.Redis, count: int) -> bool:
    return await group_read_all(client, STREAM, ARCHIVER) and await _pending_is(client, count)


async def _pending_is(client: aioredis.Redis, count: int) -> bool:
    return await group_pending(client, STREAM, ARCHIVER) == count


async def _through_is(client: aioredis.Redis, entry_id: str) -> bool:
    return (await marks(client)).get("*") == entry_id


async def test_entries_a_dead_replica_held_are_not_lost_with_the_group(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """Several replicas: a consumer read entries and died; the group is then lost. Its
    entries go with the group's pending list and come back by re-delivery: no mark may
    skip them, although the live replica archived later entries of the same buffers.
    Exactly once is not promised here (README), nothing lost is."""
    folder = tmp_path / "archive"
    events = [event(f"d{n}", "success", T0 + n, project=f"org{n % 2}/repo") for n in range(80)]
    await publish(redis_client, STREAM, events)
    await redis_client.xgroup_create(STREAM, ARCHIVER, id="0")
    await redis_client.xreadgroup(ARCHIVER, "dead-pod", {STREAM: ">"}, count=6)
    settings = folder_settings(folder, archive_flush_max_age_seconds=0.3)
    async with running_sidecar(redis_url, **settings, redis_claim_idle_ms=60_000) as sidecar:
        await wait_for(lambda: _read_all_pending(redis_client, 6), message="the rest archived")
        await redis_client.xgroup_destroy(STREAM, ARCHIVER)  # dead-pod's entries with it
        await wait_for(lambda: recreated(sidecar) == 1, message="group re-created")
        await wait_for(lambda: group_done(redis_client, STREAM, ARCHIVER), message="archived")
    lines = Counter(
        line for body in archive_objects_folder(folder).values() for line in body.split(b"\n")[:-1]
    )
    wanted = Counter(orjson.dumps(e) for e in events)
    missing, duplicated = wanted - lines, lines - wanted
    print(f"\nreplicas: lines={sum(lines.values())} duplicated={sum(duplicated.values())}")
    assert not missing, f"{sum(missing.values())} lost"


class _GroupLosingSink:
    """A folder sink that destroys the archiver group while an object is being written,
    once armed: the group goes between the write and the marks that would cover it."""

    def __init__(self, sink: FolderSink, client: aioredis.Redis) -> None:
        self.sink = sink
        self.client = client
        self.description = sink.description
        self.always_conditional = True  # a folder: no conditional-write probe
        self.check_before_write = False
        self.armed = False

    def stalled(self) -> str | None:
        return None

    async def create_if_absent(self, key: str, body: bytes) -> bool:
        created = await self.sink.create_if_absent(key, body)
        if self.armed:
            self.armed = False
            await self.client.xgroup_destroy(STREAM, ARCHIVER)
        return created

    async def read(self, key: str) -> bytes:
        return await self.sink.read(key)

    async def check(self) -> None:
        await self.sink.check()


async def test_group_lost_between_a_write_and_its_marks_is_found_by_the_read_back(
    redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """The marks of the objects written as the group went cannot be shown true for the
    lost group: they are not written, and the re-created group re-delivers those entries
    from the start of their objects, where the read-back finds them."""
    folder = tmp_path / "archive"
    sink = _GroupLosingSink(FolderSink(folder), redis_client)
    metrics = Metrics()
    watermark = ArchiveWatermark(
        redis_client, metrics, stream=STREAM, group=ARCHIVER, consumer="pod-a"
    )
    archiver = S3TaskHistoryArchiver(
        sink,  # type: ignore[arg-type]
        metrics,
        stream=STREAM,
        prefix="task-tracking",
        policy=FlushPolicy(max_events=20, max_age_seconds=3600),
        group=ARCHIVER,
        watermark=watermark,
    )
    runner = ConsumerGroupRunner(
        redis_client,
        stream=STREAM,
        group=ARCHIVER,
        consumer="pod-a",
        handler=archiver,
        metrics=metrics,
        options=RunnerOptions(block_ms=100, dead_letter=False),
        worker="archiver",
    )
    events = [event(f"w{n}", "success", T0 + n, project=f"org{n % 3}/repo") for n in range(300)]
    task = asyncio.create_task(runner.run())
    try:
        await publish(redis_client, STREAM, events[:120])  # 2 objects of 20 per project
        await wait_for(lambda: _group_read_count(redis_client, 120), message="read")
        await wait_for(lambda: _unacked_is(redis_client, 0), message="first objects")
        assert "*" in await marks(redis_client)
        sink.armed = True
        await publish(redis_client, STREAM, events[120:])
        await wait_for(lambda: metrics.group_recreated.labels(ARCHIVER)._value.get() == 1)
        await wait_for(lambda: _unacked_is(redis_client, 0), message="archived")
    finally:
        await runner.stop()
        await task
    figures = check_exactly_once(archive_objects_folder(folder), [orjson.dumps(e) for e in events])
    assert figures["lines"] == 300
    assert metrics.archive_already_present._value.get() >= 1  # the read-back found them


async def _group_read_count(client: aioredis.Redis, count: int) -> bool:
    for info in await client.xinfo_groups(STREAM):
        if info["name"] == ARCHIVER.encode():
            return int(info["entries-read"] or 0) >= count
    return False


async def _unacked_is(client: aioredis.Redis, count: int) -> bool:
    return await group_unacked(client, STREAM, ARCHIVER) == count
