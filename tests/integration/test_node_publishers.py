"""What the application's TypeScript services send, through their real clients.

`tests/node/publish.mjs` runs on Node with ioredis 5 and 6 and node-redis 4 and 6 (the
versions in `tests/node/package-lock.json`, installed by `npm ci` on first use) and
publishes, into a running `task-tracking run`, the events a service's emit() builds: Date
objects and Date.now() for `occurredAt`, optional fields undefined or null, nested
metadata, emoji, unknown fields, Buffer values, pipelines and MULTI, pretty-printed JSON;
then the mistakes a service makes (epoch seconds, an invalid Date, an unknown status, a
missing field, a 2 MiB event, a message cut short, no `event` field). Every valid event is
projected by the ordering rule and archived exactly once; every mistake is dead-lettered
once with its reason; nothing stays pending.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.helpers import (
    DEAD_LETTER,
    STREAM,
    SidecarProcess,
    archive_line,
    archive_objects_folder,
    both_groups_done,
    check_exactly_once,
    expected_projection,
    folder_archive_env,
    projection,
)

NODE_PROJECT = Path(__file__).parents[1] / "node"
INSTALL_HINT = "install Debian's nodejs and npm (.ci/run does)"


def node_publisher() -> list[str]:
    """The command that runs publish.mjs, its packages installed from the lock file."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(f"`node` and `npm` must be on PATH: {INSTALL_HINT}", pytrace=False)
    installed = NODE_PROJECT / "node_modules" / ".package-lock.json"
    lock = NODE_PROJECT / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_PROJECT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            pytest.fail(f"npm ci in {NODE_PROJECT} failed:\n{result.stderr}", pytrace=False)
    return [node, str(NODE_PROJECT / "publish.mjs")]


async def test_events_from_ioredis_and_node_redis_are_projected_archived_or_dead_lettered(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    command = node_publisher()
    folder = tmp_path / "archive"
    process = SidecarProcess(folder_archive_env(redis_url, folder), tmp_path / "sidecar.log")
    process.start()
    try:
        # Published while the sidecar runs, as a service does.
        published = subprocess.run(
            [*command, redis_url, STREAM, "400"], capture_output=True, text=True, timeout=120
        )
        assert published.returncode == 0, published.stderr
        sent = [json.loads(line) for line in published.stdout.splitlines()]
        await both_groups_done(redis_client, 60)
        assert process.running(), process.log()
        assert process.terminate() == 0, process.log()
    finally:
        process.kill()

    valid = [entry for entry in sent if entry["verdict"] == "valid"]
    refused = {entry["id"]: entry["word"] for entry in sent if entry["verdict"] == "invalid"}
    assert len(valid) == 1200 and len(refused) == 7  # 400 executions of 3 events; 7 mistakes
    assert await redis_client.xlen(STREAM) == len(sent)

    events = [json.loads(entry["text"]) for entry in valid]
    expected = expected_projection(events)
    state = await projection(redis_client, expected)
    wrong = {k: state[k] for k, v in expected.items() if state[k].get("eventId") != v["eventId"]}
    assert not wrong, list(wrong.items())[:3]
    # What a reader gets back: the strings as sent, the rest as JSON (null included).
    first = state["node-0"]
    assert json.loads(first["actor"]) == {"provider": "github", "login": "zoë", "id": 4242}
    assert json.loads(first["visibility"]) is None
    assert json.loads(first["flow"]) == {"step": 2, "labels": ["ci", "🚀"]}
    assert (first["taskName"], first["status"]) == ("run-tests", "error")
    assert first["durationMs"] == "1234.5"

    dead = await redis_client.xrange(DEAD_LETTER)
    reasons = {fields[b"sourceId"].decode(): fields[b"error"].decode() for _, fields in dead}
    assert len(dead) == len(reasons) == len(refused), "each mistake dead-lettered once"
    for entry_id, word in refused.items():
        assert word in reasons[entry_id], (word, reasons[entry_id])

    check_exactly_once(  # asserts nothing missing, nothing twice
        archive_objects_folder(folder), [archive_line(entry["text"]) for entry in valid]
    )
