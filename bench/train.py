"""Training benchmarks on a local Ray cluster with 2 CPU workers (synthetic images, tiny ViTs).

    .venv/bin/python bench/train.py [--steps 30] [--out /tmp/dinoray-bench-train] [--big local,s3] [--skip-small]

1. step time and images/s per backend (ddp, fsdp2, deepspeed ZeRO-3), vit_pico at 32 px;
2. checkpoint save time (sync) against a raw write of the same bytes to the same storage (ratio),
   per backend, with a bigger model (vit_tiny, 4096 prototypes) so that bytes dominate;
3. training-thread stall of an async save against a sync save (fsdp2, DCP);
4. the same at >= 1 GB (vit_base, 8192-prototype DINO + iBOT heads, fp32: 1.52 GiB of student, teacher
   and AdamW state), fsdp2 on 2 gloo ranks without Ray, on local disk and on a SeaweedFS S3 server:
   raw write of the checkpoint's own bytes, sync save, async stall (save call + the next optimiser
   step's wait for the staging copy), interleaved --big-reps times, medians;
5. fsdp2's fsdp.reshard_after_forward true (default) against false (the student's units keep their
   gathered parameters from forward to backward): all-gathers per step and step time, vit_tiny on 2
   gloo ranks without Ray, interleaved --reshard-reps times, medians.
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


# ------------------------------------------------------------------ >= 1 GB state, no Ray
def big_job(root, workers):
    """vit_base + 8192-prototype DINO and iBOT heads: student, teacher and AdamW state about 1.6 GB."""
    raw = {"name": "big", "storage": root, "backend": "fsdp2", "num_workers": workers, "seed": 0,
           "data": {"train": "synthetic://64"},
           "model": {"arch": "vit_base", "patch_size": 8, "head_n_prototypes": 8192, "ibot_n_prototypes": 8192},
           "crops": {"global_size": 32, "local_size": 16, "n_local": 2},
           "optim": {"batch_size": 4}, "precision": {"autocast": "fp32", "param_dtype": "fp32"},
           "phases": [{"name": "pretrain", "kind": "pretrain", "steps": 100}]}
    return config.job_from_dict(raw, source="bench:big")


def _spawn(fn, world, *args):
    """fn(rank, world, *args) in `world` gloo processes (torch.multiprocessing); rank 0's result."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_entry, args=(world, port, q, fn, args), nprocs=world, join=True)
    return q.get()


def _entry(rank, world, port, q, fn, args):
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = fn(rank, world, *args)
        if rank == 0:
            q.put(out)
    finally:
        dist.destroy_process_group()


class _Trainer:
    """One rank's fsdp2 backend over `big_job`, stepping on a fixed batch."""

    def __init__(self, job):
        import torch
        from orchestrator.training import backends, setup
        r = config.resolve(job, "pretrain")
        self.b = backends.build(setup.build_meta(job, r, None), job, torch.device("cpu"), r.optim)
        self.batch = next(iter(setup.make_loader(job, r, self.b.rank, self.b.world, None, data_workers=0)))

    def step(self):
        self.b.zero_grad()
        loss, _ = self.b.forward(self.batch, teacher_temp=0.04)
        self.b.backward(loss)
        self.b.step(3.0)
        self.b.ema_(0.99)


def _timed(fn):
    import torch.distributed as dist
    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    dist.barrier()
    return time.perf_counter() - t0, out


def _raw_blobs(ckpt, rank):
    """This rank's bytes of a committed checkpoint (its DCP files; rank 0 also .metadata)."""
    names = [n for n in ckpt.ls() if n.startswith(f"__{rank}_") or (rank == 0 and n == ".metadata")]
    return [(ckpt / n).read_bytes() for n in names]


def _raw_write(folder, rank, blobs, stream=False):
    """Plain writes of `blobs` to the same storage: open/write/fsync locally, one (multipart) PUT per
    blob on an object store (s3fs pipe_file). stream=True (local): the checkpoint writer's own file
    routine (`ckpt_io.write_local`, writeback started every 32 MiB), i.e. the bytes-only floor."""
    from orchestrator.training import ckpt_io
    if folder.is_local:
        os.makedirs(folder.local_path, exist_ok=True)
    for k, b in enumerate(blobs):
        dest = folder / f"raw-{rank}-{k}"
        if dest.is_local and stream:
            ckpt_io.write_local(dest.local_path, [memoryview(b)])
        elif dest.is_local:
            with open(dest.local_path, "wb") as f:
                f.write(b)
                f.flush()
                os.fsync(f.fileno())
        else:
            fs, path = dest.fs()
            fs.pipe_file(path, b)


def _drop_checkpoints(phase, rank):
    if rank == 0:
        for step in checkpoint.list_steps(phase):
            phase.checkpoint(step).rm(recursive=True)


def _big_rank(rank, world, root, reps):
    """Interleaved per rep: raw write, sync save, async save (stall, the next training step, the
    background completion), on `root` (a local folder or an s3:// URL)."""
    import torch
    from orchestrator.layout import PhaseDir
    from orchestrator.storage import Store
    job = big_job(root, world)
    tr = _Trainer(job)
    tr.step()  # AdamW state exists from here on
    phase = PhaseDir(Store(root) / "big")
    # retention off in the timed saves: deleting an old 1.5 GB checkpoint is timed apart (cleanup_s)
    sync = checkpoint.Checkpointer(tr.b, phase, keep_last=10 ** 6, async_save=False)
    asyn = checkpoint.Checkpointer(tr.b, phase, keep_last=10 ** 6, async_save=True)
    plain = [_timed(tr.step)[0] for _ in range(2)]
    first = _timed(lambda: sync.save(1, {}))[0]
    if rank == 0:
        print(f"plain steps {plain}, first save {first:.2f}s", flush=True)
    blobs = _raw_blobs(phase.checkpoint(1), rank)
    _timed(lambda: _drop_checkpoints(phase, rank))
    nbytes = torch.tensor([sum(len(b) for b in blobs)])
    torch.distributed.all_reduce(nbytes)
    raw_dir = phase.root / "raw"
    rows = {k: [] for k in ("raw_s", "raw_stream_s", "sync_s", "stall_s", "fence_s", "next_step_s", "async_s",
                            "cleanup_s")}
    for i in range(reps):
        rows["raw_s"].append(_timed(lambda: _raw_write(raw_dir, rank, blobs))[0])
        _timed(lambda: raw_dir.rm(recursive=True) if rank == 0 else None)
        if raw_dir.is_local:
            rows["raw_stream_s"].append(_timed(lambda: _raw_write(raw_dir, rank, blobs, stream=True))[0])
            _timed(lambda: raw_dir.rm(recursive=True) if rank == 0 else None)
        rows["sync_s"].append(_timed(lambda: sync.save(10 + 2 * i, {}))[0])
        t0 = time.perf_counter()
        stall = _timed(lambda: asyn.save(11 + 2 * i, {}))[0]
        fence0 = asyn._stager.fence_s
        rows["next_step_s"].append(_timed(tr.step)[0])   # training while the write runs
        rows["fence_s"].append(asyn._stager.fence_s - fence0)  # its optimiser step waited for staging
        rows["stall_s"].append(stall + rows["fence_s"][-1])
        asyn.wait()
        rows["async_s"].append(time.perf_counter() - t0)
        rows["cleanup_s"].append(_timed(lambda: _drop_checkpoints(phase, rank))[0])
        if rank == 0:
            print({k: round(v[-1], 3) for k, v in rows.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    med.update(bytes=int(nbytes.item()), plain_step_s=statistics.median(plain), runs=rows)
    return med


def big_state(root, reps, world=2):
    """The >= 1 GB rows on `root`: a local folder, or "s3" for a SeaweedFS server (tests/s3server.py)."""
    if root != "s3":
        return _big_row(root, reps, world)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import tempfile
    from s3server import S3Server
    srv = S3Server(tempfile.mkdtemp(prefix="dinoray-bench-weed-")).start()
    saved = {k: os.environ.get(k) for k in srv.env()}
    os.environ.update(srv.env())  # inherited by the spawned ranks
    try:
        return _big_row(f"s3://{srv.bucket}/bench", reps, world)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        srv.stop()
        shutil.rmtree(srv.dir, ignore_errors=True)


def _big_row(root, reps, world):
    r = _spawn(_big_rank, world, root, reps)
    r["save_over_raw"] = r["sync_s"] / r["raw_s"]
    r["raw_over_save"] = r["raw_s"] / r["sync_s"]
    r["stall_over_sync"] = r["stall_s"] / r["sync_s"]
    print(f"[big] {root[:40]:40s} {r['bytes'] / 2**30:5.2f} GiB  raw {r['raw_s']:.2f}s  sync {r['sync_s']:.2f}s  "
          f"raw/sync {r['raw_over_save']:.2f}  async stall {r['stall_s']:.3f}s ({r['stall_over_sync']:.1%} of sync)  "
          f"next step {r['next_step_s']:.2f}s vs {r['plain_step_s']:.2f}s  async done {r['async_s']:.2f}s  "
          f"deleting 2 checkpoints {r['cleanup_s']:.2f}s", flush=True)
    if "raw_stream_s" in r:
        print(f"[big] same bytes through the writer's own file routine {r['raw_stream_s']:.2f}s: "
              f"save/that {r['sync_s'] / r['raw_stream_s']:.2f}", flush=True)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="/tmp/dinoray-bench-train")
    ap.add_argument("--big", default="local,s3", help="storages of the >= 1 GB rows: local, s3 (comma list, '' = none)")
    ap.add_argument("--big-reps", type=int, default=3, help="interleaved raw/sync/async repetitions per big row")
    ap.add_argument("--skip-small", action="store_true", help="only the >= 1 GB and reshard rows (no Ray)")
    ap.add_argument("--reshard-reps", type=int, default=3, help="interleaved runs per reshard row (0: none)")
    args = ap.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    out = {} if args.skip_small else small(args)
    out["big"] = {}
    for where in filter(None, args.big.split(",")):
        root = os.path.join(args.out, "big") if where == "local" else where
        out["big"][where] = big_state(root, args.big_reps)
        if where == "local":
            shutil.rmtree(root, ignore_errors=True)
    if args.reshard_reps:
        out["reshard"] = reshard(args.out, args.reshard_reps)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(out, f, indent=1)
    return 0


def _reshard_rank(rank, world, root, raf, steps=8):
    """One rank of fsdp2 at fsdp.reshard_after_forward=raf: (all-gathers in one step, s per step)."""
    from torch.profiler import ProfilerActivity, profile
    j = job(root, f"reshard-{raf}", "fsdp2", arch="vit_tiny")
    j.fsdp.reshard_after_forward = raf
    t = _Trainer(j)
    t.step()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        t.step()
    gathers = sum(1 for e in p.events() if e.name.startswith("FSDP::all_gather ("))
    return gathers, _timed(lambda: [t.step() for _ in range(steps)])[0] / steps


def reshard(root, reps) -> dict:
    """Section 5: the student's all-gathers per step, and the step time, with and without resharding."""
    rows = {True: [], False: []}
    for _ in range(reps):
        for raf in (True, False):
            rows[raf].append(_spawn(_reshard_rank, 2, root, raf))
    out = {str(raf).lower(): {"gathers_per_step": r[0][0], "step_s": statistics.median(x[1] for x in r)}
           for raf, r in rows.items()}
    ratio = out["true"]["step_s"] / out["false"]["step_s"]
    for raf, r in out.items():
        print(f"[reshard] reshard_after_forward {raf:5s}: {r['gathers_per_step']:3d} all-gathers/step  "
              f"step {r['step_s'] * 1e3:7.1f} ms", flush=True)
    print(f"[reshard] false is {ratio:.2f}x the speed of true (vit_tiny, 2 gloo ranks, {reps} interleaved runs)")
    return {**out, "speedup": ratio}


def small(args) -> dict:
    """Sections 1-3: Ray runs of tiny models."""
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
    ray.shutdown()
    return out


if __name__ == "__main__":
    raise SystemExit(main())
