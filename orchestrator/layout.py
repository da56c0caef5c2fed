"""Every path a run writes, named in one place.

    {storage}/{name}/                       RunLayout(storage, name).root
        pipeline.json  LOCK                 phase states; the driver's lock
        report/  exports/  logs/            run report; exported weights; Ray and worker logs
            logs/{phase}/rank<r>.log  logs/ray/   a worker's output; a local run's Ray session logs
        eval-baselines/{key}.json           eval yardsticks (random-init backbone, raw pixels), cached per arch+size
        {phase}/  or  {phase}-{arch}/       PhaseDir: one per phase (one per distill student), which is
                                            also the folder of its Ray Train run (Ray's own state files)
            checkpoints/step-0000100/       sharded checkpoint; COMMITTED written last; registered with Ray
            final/model.pth  backbone.pth  DONE
            metrics.jsonl  metrics.live.jsonl  trace/rank<r>.jsonl  FAILED  debug/
                                            (metrics.live.jsonl: its tail, on object storage)
            restarts.json  PREEMPTED        restart counts by reason; a drain's just-in-time checkpoint step
            embeddings/{role}/{set}/shard-NNNNNN.npy + .keys.json     curate: per-shard fp16 embeddings
            stages/{stage}.json|.npy  shards/                           curate: finished stages; output shards

Words: a *run* is the job's root folder; a *phase folder* is one phase's (or one student's)
folder under it; a *Ray Train run* is one `TorchTrainer.fit()`: `ray_run(key)` gives its storage and name,
which make its folder the phase folder, so that Ray sees (and retains) the phase's checkpoints.
Nothing else in the package spells these names; tests/test_layout.py checks that.

No entrypoint; used by the controller, the training driver and workers, eval, export and report.
"""
from __future__ import annotations

import re

from orchestrator.storage import Store

CHECKPOINT_TAG = "step-{:07d}"
PHASE_REF = "phase:"  # a data URL `phase:NAME`: the shards phase NAME of the same job writes
LOGS = "logs"               # {run}/logs/: Ray's and the workers' output
_CHECKPOINT_RE = re.compile(r"^step-(\d{7,})$")


def phase_keys(phase) -> list[str]:
    """The phase folders a phase writes: one per distillation student, else the phase's name."""
    if phase.kind == "distill":
        return [f"{phase.name}-{arch}" for arch in phase.students]
    return [phase.name]


def phase_key(phase, student_arch: str | None = None) -> str:
    return f"{phase.name}-{student_arch}" if student_arch else phase.name


class PhaseDir:
    """The folder of one phase (or one distillation student) of a run."""

    def __init__(self, root: Store):
        self.root = root
        self.key = root.name

    checkpoints_rel = "checkpoints"
    checkpoints = property(lambda self: self.root / self.checkpoints_rel)
    final = property(lambda self: self.root / "final")
    final_model = property(lambda self: self.root / "final" / "model.pth")
    final_backbone = property(lambda self: self.backbone_in(self.final))

    @staticmethod
    def backbone_in(final: Store) -> Store:
        """The backbone file inside a phase's final/ folder (given as the folder itself)."""
        return final / "backbone.pth"
    final_done = property(lambda self: self.root / "final" / "DONE")
    failed = property(lambda self: self.root / "FAILED")
    restarts = property(lambda self: self.root / "restarts.json")
    ray_snapshot = property(lambda self: self.root / "checkpoint_manager_snapshot.json")  # Ray Train's own
    preempted = property(lambda self: self.root / "PREEMPTED")
    metrics_rel = "metrics.jsonl"
    metrics = property(lambda self: self.root / self.metrics_rel)
    # object storage only: the last records of metrics.jsonl, uploaded every metrics.live_every_s seconds
    # (metrics.jsonl itself goes up with each checkpoint commit)
    metrics_live = property(lambda self: self.root / "metrics.live.jsonl")

    @staticmethod
    def trace_rel(rank: int) -> str:
        return f"trace/rank{rank}.jsonl"

    def worker_log(self, rank: int) -> Store:
        """This phase's rank-`rank` worker output (stdout, stderr, warnings): {run}/logs/{key}/rank<r>.log."""
        return self.root.parent / LOGS / self.key / f"rank{rank}.log"

    def debug_marker(self, name: str) -> Store:
        return self.root / "debug" / name

    # ---------------------------------------------------------------- checkpoints
    @staticmethod
    def checkpoint_tag(step: int) -> str:
        return CHECKPOINT_TAG.format(step)

    def checkpoint(self, step: int) -> Store:
        return self.checkpoints / self.checkpoint_tag(step)

    @staticmethod
    def committed(ckpt: Store) -> Store:
        """The marker that makes a checkpoint count; written last."""
        return ckpt / "COMMITTED"

    @staticmethod
    def rank_extras(ckpt: Store, rank: int) -> Store:
        return ckpt / f"rank-{rank}.pt"

    @staticmethod
    def teacher_fp32_name(rank: int) -> str:
        return f"teacher_fp32-rank{rank}.pt"

    def committed_steps(self) -> list[int]:
        """Steps of the committed checkpoints (COMMITTED written), ascending; no torch needed."""
        steps = [(self.parse_step(name), name) for name in self.checkpoints.ls()]
        return sorted(s for s, name in steps if s is not None and self.committed(self.checkpoints / name).exists())

    # ---------------------------------------------------------------- curation (orchestrator/curate)
    curate_shards = property(lambda self: self.root / "shards")     # the curated WebDataset shards
    curate_stages = property(lambda self: self.root / "stages")     # one finished-stage file per stage

    def curate_embeddings(self, role: str, set_name: str) -> Store:
        """Per-shard embeddings of one input set (pool / exclude / seed) under one embedder role."""
        return self.root / "embeddings" / role / set_name

    @staticmethod
    def embedding_files(folder: Store, shard: str) -> tuple[Store, Store]:
        """(fp16 .npy, keys .json) of one embedded shard; the keys file is written last (the commit)."""
        stem = shard.rsplit(".", 1)[0]
        return folder / f"{stem}.npy", folder / f"{stem}.keys.json"

    def curate_stage(self, stage: str, ext: str = "json") -> Store:
        return self.curate_stages / f"{stage}.{ext}"

    @staticmethod
    def parse_step(name: str) -> int | None:
        m = _CHECKPOINT_RE.match(name.rstrip("/").rsplit("/", 1)[-1])
        return int(m.group(1)) if m else None


class RunLayout:
    """The folders and files of one run: `RunLayout(Store(job.storage, job.storage_options), job.name)`."""

    def __init__(self, storage: Store, name: str):
        self.storage, self.name = storage, name
        self.root = storage / name

    @classmethod
    def of(cls, job) -> "RunLayout":
        return cls(Store(job.storage, job.storage_options), job.name)

    pipeline = property(lambda self: self.root / "pipeline.json")
    lock = property(lambda self: self.root / "LOCK")
    report = property(lambda self: self.root / "report")
    exports = property(lambda self: self.root / "exports")
    logs = property(lambda self: self.root / LOGS)
    ray_logs = property(lambda self: self.root / LOGS / "ray")    # a local run's Ray session logs

    def phase(self, key: str) -> PhaseDir:
        return PhaseDir(self.root / key)

    def phase_dirs(self, phase) -> dict[str, PhaseDir]:
        return {key: self.phase(key) for key in phase_keys(phase)}

    def export_file(self, key: str, ext: str) -> Store:
        return self.exports / f"{key}.{ext}"

    def eval_baseline(self, key: str) -> Store:
        """A cached eval yardstick result (orchestrator/eval/baselines.py names the key)."""
        return self.root / "eval-baselines" / f"{key}.json"

    def ray_run(self, key: str) -> tuple[Store, str]:
        """(storage, name) of phase folder `key`'s Ray Train run: its run folder is the phase folder."""
        return self.root, key
