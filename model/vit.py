"""DINOv2 Vision Transformer backbone (state-dict compatible with the released DINOv2 models).

Pure PyTorch; the layers (attention, MLP, the block) are in model/layers.py.
Key names and shapes follow the released checkpoints (see
../shared/reference/dinov2_hub_state_dicts.json), so `load_state_dict(strict=True)` works in both
directions.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Block, LayerScale, PatchEmbed, swiglu_hidden_dim

# arch -> (embed_dim, depth, num_heads, default ffn_layer)
ARCHS: dict[str, tuple[int, int, int, str]] = {
    "vit_pico": (64, 2, 2, "mlp"),
    "vit_nano": (128, 2, 4, "mlp"),  # bench/learn.py's hour on CIFAR-10 (docs/learning.md, seventh round)
    "vit_tiny": (192, 6, 3, "mlp"),
    "vit_small": (384, 12, 6, "mlp"),
    "vit_base": (768, 12, 12, "mlp"),
    "vit_large": (1024, 24, 16, "mlp"),
    "vit_giant2": (1536, 40, 24, "swiglufused"),
}

# Released torch.hub models: name -> build_backbone kwargs (img_size 518, patch 14).
HUB_MODELS: dict[str, dict] = {
    "dinov2_vits14": dict(arch="vit_small"),
    "dinov2_vitb14": dict(arch="vit_base"),
    "dinov2_vitl14": dict(arch="vit_large"),
    "dinov2_vitg14": dict(arch="vit_giant2"),
    "dinov2_vits14_reg": dict(arch="vit_small", num_register_tokens=4,
                              interpolate_antialias=True, interpolate_offset=0.0),
    "dinov2_vitb14_reg": dict(arch="vit_base", num_register_tokens=4,
                              interpolate_antialias=True, interpolate_offset=0.0),
    "dinov2_vitl14_reg": dict(arch="vit_large", num_register_tokens=4,
                              interpolate_antialias=True, interpolate_offset=0.0),
    "dinov2_vitg14_reg": dict(arch="vit_giant2", num_register_tokens=4,
                              interpolate_antialias=True, interpolate_offset=0.0),
}

class DinoVisionTransformer(nn.Module):
    def __init__(self, *, img_size: int = 224, patch_size: int = 14, in_chans: int = 3,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0,
                 ffn_layer: str = "mlp", drop_path_rate: float = 0.0,
                 layerscale_init: float | None = 1e-5, num_register_tokens: int = 0,
                 interpolate_antialias: bool = False, interpolate_offset: float = 0.1):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.n_blocks = depth
        self.num_heads = num_heads
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        else:
            self.register_tokens = None
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, ffn_layer, mlp_ratio, layerscale_init, drop_path_rate)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.skip_unread_tokens = True  # see forward_features_list
        if not self.pos_embed.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        self.patch_embed.proj.reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, LayerScale):
                m.gamma.fill_(m.init_values)

    def interpolate_pos_encoding(self, n_patches: int, h: int, w: int) -> Tensor:
        """Position embeddings for an h x w pixel input (CLS first), as the reference computes them."""
        N = self.pos_embed.shape[1] - 1
        if n_patches == N and h == w:
            return self.pos_embed
        pos = self.pos_embed.float()
        M = int(math.sqrt(N))
        gh, gw = h // self.patch_size, w // self.patch_size
        grid = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            # the released models' floating-point fix: a scale factor slightly above the ratio
            scale = ((gh + self.interpolate_offset) / M, (gw + self.interpolate_offset) / M)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic",
                                 antialias=self.interpolate_antialias)
        else:
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic",
                                 antialias=self.interpolate_antialias)
        if grid.shape[-2:] != (gh, gw):
            raise RuntimeError(f"pos-embed interpolation gave {tuple(grid.shape[-2:])}, wanted {(gh, gw)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([pos[:, :1], grid], dim=1).to(self.pos_embed.dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        B, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a multiple of patch_size {self.patch_size}")
        # the residual stream is kept in the parameters' dtype (fp32 under autocast, as the reference)
        x = self.patch_embed(x).to(self.cls_token.dtype)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(x.shape[1] - 1, h, w)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        return x

    def _outputs(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        # LayerNorm is per token, so norming each slice gives the same numbers as slicing one normed
        # tensor, but new tensors rather than views: FSDP2 hooks a unit's outputs for backward, and an
        # in-place op on a returned view would drop that hook (FSDP2 warns "returned a view tensor").
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": self.norm(x[:, 0]),
            "x_norm_regtokens": self.norm(x[:, 1:r + 1]),
            "x_norm_patchtokens": self.norm(x[:, r + 1:]),
            "x_prenorm": x,
            "masks": masks,
        }

    def _outputs_read(self, x: Tensor, B: int, masks: Tensor | None) -> dict[str, Tensor | None]:
        """Outputs of a read-restricted last block ([B + n, C]: CLS rows, then the read patch rows)."""
        return {"x_norm_clstoken": self.norm(x[:B]), "x_norm_patchtokens_read": self.norm(x[B:]),
                "masks": masks}

    def forward_features_list(self, xs: list[Tensor], masks_list: list[Tensor | None],
                              read_list: list[Tensor | None] | None = None) -> list[dict]:
        """Runs several inputs (e.g. global and local crops); each is one batch through every block.

        `read_list` (per input): None, or the flat indices (into [B * n_patches], as masking's
        mask_indices_list) of the only patch tokens the caller reads. Such an input's outputs are
        "x_norm_clstoken" and "x_norm_patchtokens_read" (those tokens, in that order), and its last
        block computes only what they need (`Block._forward_read`): no other token's attention
        output projection, MLP or norm. `skip_unread_tokens = False` computes every token instead
        (same outputs, plus the full ones), e.g. for compiled blocks, whose shapes must not vary.
        """
        toks = [self.prepare_tokens_with_masks(x, m) for x, m in zip(xs, masks_list)]
        read_list = read_list if read_list is not None else [None] * len(xs)
        n0 = 1 + self.num_register_tokens
        rows = [None if r is None else r // (t.shape[1] - n0) * t.shape[1] + n0 + r % (t.shape[1] - n0)
                for t, r in zip(toks, read_list)]
        skip = self.skip_unread_tokens and any(r is not None for r in rows)
        for i, blk in enumerate(self.blocks):
            toks = blk(toks, rows) if skip and i == len(self.blocks) - 1 else blk(toks)
        outs = []
        for x, t, m, r in zip(xs, toks, masks_list, read_list):
            if r is None:
                outs.append(self._outputs(t, m))
            elif skip:
                outs.append(self._outputs_read(t, x.shape[0], m))
            else:
                out = self._outputs(t, m)
                out["x_norm_patchtokens_read"] = out["x_norm_patchtokens"].flatten(0, 1)[r]
                outs.append(out)
        return outs

    def forward_features(self, x: Tensor | list[Tensor], masks: Tensor | None = None,
                         read: Tensor | None = None):
        """One input (dict of outputs) or a list of them (`forward_features_list`; then `masks` and
        `read` are lists too)."""
        if isinstance(x, list):
            return self.forward_features_list(x, masks if masks is not None else [None] * len(x), read)
        return self.forward_features_list([x], [masks], None if read is None else [read])[0]

    def get_intermediate_layers(self, x: Tensor, n: int = 1, norm: bool = True) -> list[Tensor]:
        """Patch tokens of the last n blocks (optionally normed), for linear probes / dense tasks."""
        t = self.prepare_tokens_with_masks(x)
        outs = []
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            if i >= len(self.blocks) - n:
                outs.append(self.norm(t) if norm else t)
        return [o[:, 1 + self.num_register_tokens:] for o in outs]

    def forward(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        return self.head(self.forward_features(x, masks)["x_norm_clstoken"])


def build_backbone(arch: str, img_size: int = 224, patch_size: int = 14, num_register_tokens: int = 0,
                   drop_path_rate: float = 0.0, layerscale_init: float | None = 1e-5,
                   ffn_layer: str | None = None, interpolate_antialias: bool = False,
                   interpolate_offset: float = 0.1, device: torch.device | str | None = None,
                   **kw) -> DinoVisionTransformer:
    """Builds a DINOv2 ViT. `ffn_layer=None` takes the arch's default (SwiGLU for vit_giant2).
    `device="meta"` builds without allocating (e.g. ViT-g before sharding)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    kw.pop("block_chunks", None)  # reference option with no effect on the math
    for name, expect in (("qkv_bias", True), ("proj_bias", True), ("ffn_bias", True),
                         ("drop_path_uniform", True)):
        if kw.pop(name, expect) != expect:
            raise ValueError(f"{name}={not expect} is not supported (DINOv2 uses {expect})")
    if "init_values" in kw:
        layerscale_init = kw.pop("init_values")
    if kw:
        raise TypeError(f"build_backbone got unknown arguments {sorted(kw)}")
    dim, depth, heads, default_ffn = ARCHS[arch]
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return DinoVisionTransformer(
            img_size=img_size, patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=heads,
            ffn_layer=ffn_layer or default_ffn, drop_path_rate=drop_path_rate,
            layerscale_init=layerscale_init, num_register_tokens=num_register_tokens,
            interpolate_antialias=interpolate_antialias, interpolate_offset=interpolate_offset)


def build_hub_backbone(name: str, device: torch.device | str | None = None) -> DinoVisionTransformer:
    """The backbone of a released DINOv2 model (img_size 518, patch 14), ready for its checkpoint."""
    if name not in HUB_MODELS:
        raise ValueError(f"unknown released model {name!r}; choose one of {sorted(HUB_MODELS)}")
    return build_backbone(img_size=518, patch_size=14, device=device, **HUB_MODELS[name])


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matmuls run natively on `device` (CUDA; CPUs with AMX or AVX512-BF16), so that bf16
    autocast is faster than fp32. On other CPUs bf16 is emulated: 6-10x slower than fp32 on AVX2."""
    kind = torch.device(device).type
    if kind == "cuda":
        return True
    return kind == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def flops_per_image(arch: str, img_size: int = 224, patch_size: int = 14, num_register_tokens: int = 0,
                    ffn_layer: str | None = None, mlp_ratio: float = 4.0) -> float:
    """Analytical forward FLOPs (2 per multiply-add) of the backbone for one square image.
    Counts matmuls (patch embedding, qkv, attention scores and values, projection, FFN); norms and
    activations are ignored. Training (forward + backward) is about 3x this."""
    dim, depth, _, default_ffn = ARCHS[arch]
    ffn = ffn_layer or default_ffn
    n_patch = (img_size // patch_size) ** 2
    n = n_patch + 1 + num_register_tokens
    embed = 2 * n_patch * 3 * patch_size * patch_size * dim
    attn = 2 * n * dim * 3 * dim + 2 * 2 * n * n * dim + 2 * n * dim * dim
    if ffn == "mlp":
        mlp = 2 * 2 * n * dim * int(dim * mlp_ratio)
    else:
        hidden = swiglu_hidden_dim(dim, mlp_ratio)
        mlp = 2 * n * dim * 2 * hidden + 2 * n * hidden * dim
    return float(embed + depth * (attn + mlp))


def ssl_flops_per_image(arch: str, patch_size: int = 14, global_size: int = 224, local_size: int = 98,
                        n_global: int = 2, n_local: int = 8, num_register_tokens: int = 0,
                        ffn_layer: str | None = None) -> float:
    """Backbone FLOPs of one DINOv2 training step per source image: the student's forward and
    backward (3x forward) over all crops plus the teacher's forward over the global crops.
    Heads and losses are excluded. Divide achieved FLOP/s by the peak for MFU. Counted as the
    reference computes the step (every token through every block); dinoray's last blocks skip the
    tokens no loss reads (Block._forward_read), so FLOP/s from this count are work-equivalent, a few
    percent above the arithmetic actually done (about 1/depth of the backbone's work is skipped at most)."""
    def f(size):
        return flops_per_image(arch, size, patch_size, num_register_tokens, ffn_layer)
    student = n_global * f(global_size) + (n_local * f(local_size) if n_local else 0.0)
    return 3.0 * student + n_global * f(global_size)
