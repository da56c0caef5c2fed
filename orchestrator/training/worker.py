"""The Ray Train worker loop of a training phase (started by orchestrator.training.driver.run_phase).

    worker_loop -> start (build, resume) -> per step: train_step, then roll_back or checkpoint_and_log
                -> finish (final checkpoint, consolidated export, DONE)

One step, top to bottom: schedules -> zero_grad -> per micro-batch: SSL loss -> (all ranks finite?)
backward -> clip + optimiser step -> EMA teacher; then a checkpoint when due, step metrics (rank 0: the
phase's; every rank: its step time, data wait and throughput), and a look for a drained node.
The global batch `optim.batch_size` is fixed: at W workers each takes A = JobSpec.accumulation(batch, W)
micro-batches per step, one from each of its A loader streams (W x A streams of batch / (W x A) images,
so the images of a step do not depend on W). Parallelism, precision and compile live in backends.py,
checkpoints in checkpoint.py, the model and loader in setup.py, Ray checkpoints, preemption and restart
accounting in elastic.py. The phase arrives resolved (config.ResolvedPhase) with its hash and PhaseDir.

Run it through the driver: `.venv/bin/python -m pytest tests/test_train.py -q` (or `dinoray run JOB`).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time

import torch
import torch.distributed as dist

from model import LOSS_PARTS, schedules
from orchestrator.layout import PhaseDir
from orchestrator.pipeline import config
from orchestrator.training import backends, checkpoint, elastic, records
from orchestrator.training.setup import (build_meta, make_loader, prepare_cpu_process, step_schedules,
                                         train_flops_per_image)


@dataclasses.dataclass
class LoopState:
    """The loop's position: a checkpoint's extras carry exactly these keys (plus config_hash)."""
    step: int = 0                 # optimiser steps done
    loader: list | dict | None = None  # each loader stream's state after the last batch read (exact resume)
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
    accum: int = 1                # micro-batches per step at this world size
    loaders: list = dataclasses.field(default_factory=list)  # one per micro-batch stream of this rank
    metrics: object = None        # StepMetrics (every rank)
    interval: object = None       # elastic.Interval: when to checkpoint
    in_ray: bool = False          # under Ray Train (else a plain process group: tests)
    preempted: bool = False       # a drain was answered with a just-in-time checkpoint
    resumed_from: str | None = None  # "ray" (ray.train.get_checkpoint()) or "storage"; None: from scratch
    files: dict = dataclasses.field(default_factory=dict)  # JSON-lines files: {path under the phase: local path}
    live: object = None           # records.LiveTail: rank 0 on object storage (metrics.jsonl's tail for status)
    flops: float = 0.0
    consecutive: int = 0          # non-finite steps in a row
    fenced_s: float = 0.0         # checkpoints.fence_s already counted in ckpt_stall_s

    @property
    def steps(self) -> int:
        return self.resolved.phase.steps


@dataclasses.dataclass
class StepResult:
    values: dict                  # the schedules' values at this step (lr, wd, momentum, teacher_temp, ...)
    per_rank: torch.Tensor        # [world, 1 + len(LOSS_PARTS)]: loss and parts of every rank (micro-batch mean)
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
        micros = next(batches)
        t_data = time.perf_counter() - t0
        data_pos = worker.state.batches_seen
        worker.state.batches_seen += 1
        _debug_hooks(worker, data_pos, micros[0])
        if worker.job.debug.trace_samples:
            for i, micro in enumerate(micros):
                records.trace(worker.files[PhaseDir.trace_rel(worker.rank)], worker.state.step, data_pos, micro,
                              stream=worker.rank * worker.accum + i)
        result = train_step(worker, micros)
        losses = result.losses()
        if worker.consecutive >= worker.job.failure.nonfinite_max_consecutive:
            roll_back(worker, result)
            continue
        checkpoint_and_log(worker, result, losses, t0, t_data)
        if worker.in_ray and not worker.preempted:
            answer_preemption(worker)
    finish(worker, losses, time.perf_counter() - t_start)


# ------------------------------------------------------------------------------------------ start
def start(cfg: dict) -> Worker:
    """Build the model, backend, schedules and loader streams; count the start; resume from the last
    committed checkpoint (Ray's, see elastic.resume_point)."""
    import ray.train
    resolved, phase_dir = cfg["resolved"], cfg["phase_dir"]
    job, optim = resolved.job, resolved.optim
    rank, world = dist.get_rank(), dist.get_world_size()
    if phase_dir.failed.exists():  # a deterministic failure of an earlier attempt: Ray's restart must not redo it
        raise RuntimeError(phase_dir.failed.read_bytes().decode())
    accum = job.accumulation(optim.batch_size, world)
    if accum is None:
        raise config.ConfigError(f"{job.source}: optim.batch_size {optim.batch_size} cannot be split over {world} "
                                 f"workers; `dinoray validate` lists the worker counts that can")
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    torch.set_num_threads(max(1, job.cpus_per_worker))
    host = {}
    if not job.use_gpu:  # bitwise-reproducible resume on CPU; GPUs keep their fast kernels
        torch.use_deterministic_algorithms(True, warn_only=True)
        host = prepare_cpu_process()  # glibc keeps freed memory; subnormals flushed (before any parallel op)
    meta = build_meta(job, resolved, cfg["student_arch"], teacher=cfg["teacher"])
    backend = backends.build(meta, job, device, optim, accum)
    sched = step_schedules(optim, resolved.phase.steps)
    in_ray = elastic.in_ray_train()
    saver = checkpoint.Checkpointer(backend, phase_dir, keep_last=job.checkpoint.keep_last,
                                    async_save=job.checkpoint.async_save,
                                    on_commit=(lambda step: elastic.register(step, rank)) if in_ray else None)
    worker = Worker(job, resolved, phase_dir, cfg["config_hash"], rank, world, device, backend, saver, sched,
                    LoopState(), accum=accum, in_ray=in_ray)
    worker.interval = elastic.Interval(job.checkpoint.every_steps, resolved.phase.steps, job.failure.mtbf_hours,
                                       log=print)
    torch.manual_seed(job.seed * 1000 + rank + 1)  # per-rank stream (drop path)
    extras = _resume(worker)
    restart = elastic.count_start(phase_dir, world, worker.state.step, worker.resumed_from) if rank == 0 else None
    worker.loaders = _loaders(worker)
    records.open_files(worker)
    _start_metrics(worker, restart, extras)
    worker.flops = train_flops_per_image(resolved, cfg["student_arch"] or resolved.model.arch)
    print(f"{phase_dir.key}: rank {rank} of {world}, {accum} micro-batch(es) of "
          f"{optim.batch_size // (world * accum)} images per step, from step {worker.state.step}"
          + (f"; CPU process {host}" if host else ""))
    return worker


def _resume(worker: Worker) -> dict | None:
    """Load the checkpoint to resume from (None: there is none); returns its extras."""
    latest = checkpoint.latest(worker.phase_dir)
    found = elastic.resume_point(worker.phase_dir, latest) if worker.in_ray else latest and (*latest, "storage")
    if not found:
        return None
    worker.resumed_from = found[2]
    extras = worker.checkpoints.load(found[1])
    if extras["config_hash"] != worker.config_hash:
        raise RuntimeError(f"{found[1].url} was written by a different configuration of phase "
                           f"'{worker.resolved.phase.name}' (hash {extras['config_hash']} != {worker.config_hash}); "
                           f"restore the job file or use a new job name")
    worker.state = LoopState(**{f.name: extras[f.name] for f in dataclasses.fields(LoopState)})
    worker.interval.last = worker.state.step
    if not extras["resharded"]:
        checkpoint.set_rng_state(extras["rng"])
    return extras


def _loaders(worker: Worker) -> list:
    """This rank's loader streams rank*A .. rank*A + A-1 of W*A. A saved position is global (the
    step's batch index), so a stream the checkpoint did not have starts from stream 0's state."""
    saved = worker.state.loader
    saved = [saved] if isinstance(saved, dict) else (saved or [None])
    nw = worker.job.data.num_workers
    data_workers = max(1, nw // worker.accum) if nw else 0  # the rank's CPU budget, shared by its streams
    streams = worker.world * worker.accum
    return [make_loader(worker.job, worker.resolved, worker.rank * worker.accum + i, streams,
                        saved[i] if i < len(saved) else saved[0], data_workers) for i in range(worker.accum)]


def _start_metrics(worker: Worker, restart: tuple | None, extras: dict | None) -> None:
    """Every rank's StepMetrics (rank 0 writes metrics.jsonl); rank 0 carries goodput and restarts on."""
    from orchestrator.metrics import StepMetrics
    worker.metrics = StepMetrics(worker.job.name, worker.phase_dir.key, worker.files.get(PhaseDir.metrics_rel),
                                 rank=worker.rank)
    if restart is None:
        return
    reason, before = restart
    saved = {**((extras or {}).get("metrics") or {}), **before}
    if reason is None:
        worker.metrics.phase_start_unixtime = before["phase_start_unixtime"]
    else:
        worker.metrics.resume(saved, reason)
        print(f"restart #{sum(before['restarts'].values()) + 1} of {worker.phase_dir.key} ({reason})")


def _batches(worker: Worker):
    """Endless steps' worth of micro-batches (one per stream) on the device, epoch after epoch;
    records the streams' positions after each."""
    def forever(loader):
        while True:
            yield from loader
    streams = [forever(loader) for loader in worker.loaders]
    while True:
        micros = [{k: v.to(worker.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(s).items()}
                  for s in streams]
        worker.state.loader = [loader.state_dict() for loader in worker.loaders]
        yield micros


# ------------------------------------------------------------------------------------------- step
def train_step(worker: Worker, micros: list[dict]) -> StepResult:
    """schedules -> zero_grad -> per micro-batch: loss, all ranks finite? backward -> clip + step -> EMA.
    A non-finite micro-batch on any rank ends the step's forwards on every rank and skips the step."""
    values = schedules.apply_schedules(worker.backend.optimizer, worker.sched, worker.state.step)
    worker.backend.zero_grad()
    rows, parts_seen, finite = [], set(), True
    for micro in micros:
        loss, parts = worker.backend.forward(micro, teacher_temp=values["teacher_temp"])
        rows.append(_gather_parts(loss, parts, worker.world))
        parts_seen |= set(parts)
        finite = bool(torch.isfinite(rows[-1][:, 0]).all())
        if not finite:
            break
        worker.backend.backward(loss)
    grad_norm, applied = float("nan"), False
    if finite:
        grad_norm, applied = worker.backend.step(worker.resolved.optim.clip_grad)
    else:
        worker.backend.zero_grad()
    if applied:
        worker.backend.ema_(values["momentum"])
        worker.consecutive = 0
    else:
        worker.state.nonfinite_total += 1
        worker.consecutive += 1
    worker.state.step += 1
    return StepResult(values, torch.stack(rows).mean(0), parts_seen, grad_norm)


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
    """Save when due (`checkpoint.every_steps`, or auto, and at the end), commit finished async saves,
    record the step's metrics, and upload the JSON-lines files with each commit."""
    step, state = worker.state.step, worker.state
    rec = {"step_s": time.perf_counter() - t0, "data_wait_s": t_data, "grad_norm": result.grad_norm,
           "nonfinite_steps_total": state.nonfinite_total, "rollbacks_total": state.rollbacks,
           "samples_skipped_total": float(sum(getattr(x, "skipped", 0) for x in worker.loaders)), **losses,
           **{k: result.values[k] for k in ("lr", "wd", "momentum", "teacher_temp")}}
    stall, fenced = None, worker.checkpoints.fence_s - worker.fenced_s  # this step's wait for an async copy
    worker.fenced_s += fenced
    if fenced > 0:
        rec["ckpt_stall_s"] = fenced
    if worker.interval.due(step):
        timing = worker.checkpoints.save(step, _extras(worker))
        rec["ckpt_stall_s"] = stall = timing["stall_s"] + fenced
        if timing["save_s"] is not None:
            rec["ckpt_save_s"] = timing["save_s"]
    committed = worker.checkpoints.poll() is not None or rec.get("ckpt_save_s") is not None
    if committed:
        rec["ckpt_save_s"] = rec.get("ckpt_save_s") or worker.checkpoints.last_async_s
        rec["last_ckpt_unixtime"] = time.time()
    worker.interval.observe(step, rec["step_s"], stall, agree=lambda *xs: _largest_over_ranks(worker, xs))
    if worker.interval.seconds():
        rec["ckpt_interval_s"] = worker.interval.seconds()
    rec["images_per_s"] = worker.resolved.optim.batch_size / worker.world / max(rec["step_s"], 1e-9)  # this rank's
    rec["mfu"] = worker.flops * rec["images_per_s"] / worker.job.metrics.peak_flops
    worker.metrics.record(step, rec)
    if committed:
        records.upload(worker)
    if worker.live is not None:
        worker.live.maybe_upload()


def _largest_over_ranks(worker: Worker, values) -> list[float]:
    """Each value's maximum over the ranks (a collective: every rank calls it at the same step)."""
    if worker.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=worker.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _extras(worker: Worker) -> dict:
    """What a checkpoint keeps besides the weights: the loop state, config hash, goodput state."""
    return {**dataclasses.asdict(worker.state), "config_hash": worker.config_hash,
            "metrics": worker.metrics.state() if worker.rank == 0 else None}


def answer_preemption(worker: Worker) -> None:
    """At a step boundary (every rank): if Ray is draining a node of this run for preemption, commit a
    just-in-time checkpoint now (unless this step has one), mark the phase PREEMPTED, and wait for the
    restart without taking steps that it would redo."""
    notice = elastic.preemption_notice()
    if notice is None:
        return
    worker.preempted = True
    step = worker.state.step
    print(f"node drain for preemption (ranks {notice['ranks']}): just-in-time checkpoint at step {step}")
    worker.checkpoints.wait()
    if worker.checkpoints.last_committed != step:
        worker.checkpoints.save(step, _extras(worker))
        worker.checkpoints.wait()
        worker.interval.last = step
    if worker.rank == 0:
        worker.phase_dir.preempted.write_json({"step": step, "deadline_s": notice["deadline_s"], "time": time.time()})
    records.upload(worker)
    elastic.pause_until_restart(notice["deadline_s"], worker.job.failure.preemption_grace_s, log=print)


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


# ----------------------------------------------------------------------------------------- finish
def finish(worker: Worker, losses: dict, seconds: float) -> None:
    """Wait for the last save, upload the JSON-lines files, export the consolidated model, write DONE."""
    import ray.train
    worker.checkpoints.wait()
    if worker.in_ray and worker.rank == 0:
        stray = elastic.sweep_unregistered(worker.phase_dir)
        if stray:
            print(f"removed checkpoint folders Ray Train did not hold: steps {stray}")
    final = checkpoint.latest(worker.phase_dir)
    prefix = "student_ema.backbone." if worker.resolved.phase.kind == "distill" else "teacher.backbone."
    info = {"step": worker.state.step, "steps": worker.steps, "checkpoint": final[1].url if final else None,
            "backbone": worker.phase_dir.final_backbone.url, "model": worker.phase_dir.final_model.url,
            "metrics": losses, "seconds": seconds}
    records.upload(worker)
    if worker.live is not None:
        worker.live.close()
    checkpoint.export_final(worker.backend, worker.phase_dir, prefix, info)
    worker.metrics.close()
    if worker.in_ray:
        ray.train.report({"step": worker.state.step, **losses})
