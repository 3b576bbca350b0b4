"""The archiver's packed buffer (sidecar.archive_buffer): what it holds, in which order,
and what it costs per event beyond the event bytes."""

from __future__ import annotations

import gc
import random
import tracemalloc

from sidecar.archive_buffer import ArchiveBatch
from sidecar.watermark import NO_ENTRY


def line(number: int, size: int = 40) -> bytes:
    return f'{{"eventId":"e{number}","pad":"{"x" * size}"}}'.encode()


def test_lines_come_back_in_stream_order_with_their_ids_after_out_of_order_adds() -> None:
    batch = ArchiveBatch("o/r", "2026-03-15")
    orders = [(1000 + n // 3, n % 3) for n in range(30)]
    shuffled = orders[:]
    random.Random(7).shuffle(shuffled)
    for order in shuffled:
        assert batch.add(order, line(order[0] * 10 + order[1]), order[0] - 5)
    assert not batch.in_order
    assert batch.oldest == orders[0] and batch.newest == orders[-1]
    batch.sort()
    assert batch.head_ids(len(batch)) == [f"{m}-{s}" for m, s in orders]
    assert batch.head(len(batch)) == b"".join(line(m * 10 + s) + b"\n" for m, s in orders)
    assert list(batch.head_occurred(3)) == [995, 995, 995]
    assert list(batch.head_millis(4)) == [1000, 1000, 1000, 1001]


def test_an_entry_added_twice_is_buffered_once() -> None:
    batch = ArchiveBatch("o/r", "2026-03-15")
    for order in [(5, 0), (6, 0), (7, 0)]:
        assert batch.add(order, line(order[0]), 1)
    assert not batch.add((6, 0), line(6), 1)  # re-read after a lost connection
    assert not batch.add((7, 0), line(7), 1)
    assert batch.add((6, 1), line(61), 1)  # new, though older than the newest
    assert not batch.add((6, 1), line(61), 1)
    assert len(batch) == 4
    assert batch.size == sum(len(line(n)) + 1 for n in (5, 6, 7, 61))
    assert batch.holds((5, 0)) and not batch.holds((8, 0)) and not batch.holds((4, 9))


def test_runs_respect_both_limits_and_take_at_least_one_entry() -> None:
    batch = ArchiveBatch("o/r", "2026-03-15")
    for n in range(10):
        batch.add((n, 0), b"x" * 9, 0)  # 10 bytes with its newline
    assert batch.run_length(max_events=4, max_bytes=1000) == (4, 40)
    assert batch.run_length(max_events=100, max_bytes=35) == (3, 30)
    assert batch.run_length(max_events=100, max_bytes=5) == (1, 10)  # oversized: alone
    assert batch.run_length(max_events=100, max_bytes=1000) == (10, 100)


def test_dropping_the_written_head_keeps_the_rest_and_its_oldest_entry() -> None:
    batch = ArchiveBatch("o/r", "2026-03-15")
    for n in range(6):
        batch.add((100 + n, 0), line(n), 0)
    batch.drop_head(4)
    assert len(batch) == 2 and batch.first_id() == "104-0" and batch.oldest == (104, 0)
    assert batch.head(2) == line(4) + b"\n" + line(5) + b"\n"
    assert not batch.add((105, 0), line(5), 0)  # still known after the drop
    batch.drop_head(2)
    assert len(batch) == 0 and batch.size == 0 and batch.oldest == NO_ENTRY


def test_buffer_costs_little_more_than_the_event_bytes() -> None:
    """Per-event overhead over 100,000 buffered ~300-byte events (the README's figure):
    the memory the batches hold minus the archive lines' own bytes."""
    count, size = 100_000, 300
    raws = [line(n, size - 30) for n in range(count)]
    event_bytes = sum(len(raw) + 1 for raw in raws)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    batches = [ArchiveBatch(f"org{p}/repo", "2026-03-15") for p in range(10)]
    for n, raw in enumerate(raws):
        batches[n % 10].add((1_773_568_800_000 + n, 0), raw, 1_773_568_800_000 + n)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    overhead = (held - event_bytes) / count
    print(f"buffer: {held / count:.1f} bytes per event, {overhead:.1f} over the event bytes")
    assert sum(len(batch) for batch in batches) == count
    # 28 bytes of typed arrays per event, plus bytearray and array growth headroom
    assert overhead < 80, overhead
