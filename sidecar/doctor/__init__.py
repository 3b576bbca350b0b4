"""`task-tracking doctor`: what is wrong with this sidecar's setup, one line per check.

Each check says what it found and, when something is wrong, the fix. Checks read and
never change the sidecar's data: the Redis permissions are checked with `ACL DRYRUN`
where the user may run it, else by queueing each command in a MULTI block that is then
discarded (nothing runs); the S3 check writes and deletes only the conditional-write probe
object under `<prefix>/.probe/` (as the archiver does when it starts).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Literal

import orjson

from sidecar.config import ConfigError, Settings

Outcome = Literal["pass", "warn", "fail", "skip"]
# warn: works, but read the line; skip: not checked (not configured, or an earlier failure)
MARKS = {"pass": "✓", "warn": "!", "fail": "✗", "skip": "-"}
ASCII_MARKS = {"pass": "ok", "warn": "!!", "fail": "XX", "skip": "--"}


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    outcome: Outcome
    message: str
    fix: str | None = None

    def line(self, marks: dict[str, str]) -> str:
        fix = f" -> {self.fix}" if self.fix else ""
        return f"{marks[self.outcome]} {self.name}: {self.message}{fix}"


@dataclasses.dataclass
class Report:
    checks: list[Check] = dataclasses.field(default_factory=list)

    def add(self, name: str, outcome: Outcome, message: str, fix: str | None = None) -> Check:
        check = Check(name, outcome, message, fix)
        self.checks.append(check)
        return check

    @property
    def ok(self) -> bool:
        """No check failed (warnings and skips do not fail the run)."""
        return all(check.outcome != "fail" for check in self.checks)

    def render(self) -> str:
        encoding = (getattr(sys.stdout, "encoding", None) or "ascii").lower()
        marks = MARKS if encoding.replace("-", "") in ("utf8", "utf16", "utf32") else ASCII_MARKS
        failed = sum(check.outcome == "fail" for check in self.checks)
        summary = "all checks passed" if failed == 0 else f"{failed} check(s) failed"
        return "\n".join([*(check.line(marks) for check in self.checks), summary])

    def to_json(self) -> str:
        body = {"ok": self.ok, "checks": [dataclasses.asdict(check) for check in self.checks]}
        return orjson.dumps(body, option=orjson.OPT_INDENT_2).decode()


async def run_doctor(settings: Settings | ConfigError, *, resource: str | None = None) -> Report:
    """Every check for `settings` (or the settings error), and with a resource name
    (`resource`, else TASK_TRACKING_RESOURCE_NAME) the Kubernetes checks."""
    from sidecar.doctor.archive_checks import check_archive
    from sidecar.doctor.redis_checks import check_redis

    report = Report()
    if isinstance(settings, ConfigError):
        report.add("settings", "fail", str(settings))
        return report
    report.add("settings", "pass", describe_settings(settings))
    await check_redis(settings, report)
    await check_archive(settings, report)
    name = resource or settings.resource_name
    if name:
        from sidecar.doctor.kube_checks import check_kubernetes

        await check_kubernetes(settings, name, report)
    else:
        report.add(
            "kubernetes",
            "skip",
            "no TaskTracking resource named (TASK_TRACKING_RESOURCE_NAME or --resource)",
        )
    return report


def describe_settings(settings: Settings) -> str:
    from sidecar.config import redact

    if not settings.archive.enabled:
        archive = "archive off"
    elif settings.archive.sink == "folder":
        archive = f"archive to folder {settings.archive.folder}"
    else:
        archive = f"archive to s3://{settings.archive.bucket}/{settings.archive.prefix}/"
    redis_url, stream = redact(settings.redis_url), settings.redis_stream_key
    return f"valid (Redis {redis_url}, stream {stream}, {archive})"
