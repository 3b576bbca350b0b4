"""Reading a consumer group's entries with a bound on each reply's size.

New entries are read with a plain `XREADGROUP` on a connection of their own whose parser
counts the reply's bytes: a reply that grows past the byte budget (an event far over the
size limit, or a batch of events near it) is dropped with its connection
(`ReplyOverBudget`), and the entries it delivered, pending now, are read again with
`READ_BOUNDED`. That script reads for the group inside Redis and returns only the
`event` values, a longer one cut to a prefix, so that no event, and no batch of events,
grows the sidecar's memory past what it can hold; it also reads this consumer's pending
entries (on start, after a failure, claims). It is not the common path because Redis's
conversion of a reply to Lua and back costs it about twice the native read (23k
instructions per entry more, callgrind; bench/). On Redis Cluster every read takes the
script.

The native read blocks in Redis (`XREADGROUP BLOCK`), which hands it new entries as they
are added. A stop cuts it short (`interrupt`): its connection is dropped, and whatever
Redis may have handed it meanwhile is read again from the pending list. Through the
script (Redis Cluster), the consumer waits with a plain `XREAD BLOCK`, a wake-up that
delivers nothing, then reads through the group again.
"""

from __future__ import annotations

import asyncio
import hashlib
from functools import partial
from typing import Any

from redis._parsers.hiredis import _AsyncHiredisParser
from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
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
# How long a stop waits for a blocked read it cut short to return, closing its
# connection again at this interval.
INTERRUPT_SECONDS = 1.0
INTERRUPT_RETRY_SECONDS = 0.05
# What one read may return, at most (besides one value of the longest size).
READ_BUDGET_BYTES = 16 * 1024 * 1024

# A stream entry as read: its ID and its `event` values (None: deleted from the stream).
StreamEntry = tuple[str, list[EventValue] | None]
EVENT_FIELD = b"event"


class ReplyOverBudget(Exception):
    """A native read's reply grew past the byte budget. Its connection is closed; the
    entries it delivered are this consumer's pending entries, to read with the script."""


class _BudgetedParser(_AsyncHiredisParser):
    """redis-py's hiredis parser, refusing a reply longer than `budget` bytes before it
    is whole (it is fed from the socket a chunk at a time)."""

    def __init__(self, socket_read_size: int, budget: int) -> None:
        super().__init__(socket_read_size)
        self._budget = budget
        self._fed = 0

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        self._fed = 0
        return await super().read_response(*args, **kwargs)

    async def read_from_socket(self) -> bool:
        stream: Any = self._stream
        buffer = await stream.read(self._read_size)
        if not buffer:
            raise RedisConnectionError("Connection closed by server.")
        self._fed += len(buffer)
        if self._fed > self._budget:
            # The reader holds what was fed of this reply, up to the budget: it goes now.
            # The exception's frames (this one among them) sit in a reference cycle until
            # the garbage collector runs, rarely in a quiet sidecar: 16 MiB kept a time.
            self._reader = None
            self._connected = False  # as redis-py's disconnect leaves it
            raise ReplyOverBudget(f"a read's reply went over {self._budget} bytes")
        reader: Any = self._reader
        reader.feed(buffer)
        return True


def _native_client(redis: Redis, budget: int) -> Redis:
    """A client of its own for native reads: the same server and options, the budgeted
    parser, raw XREADGROUP replies (redis-py's own parsing makes a dict of each entry's
    fields and loses a repeated `event`), and no retry (a lost reply must reach the
    runner, which re-reads what it delivered)."""
    pool = redis.connection_pool
    options = {**pool.connection_kwargs, "parser_class": partial(_BudgetedParser, budget=budget)}
    options["retry"] = Retry(NoBackoff(), 0)
    client = Redis(
        connection_pool=ConnectionPool(connection_class=pool.connection_class, **options),
        retry=Retry(NoBackoff(), 0),
    )
    client.set_response_callback("XREADGROUP", lambda response, **_: response)
    return client


def _event_values(fields: list[Any] | None) -> list[EventValue] | None:
    """An entry's `event` values, from its raw field list."""
    if fields is None:
        return None
    if len(fields) == 2 and fields[0] == EVENT_FIELD:  # the common case
        return [fields[1]]
    return [fields[i + 1] for i in range(0, len(fields) - 1, 2) if fields[i] == EVENT_FIELD]


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
        # room for a few events of the largest size: a read always takes several
        budget = max(budget_bytes, 4 * max_event_bytes)
        self._head: list[str | int] = [READ_BOUNDED_SHA, 1, stream, group, consumer, batch_size]
        self._tail: list[str | int] = [max_event_bytes, DEAD_LETTER_EVENT_BYTES, budget]
        self._native_args = ["GROUP", group, consumer, "COUNT", batch_size, "STREAMS", stream, ">"]
        # what a reply may hold besides the events: IDs, field names, RESP framing
        framing = 64 * batch_size
        self._native = (
            None if isinstance(redis, RedisCluster) else _native_client(redis, budget + framing)
        )
        self._blocked: asyncio.Future[list[StreamEntry]] | None = None
        self.interrupted = False  # a blocked read was cut short: re-read the pending list

    async def aclose(self) -> None:
        if self._native is not None:
            await self._native.aclose()

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

    async def _read_native(self, block_ms: int | None = None) -> list[StreamEntry]:
        native: Any = self._native
        if self.interrupted:  # a stop came before this read went out: it does not wait
            block_ms = None
        args = self._native_args if block_ms is None else ["BLOCK", block_ms, *self._native_args]
        reply: Any = await native.execute_command("XREADGROUP", *args)
        if isinstance(reply, dict):  # RESP3: {stream: entries}
            reply = list(reply.items())
        if not reply or not reply[0][1]:
            return []
        return [(entry_id.decode(), _event_values(fields)) for entry_id, fields in reply[0][1]]

    async def read_new(self, block_ms: int, stopping: asyncio.Event) -> list[StreamEntry]:
        """New entries for this consumer; when there are none, wait up to `block_ms` for
        some (or for `stopping`, or `interrupt()`)."""
        if self._native is None:
            return await self._read_scripted(block_ms, stopping)
        if stopping.is_set():
            return await self._read_native()
        # Redis hands new entries to a blocked XREADGROUP as they are added: no wake-up
        # and second read between an event's arrival and its reading.
        blocked = self._blocked = asyncio.ensure_future(self._read_native(block_ms))
        try:
            await asyncio.wait({blocked})
        finally:
            self._blocked = None
            if not blocked.done():  # this read was cancelled: so is its command
                blocked.cancel()
        if self.interrupted and not blocked.cancelled() and blocked.exception() is not None:
            return []  # interrupt() closed its connection
        return blocked.result()

    async def interrupt(self) -> None:
        """Cut a blocked read short (a stop must not wait for the block time) by closing
        its connection. Redis may have handed that read entries it never returned: they
        are pending for this consumer, and `interrupted` says to read the pending list
        again before stopping."""
        blocked = self._blocked
        if blocked is None or blocked.done() or self._native is None:
            return
        self.interrupted = True  # before the runner, woken by the close, looks
        # Closing the socket ends the read at once, even on a frozen server (a cancelled
        # command waited out the socket timeout there). A read not yet sent when its
        # connection closed connects again to send it: close again until it ends.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + INTERRUPT_SECONDS
        while not blocked.done() and loop.time() < deadline:
            await self._native.connection_pool.disconnect()
            await asyncio.wait({blocked}, timeout=INTERRUPT_RETRY_SECONDS)

    async def _read_scripted(self, block_ms: int, stopping: asyncio.Event) -> list[StreamEntry]:
        """`read_new` through the script (Redis Cluster), waiting with a plain `XREAD
        BLOCK`: a wake-up that delivers nothing, so a stop cuts it short."""
        entries, wait_from = await self.read(">")
        if entries or not wait_from or stopping.is_set():
            return entries
        # Only a wake-up: what it returns (one entry) is read again through the group.
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
