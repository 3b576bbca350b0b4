"""Bounded memory: stream trimming behind every group, the archive-off policy, the hard cap,
project-index retention and finished-execution expiry."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import redis.asyncio as aioredis

from sidecar.config import ArchiveConfig, FlushPolicy
from tests.helpers import (
    ARCHIVER,
    PROJECTOR,
    STREAM,
    archive_objects_folder,
    check_exactly_once,
    event,
    group_done,
    publish,
    running_sidecar,
    wait_for,
)

FAST = FlushPolicy(max_events=1000, max_bytes=1 << 20, max_age_seconds=0.2)


async def test_trims_only_what_every_group_acknowledged(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    await publish(redis_client, STREAM, [event(f"a{n}", "success") for n in range(50)])
    # another application's group that has read only the first 10 entries
    await redis_client.xgroup_create(STREAM, "other-app", id="0")
    await redis_client.xreadgroup("other-app", "x", {STREAM: ">"}, count=10)
    async with running_sidecar(redis_url) as sidecar:
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR))
        assert await sidecar.retention.trim_stream() == 0  # other-app has 10 pending
        assert await redis_client.xlen(STREAM) == 50
        first_ten = await redis_client.xrange(STREAM, count=10)
        await redis_client.xack(STREAM, "other-app", *[i for i, _ in first_ten[:4]])
        assert await sidecar.retention.trim_stream() == 4
        await redis_client.xack(STREAM, "other-app", *[i for i, _ in first_ten[4:]])
        assert await sidecar.retention.trim_stream() == 6  # other-app's position: entry 10
        assert sidecar.metrics.stream_trimmed._value.get() == 10


async def test_switched_off_archiver_pins_then_gap_is_recorded_and_reported(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    folder = tmp_path / "archive"
    on = ArchiveConfig(enabled=True, sink="folder", folder=folder, flush=FAST)
    first = [event(f"g{n}", "success") for n in range(20)]
    skipped = [event(f"h{n}", "success") for n in range(30)]  # and 5 more below
    later = [event(f"i{n}", "success") for n in range(10)]
    async with running_sidecar(redis_url, archive_off_pin_seconds=86_400) as sidecar:
        await sidecar.apply_archive_target(on)
        await publish(redis_client, STREAM, first)
        await wait_for(lambda: group_done(redis_client, STREAM, ARCHIVER))
        await sidecar.apply_archive_target(ArchiveConfig(enabled=False))
        await publish(redis_client, STREAM, skipped)
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR))
        await sidecar.retention.trim_stream()
        assert await redis_client.xlen(STREAM) == 30  # held for the archiver (pin: 1 day)
        sidecar.retention.archive_off_pin_seconds = 0
        await sidecar.retention.trim_stream()
        assert await redis_client.xlen(STREAM) == 0
        gaps = await sidecar.retention.archive_gaps()
        assert [value.split()[1] for value in gaps.values()] == ["30"]
        assert sidecar.metrics.archive_skipped._value.get() == 30
        # while it stays off, later passes extend the one record; nothing is counted twice
        await publish(redis_client, STREAM, [event(f"j{n}", "success") for n in range(5)])
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR))
        await sidecar.retention.trim_stream()
        await sidecar.retention.trim_stream()
        gaps = await sidecar.retention.archive_gaps()
        assert [value.split()[1] for value in gaps.values()] == ["35"]
        assert sidecar.metrics.archive_skipped._value.get() == 35
        await sidecar.apply_archive_target(on)
        await publish(redis_client, STREAM, later)
        await wait_for(lambda: group_done(redis_client, STREAM, ARCHIVER))
    # the archive holds what was published while it was on, once; the gap is the 30 skipped
    from tests.integration.test_archiver import raw

    check_exactly_once(archive_objects_folder(folder), raw(first + later))


async def test_an_archiver_group_lost_while_archival_is_off_still_pins_the_stream(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """Found by a user drive: with archival off and the group destroyed, the next pass
    trimmed everything the projector had read, and 25,000 events were gone unrecorded.
    The lost group pins from the archive watermark, where it is re-created: entries are
    held for the pin, then trimmed as a recorded gap, and archived once when it is back."""
    folder = tmp_path / "archive"
    on = ArchiveConfig(enabled=True, sink="folder", folder=folder, flush=FAST)
    first = [event(f"k{n}", "success") for n in range(20)]
    held = [event(f"m{n}", "success") for n in range(30)]
    async with running_sidecar(redis_url, archive_off_pin_seconds=86_400) as sidecar:
        await sidecar.apply_archive_target(on)
        await publish(redis_client, STREAM, first)
        await wait_for(lambda: group_done(redis_client, STREAM, ARCHIVER))
        await sidecar.apply_archive_target(ArchiveConfig(enabled=False))
        await sidecar.retention.trim_stream()
        await redis_client.xgroup_destroy(STREAM, ARCHIVER)
        await publish(redis_client, STREAM, held)
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR))
        await sidecar.retention.trim_stream()
        assert await redis_client.xlen(STREAM) == 30  # held: archived entries only went
        await sidecar.apply_archive_target(on)
        await wait_for(lambda: group_done(redis_client, STREAM, ARCHIVER))
        from tests.integration.test_archiver import raw

        check_exactly_once(archive_objects_folder(folder), raw(first + held))
        await sidecar.apply_archive_target(ArchiveConfig(enabled=False))
        await redis_client.xgroup_destroy(STREAM, ARCHIVER)
        await publish(redis_client, STREAM, [event(f"n{n}", "success") for n in range(7)])
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR))
        sidecar.retention.archive_off_pin_seconds = 0  # past the pin: trimmed, recorded
        await sidecar.retention.trim_stream()
        gaps = await sidecar.retention.archive_gaps()
        assert [value.split()[1] for value in gaps.values()] == ["7"]
        assert sidecar.metrics.archive_skipped._value.get() == 7


async def test_hard_cap_counts_what_it_drops_unarchived(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    async with running_sidecar(redis_url, redis_stream_maxlen=25) as sidecar:
        target = ArchiveConfig(enabled=True, sink="folder", folder=tmp_path, flush=FAST)
        await sidecar.apply_archive_target(target)
        await sidecar.apply_archive_target(ArchiveConfig(enabled=False))
        await publish(redis_client, STREAM, [event(f"c{n}", "success") for n in range(100)])
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR))
        await sidecar.retention.trim_stream()  # the archiver pins (1 day), the cap does not
        assert await redis_client.xlen(STREAM) == 25
        assert sidecar.metrics.stream_dropped_unarchived._value.get() == 75


async def test_project_indexes_trimmed_by_size_and_age_and_finished_hashes_expire(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    now_ms = int(time.time() * 1000)
    old = [event(f"old{n}", "success", 1_100_000_000_000 + n, project="o/r") for n in range(5)]
    new = [event(f"new{n}", "success", now_ms + n, project="o/r") for n in range(10)]
    running = [event("run", "in_progress", now_ms, project="o/s")]
    await publish(redis_client, STREAM, old + new + running)
    async with running_sidecar(
        redis_url,
        project_index_max_age_days=30,
        project_index_max_size=8,
        projection_ttl_seconds=3600,
    ) as sidecar:
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR))
        # the background pass may have run already: trim now, then check what is left
        assert 0 <= await sidecar.retention.trim_indexes() <= 7  # 5 by age, then 2 by size
    members = await redis_client.zrange("task-tracking:project:o/r:executions", 0, -1)
    assert members == [f"new{n}".encode() for n in range(2, 10)]
    assert 0 < await redis_client.ttl("task-tracking:execution:new0") <= 3600
    assert await redis_client.ttl("task-tracking:execution:run") == -1  # not finished: kept


async def test_gap_counts_only_unarchived_entries_and_never_moves_the_archiver_back(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    folder = tmp_path / "archive"
    on = ArchiveConfig(enabled=True, sink="folder", folder=folder, flush=FAST)
    first = [event(f"p{n}", "success") for n in range(10)]
    stuck = [event("stuck", "success")]
    later = [event(f"q{n}", "success") for n in range(5)]
    async with running_sidecar(redis_url) as sidecar:
        await sidecar.apply_archive_target(on)
        await publish(redis_client, STREAM, first)
        await wait_for(lambda: group_done(redis_client, STREAM, ARCHIVER))
        # a consumer that read one entry and vanished: it stays pending in the archiver group
        await sidecar.apply_archive_target(ArchiveConfig(enabled=False))
        await publish(redis_client, STREAM, stuck)
        await redis_client.xreadgroup(ARCHIVER, "ghost", {STREAM: ">"}, count=1)
        await sidecar.apply_archive_target(on)
        await publish(redis_client, STREAM, later)
        await wait_for(lambda: _archived(folder) == 15, message="later archived")
        await sidecar.apply_archive_target(ArchiveConfig(enabled=False))
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR))
        sidecar.retention.archive_off_pin_seconds = 0
        await sidecar.retention.trim_stream()
        gaps = await sidecar.retention.archive_gaps()
        assert [value.split()[1] for value in gaps.values()] == ["1"]  # only the stuck one
        await sidecar.apply_archive_target(on)
        await publish(redis_client, STREAM, [event("after", "success")])
        await wait_for(lambda: _archived(folder) == 16, message="archival resumed")
        await wait_for(lambda: group_done(redis_client, STREAM, ARCHIVER))
    from tests.integration.test_archiver import raw

    # everything but the stuck entry, once; the stuck one is the recorded gap
    expected = [*raw(first), *raw(later), archive_line(folder, "after")]
    check_exactly_once(archive_objects_folder(folder), expected)


def _archived(folder: Path) -> int:
    return sum(body.count(b"\n") for body in archive_objects_folder(folder).values())


def archive_line(folder: Path, execution_id: str) -> bytes:
    for body in archive_objects_folder(folder).values():
        for line in body.split(b"\n"):
            if line and orjson.loads(line)["executionId"] == execution_id:
                return line
    raise AssertionError(f"{execution_id} not archived")
