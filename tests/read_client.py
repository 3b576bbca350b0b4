"""A small Server-Sent Events client for the read-path tests (aiohttp, real sockets)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson


@dataclass
class SseEvent:
    event: str
    id: str | None
    data: Any


class SseStream:
    """An open GET /api/v1/changes; `next()` returns the next event (comments skipped)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments: list[str] = []

    async def next(self, timeout: float = 20.0) -> SseEvent | None:
        """The next event, or None when the server closed the stream."""
        fields: dict[str, str] = {}
        while True:
            line = await asyncio.wait_for(self.response.content.readline(), timeout)
            if not line:
                return None
            text = line.decode().rstrip("\n")
            if text == "":
                if fields:
                    data = fields.get("data")
                    return SseEvent(
                        fields.get("event", "message"),
                        fields.get("id"),
                        orjson.loads(data) if data else None,
                    )
                continue
            if text.startswith(":"):
                self.comments.append(text[1:].strip())
                continue
            name, _, value = text.partition(":")
            fields[name] = value.removeprefix(" ")

    async def take(self, count: int, timeout: float = 20.0) -> list[SseEvent]:
        events = []
        while len(events) < count:
            event = await self.next(timeout)
            if event is None:
                raise AssertionError(f"stream closed after {len(events)} of {count} events")
            events.append(event)
        return events

    def close(self) -> None:
        self.response.close()


async def open_changes(
    session: aiohttp.ClientSession, base: str, *, last_id: str | None = None, **params: str
) -> SseStream:
    headers = {"Last-Event-ID": last_id} if last_id else {}
    response = await session.get(f"{base}/api/v1/changes", params=params, headers=headers)
    assert response.status == 200, await response.text()
    stream = SseStream(response)
    # the server says it is subscribed before sending anything else
    line = await asyncio.wait_for(response.content.readline(), 20)
    assert line.startswith(b":"), line
    return stream
