"""Settings: contract names and defaults, one-line errors, exit code 2, no secrets printed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sidecar.config import ConfigError, load_settings, redact


def test_contract_defaults() -> None:
    settings = load_settings({"TASK_TRACKING_REDIS_URL": "redis://localhost:6379/0"})
    assert settings.redis_stream_key == "task-events:v1"
    assert settings.redis_projector_consumer_group == "task-status-projector"
    assert settings.redis_archiver_consumer_group == "task-history-archiver"
    assert settings.redis_consumer_name == "alakai"
    assert settings.archive.enabled is False
    assert settings.archive.bucket is None
    assert settings.archive.prefix == "task-tracking"
    assert settings.http_port == 9470


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "TASK_TRACKING_REDIS_URL is required"),
        ({"TASK_TRACKING_REDIS_URL": "http://x"}, "TASK_TRACKING_REDIS_URL="),
        (
            {"TASK_TRACKING_REDIS_URL": "redis://x", "TASK_TRACKING_S3_ARCHIVE_ENABLED": "true"},
            "TASK_TRACKING_S3_BUCKET is required",
        ),
        (
            {"TASK_TRACKING_REDIS_URL": "redis://x", "TASK_TRACKING_S3_ARCHIVE_ENABLED": "maybe"},
            "TASK_TRACKING_S3_ARCHIVE_ENABLED='maybe' is invalid",
        ),
        (
            {"TASK_TRACKING_REDIS_URL": "redis://x", "TASK_TRACKING_HTTP_PORT": "-1"},
            "TASK_TRACKING_HTTP_PORT",
        ),
        (
            {"TASK_TRACKING_REDIS_URL": "redis://x", "TASK_TRACKING_S3_PREFIX": "/a/"},
            "TASK_TRACKING_S3_PREFIX",
        ),
    ],
)
def test_bad_values_give_one_line_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_password_never_printed() -> None:
    assert redact("redis://user:s3cret@host:6380/0") == "redis://user:***@host:6380/0"
    with pytest.raises(ConfigError) as caught:
        load_settings({"TASK_TRACKING_REDIS_URL": "http://user:s3cret@host"})
    assert "s3cret" not in str(caught.value)


def test_run_with_bad_environment_exits_2_with_one_line_and_no_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "run"],
        env={"TASK_TRACKING_REDIS_URL": "ftp://user:hunter2@x", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "TASK_TRACKING_REDIS_URL" in result.stderr
    assert "hunter2" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ARCHIVE_FLUSH_MAX_EVENTS", "0", "TASK_TRACKING_ARCHIVE_FLUSH_MAX_EVENTS='0' is invalid"),
        ("ARCHIVE_FLUSH_MAX_BYTES", "10", "TASK_TRACKING_ARCHIVE_FLUSH_MAX_BYTES='10' is invalid"),
        ("ARCHIVE_SINK", "folder", "TASK_TRACKING_ARCHIVE_FOLDER is required when"),
        ("PROJECT_INDEX_MAX_SIZE", "-1", "TASK_TRACKING_PROJECT_INDEX_MAX_SIZE='-1' is invalid"),
        (
            "ARCHIVE_FLUSH_MAX_AGE_SECONDS",
            "nan",
            "TASK_TRACKING_ARCHIVE_FLUSH_MAX_AGE_SECONDS='nan' is invalid:"
            " Input should be a finite number",
        ),
        # S3's bucket rule, as the CRD has it; botocore only refused it at the first call
        ("S3_BUCKET", "archive/sub", "TASK_TRACKING_S3_BUCKET='archive/sub' is invalid: must be"),
        ("S3_BUCKET", "My_Archive", "TASK_TRACKING_S3_BUCKET='My_Archive' is invalid: must be"),
    ],
)
def test_the_archive_models_rules_name_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"TASK_TRACKING_REDIS_URL": "redis://x", f"TASK_TRACKING_{name}": value})
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value", "fix"),
    [
        # pydantic's own messages only quoted the pattern, or said "at least 1 character"
        ("S3_ENDPOINT_URL", "minio:9000", "must be an http:// or https:// URL (for example:"),
        ("HTTP_HOST", "local host", "must be an IP address or a host name (for example:"),
        ("REDIS_STREAM_KEY", "", "must not be empty (remove it for the default)"),
        # a Kubernetes name the API would never serve: the watch found nothing, silently
        ("RESOURCE_NAME", "Task_Tracking", "must be a Kubernetes name: at most 253 lowercase"),
        ("RESOURCE_NAME", "a" * 254, "must be a Kubernetes name"),
        ("NAMESPACE", "Team-A", "must be a Kubernetes namespace: at most 63 lowercase"),
        ("NAMESPACE", "a.b", "must be a Kubernetes namespace"),
    ],
)
def test_a_value_of_the_wrong_shape_is_told_how_to_fix_it(name: str, value: str, fix: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"TASK_TRACKING_REDIS_URL": "redis://x", f"TASK_TRACKING_{name}": value})
    assert str(caught.value).startswith(f"TASK_TRACKING_{name}={value!r} is invalid: {fix}")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        # one group for both: each entry went to one worker only (found by a user drive)
        (
            {"TASK_TRACKING_REDIS_ARCHIVER_CONSUMER_GROUP": "task-status-projector"},
            "TASK_TRACKING_REDIS_ARCHIVER_CONSUMER_GROUP is the same group as"
            " TASK_TRACKING_REDIS_PROJECTOR_CONSUMER_GROUP: ",
        ),
        # live replicas blocked in a 5 s read claimed each other's entries
        (
            {"TASK_TRACKING_REDIS_CLAIM_IDLE_MS": "2000"},
            "TASK_TRACKING_REDIS_CLAIM_IDLE_MS is less than twice TASK_TRACKING_REDIS_BLOCK_MS",
        ),
        # redis-py reads a database that is not a number as 0, silently
        (
            {"TASK_TRACKING_REDIS_URL": "redis://h:6379/abc"},
            "TASK_TRACKING_REDIS_URL='redis://h:6379/abc' is invalid: the database (the path",
        ),
    ],
)
def test_settings_that_would_lose_or_misplace_events_are_refused(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"TASK_TRACKING_REDIS_URL": "redis://x", **env})
    assert str(caught.value).startswith(message)


def test_the_pool_size_the_readme_recommends_is_taken() -> None:
    url = "redis://h:6379/3?max_connections=16"
    assert load_settings({"TASK_TRACKING_REDIS_URL": url}).redis_url == url
    shorter = {"TASK_TRACKING_REDIS_CLAIM_IDLE_MS": "2000", "TASK_TRACKING_REDIS_BLOCK_MS": "1000"}
    assert load_settings({"TASK_TRACKING_REDIS_URL": "redis://x", **shorter})


def test_kubernetes_names_and_a_token_from_a_secret_made_with_echo_are_taken() -> None:
    settings = load_settings(
        {
            "TASK_TRACKING_REDIS_URL": "redis://x",
            "TASK_TRACKING_RESOURCE_NAME": "task-tracking.v1",
            "TASK_TRACKING_NAMESPACE": "team-a",
            "TASK_TRACKING_API_TOKEN": "s3cret\n",  # no request header can hold the newline
        }
    )
    assert (settings.resource_name, settings.namespace) == ("task-tracking.v1", "team-a")
    assert settings.api_token == "s3cret"


def test_the_environment_fills_the_archive_model_and_empty_means_unset() -> None:
    settings = load_settings(
        {
            "TASK_TRACKING_REDIS_URL": "redis://x",
            "TASK_TRACKING_S3_BUCKET": "",
            "TASK_TRACKING_S3_REGION": "",
            "TASK_TRACKING_ARCHIVE_FLUSH_MAX_EVENTS": "12",
            "TASK_TRACKING_ARCHIVE_CONDITIONAL_WRITES": "Enforced",
        }
    )
    assert settings.archive.bucket is None and settings.archive.region is None
    assert settings.archive.flush.max_events == 12
    assert settings.archive.conditional_writes == "enforced"
    overridden = load_settings({"TASK_TRACKING_REDIS_URL": "redis://x"}, s3_prefix="other")
    assert overridden.archive.prefix == "other"
