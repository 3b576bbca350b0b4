"""The task lifecycle event: its contract, its parsing from a stream entry, its ordering key.

Parsing never raises: `decode_entry` returns either a `ValidEvent` or an
`InvalidEntry` carrying a one-line reason, which workers dead-letter.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

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


class Actor(BaseModel):
    """Who triggered the task; display fields beyond `provider` and `id` are kept as sent."""

    model_config = ConfigDict(extra="allow")

    provider: Literal["slack", "github"]
    id: NonEmpty


class Visibility(BaseModel):
    model_config = ConfigDict(extra="allow", alias_generator=to_camel, populate_by_name=True)

    responsible_users: list[StrictStr] | None = None


class TaskEvent(BaseModel):
    """One lifecycle event, camelCase on the wire as the Node.js publisher writes it.

    Unknown extra fields are allowed and preserved.
    """

    model_config = ConfigDict(extra="allow", alias_generator=to_camel, populate_by_name=True)

    event_id: NonEmpty
    execution_id: NonEmpty
    task_name: NonEmpty
    status: Status
    project: StrictStr
    occurred_at: StrictStr | StrictInt
    actor: Actor | None = None
    pr_links: list[StrictStr] | None = None
    visibility: Visibility | None = None
    flow: StrictStr | None = None

    @field_validator("project")
    @classmethod
    def _project_shape(cls, value: str) -> str:
        if not PROJECT_RE.fullmatch(value):
            raise ValueError("must be owner/repo (GitHub names; repo not '.' or '..')")
        return value

    @field_validator("pr_links")
    @classmethod
    def _urls(cls, value: list[str] | None) -> list[str] | None:
        for link in value or ():
            if not link.startswith(("https://", "http://")):
                raise ValueError(f"{link!r} is not an http(s) URL")
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


def occurred_at_ms(value: str | int) -> int:
    """Epoch milliseconds of an `occurredAt`: ISO-8601 with a timezone, or epoch ms."""
    if isinstance(value, int):
        if isinstance(value, bool) or not 0 <= value < 10**14:
            raise ValueError("epoch milliseconds must be a non-negative integer below 10^14")
        return value
    try:
        parsed = datetime.fromisoformat(value)
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
    raw: bytes  # the `event` field exactly as it stood in the stream
    fields: dict[str, Any]  # the decoded top-level JSON object
    event_id: str
    execution_id: str
    project: str
    status: str
    occurred_at_ms: int

    @property
    def ordering_key(self) -> OrderingKey:
        return (self.occurred_at_ms, STATUS_RANK[self.status], self.event_id)


@dataclass(frozen=True, slots=True)
class InvalidEntry:
    """A stream entry that cannot be processed, and why."""

    entry_id: str
    raw: bytes | None  # the `event` field if the entry had one
    reason: str


# The facts workers need from a valid event: eventId, executionId, project, status, occurredAt ms.
EventFacts = tuple[str, str, str, str, int]

# Python names of aliased fields: with `populate_by_name` the model accepts these too, and
# which of two spellings wins is the model's business, so the fast path leaves them to it.
_FIELD_NAMES = frozenset({"event_id", "execution_id", "task_name", "occurred_at", "pr_links"})
_URL_SCHEMES = ("https://", "http://")


@functools.lru_cache(maxsize=4096)
def _is_project(name: str) -> bool:
    """`PROJECT_RE`, remembered: a stream carries few projects, many times each."""
    return PROJECT_RE.fullmatch(name) is not None


def decode_entry(entry_id: str, fields: dict[bytes, bytes]) -> ValidEvent | InvalidEntry:
    """Decode one stream entry. Never raises: problems come back as `InvalidEntry`."""
    raw = fields.get(EVENT_FIELD)
    if raw is None:
        return InvalidEntry(entry_id, None, "entry has no 'event' field")
    if 10 in raw or 13 in raw:  # b"\n", b"\r" (an int is found by memchr, 10x faster)
        # An archive line holds one event as it stood in the stream.
        return InvalidEntry(entry_id, raw, "event JSON must be on one line (no raw line breaks)")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return InvalidEntry(entry_id, raw, f"event is not JSON: {exc}")
    if not isinstance(data, dict):
        return InvalidEntry(
            entry_id, raw, f"event must be a JSON object, got {type(data).__name__}"
        )
    facts = quick_event_facts(data)
    if facts is None:
        checked = model_event_facts(data)
        if isinstance(checked, str):
            return InvalidEntry(entry_id, raw, checked)
        facts = checked
    # positional: EventFacts is (event_id, execution_id, project, status, occurred_at_ms)
    return ValidEvent(entry_id, raw, data, *facts)


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


def quick_event_facts(data: dict[str, Any]) -> EventFacts | None:
    """The facts of an event in the common, plainly valid shape, without pydantic (which
    cost more than the rest of the projector's per-event work); None when the event is
    anything else, and the model decides. Agrees with `model_event_facts` on every
    event it accepts (tests/unit/test_event_fast_path.py)."""
    event_id = data.get("eventId")
    execution_id = data.get("executionId")
    task_name = data.get("taskName")
    status = data.get("status")
    project = data.get("project")
    occurred_at = data.get("occurredAt")
    if not (
        type(event_id) is str
        and event_id
        and type(execution_id) is str
        and execution_id
        and type(task_name) is str
        and task_name
        and type(status) is str
        and status in STATUS_RANK
        and type(project) is str
        and _is_project(project)
        and (type(occurred_at) is int or type(occurred_at) is str)
        and _FIELD_NAMES.isdisjoint(data)
    ):
        return None
    try:
        occurred_ms = occurred_at_ms(occurred_at)
    except ValueError:
        return None
    actor = data.get("actor")
    if actor is not None and not (
        type(actor) is dict
        and actor.get("provider") in ("slack", "github")
        and type(actor.get("provider")) is str
        and type(actor.get("id")) is str
        and actor["id"]
    ):
        return None
    links = data.get("prLinks")
    if links is not None:
        if type(links) is not list:
            return None
        for link in links:
            if type(link) is not str or not link.startswith(_URL_SCHEMES):
                return None
    visibility = data.get("visibility")
    if visibility is not None:
        if type(visibility) is not dict or "responsible_users" in visibility:
            return None
        users = visibility.get("responsibleUsers")
        if users is not None and not (
            type(users) is list and all(type(user) is str for user in users)
        ):
            return None
    flow = data.get("flow")
    if flow is not None and type(flow) is not str:
        return None
    return (event_id, execution_id, project, status, occurred_ms)


def describe_event_error(exc: ValidationError) -> str:
    """All problems of an event, as one line: `field: message; field: message`."""
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "event"
        problems.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)
