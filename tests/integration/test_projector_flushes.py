"""Property (hypothesis): any sequence of overlapping flushes, with refusals and lost
connections on the way, ends where applying one event at a time ends: the same projection,
the same applied and stale counts, every entry acknowledged exactly once and every refused
one handed back for dead-lettering."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any
from unittest import mock

import orjson
import redis.asyncio as aioredis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from sidecar import projector as projector_module
from sidecar.events import EVENT_FIELD, ValidEvent, decode_entry
from sidecar.metrics import Metrics
from sidecar.projector import RedisTaskStatusProjector
from tests.helpers import ADDED_MS
from tests.integration.test_properties import _snapshot

GROUP = "property"
POISONED = "x0"  # Redis refuses every call holding this execution


class FaultyRedis(aioredis.Redis):
    """A real client whose script calls fail on cue: refused when they hold the poisoned
    execution (before anything is written, like WRONGTYPE on the first key), and, while
    `faults` is set, per call in turn: `lost` before it is sent, `reply lost` after
    Redis applied it. A failure takes a round trip, as a real one does, so that other
    calls out overtake the failing one unless they wait for it."""

    faults: list[str]
    calls = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if args[0] == "EVALSHA":
            keys = args[3 : 3 + args[2]]
            if f"task-tracking:execution:{POISONED}" in keys:
                await super().execute_command("PING")
                raise ResponseError("WRONGTYPE injected: a key of another type")
            if self.faults:
                fault = self.faults[self.calls % len(self.faults)]
                self.calls += 1
                if fault == "lost":
                    await super().execute_command("PING")
                    raise RedisConnectionError("injected: lost before it was sent")
                if fault == "reply lost":
                    await super().execute_command(*args, **options)
                    raise RedisConnectionError("injected: the reply was lost")
        return await super().execute_command(*args, **options)


def _event(execution: int, millis: int, status: str, event_id: int) -> dict[str, Any]:
    return {
        "eventId": f"e{event_id}",
        "executionId": f"x{execution}",
        "taskName": "t",
        "status": status,
        "project": f"o/r{execution % 3}",
        "occurredAt": 1_700_000_000_000 + millis,
    }


event_lists = st.lists(
    st.builds(
        _event,
        st.integers(0, 7),
        st.integers(0, 5),
        st.sampled_from(["in_progress", "success", "error"]),
        st.integers(0, 10_000),
    ),
    min_size=1,
    max_size=80,
    unique_by=lambda e: e["eventId"],
)
# ("add", n): the next n events reach the projector; ("flush", force)
operations = st.lists(
    st.tuples(st.just("add"), st.integers(0, 30)) | st.tuples(st.just("flush"), st.booleans()),
    max_size=25,
)
fault_cycles = st.lists(st.sampled_from(["ok", "ok", "lost", "reply lost"]), max_size=8)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(events=event_lists, steps=operations, faults=fault_cycles)
# A refused call applied again event by event while the next flush's call holds one of its
# executions (the later call must wait); the same with the first call lost instead.
@example(
    events=[_event(n, 0, "in_progress", n) for n in range(4)] + [_event(3, 1, "success", 9)],
    steps=[("add", 4), ("flush", False)],
    faults=[],
)
@example(
    events=[_event(n, 0, "in_progress", n) for n in range(1, 5)] + [_event(1, 1, "success", 9)],
    steps=[("add", 4), ("flush", False), ("add", 1), ("flush", False)],
    faults=["lost", "ok", "ok"],
)
def test_overlapping_flushes_with_refusals_and_lost_calls_equal_one_at_a_time(
    redis_url: str, events: list[dict[str, Any]], steps: list[tuple[str, Any]], faults: list[str]
) -> None:
    # Calls of 3 executions, 3 in flight: a few events make several calls that overlap,
    # wait on one another's executions, and are refused or lost while others are out.
    with (
        mock.patch.object(projector_module, "CALL_SIZE", 3),
        mock.patch.object(projector_module, "MAX_IN_FLIGHT", 3),
    ):
        asyncio.run(_check(redis_url, events, steps, faults))


async def _check(
    redis_url: str, data: list[dict[str, Any]], steps: list[tuple[str, Any]], faults: list[str]
) -> None:
    client = FaultyRedis.from_url(redis_url)
    client.faults = []
    try:
        decoded = [_decoded(n, item) for n, item in enumerate(data)]
        refused_ids = sorted(e.entry_id for e in decoded if e.execution_id == POISONED)

        # one event at a time, in stream order
        await client.flushall()
        reference = RedisTaskStatusProjector(
            client, Metrics(), group=GROUP, finished_ttl_seconds=99
        )
        one_at_a_time = 0
        for event in decoded:
            try:
                one_at_a_time += await reference.apply([event])
            except ResponseError:
                assert event.execution_id == POISONED
        expected = await _snapshot(client)

        await client.flushall()
        metrics = Metrics()
        projector = RedisTaskStatusProjector(client, metrics, group=GROUP, finished_ttl_seconds=99)
        acknowledged: list[str] = []
        rejected: list[str] = []

        async def flush(force: bool) -> None:
            with contextlib.suppress(RedisConnectionError):  # the runner retries later
                flushed = await projector.flush(force=force)
                acknowledged.extend(flushed.durable_ids)
                rejected.extend(entry.entry_id for entry in flushed.rejected)
                # back-pressure: a flush returns with its calls out, none queued behind
                assert len(projector.in_flight) <= 3

        client.faults = faults
        added = 0
        for step, value in steps:
            if step == "add":
                projector.add(decoded[added : added + value])
                added = min(added + value, len(decoded))
            else:
                await flush(value)
        projector.add(decoded[added:])
        client.faults = []
        while projector.seconds_until_due() is not None:
            await flush(True)

        assert await _snapshot(client) == expected
        assert Counter(acknowledged) == Counter(
            e.entry_id for e in decoded if e.execution_id != POISONED
        )
        assert sorted(rejected) == refused_ids
        # a call applied twice (its reply lost) counts its events stale the second time
        if "reply lost" not in faults:
            samples = metrics.registry.get_sample_value
            applied = samples("task_tracking_events_applied_total", {"group": GROUP}) or 0
            stale = samples("task_tracking_events_stale_total", {"group": GROUP}) or 0
            assert (applied, stale) == (one_at_a_time, len(acknowledged) - one_at_a_time)
    finally:
        await client.aclose()


def _decoded(n: int, data: dict[str, Any]) -> ValidEvent:
    event = decode_entry(f"{ADDED_MS + n + 1}-0", {EVENT_FIELD: orjson.dumps(data)})
    assert isinstance(event, ValidEvent)
    return event
