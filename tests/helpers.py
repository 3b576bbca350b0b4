"""Shared test helpers: building events, waiting on conditions, running the sidecar."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from sidecar.events import STATUS_RANK

# The contract's default names (DESIGN.md), written out: tests check the contract, not
# the code's defaults.
STREAM = "task-events:v1"
DEAD_LETTER = f"{STREAM}:dead-letter"
PROJECTOR = "task-status-projector"
ARCHIVER = "task-history-archiver"
# A stream entry time for entries made up in tests (2027-01-15): the future limit measures
# occurredAt against it, and the tests' events are dated before.
ADDED_MS = 1_800_000_000_000

_counter = itertools.count()


def event(
    execution_id: str = "exec-1",
    status: str = "in_progress",
    occurred_at: str | int = 1_700_000_000_000,
    *,
    project: str = "my-org/my-repo",
    event_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "eventId": f"evt-{next(_counter):08d}" if event_id is None else event_id,
        "executionId": execution_id,
        "taskName": "deploy",
        "status": status,
        "project": project,
        "occurredAt": occurred_at,
        **extra,
    }


def ordering_key(data: dict[str, Any]) -> tuple[int, int, str]:
    from sidecar.events import occurred_at_ms

    return (occurred_at_ms(data["occurredAt"]), STATUS_RANK[data["status"]], data["eventId"])


def expected_projection(events: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """executionId -> the event the ordering rule says the projection holds."""
    winners: dict[str, dict[str, Any]] = {}
    for data in events:
        current = winners.get(data["executionId"])
        if current is None or ordering_key(data) > ordering_key(current):
            winners[data["executionId"]] = data
    return winners


async def publish(client: aioredis.Redis, stream: str, events: Iterable[Any]) -> list[str]:
    """XADD each item: a dict is JSON-encoded; bytes/str go in as they are; a tuple of
    (field, value) pairs is the entry's whole field list."""
    async with client.pipeline(transaction=False) as pipe:
        for item in events:
            if isinstance(item, dict):
                pipe.xadd(stream, {"event": orjson.dumps(item)})
            elif isinstance(item, tuple):
                pipe.xadd(stream, dict(item))
            else:
                pipe.xadd(stream, {"event": item})
        ids = await pipe.execute()
    return [i.decode() for i in ids]


async def wait_for(
    condition: Callable[[], Awaitable[Any]] | Callable[[], Any],
    timeout: float = 20.0,
    message: str = "condition",
) -> Any:
    """Poll `condition` until truthy and return its value; fail with `message` after
    `timeout` seconds. The tests' one polling helper."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.05)


class Producer:
    """Keeps publishing in the background, a batch every 50 ms, and records what entered the
    stream: `valid` events (and `valid_raw`, their bytes as published) and `invalid_ids`.

    `make(n)` is the n-th item: a dict is a valid event, bytes go in as they are (an invalid
    one). A batch Redis refuses (the fault tests stop it) never entered the stream and is
    not recorded. With `owns_client`, `stop()` closes the client.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        make: Callable[[int], dict[str, Any] | bytes] | None = None,
        *,
        batch: int = 20,
        owns_client: bool = False,
    ) -> None:
        self.client = client
        self.make = make or (lambda n: event(f"k{n}", "success", 1_773_568_800_000 + n))
        self.batch = batch
        self.owns_client = owns_client
        self.valid: list[dict[str, Any]] = []
        self.valid_raw: list[bytes] = []
        self.invalid_ids: list[str] = []
        self.paused = asyncio.Event()
        self._n = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            if self.paused.is_set():
                await asyncio.sleep(0.05)
                continue
            items = [self.make(self._n + i) for i in range(self.batch)]
            self._n += self.batch
            try:
                ids = await publish(self.client, STREAM, items)
            except Exception:
                await asyncio.sleep(0.1)  # Redis away: these never entered the stream
                continue
            for item, entry_id in zip(items, ids, strict=True):
                if isinstance(item, dict):
                    self.valid.append(item)
                    self.valid_raw.append(orjson.dumps(item))
                else:
                    self.invalid_ids.append(entry_id)
            await asyncio.sleep(0.05)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        # A flag, not cancel(): redis-py can turn a cancellation into a TimeoutError,
        # which the retry above would swallow, and the producer would go on forever.
        assert self._task is not None
        self._stopping.set()
        await self._task
        if self.owns_client:
            await self.client.aclose()

    async def published_more(self, count: int, timeout: float = 20.0) -> None:
        """Wait until `count` more valid events than now entered the stream."""
        target = len(self.valid) + count
        await wait_for(lambda: len(self.valid) >= target, timeout, f"{count} more events")


async def group_pending(client: aioredis.Redis, stream: str, group: str) -> int:
    try:
        info = await client.xpending(stream, group)
    except Exception:
        return -1
    return int(info["pending"])


async def group_done(client: aioredis.Redis, stream: str, group: str) -> bool:
    """Every entry of the stream delivered to the group and acknowledged."""
    try:
        groups = await client.xinfo_groups(stream)
    except Exception:
        return False
    for info in groups:
        if info["name"].decode() == group:
            return info["pending"] == 0 and info.get("lag") == 0
    return False


async def group_unacked(client: aioredis.Redis, stream: str, group: str) -> int:
    """Entries the group has not acknowledged yet: never delivered (lag) or pending."""
    for info in await client.xinfo_groups(stream):
        if info["name"].decode() == group:
            return int(info["lag"]) + int(info["pending"])
    return len(await client.xrange(stream))


async def group_read_all(client: aioredis.Redis, stream: str, group: str) -> bool:
    """Every entry of the stream delivered to the group (acknowledged or not)."""
    try:
        groups = await client.xinfo_groups(stream)
    except Exception:
        return False
    return any(g["name"].decode() == group and g.get("lag") == 0 for g in groups)


async def projection(client: aioredis.Redis, execution_ids: Iterable[str]) -> dict[str, dict]:
    async with client.pipeline(transaction=False) as pipe:
        ids = list(execution_ids)
        for execution_id in ids:
            pipe.hgetall(f"task-tracking:execution:{execution_id}")
        rows = await pipe.execute()
    return {
        execution_id: {k.decode(): v.decode() for k, v in row.items()}
        for execution_id, row in zip(ids, rows, strict=True)
    }


def sidecar_env(redis_url: str, **settings: Any) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("TASK_TRACKING_") or key == "TASK_TRACKING_TEST_SERVER"
    }
    env["TASK_TRACKING_REDIS_URL"] = redis_url
    env.setdefault("TASK_TRACKING_HTTP_PORT", "0")
    for name, value in settings.items():
        env[f"TASK_TRACKING_{name.upper()}"] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    return env


def folder_archive_env(redis_url: str, folder: Path) -> dict[str, str]:
    """`task-tracking run` archiving to `folder`, with quick reads and flushes."""
    return sidecar_env(
        redis_url,
        s3_archive_enabled=True,
        archive_sink="folder",
        archive_folder=folder,
        redis_block_ms=200,
        archive_flush_max_age_seconds=0.5,
    )


async def both_groups_done(client: aioredis.Redis, timeout: float) -> None:
    """Wait until the projector's and the archiver's groups have settled every entry."""
    await wait_for(lambda: group_done(client, STREAM, PROJECTOR), timeout, "projector")
    await wait_for(lambda: group_done(client, STREAM, ARCHIVER), timeout, "archiver")


class SidecarProcess:
    """`task-tracking run` as a subprocess, for kill and signal tests."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> SidecarProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run"],
            env=self.env,
            stdout=log,
            stderr=log,
        )
        log.close()
        return self

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def terminate(self, timeout: float = 15) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def sidecar_settings(redis_url: str, **overrides: Any):  # type: ignore[no-untyped-def]
    """Settings for an in-process sidecar: free HTTP port, quick blocking reads."""
    from sidecar.config import load_settings

    values: dict[str, Any] = {"redis_url": redis_url, "http_port": 0, "redis_block_ms": 200}
    values.update(overrides)
    return load_settings({}, **values)


class running_sidecar:
    """An in-process sidecar, started on entry and drained on exit."""

    def __init__(self, redis_url: str, **overrides: Any) -> None:
        from sidecar.runtime import Sidecar

        self.sidecar = Sidecar(sidecar_settings(redis_url, **overrides), stats_interval=0.2)

    async def __aenter__(self):  # type: ignore[no-untyped-def]
        await self.sidecar.start()
        return self.sidecar

    async def __aexit__(self, *exc: object) -> None:
        await self.sidecar.stop()


KEY_RE = (
    r"^{prefix}/([A-Za-z0-9-]+/[A-Za-z0-9._-]+)/(\d{{4}}-\d{{2}}-\d{{2}})"
    r"/events-(\d{{13}})-([0-9a-z]{{6}})\.jsonl$"
)


def archive_objects_s3(client: Any, bucket: str) -> dict[str, bytes]:
    """Every object in the bucket, key -> body (boto3 client)."""
    objects: dict[str, bytes] = {}
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        for item in page.get("Contents", ()):
            objects[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return objects


def archive_objects_folder(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*.jsonl"))
        if not path.name.startswith(".")
    }


def archive_line(text: str) -> bytes:
    """What the archive holds of an event text: as sent less surrounding whitespace, or
    its compact form when it spans several lines (computed here independently)."""
    stripped = text.strip(" \t\r\n")
    if "\n" in stripped or "\r" in stripped:
        return json.dumps(json.loads(stripped), ensure_ascii=False, separators=(",", ":")).encode()
    return stripped.encode()


def check_exactly_once(
    objects: dict[str, bytes], valid_raw: list[bytes], prefix: str = "task-tracking"
) -> dict[str, int]:
    """Assert the seed layout and that every valid event is in exactly one object, once.

    Returns the figures: objects, lines, missing, duplicated."""
    import re
    from collections import Counter

    from sidecar.archiver import utc_day
    from sidecar.events import occurred_at_ms

    pattern = re.compile(KEY_RE.format(prefix=re.escape(prefix)))
    seen: Counter[bytes] = Counter()
    for key, body in objects.items():
        if key.startswith(f"{prefix}/.probe/"):
            # a conditional-write probe of a replica killed mid-probe (replay skips it too)
            continue
        match = pattern.match(key)
        assert match, f"key {key!r} is not in the seed layout"
        assert body.endswith(b"\n"), key
        for line in body.split(b"\n")[:-1]:
            data = json.loads(line)  # orjson refuses escaped lone surrogates; JSON.parse not
            assert data["project"] == match.group(1), key
            assert utc_day(occurred_at_ms(data["occurredAt"])) == match.group(2), key
            seen[line] += 1
    wanted = Counter(valid_raw)
    missing = sum((wanted - seen).values())
    duplicated = sum((seen - wanted).values())
    figures = {
        "objects": len(objects),
        "lines": sum(seen.values()),
        "missing": missing,
        "duplicated": duplicated,
    }
    assert missing == 0 and duplicated == 0, figures
    return figures


def projector_runner(client: Any, consumer: str, options: Any) -> tuple[Any, Any]:
    """An in-process projector runner on `STREAM` (`ConsumerGroupRunner`, its `Metrics`),
    for tests that drive the runner itself rather than `task-tracking run`."""
    from sidecar.consumer import ConsumerGroupRunner
    from sidecar.metrics import Metrics
    from sidecar.projector import RedisTaskStatusProjector

    metrics = Metrics()
    runner = ConsumerGroupRunner(
        client,
        stream=STREAM,
        group=PROJECTOR,
        consumer=consumer,
        handler=RedisTaskStatusProjector(client, metrics, group=PROJECTOR),
        metrics=metrics,
        options=options,
    )
    return runner, metrics
