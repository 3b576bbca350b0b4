"""The projector's script calls in flight: how they overlap, as one rule.

Each call is a task that first waits for the earlier calls holding any of its
executions, so the events of one execution are applied in stream order, then for one of
`limit` slots (each call out holds a pooled connection). A call is submitted only once
every call before it is out (`room()`), so a flush returns with its calls out and none
queued, and a backlog cannot pile calls up in memory. After a lost call, no call is sent
until every call out is settled. A
call Redis refuses is applied again one event at a time inside its task, handing back
the events Redis refuses, so that one event cannot block the group. So a finished task is
its call's whole outcome (`Outcome`): applied, refused, or not sent because the
connection was lost; settling pops the finished tasks and never waits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from redis.exceptions import NoPermissionError, OutOfMemoryError, ReadOnlyError, ResponseError

from sidecar.events import InvalidEntry, ValidEvent

log = logging.getLogger(__name__)

# Errors that say the server takes no writes now (a read-only replica after a failover,
# out of memory, ACL, a failing disk…), not that something in the call is wrong: retried
# like a lost connection, never blamed on an event.
SERVER_STATE_ERRORS = (ReadOnlyError, OutOfMemoryError, NoPermissionError)
SERVER_STATE_CODES = ("MISCONF", "BUSY", "LOADING", "MASTERDOWN", "NOREPLICAS", "CLUSTERDOWN")


def refused(error: BaseException) -> bool:
    """Did Redis refuse the call for something in it (a key of another type, say)?"""
    return (
        isinstance(error, ResponseError)
        and not isinstance(error, SERVER_STATE_ERRORS)
        and not str(error).startswith(SERVER_STATE_CODES)
    )


@dataclass
class Outcome:
    """What a finished call came to."""

    done: list[ValidEvent] = field(default_factory=list)  # applied or stale: acknowledge
    applied: int = 0  # of `done`, how many took effect
    rejected: list[InvalidEntry] = field(default_factory=list)  # refused: dead-letter
    unsent: list[ValidEvent] = field(default_factory=list)  # not applied: send again
    # a lost connection (say) that left `unsent`, else the refusal behind `rejected`
    error: BaseException | None = None


@dataclass
class _Call:
    events: list[ValidEvent]
    execution_ids: Sequence[str]
    task: asyncio.Task[Outcome]
    out: asyncio.Future[None]  # done once the call holds a slot (or finished without)


class CallsInFlight:
    """Script calls submitted and not yet settled, in the order they were submitted."""

    def __init__(self, apply_one: Callable[[ValidEvent], Awaitable[int]], *, limit: int) -> None:
        self._apply_one = apply_one  # one event's calls, for a refused call's fallback
        self._slots = asyncio.Semaphore(limit)
        self._calls: list[_Call] = []
        self._holding: dict[str, _Call] = {}  # execution -> the last unsettled call holding it
        # A call's lost connection: the calls that start after it are not sent, until
        # every call out is settled (their events go back to the buffer with its own). So
        # a call that waited for a lost one is not sent either: the events of an execution
        # are sent again together, in stream order.
        self.lost: BaseException | None = None

    def __len__(self) -> int:
        return len(self._calls)

    async def room(self) -> None:
        """Until every call submitted is out (holds a slot) or finished."""
        waiting = [call.out for call in self._calls if not call.out.done()]
        if waiting:
            await asyncio.wait(waiting)

    def submit(
        self,
        events: list[ValidEvent],
        execution_ids: Sequence[str],
        send: Callable[[], Awaitable[int]],
    ) -> None:
        """Start a call (after `room()`): `send()` applies `events` (those of
        `execution_ids`), returning how many took effect."""
        holders = {held.task for x in execution_ids if (held := self._holding.get(x)) is not None}
        out = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(self._run(events, holders, send, out))
        call = _Call(events, execution_ids, task, out)
        self._calls.append(call)
        for execution_id in execution_ids:
            self._holding[execution_id] = call

    async def wait(self) -> None:
        """Until every call submitted has finished."""
        if self._calls:
            await asyncio.wait([call.task for call in self._calls])

    def settle(self) -> list[Outcome]:
        """Pop the finished calls' outcomes, in the order the calls were submitted."""
        finished = [call for call in self._calls if call.task.done()]
        if not finished:
            return []
        self._calls = [call for call in self._calls if not call.task.done()]
        for call in finished:
            for execution_id in call.execution_ids:
                if self._holding.get(execution_id) is call:
                    del self._holding[execution_id]
        if not self._calls:
            self.lost = None
        return [_outcome(call) for call in finished]

    async def _run(
        self,
        events: list[ValidEvent],
        holders: set[asyncio.Task[Outcome]],
        send: Callable[[], Awaitable[int]],
        out: asyncio.Future[None],
    ) -> Outcome:
        try:
            if holders:
                await asyncio.wait(holders)
            async with self._slots:
                out.set_result(None)
                return await self._send(events, send)
        finally:
            if not out.done():
                out.set_result(None)

    async def _send(self, events: list[ValidEvent], send: Callable[[], Awaitable[int]]) -> Outcome:
        if self.lost is not None:  # maybe a call this one waited for: keep the order
            return Outcome(unsent=events, error=self.lost)
        try:
            return Outcome(done=events, applied=await send())
        except Exception as exc:
            if not refused(exc):
                self.lost = exc
                return Outcome(unsent=events, error=exc)
            log.warning("batch refused by Redis (%s); applying its events one by one", exc)
            return await self._one_by_one(events)

    async def _one_by_one(self, events: list[ValidEvent]) -> Outcome:
        outcome = Outcome()
        for n, event in enumerate(events):
            try:
                applied = await self._apply_one(event)
            except Exception as exc:
                if not refused(exc):  # a lost connection, say: the rest is sent again
                    self.lost = exc
                    outcome.unsent, outcome.error = events[n:], exc
                    break
                outcome.error = outcome.error or exc
                reason = f"Redis refused the projection: {exc}"
                outcome.rejected.append(InvalidEntry(event.entry_id, event.raw, reason))
            else:
                outcome.done.append(event)
                outcome.applied += applied
        return outcome


def _outcome(call: _Call) -> Outcome:
    if call.task.cancelled():  # only when the loop shuts down
        return Outcome(unsent=call.events, error=asyncio.CancelledError())
    return call.task.result()
