"""Whether the archive target enforces conditional writes, and how the archiver writes.

Exactly-once archival rests on the store refusing a second create of a key
(`If-None-Match: *` answered with 412). Some S3-compatible servers, gateways and
proxies ignore the header, and a retried batch would then overwrite or duplicate
what an earlier attempt wrote. So when the archiver starts writing to a target it
creates a probe object twice; where the second create is not refused it writes in
check-before-write mode (HEAD, and when the key exists the usual read-back and
compare) and says so, instead of losing the guarantee silently. README, "Guarantees".
"""

from __future__ import annotations

import logging
from typing import Literal

from sidecar.metrics import Metrics
from sidecar.sinks import ArchiveSink

log = logging.getLogger(__name__)

ConditionalWrites = Literal["enforced", "check_before_write"]
# TASK_TRACKING_ARCHIVE_CONDITIONAL_WRITES: "auto" probes the target.
ConditionalWritesSetting = Literal["auto", "enforced", "check_before_write"]
MODES: tuple[ConditionalWrites, ...] = ("enforced", "check_before_write")
SETTING = "TASK_TRACKING_ARCHIVE_CONDITIONAL_WRITES"


def probe_key(prefix: str, consumer: str) -> str:
    """`<prefix>/.probe/<consumer>`: one per replica, outside the archive's key layout."""
    return f"{prefix}/.probe/{consumer}"


async def settle_conditional_writes(
    sink: ArchiveSink,
    metrics: Metrics,
    *,
    setting: ConditionalWritesSetting,
    prefix: str,
    consumer: str,
) -> ConditionalWrites:
    """Decide the write mode for `sink` (probing it when `setting` is "auto"), switch the
    sink to it, and report it: one log line, and the gauge
    `task_tracking_archive_conditional_writes{mode}`. Raises `SinkError` when the probe
    cannot reach the target (the runner retries)."""
    context = {"worker": "archiver", "bucket": sink.description}
    mode: ConditionalWrites
    if sink.always_conditional:
        mode, how = "enforced", "by construction"
    elif setting == "auto":
        key = probe_key(prefix, consumer)
        mode = "enforced" if await sink.probe_conditional_writes(key) else "check_before_write"
        how = f"probed with {key}"
    else:
        mode, how = setting, f"set by {SETTING}, not probed"
    sink.check_before_write = mode == "check_before_write"
    for each in MODES:
        metrics.archive_conditional_writes.labels(each).set(1 if each == mode else 0)
    if mode == "enforced":
        log.info("%s: conditional writes enforced (%s)", sink.description, how, extra=context)
    else:
        log.warning(
            "%s: conditional writes are not enforced (%s): archiving in check_before_write"
            " mode (HEAD before each PUT, read back and compare when the key exists);"
            " README 'Guarantees' says what this mode cannot exclude",
            sink.description,
            how if setting != "auto" else f"{how}: a second create was accepted",
            extra=context,
        )
    return mode


def clear_conditional_writes(metrics: Metrics) -> None:
    """Both modes at 0: no archiver writes (archival off)."""
    for each in MODES:
        metrics.archive_conditional_writes.labels(each).set(0)
