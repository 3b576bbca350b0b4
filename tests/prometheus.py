"""Real Prometheus for the tests: Debian's `prometheus` package (`prometheus`, `promtool`),
and the alert rules exactly as the chart renders them."""

from __future__ import annotations

import shutil
from typing import Any

import pytest

INSTALL_HINT = (
    "install Debian's prometheus package (apt-get install -y prometheus; .ci/run does it):"
    " the alert rules and the scrape are checked by a real Prometheus, never skipped"
)


def binary(name: str) -> str:
    """Path of `prometheus` or `promtool`, or a failing test saying what to install."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH: {INSTALL_HINT}", pytrace=False)
    return path


def rendered_rule_groups(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`spec.groups` of the chart's PrometheusRule (enabled, plus `values`), rendered by
    real Helm: a Prometheus rules file is `{"groups": <this>}`."""
    from tests.chart.conftest import CHART, REQUIRED_VALUES, _find_engine, deep_merge

    merged = deep_merge(REQUIRED_VALUES, {"prometheusRule": {"enabled": True}})
    merged = deep_merge(merged, values or {})
    rendered = _find_engine().render(CHART, merged)
    groups: list[dict[str, Any]] = rendered.one("PrometheusRule")["spec"]["groups"]
    return groups


def alerts_of(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """alert name -> rule, over every group."""
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}
