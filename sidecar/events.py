"""The task lifecycle event: its parsing from a stream entry, the entry-level rules, its
ordering key (the fields' own checks and the `TaskEvent` model: sidecar.event_fields).

Parsing never raises: `decode_values` returns either a `ValidEvent` or an
`InvalidEntry` carrying a one-line reason, which workers dead-letter. The rules
(DESIGN.md, "What the projector accepts") are written once, here, and every reader
uses them: the projector, the archiver, `replay` and the publisher.

- Accepted as JavaScript's `JSON.parse` accepts it: surrounding whitespace, JSON over
  several lines, escaped lone surrogates (what `JSON.stringify` writes for a string cut
  inside an emoji), lower-case `t`/`z`, URL schemes in any case.
- Optional fields (`actor`, `prLinks`, `visibility`, `flow`, extras) never make an event
  invalid: a malformed one is kept as sent and reported as a warning.
- Refused: an event over the size limit (checked before decoding), identifiers over
  512 bytes or with control characters, an `occurredAt` too far after its entry was
  added, integer epoch seconds, and an entry with more than one `event` field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeGuard

import orjson

from sidecar.event_fields import (
    IDENTIFIER_MAX_BYTES,
    OPTIONAL_FIELDS,
    PROJECT_RE,
    SHORT,
    STATUS_RANK,
    EventFacts,
    OrderingKey,
    TaskEvent,
    describe_event_error,
    identifier_problem,
    model_event_facts,
    occurred_at_ms,
    optional_field_warnings,
    quick_event_facts,
)

# What the event's field checks (sidecar.event_fields) export is used through this module
# too: one import for readers of stream entries.
__all__ = [
    "DEAD_LETTER_EVENT_BYTES",
    "DEFAULT_LIMITS",
    "EVENT_FIELD",
    "IDENTIFIER_MAX_BYTES",
    "OPTIONAL_FIELDS",
    "PROJECT_RE",
    "SHORT",
    "STATUS_RANK",
    "EventFacts",
    "EventLimits",
    "EventValue",
    "InvalidEntry",
    "OrderingKey",
    "Oversized",
    "TaskEvent",
    "ValidEvent",
    "decode_entry",
    "decode_values",
    "describe_event_error",
    "entry_ms",
    "identifier_problem",
    "model_event_facts",
    "occurred_at_ms",
    "optional_field_warnings",
    "quick_event_facts",
    "stream_order",
]

EVENT_FIELD = b"event"
# What a dead-letter entry keeps of an event, at most (the rest is cut, its size noted).
DEAD_LETTER_EVENT_BYTES = 64 * 1024
JSON_WHITESPACE = b" \t\r\n"
# Shapes no publisher means and the projection cannot hold. Each top-level field is a
# field of the execution's hash, and a script call blocks Redis while it writes them (64
# events of 110,000 fields: 3.2 s). orjson writes at most 254 levels of nesting, and the
# projector writes each field back as JSON (a field 255 deep stopped its group).
MAX_TOP_LEVEL_FIELDS = 10_000
MAX_NESTING = 200


@dataclass(frozen=True, slots=True)
class EventLimits:
    """The refusal limits that have settings (`TASK_TRACKING_MAX_EVENT_BYTES`,
    `TASK_TRACKING_MAX_FUTURE_SECONDS`)."""

    max_event_bytes: int = 1024 * 1024
    max_future_seconds: int = 86_400


DEFAULT_LIMITS = EventLimits()


class Oversized(NamedTuple):
    """An `event` value over the size limit, as the reader hands it over: only a prefix
    was fetched, and its size (so the sidecar's memory never holds the whole payload)."""

    prefix: bytes
    size: int


EventValue = bytes | Oversized


def stream_order(entry_id: str) -> tuple[int, int]:
    """A stream entry ID as numbers, `(milliseconds, sequence)`, to sort entries by."""
    millis, _, sequence = entry_id.partition("-")
    return int(millis), int(sequence or 0)


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 4x on the per-event path
class ValidEvent:
    """A stream entry that holds a valid event, with what the workers need from it
    (treated as immutable)."""

    entry_id: str
    # The archive line: the `event` field as it stood in the stream, less surrounding
    # whitespace; an event sent over several lines, re-serialized on one.
    raw: bytes
    fields: dict[str, Any]  # the decoded top-level JSON object
    event_id: str
    execution_id: str
    project: str
    status: str
    occurred_at_ms: int
    warnings: tuple[str, ...] = ()  # optional fields kept as sent although malformed

    @property
    def ordering_key(self) -> OrderingKey:
        return (self.occurred_at_ms, STATUS_RANK[self.status], self.event_id)


@dataclass(frozen=True, slots=True)
class InvalidEntry:
    """A stream entry that cannot be processed, and why."""

    entry_id: str
    raw: bytes | None  # the `event` field if the entry had one (at most a prefix of it)
    reason: str
    more: tuple[bytes, ...] = ()  # further `event` values of the same entry
    size: int | None = None  # the size of `raw` as sent, when only a prefix is kept

    def dead_letter_fields(self) -> list[bytes | str | int]:
        """The dead-letter entry's fields except `group`: each `event` value as received,
        bounded in size (`DEAD_LETTER_EVENT_BYTES`, the original size in `eventBytes`)."""
        fields: list[bytes | str | int] = []
        size = self.size
        for value in (self.raw, *self.more) if self.raw is not None else ():
            if len(value) > DEAD_LETTER_EVENT_BYTES:
                size = max(size or 0, len(value))
                value = value[:DEAD_LETTER_EVENT_BYTES]
            fields += ["event", value]
        if size is not None:
            fields += ["eventBytes", size]
        return [*fields, "error", self.reason, "sourceId", self.entry_id]


def decode_entry(
    entry_id: str, fields: Mapping[bytes, EventValue], limits: EventLimits = DEFAULT_LIMITS
) -> ValidEvent | InvalidEntry:
    """`decode_values` for an entry given as a field mapping (one value per field)."""
    value = fields.get(EVENT_FIELD)
    return decode_values(entry_id, [] if value is None else [value], limits)


def decode_values(
    entry_id: str,
    values: Sequence[EventValue],
    limits: EventLimits = DEFAULT_LIMITS,
    *,
    added_ms: int | None = None,
    added_at_least: int = 0,
) -> ValidEvent | InvalidEntry:
    """Decode one stream entry from its `event` values (every one, in order). Never raises.

    `added_ms`: when the entry was added, for the future limit; by default the time in
    its stream ID, read only when the event is dated after `added_at_least` (a lower bound
    of that time, such as the first entry of a read) plus the limit."""
    if not values:
        return InvalidEntry(entry_id, None, "entry has no 'event' field")
    first = values[0]
    if len(values) > 1:
        return _several_values(entry_id, values)
    if type(first) is not bytes or len(first) > limits.max_event_bytes:
        size = first.size if isinstance(first, Oversized) else len(first)
        prefix = first.prefix if isinstance(first, Oversized) else first
        return InvalidEntry(
            entry_id,
            prefix[:DEAD_LETTER_EVENT_BYTES],
            f"event is {size} bytes, over the {limits.max_event_bytes} byte limit"
            " (TASK_TRACKING_MAX_EVENT_BYTES): send large data by reference, not in the event",
            size=size,
        )
    raw = first.strip(JSON_WHITESPACE)  # `first` is bytes here
    lossy = False  # lone surrogates read as U+FFFD
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        data = _parse_with_lone_surrogates(raw)
        if data is None:
            return InvalidEntry(entry_id, first, f"event is not JSON: {exc}")
        lossy = True
    if not isinstance(data, dict):
        return InvalidEntry(
            entry_id, first, f"event must be a JSON object, got {type(data).__name__}"
        )
    if len(data) > MAX_TOP_LEVEL_FIELDS:
        return InvalidEntry(
            entry_id,
            first,
            f"event has {len(data)} top-level fields, over {MAX_TOP_LEVEL_FIELDS}: each is"
            " a field of the projection's hash; put the extra data under one field",
        )
    if raw.count(b"[") + raw.count(b"{") > MAX_NESTING and _nesting(data) > MAX_NESTING:
        return InvalidEntry(
            entry_id,
            first,
            f"event is nested deeper than {MAX_NESTING} levels of objects and arrays:"
            " flatten it, or send such data by reference",
        )
    if lossy:  # two identifiers must not become one key (both cut to U+FFFD)
        exact = json.loads(raw)  # the standard library keeps lone surrogates as they are
        for name in ("eventId", "executionId"):
            value = exact.get(name)
            if isinstance(value, str) and _SURROGATE.search(value):
                reason = f"{name}: holds a lone surrogate (a string cut inside a character)"
                return InvalidEntry(entry_id, first, reason)
    facts = quick_event_facts(data, plain=_plain(raw))
    if facts is None:
        checked = model_event_facts(data)
        if isinstance(checked, str):
            return InvalidEntry(entry_id, first, checked)
        facts = checked
    future = 0
    max_future_ms = limits.max_future_seconds * 1000
    if facts[4] > added_at_least + max_future_ms:
        if added_ms is None:
            added_ms = entry_ms(entry_id)
        future = facts[4] - added_ms if added_ms is not None else 0
    if future > max_future_ms:
        return InvalidEntry(
            entry_id,
            first,
            f"occurredAt: {data['occurredAt']!r} is {future // 3_600_000} h after the entry"
            " was added, over the"
            f" {limits.max_future_seconds} s limit (TASK_TRACKING_MAX_FUTURE_SECONDS):"
            " check the publisher's clock",
        )
    if 10 in raw or 13 in raw:  # b"\n", b"\r" (an int is found by memchr)
        raw = _one_line(raw)  # an archive line holds one event
    warnings = optional_field_warnings(data)
    # positional: EventFacts is (event_id, execution_id, project, status, occurred_at_ms)
    return ValidEvent(entry_id, raw, data, *facts, warnings)


def _nesting(data: object) -> int:
    """How many levels of objects and arrays `data` has (without recursion: the depth is
    what is being checked)."""
    deepest = 0
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(data, 1)] if _nested(data) else []
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if _nested(child))
    return deepest


def _nested(value: object) -> TypeGuard[dict[str, Any] | list[Any]]:
    return isinstance(value, dict | list)


def _plain(raw: bytes) -> bool:
    """True when no string decoded from this JSON can hold a control character: C0 ones
    must be escaped in JSON (so there is no backslash), DEL is byte 0x7F, and the C1 ones
    are U+0080-U+009F, whose UTF-8 starts with 0xC2. Three byte searches (memchr) instead
    of a scan of each identifier."""
    return 92 not in raw and 127 not in raw and 0xC2 not in raw


def _several_values(entry_id: str, values: Sequence[EventValue]) -> InvalidEntry:
    """An entry with the `event` field more than once: every value goes to the dead-letter
    stream (projecting one would lose the other)."""
    kept = [value.prefix if isinstance(value, Oversized) else value for value in values]
    sizes = [value.size for value in values if isinstance(value, Oversized)]
    return InvalidEntry(
        entry_id,
        kept[0],
        f"entry has {len(values)} 'event' fields; publish one event per entry"
        " (every value is kept here)",
        more=tuple(kept[1:]),
        size=max(sizes) if sizes else None,
    )


def entry_ms(entry_id: str) -> int | None:
    """The time in a stream entry ID, or None for an ID of another kind."""
    try:
        return int(entry_id.partition("-")[0])
    except ValueError:  # not a stream ID (replay's archive:… IDs)
        return None


# An escaped backslash (kept), an escaped surrogate pair (kept), or a lone surrogate escape.
_ESCAPE = re.compile(
    rb"\\(?:\\|[uU][dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    rb"|(u[dD][89a-fA-F][0-9a-fA-F]{2}))"
)


def _parse_with_lone_surrogates(raw: bytes) -> Any:
    """The event with each escaped lone surrogate read as U+FFFD (as Node's Buffer encodes
    one for Redis), or None if that is not the problem. orjson refuses them; `JSON.parse`
    does not. The archive keeps the escape as it was sent."""
    if b"\\u" not in raw:
        return None
    replaced = _ESCAPE.sub(lambda m: b"\\ufffd" if m.group(1) else m.group(0), raw)
    if replaced == raw:
        return None
    try:
        return orjson.loads(replaced)
    except orjson.JSONDecodeError:
        return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _one_line(raw: bytes) -> bytes:
    """The compact one-line form of JSON sent over several lines (the only archive line
    whose bytes differ from the stream's): the standard library keeps large integers and
    lone surrogates (written back as escapes) exactly."""
    text = json.dumps(json.loads(raw), ensure_ascii=False, separators=(",", ":"))
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).encode()
