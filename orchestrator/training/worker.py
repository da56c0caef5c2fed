"""The Ray Train worker loop of a training phase (started by orchestrator.training.driver.run_phase).

    worker_loop -> start (build, resume) -> per step: train_step, then roll_back or checkpoint_and_log
                -> finish (final checkpoint, consolidated export, DONE)

One step, top to bottom: schedules -> zero_grad -> SSL loss -> (all ranks finite?) backward ->
clip + optimiser step -> EMA teacher; then a checkpoint every K steps and step metrics on rank 0.
Parallelism, precision and compile live in backends.py, checkpoints in checkpoint.py, the model and
loader in setup.py. The phase arrives resolved (config.ResolvedPhase) with its hash and PhaseDir.

Run it through the driver: `.venv/bin/python -m pytest tests/test_train.py -q` (or `dinoray run JOB`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import time

import torch
import torch.distributed as dist

from model import LOSS_PARTS, schedules
from orchestrator.layout import PhaseDir
from orchestrator.pipeline import config
from orchestrator.training import backends, checkpoint
from orchestrator.training.setup import build_meta, make_loader, train_flops_per_image


@dataclasses.dataclass
class LoopState:
    """The loop's position: a checkpoint's extras carry exactly these keys (plus config_hash)."""
    step: int = 0                 # optimiser steps done
    loader: dict | None = None    # the loader's state after the last batch read (exact resume)
    batches_seen: int = 0         # data position: batches read, rolled-back ones included
    nonfinite_total: int = 0
    rollbacks: int = 0


@dataclasses.dataclass
class Worker:
    """What one worker holds for its phase."""
    job: config.JobSpec
    resolved: config.ResolvedPhase
    phase_dir: PhaseDir
    config_hash: str
    rank: int
    world: int
    device: torch.device
    backend: backends.Backend
    checkpoints: checkpoint.Checkpointer
    sched: dict
    state: LoopState
    loader: object = None
    metrics: object = None        # StepMetrics on rank 0, else None
    files: dict = dataclasses.field(default_factory=dict)  # JSON-lines files: {path under the phase: local path}
    flops: float = 0.0
    consecutive: int = 0          # non-finite steps in a row

    @property
    def steps(self) -> int:
        return self.resolved.phase.steps


@dataclasses.dataclass
class StepResult:
    values: dict                  # the schedules' values at this step (lr, wd, momentum, teacher_temp, ...)
    per_rank: torch.Tensor        # [world, 1 + len(LOSS_PARTS)]: loss and parts of every rank
    parts: set                    # the loss parts this model computes
    grad_norm: float

    def losses(self) -> dict:
        """Mean over ranks of the loss and of each part the model computes."""
        out = {"loss": float(self.per_rank[:, 0].mean())}
        out.update({f"loss_{k}": float(self.per_rank[:, i + 1].mean()) for i, k in enumerate(LOSS_PARTS)
                    if k in self.parts})
        return out


def worker_loop(cfg: dict) -> None:
    """One Ray Train worker. `cfg` (train_loop_config): resolved, config_hash, phase_dir,
    student_arch, teacher (see driver.run_phase). Its stdout and stderr go to the phase's worker log."""
    from orchestrator.pipeline import console
    with console.worker_output(cfg["phase_dir"].worker_log(dist.get_rank())):
        _train(cfg)


def _train(cfg: dict) -> None:
    worker = start(cfg)
    batches, t_start, losses = _batches(worker), time.perf_counter(), {}
    while worker.state.step < worker.steps:
        t0 = time.perf_counter()
        batch = next(batches)
        t_data = time.perf_counter() - t0
        data_pos = worker.state.batches_seen
        worker.state.batches_seen += 1
        _debug_hooks(worker, data_pos, batch)
        if worker.job.debug.trace_samples:
            _trace(worker.files[PhaseDir.trace_rel(worker.rank)], worker.state.step, data_pos, batch)
        result = train_step(worker, batch)
        losses = result.losses()
        if worker.consecutive >= worker.job.failure.nonfinite_max_consecutive:
            roll_back(worker, result)
            continue
        checkpoint_and_log(worker, result, losses, t0, t_data)
    finish(worker, losses, time.perf_counter() - t_start)


# ------------------------------------------------------------------------------------------ start
def start(cfg: dict) -> Worker:
    """Build the model, backend, schedules and loader; resume from the last committed checkpoint."""
    import ray.train
    resolved, phase_dir = cfg["resolved"], cfg["phase_dir"]
    job, optim = resolved.job, resolved.optim
    rank, world = dist.get_rank(), dist.get_world_size()
    if phase_dir.failed.exists():  # a deterministic failure of an earlier attempt: Ray's restart must not redo it
        raise RuntimeError(phase_dir.failed.read_bytes().decode())
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    torch.set_num_threads(max(1, job.cpus_per_worker))
    if not job.use_gpu:  # bitwise-reproducible resume on CPU; GPUs keep their fast kernels
        torch.use_deterministic_algorithms(True, warn_only=True)
    meta = build_meta(job, resolved, cfg["student_arch"], teacher=cfg["teacher"])
    backend = backends.build(meta, job, device, optim)
    sched = schedules.build_schedules(
        resolved.phase.steps, base_lr=optim.base_lr, batch_size=optim.batch_size,
        warmup_iters=optim.warmup_iters, min_lr=optim.min_lr, wd=optim.weight_decay,
        momentum=optim.momentum_teacher, teacher_temp=optim.teacher_temp,
        teacher_temp_warmup_iters=optim.teacher_temp_warmup_iters,
        freeze_last_layer_iters=optim.freeze_last_layer_iters)
    saver = checkpoint.Checkpointer(backend, phase_dir, keep_last=job.checkpoint.keep_last,
                                    async_save=job.checkpoint.async_save)
    worker = Worker(job, resolved, phase_dir, cfg["config_hash"], rank, world, device, backend, saver, sched,
                    LoopState())
    torch.manual_seed(job.seed * 1000 + rank + 1)  # per-rank stream (drop path)
    _resume(worker)
    worker.loader = make_loader(job, resolved, rank, world, worker.state.loader)
    if job.debug.trace_samples:
        worker.files[PhaseDir.trace_rel(rank)] = _local_copy(phase_dir, PhaseDir.trace_rel(rank), worker.state.step)
    if rank == 0:
        from orchestrator.metrics import StepMetrics
        path = _local_copy(phase_dir, PhaseDir.metrics_rel, worker.state.step + 1)  # records are 1-based
        worker.files[PhaseDir.metrics_rel] = path
        worker.metrics = StepMetrics(job.name, phase_dir.key, path, checkpoint_every_steps=job.checkpoint.every_steps)
    worker.flops = train_flops_per_image(resolved, cfg["student_arch"] or resolved.model.arch)
    return worker


def _resume(worker: Worker) -> None:
    found = checkpoint.latest(worker.phase_dir)
    if not found:
        return
    extras = worker.checkpoints.load(found[1])
    if extras["config_hash"] != worker.config_hash:
        raise RuntimeError(f"{found[1].url} was written by a different configuration of phase "
                           f"'{worker.resolved.phase.name}' (hash {extras['config_hash']} != {worker.config_hash}); "
                           f"restore the job file or use a new job name")
    worker.state = LoopState(**{f.name: extras[f.name] for f in dataclasses.fields(LoopState)})
    if not extras["resharded"]:
        checkpoint.set_rng_state(extras["rng"])


def _batches(worker: Worker):
    """Endless batches on the device, epoch after epoch; records the loader's position of each."""
    while True:
        for batch in worker.loader:
            batch = {k: v.to(worker.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            worker.state.loader = worker.loader.state_dict()
            yield batch


# ------------------------------------------------------------------------------------------- step
def train_step(worker: Worker, batch: dict) -> StepResult:
    """schedules -> zero_grad -> loss -> all ranks finite? -> backward -> clip + step -> EMA."""
    values = schedules.apply_schedules(worker.backend.optimizer, worker.sched, worker.state.step)
    worker.backend.zero_grad()
    loss, parts = worker.backend.forward(batch, teacher_temp=values["teacher_temp"])
    per_rank = _gather_parts(loss, parts, worker.world)
    grad_norm, applied = float("nan"), False
    if bool(torch.isfinite(per_rank[:, 0]).all()):
        worker.backend.backward(loss)
        grad_norm, applied = worker.backend.step(worker.resolved.optim.clip_grad)
    if applied:
        worker.backend.ema_(values["momentum"])
        worker.consecutive = 0
    else:
        worker.state.nonfinite_total += 1
        worker.consecutive += 1
    worker.state.step += 1
    return StepResult(values, per_rank, set(parts), grad_norm)


def roll_back(worker: Worker, result: StepResult) -> None:
    """Too many non-finite steps in a row: back to the last committed checkpoint's weights (the data
    position moves on: no batch is re-read), or fail when the rollback budget is spent."""
    worker.state.rollbacks += 1
    worker.checkpoints.wait()
    last = checkpoint.latest(worker.phase_dir)
    if worker.state.rollbacks > worker.job.failure.max_rollbacks or last is None:
        _fail(worker, result)
    worker.state.step = worker.checkpoints.load(last[1])["step"]
    worker.consecutive = 0


def _gather_parts(loss, parts, world) -> torch.Tensor:
    v = torch.tensor([float(loss.detach())] + [float(parts[k]) if k in parts else 0.0 for k in LOSS_PARTS])
    if world == 1:
        return v[None]
    out = torch.empty(world * v.numel())
    dist.all_gather_single(out, v)
    return out.view(world, -1)


def _fail(worker: Worker, result: StepResult) -> None:
    per_rank, failure = result.per_rank, worker.job.failure
    bad = [i for i in range(per_rank.shape[0]) if not torch.isfinite(per_rank[i]).all()]
    rows = "; ".join(f"rank {i}: loss={per_rank[i, 0]:.4g} " + " ".join(
        f"{k}={per_rank[i, j + 1]:.4g}" for j, k in enumerate(LOSS_PARTS) if k in result.parts)
        for i in range(per_rank.shape[0]))
    msg = (f"step {worker.state.step}: {failure.nonfinite_max_consecutive} consecutive non-finite steps after "
           f"{worker.state.rollbacks - 1} rollbacks (budget failure.max_rollbacks={failure.max_rollbacks}, or no "
           f"committed checkpoint to roll back to); non-finite on ranks {bad or 'none (gradients)'} "
           f"(global teacher centring spreads one rank's NaN to every rank's DINO/iBOT terms); "
           f"loss parts: {rows}. Lower the lr, check the data, or raise failure.max_rollbacks.")
    if worker.rank == 0:
        worker.phase_dir.failed.write_bytes(msg.encode())
    dist.barrier() if dist.is_initialized() else None
    raise FloatingPointError(msg)


# ----------------------------------------------------------------------------- checkpoint and log
def checkpoint_and_log(worker: Worker, result: StepResult, losses: dict, t0: float, t_data: float) -> None:
    """Save every `checkpoint.every_steps` (and at the end), commit finished async saves, record the
    step's metrics on rank 0, and upload the JSON-lines files with each commit."""
    step, state = worker.state.step, worker.state
    rec = {"step_s": time.perf_counter() - t0, "data_wait_s": t_data, "grad_norm": result.grad_norm,
           "nonfinite_steps_total": state.nonfinite_total, "rollbacks_total": state.rollbacks,
           "samples_skipped_total": float(getattr(worker.loader, "skipped", 0)), **losses,
           **{k: result.values[k] for k in ("lr", "wd", "momentum", "teacher_temp")}}
    if step % worker.job.checkpoint.every_steps == 0 or step == worker.steps:
        timing = worker.checkpoints.save(step, {**dataclasses.asdict(state), "config_hash": worker.config_hash})
        rec["ckpt_stall_s"] = timing["stall_s"]
        if timing["save_s"] is not None:
            rec["ckpt_save_s"] = timing["save_s"]
    committed = worker.checkpoints.poll() is not None or rec.get("ckpt_save_s") is not None
    if committed:
        rec["ckpt_save_s"] = rec.get("ckpt_save_s") or worker.checkpoints.last_async_s
        rec["last_ckpt_unixtime"] = time.time()
    rec["images_per_s"] = worker.resolved.optim.batch_size / max(rec["step_s"], 1e-9)
    if worker.metrics is not None:
        rec["mfu"] = worker.flops * rec["images_per_s"] / (worker.world * worker.job.metrics.peak_flops)
        worker.metrics.record(step, rec)
    if committed:
        _upload(worker)


def _local_copy(phase_dir: PhaseDir, rel: str, keep_below: int) -> str:
    """The local file this process appends the phase's JSON-lines file `rel` to: the file itself on
    local storage, else a copy uploaded by `_upload` at each commit and at the end. Either way,
    records of steps >= keep_below (to be redone after a resume) are dropped first, so that every
    step is recorded once."""
    folder, _ = phase_dir.root.staging_dir(prefix="dinoray-")
    path = os.path.join(folder, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    source = phase_dir.root / rel
    lines = source.read_bytes().decode().splitlines(keepends=True) if source.exists() else []
    with open(path + ".tmp", "w") as f:
        f.writelines(ln if ln.endswith("\n") else ln + "\n" for ln in lines if _step_of(ln) < keep_below)
    os.replace(path + ".tmp", path)
    return path


def _step_of(line: str) -> float:
    """The step of a JSON-lines record; infinite for a blank or torn line (a kill mid-append)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def _upload(worker: Worker) -> None:
    if worker.phase_dir.root.is_local:
        return
    for rel, path in worker.files.items():
        if os.path.exists(path):
            (worker.phase_dir.root / rel).put_file(path)


def _debug_hooks(worker: Worker, data_pos: int, batch: dict) -> None:
    debug, step = worker.job.debug, worker.state.step
    if worker.rank != 0:
        return
    if data_pos in debug.nan_steps:  # poison this batch (by data position: after a rollback it is not re-read)
        batch["global_crops"] = torch.full_like(batch["global_crops"], float("nan"), dtype=torch.float32)
    if debug.kill_at_step == step:
        marker = worker.phase_dir.debug_marker(f"killed-at-{step}")
        if not marker.exists():
            marker.write_bytes(b"")
            os.kill(os.getpid(), signal.SIGKILL)
    if debug.step_sleep_s:
        time.sleep(debug.step_sleep_s)


def _trace(path: str, step: int, data_pos: int, batch: dict) -> None:
    """Fingerprint of every image of the batch (crop 0 + its labels): equal runs read equal data."""
    g = batch["global_crops"]
    n = g.shape[0] // 2
    ids = [hashlib.sha1(g[i].cpu().numpy().tobytes()).hexdigest()[:12] for i in range(n)]
    ids = [f"{k}:{h}" for k, h in zip(batch["keys"], ids)] if "keys" in batch else ids
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "pos": data_pos, "ids": ids,
                            "labels": batch["labels"].tolist() if "labels" in batch else None}) + "\n")


# ----------------------------------------------------------------------------------------- finish
def finish(worker: Worker, losses: dict, seconds: float) -> None:
    """Wait for the last save, upload the JSON-lines files, export the consolidated model, write DONE."""
    import ray.train
    worker.checkpoints.wait()
    final = checkpoint.latest(worker.phase_dir)
    prefix = "student_ema.backbone." if worker.resolved.phase.kind == "distill" else "teacher.backbone."
    info = {"step": worker.state.step, "steps": worker.steps, "checkpoint": final[1].url if final else None,
            "backbone": worker.phase_dir.final_backbone.url, "model": worker.phase_dir.final_model.url,
            "metrics": losses, "seconds": seconds}
    _upload(worker)
    checkpoint.export_final(worker.backend, worker.phase_dir, prefix, info)
    if worker.metrics is not None:
        worker.metrics.close()
    if _in_ray_train():
        ray.train.report({"step": worker.state.step, **losses})


def _in_ray_train() -> bool:
    """False when worker_loop runs in a plain torch process group (tests of single phases)."""
    import ray.train
    try:
        ray.train.get_context()
        return True
    except RuntimeError:
        return False
