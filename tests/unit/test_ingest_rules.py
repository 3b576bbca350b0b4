"""What the projector accepts and refuses (DESIGN.md, "What the projector accepts").

Event texts come from `tests/data/node_json_stringify.json`, written by Node's
`JSON.stringify` (made by running tests/data/make_node_fixture.js with node 20), so
the cases are what a TypeScript publisher really sends, byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from sidecar.events import (
    DEAD_LETTER_EVENT_BYTES,
    DEFAULT_LIMITS,
    EventLimits,
    InvalidEntry,
    Oversized,
    ValidEvent,
    decode_values,
)
from tests.helpers import ADDED_MS, event

FIXTURE = json.loads(
    (Path(__file__).parent.parent / "data" / "node_json_stringify.json").read_text()
)
CASES = {case["name"]: case for case in FIXTURE["cases"]}
ENTRY = f"{ADDED_MS}-0"


def decode(raw: bytes, limits: EventLimits = DEFAULT_LIMITS) -> ValidEvent | InvalidEntry:
    return decode_values(ENTRY, [raw], limits)


@pytest.mark.parametrize("name", sorted(CASES))
def test_node_event_texts_get_the_verdict_json_parse_and_the_contract_give(name: str) -> None:
    case = CASES[name]
    decoded = decode(case["text"].encode())
    verdict = "valid" if isinstance(decoded, ValidEvent) else "invalid"
    assert verdict == case["verdict"], getattr(decoded, "reason", decoded)
    if isinstance(decoded, InvalidEntry):
        assert "\n" not in decoded.reason
        assert decoded.raw == case["text"].encode()  # dead-lettered as received


def test_one_line_events_are_archived_as_sent_less_surrounding_whitespace() -> None:
    for name in ("trailing newline", "trailing CRLF", "lone high surrogate from slice()"):
        text = CASES[name]["text"].encode()
        decoded = decode(b"  " + text + b"\n\n")
        assert isinstance(decoded, ValidEvent)
        assert decoded.raw == text.strip(), name


def test_pretty_printed_event_is_archived_as_its_compact_form() -> None:
    for name in ("pretty-printed", "pretty-printed with tabs"):
        text = CASES[name]["text"]
        decoded = decode(text.encode())
        assert isinstance(decoded, ValidEvent)
        assert b"\n" not in decoded.raw and b"\r" not in decoded.raw
        assert json.loads(decoded.raw) == json.loads(text)
        assert decoded.raw == json.dumps(json.loads(text), separators=(",", ":")).encode()


def test_lone_surrogates_are_kept_as_sent_in_the_archive_and_replaced_in_the_fields() -> None:
    text = CASES["lone high surrogate from slice()"]["text"].encode()
    decoded = decode(text)
    assert isinstance(decoded, ValidEvent)
    assert b"\\ud83d" in decoded.raw and decoded.raw == text
    # Node's Buffer writes U+FFFD for a lone surrogate; the projection stores the same
    assert decoded.fields["actor"]["displayName"] == "Zoë \ufffd"
    orjson.dumps(decoded.fields)  # the projector can serialize it


def test_a_real_replacement_character_in_an_id_is_not_a_lone_surrogate() -> None:
    """Found by a user drive: with a lone surrogate elsewhere in the event (a task name
    cut inside an emoji), an ID holding a real U+FFFD was refused as holding one."""
    text = orjson.dumps(event(event_id="ev-\ufffd-1", taskName="cut PLACE"))
    decoded = decode(text.replace(b"PLACE", b"\\ud83d"))
    assert isinstance(decoded, ValidEvent) and decoded.event_id == "ev-\ufffd-1"
    refused = decode(orjson.dumps(event(event_id="ev-PLACE")).replace(b"PLACE", b"\\ud83d"))
    assert isinstance(refused, InvalidEntry)
    assert refused.reason == "eventId: holds a lone surrogate (a string cut inside a character)"


def test_an_escaped_backslash_before_u_is_not_a_surrogate_escape() -> None:
    raw = orjson.dumps(event())[:-1] + b',"note":"C:\\\\ud83d\\\\"}'
    decoded = decode(raw)
    assert isinstance(decoded, ValidEvent)
    assert decoded.fields["note"] == "C:\\ud83d\\"


def test_multi_line_event_with_a_lone_surrogate_keeps_the_escape() -> None:
    raw = b'{\n "note": "\\udc00",\n' + orjson.dumps(event())[1:]
    decoded = decode(raw)
    assert isinstance(decoded, ValidEvent)
    assert b'"note":"\\udc00"' in decoded.raw and b"\n" not in decoded.raw


def test_malformed_optional_fields_are_kept_and_named_as_warnings() -> None:
    decoded = decode(CASES["malformed optional fields"]["text"].encode())
    assert isinstance(decoded, ValidEvent)
    assert decoded.warnings == ("actor", "prLinks", "visibility", "flow")
    assert decoded.fields["actor"] == "octocat" and decoded.fields["flow"] == 7
    clean = decode(orjson.dumps(event(actor={"provider": "github", "id": 1}, prLinks=[])))
    assert isinstance(clean, ValidEvent) and clean.warnings == ()


@pytest.mark.parametrize(
    ("extra", "warning"),
    [
        ({"actor": {"provider": "email", "id": "x"}}, "actor"),
        ({"actor": {"provider": "github", "id": ""}}, "actor"),
        ({"actor": {"provider": "github", "id": True}}, "actor"),
        ({"prLinks": ["not a url"]}, "prLinks"),
        ({"prLinks": [1]}, "prLinks"),
        ({"visibility": {"responsibleUsers": "a"}}, "visibility"),
        ({"visibility": {"responsibleUsers": [1]}}, "visibility"),
        ({"flow": ["a"]}, "flow"),
    ],
)
def test_each_malformed_optional_field_is_a_warning(extra: dict[str, Any], warning: str) -> None:
    decoded = decode(orjson.dumps(event(**extra)))
    assert isinstance(decoded, ValidEvent)
    assert decoded.warnings == (warning,)


def test_event_over_the_size_limit_is_refused_before_decoding_with_a_bounded_prefix() -> None:
    limits = EventLimits(max_event_bytes=2048)
    raw = orjson.dumps(event(blob="x" * 100_000))
    decoded = decode(raw, limits)
    assert isinstance(decoded, InvalidEntry)
    assert "over the 2048 byte limit (TASK_TRACKING_MAX_EVENT_BYTES)" in decoded.reason
    assert decoded.size == len(raw)
    fields = decoded.dead_letter_fields()
    assert fields[fields.index("eventBytes") + 1] == len(raw)
    assert len(fields[fields.index("event") + 1]) == DEAD_LETTER_EVENT_BYTES  # type: ignore[arg-type]
    # as the bounded read hands it over: only a prefix ever reached the sidecar
    cut = decode_values(ENTRY, [Oversized(raw[:100], len(raw))], limits)
    assert isinstance(cut, InvalidEntry) and cut.size == len(raw) and cut.raw == raw[:100]


def test_event_at_the_size_limit_is_accepted() -> None:
    raw = orjson.dumps(event())
    raw = raw[:-1] + b',"pad":"' + b"x" * (2048 - len(raw) - 9) + b'"}'
    assert len(raw) == 2048
    assert isinstance(decode(raw, EventLimits(max_event_bytes=2048)), ValidEvent)


def test_entry_with_the_event_field_twice_is_refused_with_every_value() -> None:
    first, second = orjson.dumps(event("a")), orjson.dumps(event("b"))
    decoded = decode_values(ENTRY, [first, second])
    assert isinstance(decoded, InvalidEntry)
    assert "2 'event' fields" in decoded.reason
    fields = decoded.dead_letter_fields()
    assert [fields[i + 1] for i, name in enumerate(fields) if name == "event"] == [first, second]


def test_future_limit_counts_from_the_entry_time_not_the_clock() -> None:
    day = 86_400_000
    ahead = orjson.dumps(event(occurred_at=ADDED_MS + day + 1))
    assert isinstance(decode(ahead), InvalidEntry)
    assert isinstance(decode_values(f"{ADDED_MS + 2}-0", [ahead]), ValidEvent)
    assert isinstance(decode(orjson.dumps(event(occurred_at=ADDED_MS + day))), ValidEvent)
    assert isinstance(decode(ahead, EventLimits(max_future_seconds=2 * 86_400)), ValidEvent)
    reason = decode(orjson.dumps(event(occurred_at="9999-12-31T23:59:59Z"))).reason  # type: ignore[union-attr]
    assert "TASK_TRACKING_MAX_FUTURE_SECONDS" in reason and "'9999-12-31T23:59:59Z'" in reason


def test_epoch_seconds_are_refused_with_the_fix() -> None:
    decoded = decode(orjson.dumps(event(occurred_at=1_796_151_007)))
    assert isinstance(decoded, InvalidEntry)
    assert "looks like epoch seconds; send milliseconds (1796151007000)" in decoded.reason


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (None, "null"),  # JSON.stringify(new Date(NaN))
        (1.5, "1.5 (a number with a fraction)"),  # performance.now(), seconds / 1000
        (True, "true"),
        ([2026, 3, 15], "an array"),
        ({"seconds": 1}, "an object"),
    ],
)
def test_an_occurred_at_of_neither_type_is_one_problem_with_the_fix(value: Any, named: str) -> None:
    decoded = decode(orjson.dumps(event(occurred_at=value)))
    assert isinstance(decoded, InvalidEntry)
    assert decoded.reason == (
        f"occurredAt: {named} is not a timestamp;"
        " send ISO-8601 with a timezone or epoch milliseconds"
    )


@pytest.mark.parametrize("field", ["eventId", "executionId", "taskName"])
@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("x" * 512, True),
        ("x" * 513, False),
        ("é" * 256, True),  # 512 bytes
        ("é" * 257, False),
        ("a\tb", False),
        ("a\x7fb", False),
        ("a\x85b", False),
        ("a b/c:d*e", True),
        ("デプロイ", True),
    ],
)
def test_identifier_rules(field: str, value: str, accepted: bool) -> None:
    data = event()
    data[field] = value
    decoded = decode(orjson.dumps(data))
    assert isinstance(decoded, ValidEvent) is accepted, getattr(decoded, "reason", None)
    if not accepted:
        assert decoded.reason.startswith(f"{field}: ")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("value", "outcome"),
    [
        # integers to JSON.parse (Python's json.dumps writes a float's ".0")
        ("1796410553575.0", 1796410553575),
        ("1.796410553575e12", 1796410553575),
        # a fraction stays refused; a whole number out of range is named as such
        ("1796410553575.5", "occurredAt: 1796410553575.5 (a number with a fraction) is not"),
        ("1e21", "occurredAt: epoch milliseconds must be a non-negative integer below 10^14"),
        ("1796410553.0", "occurredAt: 1796410553 looks like epoch seconds; send milliseconds"),
    ],
)
def test_a_whole_number_written_as_a_float_is_read_as_javascript_reads_it(
    value: str, outcome: int | str
) -> None:
    fields = {name: v for name, v in event().items() if name != "occurredAt"}
    decoded = decode(orjson.dumps(fields)[:-1] + f',"occurredAt":{value}}}'.encode())
    if isinstance(outcome, int):
        assert isinstance(decoded, ValidEvent) and decoded.occurred_at_ms == outcome
    else:
        assert isinstance(decoded, InvalidEntry) and decoded.reason.startswith(outcome)
