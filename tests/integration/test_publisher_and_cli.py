"""The publisher (RedisTaskTrackingService) and the command line, against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from sidecar.publisher import RedisTaskTrackingService
from tests.helpers import PROJECTOR, STREAM, group_done, running_sidecar, wait_for


async def test_emit_writes_one_camel_case_event_field(redis_client: aioredis.Redis) -> None:
    service = RedisTaskTrackingService(redis_client, responsible_users=["ann", "bob"])
    event = service.build(
        execution_id="e1", task_name="deploy", project="o/r", status="in_progress", flow="ci"
    )
    entry_id = await service.emit(event)
    [(stored_id, fields)] = await redis_client.xrange(STREAM)
    assert stored_id.decode() == entry_id
    assert list(fields) == [b"event"]
    data = orjson.loads(fields[b"event"])
    assert data["executionId"] == "e1" and data["taskName"] == "deploy"
    assert data["visibility"] == {"responsibleUsers": ["ann", "bob"]}
    assert data["occurredAt"].endswith("Z") and data["flow"] == "ci"
    assert "prLinks" not in data  # unset optional fields are left out


async def test_track_emits_in_progress_then_success_or_error(
    redis_client: aioredis.Redis,
) -> None:
    service = RedisTaskTrackingService(redis_client)
    async with service.track("build", "o/r") as execution_id:
        pass
    with pytest.raises(RuntimeError):
        async with service.track("build", "o/r", execution_id="failing"):
            raise RuntimeError("boom")
    events = [orjson.loads(f[b"event"]) for _, f in await redis_client.xrange(STREAM)]
    assert [(e["executionId"], e["status"]) for e in events] == [
        (execution_id, "in_progress"),
        (execution_id, "success"),
        ("failing", "in_progress"),
        ("failing", "error"),
    ]


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"occurred_at": 1_796_151_007}, "looks like epoch seconds"),
        ({"occurred_at": "9999-12-31T23:59:59Z"}, "TASK_TRACKING_MAX_FUTURE_SECONDS"),
        ({"execution_id": "a\nb"}, "control character"),
        ({"blob": "x" * 2048}, "TASK_TRACKING_MAX_EVENT_BYTES"),
        ({"prLinks": ["ftp://x"]}, "prLinks"),
    ],
)
async def test_publisher_refuses_before_sending_what_the_sidecar_would_refuse(
    redis_client: aioredis.Redis, extra: dict[str, object], reason: str
) -> None:
    from sidecar.events import EventLimits

    service = RedisTaskTrackingService(redis_client, limits=EventLimits(max_event_bytes=1024))
    values: dict[str, object] = {"execution_id": "e1", "occurred_at": None, **extra}
    with pytest.raises(ValueError, match=reason):  # from build(), or from emit()
        event = service.build(
            task_name="deploy",
            project="o/r",
            status="success",
            **values,  # type: ignore[arg-type]
        )
        await service.emit(event)
    assert await redis_client.xlen(STREAM) == 0


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_emit_status_and_list_commands(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    env = {**os.environ, "TASK_TRACKING_REDIS_URL": redis_url}
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"responsibleUsers": ["ann"]}))
    common = ["--execution-id", "c1", "--task", "deploy", "--project", "o/r"]
    first = await asyncio.to_thread(cli, "emit", *common, "--status", "in_progress", env=env)
    assert first.returncode == 0, first.stderr
    second = await asyncio.to_thread(
        cli, "emit", *common, "--status", "success", "--responsible-users-file", str(users), env=env
    )
    assert second.returncode == 0, second.stderr
    bad = await asyncio.to_thread(
        cli, "emit", *common[:4], "--project", "../x", "--status", "success", env=env
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "project" in bad.stderr
    seconds = await asyncio.to_thread(
        cli, "emit", *common, "--status", "success", "--occurred-at", "1796151007", env=env
    )
    assert seconds.returncode == 2 and seconds.stderr.count("\n") == 1, seconds.stderr
    assert "looks like epoch seconds; send milliseconds" in seconds.stderr
    async with running_sidecar(redis_url):
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR))
    status = await asyncio.to_thread(cli, "status", "c1", "--json", env=env)
    state = json.loads(status.stdout)
    # --json prints fields in their JSON types (#17): an object, not a JSON string
    assert state["status"] == "success" and state["visibility"] == {"responsibleUsers": ["ann"]}
    table = await asyncio.to_thread(cli, "list", "o/r", env=env)
    assert "c1" in table.stdout and "success" in table.stdout
    missing = await asyncio.to_thread(cli, "status", "nope", env=env)
    assert missing.returncode == 1


async def test_dev_runs_on_embedded_defaults_and_the_commands_find_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASK_TRACKING_")}
    env["TASK_TRACKING_HTTP_PORT"] = "0"
    dev = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "dev", "--archive-folder", str(tmp_path / "archive")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert dev.stdout is not None
        output = ""
        while "task-tracking dev is running" not in output:
            line = await asyncio.to_thread(dev.stdout.readline)
            assert line, f"dev exited: {output}"
            output += line
        common = ["--execution-id", "d1", "--task", "deploy", "--project", "my-org/my-repo"]
        for status in ("in_progress", "success"):
            result = await asyncio.to_thread(cli, "emit", *common, "--status", status, env=env)
            assert result.returncode == 0, result.stderr

        def shows_success() -> bool:
            result = cli("status", "d1", "--json", env=env)
            return result.returncode == 0 and json.loads(result.stdout)["status"] == "success"

        await wait_for(lambda: asyncio.to_thread(shows_success), message="status shows success")
        dev.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(dev.wait, 20) == 0
        objects = list((tmp_path / "archive").rglob("*.jsonl"))
        assert len(objects) == 1 and objects[0].read_text().count("\n") == 2
    finally:
        dev.kill()
