"""Footprint of `task-tracking run` in each configuration: idle RSS and CPU, time to ready,
and what it costs under load, next to the naive consumer's and Redis's own.

The configurations are what a pod can be given: neither S3 archival nor a resource watch;
S3 archival (moto's server); a TaskTracking resource watched (the tests' in-memory
Kubernetes API, run in a thread of this process); both.

    python -m bench.footprint          # the idle rows only, one line per configuration
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from bench.cases import Row
from bench.servers import MotoServer, proc_cpu_seconds, proc_rss_mib
from bench.workload import STREAM, encoded, prefill
from sidecar.devserver import DevServer, free_port

BUCKET = "footprint"
RESOURCE = "footprint"
# Idle RSS targets (issue #19), by configuration.
IDLE_TARGETS_MIB = {"plain": 48.0, "s3": None, "watch": None, "s3+watch": 64.0}
CONFIGURATIONS = ("plain", "s3", "watch", "s3+watch")


class KubeThread:
    """The tests' in-memory Kubernetes API (tests/kube/api.py) on its own event loop in a
    thread, holding one TaskTracking resource; `kubeconfig` points at it."""

    def __init__(self, folder: Path, spec: dict[str, Any]) -> None:
        self.kubeconfig = folder / "kubeconfig"
        self._spec = spec
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kube-api", daemon=True)

    def __enter__(self) -> KubeThread:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None or not self._ready.is_set():
            raise RuntimeError(f"the in-memory Kubernetes API did not start: {self._error}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by __enter__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        from tests.kube.api import KubeAPI

        self._stop = asyncio.Event()
        async with KubeAPI(namespaced_only=True) as api:
            api.write_kubeconfig(self.kubeconfig)
            await api.create(
                "default",
                {
                    "apiVersion": "alakai.io/v1alpha1",
                    "kind": "TaskTracking",
                    "metadata": {"name": RESOURCE, "namespace": "default"},
                    "spec": self._spec,
                },
            )
            self._ready.set()
            await self._stop.wait()


@contextlib.contextmanager
def configured(server: DevServer, moto: MotoServer, configuration: str) -> Iterator[dict[str, str]]:
    """The environment of `task-tracking run` in one configuration (and what it needs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASK_TRACKING_")}
    env.pop("KUBECONFIG", None)
    env.update(
        TASK_TRACKING_REDIS_URL=server.url,
        TASK_TRACKING_HTTP_PORT=str(free_port()),
        TASK_TRACKING_LOG_LEVEL="warning",
    )
    s3 = "s3" in configuration
    if s3:
        create_bucket(moto, BUCKET)
        env.update(
            AWS_ACCESS_KEY_ID=moto.access_key,
            AWS_SECRET_ACCESS_KEY=moto.secret_key,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL_S3=moto.url,
            TASK_TRACKING_S3_ARCHIVE_ENABLED="true",
            TASK_TRACKING_S3_BUCKET=BUCKET,
        )
    if "watch" not in configuration:
        yield env
        return
    spec: dict[str, Any] = {"archive": {"enabled": s3, "bucket": BUCKET, "prefix": "footprint"}}
    with (
        tempfile.TemporaryDirectory(prefix="footprint-") as folder,
        KubeThread(Path(folder), spec) as kube,
    ):
        env.update(
            KUBECONFIG=str(kube.kubeconfig),
            TASK_TRACKING_RESOURCE_NAME=RESOURCE,
            TASK_TRACKING_NAMESPACE="default",
        )
        yield env


def create_bucket(moto: MotoServer, bucket: str) -> None:
    """A bucket on moto's server (which takes an unsigned PUT), if absent."""
    request = urllib.request.Request(f"{moto.url}/{bucket}", method="PUT")
    with contextlib.suppress(urllib.error.HTTPError):  # 409: it exists already
        urllib.request.urlopen(request, timeout=10).close()


def start_sidecar(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], float]:
    """`task-tracking run`, and the seconds it took to answer /readyz with 200."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    port = int(env["TASK_TRACKING_HTTP_PORT"])
    while True:
        if process.poll() is not None:
            raise RuntimeError("the sidecar exited at start")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as reply:
                if reply.status == 200:
                    return process, time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.01)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def idle(pid: int, settle: float = 2.0, window: float = 10.0) -> tuple[float, float]:
    """RSS (MiB) and CPU (% of one core) of a process left idle for `window` seconds."""
    time.sleep(settle)
    cpu = proc_cpu_seconds(pid)
    time.sleep(window)
    return proc_rss_mib(pid), (proc_cpu_seconds(pid) - cpu) / window * 100


def rss_until_drained(server: DevServer, pid: int) -> float:
    """The process's peak RSS (MiB, sampled every 50 ms) until every group is drained."""
    client = redis.Redis(port=server.port)
    peak = 0.0
    while True:
        peak = max(peak, proc_rss_mib(pid))
        groups = client.xinfo_groups(STREAM)
        if groups and all(g["lag"] == 0 and g["pending"] == 0 for g in groups):
            return peak
        time.sleep(0.05)


def idle_rss(
    server: DevServer, moto: MotoServer, configuration: str, window: float = 1.0
) -> tuple[float, float, float]:
    """Idle RSS (MiB), idle CPU (% of a core) and seconds to ready in one configuration."""
    redis.Redis(port=server.port).flushall()
    with configured(server, moto, configuration) as env:
        process, ready = start_sidecar(env)
        try:
            rss, cpu = idle(process.pid, settle=2.0, window=window)
        finally:
            stop(process)
    return rss, cpu, ready


def rss_under_load(server: DevServer, moto: MotoServer, configuration: str, events: int) -> float:
    """Peak RSS (MiB) while the sidecar drains `events` pre-filled entries."""
    redis.Redis(port=server.port).flushall()
    with configured(server, moto, configuration) as env:
        process, _ = start_sidecar(env)
        try:
            prefill(server.port, encoded(events))
            return rss_until_drained(server, process.pid)
        finally:
            stop(process)


LABELS = {
    "plain": "neither S3 nor a resource watch",
    "s3": "S3 archival on",
    "watch": "a TaskTracking resource watched",
    "s3+watch": "S3 archival on and a resource watched",
}


def footprint(server: DevServer, moto: MotoServer, load_events: int, *, quick: bool) -> list[Row]:
    """The bench's footprint rows: idle RSS per configuration (naive consumer and Redis
    beside the first), time to ready, RSS under load with and without archival, idle CPU."""
    window = 3.0 if quick else 10.0
    rows: list[Row] = []
    idle_cpu = ready = 0.0
    for configuration in CONFIGURATIONS:
        rss, cpu, seconds = idle_rss(server, moto, configuration, window)
        row = Row(f"RSS idle, {LABELS[configuration]}", "MiB", rss)
        target = IDLE_TARGETS_MIB[configuration]
        if target is not None:
            row.target, row.met = f"<= {target:.0f} MiB", rss <= target
        if configuration == "plain":
            idle_cpu, ready = cpu, seconds
            row.naive, naive_cpu, naive_ready = _naive_idle(server, window)
            assert server.process is not None
            row.ceiling, redis_cpu = idle(server.process.pid, settle=0.0, window=window)
        rows.append(row)
    rows.insert(
        0,
        Row(
            "ready (start to /readyz 200)",
            "s",
            ready,
            naive_ready,
            target="<= 1.5 s",
            met=ready <= 1.5,
        ),
    )
    rows.append(
        Row(
            f"RSS under load ({load_events:,} events)",
            "MiB",
            rss_under_load(server, moto, "plain", load_events),
        )
    )
    rows.append(
        Row(
            f"RSS under load, S3 archival on ({load_events:,} events, default flush)",
            "MiB",
            rss_under_load(server, moto, "s3", load_events),
        )
    )
    rows.append(
        Row(
            "CPU idle",
            "% of a core",
            idle_cpu,
            naive_cpu,
            redis_cpu,
            target="<= 0.5%",
            met=idle_cpu <= 0.5,
        )
    )
    return rows


def _naive_idle(server: DevServer, window: float) -> tuple[float, float, float]:
    """The naive consumer's idle RSS, CPU and seconds to its group."""
    redis.Redis(port=server.port).flushall()
    started = time.perf_counter()
    baseline = subprocess.Popen(
        [sys.executable, "-m", "bench.naive", server.url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=server.port)
        while not client.exists(STREAM):  # the naive consumer creates its group first
            time.sleep(0.01)
        ready = time.perf_counter() - started
        rss, cpu = idle(baseline.pid, window=window)
    finally:
        stop(baseline)
    return rss, cpu, ready


def main() -> None:
    with DevServer("redis") as server:
        moto = MotoServer()
        try:
            for configuration in CONFIGURATIONS:
                rss, _, ready = idle_rss(server, moto, configuration)
                print(f"{configuration:10s} idle RSS {rss:6.1f} MiB, ready in {ready:.2f} s")
        finally:
            moto.stop()


if __name__ == "__main__":
    main()
