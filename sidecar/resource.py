"""The TaskTracking resource's domain, apart from kopf: what its spec asks for, when a spec
is applied, and what this sidecar writes into its status.

Pure functions and small value types, unit-tested without an API server
(tests/unit/test_resource.py); `sidecar.kopf_embedding` runs them inside kopf.

- Spec: ``spec.archive`` and ``spec.retention`` parse into the same models the environment
  fills (`sidecar.config`); the runtime completes them from the environment
  (`ArchiveConfig.inheriting`). A bad spec is one line naming the field (`InvalidSpecError`).
- Generation policy (`SpecGeneration`): a spec is applied when ``metadata.generation``
  differs from the one this sidecar last handled, never because an event arrived: status
  writes wake every watcher, the writer included.
- Status (`merge_status`): each sidecar writes only its own entry
  ``status.sidecars.<podName>`` (``updatedAt`` changes only with its content), removes the
  entries of sidecars that are both silent for ``stale_after`` and behind the current
  generation, and corrects the summary ``status.applied``/``status.archiving``.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from sidecar.config import RESOURCE_FIELDS, ArchiveConfig, RetentionConfig, first_problem

GROUP = "alakai.io"
VERSION = "v1alpha1"
PLURAL = "tasktrackings"

_M = TypeVar("_M", bound=BaseModel)


class InvalidSpecError(ValueError):
    """A TaskTracking spec that cannot be applied; the message is one line naming the field."""


class ResourceSpec(BaseModel):
    """What a TaskTracking's spec asks for: the fields it sets (`model_fields_set`) overlay
    the environment's configuration; see `ArchiveConfig.inheriting`."""

    model_config = ConfigDict(frozen=True)

    archive: ArchiveConfig = ArchiveConfig()
    retention: RetentionConfig = RetentionConfig()


def parse_spec(spec: Mapping[str, Any]) -> ResourceSpec:
    """Parse a TaskTracking ``spec``; raises InvalidSpecError (one line naming the field).

    JSON types are taken strictly (``enabled: "yes"`` is refused), as the CRD's schema does.
    """
    archive = spec.get("archive", {})
    if isinstance(archive, Mapping):
        allowed = {*RESOURCE_FIELDS, *map(to_camel, RESOURCE_FIELDS)}
        for key in archive:  # the environment's own fields (sink, folder, ...) included
            if key not in allowed:
                raise InvalidSpecError(f"spec.archive.{key}: Extra inputs are not permitted")
    return ResourceSpec(
        archive=_section(ArchiveConfig, "archive", archive),
        retention=_section(RetentionConfig, "retention", spec.get("retention") or {}),
    )


def _section(model: type[_M], section: str, value: object) -> _M:
    def name(loc: tuple[str | int, ...]) -> str:
        parts = [to_camel(part) if isinstance(part, str) else str(part) for part in loc]
        return ".".join(("spec", section, *parts))

    try:
        return model.model_validate(value, strict=True)
    except ValidationError as e:
        problem = first_problem(e, name)
        raise InvalidSpecError(f"{name(problem.loc)}: {problem.message}") from None


@dataclass(frozen=True)
class ArchiveState:
    """What the runtime runs after a reconfiguration, as reported in the status entry."""

    archiving: bool
    bucket: str | None
    prefix: str | None
    last_error: str | None
    conditional_writes: str | None = None  # None: not archiving, or not known yet


class ArchiveControl(Protocol):
    """The runtime's reconfigure path, shared by the operator and the CLI."""

    async def apply_archive_spec(self, spec: ResourceSpec | None) -> ArchiveState:
        """Apply a spec; None means the resource is gone: back to the environment config.

        Raises ValueError, or returns a state with ``last_error``, on an unusable spec; the
        runtime keeps its last good configuration either way.
        """
        ...


class SpecGeneration:
    """Which ``metadata.generation`` this sidecar handled: a spec is applied once per
    generation, not once per event; a failure that is not the spec's is tried again."""

    def __init__(self) -> None:
        self.handled: int | None = None

    def needs_apply(self, generation: int) -> bool:
        return generation != self.handled

    def handling(self, generation: int) -> None:
        """Called before applying `generation`: its result (applied or refused) stands."""
        self.handled = generation

    def retry(self) -> None:
        """The runtime failed (not the spec's fault): apply again on the next event."""
        self.handled = None


def status_content(
    state: ArchiveState | None, generation: int, error: str | None, write_mode: str | None
) -> dict[str, Any]:
    """This sidecar's status entry, less ``updatedAt``."""
    return {
        "observedGeneration": generation,
        "archiving": state.archiving if state else False,
        "bucket": state.bucket if state else None,
        "prefix": state.prefix if state else None,
        "lastError": error or "",
        # enforced | check_before_write (sidecar.conditional_writes); absent when unknown
        "conditionalWrites": write_mode,
    }


@dataclass(frozen=True)
class StatusUpdate:
    """What `merge_status` decided: the own entry as it stands now, and the status patch."""

    entry: dict[str, Any]
    patch: dict[str, Any]  # merge patch of .status; empty: nothing to write


def merge_status(
    status: Mapping[str, Any],
    *,
    pod: str,
    content: Mapping[str, Any],
    last_entry: Mapping[str, Any] | None,
    generation: int,
    now: datetime.datetime,
    stale_after: float,
) -> StatusUpdate:
    """The status patch for this sidecar's entry `content` against the resource's `status`.

    `last_entry` is the entry this sidecar wrote last: its ``updatedAt`` is kept while the
    content is the same, so an unchanged entry writes nothing (and wakes nobody).
    """
    if last_entry is None or {k: v for k, v in last_entry.items() if k != "updatedAt"} != content:
        entry = {**content, "updatedAt": _timestamp(now)}
    else:
        entry = dict(last_entry)

    sidecars = dict(status.get("sidecars") or {})
    changes: dict[str, Any] = {}
    if sidecars.get(pod) != _without_nulls(entry):
        changes[pod] = entry
    for other_pod, other in sidecars.items():
        if other_pod != pod and _is_stale(other, generation, now, stale_after):
            changes[other_pod] = None
    for changed_pod, changed in changes.items():
        if changed is None:
            del sidecars[changed_pod]
        else:
            sidecars[changed_pod] = _without_nulls(changed)

    summary = _summary(sidecars, generation)
    patch: dict[str, Any] = {k: v for k, v in summary.items() if status.get(k) != v}
    if changes:
        patch["sidecars"] = changes
    return StatusUpdate(entry, patch)


def _summary(sidecars: Mapping[str, Any], generation: int) -> dict[str, Any]:
    """``applied``: entries that run the current generation without error / all entries.

    ``archiving``: true when at least one sidecar runs the current generation and all of
    those that do are archiving.
    """
    current = [
        e
        for e in sidecars.values()
        if isinstance(e, Mapping)
        and e.get("observedGeneration") == generation
        and not e.get("lastError")
    ]
    archiving = bool(current) and all(e.get("archiving") is True for e in current)
    return {"applied": f"{len(current)}/{len(sidecars)}", "archiving": archiving}


def _is_stale(entry: Any, generation: int, now: datetime.datetime, ttl: float) -> bool:
    if not isinstance(entry, Mapping):
        return True
    observed = entry.get("observedGeneration")
    if isinstance(observed, int) and observed >= generation:
        return False
    try:
        updated = datetime.datetime.fromisoformat(str(entry.get("updatedAt")))
    except ValueError:
        return True
    if updated.tzinfo is None:
        updated = updated.replace(tzinfo=datetime.UTC)
    return (now - updated).total_seconds() > ttl


def _timestamp(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _without_nulls(entry: Mapping[str, Any]) -> dict[str, Any]:
    # What the API server stores for a merge patch: null values remove keys.
    return {k: v for k, v in entry.items() if v is not None}
