"""Conditional writes: the probe, the check-before-write fallback, the setting that forces a
mode, and where the mode is reported (log, metric). Against moto over HTTP, directly and
behind tests/s3proxy.py stripping `If-None-Match` (a server that ignores the header)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio as aioredis

from sidecar.archiver import object_key
from sidecar.config import ConfigError, load_settings
from sidecar.metrics import Metrics
from sidecar.sinks import FolderSink, S3Sink, s3_client_context
from tests.conftest import PROXIED_BUCKET, MotoServer
from tests.helpers import (
    ARCHIVER,
    STREAM,
    archive_objects_s3,
    check_exactly_once,
    event,
    group_done,
    group_read_all,
    publish,
    running_sidecar,
    wait_for,
)
from tests.s3proxy import S3Proxy

BUCKET = PROXIED_BUCKET  # what `stripping_proxy` creates
T0 = 1_773_568_800_000  # 2026-03-15T10:00:00Z


@pytest.fixture
async def direct_sink(s3: MotoServer) -> AsyncIterator[S3Sink]:
    s3.client().create_bucket(Bucket=BUCKET)
    async with s3_client_context(region="us-east-1", endpoint_url=s3.url) as client:
        yield S3Sink(client, BUCKET)


def gauge(metrics: Metrics, mode: str) -> float:
    value: float = metrics.archive_conditional_writes.labels(mode)._value.get()
    return value


async def test_probe_says_enforced_against_moto_and_not_behind_a_stripping_proxy(
    s3: MotoServer, direct_sink: S3Sink, stripping_proxy: S3Proxy
) -> None:
    assert await direct_sink.probe_conditional_writes("task-tracking/.probe/pod-a") is True
    async with s3_client_context(region="us-east-1", endpoint_url=stripping_proxy.url) as client:
        behind = S3Sink(client, BUCKET)
        assert await behind.probe_conditional_writes("task-tracking/.probe/pod-a") is False
    assert any(r.startswith("PUT /archive/task-tracking/.probe/") for r in stripping_proxy.requests)
    assert archive_objects_s3(s3.client(), BUCKET) == {}  # the probe objects are deleted


async def test_check_before_write_reads_back_an_object_a_killed_attempt_left(
    s3: MotoServer, stripping_proxy: S3Proxy
) -> None:
    """What a retried batch meets after a crash: an object at its first entry's key holding
    fewer entries than the retry's run. Behind the stripping proxy a plain PUT overwrites it
    and the entries after it are written twice; check-before-write reads it back."""
    async with s3_client_context(region="us-east-1", endpoint_url=stripping_proxy.url) as client:
        sink = S3Sink(client, BUCKET)
        key = object_key("p", "org/repo", "2026-03-15", STREAM, "1-0")
        assert await sink.create_if_absent(key, b"a\n") is True
        assert await sink.create_if_absent(key, b"a\nb\n") is True  # the header is gone
        sink.check_before_write = True
        assert await sink.create_if_absent(key, b"a\nb\nc\n") is False
        assert await sink.read(key) == b"a\nb\n"
        fresh = object_key("p", "org/repo", "2026-03-15", STREAM, "2-0")
        assert await sink.create_if_absent(fresh, b"d\n") is True
    heads = [r for r in stripping_proxy.requests if r.startswith("HEAD /archive/p/")]
    assert len(heads) == 2


async def test_a_sidecar_behind_a_stripping_proxy_falls_back_and_says_so(
    redis_url: str,
    redis_client: aioredis.Redis,
    s3: MotoServer,
    stripping_proxy: S3Proxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = [event(f"e{n}", "success", T0 + n) for n in range(50)]
    await publish(redis_client, STREAM, events)
    settings = {"s3_archive_enabled": True, "s3_bucket": BUCKET, "redis_consumer_name": "pod-a"}
    with caplog.at_level(logging.INFO, logger="sidecar"):
        async with running_sidecar(
            redis_url, s3_endpoint_url=stripping_proxy.url, **settings
        ) as sidecar:
            await wait_for(lambda: sidecar.archive.conditional_writes is not None)
            assert sidecar.archive.conditional_writes == "check_before_write"
            assert gauge(sidecar.metrics, "check_before_write") == 1
            assert gauge(sidecar.metrics, "enforced") == 0
            scrape = sidecar.metrics.exposition().decode()
            assert 'task_tracking_archive_conditional_writes{mode="check_before_write"} 1.0' in (
                scrape
            )
            # read before the stop, whose final flush writes it (a stop cuts a waiting read)
            await wait_for(lambda: group_read_all(redis_client, STREAM, ARCHIVER), message="read")
        await wait_for(lambda: group_done(redis_client, STREAM, ARCHIVER), message="archived")
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "check_before_write" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    assert "s3://archive" in warnings[0] and "second create was accepted" in warnings[0]
    check_exactly_once(archive_objects_s3(s3.client(), BUCKET), [orjson.dumps(e) for e in events])

    # Against moto itself: enforced, and the gauge moves with it.
    async with running_sidecar(redis_url, **settings) as sidecar:
        await wait_for(lambda: sidecar.archive.conditional_writes is not None)
        assert sidecar.archive.conditional_writes == "enforced"
        assert (
            gauge(sidecar.metrics, "enforced"),
            gauge(sidecar.metrics, "check_before_write"),
        ) == (
            1,
            0,
        )


@pytest.mark.parametrize("forced", ["enforced", "check_before_write"])
async def test_the_setting_forces_a_mode_without_probing(
    redis_url: str,
    redis_client: aioredis.Redis,
    s3: MotoServer,
    stripping_proxy: S3Proxy,
    forced: str,
) -> None:
    await publish(redis_client, STREAM, [event("e1", "success", T0)])
    async with running_sidecar(
        redis_url,
        s3_archive_enabled=True,
        s3_bucket=BUCKET,
        s3_endpoint_url=stripping_proxy.url,
        archive_conditional_writes=forced.upper(),  # case does not matter
    ) as sidecar:
        await wait_for(lambda: sidecar.archive.conditional_writes is not None)
        assert sidecar.archive.conditional_writes == forced
        await wait_for(lambda: group_read_all(redis_client, STREAM, ARCHIVER), message="read")
    await wait_for(lambda: group_done(redis_client, STREAM, ARCHIVER), message="archived")
    assert not [r for r in stripping_proxy.requests if "/.probe/" in r]
    heads = [r for r in stripping_proxy.requests if r.startswith("HEAD /archive/task-tracking/")]
    assert len(heads) == (1 if forced == "check_before_write" else 0)


async def test_a_folder_archive_is_always_enforced(tmp_path: object) -> None:
    from pathlib import Path

    from sidecar.conditional_writes import settle_conditional_writes

    sink = FolderSink(Path(str(tmp_path)) / "archive")
    metrics = Metrics()
    mode = await settle_conditional_writes(
        sink, metrics, setting="check_before_write", prefix="p", consumer="pod-a"
    )
    assert mode == "enforced" and sink.check_before_write is False
    assert gauge(metrics, "enforced") == 1


def test_a_bad_mode_is_one_line_naming_the_variable() -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(
            {
                "TASK_TRACKING_REDIS_URL": "redis://x",
                "TASK_TRACKING_ARCHIVE_CONDITIONAL_WRITES": "on",
            }
        )
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("TASK_TRACKING_ARCHIVE_CONDITIONAL_WRITES='on' is invalid")
    assert "'auto', 'enforced' or 'check_before_write'" in message
    settings = load_settings({"TASK_TRACKING_REDIS_URL": "redis://x"})
    assert settings.archive.conditional_writes == "auto"
