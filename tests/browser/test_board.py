"""The live board in a real browser (headless Chromium over CDP): snapshot, live updates,
filters, and the resume after a dropped connection."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from sidecar.devserver import free_port
from sidecar.read.app import start_api
from tests.browser.cdp import Browser
from tests.helpers import PROJECTOR, STREAM, event, group_done, publish, running_sidecar, wait_for

T0 = 1_700_000_000_000


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    opened = await Browser(tmp_path / "chromium").start()
    yield opened
    await opened.close()


async def row_states(browser: Browser) -> dict[str, str]:
    rows = await browser.evaluate(
        "JSON.stringify([...document.querySelectorAll('#rows tr')]"
        ".map(r => [r.dataset.executionId, r.dataset.status]))"
    )
    return dict(json.loads(rows))


async def shows(browser: Browser, expected: dict[str, str], what: str) -> None:
    async def matches() -> bool:
        states = await row_states(browser)
        return all(states.get(k) == v for k, v in expected.items())

    await wait_for(matches, timeout=30, message=f"the board showing {what}")


async def test_board_shows_executions_live_filters_and_resumes_after_a_drop(
    redis_url: str, redis_client: aioredis.Redis, browser: Browser, tmp_path: Path
) -> None:
    users = {"responsibleUsers": ["ann", "デプロイ担当"]}
    await publish(
        redis_client,
        STREAM,
        [
            event("b1", "in_progress", T0, taskName="deploy", visibility=users,
                  actor={"provider": "github", "id": "1", "login": "octo"},
                  prLinks=["https://github.com/my-org/my-repo/pull/7"]),
            event("b2", "success", T0 + 1, project="org/other", taskName="<b>build</b>"),
        ],
    )  # fmt: skip
    port = free_port()
    async with running_sidecar(redis_url):  # the projector; the API runs apart below
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR), message="projected")
        runner, _ = await start_api(redis_url, "127.0.0.1", port, token="board-token")
        try:
            await browser.navigate(f"http://127.0.0.1:{port}/?token=board-token")
            await shows(browser, {"b1": "in_progress", "b2": "success"}, "the snapshot")
            text = await browser.evaluate("document.body.innerText")
            assert "octo" in text and "デプロイ担当" in text and "pull/7" in text
            assert "<b>build</b>" in text  # shown as text, not markup
            await wait_for(
                lambda: browser.evaluate("document.getElementById('live').textContent == 'live'"),
                message="the board connected to the changes",
            )
            await publish(
                redis_client, STREAM, [event("b1", "success", T0 + 5), event("b3", "error", T0 + 6)]
            )
            await shows(browser, {"b1": "success", "b3": "error"}, "the live changes")
            await browser.screenshot(tmp_path / "board-live.png")
            # the status filter
            await browser.evaluate(
                "(() => { const s = document.getElementById('status'); s.value = 'error';"
                " s.onchange(); })()"
            )
            assert await row_states(browser) == {"b3": "error"}
            await browser.evaluate(
                "(() => { const s = document.getElementById('status'); s.value = '';"
                " s.onchange(); })()"
            )
        finally:
            await runner.cleanup()  # the connection drops
        await wait_for(
            lambda: browser.evaluate("document.getElementById('live').textContent != 'live'"),
            message="the board noticing the drop",
        )
        await publish(
            redis_client,
            STREAM,
            [event("b3", "success", T0 + 9), event("b4", "in_progress", T0 + 9)],
        )
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR), message="projected")
        runner, _ = await start_api(redis_url, "127.0.0.1", port, token="board-token")
        try:
            await shows(browser, {"b3": "success", "b4": "in_progress"}, "what it missed")
            chips = await browser.evaluate(
                "[...document.querySelectorAll('#projects .project')].map(c => c.textContent)"
            )
            assert [chip.split(" ·")[0] for chip in chips] == ["my-org/my-repo3", "org/other1"]
            await browser.screenshot(tmp_path / "board-resumed.png")
        finally:
            await runner.cleanup()
    assert (tmp_path / "board-live.png").stat().st_size > 10_000
