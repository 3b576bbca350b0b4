"""Reading a consumer group's entries with a bound on each reply's size.

`READ_BOUNDED` reads for the group inside Redis and returns only the `event` values,
a longer one cut to a prefix, so that no event, and no batch of events, can grow the
sidecar's memory past what it can hold. When nothing new is there, the consumer waits
for the stream to grow with a plain `XREAD BLOCK` (a wake-up that delivers nothing, so a
stop can cut it short), then reads through the group again.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError

from sidecar.events import DEAD_LETTER_EVENT_BYTES, EventValue, Oversized

# KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3] count, ARGV[4] `>` for new
# entries, or an ID for this consumer's pending entries after it; ARGV[5] the longest
# `event` value returned whole, ARGV[6] the prefix returned of a longer one, ARGV[7] the
# reply's byte budget. XREADGROUP is called in chunks no larger than the budget holds at
# the longest size, so nothing is delivered that is not returned.
# Returns {entries, wait_from}: per entry {id, value, …} (its `event` values only; a
# longer value as {prefix, size}; {id, 0} for a pending entry since deleted), and when
# nothing new was there, the stream's last ID to block on.
READ_BOUNDED = """
local group, consumer, cursor = ARGV[1], ARGV[2], ARGV[4]
local left, longest = tonumber(ARGV[3]), tonumber(ARGV[5])
local prefix, budget = tonumber(ARGV[6]), tonumber(ARGV[7])
local out = {}
while left > 0 do
  local count = math.min(left, math.max(1, math.floor(budget / longest)))
  local reply = redis.call(
    'XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS', KEYS[1], cursor)
  local entries = reply and reply[1][2] or {}
  for _, entry in ipairs(entries) do
    local item = {entry[1]}
    if not entry[2] then
      item[2] = 0
    else
      local fields = entry[2]
      for i = 1, #fields, 2 do
        if fields[i] == 'event' then
          local value = fields[i + 1]
          if #value > longest then
            item[#item + 1] = {string.sub(value, 1, prefix), #value}
            budget = budget - prefix
          else
            item[#item + 1] = value
            budget = budget - #value
          end
        end
      end
    end
    out[#out + 1] = item
  end
  left = left - #entries
  if #entries < count or budget < longest then break end
  if cursor ~= '>' then cursor = entries[#entries][1] end
end
local wait_from = ''
if #out == 0 and cursor == '>' then
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  wait_from = last[1] and last[1][1] or '0-0'
end
return {out, wait_from}
"""
READ_BOUNDED_SHA = hashlib.sha1(READ_BOUNDED.encode()).hexdigest()
# What one read may return, at most (besides one value of the longest size).
READ_BUDGET_BYTES = 16 * 1024 * 1024

# A stream entry as read: its ID and its `event` values (None: deleted from the stream).
StreamEntry = tuple[str, list[EventValue] | None]


class BoundedReader:
    """One consumer's reads of one group on one stream, each bounded in size."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        *,
        stream: str,
        group: str,
        consumer: str,
        batch_size: int,
        max_event_bytes: int,
        budget_bytes: int,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self._head: list[str | int] = [READ_BOUNDED_SHA, 1, stream, group, consumer, batch_size]
        self._tail: list[str | int] = [
            max_event_bytes,
            DEAD_LETTER_EVENT_BYTES,
            # room for a few events of the largest size: a read always takes several
            max(budget_bytes, 4 * max_event_bytes),
        ]

    async def read(self, cursor: str) -> tuple[list[StreamEntry], str]:
        """One bounded read: new entries (`>`) or own pending ones after `cursor`; and,
        when nothing new was there, the ID to wait from."""
        args = [*self._head, cursor, *self._tail]
        try:
            reply: Any = await self.redis.execute_command("EVALSHA", *args)
        except NoScriptError:  # a restarted or failed-over server lost its script cache
            await self.redis.script_load(READ_BOUNDED)
            reply = await self.redis.execute_command("EVALSHA", *args)
        entries: list[StreamEntry] = []
        for item in reply[0]:
            values = item[1:]
            if len(values) == 1 and type(values[0]) is bytes:  # the common case
                entries.append((item[0].decode(), values))
            elif values == [0]:
                entries.append((item[0].decode(), None))
            else:
                values = [Oversized(v[0], v[1]) if type(v) is list else v for v in values]
                entries.append((item[0].decode(), values))
        return entries, reply[1].decode()

    async def read_own_pending(self) -> list[StreamEntry]:
        """This consumer's whole pending list."""
        entries: list[StreamEntry] = []
        cursor = "0"
        while page := (await self.read(cursor))[0]:
            entries.extend(page)
            cursor = page[-1][0]
        return entries

    async def read_new(self, block_ms: int, stopping: asyncio.Event) -> list[StreamEntry]:
        """New entries for this consumer; when there are none, wait up to `block_ms` for
        the stream to grow (or for `stopping`), then read."""
        entries, wait_from = await self.read(">")
        if entries or not wait_from:
            return entries
        # Only a wake-up: what it returns (one entry) is read again through the group. It
        # delivers nothing, so a stop cuts it short (redis-py drops a connection whose
        # command was cancelled): stopping an idle consumer does not wait for the block.
        wake = asyncio.ensure_future(
            self.redis.xread({self.stream: wait_from}, count=1, block=block_ms)
        )
        stopped = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({wake, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not wake.done():
            wake.cancel()
            await asyncio.gather(wake, return_exceptions=True)
            return []
        wake.result()  # a lost connection, say
        if stopping.is_set():  # stopped meanwhile: read nothing more
            return []
        return (await self.read(">"))[0]
