"""/healthz and /readyz semantics, and the JSON logs: context keys, level, no credentials."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from sidecar.logs import JsonFormatter
from tests.helpers import (
    PROJECTOR,
    STREAM,
    SidecarProcess,
    archive_objects_folder,
    event,
    group_done,
    publish,
    running_sidecar,
    sidecar_env,
    wait_for,
)

PASSWORD = "s3cret-Pa55word"


async def get(sidecar: Any, path: str) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{sidecar.http_port}{path}"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.json()


async def test_healthz_fails_when_a_worker_task_dies_and_readyz_is_separate(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with running_sidecar(redis_url) as sidecar:
        await wait_for(lambda: sidecar.projector_runner.ready.is_set(), message="ready")
        assert await get(sidecar, "/healthz") == (200, {"ok": True})
        assert await get(sidecar, "/readyz") == (200, {"ok": True})
        sidecar._tasks["projector"].cancel()  # the projector's task dies
        await wait_for(lambda: sidecar._tasks["projector"].done(), message="task ended")
        status, body = await get(sidecar, "/healthz")
        assert status == 503
        assert body == {"ok": False, "problems": ["projector task ended"]}


async def test_healthz_fails_while_the_event_loop_is_blocked_then_recovers(
    redis_url: str,
) -> None:
    context = running_sidecar(redis_url)
    context.sidecar.loop_stall_seconds = 0.5
    context.sidecar.watchdog.interval = 0.2
    async with context as sidecar:
        url = f"http://127.0.0.1:{sidecar.http_port}/healthz"

        async def healthy() -> bool:
            return await asyncio.to_thread(_http_status, url) == 200

        await wait_for(healthy, message="healthy")

        def probe_during_stall() -> int:
            time.sleep(0.3)  # sent while the loop below is blocked; answered after it
            return _http_status(url)

        answer = asyncio.get_running_loop().run_in_executor(None, probe_during_stall)
        # The wedge under test: the event loop blocked by synchronous work.
        time.sleep(1.5)  # noqa: ASYNC251
        assert await answer == 503
        assert sidecar.metrics.event_loop_lag._value.get() >= 1.0
        await wait_for(healthy, message="healthy again")


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


async def test_readyz_fails_while_an_enabled_archiver_cannot_write(
    redis_url: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    async with running_sidecar(
        redis_url, s3_archive_enabled=True, archive_sink="folder", archive_folder=blocker / "x"
    ) as sidecar:
        await wait_for(lambda: sidecar.projector_runner.ready.is_set(), message="projector")
        await wait_for(lambda: sidecar.stats.sampled, message="first statistics sample")
        status, body = await get(sidecar, "/readyz")
        assert status == 503
        assert len(body["problems"]) == 1 and body["problems"][0].startswith("archiver: ")
        assert await get(sidecar, "/healthz") == (200, {"ok": True})  # not wedged


@pytest.fixture
async def password_url(
    redis_url: str, redis_client: aioredis.Redis
) -> AsyncIterator[tuple[str, str]]:
    """The session server's URL with a user and password (an ACL user), and a wrong one."""
    await redis_client.execute_command(
        "ACL", "SETUSER", "tt-logs", "on", f">{PASSWORD}", "~*", "&*", "+@all"
    )
    parts = urlsplit(redis_url)
    netloc = f"tt-logs:{{}}@{parts.hostname}:{parts.port}"
    right = urlunsplit(parts._replace(netloc=netloc.format(PASSWORD)))
    wrong = urlunsplit(parts._replace(netloc=netloc.format(PASSWORD[::-1])))
    yield right, wrong
    await redis_client.execute_command("ACL", "DELUSER", "tt-logs")


def log_lines(process: SidecarProcess) -> list[dict[str, Any]]:
    text = process.log()
    assert PASSWORD not in text and PASSWORD[::-1] not in text
    lines = [orjson.loads(line) for line in text.splitlines()]  # every line is one object
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys(), line
    return lines


async def test_logs_are_json_lines_with_context_at_the_env_level_without_credentials(
    redis_client: aioredis.Redis, password_url: tuple[str, str], tmp_path: Path
) -> None:
    right, wrong = password_url
    folder = tmp_path / "archive"
    env = sidecar_env(
        right,
        log_level="DEBUG",
        s3_archive_enabled=True,
        archive_sink="folder",
        archive_folder=folder,
        archive_flush_max_age_seconds=0.2,
    )
    process = SidecarProcess(env, tmp_path / "sidecar.log").start()
    try:
        bad = orjson.dumps({**event("exec-bad"), "status": "finished"})
        ids = await publish(redis_client, STREAM, [event("exec-ok", "success"), bad])
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR), message="projected")
        await wait_for(lambda: bool(archive_objects_folder(folder)), message="archived")
        assert await asyncio.to_thread(process.terminate, 15) == 0
    finally:
        process.kill()
    lines = log_lines(process)
    assert "debug" in {line["level"] for line in lines}  # TASK_TRACKING_LOG_LEVEL=DEBUG
    (dead,) = [line for line in lines if line["message"].startswith("dead-lettering")]
    assert dead["level"] == "warning"
    assert dead["worker"] == "projector"
    assert dead["group"] == PROJECTOR
    assert dead["consumer"] == "alakai"
    assert dead["stream_id"] == ids[1]
    assert dead["execution_id"] == "exec-bad"
    archival = [line for line in lines if line["message"].startswith("archival on")]
    assert archival and archival[0]["bucket"] == str(folder)

    # A wrong password: the failure is logged (one line per failure, at warning), but
    # neither password appears, at the default level nothing below info.
    env = sidecar_env(wrong)
    failing = SidecarProcess(env, tmp_path / "failing.log").start()
    try:
        await wait_for(
            lambda: "Redis unavailable" in failing.log(), message="failure logged", timeout=30
        )
        assert await asyncio.to_thread(failing.terminate, 15) == 0
    finally:
        failing.kill()
    lines = log_lines(failing)
    assert "debug" not in {line["level"] for line in lines}
    unavailable = [line for line in lines if "Redis unavailable" in line["message"]]
    assert unavailable[0]["group"] == PROJECTOR and unavailable[0]["worker"] == "projector"


def test_a_url_password_in_a_message_or_traceback_is_redacted() -> None:
    url = f"rediss://user:{PASSWORD}@redis.example:6380/0"
    try:
        raise ConnectionError(f"cannot connect to {url}")
    except ConnectionError:
        record = logging.LogRecord(
            "sidecar", logging.ERROR, __file__, 1, "lost %s", (url,), sys.exc_info()
        )
    line = orjson.loads(JsonFormatter().format(record))
    assert line["message"] == "lost rediss://user:***@redis.example:6380/0"
    assert "rediss://user:***@redis.example:6380/0" in line["error"]
    assert PASSWORD not in orjson.dumps(line).decode()
