"""`ArchiveBatch`: the events of one project and UTC day waiting to be archived, packed.

The archiver holds up to its flush age (30 s by default) of every event it reads, so
what it keeps per event multiplies with the rate. A batch keeps the archive lines
themselves (each event's bytes and its newline, in arrival order) compressed: zlib at
level 1 in blocks of about 64 KiB of lines, the newest lines in one open `bytearray`
until they fill a block. Per event it keeps four numbers in typed arrays: the entry ID
as (milliseconds, sequence), the line's length and the event's `occurredAt`. A 272-byte
event of the bench's workload costs 65.5 bytes held, a 316-byte one with random UUIDs
103.5 (28 of them the arrays), instead of an object per event (a named tuple, its ID
string, its bytes object, a tuple of two ints and a set entry: about 330 bytes beyond
the event's own). Entry ID
strings are made again only for what is handed back for acknowledgement, and lines are
decompressed only to be written (or compared with an object written before).
"""

from __future__ import annotations

import time
import zlib
from array import array
from collections.abc import Iterator

from sidecar.watermark import NO_ENTRY, Order

# Lines are compressed once this many bytes of them are open (whole lines: a block may
# be larger, by its last line).
BLOCK_BYTES = 64 * 1024
# zlib's fastest level: four- to sevenfold on event JSON (random IDs compress least).
COMPRESSION_LEVEL = 1


def entry_id(millis: int, sequence: int) -> str:
    """The stream entry ID string of `(milliseconds, sequence)`, as Redis writes it."""
    return f"{millis}-{sequence}"


class ArchiveBatch:
    """Events of one project and UTC day waiting to be written, their lines compressed."""

    __slots__ = (
        "_block_sizes",
        "_blocks",
        "_index",
        "_lengths",
        "_millis",
        "_occurred",
        "_open",
        "_sequences",
        "day",
        "in_order",
        "newest",
        "oldest",
        "project",
        "size",
        "started",
    )

    def __init__(self, project: str, day: str) -> None:
        self.project = project
        self.day = day
        self.started = time.monotonic()
        self.size = 0  # bytes of the lines (what the batch's objects will hold)
        self._blocks: list[bytes] = []  # the oldest lines, compressed, whole lines each
        self._block_sizes = array("I")  # of each block's lines, uncompressed
        self._open = bytearray()  # the newest lines, until they fill a block
        self._millis = array("Q")
        self._sequences = array("Q")
        self._lengths = array("I")  # of each line, its newline included
        self._occurred = array("q")  # occurredAt, epoch ms (the event-age metric)
        self.oldest: Order = NO_ENTRY  # the smallest entry ID buffered (watermark)
        self.newest: Order = (0, 0)  # the greatest
        self.in_order = True  # every entry was added after a smaller one
        # Entry IDs (packed) of what is buffered, built only when an entry arrives out of
        # order (a re-read after a lost connection, a claim): None until then.
        self._index: set[int] | None = None

    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def held_bytes(self) -> int:
        """Bytes the batch holds for its events: compressed blocks, open lines, arrays."""
        columns = (self._millis, self._sequences, self._lengths, self._occurred)
        arrays = sum(len(column) * column.itemsize for column in columns)
        return sum(len(block) for block in self._blocks) + len(self._open) + arrays

    def add(self, order: Order, raw: bytes, occurred_at_ms: int) -> bool:
        """Append an event; False (nothing added) when its entry is buffered already."""
        if order <= self.newest and len(self._lengths):
            if self.holds(order):
                return False
            self.in_order = False
        millis, sequence = order
        self._append(raw, b"\n")
        self.size += len(raw) + 1
        self._millis.append(millis)
        self._sequences.append(sequence)
        self._lengths.append(len(raw) + 1)
        self._occurred.append(occurred_at_ms)
        if self._index is not None:
            self._index.add(_packed(millis, sequence))
        if order > self.newest:
            self.newest = order
        if order < self.oldest:
            self.oldest = order
        return True

    def _append(self, *parts: bytes | memoryview) -> None:
        """Add a line (its parts) to the open lines, sealing them once they fill a block."""
        for part in parts:
            self._open += part
        if len(self._open) >= BLOCK_BYTES:
            self._seal()

    def _seal(self) -> None:
        """Compress the open lines into a block."""
        self._blocks.append(zlib.compress(self._open, COMPRESSION_LEVEL))
        self._block_sizes.append(len(self._open))
        self._open = bytearray()

    def holds(self, order: Order) -> bool:
        """Whether the entry is buffered here."""
        if order > self.newest or not len(self._lengths):
            return False
        if self._index is None:
            self._index = {_packed(*each) for each in self.orders()}
        return _packed(*order) in self._index

    def orders(self) -> Iterator[Order]:
        return zip(self._millis, self._sequences, strict=True)

    def sort(self) -> None:
        """Put the entries in stream order (objects are runs in stream order)."""
        if self.in_order:
            return
        lines = self._lines(self.size)
        starts = array("Q", [0]) * len(self)
        offset = 0
        for position, length in enumerate(self._lengths):
            starts[position] = offset
            offset += length
        millis, sequences = self._millis, self._sequences
        permutation = sorted(range(len(self)), key=lambda i: (millis[i], sequences[i]))
        self._blocks, self._block_sizes, self._open = [], array("I"), bytearray()
        with memoryview(lines) as view:
            for i in permutation:
                self._append(view[starts[i] : starts[i] + self._lengths[i]])
        self._millis = array("Q", (millis[i] for i in permutation))
        self._sequences = array("Q", (sequences[i] for i in permutation))
        self._lengths = array("I", (self._lengths[i] for i in permutation))
        self._occurred = array("q", (self._occurred[i] for i in permutation))
        self.in_order = True

    def run_length(self, max_events: int, max_bytes: int) -> tuple[int, int]:
        """The leading entries that make the next object: (count, bytes). At least one
        entry, however large; then as many as fit both limits."""
        size = 0
        for count, length in enumerate(self._lengths):
            if count and (count >= max_events or size + length > max_bytes):
                return count, size
            size += length
        return len(self), size

    def head(self, count: int) -> bytes:
        """The archive lines of the first `count` entries (an object's body)."""
        return bytes(self._lines(sum(self._lengths[:count])))

    def _lines(self, size: int) -> bytearray:
        """The first `size` bytes of lines (a line boundary), decompressed a block at a
        time."""
        lines = bytearray()
        for block, block_size in zip(self._blocks, self._block_sizes, strict=True):
            if len(lines) >= size:
                break
            lines += zlib.decompress(block, bufsize=block_size)
        if len(lines) < size:
            lines += self._open[: size - len(lines)]
        del lines[size:]
        return lines

    def head_ids(self, count: int) -> list[str]:
        """The entry ID strings of the first `count` entries (for acknowledgement)."""
        pairs = zip(self._millis[:count], self._sequences[:count], strict=True)
        return [entry_id(millis, sequence) for millis, sequence in pairs]

    def head_millis(self, count: int) -> array[int]:
        """Entry-ID milliseconds (time added to the stream) of the first `count` entries."""
        return self._millis[:count]

    def head_occurred(self, count: int) -> array[int]:
        return self._occurred[:count]

    def first_id(self) -> str:
        return entry_id(self._millis[0], self._sequences[0])

    def drop_head(self, count: int) -> None:
        """Forget the first `count` entries (written)."""
        size = sum(self._lengths[:count])
        self.size -= size
        whole = 0  # blocks wholly written
        while whole < len(self._blocks) and size >= self._block_sizes[whole]:
            size -= self._block_sizes[whole]
            whole += 1
        del self._blocks[:whole]
        del self._block_sizes[:whole]
        if size and self._blocks:  # the rest of a block: compressed again
            rest = zlib.decompress(self._blocks[0], bufsize=self._block_sizes[0])[size:]
            self._blocks[0] = zlib.compress(rest, COMPRESSION_LEVEL)
            self._block_sizes[0] = len(rest)
        elif size:
            del self._open[:size]
        for column in (self._millis, self._sequences, self._lengths, self._occurred):
            del column[:count]
        self._index = None
        self.oldest = (self._millis[0], self._sequences[0]) if len(self) else NO_ENTRY


def _packed(millis: int, sequence: int) -> int:
    return millis << 64 | sequence
