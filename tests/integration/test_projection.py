"""The projector against a real server: the ordering rule, the hash layout, dead letters."""

from __future__ import annotations

import random

import orjson
import redis.asyncio as aioredis

from sidecar.batches import DECODE_SLICE
from sidecar.connections import connect
from sidecar.events import EVENT_FIELD, ValidEvent, decode_entry
from sidecar.metrics import Metrics
from sidecar.projector import CALL_SIZE, MAX_IN_FLIGHT, RedisTaskStatusProjector
from tests.helpers import (
    ADDED_MS,
    PROJECTOR,
    STREAM,
    event,
    expected_projection,
    group_done,
    projection,
    publish,
    running_sidecar,
    wait_for,
)

T0 = 1_700_000_000_000


async def project(redis_url: str, client: aioredis.Redis, events: list, **settings) -> None:
    await publish(client, STREAM, events)
    async with running_sidecar(redis_url, **settings):
        await wait_for(lambda: group_done(client, STREAM, PROJECTOR), message="projector done")


async def test_every_ordering_case_ends_in_the_state_the_ordering_key_demands(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    t = 1_700_000_000_000
    started = event("late", "in_progress", t)
    finished = event("late", "success", t + 10)
    same_ms_a = [event("same-a", "success", t), event("same-a", "in_progress", t)]
    same_ms_b = [event("same-b", "in_progress", t), event("same-b", "error", t)]
    iso_vs_ms = [
        event("iso", "in_progress", "2023-11-14T22:13:20.000Z"),
        event("iso", "success", t + 1),
        event("iso2", "success", t),
        event("iso2", "in_progress", "2023-11-14T22:13:20.001Z"),
    ]
    unknown = event("unknown", "success", t, customField={"a": [1]}, flow="release")
    events = [finished, started, *same_ms_a, *same_ms_b, *iso_vs_ms, unknown, finished, started]
    await project(redis_url, redis_client, events)

    state = await projection(redis_client, ["late", "same-a", "same-b", "iso", "iso2", "unknown"])
    assert state["late"]["status"] == "success"
    assert state["late"]["eventId"] == finished["eventId"]
    assert state["same-a"]["status"] == "success"
    assert state["same-b"]["status"] == "error"
    assert state["iso"]["status"] == "success"
    assert state["iso2"]["status"] == "in_progress"  # 1 ms later beats a terminal status
    assert state["unknown"]["customField"] == '{"a":[1]}'
    assert state["unknown"]["flow"] == "release"
    assert state["unknown"]["occurredAtMs"] == str(t)
    assert state["iso"]["occurredAt"] == str(t + 1)  # non-strings are JSON-encoded


async def test_hash_holds_every_top_level_field_plus_ms_and_stream_id(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    data = event(
        "fields",
        "success",
        "2026-03-15T10:00:00.000Z",
        actor={"provider": "github", "id": "42", "login": "octo"},
        prLinks=["https://github.com/o/r/pull/1"],
        visibility={"responsibleUsers": ["ann"]},
    )
    [entry_id] = await publish(redis_client, STREAM, [data])
    await project(redis_url, redis_client, [])
    state = (await projection(redis_client, ["fields"]))["fields"]
    assert state["occurredAt"] == "2026-03-15T10:00:00.000Z"
    assert orjson.loads(state["actor"]) == data["actor"]
    assert orjson.loads(state["prLinks"]) == data["prLinks"]
    assert state["streamId"] == entry_id
    assert state["occurredAtMs"] == "1773568800000"
    score = await redis_client.zscore("task-tracking:project:my-org/my-repo:executions", "fields")
    assert score == 1773568800000


async def test_older_event_does_not_lower_the_project_index_score(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    await project(
        redis_url,
        redis_client,
        [event("x", "success", T0 + 2000), event("x", "in_progress", T0 + 1000)],
    )
    score = await redis_client.zscore("task-tracking:project:my-org/my-repo:executions", "x")
    assert score == T0 + 2000


async def test_thousands_of_shuffled_duplicated_events_give_the_ordering_key_state(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    rng = random.Random(7)
    events = []
    for n in range(400):
        t = 1_700_000_000_000 + rng.randrange(50) * 1000
        events.append(event(f"e{n}", "in_progress", t, project=f"org{n % 5}/repo"))
        events.append(event(f"e{n}", rng.choice(["success", "error"]), t + rng.choice([0, 0, 5])))
        if n % 3 == 0:
            events.append(event(f"e{n}", "in_progress", t - 1))
    events += rng.sample(events, 500)  # duplicate deliveries
    rng.shuffle(events)
    await project(redis_url, redis_client, events, redis_batch_size=97)
    expected = expected_projection(events)
    state = await projection(redis_client, expected)
    for execution_id, winner in expected.items():
        assert state[execution_id]["eventId"] == winner["eventId"], execution_id


INVALID_ENTRIES = [
    b"not json",
    b'"a string"',
    orjson.dumps({k: v for k, v in event().items() if k != "taskName"}),
    orjson.dumps(event(status="finished")),
    orjson.dumps(event(project="../x")),
    orjson.dumps(event(project="org/..")),
    orjson.dumps(event(occurred_at="2026-03-15T10:00:00")),
    ((b"payload", b"no event field"),),
]


async def test_every_invalid_kind_lands_once_in_the_dead_letter_stream(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    ids = await publish(redis_client, STREAM, [*INVALID_ENTRIES, event("ok", "success")])
    await project(redis_url, redis_client, [], s3_archive_enabled=False)
    # A second run (a restart) must not dead-letter anything again.
    await project(redis_url, redis_client, [])
    dead = await redis_client.xrange(f"{STREAM}:dead-letter")
    assert [entry[1][b"sourceId"].decode() for entry in dead] == ids[:-1]
    for (_, fields), raw in zip(dead, INVALID_ENTRIES, strict=True):
        assert fields[b"group"] == PROJECTOR.encode()
        assert fields[b"error"]
        if isinstance(raw, bytes):
            assert fields[b"event"] == raw
        else:
            assert b"event" not in fields
    assert (await projection(redis_client, ["ok"]))["ok"]["status"] == "success"


async def test_a_batch_of_several_decode_slices_and_calls_keeps_order_and_indexes(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    # A batch read ahead is decoded in slices and applied in several script calls, each
    # with its own executions' index entries: invalid entries on the slices' edges are
    # dead-lettered in stream order, and every index ends at each execution's greatest
    # occurredAt, also for an execution that moved project within the batch.
    size = 3 * DECODE_SLICE + 7
    assert size > 2 * CALL_SIZE
    entries: list = []
    for n in range(size):
        if n in (0, DECODE_SLICE - 1, DECODE_SLICE, size - 1):
            entries.append(b"not json")
        else:
            when = 1_700_000_000_000 + n
            entries.append(event(f"e{n % 80}", "in_progress", when, project=f"org/r{n % 7}"))
    ids = await publish(redis_client, STREAM, entries)
    await project(redis_url, redis_client, [], redis_batch_size=size)
    dead = await redis_client.xrange(f"{STREAM}:dead-letter")
    invalid = [ids[n] for n, entry in enumerate(entries) if isinstance(entry, bytes)]
    assert [fields[b"sourceId"].decode() for _, fields in dead] == invalid
    valid = [entry for entry in entries if isinstance(entry, dict)]
    expected = expected_projection(valid)
    state = await projection(redis_client, expected)
    assert {k: v["eventId"] for k, v in state.items()} == {
        k: v["eventId"] for k, v in expected.items()
    }
    scores: dict[str, dict[str, float]] = {}
    for data in valid:  # ZADD GT: every project an execution was in, its greatest time there
        index = scores.setdefault(f"task-tracking:project:{data['project']}:executions", {})
        index[data["executionId"]] = max(index.get(data["executionId"], 0), data["occurredAt"])
    for key, members in scores.items():
        assert dict(await redis_client.zrange(key, 0, -1, withscores=True)) == {
            member.encode(): score for member, score in members.items()
        }


async def test_a_backlog_batch_leaves_its_last_calls_out_and_a_later_flush_hands_them_back(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    # Flushing a batch of several calls returns once they are sent: the entries of calls
    # still out come back from a later flush, each exactly once; executions recur across
    # batches, and state and applied count are those of applying one event at a time.
    rng = random.Random(3)
    data = [
        event(
            f"x{rng.randrange(150)}",
            rng.choice(["in_progress", "success", "error"]),
            1_700_000_000_000 + rng.randrange(40),
            project=f"o/r{rng.randrange(3)}",
        )
        for _ in range(1200)
    ]
    events = []
    for n, item in enumerate(data):
        decoded = decode_entry(f"{ADDED_MS + n + 1}-0", {EVENT_FIELD: orjson.dumps(item)})
        assert isinstance(decoded, ValidEvent)
        events.append(decoded)
    client = connect(redis_url)
    metrics = Metrics()
    projector = RedisTaskStatusProjector(client, metrics, group=PROJECTOR)
    handed_back: list[str] = []
    for start in range(0, len(events), 300):
        projector.add(events[start : start + 300])
        ids = (await projector.flush(force=False)).durable_ids
        assert len(ids) < start + 300 - len(handed_back)  # its last call is still out
        assert len(projector.in_flight) <= MAX_IN_FLIGHT  # and no more calls than may be out
        handed_back += ids
    handed_back += (await projector.flush(force=False)).durable_ids  # nothing new: the rest
    assert projector.seconds_until_due() is None
    assert sorted(handed_back) == sorted(event.entry_id for event in events)
    applied = metrics.registry.get_sample_value(
        "task_tracking_events_applied_total", {"group": PROJECTOR}
    )
    executions = sorted({item["executionId"] for item in data})
    streamed = await projection(redis_client, executions)
    await redis_client.flushall()
    one_by_one = sum([await projector.apply([event]) for event in events])
    assert await projection(redis_client, executions) == streamed
    assert applied == one_by_one
    await client.aclose()
