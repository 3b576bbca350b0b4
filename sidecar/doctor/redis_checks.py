"""The doctor's Redis checks: reachable (server kind and version), the stream and its
groups, and that the configured user may run every command the sidecar needs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoPermissionError, RedisError, ResponseError

from sidecar.config import Settings, redact
from sidecar.connections import connect, is_cluster_url, redis_hint
from sidecar.keys import execution_key, project_index_key

if TYPE_CHECKING:
    from sidecar.doctor import Report

ACL_FIX = "grant it (README 'Redis Cluster, TLS and ACLs' has the whole ACL line)"
# The projector's script updates indexes with ZADD GT, retention trims with XTRIM MINID.
MIN_REDIS_VERSION = (6, 2)
UPGRADE_FIX = "upgrade to Redis 6.2 or later (the tests run 7.0) or to Valkey"


def needed_commands(settings: Settings) -> list[tuple[str, ...]]:
    """Every command the sidecar and its client commands send, on keys of the configured
    names (what connections.LEAST_PRIVILEGE_ACL grants), with harmless arguments."""
    stream, dead = settings.redis_stream_key, settings.dead_letter_key
    marks = f"{stream}:archived"
    group, consumer = settings.redis_projector_consumer_group, settings.redis_consumer_name
    execution, index = execution_key("doctor-probe"), project_index_key("doctor/probe")
    commands: list[tuple[str, ...]] = [
        ("PING",),
        ("XREADGROUP", "GROUP", group, consumer, "COUNT", "1", "STREAMS", stream, ">"),
        ("XACK", stream, group, "0-1"),
        ("XADD", stream, "*", "event", "{}"),
        ("XADD", dead, "*", "event", "{}"),
        ("XCLAIM", stream, group, consumer, "0", "0-1"),
        ("XPENDING", stream, group),
        ("XLEN", stream),
        ("XRANGE", stream, "-", "+", "COUNT", "1"),
        ("XREVRANGE", stream, "+", "-", "COUNT", "1"),
        ("XTRIM", stream, "MAXLEN", "~", "1000000"),
        ("XINFO", "STREAM", stream),
        ("XINFO", "GROUPS", stream),
        ("XINFO", "CONSUMERS", stream, group),
        ("XGROUP", "CREATE", stream, group, "$", "MKSTREAM"),
        ("XGROUP", "DELCONSUMER", stream, group, consumer),
        ("XGROUP", "SETID", stream, group, "$"),
        ("EVALSHA", "0" * 40, "1", execution),
        ("EVAL", "return 0", "1", execution),
        ("SCRIPT", "LOAD", "return 0"),
        ("HMGET", execution, "status"),
        ("HSET", execution, "status", "x"),
        ("HDEL", marks, "x"),
        ("HGETALL", marks),
        ("DEL", execution),
        ("EXPIRE", execution, "60"),
        ("ZADD", index, "GT", "1", "x"),
        ("ZREVRANGE", index, "0", "0"),
        ("ZREMRANGEBYSCORE", index, "-inf", "0"),
        ("ZREMRANGEBYRANK", index, "0", "0"),
        ("SCAN", "0", "MATCH", project_index_key("*"), "COUNT", "1"),
        ("MULTI",),
        ("EXEC",),
        ("DISCARD",),
    ]
    if settings.redis_url.split("://", 1)[0].endswith("+cluster"):
        commands += [("COMMAND", "COUNT"), ("CLUSTER", "SLOTS"), ("CLUSTER", "SHARDS")]
    return commands


def command_name(command: tuple[str, ...]) -> str:
    subcommand = command[0] in ("XINFO", "XGROUP", "SCRIPT", "CLUSTER") and len(command) > 1
    return f"{command[0]} {command[1]}" if subcommand else command[0]


async def check_redis(settings: Settings, report: Report) -> None:
    shown = redact(settings.redis_url)
    # One connection for everything: a MULTI block lives on one connection.
    url = settings.redis_url.replace("+cluster://", "://", 1)
    client = Redis.from_url(url, single_connection_client=True, socket_connect_timeout=5)
    try:
        try:
            await client.ping()
        except RedisError as exc:
            hint = redis_hint(exc, settings.redis_url)
            report.add(
                "redis",
                "fail",
                f"cannot reach {shown}: {redact(str(exc))}{hint}",
                "check TASK_TRACKING_REDIS_URL and the network",
            )
            report.add("redis permissions", "skip", "Redis not reachable")
            return
        server, version, mode = await server_kind(client)
        kind = (
            f"{'Valkey' if server == 'valkey' else 'Redis'} {version} ({mode})"
            if version
            else "server version unknown (neither HELLO nor INFO answered)"
        )
        too_old = version_problem(server, version)
        if too_old is None:
            report.add("redis", "pass", f"reachable at {shown}: {kind}")
        else:
            report.add("redis", "fail", f"reachable at {shown}: {too_old}", UPGRADE_FIX)
        if is_cluster_url(settings.redis_url):  # the stream may live on another node
            cluster = connect(settings.redis_url)
            try:
                await check_stream(settings, cluster, report)
            finally:
                await cluster.aclose()
        else:
            await check_stream(settings, client, report)
        await check_permissions(settings, client, report)
    finally:
        await client.aclose()


def version_problem(server: str, version: str) -> str | None:
    """Why this server is too old for the sidecar, or None (also when the version is
    unknown: the other checks then tell; Valkey began at 7.2)."""
    try:
        numbers = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    if server == "valkey" or numbers >= MIN_REDIS_VERSION:
        return None
    return f"Redis {version} is older than 6.2 (ZADD GT, XTRIM MINID)"


async def server_kind(client: Redis) -> tuple[str, str, str]:
    """("valkey", "9.1.2", "standalone"): from HELLO, which every user may send (INFO
    needs a permission the sidecar's user does not have); INFO before Redis 6; an empty
    version when neither answers."""
    assert client.connection is not None  # single_connection_client after the ping
    # Without a version HELLO keeps the connection's protocol (redis-py 8 speaks RESP3; a
    # `HELLO 2` here left its parser reading RESP2 replies, and XINFO GROUPS crashed it).
    answer = await _send(client.connection, "HELLO")
    if isinstance(answer, list):  # RESP2: a flat list of names and values
        answer = dict(zip(answer[::2], answer[1::2], strict=True))
    if isinstance(answer, dict):  # RESP3: a map
        hello = {_text(k): v for k, v in answer.items()}
        server, version, mode = (_text(hello.get(k, b"?")) for k in ("server", "version", "mode"))
    else:
        try:
            info: dict[str, Any] = await client.info("server")
        except RedisError:  # neither HELLO nor INFO answered: no version
            return "redis", "", ""
        server = str(info.get("server_name") or "redis")
        version = str(info.get(f"{server}_version") or info.get("redis_version"))
        mode = str(info.get("redis_mode", "standalone"))
    return server, version, mode


async def check_stream(settings: Settings, client: Redis | RedisCluster, report: Report) -> None:
    stream = settings.redis_stream_key
    name = f"stream {stream}"
    try:
        length = await client.xlen(stream)
        groups: list[dict[str, Any]] = await client.xinfo_groups(stream)
    except ResponseError as exc:
        if "no such key" not in str(exc).lower():
            report.add(name, "fail", redact(str(exc)), "see the permissions line below")
            return
        groups = []
    if not length and not groups:
        report.add(
            name, "warn", "does not exist yet: the sidecar creates it and its groups at start"
        )
        return
    wanted = [settings.redis_projector_consumer_group]
    if settings.archive.enabled:
        wanted.append(settings.redis_archiver_consumer_group)
    found = {_text(group["name"]): group for group in groups}
    parts = []
    for group_name in wanted:
        group = found.get(group_name)
        if group is None:
            parts.append(f"group {group_name} missing (created at the sidecar's start)")
        else:
            lag = group.get("lag")
            parts.append(f"group {group_name}: {group['pending']} pending, lag {lag}")
    missing = any("missing" in part for part in parts)
    report.add(name, "warn" if missing else "pass", f"{length} entries; " + "; ".join(parts))


async def check_permissions(settings: Settings, client: Redis, report: Report) -> None:
    """ACL DRYRUN (Redis 7+, Valkey) when this user may run it; else each command queued
    in MULTI and the block discarded: the server checks a queued command's permissions
    (command and keys) when it queues it, and runs nothing on DISCARD. EXEC and DISCARD
    are sent outside a block, where the server checks them and answers "without MULTI".
    On a cluster this runs on the URL's node: the ACL check comes before the slot check,
    so a MOVED answer means allowed (ACL rules are per node; the same user on each)."""
    commands = needed_commands(settings)
    connection = client.connection
    assert connection is not None  # single_connection_client after the ping
    denied: list[str] = []
    user = await _whoami(connection)
    method = "ACL DRYRUN"
    if user is None or not await _dryrun_allowed(connection, user):
        method = "MULTI/DISCARD, nothing run"
        denied = await _queue_and_discard(connection, commands)
    else:
        for command in commands:
            answer = await _send(connection, "ACL", "DRYRUN", user, *command)
            if answer not in (b"OK", "OK"):
                denied.append(command_name(command))
    who = f"user {user}" if user else "this user"
    if denied:
        report.add(
            "redis permissions",
            "fail",
            f"{who} may not run {', '.join(dict.fromkeys(denied))} on the configured keys"
            f" (checked with {method})",
            ACL_FIX,
        )
    else:
        report.add(
            "redis permissions",
            "pass",
            f"{who} may run all {len(commands)} commands the sidecar needs (checked with {method})",
        )


async def _queue_and_discard(connection: Any, commands: list[tuple[str, ...]]) -> list[str]:
    denied = []
    outside = [command for command in commands if command[0] in ("MULTI", "EXEC", "DISCARD")]
    for command in outside[1:]:  # EXEC, DISCARD: "without MULTI" when allowed
        if isinstance(await _send(connection, *command), NoPermissionError):
            denied.append(command_name(command))
    if isinstance(await _send(connection, "MULTI"), NoPermissionError):
        return [*denied, "MULTI (so the other commands could not be checked)"]
    try:
        for command in commands:
            if command in outside:
                continue
            if isinstance(await _send(connection, *command), NoPermissionError):
                denied.append(command_name(command))
    finally:
        await _send(connection, "DISCARD")
    return denied


async def _send(connection: Any, *command: str) -> Any:
    """One raw command on `connection`: its reply, or the error reply as an exception
    object (no response callbacks: a queued command answers QUEUED)."""
    await connection.send_command(*command)
    try:
        return await connection.read_response()
    except ResponseError as exc:
        return exc


async def _whoami(connection: Any) -> str | None:
    answer = await _send(connection, "ACL", "WHOAMI")
    return None if isinstance(answer, Exception) else _text(answer)


async def _dryrun_allowed(connection: Any, user: str) -> bool:
    """False on servers without ACL DRYRUN (before Redis 7) and for users who may not run it."""
    return not isinstance(await _send(connection, "ACL", "DRYRUN", user, "PING"), Exception)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
