"""`RedisTaskStatusProjector`: the latest-status projection, kept by the ordering rule.

A batch is one round trip: one EVALSHA of a compare-and-set script that
declares the batch's execution hashes as its keys and touches only them, and
one `ZADD ... GT` per project index. On Redis Cluster the batch is split by
hash slot, one EVALSHA per slot, so every command stays on a single slot.

The batch travels as one JSON argument (decoded by the server's cjson): packing
thousands of separate arguments in Python cost more than the whole apply.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence

import orjson
from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError, ResponseError

from sidecar.events import STATUS_RANK, InvalidEntry, ValidEvent
from sidecar.keys import execution_key, project_index_key
from sidecar.metrics import Metrics, observe_many

log = logging.getLogger(__name__)

# KEYS[i]  execution hash of the i-th event (a key repeats when its execution has several)
# ARGV[1]  seconds to keep a finished execution (0: forever)
# ARGV[2]  JSON array, item i for KEYS[i]: [occurredAtMs, statusRank, eventId, field, value, …]
#          (field/value pairs: the whole new hash, every value a string)
# Events apply in order, each by the ordering rule. Returns how many were applied.
COMPARE_AND_SET = """
local ttl = tonumber(ARGV[1])
local applied = 0
for i, event in ipairs(cjson.decode(ARGV[2])) do
  local key = KEYS[i]
  local new_ms, new_rank = tonumber(event[1]), tonumber(event[2])
  local newer = true
  local current = redis.call('HMGET', key, 'occurredAtMs', 'status', 'eventId')
  if current[1] then
    local ms = tonumber(current[1])
    if new_ms < ms then
      newer = false
    elseif new_ms == ms then
      local rank = (current[2] == 'in_progress') and 0 or 1
      if new_rank < rank then
        newer = false
      elseif new_rank == rank then
        -- byte-wise, like Python's str order; Lua's own < follows the server's locale
        local a, b = event[3], current[3] or ''
        local n = math.min(#a, #b)
        local greater = #a > #b
        for j = 1, n do
          local x, y = string.byte(a, j), string.byte(b, j)
          if x ~= y then greater = x > y; break end
        end
        newer = greater
      end
    end
  end
  if newer then
    redis.call('DEL', key)
    -- in slices: unpack() of thousands of fields would overflow Lua's stack
    for first = 4, #event, 200 do
      redis.call('HSET', key, unpack(event, first, math.min(first + 199, #event)))
    end
    if ttl > 0 and new_rank == 1 then redis.call('EXPIRE', key, ttl) end
    applied = applied + 1
  end
end
return applied
"""


def projection_fields(event: ValidEvent) -> list[bytes | str | int]:
    """The execution hash of an event: top-level fields (strings as they are, anything
    else JSON), plus `occurredAtMs` and `streamId`."""
    flat: list[bytes | str | int] = []
    for name, value in event.fields.items():
        flat.append(name)
        flat.append(value if isinstance(value, str) else orjson.dumps(value))
    flat += ["occurredAtMs", event.occurred_at_ms, "streamId", event.entry_id]
    return flat


def _script_item(event: ValidEvent) -> list[str | int]:
    """`projection_fields` as the script's JSON wants it: every value a string."""
    item: list[str | int] = [event.occurred_at_ms, STATUS_RANK[event.status], event.event_id]
    for name, value in event.fields.items():
        item.append(name)
        item.append(value if isinstance(value, str) else orjson.dumps(value).decode())
    item += ["occurredAtMs", str(event.occurred_at_ms), "streamId", event.entry_id]
    return item


class RedisTaskStatusProjector:
    """Applies batches of events to the projection; a `BatchHandler` for the runner."""

    # The runner may read and decode the next batch while a flush waits on Redis.
    read_ahead = True

    def __init__(
        self,
        redis: Redis | RedisCluster,
        metrics: Metrics,
        *,
        group: str,
        finished_ttl_seconds: int = 0,
    ) -> None:
        self.redis = redis
        self.metrics = metrics
        self.group = group
        self.finished_ttl_seconds = finished_ttl_seconds
        self._sha = hashlib.sha1(COMPARE_AND_SET.encode()).hexdigest()
        self._buffer: list[ValidEvent] = []
        self._rejected: list[InvalidEntry] = []

    async def prepare(self) -> None:
        pass

    def add(self, events: Sequence[ValidEvent]) -> None:
        self._buffer.extend(events)

    def seconds_until_due(self) -> float | None:
        return 0.0 if self._buffer else None

    def take_rejected(self) -> list[InvalidEntry]:
        rejected, self._rejected = self._rejected, []
        return rejected

    async def flush(self, *, force: bool) -> list[str]:
        if not self._buffer:
            return []
        events = self._buffer
        try:
            applied = await self.apply(events)
        except ResponseError as exc:
            # Redis refused the batch (a key of another type, say): apply one event at a
            # time and hand back those Redis refuses, so one event cannot block the group.
            log.warning("batch refused by Redis (%s); applying its events one by one", exc)
            applied, events = await self._apply_one_by_one(events)
        self._buffer = []
        now = time.time()
        observe_many(
            self.metrics.end_to_end_latency.labels(self.group),
            [max(0.0, now - int(event.entry_id.split("-", 1)[0]) / 1000) for event in events],
        )
        observe_many(
            self.metrics.event_age.labels(self.group),
            [max(0.0, now - event.occurred_at_ms / 1000) for event in events],
        )
        self.metrics.applied.labels(self.group).inc(applied)
        self.metrics.stale.labels(self.group).inc(len(events) - applied)
        return [event.entry_id for event in events]

    async def _apply_one_by_one(self, events: list[ValidEvent]) -> tuple[int, list[ValidEvent]]:
        applied, accepted = 0, []
        for event in events:
            try:
                applied += await self.apply([event])
            except ResponseError as exc:
                reason = f"Redis refused the projection: {exc}"
                self._rejected.append(InvalidEntry(event.entry_id, event.raw, reason))
            else:
                accepted.append(event)
        return applied, accepted

    async def apply(self, events: Sequence[ValidEvent]) -> int:
        """Apply events in one round trip; returns how many changed the projection."""
        try:
            results = await self._pipeline(events)
        except NoScriptError:
            # A restarted or failed-over server lost its script cache.
            await self.redis.script_load(COMPARE_AND_SET)
            results = await self._pipeline(events)
        return sum(results)

    async def _pipeline(self, events: Sequence[ValidEvent]) -> list[int]:
        groups = self._slot_groups(events)
        # The index score only grows (GT), so one member per execution, at the
        # greatest occurredAtMs of the batch, leaves the index as per-event ZADDs would.
        indexes: dict[str, dict[str, int]] = {}
        for event in events:
            index = indexes.get(event.project)
            if index is None:
                index = indexes[event.project] = {}
            if index.get(event.execution_id, -1) < event.occurred_at_ms:
                index[event.execution_id] = event.occurred_at_ms
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, items in groups:
                # execute_command: redis-py's cluster pipeline refuses `pipe.evalsha`
                # (it routes EVALSHA by its keys all the same)
                pipe.execute_command(
                    "EVALSHA",
                    self._sha,
                    len(keys),
                    *keys,
                    self.finished_ttl_seconds,
                    orjson.dumps(items),
                )
            for project, members in indexes.items():
                pipe.zadd(project_index_key(project), members, gt=True)
            results: list[int] = await pipe.execute()
        return results[: len(groups)]

    def _slot_groups(
        self, events: Sequence[ValidEvent]
    ) -> list[tuple[list[str], list[list[str | int]]]]:
        """The batch's (keys, script items): one group on a standalone server, one group
        per hash slot on a cluster; events of one execution keep their order."""
        if not isinstance(self.redis, RedisCluster):
            keys = [execution_key(event.execution_id) for event in events]
            return [(keys, [_script_item(event) for event in events])]
        groups: dict[int, tuple[list[str], list[list[str | int]]]] = {}
        for event in events:
            key = execution_key(event.execution_id)
            slot = key_slot(key.encode())
            group = groups.get(slot)
            if group is None:
                group = groups[slot] = ([], [])
            group[0].append(key)
            group[1].append(_script_item(event))
        return list(groups.values())
