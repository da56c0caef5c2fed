"""A CPU training process's set-up (orchestrator.training.setup.prepare_cpu_process): glibc keeps freed
memory, and subnormal floats are flushed to zero on every intra-op thread.

    .venv/bin/python -m pytest tests/test_cpu_process.py -q

Each case runs in a fresh interpreter: both settings change the whole process, and the default
behaviour is what the other case measures.
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


def _run(script: str, mode: str) -> dict:
    """Run `script` in a fresh interpreter with `mode` as its argument; its last stdout line as JSON."""
    out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_freed_tensors_are_reused_without_page_faults():
    default, kept = _run(_PROBE, "default"), _run(_PROBE, "keep")
    assert kept["kept"] is True
    # by default every fresh 64 MiB tensor is a new mapping: each of its pages faults again
    assert all(f >= 0.9 * PAGES for f in default["faults"][4:]), default
    # kept: once the heap has grown (within the first 3 tensors), the same memory serves the next ones
    assert all(f < 0.01 * PAGES for f in kept["faults"][4:]), kept


_SUBNORMAL_PROBE = """
import json, sys, torch
torch.set_num_threads(2)
if sys.argv[1] == "late":
    (torch.randn(1 << 20) * 2).sum()  # the intra-op threads start before the set-up
from orchestrator.training.setup import prepare_cpu_process
host = prepare_cpu_process(keep_memory=False) if sys.argv[1] != "default" else None
x = torch.randint(1, 0x7FFFFF, (1 << 21,), dtype=torch.int32).view(torch.float32)  # subnormal bit patterns
y = x * 1.5  # split over both threads (2M elements)
z = torch.tensor([-100.0]).exp()  # a subnormal result
print(json.dumps({"host": host, "nonzero": int((y.view(torch.int32) != 0).sum()), "n": y.numel(),
                  "exp": float(z)}))
"""


def test_subnormals_are_flushed_on_every_thread_and_the_check_is_honest():
    default, prepared, late = (_run(_SUBNORMAL_PROBE, mode) for mode in ("default", "first", "late"))
    assert default["nonzero"] == default["n"] and default["exp"] > 0  # subnormals computed as they are
    assert prepared["host"] == {"keep_freed_memory": False, "flush_subnormals": True}
    assert prepared["nonzero"] == 0 and prepared["exp"] == 0.0, prepared
    # threads started before the call keep their subnormals: the set-up says so instead of claiming it
    assert late["host"]["flush_subnormals"] is False and 0 < late["nonzero"] < late["n"], late
