"""`make soak`: a long run at a steady rate with archival on; not part of CI.

Runs `task-tracking run` as a subprocess against its own Redis (persistence on)
and moto's S3 server, publishes `--rate` events/s for `--minutes`, and prints
every 30 s the range of the sidecar's RSS (sampled every second), the groups' lag
and pending counts and the stream length; at the end it checks the invariant
(projection, archive exactly once, nothing pending) and prints the figures, the
maximum RSS and each minute's maximum.

    python -m bench.soak --minutes 10 --rate 2000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path

import orjson
import redis.asyncio as aioredis

from bench.servers import proc_rss_mib
from bench.workload import STREAM
from sidecar import eventloop
from sidecar.devserver import DevServer
from tests.conftest import MotoServer, s3_environment
from tests.helpers import (
    SidecarProcess,
    archive_objects_s3,
    check_exactly_once,
    event,
    expected_projection,
    group_done,
    projection,
    sidecar_env,
    wait_for,
)

BUCKET = "soak"
RSS_TARGET_MIB = 80  # issue #19: at 2,000 events/s, archival on, default flush
T0 = 1_773_568_800_000


async def produce(client: aioredis.Redis, rate: int, seconds: float, sent: list[dict]) -> None:
    tick = 0.05
    per_tick = max(1, int(rate * tick))
    deadline = time.monotonic() + seconds
    next_tick = time.monotonic()
    n = 0
    while time.monotonic() < deadline:
        batch = [
            event(
                f"s{(n + i) % 20000}",
                "success" if (n + i) % 3 else "in_progress",
                T0 + (n + i) * 7,
                project=f"org{(n + i) % 10}/repo",
            )
            for i in range(per_tick)
        ]
        async with client.pipeline(transaction=False) as pipe:
            for item in batch:
                pipe.xadd(STREAM, {"event": orjson.dumps(item)})
            await pipe.execute()
        sent.extend(batch)
        n += per_tick
        next_tick += tick
        await asyncio.sleep(max(0.0, next_tick - time.monotonic()))


class RssSamples:
    """The sidecar's RSS sampled every `interval` seconds: the maximum, and per reporting
    window its range (flat means the windows' ranges stay level)."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self._window: list[float] = []

    async def run(self, started: float, done: asyncio.Event) -> None:
        while not done.is_set():
            rss = proc_rss_mib(self.pid)
            self.samples.append((time.monotonic() - started, rss))
            self._window.append(rss)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.interval)

    def window(self) -> str:
        """min-max of the samples since the last call."""
        values, self._window = self._window, []
        return f"{min(values):5.1f}-{max(values):5.1f}" if values else "-"

    @property
    def peak(self) -> float:
        return max((rss for _, rss in self.samples), default=0.0)

    def per_minute(self) -> str:
        """The maximum of each minute, to show the curve is flat."""
        minutes: dict[int, float] = {}
        for seconds, rss in self.samples:
            minute = int(seconds // 60)
            minutes[minute] = max(minutes.get(minute, 0.0), rss)
        return " ".join(f"{rss:.0f}" for _, rss in sorted(minutes.items()))


async def report(
    client: aioredis.Redis, rss: RssSamples, started: float, done: asyncio.Event
) -> None:
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 30)
            return
        groups = {g["name"].decode(): g for g in await client.xinfo_groups(STREAM)}
        lag = {name: (g["lag"], g["pending"]) for name, g in groups.items()}
        print(
            f"t={time.monotonic() - started:6.0f}s rss={rss.window()}MiB"
            f" stream={await client.xlen(STREAM):8d} (lag, pending)={lag}",
            flush=True,
        )


async def soak(minutes: float, rate: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="soak-"))
    with DevServer(persistent=True, folder=folder / "redis") as server:
        s3 = MotoServer()
        try:
            s3.client().create_bucket(Bucket=BUCKET)
            env = sidecar_env(server.url, s3_archive_enabled=True, s3_bucket=BUCKET)
            env.update(s3_environment(s3))
            sidecar = SidecarProcess(env, folder / "sidecar.log").start()
            assert sidecar.process is not None
            client = aioredis.Redis.from_url(server.url)
            sent: list[dict] = []
            started = time.monotonic()
            done = asyncio.Event()
            rss = RssSamples(sidecar.process.pid)
            sampler = asyncio.create_task(rss.run(started, done))
            reporter = asyncio.create_task(report(client, rss, started, done))
            await produce(client, rate, minutes * 60, sent)
            print(f"published {len(sent)} events in {time.monotonic() - started:.0f}s; draining")
            for group in ("task-status-projector", "task-history-archiver"):
                await wait_for(lambda g=group: group_done(client, STREAM, g), 600, f"{group} done")
            done.set()  # a flag, not cancel(): a cancelled redis-py call can be swallowed
            await reporter
            await sampler
            expected = expected_projection(sent)
            state = await projection(client, expected)
            wrong = sum(state[k].get("eventId") != v["eventId"] for k, v in expected.items())
            figures = check_exactly_once(
                archive_objects_s3(s3.client(), BUCKET), [orjson.dumps(e) for e in sent]
            )
            print(
                f"soak RSS: max {rss.peak:.1f} MiB over {len(rss.samples)} samples (1 s);"
                f" per-minute max {rss.per_minute()} MiB (target: max <= {RSS_TARGET_MIB} MiB,"
                f" {'met' if rss.peak <= RSS_TARGET_MIB else 'NOT met'})"
            )
            print(
                f"soak done: events={len(sent)} rss={proc_rss_mib(sidecar.process.pid):.1f}MiB"
                f" stream_length={await client.xlen(STREAM)} projection_wrong={wrong}"
                f" objects={figures['objects']} lost={figures['missing']}"
                f" duplicated={figures['duplicated']}"
            )
            sidecar.terminate()
            await client.aclose()
        finally:
            s3.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", 10)))
    parser.add_argument("--rate", type=int, default=int(os.environ.get("SOAK_RATE", 2000)))
    args = parser.parse_args()
    eventloop.run(soak(args.minutes, args.rate))


if __name__ == "__main__":
    main()
