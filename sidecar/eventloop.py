"""How a sidecar process runs: on uvloop where it is installed, with the garbage collector
tuned for a long-lived service whose batches allocate thousands of short-lived objects.

Both measured on the projector drain (bench/): uvloop's event loop and transports take
about 15% less CPU per event than asyncio's, and the default collector spent about 14%
of the time re-scanning objects that live as long as the process.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

T = TypeVar("T")

LOOP_FACTORY: Callable[[], asyncio.AbstractEventLoop] | None
try:
    import uvloop

    LOOP_FACTORY = uvloop.new_event_loop
except ImportError:  # not on every platform (Windows); asyncio's own loop works the same
    LOOP_FACTORY = None

# Net container allocations before a young collection (CPython's default is 700): a batch's
# objects die together when it is acknowledged, so most are never scanned at all.
YOUNG_GENERATION_THRESHOLD = 20_000


# How long a cancelled task may go on before it is cancelled again (`cancel_and_wait`).
CANCEL_AGAIN_SECONDS = 0.1


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it has ended (its own error, if any, is raised).

    Python 3.11's `asyncio.wait_for`, which redis-py awaits inside commands, loses a
    cancellation that arrives as the future it waits for completes (CPython gh-86296,
    rewritten in 3.12): the task goes on as if never cancelled, here a reader's next
    blocking XREAD and then the next. So the cancellation is repeated until it ends."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_AGAIN_SECONDS)
    if not task.cancelled():
        task.result()


def tune_garbage_collector() -> None:
    """Freeze what exists now (modules, schemas, settings: alive until exit) so full
    collections skip it, and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, older, oldest)


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on uvloop when it is installed."""
    with asyncio.Runner(loop_factory=LOOP_FACTORY) as runner:
        return runner.run(main)


# The signal handlers added through `add_signal_handler`, per loop: neither asyncio nor
# uvloop says which handler is installed, and kopf replaces them when it starts.
_SignalHandler = tuple[Callable[..., object], tuple[Any, ...]]
_signal_handlers: WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, _SignalHandler]] = (
    WeakKeyDictionary()
)


def add_signal_handler(sig: int, callback: Callable[..., object], *args: Any) -> None:
    """`loop.add_signal_handler` on the running loop, remembered for
    `restore_signal_handlers`."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(sig, callback, *args)
    _signal_handlers.setdefault(loop, {})[sig] = (callback, args)


def remove_signal_handler(sig: int) -> None:
    loop = asyncio.get_running_loop()
    loop.remove_signal_handler(sig)
    _signal_handlers.get(loop, {}).pop(sig, None)


def restore_signal_handlers(python_handlers: dict[int, Any]) -> None:
    """After a library replaced the running loop's handlers of these signals: put back
    those added through `add_signal_handler`, else the Python-level handler saved before
    (`signal.getsignal`). Does nothing outside the main thread (no handlers there)."""
    loop = asyncio.get_running_loop()
    own = _signal_handlers.get(loop, {})
    for sig, python_handler in python_handlers.items():
        try:
            if sig in own:
                callback, args = own[sig]
                loop.add_signal_handler(sig, callback, *args)
            else:
                loop.remove_signal_handler(sig)
                if python_handler is not None:
                    signal.signal(sig, python_handler)
        except (NotImplementedError, RuntimeError, ValueError):
            pass


def python_signal_handlers(signals: Iterable[int]) -> dict[int, Any]:
    return {sig: signal.getsignal(sig) for sig in signals}
