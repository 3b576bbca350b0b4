"""`ArchiveWatermark`: how far the archiver archived, so a lost group is re-created there.

A consumer group's position and pending list live in Redis and can be lost
(`XGROUP DESTROY`, a restore without the group). Re-created at `0`, the group
would deliver again everything still in the stream, and the archiver would
write it again under new keys (its read-back only finds an object when a run
starts at the same first entry). So the archiver keeps, in the hash
`<stream>:archived`:

- `*`, the *through* mark: every entry at or below it that the group delivered
  is archived (or was invalid). The archiver computes it as the ID just below
  its oldest buffered entry (or the greatest entry it was handed, when nothing
  is buffered), capped below the oldest entry other consumers of the group hold
  pending, so it is true for the whole group, not only for this replica.
- one field per buffer, `<owner>/<repo>/<YYYY-MM-DD>`: every entry of that
  project and day up to this ID that the group delivered is archived (the
  ID just below the buffer's oldest entry, or its newest when it is empty,
  capped like the through mark). Buffers flush at different times, so above
  the through mark some entries are archived and some are not; these marks
  tell which. Fields at or below the through mark say nothing more and are
  dropped, so the hash stays small.
- `*redelivery`, set only when the group was found missing: the greatest
  per-buffer mark at that moment. Up to it, re-delivered entries at or below
  their buffer's mark are acknowledged without writing; the per-event test
  costs nothing in normal operation, when nothing archived is re-delivered.
  It is dropped once the through mark passes it.

Every mark is true for the whole group (the cap), never only for the replica
that wrote it: a replica that died holding older entries cannot have them
skipped. With one replica nothing caps the marks and a lost group costs
nothing; with several, marks sit mostly at the through mark, and what was
archived above it before the loss is re-delivered and found by the read-back
where runs start at the same entry, else written twice (README, "Losing the
archiver group").

Marks are written after a flush that wrote or confirmed objects and before
those entries are acknowledged: a lost acknowledgement only re-delivers
entries the marks then cover. One script moves them, forward only (stream IDs
compared as numbers), so a late or repeated write cannot move a mark back.

A single "greatest acknowledged ID" would not do: re-created there, the group
would skip entries of buffers not yet flushed (lost); a single "contiguous"
low mark would re-deliver entries of buffers already flushed (written twice).
"""

from __future__ import annotations

import logging
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ResponseError

from sidecar.metrics import Metrics

log = logging.getLogger(__name__)

THROUGH = "*"
REDELIVERY = "*redelivery"
# Greater than any entry ID: "nothing buffered" in an ArchiveBatch's oldest entry.
NO_ENTRY = (1 << 64, 0)
MAX_SEQUENCE = (1 << 64) - 1

# KEYS[1] the marks hash. ARGV[1] the through mark ('' leaves it), then field, ID pairs.
# Moves each mark forward only, drops per-buffer fields at or below the through mark and
# the redelivery bound once passed. Returns the whole hash while a re-created group may
# re-deliver archived entries (every replica then learns the marks), else the through
# mark alone. IDs are compared as (milliseconds, sequence) numbers written in decimal:
# by length, then as strings (Lua numbers are doubles and cannot hold a 64-bit sequence).
ADVANCE_MARKS = """
local function parts(id)
  return string.match(id, '^(%d+)-(%d+)$')
end
local function below(a, b)
  local am, as = parts(a)
  local bm, bs = parts(b)
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
local through = redis.call('HMGET', KEYS[1], '*')[1]
if ARGV[1] ~= '' and (not through or below(through, ARGV[1])) then
  through = ARGV[1]
  redis.call('HSET', KEYS[1], '*', through)
end
for i = 2, #ARGV, 2 do
  local name, id = ARGV[i], ARGV[i + 1]
  if not through or below(through, id) then
    local old = redis.call('HMGET', KEYS[1], name)[1]
    if not old or below(old, id) then
      redis.call('HSET', KEYS[1], name, id)
    end
  end
end
if through then
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if all[i] ~= '*' and not below(through, all[i + 1]) then
      redis.call('HDEL', KEYS[1], all[i])
    end
  end
end
if redis.call('HMGET', KEYS[1], '*redelivery')[1] then
  return redis.call('HGETALL', KEYS[1])
end
return through and {'*', through} or {}
"""

Order = tuple[int, int]


def parse_id(entry_id: str | bytes) -> Order:
    """A stream ID as `(milliseconds, sequence)`."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    millis, _, sequence = text.partition("-")
    return int(millis), int(sequence or 0)


def id_text(order: Order) -> str:
    return f"{order[0]}-{order[1]}"


def just_below(order: Order) -> Order:
    """The greatest stream ID smaller than `order` (what XGROUP CREATE takes to start there)."""
    millis, sequence = order
    return (millis, sequence - 1) if sequence else (millis - 1, MAX_SEQUENCE)


def buffer_field(project: str, day: str) -> str:
    """The hash field of a (project, UTC day) buffer: `<owner>/<repo>/<YYYY-MM-DD>`."""
    return f"{project}/{day}"


class ArchiveWatermark:
    """The archiver's marks in `<stream>:archived`, and where a re-created group starts.

    The archiver reports what it was handed (`saw`) and, after each flush that made
    entries durable, the marks of the buffers it wrote (`owe`, then `advance`). The
    consumer-group runner asks `start_id` before creating the group and tells `created`
    when it did (the `GroupStart` hook of sidecar.consumer).
    """

    def __init__(
        self,
        redis: Redis | RedisCluster,
        metrics: Metrics,
        *,
        stream: str,
        group: str,
        consumer: str,
    ) -> None:
        self.redis = redis
        self.metrics = metrics
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.key = f"{stream}:archived"
        self._through: Order | None = None
        self._redelivery: Order | None = None
        self._marks: dict[str, Order] = {}  # per buffer, as last read from Redis
        self._owed: dict[str, Order] = {}  # per buffer, computed, not yet written
        self._seen: Order = (0, 0)  # the greatest entry ID handed to the archiver
        self._log_extra = {"worker": "archiver", "group": group}
        metrics.group_recreated.labels(group)

    # ---- the archiver's side ----------------------------------------------

    def saw(self, order: Order) -> None:
        """The archiver was handed entries up to `order` (read, claimed or re-read)."""
        if order > self._seen:
            self._seen = order

    @property
    def redelivering(self) -> bool:
        """True after the group was re-created, until the through mark passes what the
        re-created group may deliver again (only then does `archived` say yes)."""
        return self._redelivery is not None

    def archived(self, project: str, day: str, order: Order) -> bool:
        """True for a re-delivered entry the marks say is archived (after a re-creation)."""
        if self._redelivery is None or order > self._redelivery:
            return False
        if self._through is not None and order <= self._through:
            return True
        mark = self._marks.get(buffer_field(project, day))
        return mark is not None and order <= mark

    def owe(self, project: str, day: str, mark: Order) -> None:
        """Every entry of this buffer up to `mark` that this archiver read is archived
        (`advance` caps it to hold for the whole group)."""
        name = buffer_field(project, day)
        if mark > self._owed.get(name, (0, 0)):
            self._owed[name] = mark

    async def advance(self, oldest_buffered: Order | None) -> None:
        """Write the marks owed and the through mark; call before acknowledging.

        `oldest_buffered`: the oldest entry still buffered, None when nothing is."""
        through = self._seen if oldest_buffered is None else just_below(oldest_buffered)
        try:
            others = await self._others_oldest_pending()
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The group is gone, and with it what other consumers held: no mark can be
            # shown true for the whole group. These entries are found by the read-back
            # (the re-created group delivers them from the start of their objects).
            self._owed.clear()
            return
        marks = self._owed
        if others is not None:
            # Entries other consumers hold may be older and not archived: every mark
            # stays below them, so it holds for the whole group, whoever read what.
            cap = just_below(others)
            through = min(through, cap)
            marks = {name: min(mark, cap) for name, mark in marks.items()}
        await self._write(id_text(through), marks)
        self._owed.clear()

    async def _others_oldest_pending(self) -> Order | None:
        """The oldest entry other consumers of the group hold: the through mark stays below
        it. This consumer's own pending entries are buffered (below `oldest_buffered`) or
        archived and about to be acknowledged; counting them would hold the mark back."""
        summary: Any = await self.redis.xpending(self.stream, self.group)
        oldest: Order | None = None
        for info in summary["consumers"] or ():
            name = _text(info["name"])
            if name == self.consumer or not int(info["pending"]):
                continue
            rows: Any = await self.redis.xpending_range(
                self.stream, self.group, min="-", max="+", count=1, consumername=name
            )
            if rows:
                first = parse_id(rows[0]["message_id"])
                oldest = first if oldest is None else min(oldest, first)
        return oldest

    # ---- the runner's side (GroupStart) -------------------------------------

    async def start_id(self) -> str | None:
        """Where the group starts if the runner has to create it: the through mark, or
        None (the stream's start) when there is no watermark.

        When the group is missing, first record how far re-delivered entries may be
        archived already (`*redelivery`), so every replica that then reads the new
        group skips them."""
        self._load(await self.redis.hgetall(self.key))
        if self._through is None:
            return None
        if not await self._group_exists():
            self._owed.clear()  # not shown true for the lost group's other consumers
            bound = max(self._marks.values(), default=None)
            if bound is not None and bound > self._through:
                await self._write("", {REDELIVERY: bound})
        return id_text(self._through)

    async def created(self, start_id: str | None) -> None:
        """The runner created the group at `start_id` (None: at `0`)."""
        if start_id is not None:
            self.metrics.group_recreated.labels(self.group).inc()
            log.warning(
                "consumer group %s was missing on %s: re-created at the archive watermark %s"
                " (%s), not at 0; re-delivered entries the watermark covers (up to %s) are"
                " acknowledged without writing",
                self.group,
                self.stream,
                start_id,
                self.key,
                id_text(self._redelivery) if self._redelivery else start_id,
                extra=self._log_extra,
            )
            return
        length = int(await self.redis.xlen(self.stream))
        if not length:
            log.info("created consumer group %s on %s", self.group, self.stream)
            return
        log.warning(
            "consumer group %s created at 0 on %s, which holds %d entries, and there is no"
            " archive watermark (%s): first archival of this stream, or a restore without"
            " the group and the watermark. Events archived before are found by the"
            " exactly-once read-back only where an object key matches (a run starting at"
            " the same entry); others are written again",
            self.group,
            self.stream,
            length,
            self.key,
            extra=self._log_extra,
        )

    # ---- Redis ---------------------------------------------------------------

    async def _group_exists(self) -> bool:
        try:
            groups: Any = await self.redis.xinfo_groups(self.stream)
        except ResponseError:
            return False  # no stream
        return any(_text(info["name"]) == self.group for info in groups)

    async def _write(self, through: str, marks: dict[str, Order]) -> None:
        args: list[str] = [through]
        for name, mark in marks.items():
            args += (name, id_text(mark))
        self._load(await self.redis.eval(ADVANCE_MARKS, 1, self.key, *args))

    def _load(self, values: Any) -> None:
        """Take the hash as Redis holds it (HGETALL's mapping or the script's flat list)."""
        if isinstance(values, list):
            values = dict(zip(values[::2], values[1::2], strict=True))
        marks = {_text(name): parse_id(value) for name, value in values.items()}
        self._through = marks.pop(THROUGH, None)
        self._redelivery = marks.pop(REDELIVERY, None)
        self._marks = marks


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
