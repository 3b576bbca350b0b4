"""`task-tracking doctor` against real components: the session's Redis (with ACL users that
lack one permission), moto (a missing bucket; behind tests/s3proxy.py, a server that
ignores conditional writes), and the tests' Kubernetes API (tests/kube/api.py: no CRD, no
resource, RBAC refusing one verb through SelfSubjectAccessReview)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from sidecar.config import load_settings
from sidecar.connections import LEAST_PRIVILEGE_ACL
from sidecar.doctor import Report, run_doctor
from tests.conftest import PROXIED_BUCKET, MotoServer
from tests.helpers import STREAM
from tests.kube.api import KubeAPI
from tests.kube.store import API_VERSION, KIND
from tests.s3proxy import S3Proxy

BUCKET = PROXIED_BUCKET  # what `stripping_proxy` creates
USER, PASSWORD = "doctor-test", "pw-for-doctor-test"
ROOT = Path(__file__).resolve().parents[2]


def outcomes(report: Report) -> dict[str, tuple[str, str, str | None]]:
    return {check.name: (check.outcome, check.message, check.fix) for check in report.checks}


async def doctor(redis_url: str, resource: str | None = None, **settings: Any) -> Report:
    return await run_doctor(load_settings({}, redis_url=redis_url, **settings), resource=resource)


@pytest.fixture
def acl_user(redis_url: str) -> Iterator[Any]:
    """`make(without=..., extra=...)`: the least-privilege user less one rule; its URL."""
    admin = redis.Redis.from_url(redis_url)

    def make(without: str = "", extra: tuple[str, ...] = ()) -> str:
        rules = [rule for rule in LEAST_PRIVILEGE_ACL.split() if rule != without]
        admin.execute_command("ACL", "SETUSER", USER, "reset", "on", f">{PASSWORD}", *rules, *extra)
        return redis_url.replace("redis://", f"redis://{USER}:{PASSWORD}@")

    yield make
    admin.execute_command("ACL", "DELUSER", USER)
    admin.close()


async def test_every_check_passes_and_nothing_is_written(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    report = await doctor(redis_url)
    assert report.ok, report.render()
    found = outcomes(report)
    assert found["redis"][0] == "pass" and (
        "Redis " in found["redis"][1] or "Valkey " in found["redis"][1]
    )
    assert found["redis permissions"][0] == "pass"
    assert "ACL DRYRUN" in found["redis permissions"][1]  # the default user may dry-run
    assert found["stream task-events:v1"][0] == "warn"  # not created yet: not a failure
    assert found["archive"][0] == "skip" and found["kubernetes"][0] == "skip"
    assert client.dbsize() == 0  # the checks changed nothing
    client.close()


async def test_a_stream_with_its_groups_is_reported_with_their_lag(
    redis_url: str, tmp_path: Path
) -> None:
    """What a running sidecar leaves (the quick start's `task-tracking doctor`): the
    server-kind check must not change the connection's protocol under redis-py, whose
    XINFO GROUPS parser then broke on Valkey 9 (`'list' object has no attribute 'items'`)."""
    client = redis.Redis.from_url(redis_url)
    client.xgroup_create(STREAM, "task-status-projector", id="0", mkstream=True)
    client.xgroup_create(STREAM, "task-history-archiver", id="0")
    client.xadd(STREAM, {"event": "{}"})
    report = await doctor(
        redis_url, s3_archive_enabled=True, archive_sink="folder", archive_folder=tmp_path
    )
    found = outcomes(report)
    assert found["stream task-events:v1"] == (
        "pass",
        "1 entries; group task-status-projector: 0 pending, lag 1;"
        " group task-history-archiver: 0 pending, lag 1",
        None,
    ), report.render()
    assert found["redis"][0] == "pass" and found["redis permissions"][0] == "pass"
    client.close()


@pytest.mark.parametrize(
    ("environment", "check", "fix"),
    [
        ({"TASK_TRACKING_S3_REGION": "not a region"}, "s3 bucket", "TASK_TRACKING_S3_REGION"),
        ({"AWS_ENDPOINT_URL_S3": "notaurl"}, "s3 bucket", "TASK_TRACKING_S3_ENDPOINT_URL"),
        ({"AWS_SECRET_ACCESS_KEY": ""}, "s3 credentials", "AWS_SECRET_ACCESS_KEY"),
    ],
    ids=["region", "endpoint", "half-the-credentials"],
)
def test_a_malformed_s3_setting_is_one_failed_check_naming_it(
    redis_url: str, environment: dict[str, str], check: str, fix: str
) -> None:
    """Before, each was a botocore traceback instead of the report (found by a user drive)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASK_TRACKING_", "AWS_"))}
    env |= {
        "TASK_TRACKING_REDIS_URL": redis_url,
        "TASK_TRACKING_S3_ARCHIVE_ENABLED": "true",
        "TASK_TRACKING_S3_BUCKET": "archive",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    } | environment
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "doctor"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("✗")]
    assert len(failed) == 1 and failed[0].startswith(f"✗ {check}:"), result.stdout
    assert fix in failed[0].partition(" -> ")[2], failed[0]
    assert "✓ redis:" in result.stdout  # the other checks still report


@pytest.mark.parametrize("dryrun", [False, True], ids=["multi-discard", "acl-dryrun"])
async def test_pinpoints_one_missing_acl_permission(
    redis_url: str, acl_user: Any, dryrun: bool
) -> None:
    extra = ("+acl|whoami", "+acl|dryrun") if dryrun else ()
    full = await doctor(acl_user(extra=extra))
    assert outcomes(full)["redis permissions"][0] == "pass", full.render()

    report = await doctor(acl_user(without="+xclaim", extra=extra))
    outcome, message, fix = outcomes(report)["redis permissions"]
    assert outcome == "fail" and not report.ok
    assert "may not run XCLAIM on the configured keys" in message
    assert ("ACL DRYRUN" if dryrun else "MULTI/DISCARD") in message
    assert fix is not None and "README" in fix
    assert redis.Redis.from_url(redis_url).dbsize() == 0


async def test_a_key_pattern_the_user_lacks_is_pinpointed(redis_url: str, acl_user: Any) -> None:
    url = acl_user(without="~task-tracking:*")
    outcome, message, _ = outcomes(await doctor(url))["redis permissions"]
    assert outcome == "fail"
    assert "HMGET" in message and "ZADD" in message and "XADD" not in message


@pytest.fixture
def s3_settings(s3: MotoServer) -> dict[str, Any]:
    return {"s3_archive_enabled": True, "s3_bucket": BUCKET, "s3_region": "us-east-1"}


async def test_pinpoints_a_missing_bucket(redis_url: str, s3_settings: dict[str, Any]) -> None:
    report = await doctor(redis_url, **s3_settings)
    found = outcomes(report)
    assert found["s3 credentials"][0] == "pass" and "environment" in found["s3 credentials"][1]
    outcome, message, fix = found["s3 bucket"]
    assert outcome == "fail" and "bucket does not exist" in message
    assert fix == "create the bucket, or fix TASK_TRACKING_S3_BUCKET"
    assert not report.ok


async def test_conditional_writes_enforced_by_moto_and_not_behind_a_stripping_proxy(
    redis_url: str, s3: MotoServer, s3_settings: dict[str, Any], stripping_proxy: S3Proxy
) -> None:
    direct = outcomes(await doctor(redis_url, **s3_settings))
    assert direct["s3 bucket"][0] == "pass", direct
    assert direct["s3 conditional writes"][0] == "pass"

    behind = {**s3_settings, "s3_endpoint_url": stripping_proxy.url}
    report = await doctor(redis_url, **behind)
    outcome, message, _ = outcomes(report)["s3 conditional writes"]
    assert outcome == "warn" and "check_before_write mode" in message
    assert report.ok  # the archiver falls back: a warning, not a failure
    forced = await doctor(redis_url, **behind, archive_conditional_writes="enforced")
    assert outcomes(forced)["s3 conditional writes"][0] == "fail" and not forced.ok
    assert s3.client().list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0  # probe deleted


@pytest.fixture
async def kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[KubeAPI]:
    async with KubeAPI() as api:
        monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield api


async def test_kubernetes_crd_resource_and_rbac(redis_url: str, kube: KubeAPI) -> None:
    kube.crd_installed = False
    found = outcomes(await doctor(redis_url, resource="tracking"))
    assert (
        found["kubernetes credentials"][0] == "pass"
        and kube.url in found["kubernetes credentials"][1]
    )
    assert found["tasktracking crd"][0] == "fail"
    assert "kubectl apply -f manifests/crd" in str(found["tasktracking crd"][2])

    kube.crd_installed = True
    found = outcomes(await doctor(redis_url, resource="tracking"))
    assert found["tasktracking crd"][0] == "pass"
    assert (
        found["tasktracking resource"][0] == "warn"
        and "not found" in found["tasktracking resource"][1]
    )
    assert found["kubernetes rbac"][0] == "pass"

    body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "tracking"},
            "spec": {"archive": {"enabled": True, "bucket": "task-history"}}}  # fmt: skip
    await kube.create("default", body)
    kube.denied_access = {("patch", "tasktrackings/status")}
    report = await doctor(redis_url, resource="tracking")
    found = outcomes(report)
    assert found["tasktracking resource"][:2] == (
        "pass",
        "TaskTracking default/tracking found (archive on)",
    )
    outcome, message, fix = found["kubernetes rbac"]
    assert outcome == "fail" and message.endswith(": patch tasktrackings/status.alakai.io")
    assert fix is not None and "Role" in fix
    reviews = [r for r in kube.requests if r.path.endswith("/selfsubjectaccessreviews")]
    assert len(reviews) == 5 * 3  # every verb the sidecar needs, in each run


async def test_command_line_exit_codes_json_and_one_line_per_check(redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASK_TRACKING_")}
    env["PYTHONPATH"] = str(ROOT)
    env["TASK_TRACKING_DEV_DIR"] = "/nonexistent"

    def run(*args: str, **settings: str) -> subprocess.CompletedProcess[str]:
        variables = {f"TASK_TRACKING_{k.upper()}": v for k, v in settings.items()}
        return subprocess.run(
            [sys.executable, "-m", "sidecar", "doctor", *args],
            env={**env, **variables},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    good, unreachable, bad = await asyncio.gather(
        asyncio.to_thread(run, redis_url=redis_url),
        asyncio.to_thread(run, "--json", redis_url="redis://127.0.0.1:1/0"),
        asyncio.to_thread(run, redis_url="redis://h/0?bogus=1"),
    )
    assert good.returncode == 0, good.stdout + good.stderr
    lines = good.stdout.splitlines()
    assert lines[-1] == "all checks passed" and len(lines) == 7, good.stdout
    assert unreachable.returncode == 1, unreachable.stderr
    body = json.loads(unreachable.stdout)
    assert body["ok"] is False
    [redis_check] = [check for check in body["checks"] if check["name"] == "redis"]
    assert redis_check["outcome"] == "fail" and "127.0.0.1:1" in redis_check["message"]
    assert bad.returncode == 1 and "✗ settings: TASK_TRACKING_REDIS_URL=" in bad.stdout


async def test_on_a_cluster_the_stream_is_found_on_its_node_and_permissions_checked(
    tmp_path: Path,
) -> None:
    from tests.servers import RedisClusterServers

    cluster = RedisClusterServers(tmp_path / "cluster")
    try:
        cluster.run_on_all("ACL", "SETUSER", USER, "reset", "on", f">{PASSWORD}",
                           *LEAST_PRIVILEGE_ACL.split())  # fmt: skip
        found = outcomes(await doctor(cluster.url_as(USER, PASSWORD)))
        assert found["redis"][0] == "pass" and "(cluster)" in found["redis"][1], found
        assert found["redis permissions"][0] == "pass", found
        assert found["stream task-events:v1"][0] == "warn"  # absent, on whichever node
        cluster.run_on_all("ACL", "SETUSER", USER, "-xclaim")
        found = outcomes(await doctor(cluster.url_as(USER, PASSWORD)))
        assert found["redis permissions"][0] == "fail" and "XCLAIM" in found["redis permissions"][1]
    finally:
        cluster.stop()
