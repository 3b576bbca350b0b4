"""`cancel_and_wait`: a task that loses a cancellation still ends."""

from __future__ import annotations

import asyncio

import pytest

from sidecar import eventloop


async def test_a_cancellation_the_task_lost_is_repeated_until_it_ends() -> None:
    """Python 3.11's `asyncio.wait_for` returns its result, as if never cancelled, when
    the cancellation arrives as its future completes: the changes reader went on with
    its next XREAD and the API's shutdown waited for ever."""
    lost = 0

    async def reader() -> None:
        nonlocal lost
        while True:
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost += 1  # as wait_for does

    task = asyncio.create_task(reader())
    await asyncio.sleep(0)
    await asyncio.wait_for(eventloop.cancel_and_wait(task), 5)
    assert task.cancelled() and lost == 1


async def test_the_error_a_task_ended_with_is_raised() -> None:
    async def failing() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="boom"):
        await eventloop.cancel_and_wait(task)
