"""`RedisTaskStatusProjector`: the latest-status projection, kept by the ordering rule.

Per event, one EVALSHA of a compare-and-set script that touches only the
execution hash, and one `ZADD ... GT` on the project index: every command
touches a single key, so the layout works on Redis Cluster. A whole batch goes
in one pipeline, one round trip.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence

import orjson
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError

from sidecar.events import STATUS_RANK, ValidEvent
from sidecar.keys import execution_key, project_index_key
from sidecar.metrics import Metrics

log = logging.getLogger(__name__)

# KEYS[1]  execution hash
# ARGV[1]  occurredAtMs   ARGV[2] statusRank   ARGV[3] eventId
# ARGV[4]  seconds to keep a finished execution (0: forever)
# ARGV[5…] field, value, field, value… (the whole new hash)
# Returns 1 when applied, 0 when the projected state is newer or equal.
COMPARE_AND_SET = """
local current = redis.call('HMGET', KEYS[1], 'occurredAtMs', 'status', 'eventId')
if current[1] then
  local ms, new_ms = tonumber(current[1]), tonumber(ARGV[1])
  if new_ms < ms then return 0 end
  if new_ms == ms then
    local rank = (current[2] == 'in_progress') and 0 or 1
    local new_rank = tonumber(ARGV[2])
    if new_rank < rank then return 0 end
    if new_rank == rank then
      -- byte-wise, like Python's str order; Lua's own < follows the server's locale
      local a, b = ARGV[3], current[3] or ''
      local n = math.min(#a, #b)
      local greater = #a > #b
      for i = 1, n do
        local x, y = string.byte(a, i), string.byte(b, i)
        if x ~= y then greater = x > y; break end
      end
      if not greater then return 0 end
    end
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
local ttl = tonumber(ARGV[4])
if ttl > 0 and tonumber(ARGV[2]) == 1 then redis.call('EXPIRE', KEYS[1], ttl) end
return 1
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


class RedisTaskStatusProjector:
    """Applies batches of events to the projection; a `BatchHandler` for the runner."""

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

    async def prepare(self) -> None:
        pass

    def add(self, events: Sequence[ValidEvent]) -> None:
        self._buffer.extend(events)

    def seconds_until_due(self) -> float | None:
        return 0.0 if self._buffer else None

    async def flush(self, *, force: bool) -> list[str]:
        if not self._buffer:
            return []
        events = self._buffer
        applied = await self.apply(events)
        self._buffer = []
        now = time.time()
        latency = self.metrics.end_to_end_latency.labels(self.group)
        age = self.metrics.event_age.labels(self.group)
        for event in events:
            latency.observe(max(0.0, now - int(event.entry_id.split("-", 1)[0]) / 1000))
            age.observe(max(0.0, now - event.occurred_at_ms / 1000))
        self.metrics.applied.labels(self.group).inc(applied)
        self.metrics.stale.labels(self.group).inc(len(events) - applied)
        return [event.entry_id for event in events]

    async def apply(self, events: Sequence[ValidEvent]) -> int:
        """Apply events in one round trip; returns how many changed the projection."""
        try:
            results = await self._pipeline(events)
        except NoScriptError:
            # A restarted or failed-over server lost its script cache.
            await self.redis.script_load(COMPARE_AND_SET)
            results = await self._pipeline(events)
        return sum(results[0::2])

    async def _pipeline(self, events: Sequence[ValidEvent]) -> list[int]:
        sha = self._sha
        ttl = self.finished_ttl_seconds
        async with self.redis.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.evalsha(
                    sha,
                    1,
                    execution_key(event.execution_id),
                    event.occurred_at_ms,
                    STATUS_RANK[event.status],
                    event.event_id,
                    ttl,
                    *projection_fields(event),
                )
                pipe.zadd(
                    project_index_key(event.project),
                    {event.execution_id: event.occurred_at_ms},
                    gt=True,
                )
            results: list[int] = await pipe.execute()
        return results
