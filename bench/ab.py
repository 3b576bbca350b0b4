"""`python -m bench.ab REV`: the projector drain of this tree against git revision REV,
in the same window, alternating, so that a change's cost is measured and not guessed
(absolute rates drift on shared machines; pairs run back to back do not).
`python -m bench.ab REV --latency 1000`: XADD->projected p50/p99 at that rate instead.

Each run is a fresh process with its own redis-server, in the tree it measures (REV is
checked out in a temporary git worktree). Prints one row per pair and the median ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in either tree: only `bench.cases.projector_drain` and `DevServer`, unchanged APIs.
DRAIN = """
import sys
from bench import cases
from sidecar import eventloop
from sidecar.devserver import DevServer
eventloop.tune_garbage_collector()
with DevServer("redis") as server:
    row = cases.projector_drain(server, int(sys.argv[1]))[0]
print(row.sidecar)
"""

# p50 and p99 (ms) of `bench.cases.latency` at a rate, 10 s of events.
LATENCY = """
import sys
from bench import cases
from sidecar import eventloop
from sidecar.devserver import DevServer
if __name__ == "__main__":
    eventloop.tune_garbage_collector()
    with DevServer("redis") as server:
        rows = cases.latency(server, int(sys.argv[1]), 10.0)
    print(rows[0].sidecar, rows[1].sidecar)
"""


def drain_rate(tree: Path, count: int) -> float:
    return float(_run(tree, DRAIN, count)[0])


def latency_ms(tree: Path, rate: int) -> tuple[float, float]:
    p50, p99 = _run(tree, LATENCY, rate)
    return float(p50), float(p99)


def _run(tree: Path, program: str, argument: int) -> list[str]:
    """The last line a benchmark program printed, run in `tree`, split on spaces."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", dir=tree) as script:
        script.write(program)  # a file, not -c: the latency publisher is a spawned process
        script.flush()
        result = subprocess.run(
            [sys.executable, script.name, str(argument)],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree)},
            capture_output=True,
            text=True,
            check=True,
        )
    return result.stdout.strip().splitlines()[-1].split()


@contextlib.contextmanager
def checked_out(revision: str) -> Iterator[Path]:
    """A temporary git worktree of `revision`, removed afterwards."""
    with tempfile.TemporaryDirectory() as folder:
        tree = Path(folder) / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision],
            check=True,
            capture_output=True,
        )
        try:
            yield tree
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                check=False,
                capture_output=True,
            )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab")
    parser.add_argument("revision", help="the baseline: a commit, branch or tag")
    parser.add_argument("--count", type=int, default=100_000, help="events per drain")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--latency", type=int, metavar="RATE", help="latency at RATE/s")
    args = parser.parse_args()
    if args.latency:
        return compare_latency(args.revision, args.latency, args.pairs)
    with checked_out(args.revision) as baseline:
        ratios = []
        print(f"projector drain, {args.count:,} pre-filled, events/s")
        print(f"{'pair':>4}  {args.revision[:12]:>12}  {'this tree':>12}  {'ratio':>6}")
        for pair in range(1, args.pairs + 1):
            # alternate which goes first, so a drifting machine favours neither
            if pair % 2:
                before = drain_rate(baseline, args.count)
                after = drain_rate(ROOT, args.count)
            else:
                after = drain_rate(ROOT, args.count)
                before = drain_rate(baseline, args.count)
            ratios.append(after / before)
            print(f"{pair:>4}  {before:>12,.0f}  {after:>12,.0f}  {after / before:>6.3f}")
        median = statistics.median(ratios)
        print(f"median ratio (this tree / {args.revision[:12]}): {median:.3f}")
    return 0


def compare_latency(revision: str, rate: int, pairs: int) -> int:
    with checked_out(revision) as baseline:
        print(f"latency XADD->projected at {rate:,}/s, ms (p50 / p99)")
        print(f"{'pair':>4}  {revision[:12]:>15}  {'this tree':>15}")
        for pair in range(1, pairs + 1):
            if pair % 2:
                before, after = latency_ms(baseline, rate), latency_ms(ROOT, rate)
            else:
                after, before = latency_ms(ROOT, rate), latency_ms(baseline, rate)
            cells = (f"{p50:>6.2f} / {p99:>6.2f}" for p50, p99 in (before, after))
            print(f"{pair:>4}  " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
