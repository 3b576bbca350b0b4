"""The changes over SSE against a real server: order, exact resume, reset, replicas, slow
clients, heartbeats."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import aiohttp.web
import orjson
import pytest
import redis.asyncio as aioredis

from sidecar.connections import connect
from sidecar.keys import CHANGES_KEY
from sidecar.read import app as read_app
from sidecar.read import changes as read_changes
from sidecar.read.app import start_api
from tests.helpers import PROJECTOR, STREAM, event, group_done, publish, running_sidecar, wait_for
from tests.read_client import SseStream, open_changes

T0 = 1_700_000_000_000
COUNT = 5000  # changes for the slow-client test: more than a client may have waiting


@pytest.fixture
async def api(redis_url: str) -> AsyncIterator[tuple[str, Any]]:
    async with running_sidecar(redis_url, api_enabled=True, api_port=0) as sidecar:
        yield f"http://127.0.0.1:{sidecar.api_port}", sidecar


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def projected(client: aioredis.Redis, events: list[dict[str, Any]]) -> None:
    await publish(client, STREAM, events)
    await wait_for(lambda: group_done(client, STREAM, PROJECTOR), message="projected")


def states(events: list[Any]) -> list[tuple[str, str]]:
    return [(e.data["executionId"], e.data["status"]) for e in events]


async def test_each_change_that_took_effect_is_one_event_in_order_stale_ones_are_not(
    api: tuple[str, Any], redis_client: aioredis.Redis, session: aiohttp.ClientSession
) -> None:
    base, _ = api
    stream = await open_changes(session, base)
    await projected(redis_client, [event("c1", "in_progress", T0)])
    await projected(redis_client, [event("c1", "success", T0 + 5), event("c2", "error", T0)])
    await projected(redis_client, [event("c1", "in_progress", T0 + 1)])  # stale: no change
    await projected(redis_client, [event("c3", "success", T0, actor={"provider": "slack"})])
    got = await stream.take(4)
    assert states(got) == [
        ("c1", "in_progress"),
        ("c1", "success"),
        ("c2", "error"),
        ("c3", "success"),
    ]
    assert got[3].data["actor"] == {"provider": "slack"}  # JSON types, like the snapshot
    assert got[3].data["occurredAtMs"] == T0
    assert all(e.event == "execution" and e.id for e in got)
    ids = [tuple(map(int, e.id.split("-"))) for e in got]
    assert ids == sorted(ids) and len(set(ids)) == 4
    stream.close()


async def test_project_filter_sends_only_that_projects_changes(
    api: tuple[str, Any], redis_client: aioredis.Redis, session: aiohttp.ClientSession
) -> None:
    base, _ = api
    stream = await open_changes(session, base, project="org/b")
    await projected(
        redis_client,
        [event("a", "success", T0, project="org/a"), event("b", "success", T0, project="org/b")],
    )
    await projected(redis_client, [event("b2", "success", T0, project="org/b")])
    assert states(await stream.take(2)) == [("b", "success"), ("b2", "success")]
    stream.close()


async def test_a_project_filter_that_is_not_owner_repo_is_a_400(
    api: tuple[str, Any], session: aiohttp.ClientSession
) -> None:
    """Before, it answered 200 and a stream that never carried anything."""
    base, _ = api
    async with session.get(f"{base}/api/v1/changes", params={"project": "bad"}) as reply:
        assert reply.status == 400
        assert await reply.json() == {"error": "project: 'bad' is not owner/repo"}


async def test_resume_with_last_event_id_delivers_exactly_the_missed_changes(
    api: tuple[str, Any], redis_client: aioredis.Redis, session: aiohttp.ClientSession
) -> None:
    base, _ = api
    stream = await open_changes(session, base)
    await projected(redis_client, [event(f"r{n}", "in_progress", T0) for n in range(5)])
    seen = await stream.take(5)
    stream.close()  # the client drops here...
    # ...and misses these, some from other executions, some newer states of seen ones
    missed = [event(f"r{n}", "success", T0 + 1) for n in range(3)]
    missed += [event(f"s{n}", "in_progress", T0) for n in range(600)]
    await projected(redis_client, missed)
    resumed = await open_changes(session, base, last_id=seen[-1].id)
    got = await resumed.take(603)
    expected = [(f"r{n}", "success") for n in range(3)] + [
        (f"s{n}", "in_progress") for n in range(600)
    ]
    assert sorted(states(got)) == sorted(expected)
    ids = [tuple(map(int, e.id.split("-"))) for e in got]
    assert ids == sorted(ids) and ids[0] > tuple(map(int, seen[-1].id.split("-")))
    # and then the live ones, none twice
    await projected(redis_client, [event("after", "success", T0)])
    [after] = await resumed.take(1)
    assert states([after]) == [("after", "success")]
    # ?lastEventId= works the same (for clients that cannot set headers)
    again = await open_changes(session, base, lastEventId=got[-1].id)
    assert [e.id for e in await again.take(1)] == [after.id]
    resumed.close()
    again.close()


async def test_a_position_older_than_the_feed_keeps_gets_one_reset(
    api: tuple[str, Any], redis_client: aioredis.Redis, session: aiohttp.ClientSession
) -> None:
    base, _ = api
    stream = await open_changes(session, base)
    await projected(redis_client, [event(f"o{n}", "success", T0) for n in range(10)])
    old = (await stream.take(10))[0].id
    stream.close()
    # as MAXLEN ~ does on a busy feed
    await redis_client.xtrim(CHANGES_KEY, maxlen=3, approximate=False)
    resumed = await open_changes(session, base, last_id=old)
    reset = await resumed.next()
    assert reset is not None and reset.event == "reset" and reset.data["reason"]
    assert await resumed.next() is None  # then the server closes the stream
    # a position that was not trimmed past still resumes
    kept = [e async for e in _ids(redis_client)]
    resumed = await open_changes(session, base, last_id=kept[0])
    assert [e.id for e in await resumed.take(2)] == kept[1:]
    resumed.close()
    for bad in ("garbage", "99999999999999-0"):
        stream = await open_changes(session, base, last_id=bad)
        reset = await stream.next()
        assert reset is not None and reset.event == "reset", bad


async def _ids(client: aioredis.Redis) -> AsyncIterator[str]:
    for entry_id, _ in await client.xrange(CHANGES_KEY):
        yield entry_id.decode()


async def test_two_api_replicas_send_the_same_changes_with_the_same_ids(
    api: tuple[str, Any],
    redis_url: str,
    redis_client: aioredis.Redis,
    session: aiohttp.ClientSession,
) -> None:
    base, _ = api
    runner, port = await start_api(redis_url, "127.0.0.1", 0)  # a standalone replica
    try:
        first = await open_changes(session, base)
        second = await open_changes(session, f"http://127.0.0.1:{port}")
        await projected(redis_client, [event(f"x{n}", "success", T0) for n in range(50)])
        a, b = await first.take(50), await second.take(50)
        assert [(e.id, e.data) for e in a] == [(e.id, e.data) for e in b]
        # a client moving from one replica to the other resumes exactly
        first.close()
        await projected(redis_client, [event(f"y{n}", "success", T0) for n in range(5)])
        moved = await open_changes(session, f"http://127.0.0.1:{port}", last_id=a[-1].id)
        assert states(await moved.take(5)) == [(f"y{n}", "success") for n in range(5)]
        moved.close()
        second.close()
    finally:
        await runner.cleanup()


async def test_a_slow_client_is_reset_and_dropped_without_delaying_the_others(
    api: tuple[str, Any],
    redis_client: aioredis.Redis,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, sidecar = api
    assert read_changes.QUEUE_SIZE * 2 < COUNT
    monkeypatch.setattr(read_app, "WRITE_TIMEOUT_SECONDS", 1.0)
    port = int(base.rsplit(":", 1)[1])
    # A client that subscribes and then never reads, with a tiny receive buffer.
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", port))
    slow.sendall(b"GET /api/v1/changes HTTP/1.1\r\nHost: x\r\n\r\n")
    feed = sidecar._api.app[read_app.FEED_KEY]
    await wait_for(lambda: len(feed.subscribers) == 1, message="slow client subscribed")
    fast = await open_changes(session, base)
    padding = "p" * 2000  # big entries fill the slow socket quickly
    got = []
    # in chunks that the fast client takes as they come (both share this process with
    # the projector: a burst it did not read would make it slow too)
    for start in range(0, COUNT, 500):
        chunk = [event(f"f{n}", "success", T0, padding=padding) for n in range(start, start + 500)]
        await publish(redis_client, STREAM, chunk)
        got += await fast.take(len(chunk), timeout=60)
    assert len({e.data["executionId"] for e in got}) == COUNT
    await wait_for(lambda: len(feed.subscribers) == 1, message="slow client dropped")
    # what the slow client finally reads ends: with a reset when it could still be
    # written, cut otherwise; never a stream that goes on
    slow.settimeout(20)

    def read_to_the_end() -> bytes:
        received = b""
        while data := slow.recv(65536):
            received += data
        return received

    received = await asyncio.to_thread(read_to_the_end)
    assert b"event: execution" in received
    assert received.count(b"event: execution") < COUNT
    slow.close()
    fast.close()


async def test_an_idle_stream_gets_heartbeat_comments(
    redis_url: str, redis_client: aioredis.Redis, session: aiohttp.ClientSession
) -> None:
    """Idle for the client: no change at all, or none of its project on a busy feed."""
    runner = aiohttp.web.AppRunner(
        read_app.build_app(redis_url, heartbeat_seconds=0.2), shutdown_timeout=0.5
    )
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        stream: SseStream = await open_changes(session, f"http://127.0.0.1:{port}")
        with pytest.raises(asyncio.TimeoutError):  # no event, only comments, for 1.5 s
            await asyncio.wait_for(stream.next(), 1.5)
        assert stream.comments.count("heartbeat") >= 2
        stream.close()
        quiet = await open_changes(session, f"http://127.0.0.1:{port}", project="o/quiet")

        async def busy() -> None:  # another project's changes, every 20 ms
            for n in range(75):
                await redis_client.xadd(CHANGES_KEY, {"executionId": f"b{n}", "project": "o/b"})
                await asyncio.sleep(0.02)

        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(quiet.next(), busy()), 1.5)
        assert quiet.comments.count("heartbeat") >= 2
        quiet.close()
    finally:
        await runner.cleanup()


async def test_a_change_right_after_subscribing_is_delivered_however_slow_the_server_is(
    api: tuple[str, Any],
    redis_client: aioredis.Redis,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A handler that looked up the feed's position after subscribing would skip what
    # arrived in between: make that lookup slow, so such a change surely falls in it.
    original = read_changes.ChangesFeed.position

    async def slow_position(self: Any) -> str:
        await asyncio.sleep(0.5)
        return await original(self)

    monkeypatch.setattr(read_changes.ChangesFeed, "position", slow_position)
    base, _ = api
    stream = await open_changes(session, base)  # returns once ": connected" arrived
    await redis_client.xadd(
        CHANGES_KEY, {"executionId": "now", "status": "success", "project": "o/r"}
    )
    [change] = await asyncio.wait_for(stream.take(1), 10)  # (heartbeats reset take's own)
    assert change.data["executionId"] == "now"
    stream.close()


async def test_the_shared_log_gives_each_subscriber_its_changes_once_in_order_across_trims(
    redis_url: str,
) -> None:
    """One log for every client (each keeps only its position): a subscriber that takes
    as changes come gets all of them, once and in order, while the log drops its oldest
    several times over; one filtered by project gets that project's; one that never takes
    is marked overflowed once it is more than QUEUE_SIZE behind, and gets nothing more."""
    client = connect(redis_url, decode_responses=True)
    await client.delete(CHANGES_KEY)
    feed = read_changes.ChangesFeed(client, block_ms=100)
    await feed.start()
    total = 5 * read_changes.QUEUE_SIZE
    try:
        await feed.started.wait()
        with (
            feed.subscribe(None) as steady,
            feed.subscribe("o/a") as filtered,
            feed.subscribe(None) as idle,
        ):
            got: list[str] = []
            got_a: list[str] = []
            for start in range(0, total, 500):
                async with client.pipeline(transaction=False) as pipe:
                    for n in range(start, start + 500):  # the feed's first entry layout
                        project = "o/a" if n % 3 == 0 else "o/b"
                        pipe.xadd(CHANGES_KEY, {"executionId": f"e{n}", "project": project})
                    await pipe.execute()
                while len(got) < start + 500:
                    assert await feed.wait(steady, 10), f"{len(got)} changes only"
                    got += [orjson.loads(c.state)["executionId"] for c in feed.take(steady)]
                    got_a += [orjson.loads(c.state)["executionId"] for c in feed.take(filtered)]
            assert got == [f"e{n}" for n in range(total)]
            assert got_a == [f"e{n}" for n in range(0, total, 3)]
            assert not steady.overflowed and not filtered.overflowed
            assert await feed.wait(idle, 0.1)  # something to take: its reset
            assert feed.take(idle) == [] and idle.overflowed
    finally:
        await feed.stop()
        await client.aclose()
