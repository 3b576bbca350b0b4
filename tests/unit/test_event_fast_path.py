"""The fast path of event validation agrees with the pydantic model on every input.

`quick_event_facts` may decline an event (None: the model decides), but whatever it
accepts the `TaskEvent` model must accept with the same facts.
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.events import (
    ValidEvent,
    decode_entry,
    decode_values,
    model_event_facts,
    quick_event_facts,
)
from tests.helpers import ADDED_MS, event

NASTY_TEXT = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "\n",
        "é",
        "💥",
        "in_progress ",
        "IN_PROGRESS",
        "success\n",
        "my-org/my-repo\n",
        "my-org/.",
        "my-org/..",
        "my-org/...",
        "-org/repo",
        "a" * 39 + "/r",
        "a" * 40 + "/r",
        "o/" + "r" * 100,
        "o/" + "r" * 101,
        "o/r/x",
        "2026-03-15T10:00:00.000Z",
        "2026-03-15T10:00:00",
        "2026-03-15T10:00:00+01:00",
        "2026-03-15",
        "2026-03-15 10:00:00Z",
        "20260315T100000Z",
        "1700000000000",
        "https://x",
        "http://x",
        "ftp://x",
        "HTTPS://x",
        "slack",
        "github",
        "Slack",
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    NASTY_TEXT,
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.one_of(st.text(max_size=6), NASTY_TEXT), inner, max_size=3)
    ),
    max_leaves=8,
)
KEYS = st.sampled_from(
    [
        "eventId",
        "executionId",
        "taskName",
        "status",
        "project",
        "occurredAt",
        "actor",
        "prLinks",
        "visibility",
        "flow",
        "event_id",
        "execution_id",
        "task_name",
        "occurred_at",
        "pr_links",
        "model_config",
        "__class__",
        "_private",
        "extra",
    ]
)
ACTOR = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {"provider": st.one_of(st.sampled_from(["slack", "github"]), JSON), "id": JSON},
        optional={"displayName": JSON, "provider_": JSON},
    ),
)
VISIBILITY = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {},
        optional={
            "responsibleUsers": st.one_of(JSON, st.lists(st.one_of(st.text(), JSON))),
            "responsible_users": JSON,
        },
    ),
)


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly valid events with a few fields broken, replaced, removed or added."""
    data = event(
        status=draw(st.sampled_from(["in_progress", "success", "error"])),
        occurred_at=draw(
            st.one_of(
                st.integers(min_value=0, max_value=10**14 - 1),
                st.sampled_from(["2026-03-15T10:00:00.000Z", "2026-03-15T10:00:00+05:30"]),
            )
        ),
    )
    for name, strategy in (
        ("actor", ACTOR),
        ("prLinks", st.one_of(JSON, st.lists(st.one_of(NASTY_TEXT, JSON), max_size=3))),
        ("visibility", VISIBILITY),
        ("flow", JSON),
    ):
        if draw(st.booleans()):
            data[name] = draw(strategy)
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        key = draw(KEYS)
        if draw(st.integers(min_value=0, max_value=3)) == 0:
            data.pop(key, None)
        else:
            data[key] = draw(st.one_of(JSON, NASTY_TEXT, st.integers()))
    return data


@settings(max_examples=1000, deadline=None)
@given(events())
def test_fast_path_accepts_only_what_the_model_accepts_with_the_same_facts(
    data: dict[str, Any],
) -> None:
    fast = quick_event_facts(data)
    if fast is not None:
        assert model_event_facts(data) == fast


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.one_of(KEYS, st.text(max_size=8)), JSON, max_size=8))
def test_fast_path_agrees_on_arbitrary_objects(data: dict[str, Any]) -> None:
    fast = quick_event_facts(data)
    if fast is not None:
        assert model_event_facts(data) == fast


def test_fast_path_takes_the_common_valid_event() -> None:
    data = event(actor={"provider": "github", "id": "octocat"}, prLinks=["https://x/1"])
    data["visibility"] = {"responsibleUsers": ["a"]}
    assert quick_event_facts(data) is not None
    assert quick_event_facts(data) == model_event_facts(data)


def test_decode_entry_gives_the_model_verdict_when_the_fast_path_declines() -> None:
    data = event(occurred_at="2026-03-15T10:00:00")  # no timezone: invalid
    assert quick_event_facts(data) is None
    import orjson

    decoded = decode_entry(f"{ADDED_MS}-0", {b"event": orjson.dumps(data)})
    assert decoded.reason == model_event_facts(data)  # type: ignore[union-attr]


WHITESPACE = st.text(alphabet=" \t\r\n", max_size=4)


def _serializations(data: dict[str, Any], *, lone_surrogate: bool) -> list[bytes]:
    """The same object as different publishers write it: compact, spaced, pretty-printed;
    a lone surrogate can only be written escaped (as JSON.stringify does)."""
    import json

    escaped = [json.dumps(data).encode(), json.dumps(data, indent=2).encode()]
    if lone_surrogate:
        return escaped
    pretty = json.dumps(data, ensure_ascii=False, indent="\t").encode()
    try:
        compact = [orjson.dumps(data)]
    except TypeError:  # an integer beyond 64 bits, which orjson cannot write
        compact = []
    return [*compact, *escaped, pretty]


@settings(max_examples=300, deadline=None)
@given(events(), WHITESPACE, WHITESPACE, st.text(max_size=4), st.booleans())
def test_whitespace_and_reserialization_never_change_the_verdict_or_the_projection(
    data: dict[str, Any], before: str, after: str, name: str, cut: bool
) -> None:
    """Any event, any whitespace around it, any re-serialization, a string cut inside a
    character: the same verdict, facts, decoded fields and warnings."""
    # a lone high surrogate, as JavaScript's slice() leaves one in the middle of an emoji
    data = {**data, "note": name + ("\ud83d" if cut else "\U0001f680")}
    results = []
    for raw in _serializations(data, lone_surrogate=cut):
        decoded = decode_values(f"{ADDED_MS}-0", [before.encode() + raw + after.encode()])
        if isinstance(decoded, ValidEvent):
            assert b"\n" not in decoded.raw and decoded.raw == decoded.raw.strip()
            results.append((decoded.fields, decoded.warnings, decoded.ordering_key))
        else:
            results.append(decoded.reason)
    assert all(result == results[0] for result in results), results
