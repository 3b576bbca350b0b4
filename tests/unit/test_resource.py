"""The TaskTracking resource's domain without kopf or an API server: how a spec overlays the
environment, when a generation is applied, and the status patch a sidecar writes."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from sidecar.config import ArchiveConfig, FlushPolicy, RetentionConfig, load_settings
from sidecar.resource import (
    ArchiveState,
    InvalidSpecError,
    SpecGeneration,
    merge_status,
    parse_spec,
    status_content,
)

NOW = datetime.datetime(2026, 12, 1, 12, 0, 0, tzinfo=datetime.UTC)
ENVIRONMENT = {
    "TASK_TRACKING_REDIS_URL": "redis://localhost:6379/0",
    "TASK_TRACKING_S3_ARCHIVE_ENABLED": "true",
    "TASK_TRACKING_S3_BUCKET": "env-bucket",
    "TASK_TRACKING_S3_PREFIX": "env-prefix",
    "TASK_TRACKING_S3_REGION": "eu-west-1",
    "TASK_TRACKING_S3_ENDPOINT_URL": "http://minio:9000",
    "TASK_TRACKING_ARCHIVE_FLUSH_MAX_EVENTS": "7",
    "TASK_TRACKING_ARCHIVE_FLUSH_MAX_AGE_SECONDS": "2",
    "TASK_TRACKING_ARCHIVE_CONDITIONAL_WRITES": "check_before_write",
    "TASK_TRACKING_PROJECTION_TTL_SECONDS": "600",
    "TASK_TRACKING_PROJECT_INDEX_MAX_SIZE": "50",
}


def overlaid(spec: dict[str, Any], env: dict[str, str] = ENVIRONMENT) -> ArchiveConfig:
    settings = load_settings(env)
    return parse_spec({"archive": spec}).archive.inheriting(settings.archive)


# ---- spec over environment --------------------------------------------------------------


def test_region_endpoint_and_flush_are_inherited_bucket_and_prefix_are_not() -> None:
    target = overlaid({"enabled": True, "bucket": "res-bucket"})
    assert target == ArchiveConfig(
        enabled=True,
        bucket="res-bucket",
        prefix="task-tracking",  # the default, not the environment's env-prefix
        region="eu-west-1",
        endpoint_url="http://minio:9000",
        flush=FlushPolicy(max_events=7, max_age_seconds=2),
        conditional_writes="check_before_write",
    )


def test_a_disabled_spec_keeps_no_bucket_of_the_environment() -> None:
    target = overlaid({"enabled": False})
    assert not target.enabled
    assert target.bucket is None
    assert target.prefix == "task-tracking"


def test_flush_is_inherited_field_by_field() -> None:
    target = overlaid({"enabled": True, "bucket": "res-bucket", "flush": {"maxBytes": 4096}})
    assert target.flush == FlushPolicy(max_events=7, max_bytes=4096, max_age_seconds=2)


def test_what_the_spec_sets_wins() -> None:
    target = overlaid(
        {
            "enabled": True,
            "bucket": "res-bucket",
            "prefix": "res",
            "region": "us-east-2",
            "endpointUrl": "https://s3.example",
            "flush": {"maxEvents": 1, "maxBytes": 2048, "maxAgeSeconds": 9},
        }
    )
    assert (target.prefix, target.region, target.endpoint_url) == (
        "res",
        "us-east-2",
        "https://s3.example",
    )
    assert target.flush == FlushPolicy(max_events=1, max_bytes=2048, max_age_seconds=9)


def test_a_resource_always_archives_to_s3_even_over_a_folder_environment(tmp_path: Any) -> None:
    env = {
        "TASK_TRACKING_REDIS_URL": "redis://x",
        "TASK_TRACKING_S3_ARCHIVE_ENABLED": "true",
        "TASK_TRACKING_ARCHIVE_SINK": "folder",
        "TASK_TRACKING_ARCHIVE_FOLDER": str(tmp_path),
    }
    target = overlaid({"enabled": True, "bucket": "res-bucket"}, env)
    assert (target.sink, target.folder, target.bucket) == ("s3", None, "res-bucket")


@pytest.mark.parametrize("field", ["sink", "folder", "conditionalWrites", "conditional_writes"])
def test_the_environments_own_fields_are_refused_in_a_spec(field: str) -> None:
    with pytest.raises(InvalidSpecError, match=rf"^spec\.archive\.{field}: "):
        parse_spec({"archive": {field: "x"}})


def test_retention_fields_left_out_are_the_environments() -> None:
    settings = load_settings(ENVIRONMENT)
    spec = parse_spec({"retention": {"projectIndexMaxAgeDays": 3}})
    assert spec.retention.inheriting(settings.retention) == RetentionConfig(
        projection_ttl_seconds=600, project_index_max_age_days=3, project_index_max_size=50
    )


def test_an_empty_spec_is_the_environment_with_archival_off() -> None:
    settings = load_settings(ENVIRONMENT)
    spec = parse_spec({})
    assert not spec.archive.inheriting(settings.archive).enabled
    assert spec.retention.inheriting(settings.retention) == settings.retention


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"archive": {"enabled": True}},
            "spec.archive.bucket: required when spec.archive.enabled is true",
        ),
        ({"archive": {"flush": {"maxBytes": 10}}}, "spec.archive.flush.maxBytes: "),
        ({"archive": {"flush": {"maxAgeSeconds": 0}}}, "spec.archive.flush.maxAgeSeconds: "),
        ({"archive": {"prefix": "a/"}}, "spec.archive.prefix: must not start or end with '/'"),
        (
            {"archive": {"endpointUrl": "ftp://x"}},
            "spec.archive.endpointUrl: must be an http:// or https:// URL (for example:",
        ),
        ({"archive": {"region": ""}}, "spec.archive.region: must not be empty (remove it"),
        ({"retention": {"projectIndexMaxSize": -1}}, "spec.retention.projectIndexMaxSize: "),
        ({"archive": {"flush": {"maxEvents": "10"}}}, "spec.archive.flush.maxEvents: "),
    ],
)
def test_the_same_rules_as_the_environment_one_line_naming_the_field(
    spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidSpecError) as caught:
        parse_spec(spec)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


# ---- generation policy ------------------------------------------------------------------


def test_a_generation_is_applied_once_and_again_after_a_runtime_failure() -> None:
    generation = SpecGeneration()
    assert generation.needs_apply(1)
    generation.handling(1)
    assert not generation.needs_apply(1)  # a status write's event: nothing to apply
    assert generation.needs_apply(2)
    generation.handling(2)
    generation.retry()
    assert generation.needs_apply(2)


# ---- status merge -----------------------------------------------------------------------

STATE = ArchiveState(archiving=True, bucket="b-bucket", prefix="p", last_error=None)


def merge(status: dict[str, Any], last: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    content = status_content(STATE, kwargs.pop("generation", 2), kwargs.pop("error", None), None)
    return merge_status(
        status,
        pod="pod-a",
        content=content,
        last_entry=last,
        generation=2,
        now=kwargs.pop("now", NOW),
        stale_after=3600,
    )


def test_the_first_write_adds_the_own_entry_and_the_summary() -> None:
    update = merge({})
    assert update.entry == {
        "observedGeneration": 2,
        "archiving": True,
        "bucket": "b-bucket",
        "prefix": "p",
        "lastError": "",
        "conditionalWrites": None,
        "updatedAt": "2026-12-01T12:00:00Z",
    }
    assert update.patch == {
        "sidecars": {"pod-a": update.entry},
        "applied": "1/1",
        "archiving": True,
    }


def test_an_unchanged_entry_writes_nothing_and_keeps_its_timestamp() -> None:
    first = merge({})
    stored = {
        "sidecars": {"pod-a": {k: v for k, v in first.entry.items() if v is not None}},
        "applied": "1/1",
        "archiving": True,
    }
    later = merge(stored, first.entry, now=NOW + datetime.timedelta(hours=5))
    assert later.patch == {}
    assert later.entry["updatedAt"] == first.entry["updatedAt"]


def test_a_changed_entry_gets_a_new_timestamp() -> None:
    first = merge({})
    later = merge({}, first.entry, error="bad", now=NOW + datetime.timedelta(minutes=1))
    assert later.entry["lastError"] == "bad"
    assert later.entry["updatedAt"] == "2026-12-01T12:01:00Z"
    assert later.patch["applied"] == "0/1"
    assert later.patch["archiving"] is False


def test_only_entries_behind_and_silent_are_removed() -> None:
    old = "2026-12-01T10:00:00Z"  # two hours before NOW, past stale_after
    recent = "2026-12-01T11:30:00Z"
    status = {
        "sidecars": {
            "gone": {"observedGeneration": 1, "updatedAt": old},
            "slow": {"observedGeneration": 1, "updatedAt": recent},
            "current": {"observedGeneration": 2, "updatedAt": old, "archiving": True},
            "junk": "not an entry",
        }
    }
    update = merge(status)
    assert update.patch["sidecars"] == {"pod-a": update.entry, "gone": None, "junk": None}
    assert update.patch["applied"] == "2/3"  # pod-a and current run generation 2
