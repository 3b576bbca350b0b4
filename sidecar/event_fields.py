"""The event's fields: the `TaskEvent` model and the check of each field.

`sidecar.events` decodes a stream entry and applies the entry-level rules (size, the
future limit, several `event` fields); this module holds what one decoded JSON object is
checked against: the model (the reference verdict), the fast path that agrees with it on
every event it accepts, and the optional fields' warnings.
"""

from __future__ import annotations

import functools
import re
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

    @field_validator("occurred_at", mode="before")
    @classmethod
    def _whole_number(cls, value: object) -> object:
        # JSON.parse reads 1796410553575.0 and 1.796410553575e12 as integers (Python's
        # json.dumps writes a float so); a fraction, infinity or NaN stays refused.
        if type(value) is float and value.is_integer():
            return int(value)
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


# The facts workers need from a valid event: eventId, executionId, project, status, occurredAt ms.
EventFacts = tuple[str, str, str, str, int]


@functools.lru_cache(maxsize=4096)
def _is_project(name: str) -> bool:
    """`PROJECT_RE`, remembered: a stream carries few projects, many times each."""
    return PROJECT_RE.fullmatch(name) is not None


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
    """All problems of an event, as one line: `field: message; field: message`.

    A value of neither type of `occurredAt` (null, as JSON.stringify writes an invalid
    Date; a float; an object) is one problem, not pydantic's one per member of the union."""
    problems: list[str] = []
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        if loc[:1] == ("occurredAt",) and loc[1:] in (("str",), ("int",)):
            problem = (
                f"occurredAt: {_json_kind(error['input'])} is not a timestamp;"
                " send ISO-8601 with a timezone or epoch milliseconds"
            )
            if problem not in problems:
                problems.append(problem)
            continue
        where = ".".join(str(part) for part in loc) or "event"
        problems.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def _json_kind(value: Any) -> str:
    """A JSON value as a publisher would name it in a message."""
    if value is None or isinstance(value, bool):
        return orjson.dumps(value).decode()
    if isinstance(value, float):
        return f"{value!r} (a number with a fraction)"
    return "an array" if isinstance(value, list) else "an object"
