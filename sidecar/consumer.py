"""The consumer-group runner every worker shares.

It owns everything about a Redis consumer group that is not the worker's
effect: creating the group, re-reading the consumer's own pending entries on
start, blocking reads in batches (sidecar.bounded_read), claiming the pending
entries of consumers that died (sidecar.claims), dead-lettering invalid entries
(sidecar.dead_letter), acknowledging only what the worker reports durable,
reconnecting with capped backoff, and draining on stop.

A worker is a `BatchHandler`: `add` buffers decoded events in memory (it cannot
fail), `flush` makes some or all of them durable and returns their entry IDs
with the events it gave up on.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import (
    BusyLoadingError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.batches import Batch, BatchDecoder
from sidecar.bounded_read import READ_BUDGET_BYTES, BoundedReader, ReplyOverBudget, StreamEntry
from sidecar.claims import Claimer
from sidecar.connections import redis_hint
from sidecar.dead_letter import DeadLetterer
from sidecar.errors import WorkerError
from sidecar.events import DEFAULT_LIMITS, EventLimits, InvalidEntry, ValidEvent
from sidecar.logs import ContextLogger
from sidecar.metrics import Metrics

log = logging.getLogger(__name__)

# Errors after which the connection is retried; anything else is a bug and is
# retried too, but logged with its traceback.
TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)


# Other error replies that are the server's state: how each starts, what it means.
STATE_REPLIES = (
    ("MISCONF", "it cannot save to disk: check its disk"),
    ("BUSY ", "busy running a script"),
    ("UNBLOCKED", "the stream was deleted while it was read: it is created again"),
    ("DB index is out of range", "no such database: use a lower one in the URL (/0)"),
)


def server_state(exc: Exception) -> str | None:
    """What a refusal that is the server's state, not the data's, means and what to do,
    or None: a line instead of a traceback (the batch is retried as after a lost
    connection)."""
    text = str(exc)
    if isinstance(exc, OutOfMemoryError):
        return "out of memory (maxmemory): free memory, or raise maxmemory"
    if isinstance(exc, ReadOnlyError):
        return "a read-only replica: point TASK_TRACKING_REDIS_URL at the primary"
    if isinstance(exc, BusyLoadingError):
        return "loading its data set"
    if isinstance(exc, NoPermissionError):
        return "the ACL user lacks a permission: see README, 'Redis Cluster, TLS and ACLs'"
    if isinstance(exc, ResponseError):
        for start, meaning in STATE_REPLIES:
            if text.startswith(start):
                return meaning
    return None


@dataclass
class Flushed:
    """What a flush made durable, and what it gave up on."""

    durable_ids: list[str] = field(default_factory=list)  # for the runner to acknowledge
    rejected: list[InvalidEntry] = field(default_factory=list)  # to be dead-lettered


class BatchHandler(Protocol):
    """What a worker does with the valid events the runner hands it."""

    # May the runner read and decode the next batch while a flush waits? (The projector:
    # decoding overlaps the server's script. Not the archiver: its pending list must not
    # hold entries its buffer has not seen when a dead consumer's entries are claimed.)
    read_ahead: bool

    async def prepare(self) -> None:
        """Check the worker can do its job before reading (raise `WorkerError` if not)."""

    def add(self, events: Sequence[ValidEvent]) -> None:
        """Buffer events in memory."""

    async def flush(self, *, force: bool) -> Flushed:
        """Make buffered events durable; with force, all of them. Returns the entry IDs
        now durable and the events given up on, each once, from this flush or earlier ones.

        The runner calls it again after it raised (after a backoff), so it must be safe
        to retry: what it made durable before raising is handed back by a later flush."""

    def seconds_until_due(self) -> float | None:
        """When the next time-based flush is due, or None if nothing is buffered."""


class GroupStart(Protocol):
    """Optional, as a handler's `group_start`: where its group starts when the runner
    has to create it (the archiver: at its watermark, sidecar.watermark)."""

    async def start_id(self) -> str | None:
        """The ID to create the group at; None: the stream's start."""

    async def created(self, start_id: str | None) -> None:
        """The runner just created the group there (log it, count it)."""


@dataclass(frozen=True)
class RunnerOptions:
    batch_size: int = 500
    block_ms: int = 5000
    claim_idle_ms: int = 60_000
    # Invalid entries: to the dead-letter stream, and malformed optional fields counted
    # (projector); or just acknowledged (archiver, which would count them twice).
    dead_letter: bool = True
    dead_letter_maxlen: int = 100_000
    limits: EventLimits = DEFAULT_LIMITS
    read_budget_bytes: int = READ_BUDGET_BYTES
    backoff_initial: float = 0.1
    backoff_max: float = 10.0
    # Only its scheme is read: for the TLS hint of a first connection's error.
    redis_url: str = ""


class ConsumerGroupRunner:
    """Runs one consumer of one group on one stream, feeding a `BatchHandler`."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        *,
        stream: str,
        group: str,
        consumer: str,
        handler: BatchHandler,
        metrics: Metrics,
        options: RunnerOptions | None = None,
        worker: str | None = None,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.handler = handler
        self.metrics = metrics
        self.options = options = options or RunnerOptions()
        self.ready = asyncio.Event()
        self.failure: str | None = None  # last error while not ready, for /readyz
        self._stopping = asyncio.Event()
        self._to_ack: list[str] = []
        self._invalid: list[InvalidEntry] = []
        self._recovered = False
        self._over_budget = False  # a native read's reply was dropped (ReplyOverBudget)
        self._force_flush = False
        self._redis_lost = False
        # A connection closed by the server before any call went through is the usual
        # sign of a TLS server reached with redis://; after one, it is a restart.
        self._ever_ready = False
        # worker: "projector" or "archiver" (the log's "worker" key); consumer: this replica.
        context = {"worker": worker or group, "group": group, "consumer": consumer}
        self._log = ContextLogger(log, context)
        self._reader = BoundedReader(
            redis,
            stream=stream,
            group=group,
            consumer=consumer,
            batch_size=options.batch_size,
            max_event_bytes=options.limits.max_event_bytes,
            budget_bytes=options.read_budget_bytes,
        )
        self._decoder = BatchDecoder(
            options.limits, metrics, self._log, count_warnings=options.dead_letter
        )
        self._dead_letters = DeadLetterer(
            redis,
            metrics,
            self._log,
            stream=stream,
            group=group,
            dead_letter=options.dead_letter,
            maxlen=options.dead_letter_maxlen,
        )
        self._claimer = Claimer(
            self._reader,
            metrics,
            self._log,
            group=group,
            consumer=consumer,
            idle_ms=options.claim_idle_ms,
        )
        metrics.init_group(group, dead_letter=options.dead_letter)

    # ---- lifecycle -------------------------------------------------------

    async def run(self) -> None:
        """Consume until `stop()`; then flush, acknowledge and return."""
        try:
            await self._run()
        finally:
            await self._reader.aclose()

    async def _run(self) -> None:
        backoff = self.options.backoff_initial
        while True:
            try:
                await self.ensure_group()
                await self.handler.prepare()
                if not self._recovered:
                    if self._over_budget:  # in hand first: the rest pending is unread
                        await self._settle(force=True)
                        self._over_budget = False
                    await self._recover_own_pending()
                    self._recovered = True
                await self._settle()  # invalid entries and acknowledgements still owed
                self._mark_ready()
                backoff = self.options.backoff_initial
                await self._consume()
                await self._settle(force=True)
                if self._reader.interrupted:  # what the cut read may have been handed
                    await self._recover_own_pending()
                    await self._settle(force=True)
                return
            except asyncio.CancelledError:
                raise
            except ReplyOverBudget as exc:
                # What the dropped reply delivered is pending: once what is in hand is
                # settled, the pending list is exactly that, re-read in bounded reads.
                self._log.info("%s; re-reading its entries in bounded reads", exc)
                self._over_budget = True
                self._recovered = False
            except Exception as exc:
                self._mark_not_ready(exc)
                # A reply lost with the connection may have delivered entries we never
                # saw: re-read the whole pending list on the way back (the handler
                # ignores what it already holds; the archiver finds what it wrote).
                self._recovered = False
                delay = backoff * (0.5 + random.random() / 2)
                backoff = min(backoff * 2, self.options.backoff_max)
                if await self._wait_stopping(delay):
                    # Stopping while the failure lasts: whatever is unacknowledged stays
                    # pending and is re-read by this consumer (or claimed) later.
                    if self._to_ack or self._invalid:
                        self._log.warning(
                            "stopping with %d entries unacknowledged; they stay pending",
                            len(self._to_ack) + len(self._invalid),
                        )
                    return

    async def _consume(self) -> None:
        """Read, hand over, flush, acknowledge, until stopped; with the handler's
        `read_ahead`, the next batch is read and decoded while its flush waits."""
        ahead: asyncio.Future[Batch] | None = None
        try:
            while not self._stopping.is_set():
                await self._claimer.claim_due(self._settle_in_hand, self._take_over)
                batch = await ahead if ahead is not None else await self._read_batch()
                ahead = None
                await self._accept(batch, force=False)
                if batch.size and self.handler.read_ahead:
                    ahead = asyncio.ensure_future(self._read_batch())
                    await asyncio.sleep(0)  # let its read go out before the flush's commands
                await self._ack(await self._flush(force=False))
                await self._dispose_invalid()
            if ahead is not None:  # the batch in hand is finished, not dropped
                batch, ahead = await ahead, None
                await self._accept(batch, force=False)
        finally:
            if ahead is not None:  # failing: its entries stay pending and are re-read
                await asyncio.gather(ahead, return_exceptions=True)

    async def _read_batch(self) -> Batch:
        """Read new entries (waiting for some, up to the block time) and decode them."""
        block = self.options.block_ms
        due = self.handler.seconds_until_due()
        if due is not None:  # wait no longer than the handler's next flush
            block = max(1, min(block, int(due * 1000)))
        entries = await self._reader.read_new(block, self._stopping)
        return await self._decoder.decode_in_slices(entries)

    async def stop(self) -> None:
        """Ask the loop to stop reading; `run()` returns once the batch in hand is settled.
        A read blocked waiting for entries is cut short: nothing is read after this."""
        self._stopping.set()
        await self._reader.interrupt()

    async def _wait_stopping(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def _mark_ready(self) -> None:
        if self.failure is not None:
            self._log.info("recovered from: %s", self.failure)
        if self._redis_lost:
            self.metrics.redis_reconnects.labels(self.group).inc()
            self._redis_lost = False
        self.failure = None
        self._ever_ready = True
        self.ready.set()
        self.metrics.redis_connected.labels(self.group).set(1)

    def _mark_not_ready(self, exc: Exception) -> None:
        failure = str(exc) if isinstance(exc, WorkerError) else f"{type(exc).__name__}: {exc}"
        if failure != self.failure:  # log a failure once, not at every retry
            if isinstance(exc, ResponseError) and "NOGROUP" in failure:
                # The group was lost; ensure_group logs its re-creation as a warning.
                self._log.info("consumer group gone (%s); creating it again", failure)
            elif isinstance(exc, WorkerError):
                self._log.error("%s; retrying with backoff", failure)
            elif isinstance(exc, TRANSIENT):
                hint = "" if self._ever_ready else redis_hint(exc, self.options.redis_url)
                self._log.warning("Redis unavailable, retrying with backoff: %s%s", failure, hint)
            elif (state := server_state(exc)) is not None:
                self._log.warning("Redis refused: %s (%s); retrying with backoff", state, exc)
            else:
                self._log.exception("worker error, retrying with backoff")
        self.failure = failure
        self.ready.clear()
        if isinstance(exc, TRANSIENT) and not isinstance(exc, WorkerError):
            self._redis_lost = True
            self.metrics.redis_connected.labels(self.group).set(0)

    # ---- reading ---------------------------------------------------------

    async def ensure_group(self) -> None:
        """Create the stream and the group unless they exist: from the stream's start, or
        where the handler's `group_start` says (also when the group was lost mid-run)."""
        hook: GroupStart | None = getattr(self.handler, "group_start", None)
        start = await hook.start_id() if hook is not None else None
        try:
            await self.redis.xgroup_create(self.stream, self.group, id=start or "0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return
        if hook is not None:
            await hook.created(start)
        else:
            self._log.info("created consumer group %s on %s", self.group, self.stream)

    async def _recover_own_pending(self) -> None:
        """Re-read this consumer's whole pending list and settle it as one batch (on
        start, and after any failure).

        One batch, so a worker that groups entries (the archiver) forms exactly
        the groups it formed before a crash; see README "Exactly once".
        """
        entries = await self._reader.read_own_pending()
        if entries:
            self._log.info("re-reading %d pending entries of this consumer", len(entries))
            await self._accept(self._decoder.decode(entries), force=True)

    # ---- settling --------------------------------------------------------

    async def _accept(self, batch: Batch, *, force: bool) -> None:
        """Hand a decoded batch to the handler and settle what is in hand."""
        if not batch.size:
            return
        self.metrics.read.labels(self.group).inc(batch.size)
        self.metrics.batch_size.labels(self.group).observe(batch.size)
        self.handler.add(batch.valid)
        self._invalid.extend(batch.invalid)
        self._force_flush = self._force_flush or force
        await self._settle()

    async def _take_over(self, entries: list[StreamEntry]) -> None:
        """Settle a dead consumer's entries, claimed, as one batch."""
        await self._accept(self._decoder.decode(entries), force=True)

    async def _settle_in_hand(self) -> None:
        await self._settle(force=True)

    async def _settle(self, *, force: bool = False) -> None:
        """Finish what is in hand: invalid entries, a forced flush, unsent acknowledgements.

        Safe to call again after it raised; a forced flush stays owed until it succeeds.
        """
        if force or self._force_flush:
            self._to_ack.extend(await self._flush(force=True))
            self._force_flush = False
        await self._dispose_invalid()
        await self._ack([])

    async def _flush(self, *, force: bool) -> list[str]:
        """The handler's flush; what it gave up on joins the invalid entries."""
        flushed = await self.handler.flush(force=force)
        self._invalid.extend(flushed.rejected)
        return flushed.durable_ids

    async def _ack(self, ids: list[str]) -> None:
        self._to_ack.extend(ids)
        if self._to_ack:
            await self.redis.xack(self.stream, self.group, *self._to_ack)
            self._to_ack.clear()

    async def _dispose_invalid(self) -> None:
        if self._invalid:
            self._to_ack.extend(await self._dead_letters.settle(self._invalid))
            self._invalid.clear()
