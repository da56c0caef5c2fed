"""The curate phase: embed -> deduplicate -> drop what is near the exclude sets -> retrieve -> balance -> write.

    dinoray curate JOB [--set phases.curate.dedup.threshold=0.7] [--phase curate]

A pipeline phase `kind: curate` (its settings under `curate:`, typed in pipeline/schema.py CurateCfg) or
a job of its own. Its output, `{storage}/{name}/{phase}/shards/`, is ordinary shards with an index.json:
a later phase trains on it with `data.train: phase:NAME` (resolved in pipeline/config.py).

Resume: embeddings are committed per shard; every later stage writes one file under `stages/` when it
finishes (with the hash of the settings it used); output shards are committed one by one. A rerun
skips what is finished, so a crash costs at most one shard of embedding or one stage.

`run_curate(job, phase, layout, log) -> dict` is the controller's runner for kind "curate".
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys

import numpy as np

from orchestrator import storage
from orchestrator.curate import dedup, embed, retrieve
from orchestrator.layout import PhaseDir, RunLayout
from orchestrator.pipeline import config
from orchestrator.storage import Store

STAGES = ("embed", "dedup", "exclude", "retrieve", "balance", "write")


# --------------------------------------------------------------------------- inputs
def _weights(job, layout: RunLayout, cfg) -> Store:
    """The embedder's weights: `phase:NAME` is that phase's final/ folder."""
    name = config.phase_ref(cfg.weights)
    if name is not None:
        return layout.phase(name).final
    return Store(cfg.weights, job.storage_options)


def _descriptor(emb_cfg) -> dict | None:
    """The copy-descriptor settings of a `role: copy` embedder (curate/copydesc.py); None for CLS."""
    if emb_cfg.role != "copy":
        return None
    return {k: getattr(emb_cfg, k) for k in ("copy_grid", "crop_scales", "crop_grid", "crop_flip")}


def _views(emb_cfg) -> int:
    """Descriptors per image in the embeddings of this embedder (1 for CLS)."""
    from orchestrator.curate import copydesc
    return copydesc.n_views(emb_cfg) if emb_cfg.role == "copy" else 1


def _role(weights: Store, size: int, descriptor: dict | None = None) -> str:
    """Embedding folder name of one embedder: the same weights, size and descriptor share embeddings."""
    extra = "" if descriptor is None else "\0" + json.dumps(descriptor, sort_keys=True)
    return "emb-" + hashlib.sha256(f"{weights.url}\0{size}{extra}".encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- stage files
def _save(target: Store, arrays: dict, config: str) -> None:
    buf = io.BytesIO()
    np.savez(buf, config=np.array(config), **arrays)
    target.write_bytes(buf.getvalue())


def _load(target: Store, config: str) -> dict | None:
    """A finished stage's arrays, or None when it has not finished with these settings."""
    if not target.exists():
        return None
    data = dict(np.load(io.BytesIO(target.read_bytes()), allow_pickle=False))
    return data if str(data.pop("config")) == config else None


class _Progress:
    """Stage log lines and the Prometheus series of one curate phase."""

    def __init__(self, run: str, phase: str, log):
        from orchestrator import metrics
        self.labels, self.log = {"run": run, "phase": phase}, log
        self.series = metrics._Series("auto")

    def stage(self, name: str) -> None:
        self.log(f"[curate] stage {name} ({STAGES.index(name) + 1}/{len(STAGES)})")
        for stage in STAGES:
            self.series.set("dinoray_curate_stage", {**self.labels, "stage": stage}, float(stage == name))

    def images(self, stage: str, n: int) -> None:
        self.series.set("dinoray_curate_images", {**self.labels, "stage": stage}, n)

    def rate(self, set_name: str):
        return lambda rate, _n: self.series.set("dinoray_curate_images_per_second",
                                                {**self.labels, "set": set_name}, rate)

    def duplicates(self, kind: str, n: int) -> None:
        self.series.set("dinoray_curate_duplicates", {**self.labels, "kind": kind}, n)

    def cluster_sizes(self, assign: np.ndarray) -> None:
        for size in np.bincount(assign).tolist():
            self.series.observe("dinoray_curate_cluster_size", self.labels, size)

    def close(self) -> None:
        self.series.close()


# --------------------------------------------------------------------------- stages
def _embed_all(job, phase, layout: RunLayout, progress: _Progress) -> dict:
    """Embed every input set each later stage needs; -> {"copy": {set: Store}, "ret": {...}, "sets": {...}}."""
    cfg, pdir = phase.curate, layout.phase(phase.name)
    copy_cfg = cfg.copy_embedder if cfg.copy_embedder.weights else cfg.embedder
    sets = {"pool": Store(cfg.pool, job.storage_options)}
    sets.update({f"exclude-{i}": Store(url, job.storage_options) for i, url in enumerate(cfg.exclude)})
    sets.update({f"seed-{s.name}": Store(s.url, job.storage_options) for s in cfg.retrieve.seeds})
    needs = {"copy": ["pool"] + [n for n in sets if n.startswith("exclude-")] if (cfg.dedup.enabled or cfg.exclude)
             else [],
             "ret": ["pool"] + [n for n in sets if n.startswith("seed-")]
             if (cfg.retrieve.seeds or cfg.balance.target) else []}
    if not needs["copy"] and not needs["ret"]:
        needs["copy"] = ["pool"]  # nothing to compare: still embed the pool (its keys and decodability)
    out = {"sets": sets}
    for role, emb_cfg in (("copy", copy_cfg), ("ret", cfg.embedder)):
        weights = _weights(job, layout, emb_cfg)
        size = embed.check_embedder(weights, emb_cfg.image_size)
        descriptor = _descriptor(emb_cfg)
        folders = {n: pdir.curate_embeddings(_role(weights, size, descriptor), n) for n in needs[role]}
        for name in needs[role]:
            embed.embed_set(sets[name], folders[name], weights, size, batch_size=emb_cfg.batch_size,
                            concurrency=cfg.actors, use_gpu=job.use_gpu, log=progress.log,
                            on_rate=progress.rate(name), shard_sleep_s=job.debug.step_sleep_s, descriptor=descriptor)
        out[role] = folders
    return out


def _dedup_stages(cfg, pool: dict, excludes: list[np.ndarray], stages: dict, progress: _Progress) -> dict:
    """Self-dedup then relative dedup, each resumed from its stage file; -> {"keep_dedup", "keep"}."""
    ok = pool["ok"]
    views = _views(cfg.copy_embedder if cfg.copy_embedder.weights else cfg.embedder)
    done = stages["load"]("dedup")
    if done is None:
        progress.stage("dedup")
        if cfg.dedup.enabled:
            res = dedup.self_dedup(pool["emb"], ok, cfg.dedup, cfg.search, cfg.seed, views=views)
            progress.log(f"[curate] dedup ({res['index']['index']}): {res['duplicates']} copies in "
                         f"{int(ok.sum())} images, {int(res['keep'].sum())} kept")
            done = {"keep": res["keep"], "component": res["component"]}
        else:
            done = {"keep": ok.copy(), "component": np.arange(len(ok))}
        stages["save"]("dedup", done)
    progress.duplicates("self", int(ok.sum() - done["keep"].sum()))
    after = stages["load"]("exclude")
    if after is None:
        progress.stage("exclude")
        ex = np.concatenate(excludes) if excludes else np.zeros((0, pool["emb"].shape[1]), np.float32)
        res = dedup.relative_dedup(pool["emb"], done["component"], done["keep"], ex,
                                   cfg.dedup, cfg.search, cfg.seed, views=views, ok=ok)
        progress.log(f"[curate] exclude: {res['hits']} pool images near {len(ex)} exclude images, "
                     f"{res['dropped_components']} components dropped, {int(res['keep'].sum())} kept")
        after = {"keep": res["keep"]}
        stages["save"]("exclude", after)
    progress.duplicates("exclude", int(done["keep"].sum() - after["keep"].sum()))
    return {"keep_dedup": done["keep"], "keep": after["keep"]}


def _retrieve_stage(cfg, pool_ret: dict | None, candidates: np.ndarray, seeds: dict, stages: dict,
                    progress: _Progress) -> dict[int, dict]:
    """{pool index: why kept}; every candidate ({} reasons) when there are no seed sets."""
    done = stages["load"]("retrieve")
    if done is not None:
        return json.loads(str(done["reasons"]))
    progress.stage("retrieve")
    if not cfg.retrieve.seeds:
        reasons = {str(i): {} for i in candidates.tolist()}
    else:
        found, stats = retrieve.retrieve(pool_ret["emb"], candidates, seeds, _RetrieveView(cfg), cfg.seed,
                                         log=progress.log)
        if stats["kmeans"] is not None:
            progress.cluster_sizes(stats["kmeans"][1])
        reasons = {str(i): why for i, why in sorted(found.items())}
    stages["save"]("retrieve", {"reasons": np.array(json.dumps(reasons))})
    return reasons


class _RetrieveView:
    """What retrieve.retrieve reads: the seed specs, k-means settings and the search settings."""

    def __init__(self, cfg):
        self.seeds, self.n_clusters = cfg.retrieve.seeds, cfg.retrieve.n_clusters
        self.kmeans_iters, self.search = cfg.retrieve.kmeans_iters, cfg.search


def _preflight(job, phase, layout: RunLayout) -> None:
    """Refuse a bad embedder size or an empty / missing input set before Ray starts."""
    cfg = phase.curate
    for emb_cfg in (cfg.embedder, cfg.copy_embedder):
        if emb_cfg.weights:
            embed.check_embedder(_weights(job, layout, emb_cfg), emb_cfg.image_size)
    for url in [cfg.pool, *cfg.exclude, *(s.url for s in cfg.retrieve.seeds)]:
        embed.shard_list(Store(url, job.storage_options))


def _items(pool: dict, reasons: dict[str, dict], selected: np.ndarray) -> list[dict]:
    """Output items in pool order, new keys 000000000..."""
    return [{"key": f"{j:09d}", "shard": str(pool["shard"][i]), "pos": int(pool["pos"][i]),
             "source_key": str(pool["key"][i]), "why": reasons.get(str(i), {})}
            for j, i in enumerate(selected.tolist())]


def run_curate(job, phase, layout: RunLayout, log=print) -> dict:
    """Run (or resume) curate phase `phase` of `job`; -> {"metrics": {"counts": ..., "shards": URL}}."""
    cfg, pdir = phase.curate, layout.phase(phase.name)
    _preflight(job, phase, layout)
    from orchestrator.pipeline.controller import connect_ray  # the pipeline's one way to start Ray
    ray = connect_ray(job)
    progress = _Progress(job.name, phase.name, log)
    settings_hash = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:16]
    stages = {"load": lambda s: _load(pdir.curate_stage(s, "npz"), settings_hash),
              "save": lambda s, arrays: _save(pdir.curate_stage(s, "npz"), arrays, settings_hash)}
    try:
        progress.stage("embed")
        emb = _embed_all(job, phase, layout, progress)
        sets = emb["sets"]
        pool = embed.load_set(sets["pool"], (emb["copy"] or emb["ret"])["pool"])
        if emb["copy"]:
            excludes = [embed.load_set(sets[n], f)["emb"] for n, f in emb["copy"].items() if n != "pool"]
        else:
            excludes = []
        kept = _dedup_stages(cfg, pool, excludes, stages, progress)
        pool_ret = embed.load_set(sets["pool"], emb["ret"]["pool"]) if emb["ret"] else None
        seeds = {n[len("seed-"):]: embed.load_set(sets[n], f)["emb"] for n, f in emb["ret"].items() if n != "pool"}
        candidates = np.nonzero(kept["keep"])[0]
        reasons = _retrieve_stage(cfg, pool_ret, candidates, seeds, stages, progress)
        selected = np.array(sorted(int(i) for i in reasons), dtype=np.int64)
        selected = _balance_stage(cfg, pool_ret, selected, stages, progress)
        counts = {"pool": int(len(pool["ok"])), "decoded": int(pool["ok"].sum()),
                  "after_dedup": int(kept["keep_dedup"].sum()), "after_exclude": int(kept["keep"].sum()),
                  "retrieved": len(reasons), "final": int(len(selected))}
        for stage, n in counts.items():
            progress.images(stage, n)
        progress.log("[curate] counts: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if not len(selected):
            raise ValueError(f"{job.source}: phases.{phase.name}: curation kept no image ({counts}); lower "
                             "curate.dedup.threshold or add seed sets / raise retrieve k")
        progress.stage("write")
        task = ray.remote(num_cpus=1)(_write_task)
        index = _write(sets["pool"], pdir, pool, reasons, selected, cfg, counts, phase,
                       lambda fn, arglist: ray.get([task.remote(fn, *a) for a in arglist]), log)
    finally:
        progress.close()
    return {"metrics": {"counts": counts, "shards": pdir.curate_shards.url, "n_shards": len(index["shards"])}}


def _write_task(fn, *args):
    return fn(*args)


def _write(source: Store, pdir: PhaseDir, pool: dict, reasons: dict, selected: np.ndarray, cfg, counts: dict,
           phase, map_fn, log) -> dict:
    from orchestrator.curate import write
    from orchestrator.data import index as shard_index
    pool_index, folder = shard_index.read_index(source)
    curation = {"phase": phase.name, "counts": counts, "settings": storage.redact(dataclasses.asdict(cfg))}
    return write.write_selection(folder, pdir.curate_shards, _items(pool, reasons, selected),
                                 classes=pool_index.get("classes", []), samples_per_shard=cfg.samples_per_shard,
                                 curation=curation, map_fn=map_fn, log=log)


def _balance_stage(cfg, pool_ret: dict | None, selected: np.ndarray, stages: dict, progress: _Progress) -> np.ndarray:
    """The selection after balancing (unchanged when balance.target is 0 or already met)."""
    if not cfg.balance.target or len(selected) <= cfg.balance.target:
        return selected
    done = stages["load"]("balance")
    if done is not None:
        return done["selected"]
    progress.stage("balance")
    from orchestrator.curate import balance
    out = balance.balance(pool_ret["emb"][selected], cfg.balance, cfg.retrieve.kmeans_iters, cfg.seed)
    progress.log(f"[curate] balance: {len(selected)} -> {len(out)} images over {cfg.balance.levels} clusters")
    result = selected[np.sort(out)]
    stages["save"]("balance", {"selected": result})
    return result


# --------------------------------------------------------------------------- CLI
def cmd_curate(args) -> int:
    """`dinoray curate JOB [--set k=v ...] [--phase NAME]`: run (or resume) one curate phase on Ray."""
    from orchestrator.pipeline import config
    try:
        job = config.load_job(args.job, getattr(args, "set", None) or [])
        names = [p.name for p in job.phases if p.kind == "curate"]
        name = args.phase or (names[0] if len(names) == 1 else None)
        if name not in names:
            raise config.ConfigError(f"{args.job}: name the curate phase with --phase (curate phases: {names})")
        res = run_curate(job, job.phase(name), RunLayout.of(job), log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {storage.redact(str(e))}", file=sys.stderr)
        return 2
    print(json.dumps(res["metrics"]))
    return 0
