"""Stream entries decoded into a batch: the valid events and the invalid entries.

Decoding applies the ingest rules (sidecar.events) and, for the group that
dead-letters, counts and logs malformed optional fields.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from sidecar.bounded_read import StreamEntry
from sidecar.events import EventLimits, InvalidEntry, ValidEvent, decode_values, entry_ms
from sidecar.logs import ContextLogger
from sidecar.metrics import Metrics

# Entries decoded between two turns of the event loop when a batch is read ahead.
DECODE_SLICE = 50


@dataclass
class Batch:
    """Entries read in one call, decoded."""

    valid: list[ValidEvent] = field(default_factory=list)
    invalid: list[InvalidEntry] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.valid) + len(self.invalid)


class BatchDecoder:
    """Decodes one group's entries; with `count_warnings`, counts malformed optional
    fields (the projector's group; the archiver's would count them twice)."""

    def __init__(
        self, limits: EventLimits, metrics: Metrics, log: ContextLogger, *, count_warnings: bool
    ) -> None:
        self.limits = limits
        self.metrics = metrics
        self.log = log
        self.count_warnings = count_warnings
        self._warned: set[str] = set()  # optional fields whose first warning was logged

    async def decode_in_slices(self, entries: Sequence[StreamEntry]) -> Batch:
        """`decode`, giving way to the loop every `DECODE_SLICE` entries: a batch read
        ahead would otherwise hold the loop for milliseconds of decoding, during which no
        script call goes out and the server's queue of them runs dry."""
        batch = self.decode(entries[:DECODE_SLICE])
        for start in range(DECODE_SLICE, len(entries), DECODE_SLICE):
            await asyncio.sleep(0)
            more = self.decode(entries[start : start + DECODE_SLICE])
            batch.valid += more.valid
            batch.invalid += more.invalid
        return batch

    def decode(self, entries: Sequence[StreamEntry]) -> Batch:
        batch = Batch()
        # entries come in stream order: the first one's time bounds every later one's
        first = entry_ms(entries[0][0]) if entries else None
        at_least = first or 0
        for entry_id, values in entries:
            if values is None:  # a pending entry deleted from the stream meanwhile
                batch.invalid.append(InvalidEntry(entry_id, None, "entry no longer in the stream"))
                continue
            decoded = decode_values(entry_id, values, self.limits, added_at_least=at_least)
            if isinstance(decoded, InvalidEntry):
                batch.invalid.append(decoded)
            else:
                if decoded.warnings and self.count_warnings:
                    self._warn(decoded)
                batch.valid.append(decoded)
        return batch

    def _warn(self, event: ValidEvent) -> None:
        """Count a valid event's malformed optional fields; log the first of each field."""
        for name in event.warnings:
            self.metrics.event_warnings.labels(name).inc()
            if name not in self._warned:
                self._warned.add(name)
                self.log.warning(
                    "event field %s is not in the contract's shape; kept as sent"
                    " (counted in task_tracking_event_warnings_total, logged once)",
                    name,
                    extra={"stream_id": event.entry_id, "execution_id": event.execution_id},
                )
