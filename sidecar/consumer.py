"""The consumer-group runner every worker shares.

It owns everything about a Redis consumer group that is not the worker's
effect: creating the group, re-reading the consumer's own pending entries on
start, blocking reads in batches, claiming the pending entries of consumers
that died, dead-lettering invalid entries, acknowledging only what the worker
reports durable, reconnecting with capped backoff, and draining on stop.

A worker is a `BatchHandler`: `add` buffers decoded events in memory (it cannot
fail), `flush` makes some or all of them durable and returns their entry IDs.
`flush` must be safe to call again after it raised: the runner retries it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.errors import WorkerError
from sidecar.events import (
    DEAD_LETTER_EVENT_BYTES,
    DEFAULT_LIMITS,
    EventLimits,
    EventValue,
    InvalidEntry,
    Oversized,
    ValidEvent,
    decode_values,
    entry_ms,
)
from sidecar.logs import ContextLogger
from sidecar.metrics import Metrics

log = logging.getLogger(__name__)

# Errors after which the connection is retried; anything else is a bug and is
# retried too, but logged with its traceback.
TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)

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


# KEYS[1] stream, KEYS[2] dead-letter stream; ARGV[1] group, ARGV[2] entry ID, ARGV[3]
# the dead-letter stream's approximate cap (0: none), ARGV[4…] the dead-letter entry's
# fields. Dead-letters only what this call acknowledged.
ACK_THEN_DEAD_LETTER = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  if ARGV[3] ~= '0' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
  else
    redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
  end
  return 1
end
return 0
"""

# Reads entries for the group with a bound on the reply's size, so that no event, and no
# batch of events, can grow the sidecar's memory past what it can hold.
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

# Entries decoded between two turns of the event loop when a batch is read ahead.
DECODE_SLICE = 50


class BatchHandler(Protocol):
    """What a worker does with the valid events the runner hands it."""

    async def prepare(self) -> None:
        """Check the worker can do its job before reading (raise `WorkerError` if not)."""

    def add(self, events: Sequence[ValidEvent]) -> None:
        """Buffer events in memory."""

    async def flush(self, *, force: bool) -> list[str]:
        """Make buffered events durable; with force, all of them. Returns acknowledged IDs."""

    def seconds_until_due(self) -> float | None:
        """When the next time-based flush is due, or None if nothing is buffered."""

    def take_rejected(self) -> list[InvalidEntry]:
        """Events the last flushes gave up on (to be dead-lettered), emptying the list."""


class GroupStart(Protocol):
    """Optional, as a handler's `group_start`: where its group starts when the runner
    has to create it (the archiver: at its watermark, sidecar.watermark)."""

    async def start_id(self) -> str | None:
        """The ID to create the group at; None: the stream's start."""

    async def created(self, start_id: str | None) -> None:
        """The runner just created the group there (log it, count it)."""


@dataclass
class Batch:
    """Entries read in one call, decoded."""

    valid: list[ValidEvent] = field(default_factory=list)
    invalid: list[InvalidEntry] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.valid) + len(self.invalid)


@dataclass(frozen=True)
class RunnerOptions:
    batch_size: int = 500
    block_ms: int = 5000
    claim_idle_ms: int = 60_000
    # Invalid entries: to the dead-letter stream, and malformed optional fields counted
    # (projector); or just acknowledged (archiver, which would count them twice).
    dead_letter: bool = True
    dead_letter_maxlen: int = 100_000
    limits: EventLimits = DEFAULT_LIMITS
    read_budget_bytes: int = READ_BUDGET_BYTES
    backoff_initial: float = 0.1
    backoff_max: float = 10.0


class ConsumerGroupRunner:
    """Runs one consumer of one group on one stream, feeding a `BatchHandler`."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        *,
        stream: str,
        group: str,
        consumer: str,
        handler: BatchHandler,
        metrics: Metrics,
        options: RunnerOptions | None = None,
        worker: str | None = None,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.handler = handler
        self.metrics = metrics
        self.options = options or RunnerOptions()
        self.dead_letter_key = f"{stream}:dead-letter"
        self.ready = asyncio.Event()
        self.failure: str | None = None  # last error while not ready, for /readyz
        self._stopping = asyncio.Event()
        self._to_ack: list[str] = []
        self._invalid: list[InvalidEntry] = []
        self._recovered = False
        self._force_flush = False
        self._redis_lost = False
        self._next_claim = 0.0
        self._warned: set[str] = set()  # optional fields whose first warning was logged
        # worker: "projector" or "archiver" (the log's "worker" key); consumer: this replica.
        context = {"worker": worker or group, "group": group, "consumer": consumer}
        self._log = ContextLogger(log, context)
        metrics.init_group(group, dead_letter=self.options.dead_letter)

    # ---- lifecycle -------------------------------------------------------

    async def run(self) -> None:
        """Consume until `stop()`; then flush, acknowledge and return."""
        backoff = self.options.backoff_initial
        while True:
            try:
                await self.ensure_group()
                await self.handler.prepare()
                if not self._recovered:
                    await self._recover_own_pending()
                    self._recovered = True
                await self._settle()  # invalid entries and acknowledgements still owed
                self._mark_ready()
                backoff = self.options.backoff_initial
                await self._consume()
                await self._settle(force=True)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._mark_not_ready(exc)
                # A reply lost with the connection may have delivered entries we never
                # saw: re-read the whole pending list on the way back (the handler
                # ignores what it already holds; the archiver finds what it wrote).
                self._recovered = False
                delay = backoff * (0.5 + random.random() / 2)
                backoff = min(backoff * 2, self.options.backoff_max)
                if await self._wait_stopping(delay):
                    # Stopping while the failure lasts: whatever is unacknowledged stays
                    # pending and is re-read by this consumer (or claimed) later.
                    if self._to_ack or self._invalid:
                        self._log.warning(
                            "stopping with %d entries unacknowledged; they stay pending",
                            len(self._to_ack) + len(self._invalid),
                        )
                    return

    async def _consume(self) -> None:
        """Read, hand over, flush, acknowledge, until stopped.

        A handler with `read_ahead` gets the next batch read and decoded while its
        flush of the current one waits on Redis (the projector: decoding overlaps the
        server's script). Not the archiver: its pending list must not hold entries
        its buffer has not seen when a dead consumer's entries are claimed.
        """
        ahead: asyncio.Future[Batch] | None = None
        try:
            while not self._stopping.is_set():
                await self._claim_from_dead_consumers()
                batch = await ahead if ahead is not None else await self._read_batch()
                ahead = None
                await self._accept(batch, force=False)
                if batch.size and getattr(self.handler, "read_ahead", False):
                    ahead = asyncio.ensure_future(self._read_batch())
                    await asyncio.sleep(0)  # let its read go out before the flush's commands
                await self._ack(await self._flush(force=False))
                await self._dispose_invalid()
            if ahead is not None:  # the batch in hand is finished, not dropped
                batch, ahead = await ahead, None
                await self._accept(batch, force=False)
        finally:
            if ahead is not None:  # failing: its entries stay pending and are re-read
                await asyncio.gather(ahead, return_exceptions=True)

    async def _read_batch(self) -> Batch:
        """Read and decode a batch, giving way to the loop every `DECODE_SLICE` entries: a
        batch read ahead would otherwise hold the loop for milliseconds of decoding, during
        which no script call goes out and the server's queue of them runs dry."""
        entries = await self._read_new()
        batch = self._decode(entries[:DECODE_SLICE])
        for start in range(DECODE_SLICE, len(entries), DECODE_SLICE):
            await asyncio.sleep(0)
            more = self._decode(entries[start : start + DECODE_SLICE])
            batch.valid += more.valid
            batch.invalid += more.invalid
        return batch

    async def stop(self) -> None:
        """Ask the loop to stop reading; `run()` returns once the batch in hand is settled."""
        self._stopping.set()

    async def _wait_stopping(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def _mark_ready(self) -> None:
        if self.failure is not None:
            self._log.info("recovered from: %s", self.failure)
        if self._redis_lost:
            self.metrics.redis_reconnects.labels(self.group).inc()
            self._redis_lost = False
        self.failure = None
        self.ready.set()
        self.metrics.redis_connected.labels(self.group).set(1)

    def _mark_not_ready(self, exc: Exception) -> None:
        failure = str(exc) if isinstance(exc, WorkerError) else f"{type(exc).__name__}: {exc}"
        if failure != self.failure:  # log a failure once, not at every retry
            if isinstance(exc, ResponseError) and "NOGROUP" in failure:
                # The group was lost; ensure_group logs its re-creation as a warning.
                self._log.info("consumer group gone (%s); creating it again", failure)
            elif isinstance(exc, WorkerError):
                self._log.error("%s; retrying with backoff", failure)
            elif isinstance(exc, TRANSIENT):
                self._log.warning("Redis unavailable, retrying with backoff: %s", failure)
            else:
                self._log.exception("worker error, retrying with backoff")
        self.failure = failure
        self.ready.clear()
        if isinstance(exc, TRANSIENT) and not isinstance(exc, WorkerError):
            self._redis_lost = True
            self.metrics.redis_connected.labels(self.group).set(0)

    # ---- reading ---------------------------------------------------------

    async def ensure_group(self) -> None:
        """Create the stream and the group unless they exist: from the stream's start, or
        where the handler's `group_start` says (also when the group was lost mid-run)."""
        hook: GroupStart | None = getattr(self.handler, "group_start", None)
        start = await hook.start_id() if hook is not None else None
        try:
            await self.redis.xgroup_create(self.stream, self.group, id=start or "0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return
        if hook is not None:
            await hook.created(start)
        else:
            self._log.info("created consumer group %s on %s", self.group, self.stream)

    async def _recover_own_pending(self) -> None:
        """Re-read this consumer's whole pending list and settle it as one batch (on
        start, and after any failure).

        One batch, so a worker that groups entries (the archiver) forms exactly
        the groups it formed before a crash; see README "Exactly once".
        """
        entries = await self._read_own_pending()
        if entries:
            self._log.info("re-reading %d pending entries of this consumer", len(entries))
            await self._accept(self._decode(entries), force=True)

    async def _read_own_pending(self) -> list[StreamEntry]:
        entries: list[StreamEntry] = []
        cursor = "0"
        while page := (await self._read(cursor))[0]:
            entries.extend(page)
            cursor = page[-1][0]
        return entries

    async def _read_new(self) -> list[StreamEntry]:
        """New entries for this consumer; when there are none, wait (up to the block time,
        shorter when the handler has a flush due) for the stream to grow, then read."""
        entries, wait_from = await self._read(">")
        if entries or not wait_from:
            return entries
        block = self.options.block_ms
        due = self.handler.seconds_until_due()
        if due is not None:
            block = max(1, min(block, int(due * 1000)))
        # Only a wake-up: what it returns (one entry) is read again through the group. It
        # delivers nothing, so a stop cuts it short (redis-py drops a connection whose
        # command was cancelled): stopping an idle consumer does not wait for the block.
        wake = asyncio.ensure_future(
            self.redis.xread({self.stream: wait_from}, count=1, block=block)
        )
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({wake, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not wake.done():
            wake.cancel()
            await asyncio.gather(wake, return_exceptions=True)
            return []
        wake.result()  # a lost connection, say
        if self._stopping.is_set():  # stopped meanwhile: read nothing more
            return []
        return (await self._read(">"))[0]

    async def _read(self, cursor: str) -> tuple[list[StreamEntry], str]:
        """One bounded read (`READ_BOUNDED`): new entries (`>`) or own pending ones after
        `cursor`; and, when nothing new was there, the ID to wait from."""
        options = self.options
        args = (
            READ_BOUNDED_SHA,
            1,
            self.stream,
            self.group,
            self.consumer,
            options.batch_size,
            cursor,
            options.limits.max_event_bytes,
            DEAD_LETTER_EVENT_BYTES,
            # room for a few events of the largest size: a read always takes several
            max(options.read_budget_bytes, 4 * options.limits.max_event_bytes),
        )
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

    def _decode(self, entries: Sequence[StreamEntry]) -> Batch:
        batch = Batch()
        limits = self.options.limits
        # entries come in stream order: the first one's time bounds every later one's
        first = entry_ms(entries[0][0]) if entries else None
        at_least = first or 0
        for entry_id, values in entries:
            if values is None:  # a pending entry deleted from the stream meanwhile
                batch.invalid.append(InvalidEntry(entry_id, None, "entry no longer in the stream"))
                continue
            decoded = decode_values(entry_id, values, limits, added_at_least=at_least)
            if isinstance(decoded, InvalidEntry):
                batch.invalid.append(decoded)
            else:
                if decoded.warnings and self.options.dead_letter:
                    self._warn(decoded)
                batch.valid.append(decoded)
        return batch

    def _warn(self, event: ValidEvent) -> None:
        """Count a valid event's malformed optional fields; log the first of each field."""
        for name in event.warnings:
            self.metrics.event_warnings.labels(name).inc()
            if name not in self._warned:
                self._warned.add(name)
                self._log.warning(
                    "event field %s is not in the contract's shape; kept as sent"
                    " (counted in task_tracking_event_warnings_total, logged once)",
                    name,
                    extra={"stream_id": event.entry_id, "execution_id": event.execution_id},
                )

    async def _accept(self, batch: Batch, *, force: bool) -> None:
        """Hand a decoded batch to the handler and settle what is in hand."""
        if not batch.size:
            return
        self.metrics.read.labels(self.group).inc(batch.size)
        self.metrics.batch_size.labels(self.group).observe(batch.size)
        self.handler.add(batch.valid)
        self._invalid.extend(batch.invalid)
        self._force_flush = self._force_flush or force
        await self._settle()

    async def _settle(self, *, force: bool = False) -> None:
        """Finish what is in hand: invalid entries, a forced flush, unsent acknowledgements.

        Safe to call again after it raised; a forced flush stays owed until it succeeds.
        """
        if force or self._force_flush:
            self._to_ack.extend(await self._flush(force=True))
            self._force_flush = False
        await self._dispose_invalid()
        await self._ack([])

    async def _flush(self, *, force: bool) -> list[str]:
        """The handler's flush; what it gave up on joins the invalid entries."""
        done = await self.handler.flush(force=force)
        self._invalid.extend(self.handler.take_rejected())
        return done

    async def _ack(self, ids: list[str]) -> None:
        self._to_ack.extend(ids)
        if self._to_ack:
            await self.redis.xack(self.stream, self.group, *self._to_ack)
            self._to_ack.clear()

    async def _dispose_invalid(self) -> None:
        if not self._invalid:
            return
        if not self.options.dead_letter:
            self.metrics.invalid_skipped.labels(self.group).inc(len(self._invalid))
            self._to_ack.extend(entry.entry_id for entry in self._invalid)
            self._invalid.clear()
            return
        for entry in self._invalid:
            self._log.warning(
                "dead-lettering entry: %s",
                entry.reason,
                extra={"stream_id": entry.entry_id, "execution_id": _execution_id(entry.raw)},
            )
        # Standalone Redis: one script per entry acknowledges it and, only if that
        # acknowledgement took, dead-letters it: a retry after a lost reply, or an
        # entry someone else settled, adds nothing. A cluster keeps the two streams
        # on different slots: dead-letter first, then acknowledge (at least once).
        standalone = isinstance(self.redis, Redis)
        maxlen = self.options.dead_letter_maxlen
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry in self._invalid:
                fields = [*entry.dead_letter_fields(), "group", self.group]
                if standalone:
                    pipe.eval(
                        ACK_THEN_DEAD_LETTER,
                        2,
                        self.stream,
                        self.dead_letter_key,
                        self.group,
                        entry.entry_id,
                        maxlen,
                        *fields,
                    )
                else:
                    cap: list[str | int] = ["MAXLEN", "~", maxlen] if maxlen else []
                    pipe.execute_command("XADD", self.dead_letter_key, *cap, "*", *fields)
            results = await pipe.execute()
        if standalone:
            dead_lettered = sum(results)
        else:
            await self.redis.xack(self.stream, self.group, *(e.entry_id for e in self._invalid))
            dead_lettered = len(self._invalid)
        self.metrics.dead_lettered.labels(self.group).inc(dead_lettered)
        self._invalid.clear()

    # ---- claiming --------------------------------------------------------

    async def _claim_from_dead_consumers(self) -> None:
        """Take over the pending entries of consumers idle longer than the claim time.

        A dead consumer's pending list is claimed whole, in one XCLAIM, and
        settled as one batch after this consumer's own buffer is flushed, for
        the same reason own pending entries are re-read as one batch.
        """
        now = time.monotonic()
        if now < self._next_claim:
            return
        self._next_claim = now + self.options.claim_idle_ms / 4000
        idle_ms = self.options.claim_idle_ms
        consumers: Any = await self.redis.xinfo_consumers(self.stream, self.group)
        for info in consumers:
            name = _text(info["name"])
            if name == self.consumer or int(info["idle"]) < idle_ms:
                continue
            if int(info["pending"]) == 0:
                await self.redis.eval(
                    DELETE_IDLE_CONSUMER, 1, self.stream, self.group, name, idle_ms
                )
                continue
            ids = await self._pending_ids(name, int(info["pending"]))
            self._to_ack.extend(await self._flush(force=True))
            await self._dispose_invalid()
            await self._ack([])
            # IDs only: the entries are then read through the bounded read, like any other
            claimed: Any = await self.redis.xclaim(
                self.stream, self.group, self.consumer, idle_ms, list[Any](ids), justid=True
            )
            if claimed:
                self._log.warning(
                    "claimed %d pending entries of idle consumer %s", len(claimed), name
                )
                self.metrics.claimed.labels(self.group).inc(len(claimed))
                wanted = {_text(entry_id) for entry_id in claimed}
                # not a batch read ahead, which is pending here too and handled as read
                entries = [e for e in await self._read_own_pending() if e[0] in wanted]
                await self._accept(self._decode(entries), force=True)

    async def _pending_ids(self, consumer: str, count: int) -> list[str]:
        rows: Any = await self.redis.xpending_range(
            self.stream, self.group, min="-", max="+", count=count, consumername=consumer
        )
        return [_text(row["message_id"]) for row in rows]


def _execution_id(raw: bytes | None) -> str | None:
    """The executionId of an invalid event, when it has a readable one (for the log)."""
    try:
        data = orjson.loads(raw) if raw is not None else None
    except orjson.JSONDecodeError:
        return None
    value = data.get("executionId") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
