"""The TaskTracking watch: kopf embedded in the sidecar's event loop, for one resource.

A present TaskTracking overrides the environment's archive settings; a deleted one hands
control back to the environment. What a spec asks for, when it is applied and what the
status says is the resource's domain (`sidecar.resource`, no kopf there); this module is
the glue that runs it inside kopf. Many sidecars watch the same resource, so it writes
nothing kopf would normally persist on it (no finalizers, no progress annotations, no
handler results) and each sidecar writes only its own status entry
``status.sidecars.<podName>`` plus the derived summary ``status.applied``/``status.archiving``.

How kopf is embedded, and why (DESIGN.md, "Known pitfalls"):

- Only an ``on.event`` handler is registered, in a private ``kopf.OperatorRegistry``: the
  change handlers (create/update/delete/resume) store progress and add finalizers. The
  persistence storages are replaced by no-op ones and the finalizer name is our own, so
  even a misconfiguration cannot make kopf write its bookkeeping. The handler returns
  None: a returned value would be stored in ``status.<handler id>``.
- Spec changes are detected by ``metadata.generation`` (`resource.SpecGeneration`), not by
  event: status writes wake every watcher, the writer included. The own entry is written
  only when its content changes (`resource.merge_status`), and a write that changes
  nothing is a no-op at the API server, so nothing loops.
- kopf's ``spawn_tasks`` installs its own SIGINT/SIGTERM handlers when it runs in the main
  thread (``loop.add_signal_handler``) and never removes them. The sidecar drives its own
  shutdown, so its handlers are put back as soon as ``spawn_tasks`` returns; kopf stops
  only through ``stop_flag``. They are installed through ``eventloop.add_signal_handler``,
  which remembers them: neither asyncio nor uvloop says which handler is installed.
- ``kopf.operator()`` cancels, when it exits, every task created after it started, not
  only its own. This module runs ``spawn_tasks`` + ``run_tasks`` itself and passes as
  ``ignored`` every task that was not created from inside this watch's kopf context
  (tracked by a task factory, see `sidecar.kopf_tasks`). The runtime's reconfiguration
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
the current generation (`resource.merge_status`). A live sidecar catches up on a new
generation within moments, so it is never both behind and silent for that long; a pod
that is gone is, after the next spec change. An entry removed by mistake is rewritten by
its owner on its next event.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import signal
from collections.abc import Callable
from typing import Any

import kopf

from sidecar import eventloop
from sidecar.kopf_tasks import OWNER, ForeignTasks, TaskOwners
from sidecar.resource import (
    GROUP,
    PLURAL,
    VERSION,
    ArchiveControl,
    ArchiveState,
    ResourceSpec,
    SpecGeneration,
    merge_status,
    parse_spec,
    status_content,
)

logger = logging.getLogger(__name__)

EVENT_REASON_INVALID = "InvalidSpec"
# How long the one read of the resource before archival starts may take (`read_spec`).
FIRST_READ_SECONDS = 10.0


def has_kubernetes_credentials() -> bool:
    """True when a service account or a kubeconfig is there to log in with: the one
    credentials check (`ResourceWatch.can_log_in` asks it once)."""
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
        self._generation = SpecGeneration()
        self._error: str | None = None
        self._entry: dict[str, Any] | None = None  # the own entry as last written
        self._credentials: bool | None = None

    def can_log_in(self) -> bool:
        """Whether there are credentials to watch with (checked once, said once)."""
        if self._credentials is None:
            self._credentials = has_kubernetes_credentials()
            if not self._credentials:
                logger.info(
                    "no Kubernetes service account or kubeconfig: TaskTracking %r is not"
                    " watched; the environment's configuration applies",
                    self.resource_name,
                )
        return self._credentials

    async def read_spec(self, timeout_seconds: float = FIRST_READ_SECONDS) -> ResourceSpec | None:
        """The resource's spec as it stands, read once before archival starts: kopf's
        first event comes later, and archiving meanwhile to the environment's target sent
        a restarted pod's pending entries there. None when it is absent, invalid or not
        readable in time: the environment's configuration applies until the watch says."""
        import aiohttp

        from sidecar.kube_api import kubernetes_api

        info = _login(settings=kopf.OperatorSettings())
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{PLURAL}/{self.resource_name}"
        what = f"TaskTracking {self.namespace}/{self.resource_name}"
        try:
            async with kubernetes_api(info, timeout_seconds) as api:
                status, body = await api.get(path)
            if status == 404:
                return None
            if status != 200:
                message = body.get("message", "") if isinstance(body, dict) else ""
                raise ValueError(f"HTTP {status} {message}".strip())
            return parse_spec(body.get("spec") or {})
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            logger.warning(
                "%s could not be read before archival starts (%s): the environment's"
                " configuration applies until the watch reads it",
                what,
                exc or type(exc).__name__,
                extra={"resource": self.resource_name},
            )
            return None

    async def run(self) -> None:
        """Run kopf until stop() (or until cancelled); return at once without credentials."""
        if not self.can_log_in():
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
        owners = TaskOwners.install(loop)
        OWNER.set(self)  # this task's own context: every task kopf creates inherits it
        saved = eventloop.python_signal_handlers(_SIGNALS)
        tasks = await kopf.spawn_tasks(
            registry=self._registry(),
            settings=self._settings(),
            standalone=True,
            clusterwide=False,
            namespaces=[self.namespace],
            stop_flag=self._stop_flag,
            ready_flag=self.ready,
            # Ours, not kopf's default user@host: getpass.getuser() raises for a UID that
            # /etc/passwd lacks (the image's 10001, any runAsUser). Identity is a NewType of
            # str that kopf does not export.
            identity=self.pod_name,  # type: ignore[arg-type]
        )
        eventloop.restore_signal_handlers(saved)  # kopf's replaced the sidecar's
        logger.info(
            "kopf started for TaskTracking %r; the sidecar's signal handlers are back",
            self.resource_name,
            extra={"resource": self.resource_name},
        )
        await kopf.run_tasks(tasks, ignored=ForeignTasks(owners, self))

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
            self._generation = SpecGeneration()
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
        if self._generation.needs_apply(generation):
            await self._apply(body, generation)
        self._write_status(body, patch, generation)

    async def _apply(self, body: kopf.Body, generation: int) -> None:
        self._generation.handling(generation)
        try:
            spec = parse_spec(body.spec)
            state = await self._reconfigure(spec)
        except ValueError as e:
            self._error = str(e) or type(e).__name__
        except Exception as e:  # the runtime failed: report it, never crash the watch
            logger.exception("Applying TaskTracking %r failed.", self.resource_name)
            self._error = f"{type(e).__name__}: {e}"
            self._generation.retry()  # not the spec's fault: try again on the next event
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

    async def _reconfigure(self, spec: ResourceSpec | None) -> ArchiveState:
        # Outside kopf's task context (so kopf never cancels what the runtime starts), and
        # shielded: a reconfiguration in flight completes even if kopf stops meanwhile.
        token = OWNER.set(None)
        try:
            task = asyncio.create_task(self._control.apply_archive_spec(spec))
        finally:
            OWNER.reset(token)
        return await asyncio.shield(task)

    def _write_status(self, body: kopf.Body, patch: kopf.Patch, generation: int) -> None:
        content = status_content(
            self._state, generation, self._error, self._write_mode(self._state)
        )
        update = merge_status(
            body.status,
            pod=self.pod_name,
            content=content,
            last_entry=self._entry,
            generation=generation,
            now=datetime.datetime.now(datetime.UTC),
            stale_after=self._stale_after,
        )
        self._entry = update.entry
        patch.status.update(update.patch)

    def _write_mode(self, state: ArchiveState | None) -> str | None:
        if self._conditional_writes is not None:
            return self._conditional_writes()
        return state.conditional_writes if state else None


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


# ---------------------------------------------------------------------- signal handlers

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
