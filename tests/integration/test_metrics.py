"""The metrics, scraped over HTTP from /metrics and parsed with prometheus-client's parser,
after known scenarios: every value must match what happened."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import ArchiveConfig
from sidecar.metrics import Metrics
from tests.conftest import MotoServer
from tests.helpers import (
    ARCHIVER,
    PROJECTOR,
    STREAM,
    archive_objects_folder,
    archive_objects_s3,
    event,
    group_done,
    group_read_all,
    publish,
    running_sidecar,
    wait_for,
)
from tests.kube.api import KubeAPI

CHART = Path(__file__).resolve().parents[2] / "charts" / "task-tracking"
T0 = 1_773_568_800_000  # 2026-03-15T10:00:00Z
DAY = 86_400_000

INVALID = [
    b"not json",
    orjson.dumps(event("bad-1", project="../x")),
    orjson.dumps({**event("bad-2"), "status": "done"}),
    (("other", "field"),),  # an entry without an `event` field
]


class Scrape:
    """One /metrics scrape: sample name + labels -> value, and the families' types."""

    def __init__(self, text: str) -> None:
        self.families = list(text_string_to_metric_families(text))
        self.samples = [s for family in self.families for s in family.samples]

    def get(self, name: str, **labels: str) -> float | None:
        """The sample `name` whose labels include `labels`; None when there is none."""
        found = [
            s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items()
        ]
        assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
        return found[0] if found else None

    def series(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]

    def exposed_names(self) -> set[str]:
        """Every series name a PromQL query may use: counters get `_total`, histograms
        `_bucket`/`_sum`/`_count`, whether or not a labelled child exists yet."""
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",),
        }
        names = {s.name for s in self.samples}
        for family in self.families:
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        return names


async def scrape(sidecar: Any) -> Scrape:
    url = f"http://127.0.0.1:{sidecar.http_port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return Scrape(await response.text())


async def until_scrape(sidecar: Any, check: Any, message: str, timeout: float = 20) -> Scrape:
    """Scrape until `check(scrape)` holds; returns that scrape."""
    last: list[Scrape] = []

    async def holds() -> bool:
        last[:] = [await scrape(sidecar)]
        return bool(check(last[0]))

    await wait_for(holds, timeout=timeout, message=message)
    return last[0]


async def test_lag_of_a_stopped_projector_is_the_events_added_also_when_redis_cannot_say(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with running_sidecar(redis_url) as sidecar:
        await publish(redis_client, STREAM, [event(f"l{n}", "success") for n in range(5)])
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR), message="projected")
        await sidecar.projector_runner.stop()
        await wait_for(lambda: sidecar._tasks["projector"].done(), message="projector stopped")

        ids = await publish(redis_client, STREAM, [event(f"m{n}", "success") for n in range(7)])
        after = await until_scrape(
            sidecar,
            lambda s: s.get("task_tracking_consumer_group_lag", group=PROJECTOR) == 7,
            "lag 7",
        )
        assert after.get("task_tracking_consumer_group_pending", group=PROJECTOR) == 0
        assert after.get("task_tracking_oldest_pending_age_seconds", group=PROJECTOR) == 0
        assert after.get("task_tracking_stream_length") == 12
        assert after.get("task_tracking_events_read_total", group=PROJECTOR) == 5
        assert after.get("task_tracking_events_applied_total", group=PROJECTOR) == 5

        # An entry deleted after the group's position: Redis answers nil for the lag,
        # the sampler counts the entries itself.
        await redis_client.xdel(STREAM, ids[3])
        (info,) = await redis_client.xinfo_groups(STREAM)
        assert info["lag"] is None
        await until_scrape(
            sidecar,
            lambda s: s.get("task_tracking_consumer_group_lag", group=PROJECTOR) == 6,
            "lag 6 counted without Redis",
        )


async def test_counters_and_histograms_match_a_run_with_invalid_stale_and_valid_events(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    two_hours_ago = int(time.time() * 1000) - 2 * 3600 * 1000
    valid = [
        event("a", "success", two_hours_ago + 2000),
        event("a", "in_progress", two_hours_ago + 1000),  # older than the projection: stale
        event("b", "in_progress", two_hours_ago),
        event("a", "success", two_hours_ago + 2000, event_id="aaa"),  # same key but id: stale
    ]
    async with running_sidecar(redis_url, redis_batch_size=3) as sidecar:
        await publish(redis_client, STREAM, [*valid[:2], *INVALID, *valid[2:]])
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR), message="projected")
        after = await until_scrape(
            sidecar,
            lambda s: (
                s.get("task_tracking_dead_letter_length") == len(INVALID)
                and s.get("task_tracking_consumer_group_lag", group=PROJECTOR) == 0
            ),
            "dead-letter length and lag sampled after the drain",
        )
    group = {"group": PROJECTOR}
    assert after.get("task_tracking_events_dead_lettered_total", **group) == len(INVALID)
    assert after.get("task_tracking_events_read_total", **group) == 8
    assert after.get("task_tracking_events_applied_total", **group) == 2
    assert after.get("task_tracking_events_stale_total", **group) == 2
    for histogram in (
        "task_tracking_end_to_end_latency_seconds",
        "task_tracking_event_age_seconds",
    ):
        assert after.get(f"{histogram}_count", **group) == len(valid)
        assert after.get(f"{histogram}_bucket", le="+Inf", **group) == len(valid)
    # occurredAt two hours back, entries just added: ages in (1 h, 4 h], latencies small
    age = "task_tracking_event_age_seconds_bucket"
    assert after.get(age, le="3600.0", **group) == 0
    assert after.get(age, le="14400.0", **group) == len(valid)
    latency = "task_tracking_end_to_end_latency_seconds_bucket"
    assert after.get(latency, le="10.0", **group) == len(valid)
    assert after.get("task_tracking_batch_size_sum", **group) == 8
    assert after.get("task_tracking_batch_size_count", **group) >= 3  # batches of at most 3
    assert after.get("task_tracking_consumer_group_lag", **group) == 0
    assert after.get("task_tracking_redis_connected", **group) == 1
    assert after.get("task_tracking_redis_reconnects_total", **group) == 0  # there from the start
    assert after.get("task_tracking_ready") == 1
    assert after.get("task_tracking_build_info") == 1


async def test_mixed_run_shows_both_groups_dead_letters_latency_and_archive_state(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    folder = tmp_path / "archive"
    valid = [
        event(f"x{n}", "success", T0 + (n % 2) * DAY + n, project=f"org{n % 3}/repo")
        for n in range(30)
    ]
    async with running_sidecar(
        redis_url,
        s3_archive_enabled=True,
        archive_sink="folder",
        archive_folder=folder,
        archive_flush_max_age_seconds=3600,  # the archiver holds everything until switched off
    ) as sidecar:
        await publish(redis_client, STREAM, [*valid, *INVALID])
        await wait_for(lambda: group_done(redis_client, STREAM, PROJECTOR), message="projected")
        await wait_for(lambda: group_read_all(redis_client, STREAM, ARCHIVER), message="read")

        # during: the archiver holds every valid event pending, the projector nothing
        during = await until_scrape(
            sidecar,
            lambda s: (
                s.get("task_tracking_consumer_group_pending", group=ARCHIVER) == len(valid)
                and s.get("task_tracking_dead_letter_length") == len(INVALID)
            ),
            "archiver pending sampled",
        )
        assert during.get("task_tracking_consumer_group_lag", group=PROJECTOR) == 0
        assert during.get("task_tracking_consumer_group_pending", group=PROJECTOR) == 0
        assert during.get("task_tracking_consumer_group_lag", group=ARCHIVER) == 0
        assert during.get("task_tracking_oldest_pending_age_seconds", group=ARCHIVER) > 0
        assert during.get("task_tracking_events_dead_lettered_total", group=PROJECTOR) == 4
        assert during.get("task_tracking_events_invalid_skipped_total", group=ARCHIVER) == 4
        assert during.get("task_tracking_archive_enabled", bucket=str(folder)) == 1
        assert during.get("task_tracking_archive_objects_total") == 0
        assert during.get("task_tracking_end_to_end_latency_seconds_count", group=PROJECTOR) == 30

        # after: switching archival off flushes everything, then the gauge reads 0; the
        # archiver group's figures stay, marked inactive (a backlog while off is visible)
        assert await sidecar.apply_archive_target(ArchiveConfig(enabled=False)) is None
        after = await until_scrape(
            sidecar,
            lambda s: s.get("task_tracking_consumer_group_active", group=ARCHIVER) == 0,
            "archiver group marked inactive while archival is off",
        )
        await publish(redis_client, STREAM, [event("while-off", "success")])
        off = await until_scrape(
            sidecar,
            lambda s: s.get("task_tracking_consumer_group_lag", group=ARCHIVER) == 1,
            "the archiver group's lag grows while archival is off",
        )
        assert off.get("task_tracking_consumer_group_active", group=PROJECTOR) == 1
        assert off.get("task_tracking_consumer_group_lag", group=PROJECTOR) == 0
    objects = archive_objects_folder(folder)
    assert len(objects) == 6  # 3 projects x 2 days
    assert after.get("task_tracking_archive_objects_total") == len(objects)
    assert after.get("task_tracking_archive_bytes_total") == sum(map(len, objects.values()))
    assert after.get("task_tracking_archive_upload_seconds_count") == len(objects)
    assert after.get("task_tracking_archive_failures_total") is None  # no reason seen
    assert after.get("task_tracking_events_applied_total", group=ARCHIVER) == len(valid)
    assert after.get("task_tracking_end_to_end_latency_seconds_count", group=ARCHIVER) == 30
    assert sum(s.value for s in after.samples if s.name == "task_tracking_archive_enabled") == 0
    assert sorted(after.series("task_tracking_consumer_group_lag"), key=str) == sorted(
        [{"group": PROJECTOR}, {"group": ARCHIVER}], key=str
    )


async def test_archive_failures_by_reason_and_ready_gauge_without_readyz_calls(
    redis_url: str, redis_client: aioredis.Redis, s3: MotoServer
) -> None:
    async with running_sidecar(
        redis_url, s3_archive_enabled=True, s3_bucket="not-yet", archive_flush_max_age_seconds=0.5
    ) as sidecar:
        # Nobody calls /readyz here: the gauge follows readiness on the sampler's timer.
        failing = await until_scrape(
            sidecar,
            lambda s: (
                (s.get("task_tracking_archive_failures_total", reason="NoSuchBucket") or 0) >= 1
                and s.get("task_tracking_ready") == 0
            ),
            "a failure counted and not ready",
        )
        assert failing.get("task_tracking_archive_enabled", bucket="not-yet") == 1
        s3.client().create_bucket(Bucket="not-yet")
        await until_scrape(sidecar, lambda s: s.get("task_tracking_ready") == 1, "ready", 30)
        await publish(redis_client, STREAM, [event(f"f{n}", "success", T0) for n in range(10)])
        after = await until_scrape(
            sidecar,
            lambda s: (
                s.get("task_tracking_archive_objects_total") == 1
                and s.get("task_tracking_consumer_group_pending", group=ARCHIVER) == 0
            ),
            "archived",
        )
    objects = archive_objects_s3(s3.client(), "not-yet")
    assert len(objects) == 1
    assert after.get("task_tracking_archive_bytes_total") == sum(map(len, objects.values()))


async def test_resource_generation_and_archive_gauge_follow_the_custom_resource(
    api: KubeAPI, redis_url: str, s3: MotoServer
) -> None:
    s3.client().create_bucket(Bucket="tt-archive")
    body = {
        "apiVersion": "alakai.io/v1alpha1",
        "kind": "TaskTracking",
        "metadata": {"name": "tt"},
        "spec": {"archive": {"enabled": True, "bucket": "tt-archive"}},
    }

    def state(generation: int, bucket: str | None) -> Any:
        def check(s: Scrape) -> bool:
            enabled = {
                x.labels["bucket"]: x.value
                for x in s.samples
                if x.name == "task_tracking_archive_enabled"
            }
            on = {name for name, value in enabled.items() if value == 1}
            wanted = {bucket} if bucket else set()
            return s.get("task_tracking_resource_generation") == generation and on == wanted

        return check

    async with running_sidecar(redis_url, resource_name="tt", namespace="apps") as sidecar:
        await until_scrape(sidecar, state(0, None), "no resource yet")
        await api.create("apps", body)
        await until_scrape(sidecar, state(1, "tt-archive"), "generation 1 archiving")
        await api.patch_spec("apps", "tt", {"archive": {"enabled": False}})
        await until_scrape(sidecar, state(2, None), "generation 2: archival off, gauge 0")
        # a refused spec (no such bucket) keeps the last applied generation
        await api.patch_spec("apps", "tt", {"archive": {"enabled": True, "bucket": "missing-b"}})
        await wait_for(lambda: "lastError" in str(api.get("apps", "tt")), message="refused")
        assert (await scrape(sidecar)).get("task_tracking_resource_generation") == 2
        await api.delete("apps", "tt")
        await until_scrape(sidecar, state(0, None), "deleted: back to the environment")


def referenced_metrics() -> set[str]:
    """Every task_tracking_* series name the PrometheusRule and the dashboard query."""
    rule = (CHART / "templates" / "prometheusrule.yaml").read_text()
    exprs = [rule]
    dashboard = json.loads((CHART / "dashboards" / "task-tracking.json").read_text())
    exprs += [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [v.get("definition", "") for v in dashboard["templating"]["list"]]
    return set(re.findall(r"\btask_tracking_[a-z_]+[a-z]", " ".join(exprs)))


async def test_every_metric_the_alerts_and_dashboard_use_is_in_a_real_scrape(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    referenced = referenced_metrics()
    assert {
        "task_tracking_consumer_group_lag",
        "task_tracking_events_dead_lettered_total",
        "task_tracking_end_to_end_latency_seconds_bucket",
        "task_tracking_archive_failures_total",
        "task_tracking_ready",
    } <= referenced
    async with running_sidecar(
        redis_url,
        s3_archive_enabled=True,
        archive_sink="folder",
        archive_folder=tmp_path / "archive",
        archive_flush_max_age_seconds=0.2,
    ) as sidecar:
        await publish(redis_client, STREAM, [event("s1", "success", T0), b"not json"])
        scraped = await until_scrape(
            sidecar,
            lambda s: (
                s.get("task_tracking_archive_objects_total") == 1
                and s.get("task_tracking_consumer_group_lag", group=ARCHIVER) == 0
            ),
            "archived and sampled",
        )
    missing = referenced - scraped.exposed_names()
    assert not missing, f"queried by the chart but not exposed: {sorted(missing)}"


async def test_ready_means_the_lag_figures_are_there_and_process_metrics_are_exported(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    await publish(redis_client, STREAM, [event(f"r{n}", "success") for n in range(10)])
    async with running_sidecar(redis_url) as sidecar:
        await wait_for(lambda: not sidecar.readiness_problems(), message="ready")
        # scraped right after readiness turned true: the figures of a first sample
        first = await scrape(sidecar)
        assert first.get("task_tracking_consumer_group_lag", group=PROJECTOR) is not None
        assert first.get("task_tracking_consumer_group_active", group=PROJECTOR) == 1
        assert first.get("process_resident_memory_bytes") > 0
        assert first.get("process_open_fds") > 0
        assert first.get("process_start_time_seconds") > 0
        assert first.get("python_info", implementation="CPython") == 1


def test_metrics_are_rendered_at_most_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar import metrics as metrics_module

    clock = [1000.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: clock[0])
    metrics = Metrics()
    before = metrics.exposition()
    metrics.read.labels("g").inc(5)
    assert metrics.exposition() is before  # a scrape storm gets the cached bytes
    clock[0] += metrics_module.EXPOSITION_TTL_SECONDS
    assert b'task_tracking_events_read_total{group="g"} 5.0' in metrics.exposition()
