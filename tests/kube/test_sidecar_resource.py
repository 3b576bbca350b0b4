"""A running sidecar driven by a TaskTracking resource: kopf over HTTP against the in-memory
Kubernetes API, the real runtime, Redis and the S3 test server.

The whole run is checked for exactly-once archival at the end, across every switch.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import redis.asyncio as aioredis

from tests.conftest import KUBE_NAMESPACE, KUBE_RESOURCE, MEMORY_AND_CLUSTER, MotoServer
from tests.helpers import (
    ARCHIVER,
    PROJECTOR,
    STREAM,
    Producer,
    archive_objects_s3,
    check_exactly_once,
    group_done,
    group_unacked,
    running_sidecar,
    wait_for,
)

from .api import KubeAPI

NS = KUBE_NAMESPACE
NAME = KUBE_RESOURCE
pytestmark = MEMORY_AND_CLUSTER
FLUSH = {"maxEvents": 100, "maxAgeSeconds": 1}


def resource(**archive: Any) -> dict[str, Any]:
    return {
        "apiVersion": "alakai.io/v1alpha1",
        "kind": "TaskTracking",
        "metadata": {"name": NAME},
        "spec": {"archive": {"flush": FLUSH, **archive}},
    }


def events(api: Any) -> list[Any]:
    return api.events if isinstance(api, KubeAPI) else api.events_in(NS)


def own_entry(api: Any, pod: str) -> dict[str, Any]:
    obj = api.get(NS, NAME) or {}
    entry: dict[str, Any] = obj.get("status", {}).get("sidecars", {}).get(pod, {})
    return entry


async def applied_before_an_idle_read(api: Any, sidecar: Any, pod: str, expect: Any) -> float:
    """Wait until the sidecar runs `expect` (an ArchiveConfig predicate) and reports the
    resource's current generation; returns the seconds it took (printed). The bound is
    just under the 5 s block of an idle read: a flip that waited for one would miss it, a
    loaded machine's slower flip would not (the figures are printed, not asserted)."""
    started = time.monotonic()
    generation = (api.get(NS, NAME) or {}).get("metadata", {}).get("generation")

    def done() -> bool:
        entry = own_entry(api, pod)
        return expect(sidecar.archive.target) and entry.get("observedGeneration") == generation

    await wait_for(done, timeout=4.5, message="the resource applied before an idle read ended")
    return time.monotonic() - started


async def test_resource_switches_archival_without_restart_and_exactly_once(
    api: Any, redis_url: str, redis_client: aioredis.Redis, s3: MotoServer
) -> None:
    client = s3.client()
    for bucket in ("first", "second"):
        client.create_bucket(Bucket=bucket)
    producer = Producer(redis_client)
    pod = "pod-a"
    flips: list[float] = []
    # the default block time: a flip must not wait for an idle read
    async with running_sidecar(
        redis_url, resource_name=NAME, namespace=NS, redis_consumer_name=pod, redis_block_ms=5000
    ) as sidecar:
        await wait_for(lambda: sidecar.watch is not None and sidecar.watch.ready.is_set())
        producer.start()

        # enable: objects appear in the S3 server
        await api.create(NS, resource(enabled=True, bucket="first"))
        flips.append(
            await applied_before_an_idle_read(
                api, sidecar, pod, lambda t: t.enabled and t.bucket == "first"
            )
        )
        await wait_for(lambda: bool(archive_objects_s3(client, "first")), message="objects")

        # disable mid-stream: archiving stops, entries wait in the stream, projector goes on
        await api.patch_spec(NS, NAME, {"archive": {"enabled": False}})
        flips.append(await applied_before_an_idle_read(api, sidecar, pod, lambda t: not t.enabled))
        assert sidecar.metrics.archive_enabled.labels("")._value.get() == 0
        waiting = await group_unacked(redis_client, STREAM, ARCHIVER)
        await wait_for(
            lambda: _grew(redis_client, waiting), message="entries waiting for the archiver"
        )
        await wait_for(lambda: _projected_recent(redis_client, producer), message="projector")

        # enable again, then change bucket
        await api.patch_spec(NS, NAME, {"archive": {"enabled": True}})
        flips.append(
            await applied_before_an_idle_read(
                api, sidecar, pod, lambda t: t.enabled and t.bucket == "first"
            )
        )
        await api.patch_spec(NS, NAME, {"archive": {"bucket": "second"}})
        flips.append(
            await applied_before_an_idle_read(api, sidecar, pod, lambda t: t.bucket == "second")
        )
        await wait_for(lambda: bool(archive_objects_s3(client, "second")), message="objects")

        # a spec the CRD accepts but that cannot work: refused, last good kept, reported
        await api.patch_spec(NS, NAME, {"archive": {"bucket": "no-such-bucket"}})
        await wait_for(
            lambda: "does not exist" in own_entry(api, pod).get("lastError", ""),
            message="lastError in the status",
        )
        assert sidecar.archive.target.bucket == "second"
        assert any("no-such-bucket" in str(e) for e in events(api))

        # delete: back to the environment (archival off)
        await api.delete(NS, NAME)
        await wait_for(lambda: not sidecar.archive.target.enabled, timeout=4.5, message="env")

        # re-create to let the archiver catch up with everything, then stop the producer
        await api.create(NS, resource(enabled=True, bucket="second"))
        await wait_for(lambda: sidecar.archive.target.enabled, timeout=4.5)
        await producer.stop()
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR), timeout=30)
        await wait_for(lambda: group_done(redis_client, STREAM, ARCHIVER), timeout=30)
    objects = archive_objects_s3(client, "first") | archive_objects_s3(client, "second")
    figures = check_exactly_once(objects, producer.valid_raw)
    print("\nresource run:", figures, "flips applied after (s):", [f"{f:.2f}" for f in flips])


async def _grew(client: aioredis.Redis, before: int) -> bool:
    return await group_unacked(client, STREAM, ARCHIVER) > before + 20


async def _projected_recent(client: aioredis.Redis, producer: Producer) -> bool:
    last = orjson.loads(producer.valid_raw[-1])
    return bool(await client.exists(f"task-tracking:execution:{last['executionId']}"))


async def test_two_sidecars_on_one_resource_each_report_their_own_status(
    api: Any, redis_url: str, s3: MotoServer
) -> None:
    s3.client().create_bucket(Bucket="shared")
    async with (
        running_sidecar(redis_url, resource_name=NAME, namespace=NS, redis_consumer_name="a"),
        running_sidecar(redis_url, resource_name=NAME, namespace=NS, redis_consumer_name="b"),
    ):
        await api.create(NS, resource(enabled=True, bucket="shared"))

        def reported() -> bool:
            status = (api.get(NS, NAME) or {}).get("status", {})
            sidecars = status.get("sidecars", {})
            return (
                set(sidecars) == {"a", "b"}
                and all(entry["archiving"] for entry in sidecars.values())
                and status.get("applied") == "2/2"
            )

        await wait_for(reported, timeout=5, message="both sidecars report 2/2")
    metadata = (api.get(NS, NAME) or {})["metadata"]
    assert not metadata.get("finalizers")
    assert not any("kopf" in key for key in metadata.get("annotations", {}))
    if api.requests is not None:  # the in-memory API also shows every write
        writes = [r for r in api.requests if r.method in ("PATCH", "PUT")]
        assert all(r.path.endswith("/status") for r in writes)


async def test_resource_retention_overrides_the_environment_and_delete_restores_it(
    api: Any, redis_url: str
) -> None:
    async with running_sidecar(
        redis_url, resource_name=NAME, namespace=NS, projection_ttl_seconds=60
    ) as sidecar:
        body = resource(enabled=False)
        body["spec"]["retention"] = {"projectionTtlSeconds": 3600, "projectIndexMaxSize": 50}
        await api.create(NS, body)
        await wait_for(
            lambda: (
                sidecar.projector.finished_ttl_seconds == 3600
                and sidecar.retention.index_max_size == 50
            ),
            timeout=5,
            message="retention from the resource",
        )
        assert sidecar.retention.index_max_age_days == 0  # not in the resource: environment
        await api.delete(NS, NAME)
        await wait_for(
            lambda: (
                sidecar.projector.finished_ttl_seconds == 60
                and sidecar.retention.index_max_size == 0
            ),
            timeout=5,
            message="environment retention restored",
        )


async def test_a_restart_archives_to_the_resources_target_from_its_first_write(
    api: Any, redis_url: str, redis_client: aioredis.Redis, s3: MotoServer
) -> None:
    """Found by a user drive: a restarted sidecar archived to the environment's target
    until kopf's first event, 150 ms later, and a kill -9'd pod's pending entries went
    there (some of them twice: into both prefixes). The resource is read once before
    archival starts."""
    client = s3.client()
    client.create_bucket(Bucket="from-resource")
    client.create_bucket(Bucket="from-env")
    await api.create(NS, resource(enabled=True, bucket="from-resource"))
    producer = Producer(redis_client)
    producer.start()
    await producer.published_more(300)  # a backlog waiting for the start
    await producer.stop()
    async with running_sidecar(
        redis_url,
        resource_name=NAME,
        namespace=NS,
        s3_archive_enabled=True,
        s3_bucket="from-env",
        archive_flush_max_events=50,
    ) as sidecar:
        assert sidecar.archive.target.bucket == "from-resource"  # before any event
        await wait_for(lambda: group_done(redis_client, STREAM, ARCHIVER), timeout=60)
    assert archive_objects_s3(client, "from-env") == {}
    check_exactly_once(archive_objects_s3(client, "from-resource"), producer.valid_raw)
