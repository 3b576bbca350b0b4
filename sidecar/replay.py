"""`task-tracking replay`: rebuild the projection from the archive.

Every archived line goes through the projector's compare-and-set, so a replay
is idempotent and safe on a live projection: it only ever moves an execution
forward by the ordering rule. This is how a lost Redis is recovered.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from dataclasses import dataclass

from sidecar.archive_switch import S3Clients, open_sink
from sidecar.config import ArchiveConfig, Settings
from sidecar.connections import connect
from sidecar.events import ValidEvent, decode_values
from sidecar.metrics import Metrics
from sidecar.projector import RedisTaskStatusProjector
from sidecar.sinks import ArchiveSink, SinkError

log = logging.getLogger(__name__)

DAY_IN_KEY = re.compile(r"/(\d{4}-\d{2}-\d{2})/events-(\d{13})-[0-9a-z]{6}\.jsonl$")
APPLY_CHUNK = 1000


@dataclass
class ReplaySummary:
    objects: int = 0
    events: int = 0
    applied: int = 0
    invalid_lines: int = 0
    failed_objects: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        unchanged = self.events - self.applied
        return (
            f"replayed {self.objects} objects, {self.events} events in {self.seconds:.1f}s:"
            f" {self.applied} applied, {unchanged} already current,"
            f" {self.invalid_lines} invalid lines, {self.failed_objects} objects failed"
        )


async def replay_archive(
    settings: Settings,
    *,
    project: str | None = None,
    since: str | None = None,
    until: str | None = None,
    progress: bool = False,
    sink: ArchiveSink | None = None,
) -> ReplaySummary:
    """Apply every archived event (of `project`, between the UTC days `since` and `until`)."""
    target = settings.archive
    clients = S3Clients()
    redis = connect(settings.redis_url)
    limits = settings.event_limits
    summary = ReplaySummary()
    started = time.monotonic()
    try:
        if sink is None:
            sink = await _sink(target, clients)
        projector = RedisTaskStatusProjector(
            redis,
            Metrics(),
            group="replay",
            finished_ttl_seconds=settings.retention.projection_ttl_seconds,
        )
        prefix = f"{target.prefix}/{project}/" if project else f"{target.prefix}/"
        keys = [key async for key in sink.list_keys(prefix) if _in_range(key, since, until)]
        for index, key in enumerate(keys, 1):
            try:
                body = await sink.read(key)
            except SinkError as exc:
                log.error("cannot read %s: %s", key, exc)
                summary.failed_objects += 1
                continue
            events: list[ValidEvent] = []
            added_ms = _first_entry_ms(key)
            for line_number, line in enumerate(body.splitlines(), 1):
                # the same verdicts as the projector's; the future limit counts from the
                # time of the object's first stream entry, which its key carries
                decoded = decode_values(
                    f"archive:{key}:{line_number}", [line], limits, added_ms=added_ms
                )
                if isinstance(decoded, ValidEvent):
                    events.append(decoded)
                else:
                    summary.invalid_lines += 1
                    log.warning("%s line %d: %s", key, line_number, decoded.reason)
            for start in range(0, len(events), APPLY_CHUNK):
                summary.applied += await projector.apply(events[start : start + APPLY_CHUNK])
            summary.objects += 1
            summary.events += len(events)
            if progress:
                _draw_progress(index, len(keys), summary.events)
        if progress:
            print(file=sys.stderr)
    finally:
        summary.seconds = time.monotonic() - started
        await clients.close()
        await redis.aclose()
    return summary


async def _sink(target: ArchiveConfig, clients: S3Clients) -> ArchiveSink:
    if target.sink == "folder" and (target.folder is None or not target.folder.is_dir()):
        raise SinkError(
            f"TASK_TRACKING_ARCHIVE_FOLDER={target.folder}: not a folder; set it to the"
            " archive's folder",
            "config",
        )
    if target.sink == "s3" and not target.bucket:
        raise SinkError(
            "TASK_TRACKING_S3_BUCKET is not set: set it to the archive bucket", "config"
        )
    return await open_sink(target, clients)


def _first_entry_ms(key: str) -> int | None:
    """The stream time of an archive object's first entry, from its key."""
    match = DAY_IN_KEY.search(key)
    return int(match.group(2)) if match is not None else None


def _in_range(key: str, since: str | None, until: str | None) -> bool:
    match = DAY_IN_KEY.search(key)
    if match is None:
        return False
    day = match.group(1)
    return (since is None or day >= since) and (until is None or day <= until)


def _draw_progress(done: int, total: int, events: int) -> None:
    width = 30
    filled = width * done // max(total, 1)
    bar = "#" * filled + "-" * (width - filled)
    print(f"\r[{bar}] {done}/{total} objects, {events} events", end="", file=sys.stderr)
