"""SSLMetaArch: the DINOv2 student-teacher model and its multi-crop loss.

    loss = dino_loss_weight * (dino_global + dino_local) + koleo_loss_weight * koleo
         + ibot_loss_weight * ibot [+ gram_loss_weight * gram]

`parts` holds the unweighted terms (detached), so the total is their weighted sum.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor, nn

from . import losses as L
from .ema import EMAMetaArch, ema_update_, freeze_
from .heads import DINOHead
from .vit import build_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The model's defaults; every key it shares with the job schema's ModelCfg has ModelCfg's value
# (tests/test_model_ssl.py checks that), so a model built here and one built by a job agree.
DEFAULT_CFG: dict = {
    "arch": "vit_small",
    "patch_size": 14,
    "num_register_tokens": 0,
    "drop_path_rate": 0.0,
    "layerscale_init": 1e-5,
    "ffn_layer": "mlp",  # None: the arch's default (SwiGLU for vit_giant2)
    "img_size": 224,
    "interpolate_antialias": False,
    "interpolate_offset": 0.1,
    "head_n_prototypes": 65536,
    "head_hidden_dim": 2048,
    "head_bottleneck_dim": 256,
    "head_nlayers": 3,
    "ibot_separate_head": True,  # untied DINO and iBOT heads, as in the paper (Sec. 4)
    "ibot_n_prototypes": None,  # None -> head_n_prototypes
    "ibot_loss_weight": 1.0,
    "dino_loss_weight": 1.0,
    "koleo_loss_weight": 0.1,
    "centering": "sinkhorn_knopp",
    "center_momentum": 0.9,
    "sinkhorn_iterations": 3,
    "student_temp": 0.1,
    "gram_loss_weight": 0.0,
    "n_global_crops": 2,
}


def resolve_cfg(cfg: dict | None, defaults: dict = DEFAULT_CFG) -> dict:
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise ValueError(f"unknown model cfg keys {unknown}; known keys: {sorted(defaults)}")
    out = {**defaults, **cfg}
    if out["centering"] not in ("sinkhorn_knopp", "softmax"):
        raise ValueError(f"model cfg centering={out['centering']!r}: use 'sinkhorn_knopp' or 'softmax'")
    return out


def normalize_images(x: Tensor) -> Tensor:
    """uint8 [N, 3, H, W] in 0..255 -> float32 normalised with ImageNet mean/std.
    Floating-point input is taken as already normalised and returned unchanged."""
    if x.is_floating_point():
        return x
    if x.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (0..255) or already-normalised floats, got {x.dtype}")
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255.0)
    return (x.float() - mean) * inv_std


def build_backbone_from_cfg(cfg: dict, *, arch_key: str = "arch", drop_path: bool = True,
                            device=None) -> nn.Module:
    return build_backbone(
        cfg[arch_key], img_size=cfg["img_size"], patch_size=cfg["patch_size"],
        num_register_tokens=cfg["num_register_tokens"],
        drop_path_rate=cfg["drop_path_rate"] if drop_path else 0.0,
        layerscale_init=cfg["layerscale_init"], ffn_layer=cfg["ffn_layer"],
        interpolate_antialias=cfg["interpolate_antialias"],
        interpolate_offset=cfg["interpolate_offset"], device=device)


def build_heads(cfg: dict, embed_dim: int, device=None) -> dict[str, nn.Module]:
    with torch.device(device) if device is not None else contextlib.nullcontext():
        kw = dict(hidden_dim=cfg["head_hidden_dim"], bottleneck_dim=cfg["head_bottleneck_dim"],
                  nlayers=cfg["head_nlayers"])
        heads = {"dino_head": DINOHead(embed_dim, cfg["head_n_prototypes"], **kw)}
        if cfg["ibot_separate_head"]:
            heads["ibot_head"] = DINOHead(embed_dim, cfg["ibot_n_prototypes"] or cfg["head_n_prototypes"], **kw)
    return heads


def _heads_forward(mods: nn.ModuleDict, cls: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
    """The teacher's logits: dino head on CLS tokens, iBOT head on patch tokens; one call when the
    heads are tied (the student's side is `student_head_losses`)."""
    if "ibot_head" in mods:
        return mods["dino_head"](cls), mods["ibot_head"](patches)
    out = mods["dino_head"](torch.cat([cls, patches]))
    return out.split([cls.shape[0], patches.shape[0]])


def student_head_losses(heads: nn.ModuleDict, cls: Tensor, patches: Tensor, t_cls: Tensor, t_patch: Tensor,
                        patch_weight: Tensor, n_g: int, n_l: int, temp: float) -> dict[str, Tensor]:
    """DINO on the student's CLS tokens (global crops, then local) against the teacher's centred global
    crops, iBOT on its masked patch tokens: each head returns its rows' cross entropies (one call per
    head; tied heads take both kinds of rows in one) -> dino_global, dino_local, ibot."""
    cls_targets, patch_targets = L.dino_targets(t_cls, n_g, n_l), L.Targets((t_patch, None))
    if "ibot_head" in heads:
        ce_cls = heads["dino_head"](cls, cls_targets, temp)
        ce_patch = heads["ibot_head"](patches, patch_targets, temp)
    else:
        ce = heads["dino_head"](torch.cat([cls, patches]), cls_targets + patch_targets, temp)
        ce_cls, ce_patch = ce.split([cls.shape[0], patches.shape[0]])
    dino_global, dino_local = L.dino_terms(ce_cls, n_g, n_l)
    ibot = L.ibot_terms(ce_patch, patch_weight, n_images=n_g * (cls.shape[0] // (n_g + n_l)))
    return {"dino_global": dino_global, "dino_local": dino_local, "ibot": ibot}


class Centering(nn.Module):
    """Teacher centering: Sinkhorn-Knopp (stateless) or softmax with an EMA centre buffer."""

    def __init__(self, kind: str, n_prototypes: int, momentum: float, n_iterations: int):
        super().__init__()
        self.kind, self.momentum, self.n_iterations = kind, momentum, n_iterations
        if kind == "softmax":
            self.register_buffer("center", torch.zeros(1, n_prototypes))
        else:
            self.center = None

    @torch.no_grad()
    def forward(self, logits: Tensor, teacher_temp: float, process_group=None) -> Tensor:
        # float32 throughout: under autocast Sinkhorn's matrix-vector products would run in bf16
        # (and cast the [B, K] matrix for each of them)
        with torch.autocast(logits.device.type, enabled=False):
            if self.kind == "sinkhorn_knopp":
                return L.sinkhorn_knopp(logits, teacher_temp, self.n_iterations, process_group)
            probs = L.softmax_center(logits, self.center, teacher_temp)
            L.update_center_(self.center, logits, self.momentum, process_group)
            return probs


class SSLMetaArch(EMAMetaArch):
    """Student and EMA teacher (and, with gram_loss_weight > 0, a frozen Gram teacher)."""

    EMA_TOWER = "teacher"
    FROZEN = ("teacher", "gram_teacher")

    def __init__(self, cfg: dict | None = None, device=None):
        super().__init__()
        self.cfg = cfg = resolve_cfg(cfg)
        self.process_group = None
        backbone = build_backbone_from_cfg(cfg, device=device)
        self.student = nn.ModuleDict({"backbone": backbone, **build_heads(cfg, backbone.embed_dim, device)})
        self.teacher = freeze_(copy.deepcopy(self.student))
        n_ibot = cfg["ibot_n_prototypes"] or cfg["head_n_prototypes"]
        if not cfg["ibot_separate_head"] and n_ibot != cfg["head_n_prototypes"]:
            raise ValueError("ibot_n_prototypes differs from head_n_prototypes but ibot_separate_head "
                             "is false; set ibot_separate_head: true or drop ibot_n_prototypes")
        it = cfg["sinkhorn_iterations"]
        self.dino_centering = Centering(cfg["centering"], cfg["head_n_prototypes"], cfg["center_momentum"], it)
        self.ibot_centering = Centering(cfg["centering"], n_ibot, cfg["center_momentum"], it)
        self.gram_teacher = None
        if cfg["gram_loss_weight"] > 0:
            self.gram_teacher = freeze_(copy.deepcopy(self.teacher["backbone"]))

    # ----- teacher management (EMA: model.ema.EMAMetaArch) ----------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise the student, copy it into the teacher (and Gram teacher), reset the
        softmax centres."""
        super().init_weights()
        if self.gram_teacher is not None:
            self.update_gram_teacher_()
        for c in (self.dino_centering, self.ibot_centering):
            if c.center is not None:
                c.center.zero_()

    @torch.no_grad()
    def update_gram_teacher_(self) -> None:
        """Gram anchoring: refresh the Gram teacher with the current EMA teacher backbone."""
        if self.gram_teacher is None:
            raise RuntimeError("gram_loss_weight is 0: there is no Gram teacher to update")
        ema_update_(list(self.gram_teacher.parameters()),
                    list(self.teacher["backbone"].parameters()), 0.0)

    # ----- forward --------------------------------------------------------------------------
    def _shapes(self, batch: dict) -> tuple[int, int, int]:
        n_g = self.cfg["n_global_crops"]
        g = batch["global_crops"]
        if g.shape[0] % n_g:
            raise ValueError(f"batch['global_crops'] has {g.shape[0]} images, not a multiple of "
                             f"n_global_crops={n_g}")
        B = g.shape[0] // n_g
        loc = batch.get("local_crops")
        n_l = 0 if loc is None or loc.shape[0] == 0 else loc.shape[0] // B
        if loc is not None and loc.shape[0] != n_l * B:
            raise ValueError(f"batch['local_crops'] has {loc.shape[0]} images, not a multiple of B={B}")
        return n_g, n_l, B

    def forward(self, batch: dict, *, teacher_temp: float) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        n_g, n_l, _ = self._shapes(batch)
        glob = normalize_images(batch["global_crops"])
        loc = normalize_images(batch["local_crops"]) if n_l else None
        masks = batch.get("masks")
        if masks is not None:
            masks = masks.to(glob.device, torch.bool)
            idx = batch["mask_indices_list"].to(glob.device)
            weight = batch["masks_weight"].to(glob.device)
        else:
            idx = torch.zeros(0, dtype=torch.long, device=glob.device)
            weight = torch.zeros(0, device=glob.device)

        # teacher: global crops, unmasked, no grad
        with torch.no_grad():
            t_out = self.teacher["backbone"].forward_features(glob, read=idx)  # CLS + masked patches
            t_cls_logits, t_patch_logits = _heads_forward(self.teacher, t_out["x_norm_clstoken"],
                                                          t_out["x_norm_patchtokens_read"])
            t_cls = self.dino_centering(t_cls_logits, teacher_temp, self.process_group)
            t_patch = self.ibot_centering(t_patch_logits, teacher_temp, self.process_group)

        # student: global (masked) and local crops, each resolution one batch
        # the losses read the CLS tokens and the global crops' masked patch tokens (all patch tokens
        # with the Gram loss): the last block computes no others (DinoVisionTransformer.forward_features_list)
        g_read = idx if self.gram_teacher is None else None
        xs, ms, reads = [glob], [masks], [g_read]
        if n_l:
            xs.append(loc)
            ms.append(None)
            reads.append(idx.new_zeros(0))
        s_outs = self.student["backbone"].forward_features_list(xs, ms, reads)
        s_gcls = s_outs[0]["x_norm_clstoken"]
        s_cls = torch.cat([s_gcls] + ([s_outs[1]["x_norm_clstoken"]] if n_l else []))
        if g_read is not None:
            s_patches = s_outs[0]["x_norm_patchtokens_read"]
        else:
            s_patches = s_outs[0]["x_norm_patchtokens"].flatten(0, 1)[idx]
        parts = student_head_losses(self.student, s_cls, s_patches, t_cls, t_patch, weight, n_g, n_l,
                                    cfg["student_temp"])
        parts["koleo"] = sum(L.koleo_loss(c) for c in s_gcls.chunk(n_g))
        loss = (cfg["dino_loss_weight"] * (parts["dino_global"] + parts["dino_local"])
                + cfg["koleo_loss_weight"] * parts["koleo"] + cfg["ibot_loss_weight"] * parts["ibot"])
        if self.gram_teacher is not None:
            with torch.no_grad():
                g_patches = self.gram_teacher.forward_features(glob)["x_norm_patchtokens"]
            gram = L.gram_loss(s_outs[0]["x_norm_patchtokens"], g_patches)
            parts["gram"] = gram
            loss = loss + cfg["gram_loss_weight"] * gram
        return loss, {k: v.detach().float() for k, v in parts.items()}
