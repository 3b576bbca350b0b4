"""Which tasks a kopf instance created, so that stopping it cancels only those.

``kopf.run_tasks`` cancels on exit every task not in ``ignored``, not only its own: the
sidecar's workers and other watches too. A task factory (`TaskOwners`) records the owner
(`OWNER`, a context variable every task kopf creates inherits) of each task, and
`ForeignTasks` names, as ``ignored``, every task that owner did not create.
"""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from collections.abc import Callable, Collection, Coroutine, Generator, Iterator
from typing import Any

# The watch whose kopf created the current task (None: not created by kopf).
OWNER: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "task_tracking_kopf_owner", default=None
)

_Coro = Generator[Any, None, Any] | Coroutine[Any, Any, Any]


class TaskOwners:
    """Task factory that remembers which watch's kopf created each task.

    kopf's ``run_tasks`` cancels on exit every task not in ``ignored``; with this record,
    ``ignored`` can name all tasks kopf did not create (see :class:`ForeignTasks`), so
    stopping one watch leaves the sidecar's workers and other watches alone. It wraps any
    task factory installed before it and stays installed (one ContextVar read per task).
    """

    def __init__(self, previous: Callable[..., asyncio.Future[Any]] | None) -> None:
        self._previous = previous
        self._owners: weakref.WeakKeyDictionary[asyncio.Future[Any], object] = (
            weakref.WeakKeyDictionary()
        )

    @classmethod
    def install(cls, loop: asyncio.AbstractEventLoop) -> TaskOwners:
        factory = loop.get_task_factory()
        if isinstance(factory, TaskOwners):
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
        owner = context.get(OWNER) if context is not None else OWNER.get()
        if owner is not None:
            self._owners[task] = owner
        return task

    def owner(self, task: asyncio.Future[Any]) -> object | None:
        return self._owners.get(task)


class ForeignTasks(Collection["asyncio.Task[Any]"]):
    """As kopf's ``ignored`` tasks: every task the given watch's kopf did not create."""

    def __init__(self, owners: TaskOwners, watch: object) -> None:
        self._owners = owners
        self._watch = watch

    def __contains__(self, task: object) -> bool:
        return not isinstance(task, asyncio.Future) or self._owners.owner(task) is not self._watch

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(())

    def __len__(self) -> int:
        return 0
