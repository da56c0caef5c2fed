"""Training phases on Ray Train V2: the driver (`run_phase`) and the worker loop (`worker_loop`).

Run one phase of a job (normally `dinoray run JOB` calls this through the controller):

    .venv/bin/python -c "from orchestrator import config, train; \\
        print(train.run_phase(config.load_job('jobs/smoke_cpu.yaml'), 'pretrain'))"

Each phase (and each distillation student) is its own Ray Train run named f"{job}-{runkey}"; its
files live in f"{storage}/{job}/{runkey}/": checkpoints/, metrics.jsonl, final/. Re-running resumes
from the last committed checkpoint; a phase whose final/DONE exists returns at once.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import backends, checkpoint, config
from .storage import atomic_write_bytes, fs_for, join, protocol_of

PART_KEYS = ("dino_global", "dino_local", "ibot", "koleo", "gram")


def run_key(phase: config.PhaseSpec, student_arch: str | None = None) -> str:
    return f"{phase.name}-{student_arch}" if student_arch else phase.name


def run_url(job: config.JobSpec, phase_name: str, student_arch: str | None = None) -> str:
    return join(job.storage, job.name, run_key(job.phase(phase_name), student_arch))


# =============================================================================== driver
def run_phase(job: config.JobSpec, phase_name: str, *, student_arch: str | None = None) -> dict:
    """Train one phase (or one distillation student) to completion; resumable; returns
    dict(step, steps, checkpoint, backbone, metrics, seconds)."""
    phase = job.phase(phase_name)
    if phase.kind not in config.TRAINING_KINDS:
        raise config.ConfigError(f"{job.source}: phase '{phase_name}' is a {phase.kind} phase, not training")
    if phase.kind == "distill" and student_arch not in phase.students:
        raise config.ConfigError(f"{job.source}: phase '{phase_name}': student_arch={student_arch!r} is not "
                                 f"one of its students {phase.students}")
    url, so = run_url(job, phase_name, student_arch), job.storage_options
    done = checkpoint.final_info(url, so)
    if done:
        return done
    fs, failed = fs_for(join(url, "FAILED"), so)
    if fs.exists(failed):
        fs.rm(failed)  # a new attempt: forget the last one's deterministic failure
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    res = {"CPU": job.cpus_per_worker, **({"GPU": 1} if job.use_gpu else {})}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"job": job, "phase": phase_name, "student_arch": student_arch},
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu, resources_per_worker=res),
        run_config=RunConfig(name=f"{job.name}-{run_key(phase, student_arch)}",
                             failure_config=FailureConfig(max_failures=job.failure.max_failures),
                             **_ray_storage(job)),
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
    )
    try:
        trainer.fit()
    except Exception as exc:
        msg = fs.cat_file(failed).decode() if fs.exists(failed) else f"{type(exc).__name__}: {exc}"
        raise RuntimeError(f"phase '{phase_name}' ({url}) failed: {msg}") from exc
    done = checkpoint.final_info(url, so)
    if not done:
        raise RuntimeError(f"phase '{phase_name}': training ended but {url}/final/DONE is missing")
    return done


def _ray_storage(job: config.JobSpec) -> dict:
    """Ray Train's own run state next to ours: {storage}/{job}/ray (any fsspec URL, via pyarrow)."""
    url = join(job.storage, job.name, "ray")
    if protocol_of(url) == "file":
        path = fs_for(url)[1]
        os.makedirs(path, exist_ok=True)
        return {"storage_path": os.path.abspath(path)}
    import pyarrow.fs as pafs
    fs, path = fs_for(url, job.storage_options)
    return {"storage_path": path, "storage_filesystem": pafs.PyFileSystem(pafs.FSSpecHandler(fs))}


# =============================================================================== model setup
def _interp_pos_embed(pe: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[1, 1+M*M, D] -> [1, n_tokens, D] (bicubic on the patch grid; CLS kept)."""
    if pe.shape[1] == n_tokens:
        return pe
    m, g = int(math.isqrt(pe.shape[1] - 1)), int(math.isqrt(n_tokens - 1))
    grid = pe[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
    return torch.cat([pe[:, :1].float(), grid.permute(0, 2, 3, 1).reshape(1, g * g, -1)], 1).to(pe.dtype)


def _fit_pos_embeds(state: dict, target: dict) -> dict:
    return {k: _interp_pos_embed(v, target[k].shape[1]) if k.endswith("pos_embed") and k in target else v
            for k, v in state.items()}


def _model_cfg(r: config.ResolvedPhase, arch: str | None, defaults: dict) -> dict:
    cfg = {k: v for k, v in config.model_cfg(r, arch).items() if k in defaults}
    cfg["n_global_crops"] = r.crops.n_global
    return cfg


def build_meta(job: config.JobSpec, r: config.ResolvedPhase, student_arch: str | None) -> torch.nn.Module:
    """The phase's meta-architecture on CPU, identical on every rank (seeded), initialised from the
    previous phase where the phase kind says so."""
    from model import DistillMetaArch, SSLMetaArch
    from model.distill import DISTILL_DEFAULT_CFG
    from model.ssl import DEFAULT_CFG
    phase, so = r.phase, job.storage_options
    torch.manual_seed(job.seed)
    if phase.kind == "distill":
        src = config.resolve(job, phase.from_phase)
        cfg = _model_cfg(r, student_arch, DISTILL_DEFAULT_CFG)
        cfg.update(teacher_arch=src.model.arch, teacher_ffn_layer=src.model.ffn_layer,
                   teacher_num_register_tokens=src.model.num_register_tokens)
        full = checkpoint.load_consolidated(join(job.storage, job.name, phase.from_phase, "final", "model.pth"), so)
        teacher = {k[len("teacher."):]: v for k, v in full.items() if k.startswith("teacher.")}
        probe = DistillMetaArch(cfg, None, device="meta").teacher.state_dict()
        meta = DistillMetaArch(cfg, _fit_pos_embeds(teacher, probe))
    else:
        meta = SSLMetaArch(_model_cfg(r, None, DEFAULT_CFG))
        if phase.kind == "highres":
            full = checkpoint.load_consolidated(join(job.storage, job.name, phase.from_phase, "final", "model.pth"), so)
            meta.load_state_dict(_fit_pos_embeds(full, meta.state_dict()), strict=True)
    return meta.train()


def make_loader(job, r: config.ResolvedPhase, rank: int, world: int, state):
    c = r.crops
    crops = dict(global_size=c.global_size, local_size=c.local_size, n_global=c.n_global,
                 n_local=c.n_local, global_scale=c.global_scale, local_scale=c.local_scale)
    kw = dict(batch_size=r.optim.batch_size // world, rank=rank, world_size=world, seed=job.seed,
              crops=crops, patch_size=r.model.patch_size, state=state)
    if job.data.train.startswith("synthetic://"):
        return SyntheticLoader(int(job.data.train.split("://")[1] or 64), mask=r.model, **kw)
    from .loader import MultiCropLoader
    mask = dict(mask_ratio_min_max=tuple(r.model.mask_ratio_min_max), mask_probability=r.model.mask_probability)
    return MultiCropLoader(job.data.train, mask=mask, num_workers=job.data.num_workers,
                           storage_options=job.storage_options, error_budget=job.data.error_budget,
                           with_keys=job.debug.trace_samples, **kw)


def train_flops_per_image(r: config.ResolvedPhase, arch: str) -> float:
    """Backbone FLOPs per image per step: student fwd+bwd on all crops, teacher fwd on the globals."""
    from model import flops_per_image
    m, c = r.model, r.crops
    kw = dict(patch_size=m.patch_size, num_register_tokens=m.num_register_tokens)
    g, loc = flops_per_image(arch, c.global_size, **kw), flops_per_image(arch, c.local_size, **kw)
    return 3 * (c.n_global * g + c.n_local * loc) + c.n_global * g


# =============================================================================== worker loop
def worker_loop(cfg: dict) -> None:
    """One Ray Train worker: build, resume, then zero_grad -> loss -> backward -> clip -> step -> EMA."""
    import ray.train
    from model import schedules
    job, phase_name, student_arch = cfg["job"], cfg["phase"], cfg["student_arch"]
    rank, world = dist.get_rank(), dist.get_world_size()
    r = config.resolve(job, phase_name)
    phase, so, o = r.phase, job.storage_options, r.optim
    url = run_url(job, phase_name, student_arch)
    if checkpoint._exists(join(url, "FAILED"), so):  # deterministic failure: do not retry
        raise RuntimeError(fs_for(join(url, "FAILED"), so)[0].cat_file(fs_for(join(url, "FAILED"), so)[1]).decode())
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    torch.set_num_threads(max(1, job.cpus_per_worker))
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
    metrics, local_jsonl = _metrics(job, url, phase_name, rank)
    trace = _trace_file(job, url, rank)
    flops = train_flops_per_image(r, student_arch or r.model.arch)
    arch_flops_devices = world
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
            if st["rollbacks"] > job.failure.max_rollbacks or checkpoint.latest(url, so) is None:
                _fail(job, url, rank, step, per_rank, parts, st["rollbacks"])
            ck.wait()
            back = ck.load(checkpoint.latest(url, so)[1])
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
        if ck.poll() is not None:
            rec["ckpt_save_s"] = ck.last_async_s
            rec["last_ckpt_unixtime"] = time.time()
            _flush_metrics(local_jsonl, url, so, rank)
        rec["images_per_s"] = o.batch_size / max(rec["step_s"], 1e-9)
        if metrics is not None:
            rec["mfu"] = flops * rec["images_per_s"] / (arch_flops_devices * job.metrics.peak_flops)
            metrics.record(step, rec)

    ck.wait()
    final = checkpoint.latest(url, so)
    prefix = "student_ema.backbone." if phase.kind == "distill" else "teacher.backbone."
    info = {"step": step, "steps": phase.steps, "checkpoint": final[1] if final else None,
            "backbone": join(url, "final", "backbone.pth"), "model": join(url, "final", "model.pth"),
            "metrics": last_parts, "seconds": time.perf_counter() - t_start}
    _flush_metrics(local_jsonl, url, so, rank)
    checkpoint.export_final(backend, join(url, "final"), prefix, so, info)
    if metrics is not None:
        metrics.close()
    ray.train.report({"step": step, **last_parts})


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
           f"committed checkpoint to roll back to); non-finite on ranks {bad or 'none (gradients)'}; "
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


def _trace_file(job, url, rank):
    if not job.debug.trace_samples or protocol_of(url) != "file":
        return None
    path = os.path.join(fs_for(url)[1], "trace", f"rank{rank}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def _trace(path, step, data_pos, batch) -> None:
    """Fingerprint of every image of the batch (crop 0 + its labels): equal runs read equal data."""
    g = batch["global_crops"]
    n = g.shape[0] // 2
    ids = [hashlib.sha1(g[i].cpu().numpy().tobytes()).hexdigest()[:12] for i in range(n)]
    ids = [f"{k}:{h}" for k, h in zip(batch["keys"], ids)] if "keys" in batch else ids
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "pos": data_pos, "ids": ids,
                            "labels": batch["labels"].tolist() if "labels" in batch else None}) + "\n")


def _metrics(job, url, phase_name, rank):
    if rank != 0:
        return None, None
    from .metrics import StepMetrics
    if protocol_of(url) == "file":
        path = os.path.join(fs_for(url)[1], "metrics.jsonl")
    else:
        path = os.path.join(tempfile.mkdtemp(prefix="dinoray-metrics-"), "metrics.jsonl")
        fs, rpath = fs_for(join(url, "metrics.jsonl"), job.storage_options)
        if fs.exists(rpath):
            fs.get(rpath, path)
    m = StepMetrics(job.name, url.rstrip("/").rsplit("/", 1)[-1], path,
                    checkpoint_every_steps=job.checkpoint.every_steps)
    return m, path


def _flush_metrics(local_jsonl, url, so, rank) -> None:
    """Remote storage: upload rank 0's metrics.jsonl (local storage writes it in place)."""
    if rank == 0 and local_jsonl and protocol_of(url) != "file" and os.path.exists(local_jsonl):
        from .storage import atomic_put_file
        atomic_put_file(local_jsonl, join(url, "metrics.jsonl"), so)


__all__ = ["run_phase", "worker_loop", "build_meta", "make_loader", "run_key", "run_url"]


class SyntheticLoader:
    """Random uint8 images, deterministic in (seed, epoch, image index), with the loader protocol:
    `len()`, iteration, `state_dict()` / `state=` for exact resume, `.skipped`. Selected with
    data.train: "synthetic://N" (N images per epoch). For benchmarks and backend tests only."""

    def __init__(self, n_images: int, *, batch_size, rank, world_size, seed, crops, patch_size, mask, state=None):
        self.n, self.B, self.rank, self.world, self.seed = n_images, batch_size, rank, world_size, seed
        self.crops, self.p, self.mask = crops, patch_size, mask
        self.epoch, self.pos = (state["epoch"], state["pos"]) if state else (0, 0)
        self.skipped = 0
        if len(self) < 1:
            raise ValueError(f"synthetic://{n_images}: fewer images than one global batch ({batch_size * world_size})")

    def __len__(self) -> int:
        return self.n // (self.B * self.world)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def __iter__(self):
        from model.masking import collate_masks
        c = self.crops
        while self.pos < len(self):
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
            ids = order[self.rank::self.world][self.pos * self.B:(self.pos + 1) * self.B].tolist()
            gens = [torch.Generator().manual_seed(self.seed * 1_000_003 + i) for i in ids]
            glob = [torch.randint(0, 256, (c["n_global"], 3, c["global_size"], c["global_size"]), generator=g,
                                  dtype=torch.uint8) for g in gens]
            loc = [torch.randint(0, 256, (c["n_local"], 3, c["local_size"], c["local_size"]), generator=g,
                                 dtype=torch.uint8) for g in gens]
            mg = torch.Generator().manual_seed(self.seed * 31 + self.epoch * 100_003 + self.pos * 17 + self.rank)
            batch = {"global_crops": torch.stack(glob, 1).flatten(0, 1),
                     "local_crops": torch.stack(loc, 1).flatten(0, 1),
                     "labels": torch.tensor(ids, dtype=torch.long),
                     **collate_masks(c["n_global"] * self.B, c["global_size"] // self.p, mg,
                                     tuple(self.mask.mask_ratio_min_max), self.mask.mask_probability)}
            self.pos += 1
            yield batch
        self.epoch, self.pos = self.epoch + 1, 0
