"""The projection in a terminal: aligned columns, escaped text, uniform times.

Widths come from `wcwidth` (a small pure-Python table of the Unicode standard's East
Asian widths, zero-width and emoji sequences): `デプロイ` takes 8 columns, a combining
accent none. `rich` would do it too, with a whole rendering stack the sidecar's image
does not need. Control characters (an ANSI escape in a task name, a newline in an id)
are shown escaped (`\\x1b`, `\\n`), never sent to the terminal raw. Times are read from
`occurredAtMs`, whatever form the publisher sent: ISO-8601 UTC and the age.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from wcwidth import wcswidth, wcwidth

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
MAX_CELL = 48  # columns a list cell may take before it is cut with "…"

LIST_COLUMNS = ("executionId", "taskName", "status", "project", "occurredAt", "age")
WATCH_COLUMNS = ("executionId", "taskName", "status", "project", "occurredAt")


def escape(text: str) -> str:
    """`text` with control and bidirectional-override characters written as escapes."""
    return CONTROL.sub(lambda m: NAMED.get(m.group()) or _code(ord(m.group())), text)


def _code(point: int) -> str:
    return f"\\x{point:02x}" if point < 0x100 else f"\\u{point:04x}"


def width(text: str) -> int:
    shown = wcswidth(text)
    return shown if shown >= 0 else sum(max(wcwidth(c), 0) for c in text)


def fit(text: str, columns: int) -> str:
    """`text` cut to at most `columns` display columns (with "…"), then padded to them."""
    if width(text) > columns:
        kept, used = [], 0
        for char in text:
            w = max(wcwidth(char), 0)
            if used + w > columns - 1:
                break
            kept.append(char)
            used += w
        text = "".join(kept) + "…"
    return text + " " * (columns - width(text))


def iso_utc(ms: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def age(ms: int, now: float | None = None) -> str:
    seconds = int((time.time() if now is None else now) - ms / 1000)
    if seconds < 0:
        return f"in {-seconds}s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def when(ms: Any, now: float | None = None) -> str:
    return f"{iso_utc(ms)} ({age(ms, now)} ago)" if isinstance(ms, int) else "-"


def text(value: Any) -> str:
    """A field as one escaped line: strings as they are, anything else as JSON."""
    if value is None:
        return "-"
    shown = value if isinstance(value, str) else orjson.dumps(value).decode()
    return escape(shown)


def cells(execution: dict[str, Any], columns: Sequence[str], now: float | None) -> list[str]:
    row = []
    for column in columns:
        ms = execution.get("occurredAtMs")
        if column == "occurredAt":
            row.append(iso_utc(ms) if isinstance(ms, int) else text(execution.get(column)))
        elif column == "age":
            row.append(age(ms, now) if isinstance(ms, int) else "-")
        else:
            row.append(text(execution.get(column)))
    return row


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Lines of columns aligned by display width (cells cut at `MAX_CELL`)."""
    lines = [list(header), *(list(row) for row in rows)]
    widths = [min(max(width(line[i]) for line in lines), MAX_CELL) for i in range(len(header))]
    return [
        "  ".join(fit(cell, w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]


def status_lines(execution: dict[str, Any], now: float | None = None) -> list[str]:
    """`task-tracking status`: one field a line, the names aligned, occurredAt from ms."""
    rows = []
    for name, value in execution.items():
        shown = when(execution.get("occurredAtMs"), now) if name == "occurredAt" else text(value)
        rows.append((escape(name), shown))
    names = max(width(name) for name, _ in rows)
    return [fit(name, names) + "  " + value for name, value in rows]


def list_lines(
    executions: list[dict[str, Any]], *, more: int, now: float | None = None
) -> list[str]:
    """`task-tracking list`: the table, and how many more there are when it was cut."""
    header = ["EXECUTION", "TASK", "STATUS", "PROJECT", "OCCURRED AT (UTC)", "AGE"]
    lines = table(header, (cells(e, LIST_COLUMNS, now) for e in executions))
    if more > 0:
        lines.append(f"… {more} more, use --limit")
    return lines


class WatchPrinter:
    """`task-tracking watch`: a header, then one line per change, like `kubectl get -w`
    (fixed columns, so that lines printed later stay aligned)."""

    WIDTHS = (28, 20, 11, 30, 24)

    def header(self) -> str:
        names = ("EXECUTION", "TASK", "STATUS", "PROJECT", "OCCURRED AT (UTC)")
        return "  ".join(fit(n, w) for n, w in zip(names, self.WIDTHS, strict=True)) + "  AGE"

    def line(self, execution: dict[str, Any], now: float | None = None) -> str:
        row = cells(execution, WATCH_COLUMNS, now)
        ms = execution.get("occurredAtMs")
        shown = "  ".join(fit(c, w) for c, w in zip(row, self.WIDTHS, strict=True))
        return shown + "  " + (age(ms, now) if isinstance(ms, int) else "-")
