"""The read paths' cases: snapshot latency, SSE fan-out, and the projector's cost of the
changes feed.

The API runs as `task-tracking api` in its own process (its CPU is read from /proc); the
clients and the producer run in this one. Fan-out clients read raw bytes; a sample of
them parses every event and measures delivery (entry ID time of the XADD, a server
clock, to the moment the bytes arrived), so the harness's parsing does not become the
bottleneck it measures.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import aiohttp
import orjson
import redis

from bench.servers import proc_cpu_seconds
from sidecar import eventloop
from sidecar.devserver import DevServer, free_port
from sidecar.events import EVENT_FIELD, ValidEvent, decode_entry
from sidecar.keys import CHANGES_KEY
from sidecar.metrics import Metrics

SAMPLED_CLIENTS = 20
MARK = b"event: execution\n"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


class ApiProcess:
    """`python -m sidecar api` on a free port, until stopped."""

    def __init__(self, server: DevServer) -> None:
        self.port = free_port()
        env = dict(os.environ)
        env.update(
            TASK_TRACKING_REDIS_URL=server.url,
            TASK_TRACKING_API_PORT=str(self.port),
            TASK_TRACKING_HTTP_HOST="127.0.0.1",
            TASK_TRACKING_LOG_LEVEL="warning",
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "api"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        eventloop.run(self._ready())

    async def _ready(self) -> None:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(self.base + "/readyz") as reply:
                        if reply.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError("task-tracking api did not become ready")

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def _project(server: DevServer, count: int, project: str) -> None:
    """`count` executions of one project, written by the real projector."""
    from sidecar.connections import connect
    from sidecar.projector import RedisTaskStatusProjector

    async def run() -> None:
        client = connect(server.url)
        projector = RedisTaskStatusProjector(client, Metrics(), group="bench")
        batch: list[ValidEvent] = []
        for n in range(count):
            data = {
                "eventId": f"e{n}", "executionId": f"x{n:06d}", "taskName": "deploy",
                "status": "success", "project": project, "occurredAt": 1_700_000_000_000 + n,
                "actor": {"provider": "github", "id": str(n)}, "prLinks": ["https://x/1"],
                "visibility": {"responsibleUsers": ["ann", "bob"]},
            }  # fmt: skip
            event = decode_entry(f"{1_800_000_000_000 + n}-0", {EVENT_FIELD: orjson.dumps(data)})
            assert isinstance(event, ValidEvent)
            batch.append(event)
            if len(batch) == 500:
                await projector.apply(batch)
                batch = []
        if batch:
            await projector.apply(batch)
        await client.aclose()

    eventloop.run(run())


def snapshot_latency(server: DevServer, executions: int, requests: int) -> list[Any]:
    from bench.cases import Row

    redis.Redis(port=server.port).flushall()
    _project(server, executions, "bench/snapshot")
    api = ApiProcess(server)

    async def measure(path: str) -> list[float]:
        seconds = []
        async with aiohttp.ClientSession() as session:
            for n in range(requests):
                started = time.perf_counter()
                async with session.get(api.base + path.format(n=n)) as reply:
                    await reply.read()
                    assert reply.status == 200, path
                seconds.append(time.perf_counter() - started)
        return seconds

    rows = []
    try:
        for label, path in (
            ("first page, 50", "/api/v1/projects/bench/snapshot/executions?limit=50"),
            ("first page, 500", "/api/v1/projects/bench/snapshot/executions?limit=500"),
            ("one execution", "/api/v1/executions/x{n:06d}"),
        ):
            seconds = eventloop.run(measure(path))
            rows.append(
                Row(
                    f"snapshot of a {executions:,}-execution project: {label}, p50 (p99 in notes)",
                    "ms",
                    percentile(seconds, 0.5) * 1000,
                    notes={"p99_ms": percentile(seconds, 0.99) * 1000, "requests": requests},
                )
            )
            rows.append(Row("  p99", "ms", percentile(seconds, 0.99) * 1000))
    finally:
        api.stop()
    return rows


def sse_fanout(server: DevServer, clients: int, rate: int, seconds: float) -> list[Any]:
    """`clients` SSE clients, changes XADDed to the feed at `rate`/s for `seconds`."""
    from bench.cases import Row

    redis.Redis(port=server.port).flushall()
    api = ApiProcess(server)
    state = orjson.dumps(
        {"executionId": "x", "taskName": "deploy", "status": "success", "project": "o/r"}
    )

    async def run() -> tuple[list[float], int, int, float]:
        delays: list[float] = []
        received = [0] * clients
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            ready = asyncio.Event()
            subscribed = 0

            async def client(number: int) -> None:
                nonlocal subscribed
                async with session.get(api.base + "/api/v1/changes") as reply:
                    await reply.content.readline()  # ": connected"
                    subscribed += 1
                    if subscribed == clients:
                        ready.set()
                    sampled = number < SAMPLED_CLIENTS
                    buffer = tail = b""
                    while True:
                        chunk = await reply.content.readany()
                        if not chunk:
                            return
                        window = tail + chunk  # an event line may straddle two chunks
                        received[number] += window.count(MARK)
                        tail = window[-(len(MARK) - 1) :]
                        if not sampled:
                            continue
                        now = time.time()
                        buffer += chunk
                        *blocks, buffer = buffer.split(b"\n\n")
                        for block in blocks:
                            if block.startswith(b"id: "):
                                ms = int(block[4:].split(b"-", 1)[0])
                                delays.append(now - ms / 1000)

            tasks = [asyncio.create_task(client(n)) for n in range(clients)]
            await asyncio.wait_for(ready.wait(), 120)
            producer = redis.asyncio.Redis(port=server.port)
            cpu_before = api.cpu_seconds()
            started = time.monotonic()
            sent = 0
            while (elapsed := time.monotonic() - started) < seconds:
                due = int(elapsed * rate) - sent
                if due > 0:
                    async with producer.pipeline(transaction=False) as pipe:
                        for _ in range(due):
                            pipe.xadd(CHANGES_KEY, {"state": state, "project": "o/r"})
                        await pipe.execute()
                    sent += due
                await asyncio.sleep(0.005)
            cpu = api.cpu_seconds() - cpu_before
            elapsed = time.monotonic() - started
            for _ in range(200):  # what is in flight arrives (10 s at most)
                if min(received) >= sent:
                    break
                await asyncio.sleep(0.05)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await producer.aclose()
            complete = sum(1 for count in received if count >= sent)
            return delays, sent, complete, cpu / elapsed

    try:
        delays, sent, complete, cpu_share = eventloop.run(run())
    finally:
        api.stop()
    label = f"SSE fan-out, {clients:,} clients, {rate:,} changes/s for {seconds:.0f} s"
    return [
        Row(
            f"{label}: delivery p99 (XADD to client)",
            "ms",
            percentile(delays, 0.99) * 1000,
            notes={
                "p50_ms": percentile(delays, 0.5) * 1000,
                "changes": sent,
                "clients_with_every_change": complete,
                "sampled_clients": SAMPLED_CLIENTS,
            },
        ),
        Row("  p50", "ms", percentile(delays, 0.5) * 1000),
        Row("  API process CPU (1.0 = one core)", "cores", cpu_share),
        Row("  clients that got every change", "clients", complete),
    ]


FEED_DRAIN = """
import sys
from bench import cases
from sidecar import eventloop, projector
from sidecar.devserver import DevServer
if sys.argv[2] == "off":
    projector.CHANGES_MAXLEN = -1
eventloop.tune_garbage_collector()
with DevServer("redis") as server:
    row = cases.projector_drain(server, int(sys.argv[1]))[0]
print(row.sidecar)
"""


def feed_cost(count: int, pairs: int) -> list[Any]:
    """The projector's drain with the changes feed and without, alternating in fresh
    processes (as bench.ab does), so the feed's cost is measured in the same window."""
    from bench.cases import Row

    def drain(mode: str) -> float:
        result = subprocess.run(
            [sys.executable, "-c", FEED_DRAIN, str(count), mode],
            capture_output=True,
            text=True,
            check=True,
        )
        return float(result.stdout.strip().splitlines()[-1])

    with_feed, without = [], []
    for _ in range(pairs):
        without.append(drain("off"))
        with_feed.append(drain("on"))
    ratios = sorted(a / b for a, b in zip(with_feed, without, strict=True))
    median = ratios[len(ratios) // 2]
    return [
        Row(
            f"projector drain, {count:,} pre-filled, with the changes feed / without (median"
            f" of {pairs} pairs)",
            "ratio",
            median,
            target=">= 0.90",
            met=median >= 0.90,
            notes={"with_feed": with_feed, "without_feed": without},
        ),
        Row("  with the feed", "events/s", sorted(with_feed)[pairs // 2]),
        Row("  without", "events/s", sorted(without)[pairs // 2]),
    ]


def memory_per_execution(server: DevServer, count: int) -> list[Any]:
    """Redis memory of the projection per execution, and what the jsonFields field and a
    changes-feed entry add to it (MEMORY USAGE, averaged over a sample)."""
    from bench.cases import Row

    client = redis.Redis(port=server.port)
    client.flushall()
    _project(server, count, "bench/memory")
    keys = [f"task-tracking:execution:x{n:06d}" for n in range(0, count, max(1, count // 200))]
    hashes = sum(client.memory_usage(k, samples=0) or 0 for k in keys) / len(keys)
    for key in keys:
        client.hdel(key, "jsonFields")
    without = sum(client.memory_usage(k, samples=0) or 0 for k in keys) / len(keys)
    feed = (client.memory_usage(CHANGES_KEY, samples=0) or 0) / max(1, client.xlen(CHANGES_KEY))
    return [
        Row("projection hash per execution (actor, prLinks, visibility set)", "bytes", hashes),
        Row("  of which the jsonFields field", "bytes", hashes - without),
        Row("  changes-feed entry (capped at 10,000 entries)", "bytes", feed),
    ]
