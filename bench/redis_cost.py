"""`python -m bench.redis_cost [REV ...]`: what a projector drain costs Redis, in
instructions per event, for this tree and each git revision REV.

Redis sets the pace of a drain on this 2-core machine, and its CPU time per event swings
with the VM as much as the code; its instruction count does not (repeatable to a few
tenths of a percent). Each tree drains the same pre-filled workload (`bench.workload`,
interleaved) into a `redis-server` run under valgrind's callgrind, counting only during
the drain. Needs `valgrind` (Debian's package); about a minute per tree for 10,000 events.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.ab import ROOT, checked_out

# Runs in either tree: `bench.workload` and `bench.drain.drain`, unchanged APIs.
DRAIN = """
import json, subprocess, sys, time
import redis
from bench.drain import drain
from bench.workload import encoded, prefill
from sidecar import eventloop
from sidecar.devserver import free_port

count, out = int(sys.argv[1]), sys.argv[2]
port = free_port()
server = subprocess.Popen(
    ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
     "redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
client = redis.Redis(port=port)
for _ in range(600):
    try:
        client.ping()
        break
    except redis.ConnectionError:
        time.sleep(0.1)
prefill(port, encoded(count))
client.config_resetstat()
subprocess.run(["callgrind_control", "-i", "on", str(server.pid)], check=True, capture_output=True)
eventloop.run(drain(f"redis://127.0.0.1:{port}/0", count))
subprocess.run(["callgrind_control", "-i", "off", str(server.pid)], check=True, capture_output=True)
calls = {name[8:]: stats["calls"] for name, stats in client.info("commandstats").items()}
client.shutdown(nosave=True)
server.wait()
print(json.dumps(calls))
"""


def instructions(tree: Path, count: int) -> tuple[float, dict[str, int]]:
    """Redis's instructions per event over a drain of `count` events in `tree`."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "callgrind.out"
        result = subprocess.run(
            [sys.executable, "-c", DRAIN, str(count), str(out)],
            cwd=tree,
            capture_output=True,
            text=True,
            check=True,
        )
        totals = re.search(r"^totals: (\d+)", out.read_text(), re.MULTILINE)
        assert totals is not None, f"no totals in {out}"
        calls: dict[str, int] = json.loads(result.stdout.strip().splitlines()[-1])
    return int(totals.group(1)) / count, calls


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_cost")
    parser.add_argument("revisions", nargs="*", help="baselines: commits, branches or tags")
    parser.add_argument("--count", type=int, default=10_000, help="events per drain")
    args = parser.parse_args()
    rows = [("this tree", *instructions(ROOT, args.count))]
    for revision in args.revisions:
        with checked_out(revision) as tree:
            rows.append((revision[:12], *instructions(tree, args.count)))
    print(f"Redis instructions per event, projector drain of {args.count:,} pre-filled")
    print(f"{'tree':>12}  {'instr/event':>12}  {'this tree /':>12}  commands per 1,000 events")
    base = rows[0][1]
    for name, per_event, calls in rows:
        shown = ("xreadgroup", "evalsha", "hset", "zadd", "xadd", "xack")
        per_thousand = " ".join(
            f"{command} {1000 * calls.get(command, 0) / args.count:.0f}" for command in shown
        )
        print(f"{name:>12}  {per_event:>12,.0f}  {base / per_event:>12.3f}  {per_thousand}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
