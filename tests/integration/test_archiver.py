"""The archiver against a real S3-protocol server (moto, over HTTP) and the folder sink."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from sidecar.archiver import (
    UPLOADS_IN_FLIGHT,
    ArchiveIntegrityError,
    S3TaskHistoryArchiver,
    object_key,
)
from sidecar.config import ArchiveConfig, FlushPolicy
from sidecar.events import EVENT_FIELD, ValidEvent, decode_entry
from sidecar.metrics import Metrics
from sidecar.replay import replay_archive
from sidecar.sinks import S3Sink, s3_client_context
from tests.conftest import MotoServer
from tests.helpers import (
    ARCHIVER,
    PROJECTOR,
    STREAM,
    archive_objects_folder,
    archive_objects_s3,
    check_exactly_once,
    event,
    group_done,
    group_pending,
    group_read_all,
    group_unacked,
    projection,
    publish,
    running_sidecar,
    sidecar_settings,
    wait_for,
)

DAY = 86_400_000
T0 = 1_773_568_800_000  # 2026-03-15T10:00:00Z


def mixed_events(count: int, *, projects: int = 3, days: int = 3) -> list[dict]:
    return [
        event(
            f"x{n}",
            "success" if n % 2 else "in_progress",
            T0 + ((n // projects) % days) * DAY + n,
            project=f"org{n % projects}/repo-{n % projects}",
        )
        for n in range(count)
    ]


def raw(events: list[dict]) -> list[bytes]:
    return [orjson.dumps(e) for e in events]


async def test_objects_follow_the_seed_layout_across_projects_and_days(
    redis_url: str, redis_client: aioredis.Redis, s3: MotoServer
) -> None:
    s3.client().create_bucket(Bucket="archive")
    events = mixed_events(600)
    await publish(redis_client, STREAM, [*events, b"not json", event(project="../x")])
    async with running_sidecar(redis_url, s3_archive_enabled=True, s3_bucket="archive"):
        await wait_for(lambda: group_read_all(redis_client, STREAM, ARCHIVER), message="read")
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR), message="projected")
    assert await group_pending(redis_client, STREAM, ARCHIVER) == 0  # stopping flushed
    objects = archive_objects_s3(s3.client(), "archive")
    figures = check_exactly_once(objects, raw(events))
    assert figures["objects"] == 9  # 3 projects x 3 days, one object each (stop flushed)
    key = sorted(objects)[0]
    assert key.startswith("task-tracking/org0/repo-0/2026-03-15/events-")
    # the archiver does not dead-letter: only the projector group does, once per entry
    dead = await redis_client.xrange(f"{STREAM}:dead-letter")
    assert {f[b"group"] for _, f in dead} == {PROJECTOR.encode()}


async def test_flush_triggers_count_bytes_and_age(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    folder = tmp_path / "archive"
    settings = {
        "s3_archive_enabled": True,
        "archive_sink": "folder",
        "archive_folder": folder,
    }
    # count: 25 events of one project/day with max 10 -> objects of 10, 10, and 5 on stop
    events = [event(f"c{n}", "success", T0 + n) for n in range(25)]
    await publish(redis_client, STREAM, events)
    async with running_sidecar(
        redis_url, **settings, archive_flush_max_events=10, archive_flush_max_age_seconds=3600
    ):
        await wait_for(lambda: len(archive_objects_folder(folder)) >= 2, message="count flush")
        sizes = sorted(b.count(b"\n") for b in archive_objects_folder(folder).values())
        assert sizes == [10, 10]
    assert sorted(b.count(b"\n") for b in archive_objects_folder(folder).values()) == [5, 10, 10]

    # bytes: each event ~150 bytes, a 1 KiB limit cuts objects below 1 KiB
    for path in folder.rglob("*.jsonl"):
        path.unlink()
    events = [event(f"b{n}", "success", T0 + n) for n in range(20)]
    await publish(redis_client, STREAM, events)
    async with running_sidecar(
        redis_url, **settings, archive_flush_max_bytes=1024, archive_flush_max_age_seconds=3600
    ):
        await wait_for(lambda: _lines(folder) >= 14, message="byte flush")
    for body in archive_objects_folder(folder).values():
        assert len(body) <= 1024
    check_exactly_once(archive_objects_folder(folder), raw(events))

    # age: one event, flushed by age while the sidecar keeps running
    for path in folder.rglob("*.jsonl"):
        path.unlink()
    async with running_sidecar(redis_url, **settings, archive_flush_max_age_seconds=0.5):
        await publish(redis_client, STREAM, [event("age", "success", T0)])
        await wait_for(lambda: _lines(folder) == 1, message="age flush")


def _lines(folder: Path) -> int:
    return sum(body.count(b"\n") for body in archive_objects_folder(folder).values())


async def test_missing_bucket_keeps_entries_pending_and_projector_working(
    redis_url: str, redis_client: aioredis.Redis, s3: MotoServer
) -> None:
    events = [event(f"m{n}", "success") for n in range(30)]
    await publish(redis_client, STREAM, events)
    async with running_sidecar(
        redis_url, s3_archive_enabled=True, s3_bucket="nope", archive_flush_max_age_seconds=0.5
    ) as sidecar:
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR), message="projected")
        await wait_for(
            lambda: any("bucket does not exist" in p for p in sidecar.readiness_problems()),
            message="archiver reported unhealthy",
        )
        assert await group_unacked(redis_client, STREAM, ARCHIVER) == 30
        assert sidecar.metrics.archive_failures.labels("NoSuchBucket")._value.get() >= 1
        # creating the bucket heals it without a restart
        s3.client().create_bucket(Bucket="nope")
        await wait_for(lambda: group_done(redis_client, STREAM, ARCHIVER), timeout=30)
        await wait_for(lambda: not sidecar.readiness_problems(), message="ready")
    check_exactly_once(archive_objects_s3(s3.client(), "nope"), raw(events))


async def test_runtime_stop_start_and_bucket_change_mid_stream(
    redis_url: str, redis_client: aioredis.Redis, s3: MotoServer
) -> None:
    client = s3.client()
    client.create_bucket(Bucket="first")
    client.create_bucket(Bucket="second")
    policy = FlushPolicy(max_events=50, max_bytes=1 << 20, max_age_seconds=0.3)
    first = ArchiveConfig(enabled=True, bucket="first", flush=policy)
    second = ArchiveConfig(enabled=True, bucket="second", flush=policy)
    published: list[dict] = []

    async def produce(n: int) -> None:
        batch = mixed_events(n)
        published.extend(batch)
        await publish(redis_client, STREAM, batch)

    async with running_sidecar(redis_url) as sidecar:
        assert await sidecar.apply_archive_target(first) is None
        await produce(200)
        # the archiver has them in hand (buffered, not all flushed) when it is switched off
        await wait_for(lambda: group_read_all(redis_client, STREAM, ARCHIVER))
        assert await sidecar.apply_archive_target(ArchiveConfig(enabled=False)) is None
        assert sidecar.metrics.archive_enabled.labels("")._value.get() == 0
        await produce(200)  # archival off: these wait in the stream
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR))
        assert await sidecar.apply_archive_target(first) is None
        await produce(100)
        assert await sidecar.apply_archive_target(second) is None
        await produce(100)
        refused = await sidecar.apply_archive_target(
            ArchiveConfig(enabled=True, bucket="missing", flush=policy)
        )
        assert refused is not None and "bucket does not exist (create it, or set" in refused
        assert sidecar.archive.target == second  # last good configuration kept
        await wait_for(lambda: group_done(redis_client, STREAM, ARCHIVER), timeout=30)
    objects = archive_objects_s3(client, "first") | archive_objects_s3(client, "second")
    check_exactly_once(objects, raw(published))
    assert archive_objects_s3(client, "second")


async def test_replay_rebuilds_the_same_projection(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    folder = tmp_path / "archive"
    settings = {"s3_archive_enabled": True, "archive_sink": "folder", "archive_folder": folder}
    events = mixed_events(500, projects=4, days=2)
    events += [event(f"x{n}", "error", T0 + n + 5) for n in range(0, 500, 7)]
    await publish(redis_client, STREAM, events)
    async with running_sidecar(redis_url, **settings):
        await wait_for(lambda: group_read_all(redis_client, STREAM, ARCHIVER))
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR))
    ids = {e["executionId"] for e in events}
    before = await projection(redis_client, ids)
    keys = await redis_client.keys("task-tracking:*")
    await redis_client.delete(*keys)
    summary = await replay_archive(sidecar_settings(redis_url, **settings))
    assert summary.events == len(events) and summary.failed_objects == 0
    after = await projection(redis_client, ids)
    for execution_id in ids:
        expected = dict(before[execution_id])
        actual = dict(after[execution_id])
        assert actual.pop("streamId").startswith("archive:")
        expected.pop("streamId")
        assert actual == expected
    # idempotent: a second replay changes nothing
    again = await replay_archive(sidecar_settings(redis_url, **settings), project="org1/repo-1")
    assert again.applied == 0 and again.events > 0


def valid_entries(events: list[dict]) -> list[ValidEvent]:
    """The events as the runner hands them over, with consecutive entry IDs from T0."""
    decoded = [
        decode_entry(f"{T0 + n}-0", {EVENT_FIELD: data}) for n, data in enumerate(raw(events))
    ]
    valid = [entry for entry in decoded if isinstance(entry, ValidEvent)]
    assert len(valid) == len(events)
    return valid


def counting_archiver(
    client: Any, policy: FlushPolicy
) -> tuple[_CountingSink, S3TaskHistoryArchiver]:
    """An archiver writing to bucket `archive` through a sink that counts writes out at once."""
    sink = _CountingSink(S3Sink(client, "archive"))
    archiver = S3TaskHistoryArchiver(
        sink,  # type: ignore[arg-type]
        Metrics(),
        stream=STREAM,
        prefix="task-tracking",
        policy=policy,
    )
    return sink, archiver


async def test_buffers_due_together_go_oldest_first_a_few_per_flush(s3: MotoServer) -> None:
    """Six full buffers: each flush writes the two oldest (bodies and IDs of two buffers
    in memory at once, not six) and says the next flush is due at once, until none is."""
    s3.client().create_bucket(Bucket="archive")
    events = mixed_events(6 * 10, projects=6, days=1)
    valid = valid_entries(events)
    async with s3_client_context(region="us-east-1", endpoint_url=s3.url) as client:
        sink, archiver = counting_archiver(client, FlushPolicy(max_events=10))
        archiver.add(valid)
        started = [entry.project for entry in valid]
        creation_order = list(dict.fromkeys(started))
        written: list[str] = []
        durable: list[str] = []
        while archiver.buffered:
            assert archiver.seconds_until_due() == 0.0  # a full buffer is left: read, flush
            before = set(archive_objects_s3(s3.client(), "archive"))
            durable += (await archiver.flush(force=False)).durable_ids
            new = set(archive_objects_s3(s3.client(), "archive")) - before
            assert len(new) == UPLOADS_IN_FLIGHT
            written += sorted({key.split("/")[1] + "/" + key.split("/")[2] for key in new})
        assert archiver.seconds_until_due() is None
        assert sink.most_out == UPLOADS_IN_FLIGHT
    assert sorted(written) == sorted(creation_order)
    assert [set(written[i : i + 2]) for i in (0, 2, 4)] == [
        set(creation_order[i : i + 2]) for i in (0, 2, 4)
    ]
    assert sorted(durable) == sorted(entry.entry_id for entry in valid)
    check_exactly_once(archive_objects_s3(s3.client(), "archive"), raw(events))


class _CountingSink:
    """The real S3 sink, counting how many writes are out at once."""

    def __init__(self, sink: S3Sink) -> None:
        self.sink = sink
        self.description = sink.description
        self.out = 0
        self.most_out = 0

    async def create_if_absent(self, key: str, body: bytes) -> bool:
        self.out += 1
        self.most_out = max(self.most_out, self.out)
        try:
            return await self.sink.create_if_absent(key, body)
        finally:
            self.out -= 1

    async def read(self, key: str) -> bytes:
        return await self.sink.read(key)


async def test_due_buffers_upload_side_by_side_and_one_failing_lets_the_others_finish(
    s3: MotoServer,
) -> None:
    s3.client().create_bucket(Bucket="archive")
    events = mixed_events(8 * 20, projects=8, days=1)
    valid = valid_entries(events)
    # A foreign object where org5's first object goes: a real integrity failure.
    first_of_org5 = next(entry for entry in valid if entry.project == "org5/repo-5")
    blocked = object_key(
        "task-tracking", "org5/repo-5", "2026-03-15", STREAM, first_of_org5.entry_id
    )
    s3.client().put_object(Bucket="archive", Key=blocked, Body=b"someone else's\n")
    async with s3_client_context(region="us-east-1", endpoint_url=s3.url) as client:
        sink, archiver = counting_archiver(client, FlushPolicy())
        archiver.add(valid)
        with pytest.raises(ArchiveIntegrityError):
            await archiver.flush(force=True)
        assert sink.most_out == UPLOADS_IN_FLIGHT  # 8 buffers due, written 2 at a time
        written = archive_objects_s3(s3.client(), "archive")
        assert len(written) == 1 + 7  # the foreign object; the 7 others finished
        s3.client().delete_object(Bucket="archive", Key=blocked)
        flushed = await archiver.flush(force=True)  # the retry writes org5, hands back all
    assert sorted(flushed.durable_ids) == sorted(entry.entry_id for entry in valid)
    check_exactly_once(archive_objects_s3(s3.client(), "archive"), raw(events))
