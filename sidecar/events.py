"""The task lifecycle event: its contract, its parsing from a stream entry, its ordering key.

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

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, NamedTuple

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)
from pydantic.alias_generators import to_camel

EVENT_FIELD = b"event"
STATUS_RANK = {"in_progress": 0, "success": 1, "error": 1}
PROJECT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,38}/(?!\.{1,2}$)[A-Za-z0-9._-]{1,100}")

Status = Literal["in_progress", "success", "error"]
NonEmpty = Annotated[StrictStr, Field(min_length=1)]
OrderingKey = tuple[int, int, str]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MS = timedelta(milliseconds=1)

# eventId, executionId and taskName become Redis keys, log fields and terminal output.
IDENTIFIER_MAX_BYTES = 512
# Identifiers this short are within IDENTIFIER_MAX_BYTES whatever their characters (at most
# 4 bytes each in UTF-8); only longer ones are encoded to be measured.
SHORT = IDENTIFIER_MAX_BYTES // 4
# Fields whose malformed value is a warning, not a refusal.
OPTIONAL_FIELDS = ("actor", "prLinks", "visibility", "flow")
# C0, DEL and C1 controls: a newline or NUL in a key or a log line is never meant.
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# An integer occurredAt below this is 1973 in milliseconds, but 5138 in seconds.
EPOCH_SECONDS_BELOW = 100_000_000_000
EPOCH_MS_BELOW = 10**14
# What a dead-letter entry keeps of an event, at most (the rest is cut, its size noted).
DEAD_LETTER_EVENT_BYTES = 64 * 1024
JSON_WHITESPACE = b" \t\r\n"


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


class TaskEvent(BaseModel):
    """One lifecycle event, camelCase on the wire as the Node.js publisher writes it.

    The required fields are checked strictly: the projection's correctness rests on them.
    Optional fields are typed loosely (any JSON): a malformed one is a warning, not an
    error (`optional_field_warnings`). Unknown extra fields are allowed and preserved.
    """

    model_config = ConfigDict(extra="allow", alias_generator=to_camel)

    event_id: NonEmpty
    execution_id: NonEmpty
    task_name: NonEmpty
    status: Status
    project: StrictStr
    occurred_at: StrictStr | StrictInt
    actor: Any = None  # {"provider": "slack"|"github", "id": str|int, display fields…}
    pr_links: Any = None  # ["https://github.com/…", …]
    visibility: Any = None  # {"responsibleUsers": [str, …]}
    flow: Any = None  # str

    @field_validator("event_id", "execution_id", "task_name")
    @classmethod
    def _identifier(cls, value: str) -> str:
        problem = identifier_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("project")
    @classmethod
    def _project_shape(cls, value: str) -> str:
        if not PROJECT_RE.fullmatch(value):
            raise ValueError("must be owner/repo (GitHub names; repo not '.' or '..')")
        return value

    @field_validator("occurred_at")
    @classmethod
    def _timestamp(cls, value: str | int) -> str | int:
        occurred_at_ms(value)  # raises ValueError with the reason
        return value

    @property
    def occurred_at_ms(self) -> int:
        return occurred_at_ms(self.occurred_at)

    @property
    def ordering_key(self) -> OrderingKey:
        return (self.occurred_at_ms, STATUS_RANK[self.status], self.event_id)

    def to_json(self) -> bytes:
        """The event as the stream carries it: camelCase JSON, unset optional fields left out."""
        return orjson.dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True))


def identifier_problem(value: str) -> str | None:
    """Why a string cannot be an identifier (eventId, executionId, taskName), or None."""
    if len(value) > SHORT and len(value.encode()) > IDENTIFIER_MAX_BYTES:
        return f"longer than {IDENTIFIER_MAX_BYTES} bytes; identifiers must be short"
    control = CONTROL_CHARACTER.search(value)
    if control is not None:
        code = f"U+{ord(control.group()):04X}"
        return f"holds a control character ({code}); identifiers must be printable"
    return None


def occurred_at_ms(value: str | int) -> int:
    """Epoch milliseconds of an `occurredAt`: ISO-8601 / RFC 3339 with a timezone, or
    epoch ms."""
    if isinstance(value, int):
        if isinstance(value, bool) or not 0 <= value < EPOCH_MS_BELOW:
            raise ValueError("epoch milliseconds must be a non-negative integer below 10^14")
        if value < EPOCH_SECONDS_BELOW:
            raise ValueError(
                f"{value} looks like epoch seconds; send milliseconds ({value * 1000})"
            )
        return value
    try:
        # RFC 3339 allows lower-case t and z; Python's parser wants them upper-case
        parsed = datetime.fromisoformat(value.upper() if "t" in value or "z" in value else value)
    except ValueError:
        raise ValueError("must be ISO-8601 with a timezone or epoch milliseconds") from None
    if parsed.tzinfo is None:
        raise ValueError("ISO-8601 timestamp needs a timezone (for example ...T10:00:00.000Z)")
    millis = (parsed - EPOCH) // ONE_MS
    if millis < 0:  # as for epoch ms; and 0001-01-01T00:00+01:00 has no UTC day at all
        raise ValueError("must not be before 1970-01-01T00:00:00Z")
    return millis


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


# The facts workers need from a valid event: eventId, executionId, project, status, occurredAt ms.
EventFacts = tuple[str, str, str, str, int]


@functools.lru_cache(maxsize=4096)
def _is_project(name: str) -> bool:
    """`PROJECT_RE`, remembered: a stream carries few projects, many times each."""
    return PROJECT_RE.fullmatch(name) is not None


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
    if lossy:  # two identifiers must not become one key
        for name in ("eventId", "executionId"):
            if "\ufffd" in str(data.get(name, "")):
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


def model_event_facts(data: dict[str, Any]) -> EventFacts | str:
    """The reference verdict, by the `TaskEvent` model: the event's facts, or why it is
    invalid (one line)."""
    try:
        event = TaskEvent.model_validate(data)
    except ValidationError as exc:
        return describe_event_error(exc)
    except Exception as exc:  # a validator bug must not stop the stream
        return f"event could not be validated: {exc!r}"
    return (event.event_id, event.execution_id, event.project, event.status, event.occurred_at_ms)


def quick_event_facts(data: dict[str, Any], *, plain: bool = False) -> EventFacts | None:
    """The facts of an event in the common, plainly valid shape, without pydantic (which
    cost more than the rest of the projector's per-event work); None when the event is
    anything else, and the model decides. Agrees with `model_event_facts` on every
    event it accepts (tests/unit/test_event_fast_path.py).

    `plain`: the caller knows no string of the event holds a control character (see
    `_plain`), so the identifiers need no scan."""
    event_id = data.get("eventId")
    execution_id = data.get("executionId")
    task_name = data.get("taskName")
    status = data.get("status")
    project = data.get("project")
    occurred_at = data.get("occurredAt")
    if not (
        type(event_id) is str
        and type(execution_id) is str
        and type(task_name) is str
        and 0 < len(event_id) <= SHORT
        and 0 < len(execution_id) <= SHORT
        and 0 < len(task_name) <= SHORT
        and (
            plain
            or not any(CONTROL_CHARACTER.search(s) for s in (event_id, execution_id, task_name))
        )
        and type(status) is str
        and status in STATUS_RANK
        and type(project) is str
        and _is_project(project)
        and (type(occurred_at) is int or type(occurred_at) is str)
    ):
        return None
    try:
        occurred_ms = occurred_at_ms(occurred_at)
    except ValueError:
        return None
    return (event_id, execution_id, project, status, occurred_ms)


_URL_SCHEMES = ("https://", "http://")


def optional_field_warnings(data: dict[str, Any]) -> tuple[str, ...]:
    """The optional fields present in a shape other than the contract's (kept as sent;
    counted in `task_tracking_event_warnings_total{field}`). Loops, not all(): this runs
    for every event."""
    warnings: tuple[str, ...] = ()
    actor = data.get("actor")
    if actor is not None and not (
        type(actor) is dict
        and actor.get("provider") in ("slack", "github")
        and type(actor.get("provider")) is str
        and (
            (type(actor.get("id")) is str and actor["id"])
            or type(actor.get("id")) is int  # GitHub's numeric user id
        )
    ):
        warnings += ("actor",)
    links = data.get("prLinks")
    if links is not None:
        if type(links) is not list:
            warnings += ("prLinks",)
        else:
            for link in links:
                if type(link) is not str or not (
                    link.startswith(_URL_SCHEMES) or link[:8].lower().startswith(_URL_SCHEMES)
                ):
                    warnings += ("prLinks",)
                    break
    visibility = data.get("visibility")
    if visibility is not None:
        if type(visibility) is not dict:
            warnings += ("visibility",)
        else:
            users = visibility.get("responsibleUsers")
            if users is not None:
                if type(users) is not list:
                    warnings += ("visibility",)
                else:
                    for user in users:
                        if type(user) is not str:
                            warnings += ("visibility",)
                            break
    flow = data.get("flow")
    if flow is not None and type(flow) is not str:
        warnings += ("flow",)
    return warnings


def describe_event_error(exc: ValidationError) -> str:
    """All problems of an event, as one line: `field: message; field: message`."""
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "event"
        problems.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)
