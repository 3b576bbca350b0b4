"""Stream and consumer-group statistics, sampled on a timer for the metrics.

Queried every few seconds from XINFO, never per event or per scrape, so a
scrape storm costs Redis nothing. The same timer refreshes the readiness gauge,
so `task_tracking_ready` follows readiness even when nobody calls /readyz.
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

from sidecar.metrics import Metrics

log = logging.getLogger(__name__)

# When Redis cannot say a group's lag (XINFO GROUPS answers nil: an entry after
# the group's last-delivered ID was deleted, or the group's position was set by
# hand), the entries after that ID are counted with XRANGE, a page at a time,
# up to this many; beyond it the lag is the upper bound entries-added - entries-read.
LAG_COUNT_LIMIT = 10_000
LAG_COUNT_PAGE = 1_000


class StreamStatsSampler:
    """Samples XINFO STREAM / GROUPS / XPENDING into gauges every `interval` seconds."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        metrics: Metrics,
        *,
        stream: str,
        groups: list[str],
        interval: float = 5.0,
        active: Callable[[str], bool] | None = None,
        after_sample: Callable[[], object] | None = None,
        first_after: asyncio.Event | None = None,
    ) -> None:
        self.redis = redis
        self.metrics = metrics
        self.stream = stream
        self.dead_letter = f"{stream}:dead-letter"
        self.groups = groups
        self.interval = interval
        # Whether this sidecar works on a group (the archiver's: archival on); a group's
        # figures are exported either way, so a backlog building up while archival is off
        # (which retention drops after a day) can be seen and alerted on.
        self.active = active or (lambda group: True)
        self.sampled = False  # a first sample succeeded (readiness waits for it)
        # The first sample waits (one interval at most) for this: the projector's group
        # ready, so that the first figures already include it.
        self.first_after = first_after
        # Called after every sample, failed or not (the runtime refreshes readiness).
        self.after_sample = after_sample
        self.last: dict[str, dict[str, float]] = {}  # group -> {"lag", "pending", ...}
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Sample every `interval` seconds until `stop()`."""
        if self.first_after is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.first_after.wait(), self.interval)
        while not self._stopping.is_set():
            try:
                await self.sample()
            except (RedisError, OSError) as exc:
                log.debug("stream statistics unavailable: %s", exc)
            except Exception:  # a bug here must not take liveness down with it
                log.exception("sampling stream statistics failed")
            if self.after_sample is not None:
                self.after_sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)

    def stop(self) -> None:
        self._stopping.set()

    async def sample(self) -> None:
        """Read the statistics once and set the gauges."""
        try:
            groups = await self.redis.xinfo_groups(self.stream)
            length = await self.redis.xlen(self.stream)
        except ResponseError:  # no stream yet
            groups, length = [], 0
        self.metrics.stream_length.set(length)
        self.metrics.dead_letter_length.set(await self.redis.xlen(self.dead_letter))
        now_ms = time.time() * 1000
        for info in groups:
            name = _text(info["name"])
            if name not in self.groups:
                continue
            self.metrics.group_active.labels(name).set(1 if self.active(name) else 0)
            lag = info.get("lag")
            if lag is None:
                lag = await self.lag_without_redis(info)
            # XPENDING, read after XINFO, is the consistent pair of count and oldest ID:
            # entries acknowledged in between leave no oldest.
            summary: Any = await self.redis.xpending(self.stream, name)
            pending = int(summary["pending"])
            oldest_age = 0.0
            if pending and summary["min"] is not None:
                oldest_ms = int(_text(summary["min"]).split("-", 1)[0])
                oldest_age = max(0.0, (now_ms - oldest_ms) / 1000)
            self.metrics.lag.labels(name).set(int(lag))
            self.metrics.pending.labels(name).set(pending)
            self.metrics.oldest_pending_age.labels(name).set(oldest_age)
            self.last[name] = {"lag": int(lag), "pending": pending, "oldest": oldest_age}
        self.sampled = True

    async def lag_without_redis(self, group: dict[str, Any]) -> int:
        """A group's lag when XINFO GROUPS answers nil: entries after its last-delivered ID."""
        last_delivered = _text(group["last-delivered-id"])
        counted = 0
        cursor = f"({last_delivered}"
        while counted < LAG_COUNT_LIMIT:
            page: Any = await self.redis.xrange(self.stream, min=cursor, count=LAG_COUNT_PAGE)
            counted += len(page)
            if len(page) < LAG_COUNT_PAGE:
                return counted
            cursor = f"({_text(page[-1][0])}"
        # Too many to count every few seconds: the upper bound Redis would have
        # reported but for the deleted entries it cannot place.
        stream: Any = await self.redis.xinfo_stream(self.stream)
        entries_read = group.get("entries-read")
        if entries_read is None:
            return max(counted, int(stream["length"]))
        return max(counted, int(stream["entries-added"]) - int(entries_read))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
