"""`RedisTaskStatusProjector`: the latest-status projection, kept by the ordering rule.

A batch is applied by a Lua script that declares every key it touches (execution
hashes and project indexes), applies the compare-and-set to each execution hash,
then `ZADD ... GT` to each index. On a standalone server the script runs once per
`CALL_SIZE` executions, with the index entries of those executions, each call
sent as soon as it is built so that Redis runs one while Python builds the next
(and decodes the batch read ahead); the last calls of a backlog's batch run while
the runner builds the next batch (see `RedisTaskStatusProjector`; how calls overlap:
sidecar.in_flight). On Redis
Cluster a batch is one pipeline of one call per hash slot, so every script stays
on a single slot; there an index may name an execution a moment before its hash
is written (another slot).

Before it goes to Redis a batch is coalesced: of the events of one execution,
only those that beat every earlier one in the batch could change the
projection when applied in order, and the last of them is where the execution
ends up. The script writes that one and counts the others against the stored
event, so the projection and the applied/stale counts are those of applying
every event in turn. It pays off when a batch holds several events of one
execution (short tasks); otherwise it costs a dict lookup per event.

Each item travels as one JSON argument (decoded by the server's cjson), and that text is
also the changes feed's entry: as thousands of separate arguments, even packed by
hiredis, the items cost Python 3 us more per event and saved Redis 0.4 us (bench/, the
interleaved drain). What the script writes per event is what Redis spends most on, so it
writes nothing per event that a reader can derive: the projects index lists projects
(`ProjectRegistry`), their counts and latest activity come from their own indexes
(`python -m bench.redis_cost` counts Redis's instructions per event).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import orjson
from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from sidecar.consumer import Flushed
from sidecar.events import STATUS_RANK, InvalidEntry, ValidEvent, stream_order
from sidecar.in_flight import CallsInFlight, Outcome
from sidecar.keys import (
    CHANGES_KEY,
    CHANGES_MAXLEN,
    JSON_FIELDS_FIELD,
    PROJECTS_KEY,
    execution_key,
    project_index_key,
)
from sidecar.metrics import Metrics, observe_many

# Executions per script call on a standalone server: a batch goes out in several calls,
# each sent as soon as it is built, so Redis runs one while Python builds the next.
CALL_SIZE = 64
# ...and fields at most, with one execution a call beyond it: a script call blocks every
# other client of Redis while it runs (64 events of 110,000 fields each took 3.2 s).
CALL_FIELDS = 8192
# A changes-feed entry holds the execution's item (its JSON, as the script got it) when it
# is at most this long, else only the hash's key (`reload`: readers read the hash).
CHANGE_BYTES = 64 * 1024
MAX_IN_FLIGHT = 4

# KEYS[1..n]      execution hashes, one per item
# KEYS[n+1..n+m]  sorted sets, one per item of ARGV[2]: project indexes, the projects index
# KEYS[n+m+1]     the changes stream, when ARGV[3] > 0
# ARGV[1]     seconds to keep a finished execution (0: forever)
# ARGV[2]     JSON array, one item per sorted set: [score, member, score, member, …]
# ARGV[3]     the changes feed: > 0 XADD to KEYS[n+m+1], for each execution written, its key
#             and item (MAXLEN ~ this; an item longer than CHANGE_BYTES as `reload` <its
#             key> instead); 0 return the item numbers written (Redis Cluster: the stream
#             lives on another slot, the projector adds them right after); < 0 no feed
# ARGV[4..n+3] one JSON item per execution:
#             [occurredAtMs, statusRank, eventId, earlier, field, value, …]
#             the event to store (field/value pairs: the whole new hash, every value a
#             string); earlier: [occurredAtMs, statusRank, eventId, …], the ordering keys of
#             the batch's events of that execution that it superseded, ascending. An item
#             apart: the feed entry carries its text as it came, at no cost to build.
# Returns how many events took effect (an earlier event counts if it beats the stored
# one); with ARGV[3] = 0, {that count, item numbers written…}.
COMPARE_AND_SET = (
    f"local CHANGE_BYTES = {CHANGE_BYTES}\n"
    + """
-- is the ordering key (ms, rank, id) greater than (ms2, rank2, id2)?
local function greater(ms, rank, id, ms2, rank2, id2)
  if ms ~= ms2 then return ms > ms2 end
  if rank ~= rank2 then return rank > rank2 end
  -- byte-wise, like Python's str order; Lua's own < follows the server's locale
  for j = 1, math.min(#id, #id2) do
    local x, y = string.byte(id, j), string.byte(id2, j)
    if x ~= y then return x > y end
  end
  return #id > #id2
end

-- ARGV[1] and ARGV[3] go to redis.call as they came: a Lua number would be formatted
-- with snprintf on every call
local ttl, maxlen = ARGV[1], ARGV[3]
local feed = tonumber(maxlen)
local n = #ARGV - 3
local applied = 0
local written = {0}
for i = 1, n do
  local key, text = KEYS[i], ARGV[3 + i]
  local item = cjson.decode(text)
  local ms, rank, id, earlier = tonumber(item[1]), tonumber(item[2]), item[3], item[4]
  local wins = 1 + #earlier / 3  -- events that take effect: all, unless one is stale
  local current = redis.call('HMGET', key, 'occurredAtMs', 'status', 'eventId')
  if current[1] then
    local ms2, id2 = tonumber(current[1]), current[3] or ''
    local rank2 = (current[2] == 'in_progress') and 0 or 1
    if not greater(ms, rank, id, ms2, rank2, id2) then
      wins = 0
    else
      for j = 1, #earlier, 3 do
        if greater(earlier[j], earlier[j + 1], earlier[j + 2], ms2, rank2, id2) then break end
        wins = wins - 1
      end
    end
  end
  if wins > 0 then
    if current[1] then redis.call('DEL', key) end  -- the whole hash is replaced
    -- in slices: unpack() of thousands of fields would overflow Lua's stack
    for first = 5, #item, 200 do
      redis.call('HSET', key, unpack(item, first, math.min(first + 199, #item)))
    end
    if ttl ~= '0' and rank == 1 then redis.call('EXPIRE', key, ttl) end
    applied = applied + wins
    if feed < 0 then
      -- no feed (the benchmark's baseline)
    elseif feed > 0 then
      if #text <= CHANGE_BYTES then
        redis.call('XADD', KEYS[#KEYS], 'MAXLEN', '~', maxlen, '*', key, text)
      else
        redis.call('XADD', KEYS[#KEYS], 'MAXLEN', '~', maxlen, '*', 'reload', key)
      end
    else
      written[#written + 1] = i
    end
  end
end
for i, members in ipairs(cjson.decode(ARGV[2])) do
  local key = KEYS[n + i]
  for first = 1, #members, 200 do
    redis.call('ZADD', key, 'GT', unpack(members, first, math.min(first + 199, #members)))
  end
end
if feed ~= 0 then return applied end
written[1] = applied
return written
"""
)


def coalesce(events: Sequence[ValidEvent]) -> dict[str, list[ValidEvent]]:
    """Per execution, in batch order, the events that beat every earlier event of their
    execution in the batch: applied in turn, no other event could take effect."""
    runs: dict[str, list[ValidEvent]] = {}
    for event in events:
        run = runs.get(event.execution_id)
        if run is None:
            runs[event.execution_id] = [event]
        elif event.ordering_key > run[-1].ordering_key:
            run.append(event)
    return runs


def _script_item(run: list[ValidEvent]) -> list[object]:
    """An execution's item for the script: its last event, with every value a string,
    after the ordering keys of the events it superseded."""
    event = run[-1]
    earlier: list[object] = []
    for superseded in run[:-1]:
        earlier += superseded.ordering_key
    item: list[object] = [event.occurred_at_ms, STATUS_RANK[event.status], event.event_id, earlier]
    encoded: list[str] = []
    for name, value in event.fields.items():
        item.append(name)
        if isinstance(value, str):
            item.append(value)
        else:
            item.append(orjson.dumps(value).decode())
            encoded.append(name)
    # Which fields a reader decodes: without it, a stored "null" could be the string or
    # JSON's null (read paths, sidecar/read/).
    item += ["occurredAtMs", str(event.occurred_at_ms), "streamId", event.entry_id]
    item += [JSON_FIELDS_FIELD, orjson.dumps(encoded).decode()]
    return item


@dataclass
class _ScriptCall:
    """The keys and arguments of one EVALSHA."""

    keys: list[str] = field(default_factory=list)
    items: list[list[object]] = field(default_factory=list)
    index_keys: list[str] = field(default_factory=list)
    index_members: list[list[str]] = field(default_factory=list)
    # standalone: the executions, and every event of the batch the call decides
    execution_ids: list[str] = field(default_factory=list)
    events: list[ValidEvent] = field(default_factory=list)
    # the script adds the changes feed's entries itself (standalone server); on a cluster
    # it returns which items it wrote, and the projector adds them (`_add_changes`)
    changes_inline: bool = True
    # what the call adds to the projects index, `[score, project, …]`
    projects: list[str] = field(default_factory=list)
    _texts: list[bytes] | None = None

    def add_execution(self, key: str, run: list[ValidEvent]) -> None:
        self.keys.append(key)
        self.items.append(_script_item(run))

    def add_index(self, key: str, members: list[str]) -> None:
        self.index_keys.append(key)
        self.index_members.append(members)

    def add_projects(self, members: list[str]) -> None:
        """Projects new to the projects index (`ProjectRegistry.new`)."""
        if members:
            self.add_index(PROJECTS_KEY, members)
            self.projects = members

    def args(self, sha: str, ttl: int) -> list[str | int | bytes]:
        keys = self.keys + self.index_keys
        if self.changes_inline:
            keys.append(CHANGES_KEY)
        members = orjson.dumps(self.index_members)
        feed = CHANGES_MAXLEN if self.changes_inline else 0
        return ["EVALSHA", sha, len(keys), *keys, ttl, members, feed, *self.texts()]

    def texts(self) -> list[bytes]:
        """Each item's JSON (the script's arguments, and the changes feed's entries)."""
        if self._texts is None:
            self._texts = [orjson.dumps(item) for item in self.items]
        return self._texts


def index_members(events: Sequence[ValidEvent]) -> dict[str, list[str]]:
    """Per project index, `[score, member, …]`: each execution once, at its greatest
    occurredAtMs of the batch (ZADD GT keeps the greatest score, so this leaves each
    index as per-event ZADDs would)."""
    indexes: dict[str, dict[str, int]] = {}
    for event in events:
        index = indexes.get(event.project)
        if index is None:
            index = indexes[event.project] = {}
        if index.get(event.execution_id, -1) < event.occurred_at_ms:
            index[event.execution_id] = event.occurred_at_ms
    members: dict[str, list[str]] = {}
    for project, scores in indexes.items():
        flat = members[project] = []
        for execution_id, score in scores.items():
            # a string: the script hands it to ZADD as is (a Lua number would be
            # formatted with snprintf)
            flat += (str(score), execution_id)
    return members


class ProjectRegistry:
    """Which projects the projects index already holds, as far as this projector knows:
    a project goes to `PROJECTS_KEY` with the first call that carries it, then again only
    after `REFRESH_SECONDS` (so a deleted index heals). Readers take a project's latest
    activity from the top of its own index, so the projects index need not follow every
    event: a `ZADD` of a hundred projects per call was a fifth of Redis's time per event."""

    REFRESH_SECONDS = 60.0
    LIMIT = 10_000  # projects remembered; past it, forgotten all at once

    def __init__(self) -> None:
        self._written: dict[str, float] = {}

    def new(self, members: dict[str, list[str]]) -> list[str]:
        """`[score, project, …]` for the projects of `members` (index members by project)
        to write, each at score 0: the index lists projects, its scores mean nothing (an
        index written before this had each project's latest activity; `GT` keeps it)."""
        now = time.monotonic()
        flat: list[str] = []
        for project in members:
            written = self._written.get(project)
            if written is None or now - written > self.REFRESH_SECONDS:
                flat += ("0", project)
        return flat

    def written(self, members: list[str]) -> None:
        """The projects of `new`'s `members` are in the index now."""
        if len(self._written) > self.LIMIT:
            self._written.clear()
        now = time.monotonic()
        for project in members[1::2]:
            self._written[project] = now


def calls_in_chunks(
    runs: dict[str, list[ValidEvent]], events: Sequence[ValidEvent], projects: ProjectRegistry
) -> Iterator[_ScriptCall]:
    """A batch's calls on a standalone server, built lazily: `CALL_SIZE` executions each
    (fewer when they hold over `CALL_FIELDS` fields), with the index entries of every
    event of those executions (so an index never names an execution before its hash is
    written, without waiting for the batch's other calls)."""
    chunks: list[list[str]] = []
    fields = 0
    for execution_id, run in runs.items():
        width = len(run[0].fields) if len(run) == 1 else max(len(e.fields) for e in run)
        if not chunks or len(chunks[-1]) == CALL_SIZE or fields + width > CALL_FIELDS:
            chunks.append([])
            fields = 0
        chunks[-1].append(execution_id)
        fields += width
    chunk_of = {execution_id: n for n, chunk in enumerate(chunks) for execution_id in chunk}
    events_of: list[list[ValidEvent]] = [[] for _ in chunks]
    for event in events:
        events_of[chunk_of[event.execution_id]].append(event)
    for chunk, chunk_events in zip(chunks, events_of, strict=True):
        call = _ScriptCall(execution_ids=chunk, events=chunk_events)
        for execution_id in chunk:
            call.add_execution(execution_key(execution_id), runs[execution_id])
        members = index_members(chunk_events)
        for project, scored in members.items():
            call.add_index(project_index_key(project), scored)
        call.add_projects(projects.new(members))
        yield call


def calls_by_slot(
    runs: dict[str, list[ValidEvent]], events: Sequence[ValidEvent], projects: ProjectRegistry
) -> list[_ScriptCall]:
    """A batch's calls on a cluster: one per hash slot, so each script stays on its slot."""
    calls: defaultdict[int, _ScriptCall] = defaultdict(lambda: _ScriptCall(changes_inline=False))
    for execution_id, run in runs.items():
        key = execution_key(execution_id)
        calls[key_slot(key.encode())].add_execution(key, run)
    members = index_members(events)
    for project, scored in members.items():
        key = project_index_key(project)
        calls[key_slot(key.encode())].add_index(key, scored)
    new = projects.new(members)
    if new:
        calls[key_slot(PROJECTS_KEY.encode())].add_projects(new)
    return list(calls.values())


class RedisTaskStatusProjector:
    """Applies batches of events to the projection; a `BatchHandler` for the runner.

    On a standalone server a flush of a batch that takes several calls returns once they
    are all submitted, not finished: the last ones run on Redis while the runner
    acknowledges, reads and builds the next batch, and a later flush hands back their
    entries. Calls holding the same execution still run one after another, in stream
    order (sidecar.in_flight).
    """

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
        self._cluster = isinstance(redis, RedisCluster)
        self._sha = hashlib.sha1(COMPARE_AND_SET.encode()).hexdigest()
        self._buffer: list[ValidEvent] = []
        # handed back at the next flush: entries durable, events Redis refused
        self._settled: list[str] = []
        self._rejected: list[InvalidEntry] = []
        self.in_flight = CallsInFlight(self._apply_one, limit=MAX_IN_FLIGHT)
        self.projects = ProjectRegistry()

    async def prepare(self) -> None:
        pass

    def add(self, events: Sequence[ValidEvent]) -> None:
        self._buffer.extend(events)

    def seconds_until_due(self) -> float | None:
        return 0.0 if self._buffer or self.in_flight else None

    async def flush(self, *, force: bool) -> Flushed:
        # Calls of earlier flushes that finished: a lost one's events join this batch,
        # sent again now (after a Redis outage, with no failure raised a second time).
        self._take(self.in_flight.settle())
        events, self._buffer = self._buffer, []
        if await self._send(events) <= 1 or force:  # finish: no backlog to overlap with
            await self.in_flight.wait()
        loss = self._take(self.in_flight.settle())
        if loss is not None:
            # every call out finishes first: none is left running behind the retry
            await self.in_flight.wait()
            self._take(self.in_flight.settle())
            raise loss  # the runner retries; what was settled is handed back then
        flushed = Flushed(self._settled, self._rejected)
        self._settled, self._rejected = [], []
        return flushed

    async def apply(self, events: Sequence[ValidEvent]) -> int:
        """Apply events, waiting for them; returns how many took effect (as many as
        applying them in turn). Raises the first failure, a lost connection before a
        refusal. For a projector that is not flushing (replay, tests): it settles
        every call out."""
        await self._send(list(events))
        await self.in_flight.wait()
        outcomes = self.in_flight.settle()
        for outcome in sorted(outcomes, key=lambda outcome: not outcome.unsent):
            if outcome.error is not None:
                raise outcome.error
        return sum(outcome.applied for outcome in outcomes)

    async def _send(self, events: list[ValidEvent]) -> int:
        """Submit the calls that apply `events`, each let out before the next is built
        (so Redis runs one while Python builds the next); returns how many. If this is
        cancelled, the events of the calls not submitted go back to the buffer."""
        if not events:
            return 0
        runs = coalesce(events)
        if self._cluster:  # one pipeline of one call per hash slot
            await self.in_flight.room()
            calls = calls_by_slot(runs, events, self.projects)
            self.in_flight.submit(events, list(runs), partial(self._execute, calls))
            return 1
        chunks = calls_in_chunks(runs, events, self.projects)
        count = 0
        call: _ScriptCall | None = None
        try:
            for call in chunks:
                await self.in_flight.room()
                self.in_flight.submit(
                    call.events, call.execution_ids, partial(self._execute, [call])
                )
                call = None
                count += 1
                await asyncio.sleep(0)  # let it go out now
            await self.in_flight.room()  # return once every call is out
        finally:
            unsent = [] if call is None else call.events
            self._put_back(unsent + [event for rest in chunks for event in rest.events])
        return count

    def _take(self, outcomes: list[Outcome]) -> BaseException | None:
        """Count settled calls and queue their entries for acknowledgement, their refused
        events for dead-lettering; what was not sent goes back to the buffer. Returns
        the first failure that left events unsent."""
        loss: BaseException | None = None
        unsent: list[ValidEvent] = []
        for outcome in outcomes:
            if outcome.done:
                self._record(outcome.done, outcome.applied)
            self._rejected += outcome.rejected
            if outcome.unsent:
                loss = loss or outcome.error
                unsent += outcome.unsent
        self._put_back(unsent)
        return loss

    def _put_back(self, events: list[ValidEvent]) -> None:
        """Return events to the buffer (to be sent again), keeping it in stream order."""
        if events:
            self._buffer = sorted(self._buffer + events, key=lambda e: stream_order(e.entry_id))

    def _record(self, events: list[ValidEvent], applied: int) -> None:
        """Count settled events and queue their entries for acknowledgement."""
        now = time.time()
        observe_many(
            self.metrics.end_to_end_latency.labels(self.group),
            [now - int(event.entry_id.partition("-")[0]) / 1000 for event in events],
        )
        observe_many(
            self.metrics.event_age.labels(self.group),
            [now - event.occurred_at_ms / 1000 for event in events],
        )
        self.metrics.applied.labels(self.group).inc(applied)
        self.metrics.stale.labels(self.group).inc(len(events) - applied)
        self._settled += [event.entry_id for event in events]

    async def _apply_one(self, event: ValidEvent) -> int:
        """One event's calls, waited for (a refused call's fallback, inside its task)."""
        runs = coalesce([event])
        if self._cluster:
            return await self._execute(calls_by_slot(runs, [event], self.projects))
        return await self._execute(list(calls_in_chunks(runs, [event], self.projects)))

    async def _execute(self, calls: list[_ScriptCall]) -> int:
        """Run script calls: one EVALSHA on a standalone server, one pipeline on a
        cluster. A restarted or failed-over server lost its script cache: load it."""
        try:
            applied = await self._evalsha(calls)
        except NoScriptError:
            await self.redis.script_load(COMPARE_AND_SET)
            applied = await self._evalsha(calls)
        for call in calls:
            self.projects.written(call.projects)
        return applied

    async def _evalsha(self, calls: list[_ScriptCall]) -> int:
        ttl = self.finished_ttl_seconds
        if not self._cluster:
            (call,) = calls  # a chunk's call
            return int(await self.redis.execute_command(*call.args(self._sha, ttl)))
        async with self.redis.pipeline(transaction=False) as pipe:
            for call in calls:
                # execute_command: redis-py's cluster pipeline refuses `pipe.evalsha`
                # (it routes EVALSHA by its keys all the same)
                pipe.execute_command(*call.args(self._sha, ttl))
            results: list[list[int]] = await pipe.execute()
        changes = [
            (call.keys[int(number) - 1], call.texts()[int(number) - 1])
            for call, result in zip(calls, results, strict=True)
            for number in result[1:]
        ]
        await self._add_changes(changes)
        return sum(int(result[0]) for result in results)

    async def _add_changes(self, changes: list[tuple[str, bytes]]) -> None:
        """Redis Cluster: the changes feed's entries, pipelined right after the script
        calls (the stream is on one slot, the executions on all of them). Lost if the
        connection drops in between: the retried batch finds nothing left to change."""
        if not changes:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, text in changes:
                entry = [key, text] if len(text) <= CHANGE_BYTES else ["reload", key]
                pipe.execute_command(
                    "XADD", CHANGES_KEY, "MAXLEN", "~", CHANGES_MAXLEN, "*", *entry
                )  # fmt: skip
            await pipe.execute()
