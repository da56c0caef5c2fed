"""Export a backbone for users' usual tools.

    dinoray export runs/demo --phase distill-vit_pico --format dinov2 vits_demo.pth
    dinoray export s3://bucket/runs/vitg --phase distill-vit_small --format hf vits14-hf/

Formats (docs/eval.md has the details and the measured differences):
- dinov2: a plain state dict under the released DINOv2 key names. When the arch has a released
  counterpart (ViT-S/B/L/g, patch 14, 0 or 4 registers, the released FFN), the position embedding is
  resampled to the released 37x37 grid (518 px) with the backbone's own interpolation (the reference's)
  and missing LayerScale gammas are set to 1, so it loads with strict=True into
  `torch.hub.load('facebookresearch/dinov2', NAME)` and `model.build_hub_backbone(NAME)`. Other archs (the
  tiny CPU ones) are exported at their own size and the result says so. timm loads this file with its own
  DINOv2 converter: `timm.create_model('vit_small_patch14_dinov2', pretrained=True,
  pretrained_cfg_overlay=dict(file=OUT))` (timm's `checkpoint_filter_fn` renames and resamples).
- hf: a folder (config.json + model.safetensors) for `transformers.Dinov2Model.from_pretrained(OUT)`
  (`Dinov2WithRegistersModel` when the backbone has registers), at the training resolution.
- safetensors: the backbone's own tensors and names, unchanged, in a .safetensors file.
"""
from __future__ import annotations

import io
import json

import torch

import model as dmodel
from orchestrator.eval import features
from orchestrator.storage import Store

FORMATS = ("dinov2", "hf", "safetensors")
EXTENSIONS = {"dinov2": "pth", "hf": "hf", "safetensors": "safetensors"}  # exports/{key}.{ext}; hf: a folder
HUB_IMG_SIZE = 518   # the released models' image size: a 37 x 37 grid of 14 px patches


def hub_name(arch: dict) -> str | None:
    """The released model whose architecture matches `infer_arch`'s kwargs, or None."""
    for name, spec in dmodel.HUB_MODELS.items():
        default_ffn = dmodel.ARCHS[spec["arch"]][3]
        if (spec["arch"], spec.get("num_register_tokens", 0), 14) == (
                arch["arch"], arch["num_register_tokens"], arch["patch_size"]) and arch["ffn_layer"] == default_ffn:
            return name
    return None


@torch.no_grad()
def to_hub(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, info): for a released counterpart, pos_embed at 37 x 37 and LayerScale gammas; else as is."""
    arch = features.infer_arch(sd)
    name = hub_name(arch)
    if name is None:
        return dict(sd), {"hub_model": None, "img_size": arch["img_size"],
                          "note": f"{arch['arch']} (patch {arch['patch_size']}, {arch['num_register_tokens']} "
                                  "registers) has no released DINOv2 counterpart: exported at its own size "
                                  f"{arch['img_size']} px; load it with model.build_backbone(**infer_arch(sd))"}
    net = features.backbone_from_state_dict(sd)
    grid = HUB_IMG_SIZE // arch["patch_size"]
    out = dict(sd)
    # what the trained backbone itself uses for a 518 px input: the reference's interpolation
    out["pos_embed"] = net.interpolate_pos_encoding(grid * grid, HUB_IMG_SIZE, HUB_IMG_SIZE).detach().clone()
    for i in range(arch_depth(sd)):
        for ls in ("ls1", "ls2"):  # no LayerScale = a gamma of ones
            out.setdefault(f"blocks.{i}.{ls}.gamma", torch.ones(sd["cls_token"].shape[-1]))
    expect = {k: tuple(v.shape) for k, v in dmodel.build_hub_backbone(name, device="meta").state_dict().items()}
    got = {k: tuple(v.shape) for k, v in out.items()}
    if got != expect:
        raise ValueError(f"export for {name}: keys/shapes differ from the released model: "
                         f"{sorted(set(got.items()) ^ set(expect.items()))[:6]}")
    note = (f"loads strict into {name} ({HUB_IMG_SIZE} px); position embedding resampled from "
            f"{arch['img_size']} px ({arch['img_size'] // arch['patch_size']}^2) to {grid}^2")
    return out, {"hub_model": name, "img_size": HUB_IMG_SIZE, "note": note}


def arch_depth(sd: dict[str, torch.Tensor]) -> int:
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))


# --------------------------------------------------------------------------- Hugging Face
def hf_config(sd: dict[str, torch.Tensor]) -> dict:
    """config.json of transformers' Dinov2Model (Dinov2WithRegistersModel with registers)."""
    arch = features.infer_arch(sd)
    dim, depth, heads, _ = dmodel.ARCHS[arch["arch"]]
    regs = arch["num_register_tokens"]
    cfg = {"architectures": ["Dinov2WithRegistersModel" if regs else "Dinov2Model"],
           "model_type": "dinov2_with_registers" if regs else "dinov2",
           "hidden_size": dim, "num_hidden_layers": depth, "num_attention_heads": heads, "mlp_ratio": 4,
           "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
           "initializer_range": 0.02, "layer_norm_eps": 1e-6, "image_size": arch["img_size"],
           "patch_size": arch["patch_size"], "num_channels": 3, "qkv_bias": True, "layerscale_value": 1.0,
           "drop_path_rate": 0.0, "use_swiglu_ffn": arch["ffn_layer"] != "mlp", "torch_dtype": "float32"}
    if regs:
        cfg["num_register_tokens"] = regs
    return cfg


def to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """dinov2 names -> the Hugging Face Hub's DINOv2 checkpoint names (what facebook/dinov2-* hold)."""
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.mask_token": sd["mask_token"],
           "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    if "register_tokens" in sd:
        out["embeddings.register_tokens"] = sd["register_tokens"]
    dim = sd["cls_token"].shape[-1]
    for i in range(arch_depth(sd)):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.qkv.{kind}"].chunk(3, dim=0)
            for name, t in (("query", q), ("key", k), ("value", v)):
                out[f"{dst}attention.attention.{name}.{kind}"] = t
            out[f"{dst}attention.output.dense.{kind}"] = sd[f"{src}attn.proj.{kind}"]
            for norm in ("norm1", "norm2"):
                out[f"{dst}{norm}.{kind}"] = sd[f"{src}{norm}.{kind}"]
            for ours, theirs in (("fc1", "fc1"), ("fc2", "fc2"), ("w12", "weights_in"), ("w3", "weights_out")):
                if f"{src}mlp.{ours}.{kind}" in sd:
                    out[f"{dst}mlp.{theirs}.{kind}"] = sd[f"{src}mlp.{ours}.{kind}"]
        for ls, theirs in (("ls1", "layer_scale1"), ("ls2", "layer_scale2")):
            out[f"{dst}{theirs}.lambda1"] = sd.get(f"{src}{ls}.gamma", torch.ones(dim))
    return {k: v.contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------- writing
def export_state_dict(sd: dict[str, torch.Tensor], fmt: str, out, storage_options: dict | None = None) -> dict:
    """Write `sd` (dinov2 names) in `fmt` to `out` (file URL / Store; a folder for hf).
    Returns {"path", "format", "hub_model", "img_size", "note"}."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format '{fmt}'; use one of {FORMATS} (timm loads the dinov2 "
                         "format with its own converter, see docs/eval.md)")
    dst = out if isinstance(out, Store) else Store(str(out), storage_options)
    sd = {k: v.detach().float().contiguous().cpu() for k, v in sd.items()}
    arch = features.infer_arch(sd)  # refuses anything that is not a backbone state dict
    info = {"hub_model": None, "img_size": arch["img_size"], "note": ""}
    from safetensors.torch import save
    if fmt == "dinov2":
        sd, info = to_hub(sd)
        buf = io.BytesIO()
        torch.save(sd, buf)
        dst.write_bytes(buf.getvalue())
    elif fmt == "safetensors":
        dst.write_bytes(save(sd))
    else:
        (dst / "model.safetensors").write_bytes(save(to_hf(sd), metadata={"format": "pt"}))
        (dst / "config.json").write_bytes(json.dumps(hf_config(sd), indent=2).encode())
        info["note"] = f"transformers {hf_config(sd)['architectures'][0]} at {arch['img_size']} px"
    return {"path": dst.url, "format": fmt, **info}


def export_phase(run_url: str, phase: str, fmt: str, out_url: str, storage_options: dict | None = None) -> dict:
    """Export the backbone a finished phase (or distill student PHASE-ARCH) of the run at `run_url` wrote."""
    from orchestrator.layout import RunLayout
    root = Store(run_url, storage_options)
    src = RunLayout(root.parent, root.name).phase(phase).final_backbone
    if not src.exists():
        raise FileNotFoundError(f"{src.url} does not exist: phase '{phase}' has not finished in {run_url} "
                                "(see `dinoray status RUN_URL`); a distill student's phase is '<phase>-<arch>'")
    return export_state_dict(features.load_state_dict(src), fmt, Store(out_url, storage_options))


def cmd_export(args) -> int:
    """dinoray export RUN_URL --phase PHASE --format dinov2|hf|safetensors OUT"""
    res = export_phase(args.run_url, args.phase, args.format, args.out)
    print(f"exported {args.phase} ({args.format}) to {res['path']}" + (f": {res['note']}" if res["note"] else ""))
    return 0
