"""Validation of a whole job spec: impossible values are refused before any Ray resource is taken,
with a message that names the file and the key and says how to fix it.

    dinoray validate jobs/smoke_cpu.yaml
"""
from __future__ import annotations

import difflib
import math

from model.schedules import scaled_lr  # the one lr scaling rule
from orchestrator.pipeline.schema import TRAINING_KINDS, JobSpec, PhaseSpec, ResolvedPhase, fail, resolve

# storage_options keys that would hold credentials (they come from the environment or a Secret)
_FORBIDDEN_KEYS = ("key", "secret", "token", "password", "credential")


def validate(job: JobSpec) -> None:
    """Refuse impossible values before any Ray resource is taken."""
    _check_job(job)
    seen: dict[str, int] = {}
    for i, phase in enumerate(job.phases):
        _check_order(job, i, phase, seen)
        seen[phase.name] = i
        _check_phase(job, i, phase)
        _check_curate(job, i, phase, seen)
        rp = resolve(job, phase)
        _check_crops(rp, f"phases[{i}]")
        _check_optim(rp, f"phases[{i}]")
        _check_eval(rp, f"phases[{i}]")
        _check_losses(rp, f"phases[{i}]")


def _key(phase: PhaseSpec, where: str, section: str, key: str) -> str:
    """The path to name in a message: the phase's override if it sets the key, else the job's section."""
    return f"{where}.{section}.{key}" if key in getattr(phase, section) else f"{section}.{key}"


def _check_job(job: JobSpec) -> None:
    src = job.source
    if not job.storage.strip():
        fail(src, "storage", "missing storage root; set a local path or an s3:// / gs:// URL")
    low, high = job.workers_range
    if low < 1 or high < low:
        fail(src, "num_workers", f"must be >= 1, or [min, max] with 1 <= min <= max; got {job.num_workers}")
    if job.elastic and job.backend == "deepspeed":
        fail(src, "num_workers", f"an elastic range {list(job.workers_range)} needs backend fsdp2 or ddp: DeepSpeed "
             f"checkpoints load only at the world size that wrote them; use a fixed num_workers or backend: fsdp2")
    if job.fsdp.cudagraphs:
        why = None
        if not job.fsdp.compile:
            why = "needs fsdp.compile: true (the graphs are the compiled blocks')"
        elif job.backend != "ddp":
            why = (f"needs backend ddp: {job.backend} gathers each block's parameters into new memory every "
                   "step, which a replayed CUDA graph cannot follow; set backend: ddp or fsdp.cudagraphs: false")
        elif job.elastic:
            why = ("needs a fixed num_workers: a shrunk elastic world accumulates micro-batches, and the graphs "
                   "reuse the memory that holds the first micro-batch's gradients")
        if why:
            fail(src, "fsdp.cudagraphs", why)
    if not job.fsdp.reshard_after_forward and job.backend != "fsdp2":
        fail(src, "fsdp.reshard_after_forward", f"applies to backend fsdp2 only (this job: {job.backend}); drop it")
    for key in job.storage_options:
        if any(word in key.lower() for word in _FORBIDDEN_KEYS):
            fail(src, f"storage_options.{key}", "credentials must not be in job files; "
                 "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment or a Kubernetes Secret")
    every = job.checkpoint.every_steps
    if (every != "auto" and every < 1) or job.checkpoint.keep_last < 1:
        fail(src, "checkpoint", f"every_steps must be >= 1 or auto, and keep_last >= 1; got {every}, "
             f"{job.checkpoint.keep_last}")
    if not job.failure.mtbf_hours > 0:
        fail(src, "failure.mtbf_hours", f"must be > 0 (expected hours between interruptions), got "
             f"{job.failure.mtbf_hours}")
    if job.failure.health_check_s < 0:
        fail(src, "failure.health_check_s", f"must be >= 0 seconds (0: chosen from the workers), got "
             f"{job.failure.health_check_s}")


def _check_order(job: JobSpec, i: int, phase: PhaseSpec, seen: dict[str, int]) -> None:
    where = f"phases[{i}]"
    if phase.name in seen:
        fail(job.source, f"{where}.name", f"phase name '{phase.name}' is used twice")
    if phase.from_phase is not None and phase.from_phase not in seen:
        later = [p.name for p in job.phases[i:]]
        why = "comes later" if phase.from_phase in later else "is not a phase of this job"
        close = difflib.get_close_matches(phase.from_phase, list(seen), 1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; earlier phases: {list(seen)}"
        fail(job.source, f"{where}.from_phase", f"depends on '{phase.from_phase}', which {why}{hint}")


def _check_phase(job: JobSpec, i: int, phase: PhaseSpec) -> None:
    src, where = job.source, f"phases[{i}]"
    if phase.kind in ("highres", "distill", "eval", "export") and phase.from_phase is None:
        fail(src, f"{where}.from_phase", f"a {phase.kind} phase needs from_phase: the phase whose weights it uses")
    if phase.kind in TRAINING_KINDS and phase.steps < 1:
        fail(src, f"{where}.steps", f"a {phase.kind} phase needs steps >= 1")
    if phase.kind == "distill" and not phase.students:
        fail(src, f"{where}.students", "list at least one student arch, e.g. [vit_small]")
    if phase.kind in TRAINING_KINDS and not job.data.train:
        fail(src, "data.train", "training phases need the URL of the training shards (index.json's folder)")
    if phase.kind == "eval" and not (job.data.eval_train and job.data.eval_test):
        fail(src, "data.eval_train", "an eval phase needs data.eval_train and data.eval_test (labelled shards)")


def _check_crops(rp: ResolvedPhase, where: str) -> None:
    src, phase, patch = rp.job.source, rp.phase, rp.model.patch_size
    for key in ("global_size", "local_size"):
        size = getattr(rp.crops, key)
        if size <= 0 or size % patch:
            fix = max(patch, round(size / patch) * patch)
            fail(src, _key(phase, where, "crops", key), f"{size} is not a multiple of model.patch_size={patch}; use {fix}")
    if rp.eval.image_size % patch:
        fail(src, _key(phase, where, "eval", "image_size"),
             f"{rp.eval.image_size} is not a multiple of model.patch_size={patch}")
    if phase.kind in TRAINING_KINDS and rp.crops.n_global != 2:
        fail(src, _key(phase, where, "crops", "n_global"), "the DINO loss pairs exactly 2 global crops; set 2")
    for key in ("global_scale", "local_scale"):
        lo, hi = getattr(rp.crops, key)
        if not 0 < lo <= hi <= 1:
            fail(src, _key(phase, where, "crops", key), f"({lo}, {hi}) must satisfy 0 < min <= max <= 1")


def _check_eval(rp: ResolvedPhase, where: str) -> None:
    """The eval settings a phase of kind eval uses (orchestrator/eval/, docs/eval.md)."""
    src, phase, ev = rp.job.source, rp.phase, rp.eval
    if phase.kind != "eval":
        return
    if not ev.methods:
        fail(src, _key(phase, where, "eval", "methods"), "list at least one of knn, linear, retrieval")
    if "linear" in ev.methods and (ev.linear_epochs < 1 or not ev.linear_lrs or min(ev.linear_lrs) <= 0):
        fail(src, _key(phase, where, "eval", "linear_epochs"),
             f"the linear probe needs linear_epochs >= 1 (got {ev.linear_epochs}) and positive linear_lrs "
             f"(got {ev.linear_lrs})")
    if "retrieval" in ev.methods and (ev.retrieval_queries < 1 or ev.retrieval_copies < 1
                                      or ev.retrieval_distractors < 0):
        fail(src, _key(phase, where, "eval", "retrieval_queries"),
             f"retrieval needs retrieval_queries >= 1, retrieval_copies >= 1 and retrieval_distractors >= 0 "
             f"(got {ev.retrieval_queries}, {ev.retrieval_copies}, {ev.retrieval_distractors})")


def _check_optim(rp: ResolvedPhase, where: str) -> None:
    src, phase, optim, job = rp.job.source, rp.phase, rp.optim, rp.job
    low, high = job.workers_range
    bad = [w for w in range(low, high + 1) if job.accumulation(optim.batch_size, w) is None]
    if bad:
        step = math.lcm(*(w * -(-high // w) for w in range(low, high + 1)))  # splits at every count
        fix = max(step, round(optim.batch_size / step) * step)
        workers = list(job.workers_range) if job.elastic else high
        counts = ", ".join(map(str, bad[:6])) + (f", ... {bad[-1]} ({len(bad)} counts)" if len(bad) > 6 else "")
        example = f", e.g. {fix}," if fix <= 1000 * optim.batch_size else ""  # a wide range's multiple is absurd
        fail(src, _key(phase, where, "optim", "batch_size"),
             f"{optim.batch_size} images cannot be split evenly over {counts} workers (num_workers: {workers}); "
             f"use a batch_size that every allowed worker count splits{example} or a num_workers range whose "
             f"counts divide {optim.batch_size}")
    if phase.kind not in TRAINING_KINDS:
        return
    for key in ("warmup_iters", "teacher_temp_warmup_iters", "freeze_last_layer_iters"):
        if getattr(optim, key) >= phase.steps and getattr(optim, key) > 0:
            fail(src, _key(phase, where, "optim", key),
                 f"{getattr(optim, key)} is not shorter than the phase's {phase.steps} steps; "
                 f"lower it (e.g. --set phases.{phase.name}.optim.{key}=0)")
    peak = scaled_lr(optim.base_lr, optim.batch_size)
    if optim.min_lr > peak:
        fail(src, _key(phase, where, "optim", "min_lr"),
             f"{optim.min_lr} is above the phase's peak lr {peak:.3g} (base_lr {optim.base_lr} x "
             f"sqrt({optim.batch_size}/1024)): the cosine would climb; lower it")


def _check_losses(rp: ResolvedPhase, where: str) -> None:
    src, phase, model = rp.job.source, rp.phase, rp.model
    if phase.kind in ("pretrain", "highres") and model.feature_loss_weight:
        fail(src, _key(phase, where, "model", "feature_loss_weight"),
             f"a {phase.kind} phase has no teacher features to regress; "
             "set it only in a distill phase (phases.NAME.model.feature_loss_weight)")
    if phase.kind == "distill" and not (model.dino_loss_weight or model.ibot_loss_weight
                                        or model.feature_loss_weight):
        fail(src, f"{where}.model", "dino_loss_weight, ibot_loss_weight and feature_loss_weight are all 0: "
             "nothing to distil; set one of them above 0")


def _check_curate(job: JobSpec, i: int, phase: PhaseSpec, seen: dict[str, int]) -> None:
    """A curate phase's settings (orchestrator/curate, docs/curation.md); refused on other kinds."""
    src, where, cur = job.source, f"phases[{i}]", phase.curate
    if phase.kind != "curate":
        if cur is not None:
            fail(src, f"{where}.curate", f"only a curate phase takes curate settings (this one is {phase.kind})")
        return
    if cur is None or not cur.pool:
        fail(src, f"{where}.curate.pool", "a curate phase needs curate.pool: the shard folder of the images to curate")
    for key in ("embedder", "copy_embedder"):
        weights = getattr(cur, key).weights
        if key == "embedder" and not weights:
            fail(src, f"{where}.curate.embedder.weights", "name the embedder: phase:NAME (an earlier phase's "
                 "final/) or the URL of an exported dinov2-named backbone")
        if weights.startswith("phase:") and weights[len("phase:"):] not in seen:
            fail(src, f"{where}.curate.{key}.weights", f"'{weights}' names no earlier phase (earlier: {list(seen)})")
    if cur.embedder.role == "copy":
        fail(src, f"{where}.curate.embedder.role", "the retrieval embedder's role is 'retrieval'; give the copy "
             "descriptor as copy_embedder: {weights: ..., role: copy}")
    if cur.copy_embedder.role == "copy" and not cur.copy_embedder.weights:
        fail(src, f"{where}.curate.copy_embedder.weights", "role: copy needs its own weights (a copy-detection "
             "backbone, e.g. the embedder fine-tuned by orchestrator/curate/copydesc.finetune)")
    emb = cur.copy_embedder
    if emb.copy_grid < 1 or emb.crop_grid < 1 or not all(0 < s <= 1 for s in emb.crop_scales):
        fail(src, f"{where}.curate.copy_embedder", "copy_grid and crop_grid must be >= 1 and crop_scales in (0, 1]")
    for key in ("threshold", "exclude_threshold"):
        value = getattr(cur.dedup, key)
        if not 0 < value <= 1:
            fail(src, f"{where}.curate.dedup.{key}", f"{value} is outside (0, 1]: it is a cosine similarity")
    lo, hi = cur.actors
    if cur.dedup.k < 1 or cur.samples_per_shard < 1 or not 1 <= lo <= hi:
        fail(src, f"{where}.curate", "dedup.k and samples_per_shard must be >= 1, actors (min, max) with 1 <= min <= max")
    names: set[str] = set()
    for j, seed_set in enumerate(cur.retrieve.seeds):
        at = f"{where}.curate.retrieve.seeds[{j}]"
        if not seed_set.name or seed_set.name in names:
            fail(src, f"{at}.name", "every seed set needs its own name: index.json records which set kept each "
                 f"image (got {seed_set.name!r}; names so far {sorted(names)})")
        names.add(seed_set.name)
        if not seed_set.url:
            fail(src, f"{at}.url", "give the shard folder (index.json) of the seed images")
        for key in ("k", "per_cluster", "min_seed_hits"):
            if getattr(seed_set, key) < 1:
                fail(src, f"{at}.{key}", f"must be >= 1, got {getattr(seed_set, key)}")
    if cur.balance.target < 0 or any(k < 1 for k in cur.balance.levels) or not cur.balance.levels:
        fail(src, f"{where}.curate.balance", "target must be >= 0 and levels a non-empty list of cluster counts >= 1")
