"""The TaskTracking watch: kopf running for real over HTTP against the in-memory API.

The ArchiveControl is a small recorder standing in for our own runtime; everything between
it and the API server (kopf, aiohttp, the watch streams) is real.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar import eventloop
from sidecar.config import ArchiveConfig, FlushPolicy, RetentionConfig
from sidecar.devserver import free_port
from sidecar.kopf_embedding import ResourceWatch
from sidecar.resource import ArchiveState, ResourceSpec, parse_spec
from tests.conftest import KUBE_NAMESPACE, KUBE_RESOURCE
from tests.helpers import SidecarProcess, wait_for

from .api import KubeAPI
from .crd import Invalid

NS = KUBE_NAMESPACE
NAME = KUBE_RESOURCE
REFUSED_BUCKET = "refused-bucket"  # FakeControl refuses it, as the runtime would a bad bucket


def resource(**archive: Any) -> dict[str, Any]:
    return {
        "apiVersion": "alakai.io/v1alpha1",
        "kind": "TaskTracking",
        "metadata": {"name": NAME},
        "spec": {"archive": archive},
    }


class FakeControl:
    """Records the specs it is asked to apply; keeps the last good one on a refused bucket."""

    def __init__(self) -> None:
        self.applied: list[ResourceSpec | None] = []
        self.current = ArchiveState(archiving=False, bucket=None, prefix="env", last_error=None)
        self.started_tasks: list[asyncio.Task[None]] = []

    async def apply_archive_spec(self, resource: ResourceSpec | None) -> ArchiveState:
        self.applied.append(resource)
        spec = None if resource is None else resource.archive
        # As the runtime restarts its archiver: a task started from the reconfigure path.
        self.started_tasks.append(asyncio.create_task(asyncio.sleep(3600)))
        if spec is None:
            self.current = ArchiveState(archiving=False, bucket=None, prefix="env", last_error=None)
        elif spec.bucket == REFUSED_BUCKET:
            return dataclass_replace(self.current, last_error=f"bucket {spec.bucket} refused")
        else:
            self.current = ArchiveState(spec.enabled, spec.bucket, spec.prefix, last_error=None)
        return self.current

    def cleanup(self) -> None:
        for task in self.started_tasks:
            task.cancel()


def archive_spec(**archive: Any) -> ResourceSpec:
    """What the watch hands the control for a spec.archive of these fields."""
    return ResourceSpec(archive=ArchiveConfig(**archive))


def dataclass_replace(state: ArchiveState, **changes: Any) -> ArchiveState:
    import dataclasses

    return dataclasses.replace(state, **changes)


@pytest.fixture
def control() -> Any:
    fake = FakeControl()
    yield fake
    fake.cleanup()


@contextlib.asynccontextmanager
async def running(watch: ResourceWatch) -> AsyncIterator[ResourceWatch]:
    task = asyncio.create_task(watch.run())
    try:
        await asyncio.wait_for(watch.ready.wait(), timeout=5)
        yield watch
    finally:
        await asyncio.wait_for(watch.stop(), timeout=15)
        await asyncio.wait_for(task, timeout=5)


def make_watch(control: FakeControl, pod: str = "pod-a", **kwargs: Any) -> ResourceWatch:
    return ResourceWatch(control, resource_name=NAME, namespace=NS, pod_name=pod, **kwargs)


def entry(api: KubeAPI, pod: str = "pod-a") -> dict[str, Any] | None:
    obj = api.get(NS, NAME)
    if obj is None:
        return None
    value: dict[str, Any] | None = obj.get("status", {}).get("sidecars", {}).get(pod)
    return value


def status(api: KubeAPI) -> dict[str, Any]:
    obj = api.get(NS, NAME) or {}
    value: dict[str, Any] = obj.get("status", {})
    return value


def status_patches(api: KubeAPI) -> list[Any]:
    return [r for r in api.requests if r.method == "PATCH" and r.path.endswith("/status")]


def lists(api: KubeAPI) -> list[Any]:
    path = f"/apis/alakai.io/v1alpha1/namespaces/{NS}/tasktrackings"
    return [r for r in api.requests if r.path == path and "watch" not in r.query]


def assert_no_kopf_bookkeeping(api: KubeAPI) -> None:
    """Nothing but our status fields was ever written: no finalizers, annotations, results."""
    writes = [r for r in api.requests if r.method in ("PATCH", "PUT")]
    for request in writes:
        assert request.content_type == "application/merge-patch+json", request
        assert request.path.endswith("/status"), f"write to the main resource: {request}"
        assert set(request.body) == {"status"}, request
        assert set(request.body["status"]) <= {"sidecars", "applied", "archiving"}, request


def handled_events(watch: ResourceWatch) -> list[Any]:
    """Records the type of each event once the watch's handler has returned from it."""
    seen: list[Any] = []
    handler = watch._on_event

    async def recording(**kwargs: Any) -> None:
        await handler(**kwargs)
        seen.append(kwargs.get("type"))

    watch._on_event = recording  # type: ignore[method-assign]  # kopf registers it at run()
    return seen


def condition_applied(control: FakeControl, count: int) -> Callable[[], bool]:
    return lambda: len(control.applied) >= count


# ---------------------------------------------------------------------------- scenarios


async def test_created_resource_is_applied_and_reported(api: KubeAPI, control: FakeControl) -> None:
    async with running(make_watch(control)):
        await api.create(NS, resource(enabled=True, bucket="archive-bucket", prefix="tt"))

        await wait_for(condition_applied(control, 1), timeout=2, message="spec applied")
        assert control.applied == [archive_spec(enabled=True, bucket="archive-bucket", prefix="tt")]
        own = await wait_for(lambda: entry(api), timeout=2, message="status entry")
        assert own["observedGeneration"] == 1
        assert own["archiving"] is True
        assert own["bucket"] == "archive-bucket"
        assert own["prefix"] == "tt"
        assert own["lastError"] == ""
        assert own["updatedAt"].endswith("Z")
        await wait_for(lambda: status(api).get("applied") == "1/1", message="applied 1/1")
        assert status(api)["archiving"] is True
    assert_no_kopf_bookkeeping(api)


async def test_resource_present_before_start_is_applied(api: KubeAPI, control: FakeControl) -> None:
    await api.create(NS, resource(enabled=False))
    async with running(make_watch(control)):
        await wait_for(lambda: entry(api), timeout=2, message="status entry")
    assert control.applied == [archive_spec(enabled=False, bucket=None, prefix="task-tracking")]


async def test_spec_change_bumps_generation_and_is_applied(
    api: KubeAPI, control: FakeControl
) -> None:
    async with running(make_watch(control)):
        await api.create(NS, resource(enabled=True, bucket="first-bucket"))
        await wait_for(lambda: (entry(api) or {}).get("observedGeneration") == 1)

        await api.patch_spec(NS, NAME, {"archive": {"bucket": "second-bucket"}})

        own = await wait_for(
            lambda: (e := entry(api)) and e["observedGeneration"] == 2 and e,
            timeout=2,
            message="generation 2 applied",
        )
        assert own["bucket"] == "second-bucket"
        assert [s.archive.bucket for s in control.applied if s] == ["first-bucket", "second-bucket"]
    assert_no_kopf_bookkeeping(api)


async def test_status_writes_do_not_reapply_or_loop(api: KubeAPI, control: FakeControl) -> None:
    watch = make_watch(control)
    handled = handled_events(watch)
    async with running(watch):
        await api.create(NS, resource(enabled=True, bucket="archive-bucket"))
        await wait_for(lambda: status(api).get("applied") == "1/1", message="settled status")
        assert len(status_patches(api)) <= 2  # the entry, then at most one summary correction

        # Another sidecar reports (the summary becomes 2/2)...
        other = {"observedGeneration": 1, "archiving": True, "lastError": ""}
        await api.patch_status(NS, NAME, {"sidecars": {"pod-b": other}})
        await wait_for(lambda: status(api).get("applied") == "2/2", message="2/2")
        settled = len(status_patches(api))

        # ...then changes a field of its own entry (kept: entries preserve unknown fields;
        # the status schema prunes a top-level `status.note`). The change wakes the watch;
        # it must neither re-apply nor answer.
        seen = len(handled)
        await api.patch_status(NS, NAME, {"sidecars": {"pod-b": {"note": "written by pod-b"}}})
        assert entry(api, "pod-b")["note"] == "written by pod-b"
        await wait_for(lambda: len(handled) > seen, message="the watch handled pod-b's note")
        # A spec change after it: kopf handles one resource's events in order, so any
        # answer to the note (a status write) would be in before the answer to this one.
        await api.patch_spec(NS, NAME, {"archive": {"enabled": True, "bucket": "late-bucket"}})
        await wait_for(lambda: (entry(api) or {}).get("bucket") == "late-bucket")

        assert [s.archive.bucket for s in control.applied if s] == ["archive-bucket", "late-bucket"]
        answers = [
            r.body
            for r in status_patches(api)[settled:]  # the external patch is not HTTP
            if (r.body["status"].get("sidecars") or {}).get("pod-a", {}).get("observedGeneration")
            != 2
        ]
        assert answers == [], "the sidecar answered another writer's status change"
    assert_no_kopf_bookkeeping_except_note(api)


def assert_no_kopf_bookkeeping_except_note(api: KubeAPI) -> None:
    writes = [r for r in api.requests if r.method in ("PATCH", "PUT")]
    assert all(r.path.endswith("/status") for r in writes)
    assert not any("metadata" in (r.body or {}) for r in writes)


async def test_refused_spec_reports_error_keeps_last_good_and_posts_event(
    api: KubeAPI, control: FakeControl
) -> None:
    async with running(make_watch(control)):
        await api.create(NS, resource(enabled=True, bucket="good-bucket"))
        await wait_for(lambda: (entry(api) or {}).get("observedGeneration") == 1)

        await api.patch_spec(NS, NAME, {"archive": {"bucket": REFUSED_BUCKET}})

        own = await wait_for(
            lambda: (e := entry(api)) and e["lastError"] and e, message="lastError in status"
        )
        assert own["observedGeneration"] == 2
        assert "refused" in own["lastError"]
        assert own["bucket"] == "good-bucket"  # the last good configuration still runs
        assert control.current.bucket == "good-bucket"
        event = await wait_for(lambda: api.events, message="a Kubernetes Event")
        assert event[0]["type"] == "Warning"
        assert event[0]["reason"] == "InvalidSpec"
        assert "refused" in event[0]["message"]
        assert event[0]["involvedObject"]["name"] == NAME
        await wait_for(lambda: status(api).get("applied") == "0/1", message="applied 0/1")
    assert_no_kopf_bookkeeping(api)


async def test_malformed_spec_is_refused_without_calling_the_runtime(
    api: KubeAPI, control: FakeControl
) -> None:
    async with running(make_watch(control)):
        await api.create(NS, resource(enabled=True, bucket="good-bucket"))
        await wait_for(lambda: (entry(api) or {}).get("observedGeneration") == 1)

        # The CRD refuses this (422); a spec stored before the CRD had its schema is not
        # refused by a cluster, and reaches the sidecar's own check.
        with pytest.raises(Invalid, match="must be of type boolean"):
            await api.patch_spec(NS, NAME, {"archive": {"enabled": "yes please"}})
        await api.patch_spec(NS, NAME, {"archive": {"enabled": "yes please"}}, checked=False)

        own = await wait_for(lambda: (e := entry(api)) and e["lastError"] and e)
        assert own["lastError"].startswith("spec.archive.enabled:")
        assert "\n" not in own["lastError"]
        assert len(control.applied) == 1
        await wait_for(lambda: api.events, message="a Kubernetes Event")


async def test_deleted_resource_hands_control_back_to_environment(
    api: KubeAPI, control: FakeControl
) -> None:
    async with running(make_watch(control)):
        await api.create(NS, resource(enabled=True, bucket="archive-bucket"))
        await wait_for(lambda: entry(api), message="status entry")

        await api.delete(NS, NAME)

        await wait_for(lambda: control.applied[-1:] == [None], timeout=2, message="apply(None)")
        await api.create(NS, resource(enabled=True, bucket="again-bucket"))
        await wait_for(lambda: (entry(api) or {}).get("bucket") == "again-bucket")
    assert control.applied[-1] == archive_spec(
        enabled=True, bucket="again-bucket", prefix="task-tracking"
    )
    assert_no_kopf_bookkeeping(api)


async def test_two_sidecars_write_only_their_own_entries(
    api: KubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    control_a, control_b = FakeControl(), FakeControl()
    await api.create(NS, resource(enabled=True, bucket="archive-bucket"))
    try:
        # Each sidecar logs in with its own token, so the request log tells them apart.
        monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "a", token="a")))
        async with running(make_watch(control_a, "pod-a")):
            await wait_for(lambda: entry(api, "pod-a"), message="pod-a entry")
            monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "b", token="b")))
            async with running(make_watch(control_b, "pod-b")):
                await wait_for(lambda: status(api).get("applied") == "2/2", message="2/2")
                await api.patch_spec(NS, NAME, {"archive": {"prefix": "moved"}})
                await wait_for(
                    lambda: (
                        status(api).get("applied") == "2/2"
                        and all(e["prefix"] == "moved" for e in status(api)["sidecars"].values())
                    ),
                    message="both at generation 2",
                )
    finally:
        control_a.cleanup()
        control_b.cleanup()

    for token, own in (("a", "pod-a"), ("b", "pod-b")):
        writes = [r for r in status_patches(api) if r.token == token]
        assert writes, f"no status writes by {own}"
        for request in writes:
            assert set(request.body["status"].get("sidecars", {})) <= {own}, request.body
    assert_no_kopf_bookkeeping(api)


async def test_stale_entry_of_gone_pod_is_removed(api: KubeAPI, control: FakeControl) -> None:
    await api.create(NS, resource(enabled=False))
    gone = {"observedGeneration": 1, "archiving": False, "updatedAt": "2020-01-01T00:00:00Z"}
    live = {"observedGeneration": 1, "archiving": False, "updatedAt": "2020-01-01T00:00:00Z"}
    async with running(make_watch(control)):
        await wait_for(lambda: entry(api), message="own entry")
        await api.patch_status(NS, NAME, {"sidecars": {"gone-pod": gone}})
        await wait_for(lambda: status(api).get("applied") == "2/2", message="gone pod counted")

        await api.patch_spec(NS, NAME, {"archive": {"prefix": "next"}})

        await wait_for(lambda: entry(api, "gone-pod") is None, message="gone-pod pruned")
        await wait_for(lambda: status(api).get("applied") == "1/1", message="applied 1/1")
        # An old entry that is at the current generation is not stale: it is a quiet sidecar.
        await api.patch_status(
            NS, NAME, {"sidecars": {"quiet-pod": {**live, "observedGeneration": 2}}}
        )
        await wait_for(lambda: status(api).get("applied") == "2/2", message="quiet pod counted")
        assert entry(api, "quiet-pod") is not None


async def test_namespaced_role_watches_the_given_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, control: FakeControl
) -> None:
    async with KubeAPI(namespaced_only=True) as api:
        monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig")))
        async with running(make_watch(control)):
            await api.create(NS, resource(enabled=True, bucket="archive-bucket"))
            await wait_for(lambda: status(api).get("applied") == "1/1", timeout=2)

        # No cluster-scoped list or watch was even tried: kopf 1.45 would retry the 403s
        # for about a minute before falling back to the given namespace.
        for request in api.requests:
            if "watch" in request.query or "tasktrackings" in request.path:
                assert f"/namespaces/{NS}/" in request.path, request
        assert not [r for r in api.requests if r.path.endswith("/namespaces")]
        assert not [r for r in api.requests if r.path.endswith("/customresourcedefinitions")]
        assert control.applied == [
            archive_spec(enabled=True, bucket="archive-bucket", prefix="task-tracking")
        ]
        assert_no_kopf_bookkeeping(api)


async def test_watch_restarts_after_timeout_and_410_gone(
    api: KubeAPI, control: FakeControl
) -> None:
    async with running(make_watch(control, watch_timeout=0.5)):
        await api.create(NS, resource(enabled=False))
        await wait_for(lambda: entry(api), message="own entry")
        api.compact()  # the next re-watch from the old resourceVersion gets 410 Gone
        lists_before = len(lists(api))
        await wait_for(lambda: len(lists(api)) > lists_before, message="a re-list after 410")
        assert api.expired_watches >= 1
        await api.patch_spec(NS, NAME, {"archive": {"enabled": True, "bucket": "late-bucket"}})
        await wait_for(lambda: (entry(api) or {}).get("bucket") == "late-bucket")


async def test_stop_cancels_no_tasks_kopf_did_not_create(
    api: KubeAPI, control: FakeControl
) -> None:
    async with running(make_watch(control)):
        bystander = asyncio.create_task(asyncio.sleep(3600))  # e.g. a sidecar worker
        await api.create(NS, resource(enabled=True, bucket="archive-bucket"))
        await wait_for(lambda: control.started_tasks, message="apply started a task")
    try:
        assert not bystander.done()
        assert not any(t.done() for t in control.started_tasks)
    finally:
        bystander.cancel()


async def test_signal_handlers_of_the_sidecar_survive_kopf(
    api: KubeAPI, control: FakeControl
) -> None:
    received: list[str] = []
    eventloop.add_signal_handler(signal.SIGTERM, received.append, "sidecar")
    try:
        async with running(make_watch(control)):
            os.kill(os.getpid(), signal.SIGTERM)
            await wait_for(lambda: received == ["sidecar"], message="the sidecar's handler ran")
        os.kill(os.getpid(), signal.SIGTERM)
        await wait_for(lambda: received == ["sidecar"] * 2, message="still the sidecar's")
    finally:
        eventloop.remove_signal_handler(signal.SIGTERM)


async def test_sidecar_process_with_the_watch_on_stops_on_sigterm(
    api: KubeAPI, redis_url: str, tmp_path: Path
) -> None:
    # The process runs on uvloop, which (unlike asyncio) does not expose its handlers.
    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASK_TRACKING_")}
    env.update(
        TASK_TRACKING_REDIS_URL=redis_url,
        TASK_TRACKING_RESOURCE_NAME=NAME,
        TASK_TRACKING_NAMESPACE=NS,
        TASK_TRACKING_HTTP_PORT=str(http_port),
    )
    sidecar = SidecarProcess(env, tmp_path / "sidecar.log").start()
    try:
        watching = lambda: any(r.query.get("watch") for r in api.requests)  # noqa: E731
        await wait_for(watching, timeout=30, message="the process watches the resource")
        await wait_for(
            lambda: "the sidecar's signal handlers are back" in sidecar.log(),
            timeout=30,
            message="kopf started and the sidecar's handlers put back",
        )
        assert await asyncio.to_thread(sidecar.terminate, 20) == 0, sidecar.log()
    finally:
        sidecar.kill()


async def test_without_credentials_the_watch_stays_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, control: FakeControl
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    watch = make_watch(control)
    await asyncio.wait_for(watch.run(), timeout=2)
    await watch.stop()
    assert not watch.ready.is_set()
    assert control.applied == []


@pytest.mark.parametrize(
    ("archive", "field"),
    [
        ({"enabled": True}, "spec.archive.bucket"),
        ({"enabled": "yes"}, "spec.archive.enabled"),
        ({"prefix": "/abs"}, "spec.archive.prefix"),
        ({"flush": {"maxEvents": 0}}, "spec.archive.flush.maxEvents"),
        ({"bukket": "x"}, "spec.archive.bukket"),
    ],
)
def test_malformed_spec_error_names_the_field(archive: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: ") as error:
        parse_spec({"archive": archive})
    assert "\n" not in str(error.value)


def test_spec_fields_map_from_camel_case() -> None:
    spec = parse_spec(
        {
            "archive": {
                "enabled": True,
                "bucket": "b-bucket",
                "prefix": "p",
                "region": "eu-west-1",
                "endpointUrl": "http://minio:9000",
                "flush": {"maxEvents": 10, "maxBytes": 2048, "maxAgeSeconds": 5},
            },
            "retention": {"projectionTtlSeconds": 60},
        }
    )
    assert spec == ResourceSpec(
        archive=ArchiveConfig(
            enabled=True,
            bucket="b-bucket",
            prefix="p",
            region="eu-west-1",
            endpoint_url="http://minio:9000",
            flush=FlushPolicy(max_events=10, max_bytes=2048, max_age_seconds=5),
        ),
        retention=RetentionConfig(projection_ttl_seconds=60),
    )
