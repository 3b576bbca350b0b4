"""The ingest boundary, end to end: `task-tracking run` drains a stream holding what
TypeScript publishers send (the Node fixture), hostile entries (a 20 MiB event, ten
5 MiB events, duplicate `event` fields, far-future and epoch-seconds timestamps, huge
and control-character identifiers) and a few thousand ordinary events, published as
raw bytes. Every ordinary and valid-by-intent execution ends in the state the ordering
rule demands, every refused entry is dead-lettered once with its reason, nothing stays
pending, the process never restarts, its peak RSS stays under the chart's 256 MiB
limit, and the archive holds every valid event exactly once.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from tests.helpers import (
    DEAD_LETTER,
    STREAM,
    SidecarProcess,
    archive_line,
    archive_objects_folder,
    both_groups_done,
    check_exactly_once,
    event,
    expected_projection,
    folder_archive_env,
    projection,
)

FIXTURE = Path(__file__).parents[1] / "data" / "node_json_stringify.json"
MEMORY_LIMIT = 256 * 1024 * 1024  # the chart's default limit for the sidecar container
NOW_MS = 1_773_568_800_000  # 2026-03-15, before any entry the test adds


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


async def test_a_hostile_stream_is_drained_within_the_memory_limit_nothing_lost(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    rng = random.Random(14)
    valid: list[dict[str, Any]] = []  # decoded as JSON.parse would, for the ordering rule
    archive_lines: list[bytes] = []
    refused: dict[str, str] = {}  # entry ID -> a word the dead-letter reason must hold

    async def add(*fields: bytes | str, verdict: str, data: Any = None, word: str = "") -> None:
        entry_id = (await redis_client.execute_command("XADD", STREAM, "*", *fields)).decode()
        if verdict == "valid":
            valid.append(data)
            text = fields[1]
            archive_lines.append(archive_line(text if isinstance(text, str) else text.decode()))
        else:
            refused[entry_id] = word

    async def ordinary(count: int, offset: int) -> None:
        for n in range(count):
            data = event(
                f"ord-{rng.randrange(1500)}",
                rng.choice(["in_progress", "success", "error"]),
                NOW_MS + offset + rng.randrange(100_000),
                project=f"org{rng.randrange(5)}/repo",
                actor={"provider": "github", "id": rng.randrange(10**6)},
                prLinks=[f"https://github.com/org/repo/pull/{n}"],
            )
            await add("event", orjson.dumps(data), verdict="valid", data=data)

    await ordinary(1500, 0)
    for case in json.loads(FIXTURE.read_text())["cases"]:
        text = case["text"]
        await add("event", text, verdict=case["verdict"], data=json.loads(text), word="")
    # Hostile entries among the ordinary ones.
    huge = orjson.dumps(event("huge", "success", NOW_MS, blob="x" * (20 * 1024 * 1024)))
    await add("event", huge, verdict="invalid", word="TASK_TRACKING_MAX_EVENT_BYTES")
    for n in range(10):
        big = orjson.dumps(event(f"big{n}", "success", NOW_MS, blob="y" * (5 * 1024 * 1024)))
        await add("event", big, verdict="invalid", word="TASK_TRACKING_MAX_EVENT_BYTES")
    twice_a, twice_b = event("twice", "success", NOW_MS), event("twice", "error", NOW_MS + 1)
    await add(
        "event", orjson.dumps(twice_a), "event", orjson.dumps(twice_b), verdict="invalid",
        word="2 'event' fields",
    )  # fmt: skip
    await add("event", orjson.dumps(event("x" * 1_000_000)), verdict="invalid", word="512 bytes")
    for bad_id in ("a*b\n", "nul\x00", "star*"):
        data = event(bad_id, "success", NOW_MS)
        verdict = "valid" if bad_id == "star*" else "invalid"
        await add("event", orjson.dumps(data), verdict=verdict, data=data, word="control")
    # Far-future and epoch-seconds events, then a normal event of the same execution wins.
    future = event("frozen", "success", "9999-12-31T23:59:59Z")
    await add("event", orjson.dumps(future), verdict="invalid", word="MAX_FUTURE_SECONDS")
    seconds = event("seconds", "success", NOW_MS // 1000)
    await add("event", orjson.dumps(seconds), verdict="invalid", word="epoch seconds")
    for execution in ("frozen", "seconds"):
        later = event(execution, "in_progress", NOW_MS)
        await add("event", orjson.dumps(later), verdict="valid", data=later)
    await add("other", "no event field here", verdict="invalid", word="no 'event' field")
    await ordinary(1500, 200_000)

    folder = tmp_path / "archive"
    process = SidecarProcess(folder_archive_env(redis_url, folder), tmp_path / "sidecar.log")
    process.start()
    assert process.process is not None
    try:
        await both_groups_done(redis_client, 120)
        peak = _peak_rss(process.process.pid)
        assert process.running(), process.log()  # never restarted, never killed
        assert process.terminate() == 0, process.log()
    finally:
        process.kill()

    assert peak < MEMORY_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB"
    expected = expected_projection(valid)
    state = await projection(redis_client, expected)
    wrong = {
        k: state[k].get("eventId")
        for k, v in expected.items()
        if state[k].get("eventId") != v["eventId"]
    }
    assert not wrong, wrong
    for execution in ("frozen", "seconds"):
        assert state[execution]["status"] == "in_progress"
    dead = await redis_client.xrange(DEAD_LETTER)
    by_source = {fields[b"sourceId"].decode(): fields for _, fields in dead}
    assert len(dead) == len(refused) == len(by_source), "each refused entry once"
    for entry_id, word in refused.items():
        fields = by_source[entry_id]
        assert word.encode() in fields[b"error"], (word, fields[b"error"])
        assert len(fields.get(b"event", b"")) <= 64 * 1024  # bounded, never the payload
    archive = check_exactly_once(archive_objects_folder(folder), archive_lines)
    print(
        f"\ningest figures: valid={len(valid)} refused={len(refused)}"
        f" peak_rss={peak / 2**20:.0f}MiB objects={archive['objects']}"
        f" lost={archive['missing']} duplicated={archive['duplicated']}"
    )
