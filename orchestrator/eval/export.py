"""Export a phase's backbone for users' usual tools.

    dinoray export runs/demo --phase pretrain --format dinov2 vits_demo.pth
    dinoray export s3://bucket/runs/vitg --phase distill-vit_small --format safetensors out.safetensors

Formats:
- dinov2: a plain state dict under the released DINOv2 key names; loads with
  `torch.hub.load('facebookresearch/dinov2', ...)`-built models and `model.build_backbone` with strict=True.
- safetensors: the same tensors and names in a .safetensors file.
- timm: timm's `vit_*_patch14_dinov2` / `*_reg4_dinov2` names (mask_token dropped; register_tokens ->
  reg_token with CLS's position embedding folded into cls_token; SwiGLU w12/w3 -> mlp.fc1/mlp.fc2), for
  `timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=OUT))`.
"""
from __future__ import annotations

import argparse
import io

import torch

from orchestrator.eval import knn as evaluate
from orchestrator import storage

FORMATS = ("dinov2", "timm", "safetensors")


def to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """dinov2 names -> timm's vit_*_dinov2 names (timm's own dinov2 conversion, done ahead of time)."""
    sd = dict(sd)
    sd.pop("mask_token", None)
    out = {}
    if "register_tokens" in sd:
        # timm's *_reg4_dinov2 models keep no position embedding for prefix tokens: fold CLS's into it.
        out["reg_token"] = sd.pop("register_tokens")
        out["cls_token"] = sd.pop("cls_token") + sd["pos_embed"][:, :1]
        out["pos_embed"] = sd.pop("pos_embed")[:, 1:]
    for key, value in sd.items():
        # SwiGLU: timm's SwiGLUPacked keeps w12 packed as fc1 and w3 as fc2.
        out[key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = value
    return out


def export_state_dict(sd: dict[str, torch.Tensor], fmt: str, out_url: str,
                      storage_options: dict | None = None) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format '{fmt}'; use one of {FORMATS}")
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    if fmt == "timm":
        sd = to_timm(sd)
    if fmt == "safetensors":
        from safetensors.torch import save
        data = save(sd)
    else:
        buf = io.BytesIO()
        torch.save(sd, buf)
        data = buf.getvalue()
    storage.atomic_write_bytes(out_url, data, storage_options)
    return out_url


def phase_backbone_url(run_url: str, phase: str) -> str:
    return f"{run_url.rstrip('/')}/{phase}/final/backbone.pth"


def export_phase(run_url: str, phase: str, fmt: str, out_url: str, storage_options: dict | None = None) -> str:
    src = phase_backbone_url(run_url, phase)
    fs, path = storage.fs_for(src, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"{src} does not exist: phase '{phase}' has not finished in {run_url} "
                                "(see `dinoray status RUN_URL`); a distill student's phase is '<phase>-<arch>'")
    sd = evaluate.load_state_dict(src, storage_options)
    evaluate.infer_arch(sd)  # refuse anything that is not a backbone state dict
    return export_state_dict(sd, fmt, out_url, storage_options)


def _cmd_export(args) -> int:
    out = export_phase(args.run_url, args.phase, args.format, args.out)
    print(f"exported {args.phase} ({args.format}) to {out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a phase's backbone (dinov2 / timm / safetensors)")
    p.add_argument("run_url", help="{storage}/{name} of the run")
    p.add_argument("--phase", required=True, help="phase name (distill students: PHASE-ARCH)")
    p.add_argument("--format", choices=FORMATS, default="dinov2")
    p.add_argument("out", help="output file (local path or fsspec URL)")
    p.set_defaults(func=_cmd_export)
