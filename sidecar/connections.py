"""Redis connections: one client per process, standalone or cluster by the URL's scheme.

`redis+cluster://` and `rediss+cluster://` select redis-py's cluster client
(ElastiCache / Valkey cluster mode); `rediss://` is TLS.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE

RedisClient: TypeAlias = "Redis | RedisCluster"

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

try:  # redis-py 7.1+: `driver_info=None`; before: `lib_name=None` (deprecated since)
    import redis.driver_info  # noqa: F401

    NO_CLIENT_SETINFO: dict[str, Any] = {"driver_info": None}
except ImportError:  # pragma: no cover - older redis-py
    NO_CLIENT_SETINFO = {"lib_name": None, "lib_version": None}


class _HiredisPacking:
    """Packs commands with hiredis's C packer, as redis-py's synchronous connections do
    when hiredis is installed; its asyncio connections pack in Python, which cost about
    1 us per event on the projector's XACK and script call (bench/)."""

    # redis-py 8.2 left its constructor unannotated; 8.1 did not
    _serializer = HiredisRespSerializer()  # type: ignore[no-untyped-call,unused-ignore]

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = self._serializer.pack(*args)
        return packed


class HiredisPackedConnection(_HiredisPacking, Connection):
    pass


class HiredisPackedSSLConnection(_HiredisPacking, SSLConnection):
    pass


PACKED_CONNECTIONS = {"redis": HiredisPackedConnection, "rediss": HiredisPackedSSLConnection}


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0] in CLUSTER_SCHEMES


def connect(url: str, **options: Any) -> Redis | RedisCluster:
    """A client for `url`; raw bytes responses (events are stored and archived byte-exact).

    TLS options ride in the URL's query, which redis-py reads:
    `rediss://host:6379/0?ssl_ca_certs=/etc/redis-ca/ca.pem` (a private CA).
    """
    # No CLIENT SETINFO on connect: servers before Redis 7.2 do not know it, so an ACL
    # granting it would not load there; without it one ACL line (LEAST_PRIVILEGE_ACL) fits all.
    options.update(NO_CLIENT_SETINFO)
    options.setdefault("socket_connect_timeout", 5)
    # Longer than the longest blocking read (TASK_TRACKING_REDIS_BLOCK_MS, at most 5 s).
    options.setdefault("socket_timeout", 15)
    options.setdefault("health_check_interval", 30)
    scheme, rest = url.split("://", 1)
    if scheme in CLUSTER_SCHEMES:
        return RedisCluster.from_url(f"{CLUSTER_SCHEMES[scheme]}://{rest}", **options)
    if scheme in PACKED_CONNECTIONS and HIREDIS_AVAILABLE:
        options.setdefault("connection_class", PACKED_CONNECTIONS[scheme])
    return Redis.from_url(url, **options)


# The ACL rules (after `ACL SETUSER <user> on ><password>`) that are enough for everything
# the sidecar and its client commands do, and no more: stream keys `task-events:*`, the
# projection `task-tracking:*`. Commands a Lua script calls are checked too (HMGET, DEL,
# HSET, EXPIRE, ZADD, XADD by the compare-and-set; XINFO CONSUMERS, XGROUP DELCONSUMER by the idle
# consumer removal; HMGET, HSET, HDEL, HGETALL by the archive watermark). The read API
# and the read commands need ZCARD, ZSCORE, ZREVRANK, ZREVRANGEBYSCORE, XREAD, XRANGE,
# XREVRANGE, XINFO STREAM and HGETALL. MULTI/EXEC wrap
# dead-lettering on a standalone server; COMMAND and CLUSTER SLOTS/SHARDS are what the
# cluster client needs to find nodes and key slots.
LEAST_PRIVILEGE_ACL = (
    "resetkeys ~task-events:* ~task-tracking:* resetchannels -@all"
    " +ping +multi +exec +discard"
    " +xreadgroup +xread +xack +xadd +xclaim +xpending +xlen +xrange +xrevrange +xtrim"
    " +xinfo|stream +xinfo|groups +xinfo|consumers"
    " +xgroup|create +xgroup|delconsumer +xgroup|setid"
    " +evalsha +eval +script|load +hmget +hset +hdel +del +expire +hgetall"
    " +zadd +zrevrange +zremrangebyscore +zremrangebyrank +scan"
    " +zcard +zscore +zrevrank +zrevrangebyscore"
    " +command +cluster|slots +cluster|shards"
)


def redis_hint(exc: Exception, url: str | None = None) -> str:
    """A hint for the usual TLS mix-up, to append to an error of a first connection (a
    server that restarts closes connections the same way)."""
    import os

    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    url = url if url is not None else os.environ.get("TASK_TRACKING_REDIS_URL", "")
    if not isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return ""
    scheme = url.split("://", 1)[0]
    text = str(exc).lower()
    if scheme.startswith("rediss") and ("timeout" in text or "timed out" in text):
        return (
            " (the URL asks for TLS, rediss://: if the server does not speak TLS, use"
            " redis:// in TASK_TRACKING_REDIS_URL)"
        )
    # A TLS-only server closes or resets a plain connection at its first bytes.
    if scheme in ("redis", "redis+cluster") and ("closed by server" in text or "reset" in text):
        return " (if the server requires TLS, use rediss:// in TASK_TRACKING_REDIS_URL)"
    return ""
