"""The read API against a real server: snapshots in JSON types, paging, projects, token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis

from sidecar.read.app import start_api
from tests.helpers import PROJECTOR, STREAM, event, group_done, publish, running_sidecar, wait_for
from tests.read_client import open_changes
from tests.servers import ACL_PASSWORD, ACL_USER, acl_refusals, create_acl_user

T0 = 1_700_000_000_000


@pytest.fixture
async def api(redis_url: str) -> AsyncIterator[str]:
    """A sidecar with the read API on; yields the API's base URL."""
    async with running_sidecar(redis_url, api_enabled=True, api_port=0) as sidecar:
        yield f"http://127.0.0.1:{sidecar.api_port}"


async def get(base: str, path: str, **options: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(base + path, **options) as reply:
        return reply.status, await reply.json()


async def projected(client: aioredis.Redis, events: list[dict[str, Any]]) -> list[str]:
    ids = await publish(client, STREAM, events)
    await wait_for(lambda: group_done(client, STREAM, PROJECTOR), message="projected")
    return ids


async def test_execution_snapshot_has_every_field_in_its_json_type(
    api: str, redis_client: aioredis.Redis
) -> None:
    typed = event(
        "typed",
        "success",
        T0,
        actor={"provider": "github", "id": 42, "login": "octo"},
        prLinks=["https://github.com/o/r/pull/1"],
        visibility={"responsibleUsers": ["ann", "デプロイ"]},
        flow="release",
        nothing=None,
        nullText="null",
        flag=True,
        count=7,
        ratio=0.5,
        nested={"a": [1, {"b": None}]},
        numberText="12",
    )
    iso = event("iso", "in_progress", "2026-03-15T10:00:00.000Z")
    [typed_id, iso_id] = await projected(redis_client, [typed, iso])
    status, body = await get(api, "/api/v1/executions/typed")
    assert status == 200
    assert body == {**typed, "occurredAtMs": T0, "streamId": typed_id}
    assert body["nothing"] is None and body["nullText"] == "null"
    assert body["numberText"] == "12" and body["occurredAt"] == T0
    status, body = await get(api, "/api/v1/executions/iso")
    assert body == {**iso, "occurredAtMs": 1773568800000, "streamId": iso_id}
    status, body = await get(api, "/api/v1/executions/nope")
    assert status == 404 and "nope" in body["error"]


async def test_a_hash_written_before_json_fields_is_read_with_the_known_json_fields(
    api: str, redis_client: aioredis.Redis
) -> None:
    await redis_client.hset(
        "task-tracking:execution:old",
        mapping={
            "executionId": "old",
            "status": "success",
            "occurredAt": str(T0),
            "actor": '{"provider":"slack","id":"U1"}',
            "prLinks": '["https://x/1"]',
            "occurredAtMs": str(T0),
            "streamId": "1-0",
        },
    )
    status, body = await get(api, "/api/v1/executions/old")
    assert status == 200
    assert body["actor"] == {"provider": "slack", "id": "U1"}
    assert body["prLinks"] == ["https://x/1"]
    assert body["occurredAt"] == T0 and body["occurredAtMs"] == T0


async def test_cursor_paging_covers_every_execution_once_newest_first(
    api: str, redis_client: aioredis.Redis
) -> None:
    # many executions share a millisecond: the cursor must order ties too
    events = [event(f"p{n:03d}", "success", T0 + n // 10) for n in range(137)]
    await projected(redis_client, events)
    seen: list[tuple[int, str]] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": "9"} | ({"before": cursor} if cursor else {})
        status, body = await get(api, "/api/v1/projects/my-org/my-repo/executions", params=params)
        assert status == 200, body
        assert len(body["executions"]) <= 9
        seen += [(row["occurredAtMs"], row["executionId"]) for row in body["executions"]]
        pages += 1
        cursor = body["next"]
        if cursor is None:
            break
    assert pages == 16
    assert sorted(e for _, e in seen) == sorted(e["executionId"] for e in events)
    assert len(set(seen)) == len(seen) == 137
    assert [ms for ms, _ in seen] == sorted((ms for ms, _ in seen), reverse=True)


async def test_paging_goes_on_after_the_cursors_execution_moved_to_the_top(
    api: str, redis_client: aioredis.Redis
) -> None:
    events = [event(f"m{n:02d}", "in_progress", T0 + n // 3) for n in range(30)]
    await projected(redis_client, events)
    _, first = await get(api, "/api/v1/projects/my-org/my-repo/executions", params={"limit": "10"})
    moved = first["executions"][-1]["executionId"]
    await projected(redis_client, [event(moved, "success", T0 + 10_000)])
    _, rest = await get(
        api,
        "/api/v1/projects/my-org/my-repo/executions",
        params={"limit": "500", "before": first["next"]},
    )
    ids = [row["executionId"] for row in first["executions"] + rest["executions"]]
    assert sorted(ids) == sorted(e["executionId"] for e in events)


async def test_bad_limit_and_cursor_are_400_with_a_reason(api: str) -> None:
    path = "/api/v1/projects/my-org/my-repo/executions"
    for params in ({"limit": "0"}, {"limit": "501"}, {"limit": "x"}, {"before": "garbage"}):
        status, body = await get(api, path, params=params)
        assert status == 400 and body["error"], params


async def test_projects_list_counts_and_latest_activity(
    api: str, redis_client: aioredis.Redis
) -> None:
    await projected(
        redis_client,
        [
            event("a1", "success", T0, project="org/a"),
            event("a2", "success", T0 + 5, project="org/a"),
            event("a2", "in_progress", T0 + 1, project="org/a"),
            event("b1", "success", T0 + 9, project="org/b"),
        ],
    )
    status, body = await get(api, "/api/v1/projects")
    assert status == 200
    assert body["changesId"]
    assert body["projects"] == [
        {"project": "org/b", "executionCount": 1, "latestActivityMs": T0 + 9},
        {"project": "org/a", "executionCount": 2, "latestActivityMs": T0 + 5},
    ]


async def test_a_token_is_required_when_set(redis_url: str) -> None:
    runner, port = await start_api(redis_url, "127.0.0.1", 0, token="s3cret")
    base = f"http://127.0.0.1:{port}"
    try:
        for path in ("/api/v1/projects", "/api/v1/changes", "/", "/api/v1/executions/x"):
            status, body = await get(base, path)
            assert status == 401 and "token" in body["error"], path
            status, _ = await get(base, path, headers={"Authorization": "Bearer wrong"})
            assert status == 401, path
        status, _ = await get(base, "/api/v1/projects", headers={"Authorization": "Bearer s3cret"})
        assert status == 200
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/?token=s3cret") as reply:
                assert reply.status == 200 and "<html" in (await reply.text()).lower()
            async with session.get(f"{base}/api/v1/projects?token=s3cret") as reply:
                assert reply.status == 401  # ?token= is for the page only
    finally:
        await runner.cleanup()


async def test_the_least_privilege_user_can_serve_every_endpoint(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    admin = redis.Redis.from_url(redis_url)
    create_acl_user(admin)
    url = redis_url.replace("redis://", f"redis://{ACL_USER}:{ACL_PASSWORD}@", 1)
    try:
        async with running_sidecar(url, api_enabled=True, api_port=0) as sidecar:
            base = f"http://127.0.0.1:{sidecar.api_port}"
            await projected(redis_client, [event(f"acl{n}", "success", T0 + n) for n in range(3)])
            assert (await get(base, "/api/v1/executions/acl1"))[0] == 200
            assert (await get(base, "/api/v1/projects"))[0] == 200
            path = "/api/v1/projects/my-org/my-repo/executions"
            _, page = await get(base, path, params={"limit": "1"})
            status, _ = await get(base, path, params={"limit": "1", "before": page["next"]})
            assert status == 200
            async with aiohttp.ClientSession() as session:
                stream = await open_changes(session, base, last_id="0-0")
                assert len(await stream.take(3)) == 3
                stream.close()
        assert acl_refusals(admin) == []
    finally:
        admin.execute_command("ACL", "DELUSER", ACL_USER)
        admin.close()
