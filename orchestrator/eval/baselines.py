"""Yardsticks for every eval: the same eval on a freshly initialised backbone of the same architecture,
and (k-NN, retrieval) on raw pixels at the eval resolution. Both are cached per architecture, image
size and eval settings under the run (`RunLayout.eval_baseline(key)`), so they are computed once per run.

No entrypoint; `orchestrator/eval/phase.py` calls `plan` for each evaluated backbone and evaluates what
is not cached with it (one pass over the images for a k-NN).
"""
from __future__ import annotations

import hashlib
import json

import torch

import model as dmodel
from orchestrator.eval import features

INIT_SEED = 0   # the random-init backbone is built under this seed (same weights in every run)
KINDS = ("random_init", "pixels")


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


def plan(sd: dict[str, torch.Tensor], settings: dict, layout) -> tuple[dict, dict]:
    """The yardsticks of this backbone's architecture: ({kind: cached result}, {kind: (weights, methods,
    store)} still to compute, the result then written to `store`), kinds in KINDS order. `settings` holds
    everything the result depends on besides the weights (data, sizes, methods); weights None: raw pixels."""
    methods = list(settings["methods"])
    pixel_methods = [m for m in methods if m in ("knn", "retrieval")]
    wanted = {"random_init": (lambda: random_state_dict(sd), methods,
                              cache_key("random_init", arch_tag(sd), settings))}
    if pixel_methods:
        wanted["pixels"] = (lambda: None, pixel_methods,
                            cache_key("pixels", f"{settings['image_size']}px", {**settings, "methods": pixel_methods}))
    cached, todo = {}, {}
    for kind, (weights, kind_methods, key) in wanted.items():
        store = layout.eval_baseline(key)
        hit = store.read_json()
        if hit is not None:
            cached[kind] = hit
        else:
            todo[kind] = (weights(), kind_methods, store)
    return cached, todo
