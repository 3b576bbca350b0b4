"""The sidecar's real workers (consumer-group runner plus projector or archiver), run in
this process until a given number of entries is acknowledged."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from bench.workload import PROJECTOR_GROUP, STREAM
from sidecar.connections import connect
from sidecar.consumer import BatchHandler, ConsumerGroupRunner, Flushed, RunnerOptions
from sidecar.events import ValidEvent
from sidecar.metrics import Metrics
from sidecar.projector import RedisTaskStatusProjector


class CountingHandler:
    """A worker, counting what it hands back for acknowledgement and, with `timed`, for
    events that carry `sentAt`, the seconds from send to durable (off in the throughput
    cases: looking at every event is the harness's cost, not the sidecar's)."""

    def __init__(self, handler: BatchHandler, expected: int, *, timed: bool = False) -> None:
        self.handler = handler
        self.timed = timed
        self.read_ahead = handler.read_ahead
        self.expected = expected
        self.done = 0
        self.finished = asyncio.Event()
        self.latencies: list[float] = []
        self._sent: dict[str, float] = {}

    async def prepare(self) -> None:
        await self.handler.prepare()

    def add(self, events: Sequence[ValidEvent]) -> None:
        for event in events if self.timed else ():
            sent = event.fields.get("sentAt")
            if sent is not None:
                self._sent[event.entry_id] = sent
        self.handler.add(events)

    def seconds_until_due(self) -> float | None:
        return self.handler.seconds_until_due()

    async def flush(self, *, force: bool) -> Flushed:
        flushed = await self.handler.flush(force=force)
        ids = flushed.durable_ids
        now = time.time()
        for entry_id in ids if self.timed else ():
            sent = self._sent.pop(entry_id, None)
            if sent is not None:
                self.latencies.append(now - sent)
        self.done += len(ids)
        if self.done >= self.expected:
            self.finished.set()
        return flushed


async def run_worker(
    url: str,
    make_handler: object,
    expected: int,
    *,
    group: str = PROJECTOR_GROUP,
    dead_letter: bool = True,
    timed: bool = False,
) -> tuple[float, CountingHandler]:
    """Seconds for the runner to read, handle and acknowledge `expected` entries."""
    redis = connect(url)
    metrics = Metrics()
    handler = CountingHandler(make_handler(redis, metrics), expected, timed=timed)  # type: ignore[operator]
    runner = ConsumerGroupRunner(
        redis,
        stream=STREAM,
        group=group,
        consumer="bench",
        handler=handler,
        metrics=metrics,
        options=RunnerOptions(batch_size=500, block_ms=200, dead_letter=dead_letter),
    )
    started = time.perf_counter()
    task = asyncio.create_task(runner.run())
    await handler.finished.wait()
    elapsed = time.perf_counter() - started
    await runner.stop()
    await task
    await redis.aclose()
    return elapsed, handler


def projector(redis: object, metrics: Metrics) -> RedisTaskStatusProjector:
    return RedisTaskStatusProjector(redis, metrics, group=PROJECTOR_GROUP)  # type: ignore[arg-type]


async def drain(url: str, expected: int) -> float:
    """Seconds for the sidecar's projector to drain `expected` entries."""
    elapsed, _ = await run_worker(url, projector, expected)
    return elapsed
