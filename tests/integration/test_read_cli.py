"""`status`, `list` and `watch` in the terminal: widths, escapes, times, JSON types."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from sidecar.cli import main as cli_main
from sidecar.read.render import width
from sidecar.read.terminal import watch
from tests.helpers import PROJECTOR, STREAM, event, group_done, publish, running_sidecar, wait_for

T0 = 1_773_568_800_000  # 2026-03-15T10:00:00.000Z


async def projected(redis_url: str, client: aioredis.Redis, events: list[dict[str, Any]]) -> None:
    await publish(client, STREAM, events)
    async with running_sidecar(redis_url):
        await wait_for(lambda: group_done(client, STREAM, PROJECTOR), message="projected")


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(cli_main, list(argv))
    return code, capsys.readouterr().out


async def test_list_aligns_wide_text_escapes_control_characters_and_says_what_is_cut(
    redis_url: str,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TASK_TRACKING_REDIS_URL", redis_url)
    events = [
        event("wide", "success", T0 + 3, taskName="デプロイ"),
        event("iso", "error", "2026-03-15T10:00:00.002Z", taskName="build"),
        event("plain", "in_progress", T0 + 1, taskName="deploy"),
        event("older", "success", T0),
    ]
    await projected(redis_url, redis_client, events)
    code, out = await run(capsys, "list", "my-org/my-repo", "--limit", "3")
    assert code == 0
    lines = out.splitlines()
    rows = lines[1:4]
    assert [row.split()[0] for row in rows] == ["wide", "iso", "plain"]
    # every column starts at the same display column on each line
    status_at = {
        width(line[: line.index(s)])
        for line, s in zip(rows, ("success", "error", "in_progress"), strict=True)
    }
    assert len(status_at) == 1, lines
    # one form of time whatever the publisher sent: ISO UTC from occurredAtMs, and the age
    assert "2026-03-15T10:00:00.003Z" in rows[0] and "2026-03-15T10:00:00.002Z" in rows[1]
    assert lines[-1] == "… 1 more, use --limit"


async def test_status_and_list_json_print_fields_in_their_json_types(
    redis_url: str,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TASK_TRACKING_REDIS_URL", redis_url)
    actor = {"provider": "slack", "id": "U1"}
    data = event("j", "success", T0, actor=actor, prLinks=[], flag=False, flow="a\x1b[31m\nb")
    await projected(redis_url, redis_client, [data])
    code, out = await run(capsys, "status", "j", "--json")
    state = orjson.loads(out)
    assert code == 0 and state["actor"] == {"provider": "slack", "id": "U1"}
    assert state["prLinks"] == [] and state["flag"] is False and state["occurredAtMs"] == T0
    code, out = await run(capsys, "list", "my-org/my-repo", "--json")
    assert orjson.loads(out) == [state]
    code, out = await run(capsys, "status", "j")
    assert "occurredAt    2026-03-15T10:00:00.000Z (" in out and " ago)" in out
    # control characters (an ANSI escape, a newline) are shown escaped, never sent raw
    assert "\x1b" not in out and "a\\x1b[31m\\nb" in out


async def test_watch_only_prints_a_line_per_change_from_redis_and_through_the_api(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with running_sidecar(redis_url, api_enabled=True, api_port=0) as sidecar:
        for name, api in (("r1", None), ("a1", f"http://127.0.0.1:{sidecar.api_port}")):
            out = io.StringIO()
            watching = asyncio.ensure_future(
                watch(
                    redis_url=redis_url,
                    api_url=api,
                    token=None,
                    project="org/w",
                    count=2,
                    rows=0,  # --watch-only
                    out=out,
                )
            )
            # the header is printed once it follows the changes
            await wait_for(lambda: "EXECUTION" in out.getvalue(), message="the header")  # noqa: B023
            # one batch holding both events would be one change (coalesced): two batches
            await publish(redis_client, STREAM, [event(name, "in_progress", T0, project="org/w")])
            await wait_for(lambda: "in_progress" in out.getvalue(), message="the first change")  # noqa: B023
            await publish(
                redis_client,
                STREAM,
                [event("x", "success", T0, project="org/other"),
                 event(name, "success", T0 + 1, project="org/w")],
            )  # fmt: skip
            await asyncio.wait_for(watching, 20)
            lines = out.getvalue().splitlines()
            assert lines[0].split()[:3] == ["EXECUTION", "TASK", "STATUS"], api
            assert [line.split()[2] for line in lines[1:]] == ["in_progress", "success"], api
            assert all(line.split()[0] == name for line in lines[1:]), api


async def test_watch_lists_the_newest_rows_first_then_follows_without_repeating_them(
    redis_url: str, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `kubectl get -w`: the rows, then the changes after them. The feed is resumed
    from its position before the rows were read, so the changes the rows already show
    come again: here from the feed's start (position 0-0), where `old` went from
    in_progress to success and `new` from in_progress to success once per run before;
    none of them is printed again."""
    async with running_sidecar(redis_url, api_enabled=True, api_port=0) as sidecar:
        await publish(redis_client, STREAM, [event("old", "in_progress", T0, project="org/l")])
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR), message="batch 1")
        await publish(
            redis_client,
            STREAM,
            [event("old", "success", T0 + 1, project="org/l"),
             event("new", "in_progress", T0 + 2, project="org/l"),
             event("elsewhere", "success", T0 + 3, project="org/other")],
        )  # fmt: skip
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR), message="batch 2")
        for module in ("projection", "terminal", "app"):  # each imported it
            monkeypatch.setattr(f"sidecar.read.{module}.changes_position", _feed_start)
        api = f"http://127.0.0.1:{sidecar.api_port}"
        for number, (source, project) in enumerate(
            [(None, "org/l"), (api, "org/l"), (None, None), (api, None)]
        ):
            out = io.StringIO()
            watching = asyncio.ensure_future(
                watch(
                    redis_url=redis_url,
                    api_url=source,
                    token=None,
                    project=project,
                    count=1,
                    rows=3,
                    out=out,
                )
            )
            await wait_for(lambda: "EXECUTION" in out.getvalue(), message="the rows")  # noqa: B023
            await publish(redis_client, STREAM, [event("new", "success", T0 + 10 + number,
                                                       project="org/l")])  # fmt: skip
            await asyncio.wait_for(watching, 20)
            lines = [line.split() for line in out.getvalue().splitlines()]
            new = ["new", "in_progress" if number == 0 else "success"]  # then each success
            rows = [["old", "success"], ["elsewhere", "success"], new]
            expected_rows = [row for row in rows if project is None or row[0] != "elsewhere"]
            assert lines[0][:3] == ["EXECUTION", "TASK", "STATUS"], (source, project)
            # the newest, the oldest of them first; then only the change made after them
            assert [[row[0], row[2]] for row in lines[1:]] == [
                *expected_rows,
                ["new", "success"],
            ], (
                source,
                project,
            )


async def _feed_start(redis: Any) -> str:
    return "0-0"
