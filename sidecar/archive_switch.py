"""The archiver's runtime switch: start, stop and reconfigure archival while the process runs.

One long-lived supervisor task owns the archiver's runner; callers (start-up,
the custom-resource watch, tests) send it an `ArchiveConfig` (sidecar.config) and wait
for the answer. Stopping an archiver flushes its buffers and acknowledges them before
the next one starts, so a switch neither loses nor duplicates events; an archiver
that cannot finish in time (S3 hangs) is given up on, and what it had not written
stays pending for the next one (or the restarted process) to write, exactly once. Worker
tasks are created by the supervisor, never from a kopf handler, so kopf's
shutdown (which cancels tasks created after it started) cannot cut a flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from sidecar import eventloop
from sidecar.archiver import S3TaskHistoryArchiver
from sidecar.conditional_writes import ConditionalWrites, clear_conditional_writes
from sidecar.config import ArchiveConfig, Settings
from sidecar.consumer import ConsumerGroupRunner, RunnerOptions
from sidecar.metrics import Metrics
from sidecar.sinks import (
    ArchiveSink,
    FolderSink,
    S3Sink,
    SinkError,
    client_error_fix,
    s3_client_context,
)
from sidecar.watermark import ArchiveWatermark

log = logging.getLogger(__name__)

# How long stopping an archiver waits for its uploads in flight and its final flush
# before giving up on them: the process has 10 s from SIGTERM to exit, and S3 calls time
# out only after 10 s. What it gives up on is unacknowledged, so it stays pending and is
# written after the restart (the key scheme and the read-back make that exactly once).
STOP_GIVE_UP_SECONDS = 6.0


class S3Clients:
    """One aiobotocore client per (region, endpoint) for the life of the process."""

    def __init__(self) -> None:
        self._stack = AsyncExitStack()
        self._clients: dict[tuple[str | None, str | None], Any] = {}

    async def get(self, region: str | None, endpoint_url: str | None) -> Any:
        key = (region, endpoint_url)
        if key not in self._clients:
            context = s3_client_context(region=region, endpoint_url=endpoint_url)
            self._clients[key] = await self._stack.enter_async_context(context)
        return self._clients[key]

    async def close(self) -> None:
        await self._stack.aclose()
        self._clients.clear()


async def open_sink(target: ArchiveConfig, s3_clients: S3Clients) -> ArchiveSink:
    """The sink `target` writes to (raises `SinkError`, a configuration one, if it has none)."""
    if target.sink == "folder":
        if target.folder is None:
            raise SinkError("archive folder is not set", "config", configuration=True)
        return FolderSink(target.folder)
    if not target.bucket:
        raise SinkError("archival is enabled but no bucket is set", "config", configuration=True)
    try:
        client = await s3_clients.get(target.region, target.endpoint_url)
    except Exception as exc:  # a malformed region or endpoint URL, half the credentials
        raise SinkError(
            f"cannot create the S3 client: {exc}; {client_error_fix(exc)}",
            "ClientConfig",
            configuration=True,
        ) from exc
    return S3Sink(client, target.bucket)


@dataclass
class _Request:
    target: ArchiveConfig | None  # None: stop the supervisor
    check: bool
    reply: asyncio.Future[str | None]


class ArchiveSwitch:
    """Owns the archiver; `apply(target)` switches it, `run()` is the supervisor task."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        settings: Settings,
        metrics: Metrics,
        s3_clients: S3Clients,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.metrics = metrics
        self.s3_clients = s3_clients
        self.target = ArchiveConfig()
        self.runner: ConsumerGroupRunner | None = None
        self.archiver: S3TaskHistoryArchiver | None = None
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._requests: asyncio.Queue[_Request] = asyncio.Queue()
        self.stop_give_up_seconds = STOP_GIVE_UP_SECONDS
        self._closing = asyncio.Event()

    async def apply(self, target: ArchiveConfig, *, check: bool = True) -> str | None:
        """Switch to `target`; returns None, or why the target was refused.

        With `check`, an enabled target must pass a write check first (bucket
        exists, access allowed, conditional writes probed); when it does not, the
        current archiver stays.
        """
        reply: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        await self._requests.put(_Request(target, check, reply))
        return await reply

    async def run(self) -> None:
        """The supervisor: applies requests one at a time until `close()`."""
        try:
            while True:
                request = await self._requests.get()
                if request.target is None:
                    await self._stop_runner()  # close() returns once the archiver stopped
                    request.reply.set_result(None)
                    return
                try:
                    error = await self._switch(request.target, check=request.check)
                except Exception as exc:  # a bug must not kill the supervisor
                    log.exception("archive switch failed")
                    error = f"{type(exc).__name__}: {exc}"
                if not request.reply.done():
                    request.reply.set_result(error)
        finally:
            await self._stop_runner()

    async def close(self) -> None:
        """Flush and stop the archiver, then end the supervisor. A switch whose check
        still waits on its target (S3 hangs) is abandoned: it would hold up the stop."""
        self._closing.set()
        reply: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        await self._requests.put(_Request(None, False, reply))
        await reply

    def health(self) -> str | None:
        """None when archival is off or working; else why it is not."""
        if not self.target.enabled:
            return None
        if self.runner is None:
            return self.last_error or "archival is on but no archiver runs"
        if self._task is not None and self._task.done():
            return "archiver task ended unexpectedly"
        stalled = self.archiver.sink.stalled() if self.archiver is not None else None
        if stalled is not None:  # a call in flight past its timeout: hung, not slow
            return stalled
        if not self.runner.ready.is_set():
            return self.runner.failure or "archiver not ready yet"
        return None

    @property
    def conditional_writes(self) -> ConditionalWrites | None:
        """How the running archiver makes its creates conditional; None until settled."""
        return self.archiver.write_mode if self.archiver is not None else None

    def worker_ended(self) -> bool:
        """True when the archiver's task ended while it should be running (liveness)."""
        return self._task is not None and self._task.done()

    async def _switch(self, target: ArchiveConfig, *, check: bool) -> str | None:
        if target == self.target and (self.runner is not None or not target.enabled):
            return None
        archiver = None
        if target.enabled:
            try:
                archiver = self._archiver(target, await open_sink(target, self.s3_clients))
                if check:  # the bucket, and how conditional writes are made there
                    await self._unless_closing(archiver.check_target(), target)
            except SinkError as exc:
                self.last_error = str(exc)
                if not check:  # the environment's own target: on, failing, visible in /readyz
                    await self._stop_runner()
                    self.target = target
                log.error(
                    "archive configuration refused, %s: %s",
                    "keeping the current one" if self.runner is not None else "archival is off",
                    exc,
                    extra={"worker": "archiver", "bucket": target.label},
                )
                return str(exc)
        await self._stop_runner()
        self.metrics.archive_enabled.clear()
        self.target = target
        self.last_error = None
        if archiver is not None:
            with contextlib.suppress(RedisError):  # Redis away: reported at the next switch
                await self._report_gaps()
            await self._start_runner(archiver)
            self.metrics.archive_enabled.labels(target.label).set(1)
            log.info(
                "archival on: %s prefix %s (flush at %d events, %d bytes or %.0f s)",
                archiver.sink.description,
                target.prefix,
                target.flush.max_events,
                target.flush.max_bytes,
                target.flush.max_age_seconds,
                extra={"worker": "archiver", "bucket": target.label},
            )
        else:
            self.metrics.archive_enabled.labels("").set(0)
            clear_conditional_writes(self.metrics)
            log.info("archival off", extra={"worker": "archiver"})
        return None

    async def _unless_closing(
        self, check: Coroutine[Any, Any, None], target: ArchiveConfig
    ) -> None:
        """Run a target's check, unless `close()` comes first (then raise `SinkError`)."""
        checking = asyncio.ensure_future(check)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({checking, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
        if not checking.done():
            checking.cancel()
            await asyncio.gather(checking, return_exceptions=True)
            raise SinkError(f"{target.label}: check abandoned, the sidecar is stopping", "stopping")
        checking.result()

    async def _report_gaps(self) -> None:
        """Say what was trimmed unarchived while archival was off (sidecar.retention)."""
        gaps: Any = await self.redis.hgetall(f"{self.settings.redis_stream_key}:archive-gaps")
        for first, value in sorted(gaps.items()):
            until, _, count = value.decode().partition(" ")
            log.warning(
                "archive gap: %s entries from %s before %s were trimmed while archival was off;"
                " they are in the projection but not in the archive",
                count,
                first.decode(),
                until,
            )

    def _archiver(self, target: ArchiveConfig, sink: ArchiveSink) -> S3TaskHistoryArchiver:
        settings = self.settings
        return S3TaskHistoryArchiver(
            sink,
            self.metrics,
            stream=settings.redis_stream_key,
            prefix=target.prefix,
            policy=target.flush,
            group=settings.redis_archiver_consumer_group,
            consumer=settings.redis_consumer_name,
            conditional_writes=target.conditional_writes,
            watermark=ArchiveWatermark(
                self.redis,
                self.metrics,
                stream=settings.redis_stream_key,
                group=settings.redis_archiver_consumer_group,
                consumer=settings.redis_consumer_name,
            ),
        )

    async def _start_runner(self, archiver: S3TaskHistoryArchiver) -> None:
        settings = self.settings
        group = settings.redis_archiver_consumer_group
        self.archiver = archiver
        self.runner = ConsumerGroupRunner(
            self.redis,
            stream=settings.redis_stream_key,
            group=group,
            consumer=settings.redis_consumer_name,
            handler=self.archiver,
            metrics=self.metrics,
            options=replace(runner_options(settings), dead_letter=False),
            worker="archiver",
        )
        # The group exists before this returns, so stream trimming waits for the archiver.
        with contextlib.suppress(RedisError):  # Redis away: the runner creates it later
            await self.runner.ensure_group()
        self._task = asyncio.create_task(self.runner.run(), name="archiver")

    async def _stop_runner(self) -> None:
        if self.runner is None or self._task is None:
            return
        await self.runner.stop()
        done, _ = await asyncio.wait({self._task}, timeout=self.stop_give_up_seconds)
        if not done:
            # Its uploads hang (a PUT may take 15 s, other calls 2 x 10 s): cancel them.
            # Nothing it holds is acknowledged, so it all stays pending, written later.
            log.warning(
                "archiver could not finish writing within %.0f s (%s); giving up:"
                " %d buffered entries stay pending and are written after the restart",
                self.stop_give_up_seconds,
                self.health() or "uploads in flight",
                self.archiver.buffered if self.archiver is not None else 0,
                extra={"worker": "archiver", "bucket": self.target.label},
            )
            await eventloop.cancel_and_wait(self._task)
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.runner = self.archiver = self._task = None


def runner_options(settings: Settings) -> RunnerOptions:
    return RunnerOptions(
        batch_size=settings.redis_batch_size,
        block_ms=settings.redis_block_ms,
        claim_idle_ms=settings.redis_claim_idle_ms,
        dead_letter_maxlen=settings.dead_letter_maxlen,
        limits=settings.event_limits,
        redis_url=settings.redis_url,
    )
