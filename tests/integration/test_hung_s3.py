"""An S3 endpoint that accepts connections and never answers, in-process: the sidecar's
stop stays within its 10 s budget even while a re-target's check waits on that endpoint,
and the timeout is one clear line naming the call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from sidecar.config import ArchiveConfig
from sidecar.sinks import S3Sink, SinkError, s3_client_context
from tests.conftest import MotoServer
from tests.helpers import running_sidecar, wait_for
from tests.s3proxy import S3Proxy

BUCKET = "archive"


@pytest.fixture
def hung_proxy(s3: MotoServer) -> Iterator[S3Proxy]:
    s3.client().create_bucket(Bucket=BUCKET)
    proxy = S3Proxy(s3.port).start()
    proxy.set_hanging(True)
    yield proxy
    proxy.set_hanging(False)
    proxy.stop()


async def test_stop_abandons_a_re_target_check_that_hangs(
    redis_url: str, redis_client: aioredis.Redis, hung_proxy: S3Proxy
) -> None:
    async with running_sidecar(redis_url) as sidecar:
        target = ArchiveConfig(enabled=True, bucket=BUCKET, endpoint_url=hung_proxy.url)
        switching = asyncio.ensure_future(sidecar.apply_archive_target(target))
        await wait_for(lambda: bool(hung_proxy.requests), message="the check under way")
        started = time.monotonic()
        await sidecar.stop()
        stopped_in = time.monotonic() - started
        sidecar.stop = _no_second_stop  # type: ignore[method-assign]
    assert stopped_in < 2, f"stop took {stopped_in:.1f} s behind a hung check"
    assert "stopping" in (await switching or "")
    assert not sidecar.archive.target.enabled  # the refused target never ran


async def _no_second_stop() -> None:
    pass


async def test_a_call_that_hangs_is_one_line_naming_it_and_shows_while_in_flight(
    hung_proxy: S3Proxy,
) -> None:
    async with s3_client_context(region="us-east-1", endpoint_url=hung_proxy.url) as client:
        sink = S3Sink(client, BUCKET, read_timeout=1)  # /readyz's reason quotes this
        assert sink.stalled() is None
        put = asyncio.ensure_future(sink.create_if_absent("k", b"x\n"))
        await wait_for(lambda: sink.stalled() is not None, 5, "the PUT overdue")
        assert sink.stalled() == f"s3://{BUCKET}: PUT timed out after 1 s"
        with pytest.raises(SinkError) as error:
            await put  # its own deadline: connect 5 s + read 1 s (aiohttp never gives up)
        assert error.value.reason == "timeout"
        assert str(error.value) == f"s3://{BUCKET}: PUT timed out after 6 s"
        assert sink.stalled() == str(error.value)  # until the server answers again
        hung_proxy.set_hanging(False)
        assert await sink.create_if_absent("k", b"x\n") is True
        assert sink.stalled() is None
