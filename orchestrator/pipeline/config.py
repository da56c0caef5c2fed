"""Job files: YAML -> typed spec (orchestrator/pipeline/schema.py), `--set` overrides, validation
(orchestrator/pipeline/validate.py), phase hashes and each phase's effective settings.

    dinoray validate jobs/smoke_cpu.yaml --set phases.pretrain.steps=50
    dinoray validate jobs/vitg14_pipeline.yaml --show highres

A job file overrides only what differs from the defaults in schema.py. Phases may override the
`model`, `crops`, `optim` and `eval` sections partially; the result is validated as a whole.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
from typing import Any

import yaml

from orchestrator.pipeline.schema import (PHASE_SECTIONS, TRAINING_KINDS, ConfigError, JobSpec, PhaseSpec,  # noqa: F401
                                          ResolvedPhase, build, resolve)
from orchestrator.layout import PHASE_REF, RunLayout
from orchestrator.pipeline.validate import validate

# --------------------------------------------------------------------------- overrides
def apply_override(raw: dict, assignment: str, source: str = "--set") -> None:
    """Apply `a.b=c` to a raw job dict. `phases.NAME.key` or `phases.INDEX.key` address a phase."""
    if "=" not in assignment:
        raise ConfigError(f"{source}: '{assignment}' is not of the form key.path=value")
    dotted, text = assignment.split("=", 1)
    value = yaml.safe_load(text) if text else ""
    keys = dotted.strip().split(".")
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = _phase_item(node, key, dotted, source)
        else:
            node = node.setdefault(key, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"{source}: '{'.'.join(keys[:i + 1])}' is a value, not a section")
    last = keys[-1]
    if isinstance(node, list):
        raise ConfigError(f"{source}: '{dotted}' names a whole phase; set one of its keys instead")
    node[last] = value


def _phase_item(items: list, key: str, dotted: str, source: str) -> dict:
    if key.isdigit() and int(key) < len(items):
        return items[int(key)]
    for item in items:
        if isinstance(item, dict) and item.get("name") == key:
            return item
    names = [item.get("name") for item in items if isinstance(item, dict)]
    close = difflib.get_close_matches(key, [str(n) for n in names], 1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"{source}: '{dotted}': no phase '{key}' (phases: {names}){hint}")


# --------------------------------------------------------------------------- loading
def load_job(path: str, overrides: list[str] | tuple[str, ...] = (), base_dir: str | None = None) -> JobSpec:
    """Load, override and validate a job file. Raises ConfigError naming the file and key.
    Relative local paths resolve against `base_dir` (default: the current directory)."""
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such job file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return job_from_dict(raw or {}, source=path, overrides=overrides, base_dir=base_dir)


def job_from_dict(raw: dict, source: str = "<dict>", overrides=(), base_dir: str | None = None) -> JobSpec:
    raw = copy.deepcopy(raw)
    for assignment in overrides:
        apply_override(raw, assignment)
    job = build(JobSpec, raw, source, "")
    job.source = source
    _resolve_paths(job, base_dir or os.getcwd())
    validate(job)
    return job


def _resolve_paths(job: JobSpec, base_dir: str) -> None:
    """Relative local paths are relative to `base_dir` (Ray workers run elsewhere); a data URL
    `phase:NAME` is the output shards of this job's curate phase NAME."""
    def absolute(url: str) -> str:
        return os.path.normpath(os.path.join(base_dir, url)) if url and "://" not in url else url
    job.storage = absolute(job.storage)
    for phase in job.phases:
        if phase.curate is not None:
            cur = phase.curate
            cur.pool, cur.exclude = absolute(cur.pool), [absolute(url) for url in cur.exclude]
            for seed_set in cur.retrieve.seeds:
                seed_set.url = absolute(seed_set.url)
            for embedder in (cur.embedder, cur.copy_embedder):
                if phase_ref(embedder.weights) is None:
                    embedder.weights = absolute(embedder.weights)
    curate = [p.name for p in job.phases if p.kind == "curate"]
    for key in ("train", "eval_train", "eval_test"):
        url = getattr(job.data, key)
        name = phase_ref(url)
        if name is None:
            setattr(job.data, key, absolute(url))
        elif name in curate:
            setattr(job.data, key, RunLayout.of(job).phase(name).curate_shards.url)
        else:
            close = difflib.get_close_matches(name, curate, 1)
            hint = f"did you mean '{PHASE_REF}{close[0]}'?" if close else f"curate phases: {curate}"
            raise ConfigError(f"{job.source}: data.{key}: '{url}' names no curate phase of this job; {hint}")


def phase_ref(url: str) -> str | None:
    """NAME of a `phase:NAME` data URL (the shards a phase of the same job writes), else None."""
    return url[len(PHASE_REF):] if url.startswith(PHASE_REF) else None


# --------------------------------------------------------------------------- helpers
_HASH_EXCLUDE = {"num_workers", "cpus_per_worker", "use_gpu", "storage_options", "metrics", "failure", "debug",
                 "checkpoint", "source"}


def phase_hash(job: JobSpec, phase: PhaseSpec | str) -> str:
    """Hash of everything that determines a phase's result (not world size, storage options or metrics)."""
    r = resolve(job, phase)
    top = {k: v for k, v in dataclasses.asdict(job).items() if k not in _HASH_EXCLUDE | {"phases"}}
    top["data"] = {k: v for k, v in top["data"].items() if k != "num_workers"}
    blob = {"job": top, "phase": dataclasses.asdict(r.phase), "model": dataclasses.asdict(r.model),
            "crops": dataclasses.asdict(r.crops), "optim": dataclasses.asdict(r.optim),
            "eval": dataclasses.asdict(r.eval)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_cfg(r: ResolvedPhase, arch: str | None = None) -> dict:
    """The flat dict model.SSLMetaArch / model.DistillMetaArch take."""
    cfg = dataclasses.asdict(r.model)
    cfg["img_size"] = r.crops.global_size
    if arch is not None:
        cfg["arch"] = arch
    return cfg


def effective(job: JobSpec, phase: PhaseSpec | str) -> dict:
    """A phase's effective settings: the job's values, the phase's overrides and the defaults merged."""
    rp = resolve(job, phase)
    top = {k: v for k, v in dataclasses.asdict(job).items() if k not in ("phases", "source", *PHASE_SECTIONS)}
    phase_fields = {k: v for k, v in dataclasses.asdict(rp.phase).items() if k not in PHASE_SECTIONS}
    return {"phase": phase_fields,
            **{name: dataclasses.asdict(getattr(rp, name)) for name in PHASE_SECTIONS}, **top}
