"""The eval and export phases of a pipeline: `run_eval(job, phase, layout, log)` and
`run_export(job, phase, layout, log)`, called by the controller (`dinoray run JOB`).

An eval phase evaluates every backbone its `from_phase` wrote (one per distill student) with the
methods of `eval.methods` ("knn", "linear", "retrieval"; features in parallel Ray tasks, one per
worker), then the same methods on a random-init backbone of the same arch and (k-NN, retrieval) on raw
pixels, cached per arch and size (orchestrator/eval/baselines.py). Result per backbone key:

    {"top1": {k: acc},                                  k-NN (what report/status read), when "knn" ran
     "knn": {...}, "linear": {...}, "retrieval": {...}, each method's full result
     "baselines": {"random_init": {method: result}, "pixels": {"knn": {...}, "retrieval": {...}}},
     "image_size": int, "seconds": float}
"""
from __future__ import annotations

import time

import torch.nn.functional as F

from orchestrator.eval import baselines, features, knn, linear, retrieval

METHODS = ("knn", "linear", "retrieval")


def eval_settings(ev, data, image_size: int) -> dict:
    """Every setting an eval result depends on besides the weights (also the yardsticks' cache key)."""
    names = ("methods", "baselines", "linear_epochs", "linear_lrs", "retrieval_queries", "retrieval_copies",
             "retrieval_distractors")
    out = {name: getattr(ev, name) for name in names}
    unknown = sorted(set(out["methods"]) - set(METHODS))
    if unknown or not out["methods"]:
        raise ValueError(f"eval.methods: {unknown or 'empty'}; use one or more of {list(METHODS)}")
    out.update(ks=list(ev.ks), temperature=ev.temperature, image_size=image_size, batch_size=ev.batch_size,
               train=data.eval_train, test=data.eval_test, max_train_images=ev.max_train_images or None,
               max_test_images=ev.max_test_images or None)
    return out


def knn_kwargs(s: dict, storage_options, parallel: int) -> dict:
    return dict(ks=tuple(s["ks"]), temperature=s["temperature"], image_size=s["image_size"],
                train_limit=s["max_train_images"], test_limit=s["max_test_images"], batch_size=s["batch_size"],
                storage_options=storage_options, parallel=parallel)


def classify(weights, s: dict, storage_options, parallel: int, map_fn, log=print) -> dict:
    """{"knn": ..., "linear": ...} for the methods of s["methods"]. With "linear", the train split is
    embedded first (CLS of the last blocks + pooled patches), the head chosen, then the test split
    embedded; the k-NN reuses the last block's CLS of the same features."""
    common = dict(batch_size=s["batch_size"], storage_options=storage_options, parallel=parallel)
    size = s["image_size"]
    if "linear" not in s["methods"]:
        return {"knn": knn.knn_eval(weights, s["train"], s["test"], map_fn=map_fn,
                                    **knn_kwargs(s, storage_options, parallel))}
    common["map_fn"] = map_fn
    t0 = time.time()
    plans = features.labelled_plans({"train": s["train"], "test": s["test"]}, storage_options,
                                    {"train": s["max_train_images"], "test": s["max_test_images"]})
    kind = "blocks" if weights is not None else "pixels"
    train = features.embed_splits(weights, {"train": plans["train"]}, size, kind=kind, **common)["train"]
    seconds_train = time.time() - t0
    got = {}

    def embed_test():
        got["test"] = features.embed_splits(weights, {"test": plans["test"]}, size, kind=kind, **common)["test"]
        return got["test"]

    out = {"linear": {**linear.probe(train, embed_test, lrs=tuple(s["linear_lrs"]), epochs=s["linear_epochs"],
                                     urls=(s["train"], s["test"])),
                      "image_size": size, "seconds_train_features": round(seconds_train, 2),
                      "seconds": round(time.time() - t0, 2)}}
    if "knn" in s["methods"]:
        def last_cls(pair):  # the last block's CLS row, L2-normalised: the k-NN's feature
            return F.normalize(pair[0][:, -2], dim=-1), pair[1]
        out["knn"] = {**knn.knn_result(last_cls(train), last_cls(got["test"]), tuple(s["ks"]), s["temperature"]),
                      "image_size": size, "shared_features": True}
    return out


def evaluate(weights, s: dict, storage_options, parallel: int, map_fn, log=print, actor_options=None) -> dict:
    """{method: result} for a backbone (URL / state dict) or raw pixels (None: k-NN and retrieval only)."""
    return evaluate_many({"": (weights, s["methods"])}, s, storage_options, parallel, map_fn, log, actor_options)[""]


def evaluate_many(sources: dict, s: dict, storage_options, parallel: int, map_fn, log=print,
                  actor_options=None) -> dict[str, dict]:
    """{name: {method: result}} for {name: (weights, methods)}. On Ray (`actor_options`), the k-NN of every
    source without a linear probe runs in one pass over the images, the features kept on the workers
    (knn_dist.py); the other methods run source by source."""
    out = {name: {} for name in sources}
    sharded = [name for name, (_, methods) in sources.items() if "knn" in methods and "linear" not in methods]
    if actor_options is not None and sharded:
        from orchestrator.eval import knn_dist
        res = knn_dist.knn_eval_sharded_many({name: sources[name][0] for name in sharded}, s["train"], s["test"],
                                             actor_options=actor_options, **knn_kwargs(s, storage_options, parallel))
        for name in sharded:
            out[name]["knn"] = res[name]
    for name, (weights, methods) in sources.items():
        todo = [m for m in methods if m not in out[name]]
        if {"knn", "linear"} & set(todo):
            out[name].update(classify(weights, {**s, "methods": todo}, storage_options, parallel, map_fn, log))
        if "retrieval" in todo:
            out[name]["retrieval"] = retrieval.retrieval_eval(
                weights, s["test"], queries=s["retrieval_queries"], copies=s["retrieval_copies"],
                distractors=s["retrieval_distractors"], image_size=s["image_size"], batch_size=s["batch_size"],
                storage_options=storage_options, parallel=parallel, map_fn=map_fn)
    return out


def describe(key: str, res: dict) -> str:
    parts = []
    if "knn" in res:
        parts.append("k-NN " + ", ".join(f"k={k} {100 * v:.2f}%" for k, v in res["knn"]["top1"].items()))
    if "linear" in res:
        parts.append(f"linear {100 * res['linear']['top1']:.2f}%")
    if "retrieval" in res:
        parts.append(f"copy mAP {100 * res['retrieval']['map']:.2f}% R@1 {100 * res['retrieval']['recall_at_1']:.2f}%")
    return f"{key}: " + "; ".join(parts)


def ray_options(job) -> dict:
    """Resources of one eval task or actor: a worker's CPUs, and a GPU when the job uses GPUs."""
    return dict(num_cpus=job.cpus_per_worker, num_gpus=1 if job.use_gpu else 0)


def ray_map(job):
    """map_fn running each call as one Ray task."""
    import ray
    opts = ray_options(job)

    def run(fn, arglist):
        task = ray.remote(**opts)(fn)
        shared = {}  # a state dict goes into the object store once, not once per task

        def put(arg):
            return shared.setdefault(id(arg), ray.put(arg)) if isinstance(arg, dict) else arg
        return ray.get([task.remote(*[put(a) for a in args]) for args in arglist])
    return run


def run_eval(job, phase, layout, log=print) -> dict:
    """Evaluate every backbone `phase.from_phase` wrote; returns {"metrics": {key: result}} (module doc)."""
    from orchestrator.pipeline import config
    ev = config.resolve(job, phase).eval
    map_fn, actors, metrics = ray_map(job), ray_options(job), {}
    tasks = job.workers_range[0]  # an elastic job's minimum: what the cluster surely has
    for key, pdir in layout.phase_dirs(job.phase(phase.from_phase)).items():
        t0 = time.time()
        sd = features.load_state_dict(pdir.final_backbone)
        s = eval_settings(ev, job.data, ev.image_size or features.infer_arch(sd)["img_size"])
        log(f"[{phase.name}] {'+'.join(s['methods'])} of {key} ({tasks} tasks)")
        # the yardsticks not cached yet are evaluated with the backbone (one pass over the images for a k-NN)
        cached, todo = baselines.plan(sd, s, layout) if s["baselines"] else ({}, {})
        # the tasks read the weights themselves: no copy of a large backbone per task
        sources = {"": (pdir.final_backbone, s["methods"]), **{name: t[:2] for name, t in todo.items()}}
        got = evaluate_many(sources, s, job.storage_options, tasks, map_fn, log, actors)
        res = got.pop("")
        log(f"[{phase.name}] {describe(key, res)}")
        if s["baselines"]:
            for name, (_, _, store) in todo.items():
                store.write_json(got[name])
            found = {**cached, **got}
            res["baselines"] = {name: found[name] for name in baselines.KINDS if name in found}
            for name, base in res["baselines"].items():
                log(f"[{phase.name}]   yardstick {describe(name, base)}" + (" (cached)" if name in cached else ""))
        if "knn" in res:
            res["top1"] = res["knn"]["top1"]
        metrics[key] = {**res, "image_size": s["image_size"], "seconds": round(time.time() - t0, 2)}
    return {"metrics": metrics}


def run_export(job, phase, layout, log=print) -> dict:
    """Export every backbone `phase.from_phase` wrote to exports/{key}.{ext} in `phase.export_format`."""
    from orchestrator.eval import export
    files, details = {}, {}
    for key, pdir in layout.phase_dirs(job.phase(phase.from_phase)).items():
        sd = features.load_state_dict(pdir.final_backbone)
        dst = layout.export_file(key, export.EXTENSIONS[phase.export_format])
        details[key] = export.export_state_dict(sd, phase.export_format, dst)
        files[key] = details[key]["path"]
        log(f"[{phase.name}] {key} -> {files[key]}" + (f" ({details[key]['note']})" if details[key]["note"] else ""))
    return {"metrics": {"files": files, "exports": details}}

