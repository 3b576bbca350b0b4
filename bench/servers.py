"""Process figures for the benchmarks; the servers come from sidecar.devserver."""

from __future__ import annotations

import os

from sidecar.devserver import MotoServer

__all__ = ["MotoServer", "proc_cpu_seconds", "proc_rss_mib"]


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0
