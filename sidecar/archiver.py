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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import attrgetter
from typing import NamedTuple

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
from sidecar.watermark import NO_ENTRY, ArchiveWatermark, just_below

log = logging.getLogger(__name__)

BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"
# Everything buffered is flushed when the buffers together hold this many event bytes
# (about twice that in memory).
MAX_BUFFERED_BYTES = 32 * 1024 * 1024
# Buffers written at once when several fall due together (as the age limit makes many
# projects' buffers do): a PUT to S3 takes tens of milliseconds, one after another they
# add up. Each buffer's own objects still go one after another, in stream order.
UPLOADS_IN_FLIGHT = 4


class ArchiveIntegrityError(WorkerError):
    """An existing object does not hold the entries its key says it starts with."""


class ArchiveEntry(NamedTuple):
    """What the archiver keeps of a buffered event: not the decoded fields, which would
    multiply the memory a buffer takes."""

    entry_id: str
    raw: bytes
    occurred_at_ms: int
    order: tuple[int, int]  # the entry ID as numbers: (milliseconds, sequence)


@dataclass
class ArchiveBatch:
    """Events of one project and UTC day waiting to be written."""

    project: str
    day: str
    started: float = field(default_factory=time.monotonic)
    events: list[ArchiveEntry] = field(default_factory=list)
    size: int = 0
    oldest: tuple[int, int] = NO_ENTRY  # the smallest entry ID in `events` (watermark)

    def add(self, event: ArchiveEntry) -> None:
        self.events.append(event)
        self.size += len(event.raw) + 1
        if event.order < self.oldest:
            self.oldest = event.order


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
        self._buffered_ids: set[str] = set()
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
            if event.entry_id in self._buffered_ids:
                continue  # re-read after a lost connection: already buffered
            day = utc_day(event.occurred_at_ms)
            order = stream_order(event.entry_id)
            if skip is not None and skip(event.project, day, order):
                self._done.append(event.entry_id)  # re-delivered after the group was lost
                self.metrics.archive_watermark_skipped.inc()
                continue
            batch = self._batches.get((event.project, day))
            if batch is None:
                batch = self._batches[event.project, day] = ArchiveBatch(event.project, day)
            batch.add(ArchiveEntry(event.entry_id, event.raw, event.occurred_at_ms, order))
            self._buffered_ids.add(event.entry_id)
            self._buffered_bytes += len(event.raw) + 1
        if events and watermark is not None:
            watermark.saw(stream_order(events[-1].entry_id))  # replies come in ID order

    def seconds_until_due(self) -> float | None:
        if not self._batches:
            return None
        oldest = min(batch.started for batch in self._batches.values())
        return max(0.0, oldest + self.policy.max_age_seconds - time.monotonic())

    @property
    def buffered(self) -> int:
        return len(self._buffered_ids)

    async def flush(self, *, force: bool) -> Flushed:
        """Write every due batch (all of them with force); return the IDs now durable.

        Due batches are written `UPLOADS_IN_FLIGHT` at a time; when one fails, the others
        finish first (what they wrote is handed back at the next flush) and the first
        failure is raised."""
        force = force or self._buffered_bytes >= MAX_BUFFERED_BYTES
        now = time.monotonic()
        due: list[tuple[ArchiveBatch, bool]] = []
        for batch in self._batches.values():
            aged = now - batch.started >= self.policy.max_age_seconds
            if force or aged or self._full(batch):
                # A batch over its limits writes its full objects and keeps the rest.
                due.append((batch, force or aged))
        slots = asyncio.Semaphore(UPLOADS_IN_FLIGHT)

        async def write(batch: ArchiveBatch, complete: bool) -> None:
            async with slots:
                newest = max((event.order for event in batch.events), default=(0, 0))
                try:
                    await self._write(batch, complete=complete)
                finally:
                    self._owe_mark(batch, newest)

        outcomes = await asyncio.gather(*(write(*each) for each in due), return_exceptions=True)
        for batch, _ in due:
            if not batch.events:
                del self._batches[batch.project, batch.day]
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

    def _owe_mark(self, batch: ArchiveBatch, newest: tuple[int, int]) -> None:
        """After a write: the buffer's mark is just below its oldest entry left, or its
        newest entry when none is left (written in stream order, so all below are)."""
        batch.oldest = min((event.order for event in batch.events), default=NO_ENTRY)
        if self.watermark is not None:
            mark = just_below(batch.oldest) if batch.events else newest
            self.watermark.owe(batch.project, batch.day, mark)

    def _full(self, batch: ArchiveBatch) -> bool:
        return len(batch.events) >= self.policy.max_events or batch.size >= self.policy.max_bytes

    async def _write(self, batch: ArchiveBatch, *, complete: bool) -> None:
        """Write a batch as one or more objects, each a run of entries in stream order.

        Progress is kept in the batch: after a failure, a retry resumes at the
        first entry not yet written, which is where the next object starts.
        """
        batch.events.sort(key=attrgetter("order"))
        while batch.events:
            run = self._next_run(batch.events)
            if not complete and len(run) == len(batch.events) and not self._full(batch):
                return
            first = run[0]
            key = object_key(self.prefix, batch.project, batch.day, self.stream, first.entry_id)
            body = b"".join(event.raw + b"\n" for event in run)
            started = time.monotonic()
            try:
                created = await self.sink.create_if_absent(key, body)
                if not created:
                    run = await self._already_written(key, batch.events)
            except SinkError as exc:
                self.metrics.archive_failures.labels(exc.reason).inc()
                raise
            if created:
                self.metrics.archive_objects.inc()
                self.metrics.archive_bytes.inc(len(body))
                self.metrics.archive_upload_seconds.observe(time.monotonic() - started)
                log.debug("archived %d events to %s", len(run), key)
            else:
                self.metrics.archive_already_present.inc()
                log.info("%s already holds %d of these events (earlier attempt)", key, len(run))
            self._record_done(run)
            del batch.events[: len(run)]
            batch.size -= sum(len(event.raw) + 1 for event in run)

    def _next_run(self, events: list[ArchiveEntry]) -> list[ArchiveEntry]:
        size = 0
        for count, event in enumerate(events):
            size += len(event.raw) + 1
            if count and (count >= self.policy.max_events or size > self.policy.max_bytes):
                return events[:count]
        return events

    async def _already_written(self, key: str, events: list[ArchiveEntry]) -> list[ArchiveEntry]:
        """The leading events that the existing object at `key` already holds."""
        lines = (await self.sink.read(key)).split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        count = min(len(lines), len(events))
        if [event.raw for event in events[:count]] != lines[:count]:
            raise ArchiveIntegrityError(
                f"{self.sink.description}/{key} exists but does not start with entry"
                f" {events[0].entry_id}; was the prefix shared with another stream?"
            )
        return events[:count]

    def _record_done(self, run: list[ArchiveEntry]) -> None:
        now = time.time()
        for event in run:
            self._buffered_ids.discard(event.entry_id)
            self._buffered_bytes -= len(event.raw) + 1
            self._done.append(event.entry_id)
        observe_many(
            self.metrics.end_to_end_latency.labels(self.group),
            [now - event.order[0] / 1000 for event in run],
        )
        observe_many(
            self.metrics.event_age.labels(self.group),
            [now - event.occurred_at_ms / 1000 for event in run],
        )
        self.metrics.applied.labels(self.group).inc(len(run))
