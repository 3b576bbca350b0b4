"""The publisher (RedisTaskTrackingService) and the command line, against a real server."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from sidecar.cli import build_parser
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


def cli(
    *args: str, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        env=env,
        input=stdin,
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


def plain_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASK_TRACKING_")}
    env["TASK_TRACKING_DEV_DIR"] = "/nonexistent"  # never a dev server of this checkout
    return {**env, **{f"TASK_TRACKING_{name.upper()}": value for name, value in settings.items()}}


@pytest.mark.parametrize(
    ("url", "named", "secret"),
    [
        ("redis://127.0.0.1:1/0?bogus=1", "unknown option 'bogus'", None),
        ("rediss://default:S3cret@127.0.0.1:1?bogus=1", "'rediss://default:***@", "S3cret"),
        ("foo://u:S3cret@h", "'foo://u:***@h'", "S3cret"),
        ("redis://:pa/ss@h:1/0", "percent-encode", "pa/ss"),
        ("redis://h/0?password=S3cret&ssl=1", "unknown option 'ssl'", "S3cret"),
        ("redis://h/0?socket_timeout=soon", "socket_timeout", None),
        ("rediss://h/0?ssl_ca_certs=/nonexistent/ca.pem", "ssl_ca_certs=/nonexistent", None),
    ],
)
async def test_a_bad_redis_url_is_one_line_exit_2_with_secrets_redacted_for_status_and_run(
    url: str, named: str, secret: str | None
) -> None:
    env = plain_env(redis_url=url)
    results = await asyncio.gather(
        asyncio.to_thread(cli, "status", "x", env=env), asyncio.to_thread(cli, "run", env=env)
    )
    for result in results:
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith(
            "task-tracking: TASK_TRACKING_REDIS_URL="
        ), result.stderr
        assert named in result.stderr
        assert secret is None or secret not in result.stderr


async def test_rediss_against_a_plain_server_times_out_with_a_tls_hint(redis_url: str) -> None:
    tls_url = redis_url.replace("redis://", "rediss://") + "?socket_connect_timeout=1"
    result = await asyncio.to_thread(cli, "status", "x", env=plain_env(redis_url=tls_url))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "does not speak TLS, use redis://" in result.stderr


async def test_replay_refuses_bad_days_and_projects_and_says_when_nothing_matched(
    redis_url: str, tmp_path: Path
) -> None:
    env = plain_env(redis_url=redis_url, archive_sink="folder", archive_folder=str(tmp_path))
    mistakes = {
        ("--since", "yesterday"): "--since: not a UTC day: use YYYY-MM-DD",
        ("--until", "2026-02-30"): "--until: not a UTC day",
        ("--project", "bad"): "--project: 'bad' is not a project: use owner/repo",
        ("--since", "2026-03-16", "--until", "2026-03-15"): "--since 2026-03-16 is after",
    }
    for args, message in mistakes.items():
        result = await asyncio.to_thread(cli, "replay", *args, env=env)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr
    nothing = await asyncio.to_thread(cli, "replay", "--project", "o/r", env=env)
    assert nothing.returncode == 1, nothing.stderr
    assert "nothing matched: no archive object under task-tracking/o/r" in nothing.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # as replay does (before, `list nope` printed "no executions for nope", exit 0)
        (("list", "nope"), "'nope' is not a project: use owner/repo"),
        (("watch", "nope"), "'nope' is not a project: use owner/repo"),
        (("watch", "--count", "0"), "--count: '0' is not a positive whole number"),  # ran on
        (("watch", "--api", "localhost:9471"), "--api: 'localhost:9471' is not an http://"),
    ],
)
async def test_list_and_watch_refuse_what_they_cannot_follow(
    redis_url: str, args: tuple[str, ...], message: str
) -> None:
    result = await asyncio.to_thread(cli, *args, env=plain_env(redis_url=redis_url))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


@pytest.mark.parametrize(
    ("command", "settings", "message"),
    [
        ("run", {"http_port": "TAKEN"}, "TASK_TRACKING_HTTP_PORT: the port is in use"),
        # the read API's port, taken: run used to hang here, ignoring SIGTERM
        (
            "run",
            {"api_enabled": "true", "api_port": "TAKEN"},
            "TASK_TRACKING_API_PORT: the port is in use",
        ),
        ("api", {"api_port": "TAKEN"}, "TASK_TRACKING_API_PORT: the port is in use"),
        ("run", {"http_host": "not-a-host"}, "TASK_TRACKING_HTTP_HOST: cannot listen on"),
    ],
)
async def test_a_port_or_host_it_cannot_listen_on_is_one_line_and_exit_2(
    redis_url: str, command: str, settings: dict[str, str], message: str
) -> None:
    with socket.create_server(("0.0.0.0", 0)) as taken:
        port = str(taken.getsockname()[1])
        values = {"http_port": "0", "log_level": "warning"}
        values |= {k: port if v == "TAKEN" else v for k, v in settings.items()}
        env = plain_env(redis_url=redis_url, **values)
        result = await asyncio.to_thread(cli, command, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"task-tracking: {message}"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


async def test_list_into_a_closed_pipe_exits_quietly(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    async with redis_client.pipeline(transaction=False) as pipe:
        for i in range(3000):  # more than a pipe buffer holds (64 KiB)
            pipe.hset(f"task-tracking:execution:e{i}", mapping={"taskName": "t" * 20})
            pipe.zadd("task-tracking:project:o/r:executions", {f"e{i}": i})
        await pipe.execute()
    script = (
        f"{sys.executable} -m sidecar list o/r --limit 3000 2>{tmp_path}/err | head -n 1;"
        f" echo ${{PIPESTATUS[0]}} >{tmp_path}/code"
    )
    env = plain_env(redis_url=redis_url)
    result = await asyncio.to_thread(
        subprocess.run, ["bash", "-c", script], env=env, capture_output=True, text=True
    )
    assert result.stdout.startswith("EXECUTION")
    assert (tmp_path / "err").read_text() == ""
    assert (tmp_path / "code").read_text().strip() == "141"


async def test_emit_stdin_publishes_json_lines_and_counts(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    good = '{"executionId": "s1", "taskName": "t", "project": "o/r", "status": "success"}'
    lines = f"{good}\n\nnot json\n{good.replace('o/r', '../x')}\n{good}\n"
    result = await asyncio.to_thread(
        cli, "emit", "--stdin", env=plain_env(redis_url=redis_url), stdin=lines
    )
    assert result.returncode == 1
    assert result.stdout == "published 2 events, 2 refused\n"
    assert "line 3: invalid event: not JSON" in result.stderr
    assert "line 4: invalid event: project" in result.stderr
    assert await redis_client.xlen(STREAM) == 2


async def test_version_and_help_text_on_every_option() -> None:
    env = plain_env()
    for args in (["--version"], ["version"]):
        result = await asyncio.to_thread(cli, *args, env=env)
        assert result.returncode == 0 and result.stdout.startswith("task-tracking 0."), result
    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in commands.choices.items():
        for action in command._actions:
            assert action.help, f"task-tracking {name} {action.dest}: no help text"
