"""Paper recipes: every value has a source, and they build the model and schedules."""

import pytest

from model import SSLMetaArch
from model.recipes import RECIPES, SOURCES, model_cfg
from model.schedules import build_schedules


@pytest.mark.parametrize("name", ["vitg14", "vitl14"])
def test_recipe_sources_and_build(name):
    r = RECIPES[name]
    assert set(r) == set(SOURCES[name]) and all(SOURCES[name][k].strip() for k in r)
    m = SSLMetaArch(model_cfg(name), device="meta")
    assert m.student["dino_head"].last_layer.out_features == 131072
    assert "ibot_head" in m.student
    s = build_schedules(r["total_iters"], base_lr=r["base_lr"], batch_size=r["batch_size"],
                        warmup_iters=r["warmup_iters"], min_lr=r["min_lr"], wd=r["wd"],
                        momentum=r["momentum"], teacher_temp=r["teacher_temp"],
                        teacher_temp_warmup_iters=r["teacher_temp_warmup_iters"],
                        freeze_last_layer_iters=r["freeze_last_layer_iters"])
    assert s["lr"].max() == pytest.approx(3.5e-4, rel=0.02)  # paper Table 16: lr 3.5e-4 at batch 3072
    assert s["wd"][-1] == pytest.approx(0.2, abs=1e-3)


def test_vitg_recipe_param_count():
    m = SSLMetaArch(model_cfg("vitg14"), device="meta")
    n = sum(p.numel() for p in m.student["backbone"].parameters())
    assert n == 1_136_480_768 - 1370 * 1536 + 257 * 1536  # hub count with a 224 px pos_embed
    with pytest.raises(ValueError, match="unknown recipe"):
        model_cfg("vith14")
