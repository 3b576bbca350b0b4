"""Refusals that are the server's state are one line saying what to do, not a traceback."""

from __future__ import annotations

import pytest
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError

from sidecar.consumer import server_state


@pytest.mark.parametrize(
    ("exc", "meaning"),
    [
        (OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), "maxmemory"),
        (ReadOnlyError("You can't write against a read only replica."), "at the primary"),
        (ResponseError("UNBLOCKED the stream key no longer exists"), "it is created again"),
        (ResponseError("DB index is out of range"), "use a lower one in the URL (/0)"),
        (ResponseError("MISCONF Redis is configured to save RDB snapshots"), "save to disk"),
    ],
)
def test_the_servers_state_is_named_with_what_to_do(exc: Exception, meaning: str) -> None:
    assert meaning in (server_state(exc) or "")


def test_a_refusal_of_the_data_is_not_the_servers_state() -> None:
    assert server_state(ResponseError("WRONGTYPE Operation against a key")) is None
    assert server_state(ValueError("a bug")) is None
