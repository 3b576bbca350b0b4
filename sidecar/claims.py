"""Taking over the pending entries of consumers that died.

A consumer idle longer than the claim time has its whole pending list claimed in one
`XCLAIM` and settled as one batch, after this consumer's own buffer is flushed, for the
same reason a consumer's own pending entries are re-read as one batch on start: a worker
that groups entries (the archiver) forms exactly the groups the dead one would have. An
idle consumer with nothing pending is removed from the group.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis, RedisCluster

from sidecar.bounded_read import BoundedReader, StreamEntry
from sidecar.logs import ContextLogger
from sidecar.metrics import Metrics

# Removes a consumer from the group only if it still has nothing pending and is
# still idle, atomically: a consumer that read in between keeps its entries.
DELETE_IDLE_CONSUMER = """
for _, info in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local fields = {}
  for i = 1, #info, 2 do fields[info[i]] = info[i + 1] end
  if fields['name'] == ARGV[2] then
    if tonumber(fields['pending']) == 0 and tonumber(fields['idle']) >= tonumber(ARGV[3]) then
      return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
    end
    return -1
  end
end
return -1
"""


class Claimer:
    """Claims for one consumer, at most every quarter of the claim time."""

    def __init__(
        self,
        reader: BoundedReader,
        metrics: Metrics,
        log: ContextLogger,
        *,
        group: str,
        consumer: str,
        idle_ms: int,
    ) -> None:
        self.redis: Redis | RedisCluster = reader.redis
        self.reader = reader
        self.metrics = metrics
        self.log = log
        self.stream = reader.stream
        self.group = group
        self.consumer = consumer
        self.idle_ms = idle_ms
        self._next_claim = 0.0

    async def claim_due(
        self,
        settle_in_hand: Callable[[], Awaitable[None]],
        take_over: Callable[[list[StreamEntry]], Awaitable[None]],
    ) -> None:
        """If a claim is due, take over the idle consumers' pending entries: for each,
        `settle_in_hand()` first (flush and acknowledge what this consumer holds), then
        `take_over(entries)` with the entries claimed, read through the bounded read."""
        now = time.monotonic()
        if now < self._next_claim:
            return
        self._next_claim = now + self.idle_ms / 4000
        consumers: Any = await self.redis.xinfo_consumers(self.stream, self.group)
        for info in consumers:
            name = _text(info["name"])
            if name == self.consumer or int(info["idle"]) < self.idle_ms:
                continue
            if int(info["pending"]) == 0:
                await self.redis.eval(
                    DELETE_IDLE_CONSUMER, 1, self.stream, self.group, name, self.idle_ms
                )
                continue
            ids = await self._pending_ids(name, int(info["pending"]))
            await settle_in_hand()
            # IDs only: the entries are then read through the bounded read, like any other
            claimed: Any = await self.redis.xclaim(
                self.stream, self.group, self.consumer, self.idle_ms, list[Any](ids), justid=True
            )
            if claimed:
                self.log.warning(
                    "claimed %d pending entries of idle consumer %s", len(claimed), name
                )
                self.metrics.claimed.labels(self.group).inc(len(claimed))
                wanted = {_text(entry_id) for entry_id in claimed}
                # not a batch read ahead, which is pending here too and handled as read
                entries = [e for e in await self.reader.read_own_pending() if e[0] in wanted]
                await take_over(entries)

    async def _pending_ids(self, consumer: str, count: int) -> list[str]:
        rows: Any = await self.redis.xpending_range(
            self.stream, self.group, min="-", max="+", count=count, consumername=consumer
        )
        return [_text(row["message_id"]) for row in rows]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
