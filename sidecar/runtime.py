"""The sidecar's lifecycle: what starts, in which order, and how it stops.

Start: Redis client, metrics, HTTP server, projector runner, archive switch
(with the environment's target), statistics sampler, then the custom-resource
watch. Stop, in reverse: the watch is asked to stop, the workers drain (finish
the batch in hand, flush, acknowledge), then the watch and the HTTP server end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from sidecar import allocator
from sidecar.archive_switch import ArchiveSwitch, S3Clients, runner_options
from sidecar.config import ArchiveConfig, RetentionConfig, Settings
from sidecar.connections import connect
from sidecar.consumer import ConsumerGroupRunner
from sidecar.health import LoopWatchdog
from sidecar.http import HealthServer
from sidecar.metrics import Metrics
from sidecar.projector import RedisTaskStatusProjector
from sidecar.resource import ArchiveState, ResourceSpec
from sidecar.retention import StreamRetention
from sidecar.stream_stats import StreamStatsSampler

if TYPE_CHECKING:
    from aiohttp import web  # the read API's, imported only when it is enabled

    from sidecar.kopf_embedding import ResourceWatch  # kopf, only when a resource is watched

log = logging.getLogger(__name__)

# /healthz fails while the event loop takes this long to run a callback.
LOOP_STALL_SECONDS = 10.0
# The whole stop, so that SIGTERM exits within its 10 s budget whatever does not answer
# (a frozen Redis, a hung S3): each step gets what is left of it.
STOP_BUDGET_SECONDS = 9.0
# The workers' drain, at most (the archiver gives up on S3 after 6 s by itself); a task
# that does not finish is abandoned and its entries stay pending, read again on restart.
STOP_TIMEOUT_SECONDS = 7.5
# Tasks with nothing in hand (statistics, retention): a call stuck on a frozen Redis is
# not waited out.
IDLE_TASK_JOIN_SECONDS = 0.3
# The archive switch ends as soon as its close() returned; if close() timed out (a switch
# in progress hung on S3), it is cancelled at once rather than given another 8 s.
SWITCH_JOIN_SECONDS = 0.5


class Sidecar:
    """One sidecar: projector, archiver, statistics, HTTP and the resource watch."""

    def __init__(self, settings: Settings, *, stats_interval: float = 5.0) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.redis = connect(settings.redis_url)
        self.s3_clients = S3Clients()
        self.projector = RedisTaskStatusProjector(
            self.redis,
            self.metrics,
            group=settings.redis_projector_consumer_group,
            finished_ttl_seconds=settings.retention.projection_ttl_seconds,
        )
        self.projector_runner = ConsumerGroupRunner(
            self.redis,
            stream=settings.redis_stream_key,
            group=settings.redis_projector_consumer_group,
            consumer=settings.redis_consumer_name,
            handler=self.projector,
            metrics=self.metrics,
            options=runner_options(settings),
            worker="projector",
        )
        self.archive = ArchiveSwitch(self.redis, settings, self.metrics, self.s3_clients)
        self.stats = StreamStatsSampler(
            self.redis,
            self.metrics,
            stream=settings.redis_stream_key,
            groups=[
                settings.redis_projector_consumer_group,
                settings.redis_archiver_consumer_group,
            ],
            interval=stats_interval,
            # task_tracking_consumer_group_active: the archiver group only while archival is on
            active=lambda group: (
                group != settings.redis_archiver_consumer_group or self.archive.target.enabled
            ),
            after_sample=self.readiness_problems,  # keeps task_tracking_ready current
            first_after=self.projector_runner.ready,
        )
        self.retention = StreamRetention(
            self.redis,
            self.metrics,
            stream=settings.redis_stream_key,
            archiver_group=settings.redis_archiver_consumer_group,
            archiving=lambda: self.archive.target.enabled,
            maxlen=settings.redis_stream_maxlen,
            archive_off_pin_seconds=settings.archive_off_pin_seconds,
            index_max_age_days=settings.retention.project_index_max_age_days,
            index_max_size=settings.retention.project_index_max_size,
        )
        self.watch: ResourceWatch | None = None  # when a resource is watched
        self.http_port: int | None = None
        self.api_port: int | None = None  # the read API's, when TASK_TRACKING_API_ENABLED
        self._api: web.AppRunner | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._http = HealthServer(self)
        self.loop_stall_seconds = LOOP_STALL_SECONDS
        self.watchdog = LoopWatchdog(self.metrics.event_loop_lag, warn_after=LOOP_STALL_SECONDS)

    # ---- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        self.http_port = await self._http.start(self.settings.http_host, self.settings.http_port)
        if self.settings.api_enabled:
            from sidecar.read.app import start_api

            self._api, self.api_port = await start_api(
                self.settings.redis_url,
                self.settings.http_host,
                self.settings.api_port,
                token=self.settings.api_token,
            )
        self._spawn("projector", self.projector_runner.run)
        self._spawn("archive-switch", self.archive.run)
        self._spawn("stream-stats", self.stats.run)
        self.watchdog.start(asyncio.get_running_loop())
        watch = self._resource_watch()
        spec = await watch.read_spec() if watch is not None else None
        # A present resource overrides the environment from the first write on. The
        # target is not write-checked here: a bad bucket shows in /readyz and the logs
        # while entries wait in the stream.
        target = (
            self.settings.archive
            if spec is None
            else spec.archive.inheriting(self.settings.archive)
        )
        await self.archive.apply(target, check=False)
        if spec is not None:
            self._apply_retention(spec.retention.inheriting(self.settings.retention))
        # Trimming starts once the archiver (if on) has its group: before, the stream
        # could be trimmed behind the projector only, under entries the archiver needs.
        self._spawn("retention", self.retention.run)
        if watch is not None:
            self.watch = watch
            self._spawn("watch", watch.run)
        allocator.release_free_memory()  # what the imports and the start left free
        log.info(
            "sidecar started: stream %s, consumer %s, http :%s",
            self.settings.redis_stream_key,
            self.settings.redis_consumer_name,
            self.http_port,
        )

    async def stop(self) -> None:
        """Drain the workers, then stop the watch, the statistics and the HTTP server, all
        within `STOP_BUDGET_SECONDS`."""
        log.info("stopping: draining workers")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_BUDGET_SECONDS

        def left(cap: float) -> float:
            return max(0.05, min(cap, deadline - loop.time()))

        self.stats.stop()  # nothing in hand: they end now, or are abandoned below
        self.retention.stop()
        await self.projector_runner.stop()
        await asyncio.gather(
            self._join("projector", left(STOP_TIMEOUT_SECONDS)),
            asyncio.wait_for(self.archive.close(), left(STOP_TIMEOUT_SECONDS)),
            return_exceptions=True,
        )
        await self._join("archive-switch", left(SWITCH_JOIN_SECONDS))
        if self.watch is not None:
            await self.watch.stop()
            await self._join("watch", left(STOP_TIMEOUT_SECONDS))
        await self._join("stream-stats", left(IDLE_TASK_JOIN_SECONDS))
        await self._join("retention", left(IDLE_TASK_JOIN_SECONDS))
        await asyncio.to_thread(self.watchdog.stop)
        if self._api is not None:  # SSE clients are cut: they resume from their last id
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._api.cleanup(), left(1.0))
        await self._http.close()
        for close in (self.s3_clients.close(), self.redis.aclose()):
            # a server that does not answer: exit anyway
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(close, left(1.0))
        log.info("stopped")

    def _resource_watch(self) -> ResourceWatch | None:
        """The watch of the configured TaskTracking, or None (no resource configured, or
        no Kubernetes credentials: the environment's configuration rules)."""
        if not self.settings.resource_name:
            return None
        from sidecar.kopf_embedding import ResourceWatch, watched_namespace  # kopf

        namespace, source = watched_namespace(self.settings.namespace)
        watch = ResourceWatch(
            self,
            resource_name=self.settings.resource_name,
            namespace=namespace,
            pod_name=self.settings.redis_consumer_name,
            on_generation=self.metrics.resource_generation.set,
            conditional_writes=lambda: (
                self.archive.conditional_writes if self.archive.target.enabled else None
            ),
        )
        if not watch.can_log_in():
            return None
        log.info(
            "watching TaskTracking %s/%s (namespace from %s)",
            namespace,
            self.settings.resource_name,
            source,
        )
        return watch

    def _spawn(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        async def guarded() -> None:
            try:
                await run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s task died", name, extra={"worker": name})
                raise

        self._tasks[name] = asyncio.create_task(guarded(), name=name)

    async def _join(self, name: str, seconds: float = STOP_TIMEOUT_SECONDS) -> None:
        task = self._tasks.get(name)
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), seconds)
        except TimeoutError:
            log.error("%s did not stop within %ss; abandoning it", name, seconds)
            task.cancel()
        except (asyncio.CancelledError, Exception):
            pass  # its failure was logged when it died

    # ---- health ----------------------------------------------------------

    def liveness_problems(self) -> list[str]:
        """Why the process is wedged: a worker task ended, or the event loop stalls."""
        problems = [f"{name} task ended" for name, task in self._tasks.items() if task.done()]
        if self.archive.worker_ended():
            problems.append("archiver task ended")
        stalled = self.watchdog.stalled_for()
        if stalled > self.loop_stall_seconds:
            problems.append(f"event loop stalled for {stalled:.1f}s")
        return problems

    def readiness_problems(self) -> list[str]:
        """Why the sidecar cannot do its work now; also sets `task_tracking_ready`."""
        problems = []
        if not self.stats.sampled:  # ready means the lag figures are there to scrape too
            problems.append("stream statistics not sampled yet")
        if not self.projector_runner.ready.is_set():
            reason = self.projector_runner.failure or "consumer group not ready yet"
            problems.append(f"projector: {reason}")
        archive = self.archive.health()
        if archive is not None:
            problems.append(f"archiver: {archive}")
        self.metrics.ready.set(0 if problems else 1)
        return problems

    # ---- reconfiguration (the custom-resource watch and tests) ------------

    async def apply_archive_target(self, target: ArchiveConfig | None) -> str | None:
        """Switch archival; None goes back to the environment. Returns why it was refused."""
        error = await self.archive.apply(self.settings.archive if target is None else target)
        allocator.release_free_memory()  # a switch loads (or drops) an S3 client and its data
        return error

    async def apply_archive_spec(self, spec: ResourceSpec | None) -> ArchiveState:
        """The custom resource's path into `apply_archive_target` (an `ArchiveControl`):
        the spec completed from the environment (`ArchiveConfig.inheriting`)."""
        environment = self.settings
        target = None if spec is None else spec.archive.inheriting(environment.archive)
        error = await self.apply_archive_target(target)
        if error is None:  # a refused spec changes nothing, retention included
            retention = RetentionConfig() if spec is None else spec.retention
            self._apply_retention(retention.inheriting(environment.retention))
        current = self.archive.target
        return ArchiveState(
            archiving=current.enabled,
            bucket=current.label if current.enabled else current.bucket,
            prefix=current.prefix,
            last_error=error,
            conditional_writes=self.archive.conditional_writes if current.enabled else None,
        )

    def _apply_retention(self, retention: RetentionConfig) -> None:
        self.projector.finished_ttl_seconds = retention.projection_ttl_seconds
        self.retention.index_max_age_days = retention.project_index_max_age_days
        self.retention.index_max_size = retention.project_index_max_size
