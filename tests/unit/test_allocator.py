"""The allocator setting of `task-tracking run` (sidecar.allocator): freed megabyte
blocks go back to the system, as they would not by glibc's defaults."""

from __future__ import annotations

import subprocess
import sys

# Frees a first block (which, by glibc's defaults, raises the mmap threshold), then holds
# 48 blocks of 1 MiB, each with a small object made after it, frees the blocks and prints
# the RSS given back (MiB).
PROGRAM = """
import sys
from sidecar import allocator

def rss_mib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

if sys.argv[1] == "pinned":
    assert allocator.pin_mmap_threshold()
first = bytearray(1 << 20)
del first
blocks, small = [], []
for _ in range(48):
    blocks.append(bytearray(1 << 20))
    blocks[-1][:] = b"x" * (1 << 20)  # touched: resident
    small.append(bytearray(4000))
held = rss_mib()
blocks.clear()
print(held - rss_mib())
"""


def given_back_mib(mode: str) -> float:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True
    )
    return float(result.stdout)


def test_freed_megabyte_blocks_are_given_back_with_the_threshold_pinned() -> None:
    assert given_back_mib("pinned") > 40


def test_without_it_glibc_keeps_them() -> None:
    # the behaviour the setting exists for: were this to change, the setting could go
    assert given_back_mib("default") < 8
