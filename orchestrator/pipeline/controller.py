"""The controller: one job spec runs its phases in order, survives crashes, never redoes finished work.

    dinoray run jobs/smoke_cpu.yaml [--set phases.pretrain.steps=100] [--restart-from highres] [--verbose]
    dinoray status runs/smoke [--json]

State lives in the run's pipeline.json (orchestrator/pipeline/state.py). Re-running the same command
continues: finished phases are skipped, the running phase resumes from its last committed checkpoint.
The run's LOCK keeps two drivers from running the same pipeline at once. Each phase kind has one
runner, `RUNNERS[kind](job, phase, layout, log) -> dict(step?, checkpoint?, metrics, seconds?)`.
"""
from __future__ import annotations

import functools
import os
import sys
import time

from orchestrator.layout import RunLayout, phase_keys
from orchestrator.pipeline import config, console, state
from orchestrator.pipeline.state import PipelineError


def connect_ray(job, verbose: bool = False):
    """Attach to RAY_ADDRESS's cluster, or start a local Ray exporting metrics on the job's port (its
    session logs linked as {run}/logs/ray). Ray's own output reaches the console only with --verbose."""
    import ray
    if not ray.is_initialized():
        local = not os.environ.get("RAY_ADDRESS")
        if local:
            console.local_ray_env()
        extra = {"_metrics_export_port": job.metrics.export_port} if local else {}
        context = ray.init(**console.ray_init_kwargs(verbose, local), **extra)
        if local:
            console.link_ray_logs(RunLayout.of(job), context.address_info.get("session_dir"))
    return ray


# --------------------------------------------------------------------------- runners
def run_training(job, phase, layout: RunLayout, log, verbose: bool = False) -> dict:
    """Each phase folder (distill: each student) as one Ray Train run, with its progress line; a worker's
    failure is reported as its own error and the path of its log."""
    from orchestrator.training import driver
    results = {}
    for key, arch in zip(phase_keys(phase), phase.students or [None]):
        log(f"[{phase.name}] training {key}" + (f" (student {arch})" if arch else ""))
        try:
            with console.PhaseProgress(layout.phase(key), phase.steps, key, verbose=verbose,
                                       batch_size=config.resolve(job, phase).optim.batch_size):
                results[key] = driver.run_phase(job, phase.name, student_arch=arch)
        except Exception as exc:
            failed = console.worker_failure(exc, layout, key)
            if failed is None:
                raise
            raise PipelineError(f"[{phase.name}] {key}: a training worker failed\n{failed}") from None
    last = list(results.values())[-1]
    return {"step": last.get("step", phase.steps), "checkpoint": last.get("checkpoint"),
            "metrics": {key: res.get("metrics", {}) for key, res in results.items()},
            "seconds": sum(res.get("seconds", 0) for res in results.values())}


def run_eval(job, phase, layout: RunLayout, log) -> dict:
    from orchestrator.eval import phase as eval_phase
    connect_ray(job)
    return eval_phase.run_eval(job, phase, layout, log)


def run_export(job, phase, layout: RunLayout, log) -> dict:
    from orchestrator.eval import phase as eval_phase
    return eval_phase.run_export(job, phase, layout, log)


def run_curate(job, phase, layout: RunLayout, log) -> dict:
    from orchestrator.curate import phase as curate_phase
    return curate_phase.run_curate(job, phase, layout, log)


RUNNERS = {"pretrain": run_training, "highres": run_training, "distill": run_training,
           "eval": run_eval, "export": run_export, "curate": run_curate}


# --------------------------------------------------------------------------- checks before Ray
def _reset_from(job, layout: RunLayout, run_state: dict, restart_from: str, log) -> None:
    names = [p.name for p in job.phases]
    if restart_from not in names:
        raise PipelineError(f"--restart-from {restart_from}: no such phase (phases: {names})")
    start = names.index(restart_from)
    for phase, entry in zip(job.phases[start:], run_state["phases"][start:]):
        for phase_dir in layout.phase_dirs(phase).values():
            phase_dir.root.rm(recursive=True)
        entry.update(state.new_phase_entry(phase))
        log(f"[{phase.name}] reset (--restart-from {restart_from})")


def _refuse_changed_configs(job, run_state: dict) -> None:
    for phase, entry in zip(job.phases, run_state["phases"]):
        digest = config.phase_hash(job, phase)
        if entry["config_hash"] not in (None, digest):
            raise PipelineError(
                f"{job.source}: phase '{phase.name}' was {entry['state']} with a different config "
                f"(hash {entry['config_hash']}, now {digest}). Restore the old values, or re-run with "
                f"--restart-from {phase.name} to redo it and every later phase.")


def _preflight(job, run_state: dict) -> None:
    """Fail fast, before Ray, on data a pending phase needs but cannot read (not data a phase makes)."""
    from orchestrator.data.index import read_index
    from orchestrator.storage import Store
    pending = [p for p, e in zip(job.phases, run_state["phases"]) if e["state"] != "done"]
    layout = RunLayout.of(job)
    made_here = {layout.phase(p.name).curate_shards.url for p in pending if p.kind == "curate"}
    needed = {"data.train": job.data.train} if any(p.kind in config.TRAINING_KINDS for p in pending) else {}
    if any(p.kind == "eval" for p in pending):
        needed.update({"data.eval_train": job.data.eval_train, "data.eval_test": job.data.eval_test})
    for key, url in needed.items():
        if url in made_here:
            continue
        try:
            read_index(Store(url, job.storage_options))
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{job.source}: {key}: {exc}") from None


def _refuse_node_local_paths(job, ray) -> None:
    """On more than one node, a local path is a different folder on every node: refuse it unless the
    job declares it one shared mount."""
    from orchestrator.storage import Store
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes < 2 or job.storage_shared:
        return
    paths = {"storage": job.storage, "data.train": job.data.train, "data.eval_train": job.data.eval_train,
             "data.eval_test": job.data.eval_test}
    local = {key: url for key, url in paths.items() if url and Store(url).is_local}
    if local:
        key, url = next(iter(local.items()))
        raise PipelineError(
            f"{job.source}: {key}: '{url}' is a local path, but the Ray cluster has {nodes} nodes and each "
            f"would see its own folder (local paths: {sorted(local)}). Use object storage (s3://, gs://), or "
            f"set storage_shared: true if it is one shared mount (NFS, Lustre) on every node.")


# --------------------------------------------------------------------------- the pipeline
def run_pipeline(job, restart_from: str | None = None, log=print, verbose: bool = False) -> dict:
    """Run every phase of JOB that is not done yet; returns the final pipeline state. `verbose`: Ray's
    and the workers' own output on the console too (it is always in {run}/logs/)."""
    layout = RunLayout.of(job)
    lock = state.RunLock(layout)
    lock.acquire()
    try:
        run_state = state.load(layout, job)
        if restart_from:
            _reset_from(job, layout, run_state, restart_from, log)
        _refuse_changed_configs(job, run_state)   # before taking any Ray resource
        _preflight(job, run_state)
        state.save(layout, run_state)
        _refuse_node_local_paths(job, connect_ray(job, verbose))
        _run_phases(job, layout, run_state, log, verbose)
        from orchestrator.pipeline import report
        run_state["report"] = report.write_report(job, layout, run_state)
        state.save(layout, run_state)
        return run_state
    finally:
        lock.release()


def _run_phases(job, layout: RunLayout, run_state: dict, log, verbose: bool) -> None:
    from orchestrator import metrics
    series = metrics.PipelineMetrics(job.name)
    log(f"[dinoray] run {layout.root}; metrics: {metrics.local_scrape_url(job.metrics.export_port)}")
    for i, (phase, entry) in enumerate(zip(job.phases, run_state["phases"])):
        series.phase_state(phase.name, phase.kind, entry["state"])
        if entry["state"] == "done":
            log(f"[{phase.name}] done already (step {entry['step']}/{entry['steps']}), skipped")
            continue
        entry.update(state="running", config_hash=config.phase_hash(job, phase), steps=phase.steps, error=None,
                     started=entry["started"] or time.time())
        if phase.kind in config.TRAINING_KINDS:  # `dinoray status` turns step times into images/s with it
            entry["batch_size"] = config.resolve(job, phase).optim.batch_size
        state.save(layout, run_state)
        series.phase_state(phase.name, phase.kind, "running")
        try:
            runner = RUNNERS[phase.kind]
            if runner is run_training:
                runner = functools.partial(run_training, verbose=verbose)
            result = runner(job, phase, layout, log)
        except BaseException as exc:
            entry.update(state="failed", error=f"{type(exc).__name__}: {exc}")
            state.save(layout, run_state)
            series.phase_state(phase.name, phase.kind, "failed")
            raise
        entry.update(state="done", finished=time.time(), step=result.get("step", phase.steps),
                     checkpoint=result.get("checkpoint"), metrics=result.get("metrics", {}),
                     seconds=result.get("seconds", time.time() - entry["started"]))
        state.save(layout, run_state)
        series.phase_state(phase.name, phase.kind, "done")
        series.progress((i + 1) / len(job.phases))
        for key, res in entry["metrics"].items() if phase.kind == "eval" else ():
            for k, acc in res.get("knn", res).get("top1", {}).items():
                series.knn(key, int(k), acc)


# --------------------------------------------------------------------------- CLI handlers
def _load(args):
    try:
        return config.load_job(args.job, args.set or [], base_dir=getattr(args, "base_dir", None))
    except config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_validate(args) -> int:
    job = _load(args)
    print(f"{args.job}: ok ({len(job.phases)} phases: {', '.join(p.name for p in job.phases)})")
    if args.show is not None:
        import yaml
        names = [args.show] if args.show else [p.name for p in job.phases]
        for name in names:
            try:
                settings = config.effective(job, name)
            except config.ConfigError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            print(f"\n# phase {name}: effective settings (defaults < job file < phase overrides < --set)")
            print(yaml.safe_dump(settings, sort_keys=False, default_flow_style=None).rstrip())
    return 0


def cmd_run(args) -> int:
    job = _load(args)
    try:
        run_state = run_pipeline(job, restart_from=args.restart_from, verbose=args.verbose)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    from orchestrator.pipeline import progress
    print(progress.fmt_status(run_state))
    print(f"report: {run_state.get('report')}")
    return 0
