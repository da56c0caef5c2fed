"""The job spec's types: every section, every field, every default (the only table of defaults).

Each field's comment gives its meaning and its source: [paper] Oquab et al., DINOv2 (TMLR 2024);
[ref] the reference configs (dinov2/configs/ssl_default_config.yaml); or the reason dinoray sets it.
`build(cls, data, source, path)` turns a YAML mapping into these dataclasses, refusing unknown keys
with "did you mean"; `resolve(job, phase)` merges a phase's partial overrides onto the job's sections.

No entrypoint; `dinoray validate JOB --show` prints a phase's effective values.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

TRAINING_KINDS = ("pretrain", "highres", "distill")


class ConfigError(ValueError):
    """A job spec problem; the message names the file and the key and says how to fix it."""


@dataclass
class ModelCfg:
    arch: str = "vit_small"                       # backbone (model/vit.py ARCHS); [paper] ViT-S/B/L/g
    patch_size: int = 14                          # [paper] /14 patches
    num_register_tokens: int = 0                  # register tokens (Darcet et al. 2024); 0 = the paper's models
    drop_path_rate: float = 0.0                   # stochastic depth; [paper] Table 16: 0.4 for ViT-g
    layerscale_init: Optional[float] = 1e-5       # LayerScale initial value; [paper] 1e-5; null = none
    ffn_layer: Literal["mlp", "swiglufused"] = "mlp"  # FFN kind; [ref] swiglufused for ViT-g
    head_n_prototypes: int = 65536                # DINO head prototypes; [ref] 65536 (131072 for ViT-g)
    head_hidden_dim: int = 2048                   # head MLP width; [ref]
    head_bottleneck_dim: int = 256                # head bottleneck; [ref] 256 (384 for ViT-g/L)
    head_nlayers: int = 3                         # head MLP depth; [ref]
    ibot_separate_head: bool = True               # untied DINO and iBOT heads; [paper] Sec. 4
    ibot_n_prototypes: int = 65536                # iBOT head prototypes; [ref]
    dino_loss_weight: float = 1.0                 # [ref]
    ibot_loss_weight: float = 1.0                 # [ref]
    koleo_loss_weight: float = 0.1                # KoLeo regulariser; [paper] Sec. 4: 0.1
    gram_loss_weight: float = 0.0                 # Gram anchoring (DINOv3); 0 = off, as in DINOv2
    feature_loss_weight: float = 0.0              # distill only: cosine to the teacher's CLS (docs/learning.md); 0 = paper
    centering: Literal["sinkhorn_knopp", "softmax"] = "sinkhorn_knopp"  # teacher centring; [paper] Sec. 4: SK
    sinkhorn_iterations: int = 3                  # Sinkhorn-Knopp iterations; [paper] Sec. 4: 3
    center_momentum: float = 0.9                  # EMA of the softmax centre (centering: softmax); [ref]
    student_temp: float = 0.1                     # student softmax temperature; [ref]
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)  # iBOT masked fraction range; [ref]
    mask_probability: float = 0.5                 # fraction of global crops that are masked; [ref]


@dataclass
class CropsCfg:
    global_size: int = 224                        # global crop side; [paper] 224 (518 in the high-res phase)
    local_size: int = 98                          # local crop side; [ref] 98 = 7 patches of 14
    n_global: int = 2                             # [ref] the DINO loss pairs exactly 2
    n_local: int = 8                              # [ref] local_crops_number 8
    global_scale: tuple[float, float] = (0.32, 1.0)   # area fraction of a global crop; [ref]
    local_scale: tuple[float, float] = (0.05, 0.32)   # area fraction of a local crop; [ref]
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # Gaussian blur p: 1st global, 2nd global, locals; [ref]
    solarize_p: float = 0.2                       # solarisation p of the 2nd global crop; [ref]


@dataclass
class OptimCfg:
    batch_size: int = 1024                        # global batch per optimiser step, split over workers
    base_lr: float = 0.004                        # per 1024 images, scaled by sqrt(batch/1024); [ref]
    min_lr: float = 1e-6                          # end of the cosine; [ref]
    warmup_iters: int = 0                         # linear lr warmup steps; [paper] 100k for ViT-g
    weight_decay: tuple[float, float] = (0.04, 0.4)   # cosine start -> end; [ref] (paper ViT-g: 0.04 -> 0.2)
    momentum_teacher: tuple[float, float] = (0.992, 1.0)  # teacher EMA cosine; [ref] (paper ViT-g: 0.994)
    teacher_temp: tuple[float, float] = (0.04, 0.07)  # warmup start -> final; [ref]
    teacher_temp_warmup_iters: int = 0            # [ref] 30 epochs
    freeze_last_layer_iters: int = 0              # prototypes frozen at the start; [ref] 1 epoch
    layer_decay: float = 0.9                      # layer-wise lr decay; [ref] (1.0 for ViT-g/L)
    patch_embed_lr_mult: float = 0.2              # [ref]
    clip_grad: float = 3.0                        # global grad-norm clip; [ref]
    adamw_betas: tuple[float, float] = (0.9, 0.999)  # [ref]


@dataclass
class DataCfg:
    train: str = ""                  # shard folder/URL with index.json (pretraining images, labels unused)
    eval_train: str = ""             # labelled shards: the eval's memory bank / training split
    eval_test: str = ""              # labelled shards: the eval's queries / test split
    num_workers: int = 2             # DataLoader worker processes per Ray worker
    error_budget: float = 0.01       # max fraction of corrupt samples before the phase fails


@dataclass
class CheckpointCfg:
    every_steps: Union[int, Literal["auto"]] = 1000  # steps between checkpoints; "auto": Young-Daly (training/interval.py)
    keep_last: int = 3               # committed checkpoints kept
    async_save: bool = True          # DCP async save: training stalls only for staging


@dataclass
class PrecisionCfg:
    autocast: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 where native (GPU, AMX), else fp32
    param_dtype: Literal["bf16", "fp32"] = "bf16"       # FSDP2 MixedPrecisionPolicy / DeepSpeed bf16
    reduce_dtype: Literal["bf16", "fp32"] = "fp32"      # gradient reduction dtype; [paper] fp32 reductions


@dataclass
class FsdpCfg:
    activation_checkpointing: bool = False  # per block: trades compute for activation memory
    compile: bool = False                   # torch.compile per block (student's and teacher's; deepspeed: student's)
    cudagraphs: bool = False                # with compile + ddp: blocks replay as CUDA graphs (GPU; docs/training.md)
    reshard_after_forward: bool = True      # fsdp2, false: the student's units keep gathered weights to backward


@dataclass
class DeepSpeedCfg:
    zero_stage: Literal[2, 3] = 3    # ZeRO-2 shards optimiser state and grads; ZeRO-3 also parameters


@dataclass
class FailureCfg:
    max_failures: int = 3            # Ray worker-group restarts after failures (FailureConfig)
    max_preemption_failures: int = -1  # restarts after node preemptions (drains), counted apart; -1: no limit
    preemption_grace_s: float = 0.0  # workers may run this long past a drain's deadline (Ray's FailureConfig)
    mtbf_hours: float = 24.0         # expected hours between interruptions of the whole job (every_steps: auto)
    nonfinite_max_consecutive: int = 3  # non-finite steps in a row before a rollback
    max_rollbacks: int = 3           # rollbacks to the last checkpoint before the phase fails
    health_check_s: float = 0.0      # Ray Train's worker poll (Ray: 2 s); 0: max workers / 100 in [0.2, 2] (driver.py)


@dataclass
class MetricsCfg:
    peak_flops: float = 989e12       # per device, for MFU (H100 dense bf16); CPU jobs set theirs
    export_port: int = 8080          # Ray metrics export port on each node (KubeRay's default)
    live_every_s: float = 30.0       # object storage: rank 0 uploads metrics.jsonl's tail this often (status)


@dataclass
class DebugCfg:
    """Fault-injection hooks for tests. Leave empty in real jobs."""
    nan_steps: list[int] = field(default_factory=list)  # rank 0 poisons its batch with NaN at these data positions
    kill_at_step: int = -1           # rank 0's worker SIGKILLs itself once when it reaches this step
    step_sleep_s: float = 0.0        # slow each step down (lets tests interrupt a run mid-phase)
    trace_samples: bool = False      # each rank appends per-step batch fingerprints to its trace file


@dataclass
class EvalCfg:
    ks: list[int] = field(default_factory=lambda: [10, 20])  # k-NN neighbours; [ref] eval/knn.py 10, 20
    temperature: float = 0.07        # k-NN vote temperature; [ref] DINO k-NN
    batch_size: int = 256            # images per embedding batch
    image_size: int = 224            # eval resolution; [ref] 224 centre crop
    max_train_images: int = 0        # 0 = the whole memory bank; a limit makes quick checks cheap
    max_test_images: int = 0         # 0 = every query image
    methods: list[Literal["knn", "linear", "retrieval"]] = field(default_factory=lambda: ["knn"])  # evals to run
    baselines: bool = True           # the same evals on a random-init backbone (+ raw pixels): the yardsticks
    linear_epochs: int = 10          # linear probe: passes over the cached features; [ref] eval/linear.py 10
    linear_lrs: list[float] = field(default_factory=lambda: [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3,
                                                             1e-2, 2e-2, 5e-2, 0.1])  # [ref] eval/linear.py lr grid
    retrieval_queries: int = 500     # copy detection: query images (the first of the test split)
    retrieval_copies: int = 3        # edited copies of each query in the database
    retrieval_distractors: int = 2000  # further test images in the database, relevant to no query


# curation (kind: curate; orchestrator/curate, docs/curation.md). [paper]: DINOv2 sec. 3, app. A; [Vo]: Vo et al. 2024
@dataclass
class CurateEmbedderCfg:
    weights: str = ""        # phase:NAME (that phase's final/) or an exported dinov2-named file / final/ folder URL
    image_size: int = 0      # pixels; 0 = the weights' training size; must be a multiple of the patch size
    batch_size: int = 256    # images per forward pass in each embedding actor (memory bound, not a recipe value)
    role: Literal["retrieval", "copy"] = "retrieval"  # retrieval: L2-normalised CLS. copy: curate/copydesc.py's
                             # copy-detection descriptor (patch tokens pooled to a grid, multi-crop views); for copy_embedder
    copy_grid: int = 4       # role copy: patch-token cells per side of the descriptor (4: 16 cells x dim)
    crop_scales: list[float] = field(default_factory=lambda: [0.65, 0.75, 0.85])  # role copy: crop sides (fraction)
                             # of the extra views; they cover the 70-90% crops after the eval resize (0.62-0.9)
    crop_grid: int = 3       # role copy: crops per side at each scale (3: 9 positions)
    crop_flip: bool = True   # role copy: also the crops mirrored (copies may be flipped)


@dataclass
class CurateSearchCfg:
    index: Literal["auto", "flat", "ivfpq"] = "auto"  # auto: exact Flat up to flat_max vectors, else IVF-PQ (paper: IVF-PQ)
    flat_max: int = 1_000_000  # exact k-NN graph is O(n^2 d): ~8e14 flops at 1M x 384-d; IVF-PQ above
    nlist: int = 0             # IVF lists; 0 = ~4 sqrt(n) (faiss's guideline for 1M-100M vectors)
    pq_m: int = 0              # PQ sub-quantisers (8 bits each); 0 = dim / 4 (a divisor of dim)
    nprobe: int = 0            # lists visited per query; 0 = max(8, nlist / 16)


@dataclass
class CurateDedupCfg:
    enabled: bool = True           # self-deduplication of the pool (DINOv2 sec. 3 "Image deduplication")
    k: int = 64                    # neighbours per image in the k-NN graph (DINOv2 app. A.2: k = 64)
    threshold: float = 0.6         # cosine above which two pool images are copies (DINOv2 app. A.2: 0.6)
    exclude_threshold: float = 0.45  # cosine to an exclude-set image that drops a component (DINOv2 app. A.2: 0.45)
    whiten: bool = False           # PCA-whiten the copy descriptors, fit on the pool itself, before both searches
                                   # (ISC 2021); the thresholds then apply to whitened cosines. SSCD is used unwhitened
    normalize: bool = False        # subtract the mean similarity of both images to their background neighbours
                                   # (ranks 2-11; CSLS / ISC 2021 score normalisation): thresholds become margins


@dataclass
class CurateSeedSetCfg:
    name: str = ""                 # label recorded in index.json for the images this set retrieves
    url: str = ""                  # shard folder (index.json) of the seed images, e.g. an ImageNet-1k train split
    mode: Literal["sample", "cluster"] = "sample"  # sample: large seed sets; cluster: small ones (DINOv2 sec. 3)
    k: int = 4                     # sample: pool images per seed image (DINOv2 app. A.3: 4 or 32)
    per_cluster: int = 10000       # cluster: most images one cluster gives (DINOv2 app. A.3: 10,000)
    min_seed_hits: int = 3         # cluster: seed images a cluster must hold to be used (DINOv2 app. A.3: 3)


@dataclass
class CurateRetrieveCfg:
    seeds: list[CurateSeedSetCfg] = field(default_factory=list)  # none = keep every deduplicated image
    n_clusters: int = 100000       # cluster mode: spherical k-means clusters of the pool (DINOv2 app. A.3: 100,000)
    kmeans_iters: int = 20         # k-means iterations (faiss's default is 25; 20 converges on our sizes)


@dataclass
class CurateBalanceCfg:
    target: int = 0                # images after balancing; 0 = no balancing (Vo et al. 2024)
    levels: list[int] = field(default_factory=lambda: [1000, 100])  # clusters per level, finest first (Vo et al.: 4 levels)
    resample_steps: int = 3        # re-fits per level on points resampled evenly from clusters (Vo et al. sec. 4)


@dataclass
class CurateCfg:
    pool: str = ""                 # shard folder of the uncurated images (index.json)
    exclude: list[str] = field(default_factory=list)  # shard folders of evaluation sets: nothing near them is kept
    embedder: CurateEmbedderCfg = field(default_factory=CurateEmbedderCfg)  # self-supervised: retrieval, balance
    copy_embedder: CurateEmbedderCfg = field(default_factory=CurateEmbedderCfg)  # copy detection; weights "" = embedder
    actors: tuple[int, int] = (1, 2)  # embedding actor pool (min, max); one GPU each when use_gpu
    search: CurateSearchCfg = field(default_factory=CurateSearchCfg)
    dedup: CurateDedupCfg = field(default_factory=CurateDedupCfg)
    retrieve: CurateRetrieveCfg = field(default_factory=CurateRetrieveCfg)
    balance: CurateBalanceCfg = field(default_factory=CurateBalanceCfg)
    samples_per_shard: int = 1000  # images per output shard (as `dinoray shards build`)
    seed: int = 0                  # k-means, IVF training and per-cluster sampling


@dataclass
class PhaseSpec:
    name: str                                           # unique; names the phase's folder
    kind: Literal["pretrain", "highres", "distill", "eval", "export", "curate"]
    steps: int = 0                                      # optimiser steps (training phases)
    from_phase: Optional[str] = None   # highres: init; distill: frozen teacher; eval/export: weights
    students: list[str] = field(default_factory=list)  # distill: student archs, trained one after another
    export_format: Literal["dinov2", "hf", "safetensors"] = "dinov2"  # export: output format (docs/eval.md; timm reads dinov2)
    model: dict[str, Any] = field(default_factory=dict)   # partial overrides of the job's sections
    crops: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    curate: Optional[CurateCfg] = None                  # curate: its settings (required there, refused elsewhere)


@dataclass
class JobSpec:
    name: str                                  # the run's folder under storage
    storage: str                               # root of every run: local path or s3:// / gs:// URL
    phases: list[PhaseSpec]                    # run in order
    backend: Literal["fsdp2", "deepspeed", "ddp"] = "fsdp2"  # sharding (orchestrator/training/backends.py)
    num_workers: Union[int, tuple[int, int]] = 2  # Ray Train workers (one per GPU); [min, max]: elastic, the
                                               # global batch kept by gradient accumulation (docs/scale.md)
    use_gpu: bool = False
    cpus_per_worker: int = 1
    seed: int = 0                              # model init, data order, augmentations
    storage_options: dict[str, Any] = field(default_factory=dict)  # endpoint etc.; never credentials
    storage_shared: bool = False               # local storage/data paths are one shared mount (NFS, Lustre) on every node
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
    source: str = field(default="<dict>", metadata={"internal": True})  # the job file, for messages

    @property
    def workers_range(self) -> tuple[int, int]:
        """(min, max) Ray Train workers: equal for a fixed `num_workers`."""
        n = self.num_workers
        return (n, n) if isinstance(n, int) else tuple(n)

    @property
    def elastic(self) -> bool:
        return self.workers_range[0] != self.workers_range[1]

    def accumulation(self, batch_size: int, world: int) -> int | None:
        """Micro-batches per worker and optimiser step at `world` workers, so that `batch_size` images
        make every step at any world size: the smallest A with world * A >= the maximum worker count
        (a micro-batch is never larger than at full size) that splits the batch evenly (world * A
        streams of batch_size / (world * A) images). None when no A splits it."""
        need = -(-self.workers_range[1] // world)
        for accum in range(need, batch_size // world + 1):
            if batch_size % (world * accum) == 0:
                return accum
        return None

    def phase(self, name: str) -> PhaseSpec:
        for p in self.phases:
            if p.name == name:
                return p
        raise ConfigError(f"{self.source}: no phase named '{name}' (phases: {[p.name for p in self.phases]})")


# The sections a phase may override partially, and their types.
PHASE_SECTIONS = {"model": ModelCfg, "crops": CropsCfg, "optim": OptimCfg, "eval": EvalCfg}


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
def fail(source: str, path: str, msg: str) -> typing.NoReturn:
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
        errors = []
        for alt in inner:  # the first alternative that takes the value
            try:
                return _convert(alt, value, source, path)
            except ConfigError as exc:
                errors.append(str(exc).rsplit(": ", 1)[-1])
        fail(source, path, " or ".join(errors))
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], 1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            fail(source, path, f"'{value}' is not one of {list(args)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, source, path)
    if origin is list:
        if not isinstance(value, list):
            fail(source, path, f"expected a list, got {type(value).__name__} {value!r}")
        return [_convert(args[0], v, source, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            fail(source, path, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, source, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            fail(source, path, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            fail(source, path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(source, path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 / 1.7e12 (no sign, no dot) as strings
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(source, path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail(source, path, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp}")


def build(cls: type, data: Any, source: str, path: str) -> Any:
    if not isinstance(data, dict):
        fail(source, path or "<top>", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), 1)
            hint = f"; did you mean '{_join(path, close[0])}'?" if close else f"; valid keys: {sorted(fields)}"
            fail(source, _join(path, key), f"unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], source, _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            fail(source, _join(path, name), "required key is missing")
    return cls(**kwargs)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def resolve(job: JobSpec, phase: PhaseSpec | str) -> ResolvedPhase:
    """Merge a phase's partial overrides onto the job's sections and type-check the result."""
    if isinstance(phase, str):
        phase = job.phase(phase)
    idx = job.phases.index(phase)
    sections = {}
    for name, cls in PHASE_SECTIONS.items():
        merged = {**dataclasses.asdict(getattr(job, name)), **getattr(phase, name)}
        sections[name] = build(cls, merged, job.source, f"phases[{idx}].{name}")
    return ResolvedPhase(job=job, phase=phase, **sections)
