"""glibc's allocator, set for a process that holds megabytes for seconds and then frees them.

The archiver's buffers grow to about a megabyte each and are freed when their object is
written. glibc serves such a block with its own `mmap`, but the first time one is freed
it raises its mmap threshold to that size (up to 32 MiB), so the next ones come from the
heap, and a heap with live objects above the freed space does not shrink: the process
keeps its largest burst for good. Pinning the threshold (at 512 KiB) keeps large blocks
in their own mappings, returned when freed. `release_free_memory` gives back the heap's
free pages after the start (whose imports leave holes), after an archive switch and
after each archive flush (its object bodies and entry IDs leave holes; about 0.05 ms).

`python -m bench.soak --minutes 3` (2,000 events/s, archival on): max RSS 94.1 MiB before,
86.0 pinned at 128 KiB, 89.1 at 512 KiB; between flushes it falls back to about 77 instead
of staying at the peak. Does nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
# Above the reply buffer of a 500-entry read (hiredis frees and grows it again for every
# reply: mapping it each time cost the drain about 5% at glibc's default of 128 KiB),
# below the archiver's buffers and object bodies (about a megabyte at the default flush).
MMAP_THRESHOLD_BYTES = 512 * 1024


def _glibc() -> ctypes.CDLL | None:
    """The C library the interpreter is linked with, if it is glibc (musl has `mallopt`,
    a stub, but not `malloc_trim`)."""
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _glibc()


def pin_mmap_threshold() -> bool:
    """Serve blocks of 512 KiB and more from their own mappings for the life of the
    process; False where that cannot be set."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release_free_memory() -> None:
    """Return the heap's free pages to the system (`malloc_trim`)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
