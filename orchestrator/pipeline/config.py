"""Typed job spec: YAML -> dataclasses, unknown keys rejected, impossible values refused early.

Check a job file without taking any Ray resource:

    dinoray validate jobs/smoke_cpu.yaml --set phases.pretrain.steps=50

A job file overrides only what differs from the defaults below. Phases may override the
`model`, `crops` and `optim` sections partially; the result is validated as a whole.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

PHASE_KINDS = ("pretrain", "highres", "distill", "eval", "export")
TRAINING_KINDS = ("pretrain", "highres", "distill")


class ConfigError(ValueError):
    """A job spec problem; the message names the file and the key and says how to fix it."""


@dataclass
class ModelCfg:
    arch: str = "vit_small"
    patch_size: int = 14
    num_register_tokens: int = 0
    drop_path_rate: float = 0.0
    layerscale_init: Optional[float] = 1e-5
    ffn_layer: Literal["mlp", "swiglufused"] = "mlp"
    head_n_prototypes: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    ibot_separate_head: bool = True
    ibot_n_prototypes: int = 65536
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    gram_loss_weight: float = 0.0
    feature_loss_weight: float = 0.0  # distill only: cosine to the teacher's tokens (model/distill.py); 0 = paper
    centering: Literal["sinkhorn_knopp", "softmax"] = "sinkhorn_knopp"
    center_momentum: float = 0.9
    student_temp: float = 0.1
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5


@dataclass
class CropsCfg:
    global_size: int = 224
    local_size: int = 98
    n_global: int = 2
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # Gaussian blur: 1st global, 2nd global, local crops
    solarize_p: float = 0.2                                # 2nd global crop


@dataclass
class OptimCfg:
    batch_size: int = 1024            # global batch, split evenly over workers
    base_lr: float = 0.004            # per 1024 images, scaled by sqrt(batch/1024)
    min_lr: float = 1e-6
    warmup_iters: int = 0
    weight_decay: tuple[float, float] = (0.04, 0.4)
    momentum_teacher: tuple[float, float] = (0.992, 1.0)
    teacher_temp: tuple[float, float] = (0.04, 0.07)
    teacher_temp_warmup_iters: int = 0
    freeze_last_layer_iters: int = 0
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0
    adamw_betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class DataCfg:
    train: str = ""                  # shard dir/URL with index.json (pretraining images, labels unused)
    eval_train: str = ""             # labelled shards: k-NN memory bank
    eval_test: str = ""              # labelled shards: k-NN queries
    num_workers: int = 2             # DataLoader workers per Ray worker
    error_budget: float = 0.01       # max fraction of corrupt samples before failing


@dataclass
class CheckpointCfg:
    every_steps: int = 1000
    keep_last: int = 3
    async_save: bool = True


@dataclass
class PrecisionCfg:
    autocast: Literal["bf16", "fp16", "fp32"] = "bf16"
    param_dtype: Literal["bf16", "fp32"] = "bf16"   # FSDP2 MixedPrecisionPolicy
    reduce_dtype: Literal["bf16", "fp32"] = "fp32"


@dataclass
class FsdpCfg:
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass
class DeepSpeedCfg:
    zero_stage: Literal[2, 3] = 3


@dataclass
class FailureCfg:
    max_failures: int = 3            # Ray worker-group restarts (FailureConfig)
    nonfinite_max_consecutive: int = 3
    max_rollbacks: int = 3


@dataclass
class MetricsCfg:
    peak_flops: float = 989e12       # per device, for MFU (H100 dense bf16); CPU jobs set theirs
    export_port: int = 8080          # Ray metrics export port on each node


@dataclass
class DebugCfg:
    """Fault-injection hooks for tests. Leave empty in real jobs."""
    nan_steps: list[int] = field(default_factory=list)  # rank 0 poisons its batch with NaN at these steps
    kill_at_step: int = -1           # rank 0's worker SIGKILLs itself once when it reaches this step
    step_sleep_s: float = 0.0        # slow each step down (lets tests interrupt a run mid-phase)
    trace_samples: bool = False      # (TRAIN) each rank appends per-step batch fingerprints to {run}/trace/rank<r>.jsonl


@dataclass
class EvalCfg:
    ks: list[int] = field(default_factory=lambda: [10, 20])
    temperature: float = 0.07
    batch_size: int = 256
    image_size: int = 224
    max_train_images: int = 0        # 0 = the whole memory bank; a limit makes quick checks cheap
    max_test_images: int = 0         # 0 = every query image


@dataclass
class PhaseSpec:
    name: str
    kind: Literal["pretrain", "highres", "distill", "eval", "export"]
    steps: int = 0
    from_phase: Optional[str] = None   # highres: init; distill: frozen teacher; eval/export: weights
    students: list[str] = field(default_factory=list)  # distill: student archs, trained one after another
    export_format: Literal["dinov2", "timm", "safetensors"] = "dinov2"
    model: dict[str, Any] = field(default_factory=dict)   # partial overrides of the job's sections
    crops: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobSpec:
    name: str
    storage: str
    phases: list[PhaseSpec]
    backend: Literal["fsdp2", "deepspeed", "ddp"] = "fsdp2"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    seed: int = 0
    storage_options: dict[str, Any] = field(default_factory=dict)  # endpoint etc.; never credentials
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    crops: CropsCfg = field(default_factory=CropsCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    precision: PrecisionCfg = field(default_factory=PrecisionCfg)
    fsdp: FsdpCfg = field(default_factory=FsdpCfg)
    deepspeed: DeepSpeedCfg = field(default_factory=DeepSpeedCfg)
    failure: FailureCfg = field(default_factory=FailureCfg)
    metrics: MetricsCfg = field(default_factory=MetricsCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    debug: DebugCfg = field(default_factory=DebugCfg)
    source: str = field(default="<dict>", metadata={"internal": True})

    def phase(self, name: str) -> PhaseSpec:
        for p in self.phases:
            if p.name == name:
                return p
        raise ConfigError(f"{self.source}: no phase named '{name}' (phases: {[p.name for p in self.phases]})")


@dataclass
class ResolvedPhase:
    """One phase with the job's sections merged with the phase's overrides."""
    job: JobSpec
    phase: PhaseSpec
    model: ModelCfg
    crops: CropsCfg
    optim: OptimCfg
    eval: EvalCfg


# --------------------------------------------------------------------------- building
_FORBIDDEN_KEYS = ("key", "secret", "token", "password", "credential")


def _fail(source: str, path: str, msg: str) -> typing.NoReturn:
    raise ConfigError(f"{source}: {path}: {msg}")


def _convert(tp: Any, value: Any, source: str, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, source, path)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], 1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            _fail(source, path, f"'{value}' is not one of {list(args)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, path)
    if origin is list:
        if not isinstance(value, list):
            _fail(source, path, f"expected a list, got {type(value).__name__} {value!r}")
        return [_convert(args[0], v, source, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            _fail(source, path, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, source, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            _fail(source, path, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(source, path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(source, path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 / 1.7e12 (no sign, no dot) as strings
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(source, path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(source, path, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp}")


def _build(cls: type, data: Any, source: str, path: str) -> Any:
    if not isinstance(data, dict):
        _fail(source, path or "<top>", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), 1)
            hint = f"; did you mean '{_join(path, close[0])}'?" if close else f"; valid keys: {sorted(fields)}"
            _fail(source, _join(path, key), f"unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], source, _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _fail(source, _join(path, name), "required key is missing")
    return cls(**kwargs)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


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
def load_job(path: str, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Load, override and validate a job file. Raises ConfigError naming the file and key."""
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such job file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return job_from_dict(raw or {}, source=path, overrides=overrides)


def job_from_dict(raw: dict, source: str = "<dict>", overrides=()) -> JobSpec:
    raw = copy.deepcopy(raw)
    for assignment in overrides:
        apply_override(raw, assignment)
    job = _build(JobSpec, raw, source, "")
    job.source = source
    _absolute_local_paths(job)
    validate(job)
    return job


def _absolute_local_paths(job: JobSpec) -> None:
    """Relative local paths are relative to where `dinoray` runs; Ray workers run elsewhere."""
    import os
    fix = lambda url: os.path.abspath(url) if url and "://" not in url else url  # noqa: E731
    job.storage = fix(job.storage)
    for key in ("train", "eval_train", "eval_test"):
        setattr(job.data, key, fix(getattr(job.data, key)))


def resolve(job: JobSpec, phase: PhaseSpec | str) -> ResolvedPhase:
    """Merge a phase's partial overrides onto the job's sections and validate the result."""
    if isinstance(phase, str):
        phase = job.phase(phase)
    idx = job.phases.index(phase)
    sections = {}
    for name, cls in (("model", ModelCfg), ("crops", CropsCfg), ("optim", OptimCfg), ("eval", EvalCfg)):
        merged = {**dataclasses.asdict(getattr(job, name)), **getattr(phase, name)}
        sections[name] = _build(cls, merged, job.source, f"phases[{idx}].{name}")
    return ResolvedPhase(job=job, phase=phase, **sections)


def validate(job: JobSpec) -> None:
    """Refuse impossible values before any Ray resource is taken."""
    from model.schedules import scaled_lr  # the one lr scaling rule (pulls in torch: imported here, not at the top)
    src = job.source
    if not job.storage.strip():
        _fail(src, "storage", "missing storage root; set a local path or an s3:// / gs:// URL")
    if job.num_workers < 1:
        _fail(src, "num_workers", f"must be >= 1, got {job.num_workers}")
    for key in job.storage_options:
        if any(word in key.lower() for word in _FORBIDDEN_KEYS):
            _fail(src, f"storage_options.{key}", "credentials must not be in job files; "
                  "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment or a Kubernetes Secret")
    seen: dict[str, int] = {}
    for i, phase in enumerate(job.phases):
        where = f"phases[{i}]"
        if phase.name in seen:
            _fail(src, f"{where}.name", f"phase name '{phase.name}' is used twice")
        if phase.from_phase is not None and phase.from_phase not in seen:
            later = [p.name for p in job.phases[i:]]
            why = "comes later" if phase.from_phase in later else "is not a phase of this job"
            close = difflib.get_close_matches(phase.from_phase, list(seen), 1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; earlier phases: {list(seen)}"
            _fail(src, f"{where}.from_phase", f"depends on '{phase.from_phase}', which {why}{hint}")
        seen[phase.name] = i
        if phase.kind in ("highres", "distill", "eval", "export") and phase.from_phase is None:
            _fail(src, f"{where}.from_phase", f"a {phase.kind} phase needs from_phase: the phase whose weights it uses")
        if phase.kind in TRAINING_KINDS and phase.steps < 1:
            _fail(src, f"{where}.steps", f"a {phase.kind} phase needs steps >= 1")
        if phase.kind == "distill" and not phase.students:
            _fail(src, f"{where}.students", "list at least one student arch, e.g. [vit_small]")
        if phase.kind in TRAINING_KINDS and not job.data.train:
            _fail(src, "data.train", "training phases need the URL of the training shards (index.json's folder)")
        if phase.kind == "eval" and not (job.data.eval_train and job.data.eval_test):
            _fail(src, "data.eval_train", "an eval phase needs data.eval_train and data.eval_test (labelled shards)")
        r = resolve(job, phase)
        p = r.model.patch_size
        for key in ("global_size", "local_size"):
            size = getattr(r.crops, key)
            if size <= 0 or size % p:
                fix = max(p, round(size / p) * p)
                _fail(src, f"{where}.crops.{key}" if key in phase.crops else f"crops.{key}",
                      f"{size} is not a multiple of model.patch_size={p}; use {fix}")
        if r.eval.image_size % p:
            _fail(src, "eval.image_size", f"{r.eval.image_size} is not a multiple of model.patch_size={p}")
        if r.optim.batch_size % job.num_workers:
            _fail(src, f"{where}.optim.batch_size" if "batch_size" in phase.optim else "optim.batch_size",
                  f"{r.optim.batch_size} is not divisible by num_workers={job.num_workers}")
        if phase.kind in TRAINING_KINDS:
            for key in ("warmup_iters", "teacher_temp_warmup_iters", "freeze_last_layer_iters"):
                if getattr(r.optim, key) >= phase.steps and getattr(r.optim, key) > 0:
                    _fail(src, f"{where}.optim.{key}" if key in phase.optim else f"optim.{key}",
                          f"{getattr(r.optim, key)} is not shorter than the phase's {phase.steps} steps; "
                          f"lower it (e.g. --set phases.{phase.name}.optim.{key}=0)")
        peak = scaled_lr(r.optim.base_lr, r.optim.batch_size)
        if phase.kind in TRAINING_KINDS and r.optim.min_lr > peak:
            _fail(src, f"{where}.optim.min_lr" if "min_lr" in phase.optim else "optim.min_lr",
                  f"{r.optim.min_lr} is above the phase's peak lr {peak:.3g} (base_lr {r.optim.base_lr} x "
                  f"sqrt({r.optim.batch_size}/1024)): the cosine would climb; lower it")
        if phase.kind in ("pretrain", "highres") and r.model.feature_loss_weight:
            _fail(src, f"{where}.model.feature_loss_weight" if "feature_loss_weight" in phase.model
                  else "model.feature_loss_weight", f"a {phase.kind} phase has no teacher features to regress; "
                  "set it only in a distill phase (phases.NAME.model.feature_loss_weight)")
        if phase.kind == "distill" and not (r.model.dino_loss_weight or r.model.ibot_loss_weight
                                            or r.model.feature_loss_weight):
            _fail(src, f"{where}.model", "dino_loss_weight, ibot_loss_weight and feature_loss_weight are all 0: "
                  "nothing to distil; set one of them above 0")
        if phase.kind in TRAINING_KINDS and r.crops.n_global != 2:
            _fail(src, "crops.n_global", "the DINO loss pairs exactly 2 global crops; set 2")
        for key in ("global_scale", "local_scale"):
            lo, hi = getattr(r.crops, key)
            if not 0 < lo <= hi <= 1:
                _fail(src, f"crops.{key}", f"({lo}, {hi}) must satisfy 0 < min <= max <= 1")
    if job.checkpoint.every_steps < 1 or job.checkpoint.keep_last < 1:
        _fail(src, "checkpoint", "every_steps and keep_last must be >= 1")


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


def to_dict(job: JobSpec) -> dict:
    d = dataclasses.asdict(job)
    d.pop("source", None)
    return d
