"""A real Prometheus scraping a running sidecar: the figures it stores, and an alert's state.

Prometheus (Debian's package) runs with a static scrape config on loopback, a 1 s scrape
and evaluation interval and its own storage folder; the sidecar runs in-process, so a test
can stop its projector while events keep arriving. The rules are the chart's, rendered by
Helm, with `for:` shortened to seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from sidecar.devserver import free_port
from tests.chart.conftest import CHART
from tests.helpers import (
    ARCHIVER,
    PROJECTOR,
    STREAM,
    event,
    group_done,
    group_read_all,
    publish,
    running_sidecar,
    wait_for,
)
from tests.prometheus import alerts_of, binary, rendered_rule_groups

NS = "apps"
POD = "app-1"
LAG_THRESHOLD = 20
# Labelled by a value known only when it happens (the S3 error code), so no series exists
# before the first failure. Known gap: increase() needs two samples, so the first failure
# of a reason is not counted by TaskTrackingArchiveFailures (a later one is).
FIRST_SERIES_ON_FIRST_EVENT = {"task_tracking_archive_failures_total"}


class Prometheus:
    """`prometheus` on a free loopback port, scraping one target every second."""

    def __init__(self, folder: Path, target_port: int, groups: list[dict[str, Any]]) -> None:
        self.folder = folder
        folder.mkdir()
        (folder / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": ["rules.yaml"],
            "scrape_configs": [
                {
                    "job_name": "task-tracking",
                    "static_configs": [
                        {
                            "targets": [f"127.0.0.1:{target_port}"],
                            # What the chart's ServiceMonitor/PodMonitor attach in a cluster.
                            "labels": {"namespace": NS, "pod": POD},
                        }
                    ],
                }
            ],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    binary("prometheus"),
                    f"--config.file={self.folder / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=log,
            )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(self.url + path + query, timeout=5) as response:
            return json.loads(response.read())

    async def api(self, path: str, **params: str) -> Any:
        body = await asyncio.to_thread(self.get, path, **params)
        assert body["status"] == "success", body
        return body["data"]

    async def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log()}")
        try:
            await asyncio.to_thread(urllib.request.urlopen, self.url + "/-/ready", timeout=2)
        except OSError:
            return False
        return True

    async def vector(self, query: str) -> dict[str, float]:
        """group label -> value of an instant query."""
        data = await self.api("/api/v1/query", query=query)
        return {item["metric"].get("group", ""): float(item["value"][1]) for item in data["result"]}

    async def target_up(self) -> bool:
        data = await self.api("/api/v1/targets")
        return any(t["health"] == "up" for t in data["activeTargets"])


@contextlib.contextmanager
def prometheus(
    folder: Path, target_port: int, groups: list[dict[str, Any]]
) -> Iterator[Prometheus]:
    server = Prometheus(folder, target_port, groups)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def shortened(groups: list[dict[str, Any]], seconds: int = 2) -> list[dict[str, Any]]:
    """The rules with every `for:` of more than `seconds` cut to it."""
    for group in groups:
        for rule in group["rules"]:
            if rule.get("for") not in (None, "0m", "0s"):
                rule["for"] = f"{seconds}s"
    return groups


async def xinfo_lag(client: aioredis.Redis) -> dict[str, int]:
    return {g["name"].decode(): int(g["lag"]) for g in await client.xinfo_groups(STREAM)}


@contextlib.asynccontextmanager
async def sidecar_with_archival(redis_url: str, folder: Path) -> AsyncIterator[Any]:
    # Archival on (to a folder) so both groups consume and are reported.
    async with running_sidecar(
        redis_url,
        http_host="127.0.0.1",
        s3_archive_enabled=True,
        archive_sink="folder",
        archive_folder=folder,
    ) as sidecar:
        await wait_for(lambda: sidecar.projector_runner.ready.is_set(), message="projector")
        yield sidecar


async def test_prometheus_stores_each_groups_lag_as_the_stream_reports_it(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    async with sidecar_with_archival(redis_url, tmp_path / "archive") as sidecar:
        groups = shortened(rendered_rule_groups())
        with prometheus(tmp_path / "prometheus", sidecar.http_port, groups) as server:
            await wait_for(server.ready, timeout=30, message=f"prometheus ready\n{server.log()}")
            await wait_for(server.target_up, timeout=30, message="the sidecar scraped, up")

            # Both groups consume: 0 and 0. Then the projector stops and 40 events arrive.
            await publish(redis_client, STREAM, [event(f"warm-{i}") for i in range(5)])
            await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR), message="warm")
            await sidecar.projector_runner.stop()
            await wait_for(lambda: sidecar._tasks["projector"].done(), message="projector stopped")
            await publish(redis_client, STREAM, [event(f"exec-{i}") for i in range(40)])
            await wait_for(lambda: group_read_all(redis_client, STREAM, ARCHIVER), message="read")
            stream = await xinfo_lag(redis_client)
            assert stream == {PROJECTOR: 40, ARCHIVER: 0}, stream

            last: dict[str, float] = {}

            async def prometheus_agrees() -> bool:
                last.update(await server.vector("task_tracking_consumer_group_lag"))
                return last == {PROJECTOR: 40.0, ARCHIVER: 0.0}

            await wait_for(
                prometheus_agrees, timeout=30, message=f"Prometheus's lag = XINFO's {stream}"
            )
            labelled = await server.api(
                "/api/v1/query", query=f'task_tracking_consumer_group_lag{{group="{PROJECTOR}"}}'
            )
            (series,) = labelled["result"]
            assert series["metric"]["namespace"] == NS and series["metric"]["pod"] == POD
            await dashboard_and_alert_metrics_are_scraped(server)


async def dashboard_and_alert_metrics_are_scraped(server: Prometheus) -> None:
    """Every task_tracking_* metric the chart's dashboard and alerts query has a series."""
    dashboard = (CHART / "dashboards" / "task-tracking.json").read_text()
    used = set(re.findall(r"task_tracking_[a-z_]+", dashboard))
    for rule in alerts_of(rendered_rule_groups()).values():
        used |= set(re.findall(r"task_tracking_[a-z_]+", rule["expr"]))
    data = await server.api("/api/v1/label/__name__/values")
    stored = {name for name in data if name.startswith("task_tracking_")}
    assert used, "no metric found in the dashboard and alerts"
    assert used - FIRST_SERIES_ON_FIRST_EVENT <= stored, (
        f"queried but never scraped: {sorted(used - FIRST_SERIES_ON_FIRST_EVENT - stored)}"
    )


async def test_lag_alert_fires_for_the_stopped_projector_while_events_keep_arriving(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    async with sidecar_with_archival(redis_url, tmp_path / "archive") as sidecar:
        groups = shortened(
            rendered_rule_groups({"prometheusRule": {"lagThreshold": LAG_THRESHOLD}})
        )
        with prometheus(tmp_path / "prometheus", sidecar.http_port, groups) as server:
            await wait_for(server.ready, timeout=30, message=f"prometheus ready\n{server.log()}")
            await wait_for(server.target_up, timeout=30, message="the sidecar scraped, up")
            await sidecar.projector_runner.stop()

            async def keep_publishing() -> None:  # 10 events every 0.2 s, at most 60 s
                for i in range(300):
                    await publish(redis_client, STREAM, [event(f"e-{i}-{j}") for j in range(10)])
                    await asyncio.sleep(0.2)

            publisher = asyncio.create_task(keep_publishing())
            firing: list[dict[str, Any]] = []

            async def lag_alert_firing() -> bool:
                alerts = (await server.api("/api/v1/alerts"))["alerts"]
                firing[:] = [a for a in alerts if a["state"] == "firing"]
                return any(
                    a["labels"]["alertname"] == "TaskTrackingConsumerGroupLagGrowing"
                    for a in firing
                )

            try:
                await wait_for(lag_alert_firing, timeout=45, message="the lag alert firing")
            finally:
                publisher.cancel()
            lag_alerts = [
                a
                for a in firing
                if a["labels"]["alertname"] == "TaskTrackingConsumerGroupLagGrowing"
            ]
            # Only the stopped group alerts; the archiver keeps up.
            assert [a["labels"]["group"] for a in lag_alerts] == [PROJECTOR], lag_alerts
            (alert,) = lag_alerts
            assert alert["labels"]["namespace"] == NS
            assert float(alert["value"]) > LAG_THRESHOLD
            assert alert["annotations"]["summary"] == (
                f"Consumer group {PROJECTOR} in {NS} falls behind the task-events stream."
            )
            lag = await xinfo_lag(redis_client)
            assert lag[PROJECTOR] > LAG_THRESHOLD and lag[ARCHIVER] < LAG_THRESHOLD, lag


@pytest.fixture(autouse=True)
def _binaries_present() -> None:
    binary("prometheus")  # fails, naming the package, before any server starts
