"""Per-iteration schedules (lr, wd, teacher momentum, teacher temperature, last-layer lr) and
optimiser parameter groups (no weight decay for biases/norms/LayerScale/tokens, layer-wise lr decay,
patch-embedding lr multiplier) for DINOv2."""

from __future__ import annotations

from typing import TYPE_CHECKING

import math
import re

import numpy as np

if TYPE_CHECKING:
    from torch import nn

_TOKEN_NAMES = ("pos_embed", "cls_token", "mask_token", "register_tokens")


def cosine_schedule(base: float, final: float, total_iters: int, warmup_iters: int = 0,
                    start_warmup_value: float = 0.0, freeze_iters: int = 0) -> np.ndarray:
    """[freeze: 0] + [linear warmup start->base] + [cosine base->final]; length total_iters."""
    if warmup_iters + freeze_iters > total_iters:
        raise ValueError(f"warmup ({warmup_iters}) + freeze ({freeze_iters}) iterations exceed "
                         f"total_iters ({total_iters}); shorten the warmup")
    freeze = np.zeros(freeze_iters)
    warm = np.linspace(start_warmup_value, base, warmup_iters)
    n = total_iters - warmup_iters - freeze_iters
    it = np.arange(n)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * it / max(n, 1)))
    return np.concatenate([freeze, warm, cos]).astype(np.float64)


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """DINOv2's sqrt scaling rule: base_lr is for 1024 images per step."""
    return base_lr * math.sqrt(batch_size / 1024.0)


def build_schedules(total_iters: int, *, base_lr: float, batch_size: int, warmup_iters: int,
                    min_lr: float = 1e-6, wd: tuple[float, float] = (0.04, 0.4),
                    momentum: tuple[float, float] = (0.992, 1.0),
                    teacher_temp: tuple[float, float] = (0.04, 0.07),
                    teacher_temp_warmup_iters: int = 0, freeze_last_layer_iters: int = 0) -> dict[str, np.ndarray]:
    """Arrays of length total_iters (every length here is in iterations, none in epochs). `batch_size`
    is the global batch (images per step). teacher_temp = (warmup start, final): linear warmup then
    constant."""
    lr = scaled_lr(base_lr, batch_size)
    lr_s = cosine_schedule(lr, min_lr, total_iters, warmup_iters)
    ll = lr_s.copy()
    ll[:freeze_last_layer_iters] = 0.0
    tt_warm = min(teacher_temp_warmup_iters, total_iters)
    tt = np.concatenate([np.linspace(teacher_temp[0], teacher_temp[1], tt_warm),
                         np.full(total_iters - tt_warm, teacher_temp[1])])
    return {
        "lr": lr_s,
        "wd": cosine_schedule(wd[0], wd[1], total_iters),
        "momentum": cosine_schedule(momentum[0], momentum[1], total_iters),
        "teacher_temp": tt,
        "last_layer_lr": ll,
    }


def _layer_id(name: str, n_blocks: int) -> int:
    """0 for the patch embedding and tokens, i+1 for block i, n_blocks+1 for the rest (final norm, heads)."""
    if "head" in name.split(".")[0]:
        return n_blocks + 1
    if "patch_embed" in name or any(name.endswith(t) or f".{t}" in name for t in _TOKEN_NAMES):
        return 0
    m = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return n_blocks + 1


def _no_weight_decay(name: str, p: nn.Parameter) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return (leaf == "bias" or "norm" in name or leaf == "gamma"
            or any(t in name for t in _TOKEN_NAMES))


def param_groups(module: nn.Module, *, layer_decay: float = 0.9, patch_embed_lr_mult: float = 0.2,
                 n_blocks: int | None = None) -> list[dict]:
    """Optimizer groups for a student (nn.ModuleDict of backbone/heads) or a bare backbone.

    Parameters with the same (lr_multiplier, wd_multiplier, is_last_layer) share one group. Each
    group also keeps "names". The prototype layers ("last_layer") have is_last_layer=True.
    """
    from torch import nn  # torch only where a model is at hand: the schedules themselves are numpy
    if n_blocks is None:
        bb = module["backbone"] if isinstance(module, nn.ModuleDict) else module
        n_blocks = getattr(bb, "n_blocks")
    groups: dict[tuple, dict] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        lid = _layer_id(name, n_blocks)
        lr_mult = layer_decay ** (n_blocks + 1 - lid)
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        wd_mult = 0.0 if _no_weight_decay(name, p) else 1.0
        last = "last_layer" in name
        key = (lr_mult, wd_mult, last)
        g = groups.setdefault(key, {"params": [], "names": [], "lr_multiplier": lr_mult,
                                    "wd_multiplier": wd_mult, "is_last_layer": last})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def apply_schedules(optimizer, schedules: dict[str, np.ndarray], step: int) -> dict[str, float]:
    """Sets lr and weight_decay of every group for iteration `step`; returns the scalar values."""
    step = min(int(step), len(schedules["lr"]) - 1)
    vals = {k: float(v[step]) for k, v in schedules.items()}
    for g in optimizer.param_groups:
        base = vals["last_layer_lr"] if g.get("is_last_layer", False) else vals["lr"]
        g["lr"] = base * g.get("lr_multiplier", 1.0)
        g["weight_decay"] = vals["wd"] * g.get("wd_multiplier", 1.0)
    return vals
