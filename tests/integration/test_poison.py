"""Events Redis refuses to project never block the projector's group."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError

from sidecar.connections import connect
from sidecar.devserver import DevServer, free_port
from sidecar.events import EVENT_FIELD, ValidEvent, decode_entry
from sidecar.metrics import Metrics
from sidecar.projector import CALL_SIZE, MAX_IN_FLIGHT, RedisTaskStatusProjector
from tests.helpers import (
    ADDED_MS,
    PROJECTOR,
    STREAM,
    archive_objects_folder,
    both_groups_done,
    event,
    group_done,
    projection,
    publish,
    running_sidecar,
    wait_for,
)


async def test_an_event_redis_refuses_is_dead_lettered_and_the_rest_projected(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    # another application wrote a string where the execution hash would go
    await redis_client.set("task-tracking:execution:clash", "not a hash")
    wide = event("wide", "success", **{f"field{n}": n for n in range(5000)})
    events = [event("a", "success"), event("clash", "success"), wide, event("b", "error")]
    ids = await publish(redis_client, STREAM, events)
    async with running_sidecar(redis_url):
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR))
    state = await projection(redis_client, ["a", "b", "wide"])
    assert state["a"]["status"] == "success" and state["b"]["status"] == "error"
    assert state["wide"]["field4999"] == "4999"  # thousands of fields: applied in slices
    dead = await redis_client.xrange(f"{STREAM}:dead-letter")
    assert [fields[b"sourceId"].decode() for _, fields in dead] == [ids[1]]
    assert b"WRONGTYPE" in dead[0][1][b"error"]


async def test_a_refused_event_in_a_batch_of_many_script_calls(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    # Enough executions in one batch for several script calls, more than can be in
    # flight at once, the clash in the middle: the calls around it finish, then the
    # batch is applied one event at a time.
    count = CALL_SIZE * (MAX_IN_FLIGHT + 2)
    await redis_client.set(f"task-tracking:execution:x{count // 2}", "not a hash")
    events = [event(f"x{n}", "in_progress") for n in range(count)]
    events += [event(f"x{n}", "success", occurred_at=1_750_000_000_000) for n in range(count)]
    ids = await publish(redis_client, STREAM, events)
    async with running_sidecar(redis_url, redis_batch_size=2 * count) as sidecar:
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR))
        metrics = sidecar.metrics.registry
    names = [f"x{n}" for n in range(count) if n != count // 2]
    state = await projection(redis_client, names)
    assert {fields["status"] for fields in state.values()} == {"success"}
    dead = await redis_client.xrange(f"{STREAM}:dead-letter")
    assert sorted(fields[b"sourceId"].decode() for _, fields in dead) == sorted(
        [ids[count // 2], ids[count + count // 2]]
    )
    # both events of every other execution took effect, counted once each
    group = {"group": PROJECTOR}
    assert metrics.get_sample_value("task_tracking_events_applied_total", group) == 2 * count - 2
    assert metrics.get_sample_value("task_tracking_events_stale_total", group) == 0


def _decoded(items: list[dict], first: int = 1) -> list[ValidEvent]:
    events = []
    for n, item in enumerate(items, first):
        decoded = decode_entry(f"{ADDED_MS + n}-0", {EVENT_FIELD: orjson.dumps(item)})
        assert isinstance(decoded, ValidEvent)
        events.append(decoded)
    return events


async def test_a_refused_call_left_out_is_settled_before_a_later_batch_touches_its_executions(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    # Batch 1 takes two calls; the first, refused (the clash), is still out when the
    # flush returns. Batch 2 holds a later event of an execution of that call: it waits
    # until the refused call was applied again event by event, so the counts are those
    # of one event at a time in stream order (both of X's events took effect).
    await redis_client.set("task-tracking:execution:clash", "not a hash")
    first = [event("clash", "in_progress"), event("x", "in_progress", 1_700_000_001_000)]
    first += [event(f"e{n}", "in_progress") for n in range(CALL_SIZE + 10)]
    batch1 = _decoded(first)
    batch2 = _decoded([event("x", "success", 1_700_000_002_000)], first=len(batch1) + 1)
    client = connect(redis_url)
    metrics = Metrics()
    projector = RedisTaskStatusProjector(client, metrics, group=PROJECTOR)
    projector.add(batch1)
    flushes = [await projector.flush(force=False)]
    projector.add(batch2)
    flushes += [await projector.flush(force=False), await projector.flush(force=False)]
    await client.aclose()
    handed_back = [entry_id for flushed in flushes for entry_id in flushed.durable_ids]
    rejected = [entry.entry_id for flushed in flushes for entry in flushed.rejected]
    assert rejected == [batch1[0].entry_id]
    assert sorted(handed_back) == sorted(e.entry_id for e in batch1[1:] + batch2)
    group = {"group": PROJECTOR}
    assert metrics.registry.get_sample_value("task_tracking_events_applied_total", group) == (
        len(batch1) - 1 + 1
    )
    assert (await projection(redis_client, ["x"]))["x"]["status"] == "success"


async def test_a_read_only_server_blames_no_event_and_the_batch_is_retried(
    persistent_server: DevServer,
) -> None:
    # After a failover the sidecar may still talk to what is now a replica: READONLY is
    # the server's state, not the events' fault. Nothing is dead-lettered; the flush
    # raises (the runner retries with backoff) and succeeds once the server takes writes.
    admin = aioredis.Redis.from_url(persistent_server.url)
    events = _decoded([event(f"r{n}", "success") for n in range(CALL_SIZE * 2 + 5)])
    client = connect(persistent_server.url)
    projector = RedisTaskStatusProjector(client, Metrics(), group=PROJECTOR)
    try:
        await admin.replicaof("127.0.0.1", str(free_port()))  # a master that never answers
        projector.add(events)
        with pytest.raises(ReadOnlyError):
            await projector.flush(force=True)
        await admin.replicaof("NO", "ONE")
        flushed = await projector.flush(force=True)
        assert flushed.rejected == []
        assert sorted(flushed.durable_ids) == sorted(e.entry_id for e in events)
        state = await projection(admin, [f"r{n}" for n in range(len(events))])
        assert {fields["status"] for fields in state.values()} == {"success"}
    finally:
        await client.aclose()
        await admin.aclose()


async def test_calls_lost_with_the_server_keep_their_events_and_the_flush_raises(
    persistent_server: DevServer,
) -> None:
    # The server is gone while a batch of several calls goes out: nothing is handed back,
    # the flush raises (the runner retries with backoff), the events stay buffered, and
    # once the server is back the retry hands every one of them back.
    events = _decoded([event(f"l{n}", "success") for n in range(CALL_SIZE * 3)])
    client = connect(persistent_server.url)
    projector = RedisTaskStatusProjector(client, Metrics(), group=PROJECTOR)
    try:
        await client.ping()  # connected once, then the server goes
        persistent_server.stop()
        projector.add(events)
        with pytest.raises(RedisConnectionError):
            await projector.flush(force=True)
        assert projector.seconds_until_due() == 0.0  # the events wait in the buffer
        persistent_server.start()
        handed_back = (await projector.flush(force=True)).durable_ids
        assert sorted(handed_back) == sorted(e.entry_id for e in events)
        state = await projection(client, [f"l{n}" for n in range(len(events))])
        assert {fields["status"] for fields in state.values()} == {"success"}
    finally:
        await client.aclose()


async def test_calls_left_out_when_the_projector_is_dropped_report_no_stray_error(
    persistent_server: DevServer,
) -> None:
    # A flush of a backlog batch returns with calls still out. If the server dies then and
    # the runner gives up (stopping during the outage), those calls fail with nobody left
    # to settle them: their entries stay pending, and asyncio must not log "Task exception
    # was never retrieved" for each one at shutdown.
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    admin = aioredis.Redis.from_url(persistent_server.url)
    client = connect(persistent_server.url)
    projector = RedisTaskStatusProjector(client, Metrics(), group=PROJECTOR)
    try:
        # a script holding the server, so the batch's calls queue behind it
        busy = asyncio.ensure_future(admin.eval(BUSY_SCRIPT, 0))
        await asyncio.sleep(0.1)
        projector.add(_decoded([event(f"d{n}", "success") for n in range(CALL_SIZE * 2)]))
        assert (await projector.flush(force=False)).durable_ids == []  # both calls still out
        persistent_server.kill()
        await asyncio.gather(busy, return_exceptions=True)
        await projector.in_flight.wait()  # the calls fail with the connection
        assert isinstance(projector.in_flight.lost, RedisConnectionError)
        assert len(projector.in_flight) == 2  # nobody settles them
        del projector
        gc.collect()
        await asyncio.sleep(0)
        assert [context["message"] for context in reported] == []
    finally:
        loop.set_exception_handler(previous)
        await client.aclose()
        await admin.aclose()


# Busy for one to two seconds: a script cannot sleep, so it reads the clock until then.
BUSY_SCRIPT = """
local start = tonumber(redis.call('TIME')[1])
while tonumber(redis.call('TIME')[1]) < start + 2 do end
return 0
"""


def _nested(levels: int, *, lines: bool = False) -> bytes:
    """An event whose `meta` field makes it `levels` deep, as JSON.stringify writes it
    (with `lines`: JSON.stringify(e, null, 1), one key a line)."""
    head = orjson.dumps(event("deep", "success"))[:-1] + b',"meta":'
    opening = b'{\n "a":' if lines else b'{"a":'
    return head + opening * (levels - 1) + b"1" + b"}" * (levels - 1) + b"}"


async def test_shapes_that_would_stop_a_group_or_stall_redis_are_dead_lettered(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """Found by a user drive: an unknown field 255 deep stopped the projector group for
    good (orjson writes at most 254 levels), one 1,000 deep over several lines stopped
    both groups (the standard library's parser recursed), and 64 events of 110,000
    fields made one script call that held Redis for 3 s. Now each is dead-lettered with
    its reason, the archiver skips exactly those, and wide events are written a few to a
    call."""
    deepest = _nested(200)
    too_deep = [_nested(201), _nested(300), _nested(1000, lines=True)]
    too_wide = event("too-wide", "success", **{f"f{n}": n for n in range(10_000)})
    wide = [event(f"wide{n}", "success", **{f"f{k}": k for k in range(5000)}) for n in range(8)]
    ids = await publish(
        redis_client, STREAM, [deepest, *too_deep, too_wide, *wide, event("after", "error")]
    )
    settings = {"s3_archive_enabled": True, "archive_sink": "folder", "archive_folder": tmp_path}
    async with running_sidecar(redis_url, archive_flush_max_age_seconds=0.2, **settings):
        await both_groups_done(redis_client, 60)
    state = await projection(redis_client, ["deep", "after", "wide7"])
    assert state["deep"]["status"] == "success" and state["after"]["status"] == "error"
    assert state["wide7"]["f4999"] == "4999"
    dead = await redis_client.xrange(f"{STREAM}:dead-letter")
    reasons = {fields[b"sourceId"].decode(): fields[b"error"].decode() for _, fields in dead}
    assert sorted(reasons) == sorted(ids[1:5])
    assert all("nested deeper than 200 levels" in reasons[i] for i in ids[1:4]), reasons
    assert reasons[ids[4]].startswith("event has 10006 top-level fields, over 10000")
    lines = [
        line for body in archive_objects_folder(tmp_path).values() for line in body.split(b"\n")
    ]
    assert sum(1 for line in lines if line) == 1 + len(wide) + 1  # what was projected
