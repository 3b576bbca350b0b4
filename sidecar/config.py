"""Settings: every environment variable the sidecar reads, typed and validated once.

The names and defaults of the first eight variables are contracts inherited from
the original service (DESIGN.md); the rest are this project's. A bad value stops
start-up with one line naming the variable and the fix (`ConfigError`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sidecar.events import EventLimits

ENV_PREFIX = "TASK_TRACKING_"


class ConfigError(Exception):
    """A setting a user got wrong; the message is one line naming the variable and the fix."""


class Settings(BaseSettings):
    """The sidecar's configuration, read from `TASK_TRACKING_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    redis_url: str
    redis_stream_key: str = Field("task-events:v1", min_length=1)
    redis_projector_consumer_group: str = Field("task-status-projector", min_length=1)
    redis_archiver_consumer_group: str = Field("task-history-archiver", min_length=1)
    redis_consumer_name: str = Field("alakai", min_length=1)
    # How many entries one XREADGROUP returns, and how long it blocks when idle.
    redis_batch_size: int = Field(500, ge=1, le=100_000)
    # At most 5 s: a stop waits for the read in hand (SIGTERM drain budget: 10 s).
    redis_block_ms: int = Field(5000, ge=10, le=5000)
    # A consumer that has not read for this long is taken for dead; its pending
    # entries are claimed by a live replica, as one set.
    redis_claim_idle_ms: int = Field(60_000, ge=1000)
    # Last-resort cap on the stream length (0 = none); see README "Bounded memory".
    redis_stream_maxlen: int = Field(0, ge=0)
    # Ingest limits (README "Data contracts"): larger events and events dated further
    # ahead of their stream entry are dead-lettered.
    max_event_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_future_seconds: int = Field(86_400, ge=0)
    # Approximate cap on the dead-letter stream (MAXLEN ~ on each XADD); 0 = unbounded.
    dead_letter_maxlen: int = Field(100_000, ge=0)
    # While archival is off, the archiver group holds entries in the stream this long at most.
    archive_off_pin_seconds: int = Field(86_400, ge=0)

    s3_archive_enabled: bool = False
    s3_bucket: str | None = None
    s3_prefix: str = "task-tracking"
    s3_region: str | None = None
    s3_endpoint_url: str | None = None

    archive_sink: Literal["s3", "folder"] = "s3"
    archive_folder: Path | None = None
    archive_flush_max_events: int = Field(5000, ge=1, le=100_000)
    archive_flush_max_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=100 * 1024 * 1024)
    archive_flush_max_age_seconds: float = Field(30.0, gt=0, le=3600)
    # "auto" probes whether the S3 target enforces If-None-Match (sidecar.conditional_writes).
    archive_conditional_writes: Literal["auto", "enforced", "check_before_write"] = "auto"

    projection_ttl_seconds: int = Field(0, ge=0)
    project_index_max_age_days: int = Field(0, ge=0)
    project_index_max_size: int = Field(0, ge=0)

    http_port: int = Field(9470, ge=0, le=65535)
    # Bind address of that port: 0.0.0.0 every IPv4 interface, :: every IPv6 one (only).
    http_host: str = Field("0.0.0.0", pattern=r"^[A-Za-z0-9.:%_-]+$")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # The read API (sidecar.read) on its own port, bound like the HTTP one: off in `run`,
    # on in `dev`; `task-tracking api` serves it alone. With a token, every request needs
    # `Authorization: Bearer <token>`.
    api_enabled: bool = False
    api_port: int = Field(9471, ge=0, le=65535)
    api_token: str | None = None

    # The TaskTracking resource to watch; empty leaves the operator off.
    resource_name: str = ""
    namespace: str = ""

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in ("redis", "rediss", "redis+cluster", "rediss+cluster", "unix"):
            raise ValueError(
                "must start with redis://, rediss:// (TLS), redis+cluster:// or rediss+cluster://"
            )
        return value

    @field_validator("s3_prefix")
    @classmethod
    def _prefix_shape(cls, value: str) -> str:
        if value.startswith("/") or value.endswith("/"):
            raise ValueError("must not start or end with '/' (for example: task-tracking)")
        return value

    @field_validator("log_level", "archive_conditional_writes", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator(
        "s3_bucket", "s3_region", "s3_endpoint_url", "archive_folder", "api_token", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _archive_needs_target(self) -> Settings:
        if self.s3_archive_enabled and self.archive_sink == "s3" and not self.s3_bucket:
            raise ValueError(
                "TASK_TRACKING_S3_BUCKET is required when TASK_TRACKING_S3_ARCHIVE_ENABLED=true:"
                " set it to the bucket name, or set TASK_TRACKING_S3_ARCHIVE_ENABLED=false"
            )
        if self.archive_sink == "folder" and self.archive_folder is None:
            raise ValueError(
                "TASK_TRACKING_ARCHIVE_FOLDER is required when TASK_TRACKING_ARCHIVE_SINK=folder:"
                " set it to a writable directory"
            )
        return self

    @property
    def event_limits(self) -> EventLimits:
        return EventLimits(self.max_event_bytes, self.max_future_seconds)

    @property
    def dead_letter_key(self) -> str:
        return f"{self.redis_stream_key}:dead-letter"


def load_settings(environ: dict[str, str] | None = None, **overrides: object) -> Settings:
    """Read settings from the environment; raise `ConfigError` with one readable line."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in env.items()
        if key.startswith(ENV_PREFIX)
    }
    values.update(overrides)
    try:
        # Pass values explicitly so a test's environ is not merged with os.environ.
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """First problem of a settings ValidationError, as one line naming the variable."""
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if not field:  # model-level rule: its message already names the variables
        return message
    variable = ENV_PREFIX + field.upper()
    if error["type"] == "missing":
        hint = " (for example redis://localhost:6379/0)" if field == "redis_url" else ""
        return f"{variable} is required: set it{hint}"
    shown = error.get("input")
    if field == "redis_url" and isinstance(shown, str):
        shown = redact(shown)
    return f"{variable}={shown!r} is invalid: {message}"


# scheme://user:password@host -> scheme://user:***@host
URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*:)[^@/\s]+@")


def redact(text: str) -> str:
    """`text` (a URL, a message, a traceback) with every URL password replaced by `***`."""
    return URL_PASSWORD.sub(r"\g<head>***@", text)
