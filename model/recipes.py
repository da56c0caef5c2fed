"""DINOv2 paper recipes as data: ViT-g/14 and ViT-L/14 trained from scratch.

Sources ("Oquab et al., DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024):
  [T16]  Appendix, Table 16 (training hyperparameters; caption: 625k iterations, AdamW, LayerScale
         1e-5, wd cosine 0.04 -> 0.2, 100k warmup iterations, teacher momentum cosine 0.994 -> 1).
  [S4]   Sec. 4 "Discriminative Self-supervised Pre-training" (DINO/iBOT losses, untied heads,
         Sinkhorn-Knopp, KoLeo, adapting the resolution).
  [S5]   Sec. 5 "Efficient implementation".
  [CFG]  the authors' released training configs (dinov2/configs/ssl_default_config.yaml and
         train/vitg14.yaml, train/vitl14.yaml), for values the paper does not state.
Iteration counts use the configs' epoch length of 1250 iterations.

`RECIPES[name]` is a flat dict; `SOURCES[name][key]` gives each value's source. `model_cfg(name)`
extracts the SSLMetaArch cfg keys.
"""

from __future__ import annotations

from .ssl import DEFAULT_CFG

_VITG14: list[tuple[str, object, str]] = [
    # ---- model ----
    ("arch", "vit_giant2", "[T16] DINOv2-g: ViT-g/14, 1.1B parameters, SwiGLU FFN [S4]"),
    ("patch_size", 14, "[T16]"),
    ("ffn_layer", "swiglufused", "[CFG] train/vitg14.yaml"),
    ("num_register_tokens", 0, "[CFG] (registers came with the later 'ViTs need registers' models)"),
    ("drop_path_rate", 0.4, "[T16] drop-rate 0.4 (uniform over blocks, [CFG] drop_path_uniform)"),
    ("layerscale_init", 1e-5, "[T16] caption: initial LayerScale 1e-5"),
    ("img_size", 224, "[CFG] global_crops_size 224"),
    ("head_n_prototypes", 131072, "[S4] 'Untying head weights' / [CFG] 131072 prototypes"),
    ("head_hidden_dim", 2048, "[CFG] ssl_default_config"),
    ("head_bottleneck_dim", 384, "[CFG] train/vitg14.yaml"),
    ("head_nlayers", 3, "[CFG] ssl_default_config"),
    ("ibot_separate_head", True, "[S4] untied DINO and iBOT heads"),
    ("ibot_n_prototypes", 131072, "[CFG] train/vitg14.yaml"),
    ("dino_loss_weight", 1.0, "[CFG] ssl_default_config"),
    ("ibot_loss_weight", 1.0, "[CFG] ssl_default_config"),
    ("koleo_loss_weight", 0.1, "[S4] KoLeo regularizer, weight 0.1"),
    ("centering", "sinkhorn_knopp", "[S4] Sinkhorn-Knopp centering (3 iterations)"),
    ("student_temp", 0.1, "[CFG] DINO loss student temperature"),
    # ---- optimisation ----
    ("batch_size", 3072, "[T16] batch size 3072 ([CFG] 12 per GPU)"),
    ("total_iters", 625_000, "[T16] caption: 625k iterations ([CFG] 500 epochs x 1250)"),
    ("warmup_iters", 100_000, "[T16] caption: 100k warmup iterations ([CFG] 80 epochs)"),
    ("base_lr", 2.0e-4, "[CFG] per 1024 images, sqrt rule -> 3.5e-4 at 3072 = [T16] LR 3.5e-4"),
    ("min_lr", 1.0e-6, "[CFG] ssl_default_config"),
    ("wd", (0.04, 0.2), "[T16] caption: weight decay cosine 0.04 -> 0.2"),
    ("momentum", (0.994, 1.0), "[T16] caption: teacher momentum cosine 0.994 -> 1"),
    ("teacher_temp", (0.04, 0.07), "[CFG] warmup_teacher_temp 0.04 -> teacher_temp 0.07"),
    ("teacher_temp_warmup_iters", 37_500, "[CFG] warmup_teacher_temp_epochs 30"),
    ("freeze_last_layer_iters", 1_250, "[CFG] freeze_last_layer_epochs 1"),
    ("layer_decay", 1.0, "[CFG] train/vitg14.yaml layerwise_decay 1.0"),
    ("patch_embed_lr_mult", 0.2, "[CFG] ssl_default_config"),
    ("clip_grad", 3.0, "[CFG] ssl_default_config"),
    ("optimizer", "adamw", "[T16] caption: AdamW"),
    ("adamw_betas", (0.9, 0.999), "[CFG] ssl_default_config"),
    ("precision", "fp16 (heads' gradients reduced in fp32)", "[T16] caption; dinoray uses bf16"),
    # ---- data ----
    ("dataset", "LVD-142M", "[S3] curated data"),
    ("n_global_crops", 2, "[CFG] / DINO multi-crop"),
    ("global_crops_scale", (0.32, 1.0), "[CFG] ssl_default_config"),
    ("n_local_crops", 8, "[CFG] local_crops_number 8"),
    ("local_crops_size", 98, "[CFG] train/vitg14.yaml (98 = 7 patches of 14)"),
    ("local_crops_scale", (0.05, 0.32), "[CFG] ssl_default_config"),
    ("mask_ratio_min_max", (0.1, 0.5), "[CFG] ibot mask_ratio_min_max"),
    ("mask_probability", 0.5, "[CFG] ibot mask_sample_probability"),
    ("high_res_img_size", 518, "[S4] 'Adapting the resolution': 518x518 at the end of pretraining"),
    ("high_res_iters", 10_000, "[S4] a short period (10k iterations) at the end"),
]

_VITL14_CHANGES: dict[str, tuple[object, str]] = {
    "arch": ("vit_large", "[T16] DINOv2-L from scratch: ViT-L/14"),
    "ffn_layer": ("swiglufused", "[CFG] train/vitl14.yaml (the released ViT-L/14, distilled, uses MLP)"),
    "head_bottleneck_dim": (384, "[CFG] train/vitl14.yaml"),
    "batch_size": (3072, "[T16] batch size 3072 ([CFG] 32 per GPU)"),
    "layer_decay": (1.0, "[CFG] train/vitl14.yaml layerwise_decay 1.0"),
}


def _build(rows, changes=None) -> tuple[dict, dict]:
    values = {k: v for k, v, _ in rows}
    sources = {k: s for k, _, s in rows}
    for k, (v, s) in (changes or {}).items():
        values[k], sources[k] = v, s
    return values, sources


RECIPES: dict[str, dict] = {}
SOURCES: dict[str, dict[str, str]] = {}
RECIPES["vitg14"], SOURCES["vitg14"] = _build(_VITG14)
RECIPES["vitl14"], SOURCES["vitl14"] = _build(_VITG14, _VITL14_CHANGES)


def model_cfg(name: str) -> dict:
    """The SSLMetaArch cfg subset of a recipe."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return {k: v for k, v in RECIPES[name].items() if k in DEFAULT_CFG}
