"""The changes feed, tailed once per process and fanned out to every SSE client.

The projector appends each change that took effect to the capped stream
`task-tracking:changes` (sidecar.keys). One `XREAD BLOCK` loop per API process reads it
from the last ID it saw (never `$`, which would skip what arrives between two reads) and
appends each entry, its SSE frame encoded once, to one log shared by every subscriber,
then wakes them all once per read. Each subscriber keeps only its position in that log,
so a change costs the same whatever the number of clients until a client takes its
share; a subscriber more than `QUEUE_SIZE` changes behind is marked overflowed, sent a
`reset` and dropped by its handler, so a slow client never slows the others or the
projector.

Resuming after `Last-Event-ID` is exact: the handler subscribes first, then reads the
stream after that ID with XRANGE, then takes from the log skipping IDs it already sent.
Everything added after the subscription is in the log, everything before is in the
stream. The ID is too old when the stream has trimmed an entry after it (XINFO STREAM's
`max-deleted-entry-id`), or ahead of the stream's last ID (the data was reset): `reset`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.exceptions import RedisError, ResponseError

from sidecar import eventloop
from sidecar.keys import CHANGES_KEY, execution_key
from sidecar.read.projection import ReadClient, decode_execution

log = logging.getLogger(__name__)

EXECUTION_KEY_PREFIX = execution_key("")

BLOCK_MS = 5000
READ_COUNT = 1000
# Entries a client may have waiting before it counts as slow (a second of a busy feed).
QUEUE_SIZE = 2000
RETRY_SECONDS = 1.0
STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


def stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq)


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the feed: its ID (the SSE id), project and the execution's state as
    JSON (the `data:` of its SSE event); `position` is the ID as numbers, `frame` the SSE
    event itself."""

    id: str
    project: str
    state: str
    position: tuple[int, int] = field(init=False)
    frame: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "position", stream_id(self.id))
        frame = f"id: {self.id}\nevent: execution\ndata: {self.state}\n\n".encode()
        object.__setattr__(self, "frame", frame)


async def read_change(redis: ReadClient, entry_id: Any, fields: dict[Any, Any]) -> Change:
    """A feed entry: the written execution's key and its item as the projector sent it
    (`[occurredAtMs, rank, eventId, earlier, field, value, …]`, sidecar.projector), or
    `reload` and the key for a large one (read now: that state, or a newer one). Entries of
    the feed's first layout held the hash's fields themselves."""
    row: dict[Any, Any] = {_text(k): v for k, v in fields.items()}
    if "reload" in row:
        row = await redis.hgetall(_text(row["reload"]))
    elif len(row) == 1 and next(iter(row)).startswith(EXECUTION_KEY_PREFIX):
        item = orjson.loads(next(iter(row.values())))
        row = dict(zip(item[4::2], item[5::2], strict=True))
    execution = decode_execution({_text(k): _text(v) for k, v in row.items()})
    project = execution.get("project")
    return Change(_text(entry_id), project if isinstance(project, str) else "", _dumps(execution))


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


@dataclass(eq=False)
class Subscriber:
    """One SSE client: the project it asked for (None: all) and its position in the
    feed's log (the sequence number of the last change it took)."""

    project: str | None
    taken: int
    overflowed: bool = False


class TooOld(Exception):
    """The position cannot be resumed from: the client must fetch the snapshot again."""


class ChangesFeed:
    """The process's one reader of the changes stream and its subscribers."""

    def __init__(self, redis: ReadClient, *, block_ms: int = BLOCK_MS) -> None:
        self.redis = redis
        self.block_ms = block_ms
        self.subscribers: set[Subscriber] = set()
        self.last_id: str | None = None
        self.started = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # The newest changes: _log[i] has the sequence number _base + i; _sequence is the
        # last one appended. The log keeps at least QUEUE_SIZE of them.
        self._log: list[Change] = []
        self._base = 1
        self._sequence = 0
        self._appended = asyncio.Event()  # set, and replaced, after each append

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="changes-feed")

    async def stop(self) -> None:
        if self._task is not None:
            await eventloop.cancel_and_wait(self._task)

    @contextlib.contextmanager
    def subscribe(self, project: str | None) -> Any:
        subscriber = Subscriber(project, self._sequence)
        self.subscribers.add(subscriber)
        try:
            yield subscriber
        finally:
            self.subscribers.discard(subscriber)

    async def wait(self, subscriber: Subscriber, seconds: float) -> bool:
        """Until there is something for `subscriber` to take (a change, or its reset),
        at most `seconds`; False when nothing came."""
        if subscriber.taken < self._sequence or subscriber.overflowed:
            return True
        try:
            async with asyncio.timeout(seconds):
                await self._appended.wait()
        except TimeoutError:
            return False
        return True

    def take(self, subscriber: Subscriber) -> list[Change]:
        """The changes `subscriber` has not taken, of its project; none, and the subscriber
        marked overflowed, when it fell more than QUEUE_SIZE behind."""
        if self._sequence - subscriber.taken > QUEUE_SIZE:
            subscriber.overflowed = True
        if subscriber.overflowed:
            return []
        fresh = self._log[subscriber.taken + 1 - self._base :]
        subscriber.taken = self._sequence
        if subscriber.project is None:
            return fresh
        return [change for change in fresh if change.project == subscriber.project]

    def _append(self, changes: list[Change]) -> None:
        self._log += changes
        self._sequence += len(changes)
        if len(self._log) > 2 * QUEUE_SIZE:  # drop the oldest, now and then
            dropped = len(self._log) - QUEUE_SIZE
            del self._log[:dropped]
            self._base += dropped
        self._wake_all()

    def _wake_all(self) -> None:
        self._appended.set()
        self._appended = asyncio.Event()

    async def _info(self) -> dict[str, Any] | None:
        try:
            info: dict[Any, Any] = await self.redis.xinfo_stream(CHANGES_KEY)
        except ResponseError:  # no such key: nothing was ever changed (or it was flushed)
            return None
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in info.items()}

    async def position(self) -> str:
        """The stream's last ID now ("0-0" before the first change)."""
        info = await self._info()
        if info is None:
            return "0-0"
        value = info["last-generated-id"]
        return value.decode() if isinstance(value, bytes) else str(value)

    async def check_resumable(self, after: str) -> None:
        """Raise `TooOld` unless every change after `after` is still in the stream: the
        stream trimmed nothing, or its first entry is not after `after` (the entry just
        before the first one cannot be told from an older one: that is reset too)."""
        if not STREAM_ID.match(after):
            raise TooOld(f"not a change id: {after!r}")
        info = await self._info()
        if info is None:
            if after != "0-0":
                raise TooOld("the feed is empty (its data was reset)")
            return
        position = stream_id(after)
        if position > stream_id(_text(info["last-generated-id"])):
            raise TooOld("the position is ahead of the feed (its data was reset)")
        if stream_id(_text(info.get("max-deleted-entry-id", "0-0"))) > position:
            raise TooOld("changes after the position were deleted from the feed")
        if int(info.get("entries-added", 0)) > int(info["length"]):  # something was trimmed
            first = info.get("first-entry")
            oldest = _text(first[0]) if first else _text(info["last-generated-id"])
            if stream_id(oldest) > position:
                raise TooOld("changes after the position were trimmed from the feed")

    async def since(self, after: str) -> AsyncIterator[Change]:
        """The changes after `after` still in the stream, in order."""
        start = f"({after}"
        while True:
            rows: Any = await self.redis.xrange(CHANGES_KEY, start, "+", count=READ_COUNT)
            for entry_id, fields in rows:
                change = await read_change(self.redis, entry_id, fields)
                yield change
                start = f"({change.id}"
            if len(rows) < READ_COUNT:
                return

    async def _run(self) -> None:
        while True:
            try:
                if self.last_id is None:
                    self.last_id = await self.position()
                    self.started.set()
                reply: Any = await self.redis.xread(
                    {CHANGES_KEY: self.last_id}, count=READ_COUNT, block=self.block_ms
                )
                if not reply:
                    await self._check_reset()
                    continue
                for _, rows in _streams(reply):
                    changes = [await read_change(self.redis, *row) for row in rows]
                    if changes:
                        self.last_id = changes[-1].id
                        self._append(changes)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("changes feed: %s; retrying in %ss", exc, RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
                with contextlib.suppress(RedisError, OSError):
                    if self.last_id is not None:
                        try:
                            await self.check_resumable(self.last_id)
                        except TooOld:
                            self._reset_all()

    async def _check_reset(self) -> None:
        """Idle: if the stream went back behind our position (flushed, restored), every
        client is reset and the reader starts again from the stream's end."""
        assert self.last_id is not None
        position = await self.position()
        if stream_id(position) < stream_id(self.last_id):
            log.warning("changes feed went back from %s to %s: resetting", self.last_id, position)
            self._reset_all()
            self.last_id = position

    def _reset_all(self) -> None:
        for subscriber in self.subscribers:
            subscriber.overflowed = True
        self._wake_all()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _streams(reply: Any) -> list[tuple[Any, list[tuple[Any, dict[Any, Any]]]]]:
    """XREAD's reply as (key, rows) pairs, in RESP2 (a list) or RESP3 (a dict) shape."""
    if isinstance(reply, dict):
        return [(key, rows[0] if rows and isinstance(rows[0], list) else rows)
                for key, rows in reply.items()]  # fmt: skip
    return [(key, rows) for key, rows in reply]
