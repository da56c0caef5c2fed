"""The Ray Train worker loop of a training phase (started by orchestrator.training.driver.run_phase).

One step, top to bottom: schedules -> zero_grad -> SSL loss -> (all ranks finite?) backward ->
clip + optimiser step -> EMA teacher; then checkpoint every K steps and step metrics on rank 0.
Parallelism, precision and compile live in orchestrator/backends.py, checkpoints in checkpoint.py.

Run it through the driver: `.venv/bin/python -m pytest tests/test_train.py -q` (or `dinoray run JOB`).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import tempfile
import time

import torch
import torch.distributed as dist

from orchestrator.training import backends
from orchestrator.training import checkpoint
from orchestrator.pipeline import config
from orchestrator.storage import atomic_write_bytes, fs_for, join, protocol_of
from orchestrator.training.driver import run_url
from orchestrator.training.setup import build_meta, make_loader, train_flops_per_image

PART_KEYS = ("dino_global", "dino_local", "ibot", "koleo", "gram", "feature")


def worker_loop(cfg: dict) -> None:
    """One Ray Train worker: build, resume, then zero_grad -> loss -> backward -> clip -> step -> EMA."""
    import ray.train
    from model import schedules
    job, phase_name, student_arch = cfg["job"], cfg["phase"], cfg["student_arch"]
    rank, world = dist.get_rank(), dist.get_world_size()
    r = config.resolve(job, phase_name)
    phase, so, o = r.phase, job.storage_options, r.optim
    url = run_url(job, phase_name, student_arch)
    fs, failed = fs_for(join(url, "FAILED"), so)
    if fs.exists(failed):  # a deterministic failure of an earlier attempt: Ray's restart must not redo it
        raise RuntimeError(fs.cat_file(failed).decode())
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    torch.set_num_threads(max(1, job.cpus_per_worker))
    if not job.use_gpu:  # bitwise-reproducible resume on CPU; GPUs keep their fast kernels
        torch.use_deterministic_algorithms(True, warn_only=True)

    meta = build_meta(job, r, student_arch)
    backend = backends.build(meta, job, device, o)
    sched = schedules.build_schedules(
        phase.steps, base_lr=o.base_lr, batch_size=o.batch_size, warmup_iters=o.warmup_iters, min_lr=o.min_lr,
        wd=o.weight_decay, momentum=o.momentum_teacher, teacher_temp=o.teacher_temp,
        teacher_temp_warmup_iters=o.teacher_temp_warmup_iters, freeze_last_layer_iters=o.freeze_last_layer_iters)
    ck = checkpoint.Checkpointer(backend, url, storage_options=so, keep_last=job.checkpoint.keep_last,
                                 async_save=job.checkpoint.async_save)
    chash = config.phase_hash(job, phase)
    st = {"step": 0, "loader": None, "batches_seen": 0, "nonfinite_total": 0, "rollbacks": 0}
    torch.manual_seed(job.seed * 1000 + rank + 1)  # per-rank stream (drop path)
    found = checkpoint.latest(url, so)
    if found:
        extras = ck.load(found[1])
        if extras["config_hash"] != chash:
            raise RuntimeError(f"{found[1]} was written by a different configuration of phase '{phase_name}' "
                               f"(hash {extras['config_hash']} != {chash}); restore the job file or use a new job name")
        st.update({k: extras[k] for k in st})
        if not extras["resharded"]:
            checkpoint.set_rng_state(extras["rng"])
    loader = make_loader(job, r, rank, world, st["loader"])
    metrics, local_jsonl = _metrics(job, url, rank, st["step"])
    trace = _trace_file(job, url, rank, st["step"])
    files = {"metrics.jsonl": local_jsonl, f"trace/rank{rank}.jsonl": trace}
    flops = train_flops_per_image(r, student_arch or r.model.arch)
    consecutive, it, t_start = 0, iter(loader), time.perf_counter()
    step, last_parts = st["step"], {}
    while step < phase.steps:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:  # next epoch (the loader's state carries the epoch number)
            it = iter(loader)
            batch = next(it)
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        t_data = time.perf_counter() - t0
        st["loader"], data_pos = loader.state_dict(), st["batches_seen"]
        st["batches_seen"] += 1
        _debug_hooks(job, url, rank, step, data_pos, batch)
        if trace:
            _trace(trace, step, data_pos, batch)

        vals = schedules.apply_schedules(backend.optimizer, sched, step)
        backend.zero_grad()
        loss, parts = backend.forward(batch, teacher_temp=vals["teacher_temp"])
        per_rank = _gather_parts(loss, parts, world)      # [world, 1 + len(PART_KEYS)]
        finite = bool(torch.isfinite(per_rank[:, 0]).all())
        grad_norm, applied = float("nan"), False
        if finite:
            backend.backward(loss)
            grad_norm, applied = backend.step(o.clip_grad)
        if applied:
            backend.ema_(vals["momentum"])
            consecutive = 0
        else:
            st["nonfinite_total"] += 1
            consecutive += 1
        step += 1
        last_parts = {"loss": float(per_rank[:, 0].mean())}
        last_parts.update({f"loss_{k}": float(per_rank[:, i + 1].mean()) for i, k in enumerate(PART_KEYS)
                           if k in parts})

        if consecutive >= job.failure.nonfinite_max_consecutive:
            st["rollbacks"] += 1
            ck.wait()
            last = checkpoint.latest(url, so)
            if st["rollbacks"] > job.failure.max_rollbacks or last is None:
                _fail(job, url, rank, step, per_rank, parts, st["rollbacks"])
            back = ck.load(last[1])
            step, consecutive = back["step"], 0   # the data position moves on: no batch is re-read
            continue

        rec = {"step_s": time.perf_counter() - t0, "data_wait_s": t_data, "grad_norm": grad_norm,
               "nonfinite_steps_total": st["nonfinite_total"], "rollbacks_total": st["rollbacks"],
               "samples_skipped_total": float(getattr(loader, "skipped", 0)), **last_parts,
               **{k: vals[k] for k in ("lr", "wd", "momentum", "teacher_temp")}}
        if step % job.checkpoint.every_steps == 0 or step == phase.steps:
            extras = {**st, "config_hash": chash}
            timing = ck.save(step, extras)
            rec["ckpt_stall_s"] = timing["stall_s"]
            if timing["save_s"] is not None:
                rec["ckpt_save_s"] = timing["save_s"]
        committed = ck.poll() is not None or rec.get("ckpt_save_s") is not None
        if committed:
            rec["ckpt_save_s"] = rec.get("ckpt_save_s") or ck.last_async_s
            rec["last_ckpt_unixtime"] = time.time()
        rec["images_per_s"] = o.batch_size / max(rec["step_s"], 1e-9)
        if metrics is not None:
            rec["mfu"] = flops * rec["images_per_s"] / (world * job.metrics.peak_flops)
            metrics.record(step, rec)
        if committed:
            _upload(url, files, so)

    ck.wait()
    final = checkpoint.latest(url, so)
    prefix = "student_ema.backbone." if phase.kind == "distill" else "teacher.backbone."
    info = {"step": step, "steps": phase.steps, "checkpoint": final[1] if final else None,
            "backbone": join(url, "final", "backbone.pth"), "model": join(url, "final", "model.pth"),
            "metrics": last_parts, "seconds": time.perf_counter() - t_start}
    _upload(url, files, so)
    checkpoint.export_final(backend, join(url, "final"), prefix, so, info)
    if metrics is not None:
        metrics.close()
    if _in_ray_train():
        ray.train.report({"step": step, **last_parts})


def _in_ray_train() -> bool:
    """False when worker_loop runs in a plain torch process group (tests of single phases)."""
    import ray.train
    try:
        ray.train.get_context()
        return True
    except RuntimeError:
        return False


def _gather_parts(loss, parts, world) -> torch.Tensor:
    v = torch.tensor([float(loss.detach())] + [float(parts[k]) if k in parts else 0.0 for k in PART_KEYS])
    if world == 1:
        return v[None]
    out = torch.empty(world * v.numel())
    dist.all_gather_into_tensor(out, v)
    return out.view(world, -1)


def _fail(job, url, rank, step, per_rank, parts, rollbacks) -> None:
    bad = [i for i in range(per_rank.shape[0]) if not torch.isfinite(per_rank[i]).all()]
    rows = "; ".join(f"rank {i}: loss={per_rank[i, 0]:.4g} " + " ".join(
        f"{k}={per_rank[i, j + 1]:.4g}" for j, k in enumerate(PART_KEYS) if k in parts) for i in range(per_rank.shape[0]))
    msg = (f"step {step}: {job.failure.nonfinite_max_consecutive} consecutive non-finite steps after "
           f"{rollbacks - 1} rollbacks (budget failure.max_rollbacks={job.failure.max_rollbacks}, or no "
           f"committed checkpoint to roll back to); non-finite on ranks {bad or 'none (gradients)'} "
           f"(global teacher centring spreads one rank's NaN to every rank's DINO/iBOT terms); "
           f"loss parts: {rows}. Lower the lr, check the data, or raise failure.max_rollbacks.")
    if rank == 0:
        atomic_write_bytes(join(url, "FAILED"), msg.encode(), job.storage_options)
    dist.barrier() if dist.is_initialized() else None
    raise FloatingPointError(msg)


def _debug_hooks(job, url, rank, step, data_pos, batch) -> None:
    d = job.debug
    if rank != 0:
        return
    if data_pos in d.nan_steps:  # poison this batch (by data position: after a rollback it is not re-read)
        batch["global_crops"] = torch.full_like(batch["global_crops"], float("nan"), dtype=torch.float32)
    if d.kill_at_step == step:
        marker = join(url, "debug", f"killed-at-{step}")
        if not checkpoint._exists(marker, job.storage_options):
            atomic_write_bytes(marker, b"", job.storage_options)
            os.kill(os.getpid(), signal.SIGKILL)
    if d.step_sleep_s:
        time.sleep(d.step_sleep_s)


def _local_copy(url: str, rel: str, so, keep_below: int) -> str:
    """Where this process appends the JSON-lines file `rel` of the run: in place for local storage
    (a resumed run appends, so redone steps show twice), else a local file seeded from the remote
    copy, minus records of steps >= keep_below (redone after the resume), uploaded by `_upload` at
    each commit and at the end."""
    if protocol_of(url) == "file":
        path = os.path.join(fs_for(url)[1], rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path
    path = os.path.join(tempfile.mkdtemp(prefix="dinoray-"), os.path.basename(rel))
    fs, rpath = fs_for(join(url, rel), so)
    if fs.exists(rpath):
        lines = fs.cat_file(rpath).decode().splitlines(keepends=True)
        with open(path, "w") as f:
            f.writelines(ln for ln in lines if ln.strip() and json.loads(ln)["step"] < keep_below)
    return path


def _upload(url: str, files: dict, so) -> None:
    if protocol_of(url) == "file":
        return
    from orchestrator.storage import atomic_put_file
    for rel, path in files.items():
        if path and os.path.exists(path):
            atomic_put_file(path, join(url, rel), so)


def _trace_file(job, url, rank, step):
    if not job.debug.trace_samples:
        return None
    return _local_copy(url, f"trace/rank{rank}.jsonl", job.storage_options, step)


def _trace(path, step, data_pos, batch) -> None:
    """Fingerprint of every image of the batch (crop 0 + its labels): equal runs read equal data."""
    g = batch["global_crops"]
    n = g.shape[0] // 2
    ids = [hashlib.sha1(g[i].cpu().numpy().tobytes()).hexdigest()[:12] for i in range(n)]
    ids = [f"{k}:{h}" for k, h in zip(batch["keys"], ids)] if "keys" in batch else ids
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "pos": data_pos, "ids": ids,
                            "labels": batch["labels"].tolist() if "labels" in batch else None}) + "\n")


def _metrics(job, url, rank, step):
    if rank != 0:
        return None, None
    from orchestrator.metrics import StepMetrics
    path = _local_copy(url, "metrics.jsonl", job.storage_options, step + 1)  # records are 1-based
    m = StepMetrics(job.name, url.rstrip("/").rsplit("/", 1)[-1], path,
                    checkpoint_every_steps=job.checkpoint.every_steps)
    return m, path


