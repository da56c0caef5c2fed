"""DistillMetaArch: distillation of a frozen (larger) DINOv2 teacher into a smaller student.

As in the DINOv2 paper (Sec. 5, "Distillation"): the teacher is frozen, the student sees no masking
and no stochastic depth, the iBOT loss runs on every patch of both global crops, and an EMA of the
student (`.student_ema`) is kept as the final model. Same forward signature and parts as SSLMetaArch.

Optional, for short distillations (cfg["feature_loss_weight"] > 0; default 0 = the paper's recipe): a
feature term, 1 - cosine between the student's normalised CLS token and the teacher's on the same
global crop, through a linear `student["feat_proj"]` when the widths differ. It gives every image a
dense target instead of a prototype assignment: on CIFAR-10 a pico student got within 0.3 k-NN points
of its teacher in 100 steps, against +3 points in 60 steps with the DINO/iBOT terms (bench/learn.py).
With dino_loss_weight = ibot_loss_weight = 0 the student has no heads, the teacher's heads and the
local crops are not run, and a step costs about a quarter.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import losses as L
from .ema import EMAMetaArch, freeze_
from .ssl import (DEFAULT_CFG, Centering, _heads_forward, build_backbone_from_cfg, build_heads, normalize_images,
                  resolve_cfg, student_head_losses)

DISTILL_DEFAULT_CFG: dict = {
    **DEFAULT_CFG,
    "teacher_arch": "vit_giant2",
    "teacher_ffn_layer": None,
    "teacher_num_register_tokens": 0,
    "feature_loss_weight": 0.0,
}


def _split_prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class DistillMetaArch(EMAMetaArch):
    """`teacher`: an nn.ModuleDict {"backbone", "dino_head"[, "ibot_head"]} (e.g. a trained
    `SSLMetaArch.teacher`), a state dict with those prefixes ("backbone.", "dino_head.", ...), or
    None for a randomly initialised teacher built from cfg["teacher_arch"] (tests)."""

    EMA_TOWER = "student_ema"
    FROZEN = ("teacher", "student_ema")

    def __init__(self, cfg: dict | None = None, teacher: nn.Module | dict | None = None, device=None):
        super().__init__()
        self.cfg = cfg = resolve_cfg(cfg, DISTILL_DEFAULT_CFG)
        self.process_group = None
        backbone = build_backbone_from_cfg(cfg, drop_path=False, device=device)
        self.use_heads = cfg["dino_loss_weight"] > 0 or cfg["ibot_loss_weight"] > 0
        heads = build_heads(cfg, backbone.embed_dim, device) if self.use_heads else {}
        self.student = nn.ModuleDict({"backbone": backbone, **heads})
        if isinstance(teacher, nn.Module):
            t = teacher
        else:
            tcfg = {**cfg, "arch": cfg["teacher_arch"], "ffn_layer": cfg["teacher_ffn_layer"],
                    "num_register_tokens": cfg["teacher_num_register_tokens"]}
            tb = build_backbone_from_cfg(tcfg, drop_path=False, device=device)
            t = nn.ModuleDict({"backbone": tb, **build_heads(tcfg, tb.embed_dim, device)})
            if teacher is not None:
                self._load_teacher(t, teacher)
        for k in ("backbone", "dino_head"):
            if k not in t:
                raise ValueError(f"distillation teacher has no {k!r} module; pass a ModuleDict with "
                                 "backbone, dino_head and optionally ibot_head")
        if self.use_heads and t["dino_head"].last_layer.out_features != heads["dino_head"].last_layer.out_features:
            raise ValueError("teacher and student DINO heads have different numbers of prototypes; "
                             "set head_n_prototypes to the teacher's")
        self.teacher = freeze_(t)
        if cfg["feature_loss_weight"] > 0 and backbone.embed_dim != t["backbone"].embed_dim:
            self.student["feat_proj"] = nn.Linear(backbone.embed_dim, t["backbone"].embed_dim, device=device)
        self.student_ema = freeze_(copy.deepcopy(self.student))
        n_proto = cfg["head_n_prototypes"]
        n_ibot = cfg["ibot_n_prototypes"] or n_proto
        it = cfg["sinkhorn_iterations"]
        self.dino_centering = Centering(cfg["centering"], n_proto, cfg["center_momentum"], it)
        self.ibot_centering = Centering(cfg["centering"], n_ibot, cfg["center_momentum"], it)

    @staticmethod
    def _load_teacher(t: nn.ModuleDict, state: dict) -> None:
        for k, mod in t.items():
            sub = _split_prefixed(state, k + ".")
            if not sub:
                raise ValueError(f"teacher state dict has no keys under '{k}.'; expected keys like "
                                 f"'{k}.{next(iter(mod.state_dict()))}'")
            mod.load_state_dict(sub, strict=True)

    def forward(self, batch: dict, *, teacher_temp: float) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        n_g = cfg["n_global_crops"]
        glob = normalize_images(batch["global_crops"])
        B = glob.shape[0] // n_g
        loc = batch.get("local_crops")
        n_l = 0 if loc is None or loc.shape[0] == 0 else loc.shape[0] // B

        # only CLS tokens are read from the local crops, and from every crop without the heads: the
        # last blocks compute no other tokens (DinoVisionTransformer.forward_features_list)
        cls_only = torch.zeros(0, dtype=torch.long, device=glob.device)
        g_read = None if self.use_heads else cls_only
        with torch.no_grad():
            t_out = self.teacher["backbone"].forward_features(glob, read=g_read)
        if n_l and self.use_heads:
            s_outs = self.student["backbone"].forward_features_list(
                [glob, normalize_images(loc)], [None, None], [None, cls_only])
        else:
            s_outs = [self.student["backbone"].forward_features(glob, read=g_read)]
        s_gcls = s_outs[0]["x_norm_clstoken"]
        koleo = sum(L.koleo_loss(c) for c in s_gcls.chunk(n_g))
        zero = s_gcls.sum() * 0.0
        parts = {"dino_global": zero, "dino_local": zero, "ibot": zero, "koleo": koleo}
        if self.use_heads:
            parts.update(self._head_losses(t_out, s_outs, teacher_temp, n_g, B))
        loss = (cfg["dino_loss_weight"] * (parts["dino_global"] + parts["dino_local"])
                + cfg["koleo_loss_weight"] * koleo + cfg["ibot_loss_weight"] * parts["ibot"])
        if cfg["feature_loss_weight"] > 0:
            parts["feature"] = self._feature_loss(s_gcls, t_out["x_norm_clstoken"])
            loss = loss + cfg["feature_loss_weight"] * parts["feature"]
        return loss, {k: v.detach().float() for k, v in parts.items()}

    def _head_losses(self, t_out: dict, s_outs: list[dict], teacher_temp: float, n_g: int, B: int) -> dict:
        """DINO (global and local crops against the teacher's global crops) and iBOT on every patch."""
        with torch.no_grad():
            t_cls_logits, t_patch_logits = _heads_forward(
                self.teacher, t_out["x_norm_clstoken"], t_out["x_norm_patchtokens"].flatten(0, 1))
            t_cls = self.dino_centering(t_cls_logits, teacher_temp, self.process_group)
            t_patch = self.ibot_centering(t_patch_logits, teacher_temp, self.process_group)
        n_l = s_outs[1]["x_norm_clstoken"].shape[0] // B if len(s_outs) > 1 else 0
        s_cls = torch.cat([o["x_norm_clstoken"] for o in s_outs])
        s_patch_tokens = s_outs[0]["x_norm_patchtokens"]
        s_patches = s_patch_tokens.flatten(0, 1)
        weight = torch.full((s_patches.shape[0],), 1.0 / s_patch_tokens.shape[1], device=s_cls.device)
        return student_head_losses(self.student, s_cls, s_patches, t_cls, t_patch, weight, n_g, n_l,
                                   self.cfg["student_temp"])

    def _feature_loss(self, s_cls: Tensor, t_cls: Tensor) -> Tensor:
        """1 - cos(student CLS [-> feat_proj], teacher CLS), same global crop."""
        if "feat_proj" in self.student:
            s_cls = self.student["feat_proj"](s_cls)
        return 1 - F.cosine_similarity(s_cls.float(), t_cls.float(), dim=-1).mean()
