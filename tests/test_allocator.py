"""glibc keeps a CPU training process's freed memory (orchestrator.training.setup.keep_freed_memory).

    .venv/bin/python -m pytest tests/test_allocator.py -q

Each case runs in a fresh interpreter: mallopt changes the whole process, and the default behaviour
is what the other case measures.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

PAGES = (64 << 20) // 4096  # one 64 MiB tensor

_PROBE = """
import json, resource, sys, torch
from orchestrator.training.setup import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(8):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 << 20)  # 64 MiB of float32, written once, then freed
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_freed_tensors_are_reused_without_page_faults():
    default, kept = _probe("default"), _probe("keep")
    assert kept["kept"] is True
    # by default every fresh 64 MiB tensor is a new mapping: each of its pages faults again
    assert all(f >= 0.9 * PAGES for f in default["faults"][4:]), default
    # kept: once the heap has grown (within the first 3 tensors), the same memory serves the next ones
    assert all(f < 0.01 * PAGES for f in kept["faults"][4:]), kept
