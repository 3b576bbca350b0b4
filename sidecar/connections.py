"""Redis connections: one client per process, standalone or cluster by the URL's scheme.

`redis+cluster://` and `rediss+cluster://` select redis-py's cluster client
(ElastiCache / Valkey cluster mode); `rediss://` is TLS.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from redis.asyncio import Redis, RedisCluster

RedisClient: TypeAlias = "Redis | RedisCluster"

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0] in CLUSTER_SCHEMES


def connect(url: str, **options: Any) -> Redis | RedisCluster:
    """A client for `url`; raw bytes responses (events are stored and archived byte-exact)."""
    options.setdefault("socket_connect_timeout", 5)
    # Longer than the longest blocking read (TASK_TRACKING_REDIS_BLOCK_MS, at most 20 s).
    options.setdefault("socket_timeout", 30)
    options.setdefault("health_check_interval", 30)
    scheme, rest = url.split("://", 1)
    if scheme in CLUSTER_SCHEMES:
        return RedisCluster.from_url(f"{CLUSTER_SCHEMES[scheme]}://{rest}", **options)
    return Redis.from_url(url, **options)
