"""Settings: every environment variable the sidecar reads, typed and validated once.

The names and defaults of the first eight variables are contracts inherited from
the original service (DESIGN.md); the rest are this project's. A bad value stops
start-up with one line naming the variable and the fix (`ConfigError`).

The archive configuration has one shape, `ArchiveConfig` (and `RetentionConfig`): the
environment fills it through one mapping (`ENVIRONMENT`), a TaskTracking's spec overlays
it (`ArchiveConfig.inheriting`); its rules (flush bounds, prefix shape, a bucket when
enabled) are written once, here.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel, to_snake

from sidecar.events import EventLimits

ENV_PREFIX = "TASK_TRACKING_"


class ConfigError(Exception):
    """A setting a user got wrong; the message is one line naming the variable and the fix."""


def listen_problem(port_variable: str, host: str, port: int, exc: OSError) -> str:
    """One line for a server that could not listen on host:port: what to change."""
    if exc.errno == errno.EADDRINUSE:
        return f"{port_variable}: the port is in use; set another one (or stop what listens on it)"
    return (
        f"TASK_TRACKING_HTTP_HOST: cannot listen on {host}:{port} ({exc.strerror or exc});"
        " set an address of this machine, or 0.0.0.0 for all of them"
    )


class RuleError(ValueError):
    """A rule across fields, broken: `field` is the one to fix; `{name}` placeholders in the
    message stand for other fields, named the way the source names them (a variable, a
    resource field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class _Model(BaseModel):
    # camelCase aliases: the field names of the TaskTracking CRD; snake_case works too.
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class FlushPolicy(_Model):
    """When a buffer becomes an object: whichever limit is reached first (``spec.archive.flush``,
    ``TASK_TRACKING_ARCHIVE_FLUSH_*``)."""

    max_events: int = Field(5000, ge=1, le=100_000)
    max_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=100 * 1024 * 1024)
    max_age_seconds: float = Field(30.0, gt=0, le=3600, allow_inf_nan=False)


# S3's rule for bucket names, as the CRD's schema has it (manifests/crd/).
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# Kubernetes names: a resource's (DNS-1123 subdomain) and a namespace's (DNS-1123 label).
LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
RESOURCE_NAME_RE = re.compile(rf"(?=.{{1,253}}$){LABEL}(\.{LABEL})*")
NAMESPACE_RE = re.compile(LABEL)
# What to do about a pattern a field's value missed (pydantic says only the pattern).
PATTERN_FIXES = {
    "endpoint_url": "must be an http:// or https:// URL (for example: http://minio:9000)",
    "http_host": "must be an IP address or a host name (for example: 0.0.0.0, or :: for IPv6)",
}


class ArchiveConfig(_Model):
    """Where and how to archive (``enabled=False``: no archiver runs): the one archive model.

    The environment fills it (`ENVIRONMENT`); a TaskTracking's ``spec.archive`` (the fields
    up to ``flush``, same names in camelCase) overlays it by `inheriting`.
    """

    enabled: bool = False
    bucket: str | None = Field(None, min_length=3, max_length=63)
    prefix: str = Field("task-tracking", min_length=1, max_length=512)
    region: str | None = Field(None, min_length=1, max_length=64)
    endpoint_url: str | None = Field(None, pattern=r"^https?://[^\s/?#]+\S*$")
    flush: FlushPolicy = FlushPolicy()
    # The environment's only (not in the CRD):
    sink: Literal["s3", "folder"] = "s3"
    folder: Path | None = None
    # "auto" probes whether the S3 target enforces If-None-Match (sidecar.conditional_writes).
    conditional_writes: Literal["auto", "enforced", "check_before_write"] = "auto"

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str | None) -> str | None:
        if value is not None and not BUCKET_RE.fullmatch(value):
            raise ValueError(
                "must be an S3 bucket name: lowercase letters, digits, '.' and '-',"
                " starting and ending with a letter or digit (for example: my-task-archive)"
            )
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix_shape(cls, value: str) -> str:
        if value.startswith("/") or value.endswith("/"):
            raise ValueError("must not start or end with '/' (for example: task-tracking)")
        return value

    @field_validator("conditional_writes", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _needs_target(self) -> ArchiveConfig:
        if self.enabled and self.sink == "s3" and not self.bucket:
            raise RuleError(
                "bucket",
                "required when {enabled} is true: set it to the bucket name,"
                " or set {enabled} to false",
            )
        if self.sink == "folder" and self.folder is None:
            raise RuleError(
                "folder", "required when {sink} is folder: set it to a writable directory"
            )
        return self

    def inheriting(self, environment: ArchiveConfig) -> ArchiveConfig:
        """This configuration (a resource's ``spec.archive``) completed from the environment's.

        What the resource leaves out of `INHERITED` (and of ``flush``, field by field) is
        the environment's; ``bucket`` and ``prefix`` are the resource's own or the defaults,
        never the environment's; a resource always archives to S3, with the environment's
        `conditional_writes`.
        """
        given = self.model_fields_set
        update: dict[str, object] = {
            name: getattr(environment, name) for name in INHERITED if name not in given
        }
        update["flush"] = environment.flush.model_copy(
            update=self.flush.model_dump(exclude_unset=True)
        )
        update.update(sink="s3", folder=None, conditional_writes=environment.conditional_writes)
        return self.model_copy(update=update)

    @property
    def label(self) -> str:
        """The bucket (or folder) for logs and the archive_enabled metric."""
        return str(self.folder) if self.sink == "folder" else str(self.bucket)


# The fields of spec.archive a resource takes from the environment when it leaves them out.
INHERITED = ("region", "endpoint_url")
# The fields of ArchiveConfig a TaskTracking's spec.archive may set (the CRD's).
RESOURCE_FIELDS = ("enabled", "bucket", "prefix", "region", "endpoint_url", "flush")


class RetentionConfig(_Model):
    """How long the projection keeps what (``spec.retention``, ``TASK_TRACKING_PROJECT*``);
    0 means no limit. A resource's leaves out fields: those are the environment's."""

    projection_ttl_seconds: int = Field(0, ge=0)
    project_index_max_age_days: int = Field(0, ge=0)
    project_index_max_size: int = Field(0, ge=0)

    def inheriting(self, environment: RetentionConfig) -> RetentionConfig:
        """This configuration (a resource's ``spec.retention``) completed from the environment's."""
        return environment.model_copy(update=self.model_dump(exclude_unset=True))


class Settings(BaseModel):
    """The sidecar's configuration, read from `TASK_TRACKING_*` environment variables.

    A flat field is the variable of its name; `archive` and `retention` are filled by the
    variables `ENVIRONMENT` maps into them. `load_settings` reads the environment (a plain
    model: pydantic-settings' sources would cost 2 MiB of every pod's memory for a mapping
    this module has to write anyway).
    """

    model_config = ConfigDict(extra="ignore", frozen=True, validate_default=True)

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

    archive: ArchiveConfig = ArchiveConfig()
    retention: RetentionConfig = RetentionConfig()

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
    def _redis_url(cls, value: str) -> str:
        problem = redis_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value: object) -> object:
        # A Secret made with `echo` ends with a newline, which no request header can hold.
        value = value.strip() if isinstance(value, str) else value
        return None if value == "" else value

    @field_validator("resource_name")
    @classmethod
    def _resource_name(cls, value: str) -> str:
        if value and not RESOURCE_NAME_RE.fullmatch(value):
            raise ValueError(
                "must be a Kubernetes name: at most 253 lowercase letters, digits, '-' and '.',"
                " starting and ending with a letter or digit (for example: task-tracking)"
            )
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if value and not NAMESPACE_RE.fullmatch(value):
            raise ValueError(
                "must be a Kubernetes namespace: at most 63 lowercase letters, digits and '-',"
                " starting and ending with a letter or digit (for example: default)"
            )
        return value

    @model_validator(mode="after")
    def _workers_apart(self) -> Settings:
        if self.redis_archiver_consumer_group == self.redis_projector_consumer_group:
            raise RuleError(
                "redis_archiver_consumer_group",
                "the same group as {redis_projector_consumer_group}: the two workers would"
                " split the stream between them, each missing what the other read; give"
                " each its own name",
            )
        if self.redis_claim_idle_ms < 2 * self.redis_block_ms:
            raise RuleError(
                "redis_claim_idle_ms",
                "less than twice {redis_block_ms}: a live replica waiting in its read"
                " would count as dead, and the others would claim its entries; raise it"
                " (the default is 60000)",
            )
        return self

    @property
    def event_limits(self) -> EventLimits:
        return EventLimits(self.max_event_bytes, self.max_future_seconds)

    @property
    def dead_letter_key(self) -> str:
        return f"{self.redis_stream_key}:dead-letter"


# Variables (less TASK_TRACKING_, lower case) that fill the nested models, and where. The
# names are contracts (DESIGN.md); load_settings' overrides take the same names.
ENVIRONMENT: dict[str, tuple[str, ...]] = {
    "s3_archive_enabled": ("archive", "enabled"),
    "s3_bucket": ("archive", "bucket"),
    "s3_prefix": ("archive", "prefix"),
    "s3_region": ("archive", "region"),
    "s3_endpoint_url": ("archive", "endpoint_url"),
    "archive_sink": ("archive", "sink"),
    "archive_folder": ("archive", "folder"),
    "archive_flush_max_events": ("archive", "flush", "max_events"),
    "archive_flush_max_bytes": ("archive", "flush", "max_bytes"),
    "archive_flush_max_age_seconds": ("archive", "flush", "max_age_seconds"),
    "archive_conditional_writes": ("archive", "conditional_writes"),
    "projection_ttl_seconds": ("retention", "projection_ttl_seconds"),
    "project_index_max_age_days": ("retention", "project_index_max_age_days"),
    "project_index_max_size": ("retention", "project_index_max_size"),
}
_VARIABLES = {path: ENV_PREFIX + name.upper() for name, path in ENVIRONMENT.items()}
# Set to the empty string, these mean unset (a Helm value left empty).
EMPTY_IS_UNSET = {"s3_bucket", "s3_region", "s3_endpoint_url", "archive_folder"}


def load_settings(environ: dict[str, str] | None = None, **overrides: object) -> Settings:
    """Read settings from the environment; raise `ConfigError` with one readable line."""
    env = os.environ if environ is None else environ
    flat: dict[str, object] = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in env.items()
        if key.startswith(ENV_PREFIX)
    }
    flat.pop("archive", None)  # the models' own names are not variables
    flat.pop("retention", None)
    flat.update(overrides)
    values: dict[str, Any] = {}
    for name, value in flat.items():
        path = ENVIRONMENT.get(name)
        if path is None:
            values[name] = value
        elif not (value == "" and name in EMPTY_IS_UNSET):
            *parents, leaf = path
            section = values
            for part in parents:
                section = section.setdefault(part, {})
            section[leaf] = value
    try:
        # Pass values explicitly so a test's environ is not merged with os.environ.
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


class Problem(NamedTuple):
    """The first problem of a ValidationError, for a one-line message."""

    loc: tuple[str | int, ...]  # for a cross-field rule: the field to fix
    message: str
    rule: bool  # a cross-field rule (`RuleError`), whose message names the fields itself
    kind: str  # pydantic's error type ("missing", ...)
    input: object


def first_problem(exc: ValidationError, name: Callable[[tuple[str | int, ...]], str]) -> Problem:
    """The first problem of `exc`; the fields a rule's message mentions are named by `name`
    (of their location), as the source names them (a variable, a resource field)."""
    error = exc.errors()[0]
    loc = tuple(error["loc"])
    rule = (error.get("ctx") or {}).get("error")
    if isinstance(rule, RuleError):
        message = re.sub(r"\{(\w+)\}", lambda m: name((*loc, m.group(1))), rule.message)
        return Problem((*loc, rule.field), message, True, error["type"], None)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "string_pattern_mismatch":
        message = PATTERN_FIXES.get(to_snake(str(loc[-1])), message)
    elif error["type"] == "string_too_short" and (error.get("ctx") or {}).get("min_length") == 1:
        message = "must not be empty (remove it for the default)"
    return Problem(loc, message, False, error["type"], error.get("input"))


def describe_validation_error(exc: ValidationError) -> str:
    """First problem of a settings ValidationError, as one line naming the variable."""
    problem = first_problem(exc, _variable)
    variable = _variable(problem.loc)
    if problem.rule:
        return f"{variable} is {problem.message}"
    if problem.kind == "missing":
        hint = " (for example redis://localhost:6379/0)" if problem.loc == ("redis_url",) else ""
        return f"{variable} is required: set it{hint}"
    shown = problem.input
    if isinstance(shown, str):  # any setting may hold a URL with a password
        shown = redact(shown)
    return f"{variable}={shown!r} is invalid: {problem.message}"


def _variable(loc: tuple[str | int, ...]) -> str:
    path = tuple(str(part) for part in loc)
    return _VARIABLES.get(path) or ENV_PREFIX + "_".join(path).upper()


REDIS_SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster", "unix")


def redis_url_problem(url: str) -> str | None:
    """Why redis-py could not use `url`, or None: the scheme, the port, the database and
    every query option (`?bogus=1` would otherwise fail at each connection attempt)."""
    from redis.asyncio.connection import Connection, parse_url

    scheme = urlsplit(url).scheme
    if scheme not in REDIS_SCHEMES:
        return "must start with redis://, rediss:// (TLS), redis+cluster:// or rediss+cluster://"
    plain = url.replace("+cluster://", "://", 1)
    try:
        options = parse_url(plain)
    except ValueError as exc:
        if "Port" in str(exc):  # the message would quote part of a password holding '/'
            return (
                "the port is not a number: percent-encode '/', '@' and ':' in the user name"
                " and password (%2F, %40, %3A)"
            )
        return f"{redact(str(exc))} (see README 'Redis Cluster, TLS and ACLs')"
    # Not echoed: after an unencoded '/' in a password, the rest of it is the "path".
    database = urlsplit(plain).path.strip("/")
    if scheme != "unix" and database and not database.isdigit():  # redis-py would take 0
        return (
            "the database (the path after the host) is not a number, for example"
            " redis://host:6379/0; percent-encode '/', '@' and ':' in a password (%2F, %40, %3A)"
        )
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        path = options.get(name)
        if isinstance(path, str) and not Path(path).is_file():
            return f"?{name}={path}: no such file (mount it, or fix the path)"
    # The pool's own option besides the connections' (README: max_connections).
    known = connection_options(options.pop("connection_class", Connection)) | {"max_connections"}
    unknown = sorted(set(options) - known)
    if unknown:
        return (
            f"unknown option {unknown[0]!r} in the URL's query: remove it, or spell it as"
            " redis-py does (e.g. ?ssl_ca_certs=/path/ca.pem, ?socket_timeout=5)"
        )
    return None


def connection_options(connection_class: type) -> set[str]:
    """The keyword arguments a redis-py connection class (and its bases) accepts."""
    import inspect

    names: set[str] = {"connection_class"}
    for klass in connection_class.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for parameter in inspect.signature(init).parameters.values():
            if parameter.kind is parameter.KEYWORD_ONLY or (
                parameter.kind is parameter.POSITIONAL_OR_KEYWORD and parameter.name != "self"
            ):
                names.add(parameter.name)
    return names


# scheme://user:password@host -> scheme://user:***@host, whatever the scheme; the password
# runs to the last '@' of the URL (an unencoded '@' or '/' in it is hidden too).
URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*:)[^\s'\"]*@")
# ?password=... and the like in a URL's query
QUERY_SECRET = re.compile(
    r"(?P<head>[?&][^=&\s]*(?:password|passwd|secret|token)[^=&\s]*=)[^&\s'\"]+", re.I
)


def redact(text: str) -> str:
    """`text` (a URL, a message, a traceback) with every URL password replaced by `***`."""
    return QUERY_SECRET.sub(r"\g<head>***", URL_PASSWORD.sub(r"\g<head>***@", text))
