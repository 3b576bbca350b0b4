"""Bounded Redis memory: stream trimming and project-index retention, on a timer.

Stream: entries are trimmed (XTRIM MINID) only once every consumer group on
the stream has acknowledged them. One exception keeps a switched-off archiver
from pinning the stream forever: while archival is off, the archiver group
holds entries back for at most `archive_off_pin_seconds`; older entries are
trimmed once every other group has them, and the range the archive will never
hold is recorded in the hash `<stream>:archive-gaps` (first ID -> last ID and
count), counted in `task_tracking_archive_skipped_total` and logged again when
archival is switched back on. An optional hard cap (MAXLEN) is the last
resort; what it drops before the archiver had it is counted and logged.

Projection: finished executions expire by the projector's script (TTL); the
project indexes are trimmed here by age and size. Nothing here runs on the
per-event path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError, ResponseError

from sidecar.keys import KEY_PREFIX
from sidecar.metrics import Metrics
from sidecar.watermark import THROUGH

log = logging.getLogger(__name__)

COUNT_PAGE = 1000


def next_id(entry_id: str) -> str:
    """The smallest stream ID greater than `entry_id`."""
    millis, _, sequence = entry_id.partition("-")
    return f"{millis}-{int(sequence or 0) + 1}"


def id_order(entry_id: str) -> tuple[int, int]:
    millis, _, sequence = entry_id.partition("-")
    return int(millis), int(sequence or 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class StreamRetention:
    """Trims the stream and the project indexes every `interval` seconds."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        metrics: Metrics,
        *,
        stream: str,
        archiver_group: str,
        archiving: Callable[[], bool],
        maxlen: int = 0,
        archive_off_pin_seconds: float = 86_400,
        index_max_age_days: int = 0,
        index_max_size: int = 0,
        interval: float = 15.0,
        index_interval: float = 600.0,
    ) -> None:
        self.redis = redis
        self.metrics = metrics
        self.stream = stream
        self.gaps_key = f"{stream}:archive-gaps"
        self.archiver_group = archiver_group
        self.archiving = archiving
        self.maxlen = maxlen
        self.archive_off_pin_seconds = archive_off_pin_seconds
        self.index_max_age_days = index_max_age_days
        self.index_max_size = index_max_size
        self.interval = interval
        self.index_interval = index_interval
        self._stopping = asyncio.Event()
        self._next_index_pass = 0.0

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.trim_stream()
                if time.monotonic() >= self._next_index_pass:
                    await self.trim_indexes()
                    self._next_index_pass = time.monotonic() + self.index_interval
            except (RedisError, OSError) as exc:
                log.debug("retention pass skipped: %s", exc)
            except Exception:  # a bug here must not take liveness down with it
                log.exception("retention pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)

    def stop(self) -> None:
        self._stopping.set()

    # ---- stream ------------------------------------------------------------

    async def trim_stream(self) -> int:
        """One trimming pass; returns how many entries were removed."""
        try:
            groups: Any = await self.redis.xinfo_groups(self.stream)
        except ResponseError:
            return 0  # no stream yet
        names = {_text(info["name"]) for info in groups}
        if not names or (self.archiving() and self.archiver_group not in names):
            return 0  # nobody has read anything yet, or the archiver's group is not there yet
        floor: str | None = None
        archiver_floor: str | None = None
        archiver_delivered = "0-0"
        if not self.archiving() and self.archiver_group not in names:
            # Lost while archival is off (XGROUP DESTROY, a restore): where it archived
            # before, it still pins the stream, from the watermark it is re-created at.
            marks: Any = await self.redis.hgetall(f"{self.stream}:archived")  # ACL: no HGET
            through = marks.get(THROUGH.encode(), marks.get(THROUGH))
            if through:  # else archival was never on here: nothing to hold
                archiver_delivered = _text(through)
                archiver_floor = next_id(archiver_delivered)
        for info in groups:
            name = _text(info["name"])
            keep_from = await self._keep_from(name, info)
            if name == self.archiver_group and not self.archiving():
                archiver_floor = keep_from
                archiver_delivered = _text(info["last-delivered-id"])
                continue
            if floor is None or id_order(keep_from) < id_order(floor):
                floor = keep_from
        if archiver_floor is not None:
            pin_limit = f"{int((time.time() - self.archive_off_pin_seconds) * 1000)}-0"
            held = max(archiver_floor, pin_limit, key=id_order)
            if floor is None or id_order(held) < id_order(floor):
                floor = held
            if floor is not None and id_order(archiver_floor) < id_order(floor):
                await self._record_gap(archiver_floor, archiver_delivered, floor)
        removed = 0
        if floor is not None:
            removed = int(await self.redis.xtrim(self.stream, minid=floor, approximate=False))
        if self.maxlen:
            removed += await self._cap(archiver_floor if archiver_floor else None, groups)
        if removed:
            self.metrics.stream_trimmed.inc(removed)
        return removed

    async def _keep_from(self, group: str, info: Any) -> str:
        """The first entry the group still needs: its oldest pending one, else the next new one."""
        if int(info["pending"]):
            summary: Any = await self.redis.xpending(self.stream, group)
            if summary["min"] is not None:  # else acknowledged since XINFO
                return _text(summary["min"])
        return next_id(_text(info["last-delivered-id"]))

    async def _record_gap(self, first: str, delivered: str, until: str) -> None:
        """The switched-off archiver's entries before `until` are about to be trimmed: its
        pending ones and the undelivered ones after `delivered`. Record and count them, and
        move its position forward past them (never backward)."""
        pending: Any = []
        with contextlib.suppress(ResponseError):  # NOGROUP: the group was lost
            pending = await self.redis.xpending_range(
                self.stream, self.archiver_group, min="-", max=f"({until}", count=COUNT_PAGE * 10
            )
        if pending:  # acknowledged as skipped, so the next pass does not count them again
            await self.redis.xack(
                self.stream, self.archiver_group, *(_text(row["message_id"]) for row in pending)
            )
        count = len(pending)
        undelivered_from = next_id(delivered)
        if id_order(undelivered_from) < id_order(until):
            count += await self._count(undelivered_from, until)
        if not count:
            return
        self.metrics.archive_skipped.inc(count)
        # One record per stretch of archival being off: extend the latest if it reaches here.
        gaps = await self.archive_gaps()
        latest = max(gaps, key=id_order, default=None)
        if latest is not None:
            latest_until, _, latest_count = gaps[latest].partition(" ")
            if id_order(latest_until) >= id_order(first):
                first, count = latest, count + int(latest_count)
        await self.redis.hset(self.gaps_key, first, f"{until} {count}")
        log.warning(
            "archival is off: entries from %s before %s are trimmed unarchived (%d so far;"
            " recorded in %s)",
            first,
            until,
            count,
            self.gaps_key,
        )
        # The archiver group moves past them, so its position no longer pins the stream.
        last: Any = await self.redis.xrevrange(self.stream, max=f"({until}", count=1)
        if last and id_order(_text(last[0][0])) > id_order(delivered):
            with contextlib.suppress(ResponseError):  # NOGROUP: re-created at the watermark
                await self.redis.xgroup_setid(self.stream, self.archiver_group, _text(last[0][0]))

    async def _count(self, first: str, until: str) -> int:
        count, cursor = 0, first
        while True:
            page: Any = await self.redis.xrange(
                self.stream, min=cursor, max=f"({until}", count=COUNT_PAGE
            )
            count += len(page)
            if len(page) < COUNT_PAGE:
                return count
            cursor = f"({_text(page[-1][0])}"

    async def _cap(self, archiver_floor: str | None, groups: Any) -> int:
        length = int(await self.redis.xlen(self.stream))
        excess = length - self.maxlen
        if excess <= 0:
            return 0
        oldest_kept: Any = await self.redis.xrange(self.stream, count=excess + 1)
        cut = _text(oldest_kept[-1][0])  # the first entry that stays
        if archiver_floor is None:
            for info in groups:
                if _text(info["name"]) == self.archiver_group:
                    archiver_floor = await self._keep_from(self.archiver_group, info)
        dropped = 0
        if archiver_floor is not None and id_order(archiver_floor) < id_order(cut):
            dropped = await self._count(archiver_floor, cut)
        removed = int(await self.redis.xtrim(self.stream, minid=cut, approximate=False))
        if dropped:
            self.metrics.stream_dropped_unarchived.inc(dropped)
            log.error(
                "stream over TASK_TRACKING_REDIS_STREAM_MAXLEN=%d: dropped %d entries"
                " the archiver had not acknowledged",
                self.maxlen,
                dropped,
            )
        return removed

    async def archive_gaps(self) -> dict[str, str]:
        """Recorded gaps: first entry ID -> "<until ID> <count>"."""
        gaps: Any = await self.redis.hgetall(self.gaps_key)
        return {_text(k): _text(v) for k, v in gaps.items()}

    # ---- project indexes -----------------------------------------------------

    async def trim_indexes(self) -> int:
        """Trim every project index by age and size; returns members removed."""
        if not (self.index_max_age_days or self.index_max_size):
            return 0
        removed = 0
        cutoff = (time.time() - self.index_max_age_days * 86_400) * 1000
        async for key in self.redis.scan_iter(match=f"{KEY_PREFIX}:project:*:executions"):
            if self.index_max_age_days:
                removed += int(await self.redis.zremrangebyscore(key, "-inf", f"({cutoff}"))
            if self.index_max_size:
                removed += int(await self.redis.zremrangebyrank(key, 0, -self.index_max_size - 1))
        return removed
