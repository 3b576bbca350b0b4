"""The archiver's packed buffer (sidecar.archive_buffer): what it holds, in which order,
and what it costs per event beyond the event bytes."""

from __future__ import annotations

import gc
import random
import tracemalloc
import uuid

import orjson

from sidecar.archive_buffer import BLOCK_BYTES, ArchiveBatch
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


def test_lines_survive_any_mix_of_adds_sorts_and_drops_across_blocks() -> None:
    """A model test: random line sizes (some larger than a block), out-of-order adds,
    repeats, sorts and partial drops; after each step the batch holds what a plain list of
    lines in the same order holds."""
    rng = random.Random(11)
    batch = ArchiveBatch("o/r", "2026-03-15")
    model: list[tuple[tuple[int, int], bytes]] = []
    known: set[tuple[int, int]] = set()
    next_millis = 1000
    largest = 0
    for step in range(300):
        choice = rng.random()
        if choice < 0.8:
            for _ in range(rng.randint(1, 60)):
                if rng.random() < 0.05 and model:
                    order = rng.choice(model)[0]  # a repeat: refused
                    assert not batch.add(order, b"ignored", 0)
                    continue
                late = rng.random() < 0.05 and next_millis > 1000
                order = (rng.randrange(900, next_millis) if late else next_millis, step + 1)
                next_millis += 0 if late else 1
                size = BLOCK_BYTES + 5 if rng.random() < 0.01 else rng.choice((10, 150, 1500))
                if order in known:
                    continue
                raw = rng.randbytes(size).hex()[:-1].encode()
                assert batch.add(order, raw, order[0])
                model.append((order, raw + b"\n"))
                known.add(order)
        elif choice < 0.9:
            batch.sort()
            model.sort()
        elif model:
            batch.sort()
            model.sort()
            count = rng.randint(0, len(model))
            batch.drop_head(count)
            known.difference_update(order for order, _ in model[:count])
            del model[:count]
        largest = max(largest, batch.size)
        assert len(batch) == len(model)
        assert batch.size == sum(len(line) for _, line in model)
        if step % 10 == 0 or len(model) < 50:
            assert batch.head(len(model)) == b"".join(line for _, line in model)
            count = rng.randint(0, len(model))
            assert batch.head(count) == b"".join(line for _, line in model[:count])
    assert largest > 4 * BLOCK_BYTES  # several blocks at once
    batch.sort()
    model.sort()
    assert batch.head_ids(len(batch)) == [f"{m}-{s}" for (m, s), _ in model]


def realistic_event(n: int, rng: random.Random) -> bytes:
    """About 300 bytes of event JSON with random IDs (what compresses least in practice)."""
    execution = uuid.UUID(int=rng.getrandbits(128))
    return orjson.dumps(
        {
            "eventId": str(uuid.UUID(int=rng.getrandbits(128))),
            "executionId": str(execution),
            "taskName": rng.choice(("deploy", "build", "test", "lint")),
            "status": rng.choice(("in_progress", "success", "error")),
            "project": f"org-{n % 10}/repo-{n % 7}",
            "occurredAt": 1_773_568_800_000 + n * 13 + rng.randrange(1000),
            "actor": {"provider": "github", "id": f"user{n % 50}", "displayName": "A User"},
            "prLinks": [f"https://github.com/org-{n % 10}/repo-{n % 7}/pull/{n % 997}"],
        }
    )


def test_buffer_costs_less_than_the_event_bytes() -> None:
    """What 100,000 buffered ~300-byte events hold, per event (the README's figure): the
    lines compressed plus 28 bytes of arrays, well under the lines' own bytes."""
    rng = random.Random(3)
    count = 100_000
    raws = [realistic_event(n, rng) for n in range(count)]
    event_bytes = sum(len(raw) + 1 for raw in raws)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    batches = [ArchiveBatch(f"org{p}/repo", "2026-03-15") for p in range(10)]
    for n, raw in enumerate(raws):
        batches[n % 10].add((1_773_568_800_000 + n, 0), raw, 1_773_568_800_000 + n)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    print(
        f"buffer: {held / count:.1f} bytes held per {event_bytes / count:.0f}-byte event"
        f" ({sum(batch.held_bytes for batch in batches) / count:.1f} counted by held_bytes)"
    )
    assert sum(len(batch) for batch in batches) == count
    assert batches[3].head(len(batches[3])) == b"".join(raw + b"\n" for raw in raws[3::10])
    assert held < event_bytes / 2, (held / count, event_bytes / count)
