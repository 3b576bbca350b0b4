"""Fault injection at the archive's edges: an S3 server that ignores conditional writes, and
one that accepts connections and never answers.

Same harness and invariant as tests/faults/test_faults.py (sidecar subprocesses, the
printed `lost=0 duplicated=0` line). Behind tests/s3proxy.py:

- stripping `If-None-Match` and delaying PUT replies, the sidecar is killed -9 while an
  object it wrote is not acknowledged yet, and restarted with another flush limit, so the
  retry's runs do not line up with the objects written: only check-before-write (probed,
  logged, in the metrics) keeps the archive exactly once;
- never answering for 30 s, with a SIGTERM in the middle: /readyz names the timeout, the
  process exits within its 10 s budget, and what it could not write is written after the
  restart, exactly once.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from sidecar.devserver import DevServer, free_port
from tests.conftest import MotoServer
from tests.faults.test_faults import (
    BUCKET,
    T0,
    check_invariant,
    fault_producer,
    redis_server,
    s3_proxy,
    sidecar,
)
from tests.helpers import STREAM, SidecarProcess, event, publish, wait_for
from tests.s3proxy import S3Proxy

pytestmark = [pytest.mark.faults, pytest.mark.slow]

__all__ = ["redis_server", "s3_proxy"]  # the fixtures, shared with test_faults

SIGTERM_BUDGET_SECONDS = 10.0


def with_http_port(process: SidecarProcess) -> int:
    port = free_port()
    process.env["TASK_TRACKING_HTTP_PORT"] = str(port)
    return port


async def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
            session.get(f"http://127.0.0.1:{port}{path}") as response,
        ):
            return response.status, await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return 0, ""


def archived_keys(s3: MotoServer) -> list[str]:
    listing = s3.client().list_objects_v2(Bucket=BUCKET, Prefix="task-tracking/org/")
    return [item["Key"] for item in listing.get("Contents", ())]


async def test_kill_9_mid_upload_behind_a_server_that_ignores_if_none_match(
    redis_server: DevServer, s3: MotoServer, s3_proxy: S3Proxy, tmp_path: Path
) -> None:
    s3_proxy.strip_if_none_match = True
    s3_proxy.delay_methods = {"PUT"}
    s3_proxy.delay = 1.5  # an object lands at once, its PUT's reply 1.5 s later
    producer = fault_producer(redis_server.url, seed=4)  # not started: the events are ours
    events = [event(f"k{n}", "success", T0 + n, project="org/repo") for n in range(300)]
    producer.valid = events
    producer.valid_raw = [orjson.dumps(e) for e in events]
    await publish(producer.client, STREAM, events)

    first = sidecar(redis_server, s3_proxy, s3, tmp_path, "pod-a")
    first.env["TASK_TRACKING_ARCHIVE_FLUSH_MAX_EVENTS"] = "100"
    first.env["TASK_TRACKING_ARCHIVE_FLUSH_MAX_AGE_SECONDS"] = "30"
    second = SidecarProcess(dict(first.env), tmp_path / "pod-a-restarted.log")
    second.env["TASK_TRACKING_ARCHIVE_FLUSH_MAX_EVENTS"] = "150"
    port = with_http_port(second)
    try:
        started = time.monotonic()
        first.start()
        # Two objects of 100 landed, the reply to the second PUT not yet back: nothing acked.
        await wait_for(lambda: len(archived_keys(s3)) >= 2, 30, "two objects written")
        first.kill()
        killed_after = time.monotonic() - started
        assert len(archived_keys(s3)) == 2, "the kill came too late to be mid-upload"
        assert "check_before_write mode" in first.log()

        s3_proxy.delay = 0
        second.start()

        async def mode_in_metrics() -> bool:
            _, body = await http_get(port, "/metrics")
            return (
                'task_tracking_archive_conditional_writes{mode="check_before_write"} 1.0' in body
                and 'task_tracking_archive_conditional_writes{mode="enforced"} 0.0' in body
            )

        await wait_for(mode_in_metrics, 20, "check_before_write in the metrics")
        await check_invariant(
            redis_server.url,
            producer,
            s3,
            {"killed_after_s": round(killed_after, 1), "flush_limits": "100->150"},
            [first, second],
        )
        warnings = [
            record["message"]
            for record in map(orjson.loads, second.log().splitlines())
            if record["level"] == "warning" and "check_before_write mode" in record["message"]
        ]
        assert len(warnings) == 1, second.log()  # one line says it, once per target
        # The restart found both objects by HEAD and read them back instead of overwriting.
        assert second.log().count("already holds") == 2, second.log()
        assert second.terminate() == 0, second.log()
    finally:
        first.kill()
        second.kill()
        await producer.client.aclose()


async def test_never_answering_s3_for_30_s_with_a_sigterm_in_the_middle(
    redis_server: DevServer, s3: MotoServer, s3_proxy: S3Proxy, tmp_path: Path
) -> None:
    producer = fault_producer(redis_server.url, seed=5)
    process = sidecar(redis_server, s3_proxy, s3, tmp_path, "pod-a")
    port = with_http_port(process)
    figures: dict[str, Any] = {"hang_s": 30}
    process.start()
    producer.start()
    try:
        await wait_for(lambda: bool(archived_keys_any(s3)), 30, "archival under way")
        s3_proxy.set_hanging(True)
        hung_at = time.monotonic()

        reason: list[str] = []

        async def readyz_names_the_timeout() -> bool:
            status, body = await http_get(port, "/readyz")
            if status == 503 and "timed out after 10 s" in body:
                reason.append(body)
                return True
            return False

        await wait_for(readyz_names_the_timeout, 25, "/readyz naming the hung S3 call")
        assert f"archiver: s3://{BUCKET}: PUT timed out after 10 s" in reason[0], reason[0]
        figures["readyz_after_s"] = round(time.monotonic() - hung_at, 1)

        signalled = time.monotonic()
        code = await asyncio.to_thread(process.terminate, 30)
        exit_seconds = time.monotonic() - signalled
        figures["sigterm_exit_s"] = round(exit_seconds, 2)
        print(f"\nSIGTERM while S3 hangs: exited {code} after {exit_seconds:.2f} s")
        assert exit_seconds < SIGTERM_BUDGET_SECONDS, process.log()
        assert code == 0, process.log()
        # Either its uploads were still hanging and stopping gave up on them, or the last
        # one reached its own deadline first (a PUT's is 15 s): both leave entries pending.
        log = process.log()
        assert "giving up" in log or "PUT timed out after 15 s" in log, log

        process.start()  # still hung: it waits, not ready, until S3 answers again
        await asyncio.sleep(max(0.0, hung_at + 30 - time.monotonic()))
        s3_proxy.set_hanging(False)
        await wait_for(lambda: ready(port), 60, "ready again after S3 answers")
        await producer.stop()
        assert process.running(), process.log()
        await check_invariant(redis_server.url, producer, s3, figures, [process])
        signalled = time.monotonic()
        assert await asyncio.to_thread(process.terminate, 30) == 0, process.log()
        assert time.monotonic() - signalled < SIGTERM_BUDGET_SECONDS
    finally:
        s3_proxy.set_hanging(False)
        process.kill()


def archived_keys_any(s3: MotoServer) -> list[str]:
    listing = s3.client().list_objects_v2(Bucket=BUCKET, Prefix="task-tracking/org")
    return [item["Key"] for item in listing.get("Contents", ())]


async def ready(port: int) -> bool:
    status, _ = await http_get(port, "/readyz")
    return status == 200
