"""`dinoray bench data`: multi-crop loader throughput on real shards, total and per CPU core.

    dinoray bench data URL [--seconds 20] [--workers 4] [--batch-size 32] [--config crops.yaml] [--json]

URL is a shard folder / index.json on any fsspec URL. By default the job defaults (CropsCfg: 2 x 224 + 8 x 98);
--config takes a YAML file with a `crops:` mapping (global_size, local_size, n_global, n_local,
global_scale, local_scale) and optionally `patch_size`, or a job spec (its `crops:` and model.patch_size).
With --json it prints one object with images_per_s and images_per_s_per_core (= images_per_s divided
by the CPU cores used: the DataLoader workers, or 1 with --workers 0).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from orchestrator import storage


def _crops_from_config(path: str | None) -> tuple[dict, int]:
    """(crops, patch_size): the job defaults (CropsCfg, ModelCfg), updated from the YAML at `path`."""
    import yaml

    from orchestrator.pipeline.schema import CropsCfg, ModelCfg

    crops, patch = dataclasses.asdict(CropsCfg()), ModelCfg.patch_size
    if not path:
        return crops, patch
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if "crops" not in cfg:
        raise ValueError(f"{path}: no `crops:` mapping found (a crops YAML or a job spec)")
    patch = cfg.get("patch_size") or (cfg.get("model") or {}).get("patch_size") or patch
    return {**crops, **cfg["crops"]}, int(patch)


def run(url: str, *, crops: dict, patch_size: int, seconds: float = 20.0, workers: int = 4, batch_size: int = 32,
        storage_options: dict | None = None, warmup_batches: int = 1) -> dict:
    """Iterate the loader for ~`seconds` after warm-up; returns the measurement dict."""
    import torch

    from orchestrator.data.loader import MultiCropLoader
    from orchestrator.pipeline.schema import ModelCfg

    mask = dict(mask_ratio_min_max=ModelCfg.mask_ratio_min_max, mask_probability=ModelCfg.mask_probability)

    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)  # one core, comparable per-core numbers
    try:
        loader = MultiCropLoader(url, batch_size=batch_size, rank=0, world_size=1, seed=0, crops=crops,
                                 patch_size=patch_size, mask=mask, num_workers=workers,
                                 storage_options=storage_options)
        n, t0, t_start = 0, None, time.perf_counter()
        for batch in loader.forever():
            if t0 is None:
                warmup_batches -= 1
                if warmup_batches <= 0:
                    t0 = time.perf_counter()
                continue
            n += batch["labels"].shape[0]
            if time.perf_counter() - t0 >= seconds:
                break
        dt = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    cores = max(1, workers)
    ips = n / dt if dt > 0 else 0.0
    return {"url": storage.redact(url), "images": n, "seconds": round(dt, 2), "images_per_s": round(ips, 2),
            "images_per_s_per_core": round(ips / cores, 2), "workers": workers, "cores_used": cores,
            "cpu_count": os.cpu_count(), "batch_size": batch_size, "crops": dict(loader.aug.__dict__),
            "skipped": loader.skipped, "startup_s": round(t0 - t_start, 2)}


def cmd_bench(args) -> int:
    """`dinoray bench data`: args.url, seconds, workers, batch_size, config, json. Exit 2 on bad input."""
    try:
        crops, patch = _crops_from_config(args.config)
        res = run(args.url, seconds=args.seconds, workers=args.workers, batch_size=args.batch_size,
                  crops=crops, patch_size=patch)
    except (ValueError, OSError) as e:
        print(f"error: {storage.redact(str(e))}", file=sys.stderr)
        return 2
    if args.json:
        res["crops"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in res["crops"].items()}
        print(json.dumps(res))
    else:
        c = res["crops"]
        print(f"{res['images_per_s']:.1f} images/s total, {res['images_per_s_per_core']:.1f} per core "
              f"({res['workers']} workers, {res['images']} images in {res['seconds']} s; crops "
              f"{c['n_global']}x{c['G']} + {c['n_local']}x{c['L']}; {res['skipped']} corrupt skipped)")
    return 0
