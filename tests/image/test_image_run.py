"""The image, built and run by a real Docker engine the way a hardened pod runs it.

Read-only root filesystem and no writable mount at all, a numeric non-root user, no
capabilities, no privilege escalation; host networking reaches the Redis server that the
tests started on a free loopback port.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from sidecar.devserver import free_port
from tests.conftest import MotoServer, s3_environment
from tests.kube.api import KubeAPI

from .conftest import HARDENED, BuiltImage, docker, measured

pytestmark = pytest.mark.slow

# Any installer, its library or a wheel of one: none may be in the runtime image.
INSTALLER = re.compile(
    r"(^|/)(pip|pip3[.\d]*|easy_install|wheel|ensurepip|setuptools|pkg_resources|_distutils_hack"
    r"|distutils-precedence)"
    r"($|/|-[^/]*\.(dist-info|egg-info|whl)|\.pth)"
)


def test_installer_pattern_finds_every_kind_of_installer_file() -> None:
    # The export check below must be able to fail.
    for path in (
        "usr/local/bin/pip",
        "usr/local/bin/pip3.11",
        "usr/local/lib/python3.11/site-packages/pip/__init__.py",
        "usr/local/lib/python3.11/site-packages/setuptools-65.5.1.dist-info/METADATA",
        "usr/local/lib/python3.11/site-packages/distutils-precedence.pth",
        "usr/local/lib/python3.11/ensurepip/_bundled/pip-24.0-py3-none-any.whl",
        "usr/share/python-wheels/wheel-0.38.4-py3-none-any.whl",
        "opt/venv/lib/python3.11/site-packages/_distutils_hack/__init__.py",
    ):
        assert INSTALLER.search(path), path
    for path in ("usr/lib/python3.11/pipes.py", "opt/venv/bin/task-tracking", "usr/bin/pipx-like"):
        assert not INSTALLER.search(path), path


def hardened_run(image: BuiltImage, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """`docker run` arguments: the hardening, host networking, and the given environment."""
    flags = [f"--env={name}={value}" for name, value in (env or {}).items()]
    return ["run", *HARDENED, "--network", "host", *flags, *args]


@pytest.fixture
def container_name() -> Iterator[str]:
    name = f"task-tracking-test-{os.getpid()}-{time.monotonic_ns()}"
    yield name
    docker("rm", "--force", name, check=False)


def wait_ready(port: int, name: str, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                assert r.status == 200
                body: dict[str, object] = json.load(r)
                return body
        except (OSError, urllib.error.HTTPError):
            state = docker("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            if state != "running":
                logs = docker("logs", name, check=False)
                pytest.fail(
                    f"container {state} before ready: {(logs.stdout + logs.stderr)[-3000:]}"
                )
            assert time.monotonic() < deadline, f"/readyz not 200 within {timeout} s"
            time.sleep(0.2)


def test_hardened_container_serves_readyz_projects_archives_and_stops_cleanly(
    image: BuiltImage, redis_url: str, s3: MotoServer, container_name: str
) -> None:
    port = free_port()
    s3.client().create_bucket(Bucket="task-history")
    env = {
        "TASK_TRACKING_REDIS_URL": redis_url,
        "TASK_TRACKING_HTTP_PORT": str(port),
        "TASK_TRACKING_S3_ARCHIVE_ENABLED": "true",
        "TASK_TRACKING_S3_BUCKET": "task-history",
        "TASK_TRACKING_ARCHIVE_FLUSH_MAX_AGE_SECONDS": "1",
        **s3_environment(s3),
    }
    docker(*hardened_run(image, "--detach", "--name", container_name, image.tag, env=env))
    assert wait_ready(port, container_name) == {"ok": True}

    # The CLI in the same image, hardened the same way, publishes; the sidecar projects.
    emitted = docker(
        *hardened_run(image, "--rm", image.tag, env=env),
        "emit",
        "--execution-id",
        "exec-image-1",
        "--task",
        "deploy",
        "--project",
        "my-org/my-repo",
        "--status",
        "success",
        timeout=60,
    )
    assert "Traceback" not in emitted.stderr, emitted.stderr
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        deadline = time.monotonic() + 30
        while client.hget("task-tracking:execution:exec-image-1", "status") != "success":
            assert time.monotonic() < deadline, "the emitted event was not projected in 30 s"
            time.sleep(0.1)
        assert client.zscore("task-tracking:project:my-org/my-repo:executions", "exec-image-1")
    finally:
        client.close()
    # The archiver writes to S3 from the read-only container too (no spool file anywhere).
    bucket = s3.client()
    deadline = time.monotonic() + 30
    while True:
        listed = bucket.list_objects_v2(Bucket="task-history", Prefix="task-tracking/my-org/")
        keys = [item["Key"] for item in listed.get("Contents", ())]
        if keys:
            break
        assert time.monotonic() < deadline, "nothing archived in 30 s"
        time.sleep(0.2)
    (key,) = keys
    line = bucket.get_object(Bucket="task-history", Key=key)["Body"].read().decode()
    assert json.loads(line)["executionId"] == "exec-image-1"

    started = time.monotonic()
    docker("stop", "--time", "10", container_name, timeout=30)
    took = time.monotonic() - started
    measured(f"docker stop of the hardened sidecar: {took:.2f} s (grace period 10 s)")
    state = json.loads(docker("inspect", "--format", "{{json .State}}", container_name).stdout)
    logs = docker("logs", container_name)
    assert state["ExitCode"] == 0, (logs.stdout + logs.stderr)[-3000:]
    assert not state["OOMKilled"]
    assert "Traceback" not in logs.stdout + logs.stderr


@pytest.mark.parametrize(
    ("env", "line"),
    [
        # No URL: the path that probed for a temp dir at import and crashed read-only.
        ({}, "task-tracking: TASK_TRACKING_REDIS_URL is required: set it"),
        (
            {"TASK_TRACKING_REDIS_URL": "redis://127.0.0.1:1/0", "TASK_TRACKING_HTTP_PORT": "x"},
            "task-tracking: TASK_TRACKING_HTTP_PORT='x' is invalid",
        ),
        ({"TASK_TRACKING_REDIS_URL": "redis://127.0.0.1:1/0?bogus=1"}, "task-tracking: "),
    ],
    ids=["missing-redis-url", "bad-http-port", "unknown-url-option"],
)
def test_a_bad_environment_prints_one_line_and_exits_2(
    image: BuiltImage, env: dict[str, str], line: str
) -> None:
    for command in (["run"], ["status", "exec-1"]):
        result = docker(*hardened_run(image, "--rm", image.tag, env=env), *command, check=False)
        lines = (result.stdout + result.stderr).strip().splitlines()
        assert result.returncode == 2, lines
        assert len(lines) == 1 and lines[0].startswith(line), lines


def test_runtime_image_holds_no_installer_nor_build_argument(image: BuiltImage) -> None:
    created = docker("create", image.tag).stdout.strip()
    try:
        export = subprocess.Popen(["docker", "export", created], stdout=subprocess.PIPE)
        assert export.stdout is not None
        with tarfile.open(fileobj=export.stdout, mode="r|") as tar:
            names = [member.name for member in tar]
        assert export.wait(timeout=300) == 0
    finally:
        docker("rm", created, check=False)
    assert any(name.startswith("opt/venv/") for name in names)
    found = sorted({n for n in names if INSTALLER.search(n)})
    assert not found, f"installers left in the runtime image: {found[:20]}"

    # The builder's arguments (index, certificate authorities) stay in the builder.
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image.tag).stdout
    assert "CA_BUNDLE" not in history and "BEGIN CERTIFICATE" not in history
    config = json.loads(
        docker("image", "inspect", "--format", "{{json .Config}}", image.tag).stdout
    )
    assert not [e for e in config["Env"] if e.startswith(("PIP_", "CA_BUNDLE"))], config["Env"]

    no_pip = docker(
        "run", "--rm", *HARDENED, "--network", "none", "--entrypoint", "python", image.tag,
        "-c", "import pip", check=False,
    )  # fmt: skip
    assert no_pip.returncode == 1 and "No module named 'pip'" in no_pip.stderr


def test_image_carries_oci_labels_and_runs_as_the_charts_user(image: BuiltImage) -> None:
    config = json.loads(
        docker("image", "inspect", "--format", "{{json .Config}}", image.tag).stdout
    )
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == image.version
    assert labels["org.opencontainers.image.revision"] == image.revision
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["task-tracking"] and config["Cmd"] == ["run"]


def test_every_module_imports_and_every_command_helps_without_a_writable_filesystem(
    image: BuiltImage,
) -> None:
    # An import-time probe (a temp dir, a cache folder, a config file written) fails here.
    imports = (
        "import importlib, pkgutil, sidecar\n"
        "names = [m.name for m in pkgutil.walk_packages(sidecar.__path__, 'sidecar.')]\n"
        "[importlib.import_module(n) for n in names if n != 'sidecar.__main__']\n"
        "print(len(names))"
    )
    result = docker(
        "run", "--rm", *HARDENED, "--network", "none", "--entrypoint", "python", image.tag,
        "-c", imports, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout) >= 20
    version = docker("run", "--rm", *HARDENED, "--network", "none", image.tag, "--version")
    assert version.stdout.strip() == f"task-tracking {image.version}"
    for command in ("run", "dev", "emit", "status", "list", "replay", "doctor"):
        helped = docker(
            "run", "--rm", *HARDENED, "--network", "none", image.tag, command, "--help", check=False
        )
        assert helped.returncode == 0 and "usage: task-tracking" in helped.stdout, helped.stderr


async def test_hardened_container_follows_a_tasktracking_resource(
    image: BuiltImage, redis_url: str, s3: MotoServer, tmp_path: Path, container_name: str
) -> None:
    # kopf in the read-only container: watches the resource, reports its own status part.
    s3.client().create_bucket(Bucket="from-resource")
    async with KubeAPI() as api:
        api.ensure_namespace("apps")
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", namespace="apps")
        kubeconfig.chmod(0o644)  # readable by UID 10001 through the read-only bind mount
        await api.create("apps", TASK_TRACKING_RESOURCE)
        env = {
            "TASK_TRACKING_REDIS_URL": redis_url,
            "TASK_TRACKING_HTTP_PORT": str(free_port()),
            "TASK_TRACKING_RESOURCE_NAME": "task-tracking",
            "TASK_TRACKING_NAMESPACE": "apps",
            "TASK_TRACKING_REDIS_CONSUMER_NAME": "pod-a",
            "KUBECONFIG": "/kube/config",
            **s3_environment(s3),
        }
        mount = f"--volume={kubeconfig}:/kube/config:ro"
        run = hardened_run(image, "--detach", "--name", container_name, mount, image.tag, env=env)
        await asyncio.to_thread(docker, *run)

        deadline = time.monotonic() + 60
        while True:
            status = (api.get("apps", "task-tracking") or {}).get("status", {})
            if status.get("sidecars", {}).get("pod-a", {}).get("archiving"):
                break
            if time.monotonic() > deadline:
                logs = await asyncio.to_thread(docker, "logs", container_name, check=False)
                pytest.fail(f"no archiving status in 60 s: {status}; {logs.stderr[-3000:]}")
            await asyncio.sleep(0.2)

        await asyncio.to_thread(docker, "stop", "--time", "10", container_name, timeout=30)
        state = await asyncio.to_thread(
            docker, "inspect", "--format", "{{.State.ExitCode}}", container_name
        )
        logs = await asyncio.to_thread(docker, "logs", container_name)
        assert state.stdout.strip() == "0", logs.stderr[-3000:]
        assert "Traceback" not in logs.stdout + logs.stderr


TASK_TRACKING_RESOURCE = {
    "apiVersion": "alakai.io/v1alpha1",
    "kind": "TaskTracking",
    "metadata": {"name": "task-tracking"},
    "spec": {"archive": {"enabled": True, "bucket": "from-resource"}},
}
