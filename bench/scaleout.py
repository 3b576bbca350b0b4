"""Scale-out: 1, 2 and 4 sidecar processes in one consumer group on one stream.

Each process runs the sidecar's projector (the consumer-group runner and
`RedisTaskStatusProjector`, as `task-tracking run` does, without the HTTP port) under
its own consumer name. The backlog is pre-filled, every process connects and waits, then
all start at once; the drain ends when the group has no lag and nothing pending. Redis's
CPU comes from `INFO cpu` before and after: where it nears one core, Redis's single thread
is the limit and another replica adds nothing.

    python -m bench.scaleout [EVENTS]
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import time
from typing import Any

import redis

from bench import ceiling
from bench.cases import Row, fresh
from bench.drain import projector
from bench.workload import PROJECTOR_GROUP, STREAM, encoded, prefill
from sidecar import allocator, eventloop
from sidecar.connections import connect
from sidecar.consumer import ConsumerGroupRunner, RunnerOptions
from sidecar.devserver import DevServer
from sidecar.metrics import Metrics

REPLICAS = (1, 2, 4)


def _replica(url: str, name: str, ready: Any, go: Any, stop: Any) -> None:
    allocator.pin_mmap_threshold()  # as `task-tracking run` sets itself up
    eventloop.tune_garbage_collector()
    eventloop.run(_consume(url, name, ready, go, stop))


async def _consume(url: str, name: str, ready: Any, go: Any, stop: Any) -> None:
    client = connect(url)
    metrics = Metrics()
    await client.ping()
    runner = ConsumerGroupRunner(
        client,
        stream=STREAM,
        group=PROJECTOR_GROUP,
        consumer=name,
        handler=projector(client, metrics),
        metrics=metrics,
        options=RunnerOptions(batch_size=500, block_ms=200),  # as bench.drain
    )
    ready.set()
    await asyncio.to_thread(go.wait)
    task = asyncio.create_task(runner.run())
    await asyncio.to_thread(stop.wait)
    await runner.stop()
    await task
    await client.aclose()


def redis_cpu_seconds(client: redis.Redis) -> float:
    info: dict[str, Any] = client.info("cpu")  # type: ignore[assignment]
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def drain_with(server: DevServer, raw: list[bytes], replicas: int) -> tuple[float, float]:
    """Seconds for `replicas` processes to drain `raw`, and Redis's CPU seconds meanwhile."""
    client = fresh(server)
    prefill(server.port, raw)
    client.xgroup_create(STREAM, PROJECTOR_GROUP, id="0")
    context = multiprocessing.get_context("spawn")
    go, stop = context.Event(), context.Event()
    processes, readies = [], []
    for number in range(replicas):
        ready = context.Event()
        process = context.Process(
            target=_replica, args=(server.url, f"replica-{number}", ready, go, stop), daemon=True
        )
        process.start()
        processes.append(process)
        readies.append(ready)
    try:
        for ready, process in zip(readies, processes, strict=True):
            while not ready.wait(0.1):
                if not process.is_alive():
                    raise RuntimeError("a replica exited before starting")
        cpu = redis_cpu_seconds(client)
        started = time.perf_counter()
        go.set()
        while True:
            groups = client.xinfo_groups(STREAM)
            if groups and groups[0]["lag"] == 0 and groups[0]["pending"] == 0:
                break
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        return seconds, redis_cpu_seconds(client) - cpu
    finally:
        stop.set()
        for process in processes:
            process.join(15)
            if process.is_alive():
                process.kill()


def scale_out(server: DevServer, count: int) -> list[Row]:
    """Aggregate drain rate and Redis's CPU with 1, 2 and 4 replicas (`REPLICAS`), next
    to the same-run ceiling for the per-event write."""
    raw = encoded(count)
    fresh(server)
    ceiling_rate = ceiling.ceiling_rate(server.port, raw[: min(count, 200_000)])
    rows = []
    single: float | None = None
    for replicas in REPLICAS:
        seconds, cpu = drain_with(server, raw, replicas)
        rate = count / seconds
        single = single or rate
        busy = cpu / seconds * 100
        rows.append(
            Row(
                f"scale-out: {replicas} sidecar process{'es' if replicas > 1 else ''},"
                f" one group, {count:,} pre-filled",
                "events/s",
                rate,
                ceiling=ceiling_rate,
                notes={
                    "seconds": seconds,
                    "x_one_replica": rate / single,
                    "redis_cpu_us_per_event": cpu / count * 1e6,
                    "redis_busy_percent": busy,
                },
            )
        )
        rows.append(
            Row(
                "  Redis CPU in that drain: us per event; % of its one core (ceiling column)",
                "us",
                cpu / count * 1e6,
                ceiling=busy,
            )
        )
    return rows


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    from bench.__main__ import table

    with DevServer("redis") as server:
        print(table(scale_out(server, count)))


if __name__ == "__main__":
    main()
