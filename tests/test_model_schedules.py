"""Schedules and optimiser parameter groups."""

import math

import numpy as np
import pytest
import torch

from model import SSLMetaArch
from model.schedules import apply_schedules, build_schedules, param_groups


def _sched(**kw):
    args = dict(base_lr=4e-3, batch_size=256, warmup_iters=10, min_lr=1e-6,
                teacher_temp_warmup_iters=30, freeze_last_layer_iters=5)
    args.update(kw)
    return build_schedules(100, **args)


def test_schedule_values_start_warmup_end():
    s = _sched()
    assert set(s) == {"lr", "wd", "momentum", "teacher_temp", "last_layer_lr"}
    assert all(len(v) == 100 for v in s.values())
    peak = 4e-3 * math.sqrt(256 / 1024)  # sqrt scaling rule, base lr per 1024 images
    assert s["lr"][0] == 0.0
    assert s["lr"][9] == pytest.approx(peak) and s["lr"][10] == pytest.approx(peak)
    assert s["lr"][-1] == pytest.approx(1e-6, abs=2e-6) and np.all(np.diff(s["lr"][10:]) <= 0)
    assert s["wd"][0] == pytest.approx(0.04) and s["wd"][-1] == pytest.approx(0.4, abs=1e-3)
    assert s["momentum"][0] == pytest.approx(0.992) and s["momentum"][-1] == pytest.approx(1.0, abs=1e-5)
    assert s["teacher_temp"][0] == pytest.approx(0.04)
    assert s["teacher_temp"][29] == pytest.approx(0.07) and np.all(s["teacher_temp"][29:] == 0.07)
    assert np.all(s["last_layer_lr"][:5] == 0) and s["last_layer_lr"][5] == s["lr"][5] > 0
    g = _sched(wd=(0.04, 0.2), momentum=(0.994, 1.0))
    assert g["wd"][-1] == pytest.approx(0.2, abs=1e-3) and g["momentum"][0] == pytest.approx(0.994)
    with pytest.raises(ValueError, match="warmup"):
        build_schedules(5, base_lr=1e-3, batch_size=8, warmup_iters=10)


def test_param_groups_decay_and_multipliers():
    m = SSLMetaArch(dict(arch="vit_pico", patch_size=4, img_size=32, head_n_prototypes=16,
                         head_hidden_dim=16, head_bottleneck_dim=8, num_register_tokens=4))
    n = m.student["backbone"].n_blocks  # 2
    groups = param_groups(m.student, layer_decay=0.9, patch_embed_lr_mult=0.2)
    by_name = {nm: g for g in groups for nm in g["names"]}
    assert len(by_name) == sum(1 for _ in m.student.parameters())
    for nm in ("backbone.blocks.0.attn.qkv.bias", "backbone.blocks.1.norm1.weight",
               "backbone.blocks.0.ls1.gamma", "backbone.cls_token", "backbone.pos_embed",
               "backbone.mask_token", "backbone.register_tokens", "backbone.norm.weight",
               "dino_head.mlp.0.bias"):
        assert by_name[nm]["wd_multiplier"] == 0.0, nm
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["wd_multiplier"] == 1.0
    assert by_name["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.2 * 0.9 ** (n + 1))
    assert by_name["backbone.blocks.0.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(0.9 ** n)
    assert by_name["backbone.blocks.1.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(0.9 ** (n - 1))
    assert by_name["dino_head.mlp.0.weight"]["lr_multiplier"] == 1.0
    assert by_name["dino_head.last_layer.weight_v"]["is_last_layer"]
    assert not by_name["dino_head.mlp.0.weight"]["is_last_layer"]


def test_apply_schedules_sets_lr_and_wd():
    m = SSLMetaArch(dict(arch="vit_pico", patch_size=4, img_size=32, head_n_prototypes=16,
                         head_hidden_dim=16, head_bottleneck_dim=8))
    groups = param_groups(m.student, layer_decay=0.5, patch_embed_lr_mult=0.2)
    opt = torch.optim.AdamW(groups)
    s = _sched()
    vals = apply_schedules(opt, s, 3)
    assert vals["lr"] == s["lr"][3] and vals["teacher_temp"] == s["teacher_temp"][3]
    for g in opt.param_groups:
        base = 0.0 if g["is_last_layer"] else s["lr"][3]
        assert g["lr"] == pytest.approx(base * g["lr_multiplier"])
        assert g["weight_decay"] == pytest.approx(s["wd"][3] * g["wd_multiplier"])
    apply_schedules(opt, s, 10_000)  # past the end: clamps to the last value
    assert max(g["lr"] for g in opt.param_groups) == pytest.approx(s["lr"][-1])
