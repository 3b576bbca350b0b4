"""`RedisTaskTrackingService`: the publisher for Python applications.

Writes events exactly as the Node.js publisher does: XADD of one field,
`event`, holding camelCase JSON.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis, RedisCluster

from sidecar.event_fields import Status, TaskEvent
from sidecar.events import DEFAULT_LIMITS, EventLimits, InvalidEntry, decode_values


def load_responsible_users(path: Path) -> list[str]:
    """`visibility.responsibleUsers` from a JSON file: a list, or {"responsibleUsers": [...]}."""
    data = orjson.loads(path.read_bytes())
    if isinstance(data, dict):
        data = data.get("responsibleUsers")
    if not isinstance(data, list) or not all(isinstance(user, str) for user in data):
        raise ValueError(
            f"{path}: expected a JSON list of user names or {{'responsibleUsers': [...]}}"
        )
    return data


def now_iso() -> str:
    """The current time as the Node.js publisher writes it: 2026-03-15T10:00:00.000Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RedisTaskTrackingService:
    """Publishes task lifecycle events to the stream."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        stream_key: str = "task-events:v1",
        *,
        responsible_users: list[str] | None = None,
        limits: EventLimits = DEFAULT_LIMITS,
    ) -> None:
        self.redis = redis
        self.stream_key = stream_key
        self.responsible_users = responsible_users
        self.limits = limits

    async def emit(self, event: TaskEvent) -> str:
        """Publish one event; returns its stream entry ID. Raises ValueError, before
        sending, for an event the sidecar would dead-letter or warn about."""
        raw = event.to_json()
        # the sidecar's own verdict, with the entry added now
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        decoded = decode_values(f"{now_ms}-0", [raw], self.limits)
        if isinstance(decoded, InvalidEntry):
            raise ValueError(decoded.reason)
        if decoded.warnings:
            raise ValueError(
                f"{decoded.warnings[0]}: not in the shape the contract gives it (README, "
                "'Data contracts'); the sidecar would keep it as sent and count a warning,"
                " so it is refused here, before it is sent"
            )
        entry_id = await self.redis.xadd(self.stream_key, {"event": raw})
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def emit_lines(self, lines: Iterable[str]) -> tuple[int, list[tuple[int, str]]]:
        """Publish one event per non-blank line (a camelCase JSON object; `eventId` and
        `occurredAt` filled in when absent), for scripts. Returns how many were published
        and, for each refused line, its number and why; a refused line does not stop the
        others."""
        from pydantic import ValidationError

        from sidecar.events import describe_event_error

        published, refused = 0, []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                data = orjson.loads(line)
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                data.setdefault("eventId", str(uuid.uuid4()))
                data.setdefault("occurredAt", now_iso())
                await self.emit(TaskEvent.model_validate(data))
            except ValidationError as exc:
                refused.append((number, describe_event_error(exc)))
            except orjson.JSONDecodeError as exc:
                refused.append((number, f"not JSON: {exc}"))
            except ValueError as exc:  # refused before sending, as the sidecar would
                refused.append((number, str(exc)))
            else:
                published += 1
        return published, refused

    def build(
        self,
        *,
        execution_id: str,
        task_name: str,
        project: str,
        status: Status,
        occurred_at: str | int | None = None,
        **extra: Any,
    ) -> TaskEvent:
        """An event with a fresh eventId, the current time and the configured visibility."""
        if self.responsible_users is not None and "visibility" not in extra:
            extra["visibility"] = {"responsibleUsers": self.responsible_users}
        return TaskEvent.model_validate(
            {
                "eventId": str(uuid.uuid4()),
                "executionId": execution_id,
                "taskName": task_name,
                "project": project,
                "status": status,
                "occurredAt": occurred_at if occurred_at is not None else now_iso(),
                **extra,
            }
        )

    @asynccontextmanager
    async def track(
        self,
        task_name: str,
        project: str,
        *,
        execution_id: str | None = None,
        **extra: Any,
    ) -> AsyncIterator[str]:
        """Emit `in_progress` on entry and `success` or `error` on exit; yields the executionId.

        The exception, if any, propagates after the `error` event is written.
        """
        execution_id = execution_id or str(uuid.uuid4())
        common = {"execution_id": execution_id, "task_name": task_name, "project": project}
        await self.emit(self.build(status="in_progress", **common, **extra))
        try:
            yield execution_id
        except BaseException:
            await self.emit(self.build(status="error", **common, **extra))
            raise
        await self.emit(self.build(status="success", **common, **extra))
