"""JSON logs, one object a line, with the worker context a log line carries.

Credentials never reach the output: the password of any URL in a message or a
traceback is replaced by `***`, and the AWS SDK's request logs (which carry
session tokens at debug level) are kept at info or above.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

import orjson

from sidecar.config import redact

# Attributes a log call may pass in `extra=` (or a ContextLogger) that are worth a key.
CONTEXT_FIELDS = (
    "worker",
    "group",
    "consumer",
    "stream_id",
    "execution_id",
    "bucket",
    "resource",
    "generation",
)
# Loggers that log credentials (request headers, session tokens) at debug level.
CREDENTIAL_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3transfer", "urllib3")


class ContextLogger(logging.LoggerAdapter[logging.Logger]):
    """A LoggerAdapter whose context is merged with a call's own `extra=`
    (the standard adapter of Python < 3.13 replaces it)."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", ...context, "error"}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["error"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


class RedactingFormatter(logging.Formatter):
    """The plain-text format of `task-tracking dev`, with URL passwords redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure_logging(level: str = "info", *, json: bool = True) -> None:
    """Route every logger (kopf's and aiohttp's included) to stderr at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    if json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(RedactingFormatter("%(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Access logs of every scrape and probe are noise.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    for name in CREDENTIAL_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
