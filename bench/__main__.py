"""`python -m bench` (`make bench`): every case, a table, and bench/results/latest.json.

`--quick` runs small sizes (a smoke run of the whole harness in about a minute).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench import cases, footprint, read, scaleout
from bench.servers import MotoServer
from sidecar import allocator, eventloop
from sidecar.devserver import DevServer

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    args = parser.parse_args()
    small = args.quick
    # The workers run in this process: set it up as `task-tracking run` sets up its own.
    allocator.pin_mmap_threshold()
    eventloop.tune_garbage_collector()
    rows: list[cases.Row] = []
    started = time.monotonic()
    with DevServer("redis") as server:
        moto = MotoServer()
        try:
            for count in (10_000,) if small else (100_000, 1_000_000):
                rows += _step(cases.projector_drain, server, count)
            # short tasks: the projector's batches coalesce an execution's events
            rows += _step(
                cases.projector_drain, server, 10_000 if small else 100_000, adjacent=True
            )
            rows.append(_step(cases.projector_live, server, 20_000 if small else 200_000))
            for rate in (1000, 5000):
                rows += _step(cases.latency, server, rate, 2.0 if small else 10.0)
            rows += _step(cases.archiver, server, moto, 25_000 if small else 100_000)
            rows += _step(
                footprint.footprint, server, moto, 20_000 if small else 200_000, quick=small
            )
            rows += _step(scaleout.scale_out, server, 20_000 if small else 200_000)
            # the read paths (bench/read.py)
            rows += _step(read.memory_per_execution, server, 2_000 if small else 10_000)
            rows += _step(read.snapshot_latency, server, 10_000, 50 if small else 500)
            rows += _step(
                read.sse_fanout, server, 100 if small else 1000, 1000, 2.0 if small else 10.0
            )
            rows += _step(read.feed_cost, 10_000 if small else 100_000, 1 if small else 3)
        finally:
            moto.stop()
    print(table(rows))
    RESULTS.mkdir(exist_ok=True)
    report = {
        "machine": machine(),
        "seconds": round(time.monotonic() - started, 1),
        "quick": small,
        "rows": [row.as_dict() for row in rows],
    }
    (RESULTS / "latest.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"\nwritten to {RESULTS / 'latest.json'} ({report['seconds']} s)")
    return 0


def _step(case: Any, *args: Any, **options: Any) -> Any:
    print(f"... {case.__name__}{args[1:]} {options or ''}", file=sys.stderr, flush=True)
    return case(*args, **options)


def table(rows: list[cases.Row]) -> str:
    header = ("case", "unit", "sidecar", "naive", "ceiling", "x naive", "/ ceiling", "target")
    lines = [header]
    for row in rows:
        lines.append(
            (
                row.case,
                row.unit,
                _figure(row.sidecar),
                _figure(row.naive),
                _figure(row.ceiling),
                _ratio(row.sidecar, row.naive),
                _ratio(row.sidecar, row.ceiling),
                f"{row.target} {'met' if row.met else 'NOT met'}" if row.target else "",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for number, line in enumerate(lines):
        out.append(
            "| "
            + " | ".join(
                cell.ljust(width) if i in (0, 1, 7) else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(line, widths, strict=True))
            )
            + " |"
        )
        if number == 0:
            out.append("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(out)


def _figure(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def _ratio(value: float, other: float | None) -> str:
    return "-" if not other else f"{value / other:.2f}"


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


if __name__ == "__main__":
    raise SystemExit(main())
