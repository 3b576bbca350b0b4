"""Events Redis refuses to project never block the projector's group."""

from __future__ import annotations

import redis.asyncio as aioredis

from sidecar.projector import CALL_SIZE, MAX_IN_FLIGHT
from tests.helpers import (
    PROJECTOR,
    STREAM,
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
    events += [event(f"x{n}", "success", occurred_at=2_000_000_000_000) for n in range(count)]
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
