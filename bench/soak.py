"""`make soak`: a long run at a steady rate with archival on; not part of CI.

Runs `task-tracking run` as a subprocess against its own Redis (persistence on)
and moto's S3 server, publishes `--rate` events/s for `--minutes`, and prints
every 30 s the sidecar's RSS, the groups' lag and pending counts and the stream
length; at the end it checks the invariant (projection, archive exactly once,
nothing pending) and prints the figures.

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


async def report(client: aioredis.Redis, pid: int, started: float, done: asyncio.Event) -> None:
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 30)
            return
        groups = {g["name"].decode(): g for g in await client.xinfo_groups(STREAM)}
        lag = {name: (g["lag"], g["pending"]) for name, g in groups.items()}
        print(
            f"t={time.monotonic() - started:6.0f}s rss={proc_rss_mib(pid):6.1f}MiB"
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
            reporter = asyncio.create_task(report(client, sidecar.process.pid, started, done))
            await produce(client, rate, minutes * 60, sent)
            print(f"published {len(sent)} events in {time.monotonic() - started:.0f}s; draining")
            for group in ("task-status-projector", "task-history-archiver"):
                await wait_for(lambda g=group: group_done(client, STREAM, g), 600, f"{group} done")
            done.set()  # a flag, not cancel(): a cancelled redis-py call can be swallowed
            await reporter
            expected = expected_projection(sent)
            state = await projection(client, expected)
            wrong = sum(state[k].get("eventId") != v["eventId"] for k, v in expected.items())
            figures = check_exactly_once(
                archive_objects_s3(s3.client(), BUCKET), [orjson.dumps(e) for e in sent]
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
