"""Training phases on Ray Train V2: the driver (`run_phase`), model setup and data (worker loop: worker.py).

Run one phase of a job (normally `dinoray run JOB` calls this through the controller):

    .venv/bin/python -c "from orchestrator import config, train; \\
        print(train.run_phase(config.load_job('jobs/smoke_cpu.yaml'), 'pretrain'))"

Each phase (and each distillation student) is its own Ray Train run named f"{job}-{runkey}"; its
files live in f"{storage}/{job}/{runkey}/": checkpoints/, metrics.jsonl, final/. Re-running resumes
from the last committed checkpoint; a phase whose final/DONE exists returns at once.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.nn.functional as F

from orchestrator.training import checkpoint
from orchestrator.pipeline import config
from orchestrator.storage import fs_for, join, protocol_of

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
    from orchestrator.training.worker import worker_loop
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
