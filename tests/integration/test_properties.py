"""Property-based tests (hypothesis): parsing never raises, and the projection is a function
of the set of events, whatever their order and duplication."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import orjson
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.events import EVENT_FIELD, InvalidEntry, ValidEvent, decode_entry
from sidecar.metrics import Metrics
from sidecar.projector import RedisTaskStatusProjector
from tests.helpers import ADDED_MS, expected_projection

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
FIELDS = ["eventId", "executionId", "taskName", "status", "project", "occurredAt", "actor"]
near_events = st.fixed_dictionaries(
    {},
    optional={
        "eventId": st.text(max_size=5) | json_values,
        "executionId": st.text(max_size=5) | st.integers(),
        "taskName": st.text(max_size=5),
        "status": st.sampled_from(["in_progress", "success", "error", "done", ""]) | json_values,
        "project": st.sampled_from(["a/b", "../x", "org/..", "o/.", "-x/y", "a/b/c"])
        | st.text(max_size=12),
        "occurredAt": st.integers(min_value=-(2**70), max_value=2**70)
        | st.sampled_from(["2026-03-15T10:00:00Z", "2026-03-15T10:00:00", "x", "", "9999-99-99"])
        | st.text(max_size=30)
        | json_values,
        "actor": json_values | st.fixed_dictionaries({"provider": st.text(), "id": st.text()}),
        "prLinks": json_values,
        "visibility": json_values,
    },
)


def _dumps(value: Any) -> bytes:
    # the stdlib writes integers of any size, as a careless publisher could
    return json.dumps(value).encode()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200) | near_events.map(_dumps) | json_values.map(_dumps))
def test_decoding_never_raises_and_always_decides(raw: bytes) -> None:
    decoded = decode_entry(f"{ADDED_MS}-0", {EVENT_FIELD: raw})
    assert isinstance(decoded, ValidEvent | InvalidEntry)
    if isinstance(decoded, InvalidEntry):
        assert decoded.reason and "\n" not in decoded.reason


def _event(execution: int, millis: int, status: str, event_id: int) -> dict[str, Any]:
    return {
        "eventId": f"e{event_id}",
        "executionId": f"x{execution}",
        "taskName": "t",
        "status": status,
        "project": "o/r",
        "occurredAt": 1_700_000_000_000 + millis,
    }


events_sets = st.lists(
    st.builds(
        _event,
        st.integers(0, 3),
        st.integers(0, 3),
        st.sampled_from(["in_progress", "success", "error"]),
        st.integers(0, 40),
    ),
    min_size=1,
    max_size=25,
    unique_by=lambda e: e["eventId"],
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(events=events_sets, data=st.data())
def test_any_permutation_duplication_and_batching_gives_the_same_projection(
    redis_url: str, events: list[dict[str, Any]], data: st.DataObject
) -> None:
    deliveries = data.draw(st.permutations(events + data.draw(st.lists(st.sampled_from(events)))))
    batch = data.draw(st.integers(1, 7))
    asyncio.run(_check(redis_url, deliveries, batch))


async def _check(redis_url: str, deliveries: list[dict[str, Any]], batch: int) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.flushall()
        projector = RedisTaskStatusProjector(client, Metrics(), group="property")
        decoded = []
        for n, data in enumerate(deliveries):
            event = decode_entry(f"{ADDED_MS + n + 1}-0", {EVENT_FIELD: orjson.dumps(data)})
            assert isinstance(event, ValidEvent)
            decoded.append(event)
        applied = 0
        for start in range(0, len(decoded), batch):
            applied += await projector.apply(decoded[start : start + batch])
        batched = await _snapshot(client)
        for execution_id, winner in expected_projection(deliveries).items():
            state = await client.hgetall(f"task-tracking:execution:{execution_id}")
            assert state[b"eventId"].decode() == winner["eventId"]
            score = await client.zscore("task-tracking:project:o/r:executions", execution_id)
            assert score == max(
                d["occurredAt"] for d in deliveries if d["executionId"] == execution_id
            )
        # A coalesced batch leaves what applying its events one at a time leaves, down to
        # the streamId, and counts the same events as applied.
        await client.flushall()
        # a fresh projector: one that wrote the projects index before the flush would
        # add each project again only a minute later (ProjectRegistry)
        projector = RedisTaskStatusProjector(client, Metrics(), group="property")
        one_by_one = 0
        for event in decoded:
            one_by_one += await projector.apply([event])
        assert await _snapshot(client) == batched
        assert applied == one_by_one
    finally:
        await client.aclose()


async def _snapshot(client: aioredis.Redis) -> dict[bytes, Any]:
    """Every projection key: a hash with whether it expires, an index with its scores."""
    state: dict[bytes, Any] = {}
    async for key in client.scan_iter("task-tracking:*"):
        kind = await client.type(key)
        if kind == b"stream":  # the changes feed: one entry per write, coalesced or not
            continue
        if kind == b"hash":
            state[key] = (await client.hgetall(key), await client.ttl(key) > 0)
        else:
            state[key] = await client.zrange(key, 0, -1, withscores=True)
    return state


def _rich_event(execution: int, millis: int, status: str, event_id: str, project: str) -> Any:
    return {
        "eventId": event_id,
        "executionId": f"x{execution}",
        "taskName": "t",
        "status": status,
        "project": project,
        "occurredAt": 1_700_000_000_000 + millis,
        "actor": {"provider": "github", "id": event_id},  # a non-string field (JSON)
    }


rich_events = st.builds(
    _rich_event,
    st.integers(0, 199),
    st.integers(0, 3),
    st.sampled_from(["in_progress", "success", "error"]),
    st.text(alphabet="aé\u00ff\U0001f600 z", min_size=1, max_size=3),  # byte-wise order
    st.sampled_from(["o/r", "o/s", "p/q"]),  # an execution may move between projects
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    prior=st.lists(rich_events, max_size=30),
    batch=st.lists(rich_events, min_size=100, max_size=500),
)
def test_a_large_batch_on_any_prior_state_equals_one_at_a_time(
    redis_url: str, prior: list[dict[str, Any]], batch: list[dict[str, Any]]
) -> None:
    """Many executions (several script calls), repeats, equal keys, unicode event IDs,
    executions in several projects, a finished-execution TTL, and whatever was stored."""
    asyncio.run(_check_large(redis_url, prior, batch))


async def _check_large(
    redis_url: str, prior: list[dict[str, Any]], batch: list[dict[str, Any]]
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        before = [_decoded(n, data) for n, data in enumerate(prior)]
        events = [_decoded(len(prior) + n, data) for n, data in enumerate(batch)]
        results = []
        for one_at_a_time in (False, True):
            await client.flushall()
            # fresh after the flush: see _check
            projector = RedisTaskStatusProjector(
                client, Metrics(), group="property", finished_ttl_seconds=1000
            )
            for event in before:
                await projector.apply([event])
            if one_at_a_time:
                applied = sum([await projector.apply([event]) for event in events])
            else:
                applied = await projector.apply(events)
            results.append((applied, await _snapshot(client)))
        assert results[0] == results[1]
    finally:
        await client.aclose()


def _decoded(n: int, data: dict[str, Any]) -> ValidEvent:
    event = decode_entry(f"{ADDED_MS + n + 1}-0", {EVENT_FIELD: orjson.dumps(data)})
    assert isinstance(event, ValidEvent)
    return event
