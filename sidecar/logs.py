"""JSON logs, one object a line, with the worker context a log line carries."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson

# Attributes a log call may pass in `extra=` (or a LoggerAdapter) that are worth a key.
CONTEXT_FIELDS = ("worker", "group", "stream_id", "execution_id", "bucket", "resource")


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", ...context, "error"}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str = "info", *, json: bool = True) -> None:
    """Route every logger (kopf's and aiohttp's included) to stderr at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    if json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Access logs of every scrape and probe are noise.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
