"""The doctor's server-version rule: Redis before 6.2 lacks what the sidecar sends (the
real servers' pass is in tests/integration/test_doctor.py)."""

from __future__ import annotations

import pytest

from sidecar.doctor.redis_checks import version_problem


@pytest.mark.parametrize(
    ("server", "version", "problem"),
    [
        ("redis", "7.0.15", None),
        ("redis", "6.2.0", None),
        ("redis", "255.255.255", None),  # an unstable build
        ("redis", "6.0.20", "Redis 6.0.20 is older than 6.2 (ZADD GT, XTRIM MINID)"),
        ("redis", "5.0.14", "Redis 5.0.14 is older than 6.2 (ZADD GT, XTRIM MINID)"),
        ("valkey", "9.1.2", None),
        ("redis", "", None),  # unknown: the stream and permission checks tell
    ],
)
def test_redis_before_6_2_is_named_with_what_it_lacks(
    server: str, version: str, problem: str | None
) -> None:
    assert version_problem(server, version) == problem
