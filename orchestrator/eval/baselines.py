"""Yardsticks for every eval: the same eval on a freshly initialised backbone of the same architecture,
and (k-NN, retrieval) on raw pixels at the eval resolution. Both are cached per architecture, image
size and eval settings under the run (`RunLayout.eval_baseline(key)`), so they are computed once per run.

No entrypoint; `orchestrator/eval/phase.py` calls `yardsticks` for each evaluated backbone.
"""
from __future__ import annotations

import hashlib
import json

import torch

import model as dmodel
from orchestrator.eval import features

INIT_SEED = 0   # the random-init backbone is built under this seed (same weights in every run)


def random_state_dict(sd: dict[str, torch.Tensor], seed: int = INIT_SEED) -> dict[str, torch.Tensor]:
    """A freshly initialised backbone with the architecture of `sd` (its init, as training starts from)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return dmodel.build_backbone(**features.infer_arch(sd)).state_dict()


def arch_tag(sd: dict[str, torch.Tensor]) -> str:
    """'vit_pico-32px-p4-r0-mlp-ls0': what makes two backbones' random inits the same eval."""
    a = features.infer_arch(sd)
    return (f"{a['arch']}-{a['img_size']}px-p{a['patch_size']}-r{a['num_register_tokens']}-{a['ffn_layer']}"
            f"-ls{int(a['layerscale_init'] is not None)}")


def cache_key(kind: str, tag: str, settings: dict) -> str:
    """File name of a cached yardstick: kind, arch tag and a hash of every setting that changes the result."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{kind}-{tag}-{digest}"


def cached(store, compute, log=print) -> dict:
    """The JSON result at `store` (a Store), or compute() written there first."""
    hit = store.read_json()
    if hit is not None:
        log(f"[eval] yardstick from cache: {store.name}")
        return hit
    res = compute()
    store.write_json(res)
    return res


def yardsticks(sd: dict[str, torch.Tensor], run_methods, settings: dict, layout, log=print) -> dict:
    """{"random_init": {method: result}, "pixels": {method: result}} for this backbone's architecture.
    `run_methods(weights, methods) -> {method: result}` runs the eval (weights None: raw pixels);
    `settings` holds everything the result depends on besides the weights (data, sizes, methods)."""
    methods = list(settings["methods"])
    rand_key = cache_key("random_init", arch_tag(sd), settings)
    out = {"random_init": cached(layout.eval_baseline(rand_key),
                                 lambda: run_methods(random_state_dict(sd), methods), log)}
    pixel_methods = [m for m in methods if m in ("knn", "retrieval")]
    if pixel_methods:
        pix_settings = {**settings, "methods": pixel_methods}
        pix_key = cache_key("pixels", f"{settings['image_size']}px", pix_settings)
        out["pixels"] = cached(layout.eval_baseline(pix_key), lambda: run_methods(None, pixel_methods), log)
    return out
