"""The conditional-write mode in the sidecar's own status entry, as a TaskTracking re-targets
it: behind a proxy that strips `If-None-Match` (check_before_write), then moto itself
(enforced). kopf over HTTP against the in-memory Kubernetes API, the real runtime."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from tests.conftest import MEMORY_AND_CLUSTER, MotoServer
from tests.helpers import running_sidecar, wait_for
from tests.kube.test_sidecar_resource import NAME, NS, own_entry, resource
from tests.s3proxy import S3Proxy

pytestmark = MEMORY_AND_CLUSTER  # as test_sidecar_resource


async def test_the_status_entry_names_the_mode_of_each_target(
    api: Any, redis_url: str, redis_client: aioredis.Redis, s3: MotoServer
) -> None:
    s3.client().create_bucket(Bucket="history")
    proxy = S3Proxy(s3.port).start()
    proxy.strip_if_none_match = True
    pod = "pod-a"
    try:
        async with running_sidecar(
            redis_url, resource_name=NAME, namespace=NS, redis_consumer_name=pod
        ) as sidecar:
            await wait_for(lambda: sidecar.watch is not None and sidecar.watch.ready.is_set())
            await api.create(NS, resource(enabled=True, bucket="history", endpointUrl=proxy.url))
            await wait_for(
                lambda: own_entry(api, pod).get("conditionalWrites") == "check_before_write",
                timeout=5,
                message="check_before_write in the status entry",
            )
            assert own_entry(api, pod)["archiving"] is True
            await api.patch_spec(NS, NAME, {"archive": {"endpointUrl": s3.url}})
            await wait_for(
                lambda: own_entry(api, pod).get("conditionalWrites") == "enforced",
                timeout=5,
                message="enforced in the status entry",
            )
            await api.patch_spec(NS, NAME, {"archive": {"enabled": False}})
            await wait_for(
                lambda: (
                    "conditionalWrites" not in own_entry(api, pod)
                    and own_entry(api, pod).get("archiving") is False
                ),
                timeout=5,
                message="no mode while archival is off",
            )
    finally:
        proxy.stop()


async def test_a_mode_probed_after_the_spec_was_applied_reaches_the_status_at_the_next_event(
    api: Any, redis_url: str, s3: MotoServer
) -> None:
    """The resource asks for the target the environment already archives to: nothing is
    switched, and the environment archiver's probe (slowed down here) ends after the spec
    was applied. The next event on the resource (another sidecar's status write) carries
    the mode into this sidecar's entry."""
    s3.client().create_bucket(Bucket="history")
    proxy = S3Proxy(s3.port).start()
    proxy.strip_if_none_match = True
    proxy.delay_methods = {"PUT"}
    proxy.delay = 1.5  # the probe's two PUTs: 3 s
    pod = "pod-a"
    try:
        async with running_sidecar(
            redis_url,
            resource_name=NAME,
            namespace=NS,
            redis_consumer_name=pod,
            s3_archive_enabled=True,
            s3_bucket="history",
            s3_endpoint_url=proxy.url,
        ) as sidecar:
            await wait_for(lambda: sidecar.watch is not None and sidecar.watch.ready.is_set())
            body = resource(enabled=True, bucket="history", endpointUrl=proxy.url)
            del body["spec"]["archive"]["flush"]  # the environment's flush limits: same target
            await api.create(NS, body)
            await wait_for(lambda: own_entry(api, pod).get("archiving") is True, timeout=5)
            assert "conditionalWrites" not in own_entry(api, pod)  # the probe is still out
            await wait_for(
                lambda: sidecar.archive.conditional_writes == "check_before_write",
                timeout=10,
                message="the probe's answer",
            )
            generation = api.get(NS, NAME)["metadata"]["generation"]
            other = {"observedGeneration": generation, "archiving": True, "lastError": ""}
            await api.patch_status(NS, NAME, {"sidecars": {"pod-b": other}})
            await wait_for(
                lambda: own_entry(api, pod).get("conditionalWrites") == "check_before_write",
                timeout=5,
                message="the mode in the status entry after the next event",
            )
    finally:
        proxy.stop()
