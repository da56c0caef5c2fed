"""The driver of a training phase: `run_phase` runs one phase (or one distillation student) as a Ray
Train V2 run; the worker loop is orchestrator/training/worker.py.

Run one phase of a job (normally `dinoray run JOB` calls this through the controller):

    .venv/bin/python -c "from orchestrator.pipeline import config; from orchestrator.training import driver; \\
        print(driver.run_phase(config.load_job('jobs/smoke_cpu.yaml'), 'pretrain'))"

The phase is resolved here, once (`config.resolve`), and reaches every worker with its config hash
and its folder (`layout.PhaseDir`) through train_loop_config. Each phase (and each distillation
student) is its own Ray Train run whose folder is the phase folder (`RunLayout.ray_run`), so the workers'
committed checkpoints are Ray's (retention: `checkpoint.keep_last` as Ray's num_to_keep). Workers: a
fixed `num_workers`, or an elastic [min, max] range (Ray Train V2 starts with what is free, at least
min, and grows to max). Preemptions (drained nodes) draw on `failure.max_preemption_failures`, other
failures on `failure.max_failures`. Re-running resumes from the last committed checkpoint; a phase
whose final folder is complete (DONE) returns at once.
"""
from __future__ import annotations

import os

from orchestrator.layout import RunLayout, phase_key
from orchestrator.pipeline import config
from orchestrator.storage import Store
from orchestrator.training import checkpoint
from orchestrator.training.worker import worker_loop


def run_phase(job: config.JobSpec, phase_name: str, *, student_arch: str | None = None) -> dict:
    """Train one phase (or one distillation student) to completion; resumable; returns
    dict(step, steps, checkpoint, backbone, model, metrics, seconds)."""
    phase = job.phase(phase_name)
    if phase.kind not in config.TRAINING_KINDS:
        raise config.ConfigError(f"{job.source}: phase '{phase_name}' is a {phase.kind} phase, not training")
    if phase.kind == "distill" and student_arch not in phase.students:
        raise config.ConfigError(f"{job.source}: phase '{phase_name}': student_arch={student_arch!r} is not "
                                 f"one of its students {phase.students}")
    loop_config = worker_config(job, phase, student_arch)
    phase_dir, layout = loop_config["phase_dir"], RunLayout.of(job)
    done = checkpoint.final_info(phase_dir)
    if done:
        return done
    phase_dir.failed.rm()  # a new attempt: forget the last one's deterministic failure
    ray_store, ray_name = layout.ray_run(phase_dir.key)
    trainer = _trainer(job, loop_config, ray_name, ray_store)
    try:
        trainer.fit()
    except Exception as exc:
        failed = phase_dir.failed
        msg = failed.read_bytes().decode() if failed.exists() else f"{type(exc).__name__}: {exc}"
        raise RuntimeError(f"phase '{phase_name}' ({phase_dir.root.url}) failed: {msg}") from exc
    done = checkpoint.final_info(phase_dir)
    if not done:
        raise RuntimeError(f"phase '{phase_name}': training ended but {phase_dir.final_done.url} is missing")
    return done


def worker_config(job: config.JobSpec, phase: config.PhaseSpec, student_arch: str | None) -> dict:
    """What every worker of the phase gets (train_loop_config, pickled): the phase resolved once, its
    config hash, its folder, the student arch, and for distillation the resolved teacher phase."""
    return {"resolved": config.resolve(job, phase), "config_hash": config.phase_hash(job, phase),
            "phase_dir": RunLayout.of(job).phase(phase_key(phase, student_arch)), "student_arch": student_arch,
            "teacher": config.resolve(job, phase.from_phase) if phase.kind == "distill" else None}


def _trainer(job: config.JobSpec, loop_config: dict, name: str, ray_store: Store):
    """A TorchTrainer of `num_workers` workers (or an elastic range) running worker_loop(loop_config),
    on local Ray unless one is running (or RAY_ADDRESS names a cluster)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    resources = {"CPU": job.cpus_per_worker, **({"GPU": 1} if job.use_gpu else {})}
    # read by fit() from this process's environment and passed on to Ray Train's controller (Ray's documented
    # route for its RAY_TRAIN_* settings); one poll is one small call per worker
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(health_check_s(job))
    return TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=job.workers_range if job.elastic else job.workers_range[0],
                                     use_gpu=job.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name, failure_config=FailureConfig(max_failures=job.failure.max_failures,
                                                    max_preemption_failures=job.failure.max_preemption_failures,
                                                    preemption_grace_s=job.failure.preemption_grace_s),
            checkpoint_config=CheckpointConfig(num_to_keep=job.checkpoint.keep_last), **_ray_storage(ray_store)),
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
    )


def health_check_s(job: config.JobSpec) -> float:
    """Seconds between Ray Train's worker polls: `failure.health_check_s`, or (0) max workers / 100 within
    [0.2, 2]: a small job does not wait Ray's 2 s at each start-up stage (test_train.py's 2-worker phases:
    38, 36, 44 s -> 31, 28, 37 s), a large one keeps Ray's default."""
    return job.failure.health_check_s or min(2.0, max(0.2, job.workers_range[1] / 100))


def _ray_storage(store: Store) -> dict:
    """Ray Train's own run state in the run's folder (any fsspec URL, through pyarrow)."""
    if store.is_local:
        os.makedirs(store.local_path, exist_ok=True)
        return {"storage_path": store.local_path}
    import pyarrow.fs as pafs
    fs, path = store.fs()
    return {"storage_path": path, "storage_filesystem": pafs.PyFileSystem(pafs.FSSpecHandler(fs))}
