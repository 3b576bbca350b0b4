"""Prometheus metrics: one registry per sidecar, so several sidecars can share a test process."""

from __future__ import annotations

import platform
import time
from bisect import bisect_left, bisect_right
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from sidecar import __version__
from sidecar.events import OPTIONAL_FIELDS

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
AGE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


# /metrics is rendered at most this often; scrapes in between get the same bytes.
EXPOSITION_TTL_SECONDS = 1.0


def observe_many(histogram: Any, values: list[float]) -> None:
    """`histogram.observe(max(0, v))` for every value, at C speed on the per-event path:
    the values are sorted, then counted with one bisection per bucket. Sorts `values` in
    place. Falls back to `observe` if prometheus-client's internals ever change."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for value in values:
            histogram.observe(max(0.0, value))
        return
    values.sort()
    total.inc(sum(values[bisect_left(values, 0.0) :]))  # negatives count as 0
    below = 0
    for bucket, bound in zip(buckets, bounds, strict=True):
        upto = bisect_right(values, bound)
        if upto > below:
            bucket.inc(upto - below)
        below = upto


class Metrics:
    """Every metric the sidecar exposes, on its own registry."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._exposition: tuple[float, bytes] | None = None
        # process_* (RSS, CPU, open fds, start time) and python_* (GC, version): what a
        # sidecar in every pod is judged by.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        gauge("task_tracking_build_info", "Build information.", ("version", "python")).labels(
            __version__, platform.python_version()
        ).set(1)

        # Sampled from XINFO on a timer (StreamStatsSampler), never per event.
        self.lag = gauge(
            "task_tracking_consumer_group_lag",
            "Entries in the stream not yet delivered to the group.",
            ("group",),
        )
        self.pending = gauge(
            "task_tracking_consumer_group_pending",
            "Entries delivered to the group and not yet acknowledged.",
            ("group",),
        )
        self.group_active = gauge(
            "task_tracking_consumer_group_active",
            "1 while this sidecar runs the group's worker (the archiver's: archival on);"
            " a group's lag and pending are exported either way.",
            ("group",),
        )
        self.oldest_pending_age = gauge(
            "task_tracking_oldest_pending_age_seconds",
            "Age of the group's oldest pending entry (by its stream ID time).",
            ("group",),
        )
        self.stream_length = gauge("task_tracking_stream_length", "Entries in the stream.")
        self.dead_letter_length = gauge(
            "task_tracking_dead_letter_length", "Entries in the dead-letter stream."
        )

        self.read = counter(
            "task_tracking_events_read", "Stream entries read, by group.", ("group",)
        )
        self.applied = counter(
            "task_tracking_events_applied",
            "Events that took effect: projected, or archived.",
            ("group",),
        )
        self.stale = counter(
            "task_tracking_events_stale",
            "Events skipped by the ordering rule (older than the projected state, or replays).",
            ("group",),
        )
        self.dead_lettered = counter(
            "task_tracking_events_dead_lettered",
            "Invalid entries moved to the dead-letter stream.",
            ("group",),
        )
        self.invalid_skipped = counter(
            "task_tracking_events_invalid_skipped",
            "Invalid entries acknowledged without effect (archiver group).",
            ("group",),
        )
        self.event_warnings = counter(
            "task_tracking_event_warnings",
            "Valid events with a malformed optional field, kept as sent, by field.",
            ("field",),
        )
        for name in OPTIONAL_FIELDS:  # every series from start-up, at 0
            self.event_warnings.labels(name)
        self.claimed = counter(
            "task_tracking_entries_claimed",
            "Pending entries claimed from consumers taken for dead.",
            ("group",),
        )
        self.end_to_end_latency = Histogram(
            "task_tracking_end_to_end_latency_seconds",
            "From the stream entry's time (XADD) to its effect being durable.",
            ("group",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.event_age = Histogram(
            "task_tracking_event_age_seconds",
            "From the event's occurredAt to its effect being durable.",
            ("group",),
            buckets=AGE_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "task_tracking_batch_size",
            "Entries per processed batch.",
            ("group",),
            buckets=BATCH_BUCKETS,
            registry=registry,
        )

        self.archive_objects = counter("task_tracking_archive_objects", "Archive objects written.")
        self.archive_bytes = counter("task_tracking_archive_bytes", "Archive bytes written.")
        self.archive_upload_seconds = Histogram(
            "task_tracking_archive_upload_seconds",
            "Time to write one archive object.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.archive_failures = counter(
            "task_tracking_archive_failures", "Failed archive writes, by reason.", ("reason",)
        )
        self.archive_already_present = counter(
            "task_tracking_archive_already_present",
            "Writes found already done by an earlier attempt (exactly-once recovery).",
        )
        self.archive_watermark_skipped = counter(
            "task_tracking_archive_watermark_skipped",
            "Re-delivered entries acknowledged without writing: the archive watermark covers"
            " them (after the archiver group was re-created).",
        )
        self.archive_conditional_writes = gauge(
            "task_tracking_archive_conditional_writes",
            "1 for the archiver's write mode: enforced (the store refuses a second create) or"
            " check_before_write (HEAD before each PUT); both 0 while no archiver writes.",
            ("mode",),
        )
        for mode in ("enforced", "check_before_write"):
            self.archive_conditional_writes.labels(mode).set(0)
        self.archive_enabled = gauge(
            "task_tracking_archive_enabled",
            "1 while archival is on, by target bucket (or folder).",
            ("bucket",),
        )
        self.resource_generation = gauge(
            "task_tracking_resource_generation",
            "metadata.generation of the TaskTracking resource last applied (0: none).",
        )

        self.group_recreated = counter(
            "task_tracking_consumer_group_recreated",
            "Consumer groups found missing and re-created at the archive watermark.",
            ("group",),
        )
        self.redis_connected = gauge(
            "task_tracking_redis_connected",
            "1 while the worker's Redis connection works.",
            ("group",),
        )
        self.redis_reconnects = counter(
            "task_tracking_redis_reconnects", "Redis connection losses recovered from.", ("group",)
        )
        self.ready = gauge(
            "task_tracking_ready", "1 when /readyz answers 200 (updated on the sampler's timer)."
        )
        self.event_loop_lag = gauge(
            "task_tracking_event_loop_lag_seconds",
            "Delay of the last event-loop probe, measured from a watchdog thread.",
        )

        self.stream_trimmed = counter(
            "task_tracking_stream_trimmed",
            "Entries trimmed from the stream after every active group acknowledged them.",
        )
        self.stream_dropped_unarchived = counter(
            "task_tracking_stream_dropped_unarchived",
            "Entries dropped by the hard length cap before the archiver acknowledged them.",
        )
        self.archive_skipped = counter(
            "task_tracking_archive_skipped",
            "Entries skipped by the archiver because archival was off (see README).",
        )

    def init_group(self, group: str, *, dead_letter: bool) -> None:
        """Create a group's series at 0, so `increase()` sees the first event of each."""
        for metric in (
            self.read,
            self.applied,
            self.stale,
            self.claimed,
            self.redis_reconnects,
            self.end_to_end_latency,
            self.event_age,
            self.batch_size,
        ):
            metric.labels(group)
        (self.dead_lettered if dead_letter else self.invalid_skipped).labels(group)

    def exposition(self) -> bytes:
        """The text exposition, rendered at most once per `EXPOSITION_TTL_SECONDS`: a
        scrape storm then costs the event loop (and so the projector) one rendering a
        second, not one per scrape. The figures themselves move at most every 5 s."""
        now = time.monotonic()
        if self._exposition is None or now - self._exposition[0] >= EXPOSITION_TTL_SECONDS:
            self._exposition = (now, generate_latest(self.registry))
        return self._exposition[1]
