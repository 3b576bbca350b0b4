"""The event contract: parsing, the project rule, timestamps, the ordering key."""

from __future__ import annotations

import orjson
import pytest

from sidecar.events import InvalidEntry, ValidEvent, decode_entry, occurred_at_ms
from tests.helpers import ADDED_MS, event


def decode(data: object) -> ValidEvent | InvalidEntry:
    raw = data if isinstance(data, bytes) else orjson.dumps(data)
    return decode_entry(f"{ADDED_MS}-0", {b"event": raw})


def test_valid_event_keeps_raw_bytes_and_unknown_fields() -> None:
    data = event(extra_field={"nested": [1, 2]}, flow="release")
    raw = orjson.dumps(data)
    decoded = decode_entry(f"{ADDED_MS}-1", {b"event": raw})
    assert isinstance(decoded, ValidEvent)
    assert decoded.raw == raw
    assert decoded.fields["extra_field"] == {"nested": [1, 2]}
    assert decoded.entry_id == f"{ADDED_MS}-1"


def test_iso_and_epoch_ms_timestamps_give_the_same_millisecond() -> None:
    assert occurred_at_ms("2023-11-14T22:13:20.000Z") == 1_700_000_000_000
    assert occurred_at_ms("2023-11-14T23:13:20.123+01:00") == 1_700_000_000_123
    assert occurred_at_ms(1_700_000_000_123) == 1_700_000_000_123


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "must be a JSON object"),
        ({k: v for k, v in event().items() if k != "executionId"}, "executionId"),
        (event(status="done"), "status"),
        (event(project="../x"), "project"),
        (event(project="org/.."), "project"),
        (event(project="org/."), "project"),
        (event(project="-org/repo"), "project"),
        (event(project="org"), "project"),
        (event(occurred_at="2026-03-15T10:00:00"), "timezone"),
        (event(occurred_at="yesterday"), "occurredAt"),
        (event(occurred_at=True), "occurredAt"),
        (event(occurred_at=1.5), "occurredAt"),
        (event(occurred_at=-1), "occurredAt"),
        (event(occurred_at="1969-12-31T23:59:59.999Z"), "before 1970"),
        (event(occurred_at="0001-01-01T00:00:00+01:00"), "before 1970"),  # no UTC day
        (event(event_id=""), "eventId"),
    ],
)
def test_invalid_events_come_back_as_values_with_a_reason(data: object, reason: str) -> None:
    decoded = decode(data)
    assert isinstance(decoded, InvalidEntry)
    assert reason in decoded.reason
    assert "\n" not in decoded.reason


def test_entry_without_event_field_is_invalid() -> None:
    decoded = decode_entry(f"{ADDED_MS}-0", {b"other": b"x"})
    assert isinstance(decoded, InvalidEntry)
    assert decoded.raw is None
    assert "no 'event' field" in decoded.reason


def test_terminal_status_outranks_in_progress_at_the_same_millisecond() -> None:
    started = decode(event(status="in_progress", event_id="z"))
    finished = decode(event(status="success", event_id="a"))
    assert isinstance(started, ValidEvent) and isinstance(finished, ValidEvent)
    assert finished.ordering_key > started.ordering_key


def test_project_rule_accepts_github_names() -> None:
    for project in ["a/b", "my-org/my.repo_1", "A1-b/..x", "o" * 39 + "/" + "r" * 100]:
        assert isinstance(decode(event(project=project)), ValidEvent), project
    for project in ["o" * 40 + "/r", "org/" + "r" * 101, "org/re po", "org/a/b"]:
        assert isinstance(decode(event(project=project)), InvalidEntry), project
