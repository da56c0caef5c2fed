"""Interop check against timm's DINOv2 models (run where timm is installed, e.g. from bench/gpu.sh).

    python3 bench/interop.py

For ViT-S/14 and ViT-S/14 with registers (random weights, 518 px as released): our `dinov2` export,
converted by timm's own loader (`checkpoint_filter_fn`, what `timm.create_model(NAME, pretrained=True,
pretrained_cfg_overlay=dict(file=EXPORT))` runs), loads into timm's `vit_small_patch14_dinov2` /
`vit_small_patch14_reg4_dinov2` with strict=True, and both give the same normalised CLS and patch
tokens at 518 px (no position-embedding interpolation involved); at 224 px the register model matches
too, while the model without registers differs by timm's interpolation (it omits the reference's
+0.1 offset, which our backbone keeps).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as dmodel  # noqa: E402
from orchestrator.eval.export import to_hub  # noqa: E402


def check(hub_name: str, timm_name: str) -> bool:
    import timm
    torch.manual_seed(0)
    ours = dmodel.build_hub_backbone(hub_name).eval()
    with torch.no_grad():  # random everything (tokens, pos-embed, LayerScale) so every part matters
        for p in ours.parameters():
            p.normal_(0.0, 0.05)
    theirs = timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    from timm.models.vision_transformer import checkpoint_filter_fn
    exported, _ = to_hub(ours.state_dict())  # what `dinoray export --format dinov2` writes
    missing = theirs.load_state_dict(checkpoint_filter_fn(exported, theirs), strict=True)
    ok = True
    for size in (518, 224):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            a = ours.forward_features(x)
            b = theirs.forward_features(x)
        n_prefix = 1 + ours.num_register_tokens
        d_cls = (a["x_norm_clstoken"] - b[:, 0]).abs().max().item()
        d_patch = (a["x_norm_patchtokens"] - b[:, n_prefix:]).abs().max().item()
        good = d_cls < 1e-4 and d_patch < 1e-4
        # timm resizes position embeddings without the reference's +0.1 offset (models without
        # registers), so only 518 px (no resize) and the register models must match exactly
        if size == 518 or ours.num_register_tokens:
            ok &= good
        print(f"{hub_name:18s} -> timm {timm_name:30s} {size} px: strict load ok ({missing}), "
              f"max |diff| cls {d_cls:.2e} patches {d_patch:.2e} {'OK' if good else 'MISMATCH'}", flush=True)
    return ok


if __name__ == "__main__":
    results = [check("dinov2_vits14", "vit_small_patch14_dinov2"),
               check("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2")]
    sys.exit(0 if all(results) else 1)
