"""`ProjectRegistry`: a project goes to the projects index once, then again only after
the refresh interval (so an index deleted under a running projector heals), and only once
a call that carried it succeeded."""

from __future__ import annotations

import pytest

from sidecar import projector
from sidecar.projector import ProjectRegistry

MEMBERS = {"o/a": ["1700000000000", "x1"], "o/b": ["1700000000001", "x2"]}


def test_a_project_is_written_until_a_call_carrying_it_succeeded() -> None:
    registry = ProjectRegistry()
    assert registry.new(MEMBERS) == ["0", "o/a", "0", "o/b"]
    assert registry.new(MEMBERS) == ["0", "o/a", "0", "o/b"]  # no call succeeded yet
    registry.written(["0", "o/a"])
    assert registry.new(MEMBERS) == ["0", "o/b"]
    registry.written(["0", "o/b"])
    assert registry.new(MEMBERS) == []


def test_a_written_project_is_written_again_after_the_refresh_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(projector.time, "monotonic", lambda: now[0])
    registry = ProjectRegistry()
    registry.written(registry.new(MEMBERS))
    now[0] += ProjectRegistry.REFRESH_SECONDS - 1
    assert registry.new(MEMBERS) == []
    now[0] += 2
    assert registry.new(MEMBERS) == ["0", "o/a", "0", "o/b"]


def test_past_its_limit_the_registry_forgets_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ProjectRegistry, "LIMIT", 3)
    registry = ProjectRegistry()
    many = {f"o/{n}": ["1", f"x{n}"] for n in range(5)}
    registry.written(registry.new(many))
    assert registry.new(many) == []
    registry.written(["0", "o/extra"])  # over the limit: cleared first, then remembered
    assert registry.new({"o/extra": ["1", "x"]}) == []
    assert len(registry.new(many)) == 10
