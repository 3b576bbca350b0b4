"""`python -m bench.ab REV`: the projector drain of this tree against git revision REV,
in the same window, alternating, so that a change's cost is measured and not guessed
(absolute rates drift on shared machines; pairs run back to back do not).

Each run is a fresh process with its own redis-server, in the tree it measures (REV is
checked out in a temporary git worktree). Prints one row per pair and the median ratio.
"""

from __future__ import annotations

import argparse
import contextlib
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


def drain_rate(tree: Path, count: int) -> float:
    result = subprocess.run(
        [sys.executable, "-c", DRAIN, str(count)],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


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
    args = parser.parse_args()
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


if __name__ == "__main__":
    raise SystemExit(main())
