"""Training benchmarks on a local Ray cluster with 2 CPU workers (synthetic images, tiny ViTs).

    .venv/bin/python bench/train.py [--steps 30] [--out /tmp/dinoray-bench-train]

1. step time and images/s per backend (ddp, fsdp2, deepspeed ZeRO-3), vit_pico at 32 px;
2. checkpoint save time (sync) against a raw write of the same bytes to the same storage (ratio),
   per backend, with a bigger model (vit_tiny, 4096 prototypes) so that bytes dominate;
3. training-thread stall of an async save against a sync save (fsdp2, DCP).
Prints a table and writes summary.json under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator.layout import RunLayout  # noqa: E402
from orchestrator.pipeline import config  # noqa: E402
from orchestrator.training import checkpoint  # noqa: E402
from orchestrator.training import driver as train  # noqa: E402


def job(root, name, backend, arch="vit_pico", protos=256, steps=30, every=10, async_save=True):
    raw = {"name": name, "storage": root, "backend": backend, "num_workers": 2, "seed": 0,
           "data": {"train": "synthetic://256"},
           "model": {"arch": arch, "patch_size": 8, "head_n_prototypes": protos, "head_hidden_dim": 256,
                     "head_bottleneck_dim": 64, "ibot_n_prototypes": protos},
           "crops": {"global_size": 32, "local_size": 16, "n_local": 4},
           "optim": {"batch_size": 16},
           "checkpoint": {"every_steps": every, "keep_last": 2, "async_save": async_save},
           "failure": {"max_failures": 0},
           "phases": [{"name": "pretrain", "kind": "pretrain", "steps": steps}]}
    return config.job_from_dict(raw, source=f"bench:{name}")


def records(j):
    phase = RunLayout.of(j).phase("pretrain")
    return [json.loads(line) for line in open(phase.metrics.local_path)]


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def raw_write_s(ckpt_dir, folder, repeats=3):
    """Time to write the checkpoint's own bytes (read into memory first) as plain files, fsync'ed,
    into `folder` on the same storage: what any save of this state must pay at least."""
    blobs = [open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(ckpt_dir) for f in fs]
    best = float("inf")
    for i in range(repeats):
        out = os.path.join(folder, f"raw-{i}")
        os.makedirs(out)
        t0 = time.perf_counter()
        for k, b in enumerate(blobs):
            with open(os.path.join(out, str(k)), "wb") as f:
                f.write(b)
                f.flush()
                os.fsync(f.fileno())
        best = min(best, time.perf_counter() - t0)
        shutil.rmtree(out)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="/tmp/dinoray-bench-train")
    args = ap.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = {"speed": {}, "checkpoint": {}, "stall": {}}
    for backend in ("ddp", "fsdp2", "deepspeed"):
        j = job(args.out, f"speed-{backend}", backend, steps=args.steps, every=10 ** 6)
        train.run_phase(j, "pretrain")
        rs = records(j)[5:]  # skip warm-up
        step_s = statistics.median(r["step_s"] for r in rs)
        out["speed"][backend] = {"step_s": step_s, "images_per_s": 16 / step_s,
                                 "data_wait_s": statistics.median(r["data_wait_s"] for r in rs)}
        print(f"[speed] {backend:9s} step {step_s * 1e3:7.1f} ms  {16 / step_s:7.1f} img/s", flush=True)
    for backend, async_save in (("fsdp2", False), ("fsdp2", True), ("ddp", False), ("deepspeed", False)):
        name = f"ckpt-{backend}-{'async' if async_save else 'sync'}"
        j = job(args.out, name, backend, arch="vit_tiny", protos=4096, steps=12, every=3, async_save=async_save)
        train.run_phase(j, "pretrain")
        rs = records(j)
        stall = [r["ckpt_stall_s"] for r in rs if "ckpt_stall_s" in r]
        save = [r["ckpt_save_s"] for r in rs if "ckpt_save_s" in r]
        step_s = statistics.median(r["step_s"] for r in rs if "ckpt_stall_s" not in r)
        phase = RunLayout.of(j).phase("pretrain")
        last = checkpoint.latest(phase)[1].local_path
        nbytes = dir_bytes(last)
        raw = raw_write_s(last, phase.root.local_path)
        entry = {"bytes": nbytes, "stall_s": statistics.median(stall), "save_s": statistics.median(save),
                 "raw_write_s": raw, "step_s": step_s}
        entry["save_over_raw"] = entry["save_s"] / raw
        out["stall" if backend == "fsdp2" else "checkpoint"][name] = entry
        if not async_save:
            out["checkpoint"][name] = entry
        print(f"[ckpt] {name:22s} {nbytes / 2**20:6.1f} MiB  save {entry['save_s']:.3f}s  raw {raw:.3f}s  "
              f"ratio {entry['save_over_raw']:.2f}  stall {entry['stall_s']:.3f}s  step {step_s:.3f}s", flush=True)
    a, s = out["stall"]["ckpt-fsdp2-async"], out["stall"]["ckpt-fsdp2-sync"]
    print(f"[stall] fsdp2 async {a['stall_s']:.3f}s vs sync {s['stall_s']:.3f}s per save "
          f"({s['stall_s'] / max(a['stall_s'], 1e-9):.1f}x less)")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(out, f, indent=1)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
