"""Stream and consumer-group statistics, sampled on a timer for the metrics.

Queried every few seconds from XINFO, never per event or per scrape, so a
scrape storm costs Redis nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError, ResponseError

from sidecar.metrics import Metrics

log = logging.getLogger(__name__)

# When Redis cannot say a group's lag (XINFO GROUPS answers nil), it is
# counted with XRANGE, up to this many entries.
LAG_COUNT_LIMIT = 100_000


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
    ) -> None:
        self.redis = redis
        self.metrics = metrics
        self.stream = stream
        self.dead_letter = f"{stream}:dead-letter"
        self.groups = groups
        self.interval = interval
        self.last: dict[str, dict[str, float]] = {}  # group -> {"lag", "pending", ...}
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Sample every `interval` seconds until `stop()`."""
        while not self._stopping.is_set():
            try:
                await self.sample()
            except (RedisError, OSError) as exc:
                log.debug("stream statistics unavailable: %s", exc)
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
            lag = info.get("lag")
            if lag is None:
                lag = await self._count_after(_text(info["last-delivered-id"]))
            pending = int(info["pending"])
            oldest_age = 0.0
            if pending:
                summary = await self.redis.xpending(self.stream, name)
                oldest_ms = int(_text(summary["min"]).split("-", 1)[0])
                oldest_age = max(0.0, (now_ms - oldest_ms) / 1000)
            self.metrics.lag.labels(name).set(int(lag))
            self.metrics.pending.labels(name).set(pending)
            self.metrics.oldest_pending_age.labels(name).set(oldest_age)
            self.last[name] = {"lag": int(lag), "pending": pending, "oldest": oldest_age}

    async def _count_after(self, last_delivered: str) -> int:
        entries: Any = await self.redis.xrange(
            self.stream, min=f"({last_delivered}", count=LAG_COUNT_LIMIT
        )
        return len(entries)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
