"""The TaskTracking watch: kopf embedded in the sidecar's event loop, for one resource.

A present TaskTracking overrides the environment's archive settings; a deleted one hands
control back to the environment. Many sidecars watch the same resource, so this module
writes nothing kopf would normally persist on it (no finalizers, no progress annotations,
no handler results) and each sidecar writes only its own status entry
``status.sidecars.<podName>`` plus the derived summary ``status.applied``/``status.archiving``.

How kopf is embedded, and why (DESIGN.md, "Known pitfalls"):

- Only an ``on.event`` handler is registered, in a private ``kopf.OperatorRegistry``: the
  change handlers (create/update/delete/resume) store progress and add finalizers. The
  persistence storages are replaced by no-op ones and the finalizer name is our own, so
  even a misconfiguration cannot make kopf write its bookkeeping. The handler returns
  None: a returned value would be stored in ``status.<handler id>``.
- Spec changes are detected by ``metadata.generation`` against the generation this sidecar
  last handled, not by event: status writes wake every watcher, the writer included. The
  own entry is written only when its content changes (``updatedAt`` changes only with
  it), and a write that changes nothing is a no-op at the API server, so nothing loops.
- kopf's ``spawn_tasks`` installs its own SIGINT/SIGTERM handlers when it runs in the main
  thread (``loop.add_signal_handler``) and never removes them. The sidecar drives its own
  shutdown, so its handlers are put back as soon as ``spawn_tasks`` returns; kopf stops
  only through ``stop_flag``. They are installed through ``eventloop.add_signal_handler``,
  which remembers them: neither asyncio nor uvloop says which handler is installed.
- ``kopf.operator()`` cancels, when it exits, every task created after it started, not
  only its own. This module runs ``spawn_tasks`` + ``run_tasks`` itself and passes as
  ``ignored`` every task that was not created from inside this watch's kopf context
  (tracked by a task factory, see :class:`_TaskOwners`). The runtime's reconfiguration
  runs in a task outside that context and is shielded, so tasks the runtime starts from it
  survive kopf, and a reconfiguration in flight finishes even when kopf stops.
- ``settings.process.ultimate_exiting_timeout`` is disabled: when cancelled without the
  stop flag, kopf would otherwise SIGKILL the whole thread (the process) 10 minutes later.
- The sidecar's Role is namespaced: listing namespaces and CRDs answers 403. kopf 1.45 then
  falls back to the exact namespace it was given, with a warning, but only after retrying
  the 403 as a transient error with ``networking.error_backoffs`` (about 54 s). So the
  restricted mode is declared instead (``settings.scanning.disabled``): no cluster-scoped
  list or watch is tried, the namespace is watched at once, the CRD is found through
  discovery once at start-up.

Stale entries: a sidecar that writes removes (merge patch with null) every other entry
whose ``updatedAt`` is older than ``stale_after`` AND whose ``observedGeneration`` is behind
the current generation. A live sidecar catches up on a new generation within moments, so
it is never both behind and silent for that long; a pod that is gone is, after the next
spec change. An entry removed by mistake is rewritten by its owner on its next event.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import logging
import signal
import weakref
from collections.abc import Callable, Collection, Coroutine, Generator, Iterator, Mapping
from typing import Any

import kopf
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from pydantic.alias_generators import to_camel

from sidecar import eventloop
from sidecar.archive_switch import ArchiveControl, ArchiveSpec, ArchiveState, RetentionSpec

logger = logging.getLogger(__name__)

GROUP = "alakai.io"
VERSION = "v1alpha1"
PLURAL = "tasktrackings"
DEFAULT_PREFIX = "task-tracking"
EVENT_REASON_INVALID = "InvalidSpec"
EVENT_REASON_REFUSED = "ApplyFailed"


class InvalidSpecError(ValueError):
    """A TaskTracking spec that cannot be applied; the message is one line naming the field."""


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class _FlushModel(_Model):
    max_events: int | None = Field(None, ge=1, le=100_000)
    max_bytes: int | None = Field(None, ge=1024, le=100 * 1024 * 1024)
    max_age_seconds: float | None = Field(None, gt=0, le=3600)


class _ArchiveModel(_Model):
    enabled: StrictBool = False
    bucket: str | None = Field(None, min_length=3, max_length=63)
    prefix: str = Field(DEFAULT_PREFIX, min_length=1, max_length=512)
    region: str | None = Field(None, min_length=1, max_length=64)
    endpoint_url: str | None = Field(None, pattern=r"^https?://[^\s/?#]+\S*$")
    flush: _FlushModel | None = None


class _RetentionModel(_Model):
    projection_ttl_seconds: int | None = Field(None, ge=0)
    project_index_max_age_days: int | None = Field(None, ge=0)
    project_index_max_size: int | None = Field(None, ge=0)


def parse_archive_spec(spec: Mapping[str, Any]) -> ArchiveSpec:
    """Parse a TaskTracking ``spec`` into an ArchiveSpec; raises InvalidSpecError (one line)."""
    try:
        model = _ArchiveModel.model_validate(spec.get("archive", {}))
        retention = _RetentionModel.model_validate(spec.get("retention") or {})
    except ValidationError as e:
        error = e.errors()[0]
        section = "archive" if e.title == _ArchiveModel.__name__ else "retention"
        where = ".".join(str(part) for part in ("spec", section, *error["loc"]))
        raise InvalidSpecError(f"{where}: {error['msg']}") from None
    if model.enabled and not model.bucket:
        raise InvalidSpecError(
            "spec.archive.bucket: required when spec.archive.enabled is true; set a bucket"
        )
    if model.prefix.startswith("/") or model.prefix.endswith("/"):
        raise InvalidSpecError("spec.archive.prefix: must not start or end with a slash")
    flush = model.flush or _FlushModel()
    return ArchiveSpec(
        enabled=model.enabled,
        bucket=model.bucket,
        prefix=model.prefix,
        region=model.region,
        endpoint_url=model.endpoint_url,
        flush_max_events=flush.max_events,
        flush_max_bytes=flush.max_bytes,
        flush_max_age_seconds=flush.max_age_seconds,
        retention=RetentionSpec(
            projection_ttl_seconds=retention.projection_ttl_seconds,
            project_index_max_age_days=retention.project_index_max_age_days,
            project_index_max_size=retention.project_index_max_size,
        ),
    )


def has_kubernetes_credentials() -> bool:
    """True when a service account or a kubeconfig is there to log in with."""
    try:
        return _login(settings=kopf.OperatorSettings()) is not None
    except Exception as e:  # a broken kubeconfig: report it, keep the environment config
        logger.warning("Kubernetes login failed (%s); TaskTracking watch is off.", e)
        return False


def watched_namespace(configured: str) -> tuple[str, str]:
    """The namespace of the TaskTracking to watch, picked as kubectl picks it, and where it
    came from (for the start-up log line): the setting, else the pod's service account,
    else the kubeconfig's current context, else `default`."""
    if configured:
        return configured, "TASK_TRACKING_NAMESPACE"
    settings = kopf.OperatorSettings()
    sources = (
        (kopf.login_with_service_account, "the pod's service account"),
        (kopf.login_with_kubeconfig, "the kubeconfig's current context"),
    )
    for login, source in sources:
        try:
            info = login(settings=settings)
        except Exception:  # a broken kubeconfig is reported by the login itself
            info = None
        if info is not None and info.default_namespace:
            return info.default_namespace, source
    return "default", "no namespace set (TASK_TRACKING_NAMESPACE, service account, kubeconfig)"


def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


class ResourceWatch:
    """Watch one TaskTracking and apply its ``spec.archive`` through an ArchiveControl.

    ``run()`` runs kopf until ``stop()``; ``ready`` is set once kopf has started. Without
    Kubernetes credentials, ``run()`` logs one line and returns: the environment rules.
    """

    def __init__(
        self,
        control: ArchiveControl,
        *,
        resource_name: str,
        namespace: str,
        pod_name: str,
        initial_state: ArchiveState | None = None,
        stale_after: float = 3600.0,
        watch_timeout: float = 300.0,
        on_generation: Callable[[int], object] | None = None,
        conditional_writes: Callable[[], str | None] | None = None,
    ) -> None:
        self._control = control
        # The archiver's write mode, read at each status write: it is settled by the
        # archiver's probe, which may finish after the spec was applied (a target that
        # was already running from the environment), so the next event reports it.
        self._conditional_writes = conditional_writes
        # Told the generation this sidecar runs after each successful apply, 0 once the
        # resource is deleted (the runtime sets task_tracking_resource_generation with it).
        self._on_generation = on_generation
        self.resource_name = resource_name
        self.namespace = namespace
        self.pod_name = pod_name
        self._state = initial_state
        self._stale_after = stale_after
        self._watch_timeout = watch_timeout
        self.ready = asyncio.Event()
        self._stop_flag = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._handled_generation: int | None = None
        self._error: str | None = None
        self._entry: dict[str, Any] | None = None  # the own entry as last written

    async def run(self) -> None:
        """Run kopf until stop() (or until cancelled)."""
        if not has_kubernetes_credentials():
            logger.info(
                "No Kubernetes service account or kubeconfig: TaskTracking %r is not "
                "watched; the environment configuration applies.",
                self.resource_name,
            )
            return
        # A task of its own, so the context variables kopf sets stay out of the caller's.
        self._task = asyncio.create_task(self._run_kopf(), name=f"kopf {self.resource_name}")
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            raise

    async def stop(self) -> None:
        """Stop kopf gracefully and wait until it has exited."""
        self._stop_flag.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    # ------------------------------------------------------------------ kopf

    def _settings(self) -> kopf.OperatorSettings:
        settings = kopf.OperatorSettings()
        settings.persistence.finalizer = f"{GROUP}/task-tracking-sidecar"  # never added
        settings.persistence.progress_storage = _NoProgressStorage()
        settings.persistence.diffbase_storage = _NoDiffBaseStorage()
        settings.process.ultimate_exiting_timeout = None
        settings.scanning.disabled = True  # namespaced Role: see the module docstring
        settings.watching.server_timeout = self._watch_timeout
        settings.posting.reporting_component = "task-tracking-sidecar"
        settings.posting.reporting_instance = self.pod_name
        return settings

    def _registry(self) -> kopf.OperatorRegistry:
        registry = kopf.OperatorRegistry()
        kopf.on.login(registry=registry)(_login)
        kopf.on.event(
            GROUP,
            VERSION,
            PLURAL,
            registry=registry,
            field="metadata.name",
            value=self.resource_name,
        )(self._on_event)
        return registry

    async def _run_kopf(self) -> None:
        loop = asyncio.get_running_loop()
        owners = _TaskOwners.install(loop)
        _OWNER.set(self)  # this task's own context: every task kopf creates inherits it
        saved = eventloop.python_signal_handlers(_SIGNALS)
        tasks = await kopf.spawn_tasks(
            registry=self._registry(),
            settings=self._settings(),
            standalone=True,
            clusterwide=False,
            namespaces=[self.namespace],
            stop_flag=self._stop_flag,
            ready_flag=self.ready,
        )
        eventloop.restore_signal_handlers(saved)  # kopf's replaced the sidecar's
        await kopf.run_tasks(tasks, ignored=_ForeignTasks(owners, self))

    # ------------------------------------------------------------------ handling

    async def _on_event(
        self,
        *,
        type: str | None,
        body: kopf.Body,
        patch: kopf.Patch,
        **_: Any,
    ) -> None:
        # Returns None on purpose: kopf stores a handler's return value in the status.
        if type == "DELETED":
            await self._reconfigure(None)
            self._handled_generation = None
            self._error = None
            self._entry = None
            self._report_generation(0)
            logger.info(
                "TaskTracking %r deleted: back to the environment.",
                self.resource_name,
                extra={"resource": self.resource_name},
            )
            return
        generation = int(body.meta.get("generation") or 0)
        if generation != self._handled_generation:
            await self._apply(body, generation)
        self._write_status(body, patch, generation)

    async def _apply(self, body: kopf.Body, generation: int) -> None:
        self._handled_generation = generation
        try:
            spec = parse_archive_spec(body.spec)
            state = await self._reconfigure(spec)
        except ValueError as e:
            self._error = str(e) or type(e).__name__
        except Exception as e:  # the runtime failed: report it, never crash the watch
            logger.exception("Applying TaskTracking %r failed.", self.resource_name)
            self._error = f"{type(e).__name__}: {e}"
            self._handled_generation = None  # not the spec's fault: try again on the next event
        else:
            self._state = state
            self._error = state.last_error
        context = {"resource": self.resource_name, "generation": generation}
        if self._error is None:
            self._report_generation(generation)
            logger.info(
                "TaskTracking %r generation %d applied.",
                self.resource_name,
                generation,
                extra=context,
            )
            return
        logger.warning(
            "TaskTracking %r generation %d refused, keeping the last good configuration: %s",
            self.resource_name,
            generation,
            self._error,
            extra=context,
        )
        kopf.warn(
            body,
            reason=EVENT_REASON_INVALID,
            message=f"{self.pod_name}: {self._error}; keeping the last good configuration",
        )

    def _report_generation(self, generation: int) -> None:
        if self._on_generation is not None:
            self._on_generation(generation)

    async def _reconfigure(self, spec: ArchiveSpec | None) -> ArchiveState:
        # Outside kopf's task context (so kopf never cancels what the runtime starts), and
        # shielded: a reconfiguration in flight completes even if kopf stops meanwhile.
        token = _OWNER.set(None)
        try:
            task = asyncio.create_task(self._control.apply_archive_spec(spec))
        finally:
            _OWNER.reset(token)
        return await asyncio.shield(task)

    def _write_status(self, body: kopf.Body, patch: kopf.Patch, generation: int) -> None:
        state = self._state
        content: dict[str, Any] = {
            "observedGeneration": generation,
            "archiving": state.archiving if state else False,
            "bucket": state.bucket if state else None,
            "prefix": state.prefix if state else None,
            "lastError": self._error or "",
            # enforced | check_before_write (sidecar.conditional_writes); absent when unknown
            "conditionalWrites": self._write_mode(state),
        }
        entry = self._entry
        if entry is None or {k: v for k, v in entry.items() if k != "updatedAt"} != content:
            entry = {**content, "updatedAt": _timestamp(datetime.datetime.now(datetime.UTC))}
            self._entry = entry

        sidecars = dict(body.status.get("sidecars") or {})
        changes: dict[str, Any] = {}
        if sidecars.get(self.pod_name) != _without_nulls(entry):
            changes[self.pod_name] = entry
        now = datetime.datetime.now(datetime.UTC)
        for pod, other in sidecars.items():
            if pod != self.pod_name and _is_stale(other, generation, now, self._stale_after):
                changes[pod] = None
        sidecars.update({pod: _without_nulls(e) for pod, e in changes.items() if e is not None})
        for pod, e in changes.items():
            if e is None:
                del sidecars[pod]

        summary = _summary(sidecars, generation)
        summary_changes = {k: v for k, v in summary.items() if body.status.get(k) != v}
        if changes:
            patch.status["sidecars"] = changes
        patch.status.update(summary_changes)

    def _write_mode(self, state: ArchiveState | None) -> str | None:
        if self._conditional_writes is not None:
            return self._conditional_writes()
        return state.conditional_writes if state else None


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


# ---------------------------------------------------------------------- kopf persistence


class _NoProgressStorage(kopf.ProgressStorage):
    """Stores no handler progress: we have no change handlers, and must write no annotations."""

    def fetch(self, *, key: kopf.HandlerId, body: kopf.Body) -> kopf.ProgressRecord | None:
        return None

    def store(
        self,
        *,
        key: kopf.HandlerId,
        record: kopf.ProgressRecord,
        body: kopf.Body,
        patch: kopf.Patch,
    ) -> None:
        pass

    def purge(self, *, key: kopf.HandlerId, body: kopf.Body, patch: kopf.Patch) -> None:
        pass

    def touch(self, *, body: kopf.Body, patch: kopf.Patch, value: str | None) -> None:
        pass

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        return super().clear(essence=essence)


class _NoDiffBaseStorage(kopf.DiffBaseStorage):
    """Stores no last-handled state (kopf keeps it in an annotation by default)."""

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


# ---------------------------------------------------------------------- task ownership

# The ResourceWatch whose kopf created the current task (None: not created by kopf).
_OWNER: contextvars.ContextVar[ResourceWatch | None] = contextvars.ContextVar(
    "task_tracking_kopf_owner", default=None
)

_Coro = Generator[Any, None, Any] | Coroutine[Any, Any, Any]


class _TaskOwners:
    """Task factory that remembers which ResourceWatch's kopf created each task.

    kopf's ``run_tasks`` cancels on exit every task not in ``ignored``; with this record,
    ``ignored`` can name all tasks kopf did not create (see :class:`_ForeignTasks`), so
    stopping one watch leaves the sidecar's workers and other watches alone. It wraps any
    task factory installed before it and stays installed (one ContextVar read per task).
    """

    def __init__(self, previous: Callable[..., asyncio.Future[Any]] | None) -> None:
        self._previous = previous
        self._owners: weakref.WeakKeyDictionary[asyncio.Future[Any], ResourceWatch] = (
            weakref.WeakKeyDictionary()
        )

    @classmethod
    def install(cls, loop: asyncio.AbstractEventLoop) -> _TaskOwners:
        factory = loop.get_task_factory()
        if isinstance(factory, _TaskOwners):
            return factory
        owners = cls(factory)
        loop.set_task_factory(owners)
        return owners

    def __call__(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: _Coro,
        *,
        context: contextvars.Context | None = None,
    ) -> asyncio.Future[Any]:
        task: asyncio.Future[Any]
        if self._previous is not None:
            task = (
                self._previous(loop, coro)
                if context is None
                else self._previous(loop, coro, context=context)
            )
        else:
            task = asyncio.Task(coro, loop=loop, context=context)
        owner = context.get(_OWNER) if context is not None else _OWNER.get()
        if owner is not None:
            self._owners[task] = owner
        return task

    def owner(self, task: asyncio.Future[Any]) -> ResourceWatch | None:
        return self._owners.get(task)


class _ForeignTasks(Collection["asyncio.Task[Any]"]):
    """As kopf's ``ignored`` tasks: every task the given watch's kopf did not create."""

    def __init__(self, owners: _TaskOwners, watch: ResourceWatch) -> None:
        self._owners = owners
        self._watch = watch

    def __contains__(self, task: object) -> bool:
        return not isinstance(task, asyncio.Future) or self._owners.owner(task) is not self._watch

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(())

    def __len__(self) -> int:
        return 0


# ---------------------------------------------------------------------- signal handlers

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
