"""The five alerts of the chart's PrometheusRule, evaluated by `promtool test rules`.

The rules file is `spec.groups` of the PrometheusRule as Helm renders it, so the tests
check what ships. Each alert has a series history that must fire it (with its labels and
annotations as Prometheus renders them) and one that must not; a second run with the
expectations swapped, alert by alert, must fail, so no case passes vacuously.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.prometheus import alerts_of, binary

NS = "apps"
PROJECTOR = "task-status-projector"
ARCHIVER = "task-history-archiver"


def series(metric: str, values: str, **labels: str) -> dict[str, str]:
    labels = {"namespace": NS, "pod": "app-1", **labels}
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{metric}{{{selector}}}", "values": values}


# alert -> "fires": (history that fires it, eval time, the alert's labels, its summary and
# description); "not_yet": an earlier eval time at which that history must not fire yet;
# "quiet": (history that must not fire it, eval time). Evaluated every minute.
CASES: dict[str, dict[str, Any]] = {
    "TaskTrackingConsumerGroupLagGrowing": {
        "not_yet": "14m",  # the firing history, before its `for:` has passed
        # 1000 + 20 a minute: above the threshold and growing for 29 min (for: 15m).
        "fires": (
            [
                series("task_tracking_consumer_group_lag", "1000+20x40", group=PROJECTOR),
                series("task_tracking_consumer_group_active", "1x40", group=PROJECTOR),
            ],
            "30m",
            {"group": PROJECTOR},
            f"Consumer group {PROJECTOR} in {NS} falls behind the task-events stream.",
            "Lag is 1.6k entries and still growing after 15 minutes.",
        ),
        # High but flat (a backlog being held, not growing); growing but small; growing
        # in a group no sidecar works on (the archiver's while archival is off).
        "quiet": (
            [
                series("task_tracking_consumer_group_lag", "5000x40", group=PROJECTOR),
                series("task_tracking_consumer_group_active", "1x40", group=PROJECTOR),
                series("task_tracking_consumer_group_lag", "0+20x40", group=ARCHIVER),
                series("task_tracking_consumer_group_active", "1x40", group=ARCHIVER),
                series("task_tracking_consumer_group_lag", "1000+20x40", group="other"),
                series("task_tracking_consumer_group_active", "0x40", group="other"),
            ],
            "30m",
        ),
    },
    "TaskTrackingOldestPendingTooOld": {
        "not_yet": "10m",  # the firing history, before its `for:` has passed
        # An entry stuck: its age grows a minute a minute; above 300 s from 6 min (for: 5m).
        "fires": (
            [series("task_tracking_oldest_pending_age_seconds", "0+60x20", group=ARCHIVER)],
            "15m",
            {"group": ARCHIVER},
            f"Group {ARCHIVER} in {NS} holds an entry unacknowledged for too long.",
            "The oldest pending entry is 15m 0s old.",
        ),
        # Above 300 s for 3 minutes only, then acknowledged.
        "quiet": (
            [
                series(
                    "task_tracking_oldest_pending_age_seconds",
                    "0 100 200 400 400 400 0 100 200 0",
                    group=ARCHIVER,
                )
            ],
            "9m",
        ),
    },
    "TaskTrackingDeadLettersIncreasing": {
        "not_yet": "2m",  # the firing history, before its `for:` has passed
        # Five events dead-lettered at minute 3 (for: 0m).
        "fires": (
            [series("task_tracking_events_dead_lettered_total", "0 0 0 5 5 5", group=PROJECTOR)],
            "5m",
            {"group": PROJECTOR},
            f"Invalid task events are being dead-lettered in {NS}.",
            "5 events moved to the dead-letter stream in 15 minutes.",
        ),
        # Dead letters long ago (the counter stands still at 3).
        "quiet": (
            [series("task_tracking_events_dead_lettered_total", "3x30", group=PROJECTOR)],
            "20m",
        ),
    },
    "TaskTrackingArchiveFailures": {
        "not_yet": "10m",  # the firing history, before its `for:` has passed
        # Two failed writes a minute, for 20 minutes (for: 10m).
        "fires": (
            [series("task_tracking_archive_failures_total", "0+2x30", reason="AccessDenied")],
            "20m",
            {"reason": "AccessDenied"},
            f"Archive writes fail in {NS} (AccessDenied).",
            "30 archive failures in 15 minutes; events stay pending and are retried.",
        ),
        # One failure at minute 1, none after: resolved well before minute 40.
        "quiet": (
            [series("task_tracking_archive_failures_total", "0 1x40", reason="AccessDenied")],
            "40m",
        ),
    },
    "TaskTrackingSidecarNotReady": {
        "not_yet": "6m",  # the firing history, before its `for:` has passed
        # Not ready from minute 2 (for: 5m).
        "fires": (
            [series("task_tracking_ready", "1 1 0x10")],
            "9m",
            {"pod": "app-1"},
            f"Task-tracking sidecar app-1 in {NS} is not ready.",
            "The sidecar reports not ready for 5 minutes; it does not consume events.",
        ),
        # Not ready for 3 minutes (a Redis failover), then ready again.
        "quiet": ([series("task_tracking_ready", "1 0 0 0 1x10")], "9m"),
    },
}


def promtool_tests(
    rules: dict[str, dict[str, Any]], swapped: str | None = None
) -> list[dict[str, Any]]:
    """promtool test groups: per alert, its firing and its quiet history. For the alert
    named `swapped`, each history expects what the other does (the run must fail)."""
    tests = []
    for name, case in CASES.items():
        rule = rules[name]
        history, at, labels, summary, description = case["fires"]
        expected = [
            {
                "exp_labels": {"namespace": NS, **labels, **rule["labels"]},
                "exp_annotations": {
                    **rule["annotations"],
                    "summary": summary,
                    "description": description,
                },
            }
        ]
        quiet_history, quiet_at = case["quiet"]
        fire, quiet = (expected, []) if name != swapped else ([], expected)
        for input_series, evals in (
            (history, [(case["not_yet"], []), (at, fire)]),
            (quiet_history, [(quiet_at, quiet)]),
        ):
            tests.append(
                {
                    "interval": "1m",
                    "input_series": input_series,
                    "alert_rule_test": [
                        {"eval_time": eval_time, "alertname": name, "exp_alerts": alerts}
                        for eval_time, alerts in evals
                    ],
                }
            )
    return tests


def run_promtool(tmp_path: Path, groups: list[dict[str, Any]], tests: list[Any]) -> str:
    """Write the rules and the tests, run `promtool test rules`; returns its output and
    raises AssertionError (with it) when promtool fails."""
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    test_file = tmp_path / "tests.yaml"
    test_file.write_text(
        yaml.safe_dump(
            {"rule_files": [rules_file.name], "evaluation_interval": "1m", "tests": tests},
            sort_keys=False,
        )
    )
    done = subprocess.run(
        [binary("promtool"), "test", "rules", test_file.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def groups(render: Any) -> list[dict[str, Any]]:
    rendered: list[dict[str, Any]] = render({"prometheusRule": {"enabled": True}}).one(
        "PrometheusRule"
    )["spec"]["groups"]
    return rendered


def test_the_rendered_rules_pass_promtool_check(groups: list[Any], tmp_path: Path) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": groups}))
    done = subprocess.run(
        [binary("promtool"), "check", "rules", str(rules_file)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 rules found" in done.stdout, done.stdout


def test_every_alert_has_a_firing_and_a_quiet_case(groups: list[Any]) -> None:
    assert set(alerts_of(groups)) == set(CASES)


def test_each_alert_fires_on_its_history_and_stays_quiet_on_the_other(
    groups: list[Any], tmp_path: Path
) -> None:
    output = run_promtool(tmp_path, groups, promtool_tests(alerts_of(groups)))
    print(output)
    assert "SUCCESS" in output, output


@pytest.mark.parametrize("alert", sorted(CASES))
def test_swapped_expectations_fail_so_each_case_decides(
    groups: list[Any], tmp_path: Path, alert: str
) -> None:
    tests = promtool_tests(alerts_of(groups), swapped=alert)
    with pytest.raises(AssertionError) as failed:
        run_promtool(tmp_path, copy.deepcopy(groups), tests)
    # Both cases of the swapped alert fail, nothing else does.
    assert str(failed.value).count(f"alertname: {alert}") == 2, str(failed.value)
    for other in set(CASES) - {alert}:
        assert f"alertname: {other}" not in str(failed.value)
