"""`S3TaskHistoryArchiver`: immutable JSONL batches of events, exactly once.

Events are buffered per project and UTC day and written as one object when a
buffer reaches a count, a byte size or an age. Exactly once rests on three
rules (README, "Guarantees"):

1. An object's key is derived from the stream ID of its first entry, so the
   same first entry always names the same object.
2. Objects are created only if absent. When the key exists, the existing
   object is read back: it holds a run of entries starting at that first
   entry, and those entries are acknowledged instead of being written again.
3. The entries of one (project, day) in a consumer's pending list are always
   a sequence of such runs: buffers are flushed in stream order, and pending
   lists (own on start and after any failure, a dead consumer's on claim) are
   settled whole, apart from the consumer's own buffer.

These rules need the group's pending list. When the group itself is lost, the
watermark (sidecar.watermark), moved after each flush and before its
acknowledgements, says where to re-create it and which re-delivered entries
are archived already.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from sidecar.allocator import release_free_memory
from sidecar.archive_buffer import ArchiveBatch
from sidecar.conditional_writes import (
    ConditionalWrites,
    ConditionalWritesSetting,
    settle_conditional_writes,
)
from sidecar.config import FlushPolicy
from sidecar.consumer import Flushed
from sidecar.errors import WorkerError
from sidecar.events import ValidEvent, stream_order
from sidecar.metrics import Metrics, observe_many
from sidecar.sinks import ArchiveSink, SinkError
from sidecar.watermark import ArchiveWatermark, Order, just_below

log = logging.getLogger(__name__)

BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"
# Everything buffered is flushed when the buffers together hold this many event bytes
# (counted as written; the buffers keep them compressed, sidecar.archive_buffer).
MAX_BUFFERED_BYTES = 32 * 1024 * 1024
# Buffers written by one flush when several fall due together (as the age limit and
# round-robin traffic make many projects' buffers do), at the same time: a PUT to S3
# takes tens of milliseconds, one after another they add up. The rest wait for the next
# flush, a read later. More at once would hold more object bodies and entry IDs at once:
# at 4 (and all due buffers in one flush) the soak's peak RSS was 6 MiB higher. Each
# buffer's own objects still go one after another, in stream order.
UPLOADS_IN_FLIGHT = 2


class ArchiveIntegrityError(WorkerError):
    """An existing object does not hold the entries its key says it starts with."""


MS_PER_DAY = 86_400_000


@functools.lru_cache(maxsize=1024)
def _day_name(day_number: int) -> str:
    return datetime.fromtimestamp(day_number * 86_400, UTC).strftime("%Y-%m-%d")


def utc_day(occurred_at_ms: int) -> str:
    """`YYYY-MM-DD` (UTC) of an epoch-ms timestamp; formatted once per day, not per event."""
    return _day_name(occurred_at_ms // MS_PER_DAY)


def object_key(prefix: str, project: str, day: str, stream: str, first_entry_id: str) -> str:
    """`<prefix>/<owner>/<repo>/<YYYY-MM-DD>/events-<13-digit ms>-<6 char suffix>.jsonl`.

    Both the timestamp and the suffix derive from the first entry's stream ID."""
    millis = int(first_entry_id.split("-", 1)[0])
    digest = int.from_bytes(hashlib.sha256(f"{stream}\n{first_entry_id}".encode()).digest()[:8])
    suffix = ""
    for _ in range(6):
        digest, digit = divmod(digest, 36)
        suffix += BASE36[digit]
    return f"{prefix}/{project}/{day}/events-{millis:013d}-{suffix}.jsonl"


class S3TaskHistoryArchiver:
    """Writes buffered events to an `ArchiveSink`; a `BatchHandler` for the runner."""

    # Not while a flush waits: its pending list must hold only what its buffer has seen.
    read_ahead = False

    def __init__(
        self,
        sink: ArchiveSink,
        metrics: Metrics,
        *,
        stream: str,
        prefix: str,
        policy: FlushPolicy,
        group: str = "task-history-archiver",
        consumer: str = "alakai",
        conditional_writes: ConditionalWritesSetting = "auto",
        watermark: ArchiveWatermark | None = None,
    ) -> None:
        self.sink = sink
        self.metrics = metrics
        self.stream = stream
        self.prefix = prefix
        self.policy = policy
        self.group = group
        # How far it archived (sidecar.watermark); the runner asks it where a lost group
        # is re-created (`group_start`).
        self.watermark = self.group_start = watermark
        self._batches: dict[tuple[str, str], ArchiveBatch] = {}
        self._buffered_bytes = 0
        self._done: list[str] = []  # written, not yet handed back for acknowledgement
        self.consumer = consumer
        self.conditional_writes_setting = conditional_writes
        self.write_mode: ConditionalWrites | None = None  # settled by the first prepare()

    async def prepare(self) -> None:
        """`check_target`, counting its failures (the runner calls it before reading)."""
        try:
            await self.check_target()
        except SinkError as exc:
            self.metrics.archive_failures.labels(exc.reason).inc()
            raise

    async def check_target(self) -> None:
        """Check the target, and once per target settle how conditional writes are made
        (probed or set; sidecar.conditional_writes) before anything is written."""
        await self.sink.check()
        if self.write_mode is None:
            self.write_mode = await settle_conditional_writes(
                self.sink,
                self.metrics,
                setting=self.conditional_writes_setting,
                prefix=self.prefix,
                consumer=self.consumer,
            )

    def add(self, events: Sequence[ValidEvent]) -> None:
        watermark = self.watermark
        # Only after the group was re-created: one test per call, not per event, otherwise.
        skip = watermark.archived if watermark is not None and watermark.redelivering else None
        for event in events:
            day = utc_day(event.occurred_at_ms)
            order = stream_order(event.entry_id)
            batch = self._batches.get((event.project, day))
            if skip is not None and skip(event.project, day, order):
                if batch is None or not batch.holds(order):
                    self._done.append(event.entry_id)  # re-delivered after the group was lost
                    self.metrics.archive_watermark_skipped.inc()
                continue
            if batch is None:
                batch = self._batches[event.project, day] = ArchiveBatch(event.project, day)
            # False for an entry re-read after a lost connection: already buffered.
            if batch.add(order, event.raw, event.occurred_at_ms):
                self._buffered_bytes += len(event.raw) + 1
        if events and watermark is not None:
            watermark.saw(stream_order(events[-1].entry_id))  # replies come in ID order

    def seconds_until_due(self) -> float | None:
        if not self._batches:
            return None
        if any(self._full(batch) for batch in self._batches.values()):
            return 0.0  # left for this flush by the one before
        oldest = min(batch.started for batch in self._batches.values())
        return max(0.0, oldest + self.policy.max_age_seconds - time.monotonic())

    @property
    def buffered(self) -> int:
        """Events buffered, all batches together."""
        return sum(len(batch) for batch in self._batches.values())

    async def flush(self, *, force: bool) -> Flushed:
        """Write the oldest `UPLOADS_IN_FLIGHT` due batches (all of them, that many at a
        time, with force); return the IDs now durable.

        When one write fails, the others finish first (what they wrote is handed back at
        the next flush) and the first failure is raised. Then the heap's free pages are
        given back: the bodies and IDs of a flush leave holes glibc would keep (the soak
        held 4 MiB more between flushes)."""
        force = force or self._buffered_bytes >= MAX_BUFFERED_BYTES
        now = time.monotonic()
        due: list[tuple[ArchiveBatch, bool]] = []
        for batch in self._batches.values():
            aged = now - batch.started >= self.policy.max_age_seconds
            if force or aged or self._full(batch):
                # A batch over its limits writes its full objects and keeps the rest.
                due.append((batch, force or aged))
        if not force:
            due = sorted(due, key=lambda each: each[0].started)[:UPLOADS_IN_FLIGHT]
        slots = asyncio.Semaphore(UPLOADS_IN_FLIGHT)

        async def write(batch: ArchiveBatch, complete: bool) -> None:
            async with slots:
                newest = batch.newest
                try:
                    await self._write(batch, complete=complete)
                finally:
                    self._owe_mark(batch, newest)

        outcomes = await asyncio.gather(*(write(*each) for each in due), return_exceptions=True)
        for batch, _ in due:
            if not len(batch):
                del self._batches[batch.project, batch.day]
        if due:
            release_free_memory()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        if self._done and self.watermark is not None:
            # Marks first, then the runner's XACK: a lost acknowledgement only re-delivers
            # entries the marks cover.
            oldest = min((batch.oldest for batch in self._batches.values()), default=None)
            await self.watermark.advance(oldest)
        done, self._done = self._done, []
        return Flushed(done)  # it acknowledges what it cannot use; it rejects nothing

    def _owe_mark(self, batch: ArchiveBatch, newest: Order) -> None:
        """After a write: the buffer's mark is just below its oldest entry left, or its
        newest entry when none is left (written in stream order, so all below are)."""
        if self.watermark is not None:
            mark = just_below(batch.oldest) if len(batch) else newest
            self.watermark.owe(batch.project, batch.day, mark)

    def _full(self, batch: ArchiveBatch) -> bool:
        return len(batch) >= self.policy.max_events or batch.size >= self.policy.max_bytes

    async def _write(self, batch: ArchiveBatch, *, complete: bool) -> None:
        """Write a batch as one or more objects, each a run of entries in stream order.

        Progress is kept in the batch: after a failure, a retry resumes at the
        first entry not yet written, which is where the next object starts.
        """
        batch.sort()
        while len(batch):
            count, size = batch.run_length(self.policy.max_events, self.policy.max_bytes)
            if not complete and count == len(batch) and not self._full(batch):
                return
            key = object_key(self.prefix, batch.project, batch.day, self.stream, batch.first_id())
            body = batch.head(count)
            started = time.monotonic()
            try:
                created = await self.sink.create_if_absent(key, body)
                if not created:
                    count, size = await self._already_written(key, batch)
            except SinkError as exc:
                self.metrics.archive_failures.labels(exc.reason).inc()
                raise
            if created:
                self.metrics.archive_objects.inc()
                self.metrics.archive_bytes.inc(len(body))
                self.metrics.archive_upload_seconds.observe(time.monotonic() - started)
                log.debug("archived %d events to %s", count, key)
            else:
                self.metrics.archive_already_present.inc()
                log.info("%s already holds %d of these events (earlier attempt)", key, count)
            self._record_done(batch, count)
            batch.drop_head(count)
            self._buffered_bytes -= size

    async def _already_written(self, key: str, batch: ArchiveBatch) -> tuple[int, int]:
        """How many of the batch's leading events (and their bytes) the existing object at
        `key` already holds."""
        existing = await self.sink.read(key)
        if existing and not existing.endswith(b"\n"):
            existing += b"\n"
        count = min(existing.count(b"\n"), len(batch))
        # Archive lines hold no newline: equal leading bytes are equal leading lines.
        ours = batch.head(count)
        if not count or not existing.startswith(ours):
            raise ArchiveIntegrityError(
                f"{self.sink.description}/{key} exists but does not start with entry"
                f" {batch.first_id()}; was the prefix shared with another stream?"
            )
        return count, len(ours)

    def _record_done(self, batch: ArchiveBatch, count: int) -> None:
        now = time.time()
        self._done += batch.head_ids(count)
        observe_many(
            self.metrics.end_to_end_latency.labels(self.group),
            [now - millis / 1000 for millis in batch.head_millis(count)],
        )
        observe_many(
            self.metrics.event_age.labels(self.group),
            [now - millis / 1000 for millis in batch.head_occurred(count)],
        )
        self.metrics.applied.labels(self.group).inc(count)
