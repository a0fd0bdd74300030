"""Host memory kept for reuse (peftrun/host_memory.py): what a step frees comes back without page
faults, and an allocator the user set up is left alone. Each case runs in a process of its own,
as the setting lasts for the process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Three rounds of a step-like pattern: 96 tensors of 1 MiB written, then all freed. The page
# faults of the later rounds are those of memory the allocator gave back to the system.
PROBE = """
import json, resource, sys, torch
from peftrun.host_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.ones(1 << 18) for _ in range(96)]
    del held
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT,
                         env={**clean, **env}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_comes_back_without_page_faults():
    pages = 96 * (1 << 20) // 4096
    default, kept = probe("default"), probe("keep")
    assert kept["kept"] is True
    assert sum(kept["faults"][1:]) < pages // 5, kept  # reused: few pages touched afresh
    assert default["faults"][1] > pages // 2, default  # what the setting spares: glibc gave it back


def test_an_allocator_the_user_set_up_is_left_alone():
    assert probe("keep", MALLOC_TRIM_THRESHOLD_="1048576")["kept"] is False
    assert probe("keep", LD_PRELOAD="libjemalloc.so.2")["kept"] is False
