"""The controller: one job spec runs its phases in order, survives crashes, never redoes finished work.

    dinoray validate jobs/smoke_cpu.yaml
    dinoray run jobs/smoke_cpu.yaml [--set phases.pretrain.steps=100] [--restart-from highres]
    dinoray status runs/smoke [--json]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- dinoray run jobs/smoke_cpu.yaml

State lives in `{storage}/{name}/pipeline.json` (per phase: state, step, steps, checkpoint, metrics,
timestamps, config hash). Re-running the same command continues: finished phases are skipped, the
running phase resumes from its last committed checkpoint. A run holds `{storage}/{name}/LOCK` so two
drivers never run the same pipeline at once.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
import uuid

from orchestrator.pipeline import config
from orchestrator import storage

LOCK_LEASE_S = 300.0        # a lock whose heartbeat is older than this (another host) is stale
HEARTBEAT_S = 30.0


class PipelineError(RuntimeError):
    """A refusal or failure the user must act on; the message says how."""


def run_root(job: config.JobSpec) -> str:
    return f"{job.storage.rstrip('/')}/{job.name}"


def run_keys(phase: config.PhaseSpec) -> list[str]:
    """The folders a phase writes under the run root: one per distill student, else the phase name."""
    if phase.kind == "distill":
        return [f"{phase.name}-{arch}" for arch in phase.students]
    return [phase.name]


# --------------------------------------------------------------------------- state file
def _read_json(url: str, storage_options: dict | None) -> dict | None:
    fs, path = storage.fs_for(url, storage_options)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as fh:
        return json.loads(fh.read())


def _write_json(url: str, obj: dict, storage_options: dict | None) -> None:
    storage.atomic_write_bytes(url, json.dumps(obj, indent=2, sort_keys=True).encode(), storage_options)


def load_state(root: str, storage_options: dict | None = None) -> dict | None:
    return _read_json(f"{root}/pipeline.json", storage_options)


def _new_state(job: config.JobSpec) -> dict:
    return {"name": job.name, "storage": job.storage, "created": time.time(), "phases": [
        {"name": p.name, "kind": p.kind, "state": "pending", "step": 0, "steps": p.steps, "checkpoint": None,
         "metrics": {}, "config_hash": None, "started": None, "finished": None, "error": None}
        for p in job.phases]}


# --------------------------------------------------------------------------- lock
class RunLock:
    """An owner-id lock file in storage with a heartbeat; a dead owner's lock is taken over."""

    def __init__(self, root: str, storage_options: dict | None = None):
        self.url = f"{root}/LOCK"
        self.storage_options = storage_options
        self.owner = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _stale(self, held: dict) -> bool:
        if held.get("host") == self.owner["host"]:
            try:
                os.kill(int(held["pid"]), 0)
                return False
            except (ProcessLookupError, ValueError):
                return True
            except PermissionError:
                return False
        return time.time() - float(held.get("heartbeat", 0)) > LOCK_LEASE_S

    def acquire(self) -> None:
        held = _read_json(self.url, self.storage_options)
        if held and held.get("owner") != self.owner["owner"] and not self._stale(held):
            raise PipelineError(
                f"{self.url}: this run is already being driven by owner {held['owner']} "
                f"(host {held.get('host')}, pid {held.get('pid')}). Wait for it, or stop it; "
                f"if that driver is gone, its lock expires {LOCK_LEASE_S:.0f} s after its last heartbeat.")
        self._beat()
        if (_read_json(self.url, self.storage_options) or {}).get("owner") != self.owner["owner"]:
            raise PipelineError(f"{self.url}: another driver took the lock at the same moment; retry later")
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        _write_json(self.url, {**self.owner, "heartbeat": time.time()}, self.storage_options)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._beat()

    def release(self) -> None:
        self._stop.set()
        held = _read_json(self.url, self.storage_options)
        if held and held.get("owner") == self.owner["owner"]:
            fs, path = storage.fs_for(self.url, self.storage_options)
            fs.rm(path)


# --------------------------------------------------------------------------- phases
def _connect_ray(job: config.JobSpec):
    import ray
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            ray.init(include_dashboard=False, _metrics_export_port=job.metrics.export_port)
    return ray


def _backbone_urls(job: config.JobSpec, phase_name: str) -> dict[str, str]:
    root = run_root(job)
    return {key: f"{root}/{key}/final/backbone.pth" for key in run_keys(job.phase(phase_name))}


def _run_training(job, phase, log) -> dict:
    from orchestrator.training import driver as train
    results = {}
    for key, arch in zip(run_keys(phase), phase.students or [None]):
        log(f"[{phase.name}] training {key}" + (f" (student {arch})" if arch else ""))
        results[key] = train.run_phase(job, phase.name, student_arch=arch)
    last = list(results.values())[-1]
    return {"step": last.get("step", phase.steps), "checkpoint": last.get("checkpoint"),
            "metrics": {k: r.get("metrics", {}) for k, r in results.items()},
            "seconds": sum(r.get("seconds", 0) for r in results.values())}


def _run_eval(job, phase, log) -> dict:
    ray = _connect_ray(job)
    from orchestrator.eval import knn as evaluate
    r = config.resolve(job, phase)
    opts = dict(num_cpus=job.cpus_per_worker, num_gpus=1 if job.use_gpu else 0)

    def ray_map(fn, arglist):  # one Ray task per group of shards, as many groups as training workers
        task = ray.remote(**opts)(fn)
        return ray.get([task.remote(*a) for a in arglist])

    metrics = {}
    for key, url in _backbone_urls(job, phase.from_phase).items():
        log(f"[{phase.name}] k-NN of {key} (k={r.eval.ks}, T={r.eval.temperature}, {job.num_workers} tasks)")
        res = evaluate.knn_eval(url, job.data.eval_train, job.data.eval_test, ks=tuple(r.eval.ks),
                                temperature=r.eval.temperature, image_size=r.eval.image_size,
                                batch_size=r.eval.batch_size, storage_options=job.storage_options,
                                train_limit=r.eval.max_train_images or None,
                                test_limit=r.eval.max_test_images or None,
                                parallel=job.num_workers, map_fn=ray_map)
        metrics[key] = res
        log(f"[{phase.name}] {key}: " + ", ".join(f"k={k} {100 * v:.2f}%" for k, v in res["top1"].items()))
    return {"metrics": metrics}


def _run_export(job, phase, log) -> dict:
    from orchestrator.eval import knn as evaluate
    from orchestrator.eval import export
    out = {}
    ext = {"dinov2": "pth", "timm": "timm.pth", "safetensors": "safetensors"}[phase.export_format]
    for key, url in _backbone_urls(job, phase.from_phase).items():
        dst = f"{run_root(job)}/exports/{key}.{ext}"
        sd = evaluate.load_state_dict(url, job.storage_options)
        export.export_state_dict(sd, phase.export_format, dst, job.storage_options)
        log(f"[{phase.name}] {key} -> {dst}")
        out[key] = dst
    return {"metrics": {"files": out}}


RUNNERS = {"pretrain": _run_training, "highres": _run_training, "distill": _run_training,
           "eval": _run_eval, "export": _run_export}


def _reset_from(job, state, restart_from, log) -> None:
    names = [p.name for p in job.phases]
    if restart_from not in names:
        raise PipelineError(f"--restart-from {restart_from}: no such phase (phases: {names})")
    for phase, entry in zip(job.phases[names.index(restart_from):], state["phases"][names.index(restart_from):]):
        for key in run_keys(phase):
            fs, path = storage.fs_for(f"{run_root(job)}/{key}", job.storage_options)
            if fs.exists(path):
                fs.rm(path, recursive=True)
        entry.update(state="pending", step=0, checkpoint=None, metrics={}, config_hash=None,
                     started=None, finished=None, error=None)
        log(f"[{phase.name}] reset (--restart-from {restart_from})")


def _preflight(job: config.JobSpec, state: dict) -> None:
    """Fail fast, before Ray, on data a pending phase needs but cannot read."""
    from orchestrator.data.index import read_index
    pending = [p for p, e in zip(job.phases, state["phases"]) if e["state"] != "done"]
    needed = {"data.train": job.data.train} if any(p.kind in config.TRAINING_KINDS for p in pending) else {}
    if any(p.kind == "eval" for p in pending):
        needed.update({"data.eval_train": job.data.eval_train, "data.eval_test": job.data.eval_test})
    for key, url in needed.items():
        try:
            read_index(storage.Store(url, job.storage_options))
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{job.source}: {key}: {exc}") from None


def run_pipeline(job: config.JobSpec, restart_from: str | None = None, log=print) -> dict:
    """Run every phase of JOB that is not done yet; returns the final pipeline state."""
    from orchestrator import metrics as metrics_mod
    root, so = run_root(job), job.storage_options
    lock = RunLock(root, so)
    lock.acquire()
    try:
        state = load_state(root, so) or _new_state(job)
        if [e["name"] for e in state["phases"]] != [p.name for p in job.phases]:
            known = {e["name"]: e for e in state["phases"]}
            fresh = _new_state(job)["phases"]
            state["phases"] = [known.get(e["name"], e) for e in fresh]
        if restart_from:
            _reset_from(job, state, restart_from, log)
        for phase, entry in zip(job.phases, state["phases"]):  # refuse before taking any Ray resource
            digest = config.phase_hash(job, phase)
            if entry["config_hash"] not in (None, digest):
                raise PipelineError(
                    f"{job.source}: phase '{phase.name}' was {entry['state']} with a different config "
                    f"(hash {entry['config_hash']}, now {digest}). Restore the old values, or re-run with "
                    f"--restart-from {phase.name} to redo it and every later phase.")
        _preflight(job, state)
        save = lambda: _write_json(f"{root}/pipeline.json", state, so)  # noqa: E731
        save()
        _connect_ray(job)
        pm = metrics_mod.PipelineMetrics(job.name)
        log(f"[dinoray] run {root}; metrics: {metrics_mod.local_scrape_url(job.metrics.export_port)}")
        for i, (phase, entry) in enumerate(zip(job.phases, state["phases"])):
            digest = config.phase_hash(job, phase)
            pm.phase_state(phase.name, phase.kind, entry["state"])
            if entry["state"] == "done":
                log(f"[{phase.name}] done already (step {entry['step']}/{entry['steps']}), skipped")
                continue
            entry.update(state="running", config_hash=digest, steps=phase.steps, error=None,
                         started=entry["started"] or time.time())
            save()
            pm.phase_state(phase.name, phase.kind, "running")
            try:
                result = RUNNERS[phase.kind](job, phase, log)
            except BaseException as exc:
                entry.update(state="failed", error=f"{type(exc).__name__}: {exc}")
                save()
                pm.phase_state(phase.name, phase.kind, "failed")
                raise
            entry.update(state="done", finished=time.time(), step=result.get("step", phase.steps),
                         checkpoint=result.get("checkpoint"), metrics=result.get("metrics", {}),
                         seconds=result.get("seconds", time.time() - entry["started"]))
            save()
            pm.phase_state(phase.name, phase.kind, "done")
            pm.progress((i + 1) / len(job.phases))
            for key, res in entry["metrics"].items() if phase.kind == "eval" else ():
                for k, acc in res["top1"].items():
                    pm.knn(key, int(k), acc)
        from orchestrator.pipeline import report
        state["report"] = report.write_report(root, state, so)
        save()
        return state
    finally:
        lock.release()


# --------------------------------------------------------------------------- status
def status(run_url: str, storage_options: dict | None = None) -> dict:
    state = load_state(run_url.rstrip("/"), storage_options)
    if state is None:
        raise PipelineError(f"{run_url}/pipeline.json not found: is RUN_URL '{{storage}}/{{name}}' of a started run?")
    return state


def _fmt_status(state: dict) -> str:
    lines = [f"run {state['name']} ({state['storage']})"]
    for e in state["phases"]:
        ckpt = e["checkpoint"] or "-"
        lines.append(f"  {e['name']:<12} {e['kind']:<9} {e['state']:<8} step {e['step']}/{e['steps']}  {ckpt}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def _load(args) -> config.JobSpec:
    try:
        return config.load_job(args.job, args.set or [])
    except config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _cmd_validate(args) -> int:
    job = _load(args)
    print(f"{args.job}: ok ({len(job.phases)} phases: {', '.join(p.name for p in job.phases)})")
    return 0


def _cmd_run(args) -> int:
    job = _load(args)
    try:
        state = run_pipeline(job, restart_from=args.restart_from)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(_fmt_status(state))
    print(f"report: {state.get('report')}")
    return 0


def _cmd_status(args) -> int:
    try:
        state = status(args.run_url)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(json.dumps(state) if args.json else _fmt_status(state))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    for name, func, help_ in (("validate", _cmd_validate, "check a job file without running it"),
                              ("run", _cmd_run, "run (or continue) every phase of a job")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("job", help="job spec YAML")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key, e.g. optim.base_lr=1e-3")
        p.set_defaults(func=func)
        if name == "run":
            p.add_argument("--restart-from", metavar="PHASE", help="redo PHASE and every later phase")
    p = sub.add_parser("status", help="show a run's phases")
    p.add_argument("run_url", help="{storage}/{name} of the run")
    p.add_argument("--json", action="store_true", help="print one JSON object with a `phases` list")
    p.set_defaults(func=_cmd_status)
