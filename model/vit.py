"""DINOv2 Vision Transformer backbone (state-dict compatible with the released DINOv2 models).

Pure PyTorch. Attention uses `F.scaled_dot_product_attention` (explicit matmuls on CPU in bf16).
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

from .drop_path import add_subset_residual

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

FFN_LAYERS = ("mlp", "swiglu", "swiglufused")


def swiglu_hidden_dim(dim: int, mlp_ratio: float = 4.0) -> int:
    """SwiGLU hidden width as in the released ViT-g: 2/3 of the MLP width, rounded up to a multiple of 8."""
    hidden = int(dim * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # B, N, D


def scaled_linear(x: Tensor, lin: nn.Linear, scale: Tensor | float | None) -> Tensor:
    """lin(x) * scale (per output feature, or one number), with the scale applied to the weight and
    bias ([out, in] elements) instead of to the output ([tokens, out]): a residual branch's LayerScale
    and stochastic-depth factor cost no pass over the activations, forward or backward."""
    if scale is None:
        return lin(x)
    col = scale.unsqueeze(-1) if isinstance(scale, Tensor) else scale
    return F.linear(x, lin.weight * col, lin.bias * scale)


class _SplitHeads(torch.autograd.Function):
    """qkv [B, N, 3 * C] -> q, k, v [B, heads, N, C / heads] (views). Backward writes the three
    gradients straight into one [B, N, 3 * C] tensor: one pass, where autograd's backward of
    reshape-permute-unbind stacks them (a pass) and copies the stack back to qkv's layout (another)."""

    @staticmethod
    def forward(ctx, qkv: Tensor, num_heads: int):
        B, N, C3 = qkv.shape
        t = qkv.view(B, N, 3, num_heads, C3 // (3 * num_heads))
        ctx.shape = t.shape
        return tuple(t[:, :, i].transpose(1, 2) for i in range(3))

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        out = next(g for g in grads if g is not None).new_empty(ctx.shape)
        for i, g in enumerate(grads):
            out[:, :, i].copy_(g.transpose(1, 2)) if g is not None else out[:, :, i].zero_()
        return out.flatten(2), None


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, out_scale: Tensor | float | None = None) -> Tensor:
        B, N, C = x.shape
        q, k, v = _SplitHeads.apply(self.qkv(x), self.num_heads)
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            # CPU in bf16/fp16 (autocast on AMX): two batched matmuls and a softmax, as the reference's
            # Attention. SDPA's CPU flash kernel is 2-4x slower there (bench/model.py --dtype bf16; its
            # softmax rounds to the same bf16 output); fp32 and accelerators keep the fused kernel.
            x = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return scaled_linear(x.transpose(1, 2).reshape(B, N, C), self.proj, out_scale)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, out_scale: Tensor | float | None = None) -> Tensor:
        return scaled_linear(self.act(self.fc1(x)), self.fc2, out_scale)


class SwiGLU(nn.Module):
    """w12 -> split (x1, x2) -> silu(x1) * x2 -> w3 (the released ViT-g FFN)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, out_scale: Tensor | float | None = None) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return scaled_linear(F.silu(x1) * x2, self.w3, out_scale)


class LayerScale(nn.Module):
    """The per-channel scale of a residual branch (`gamma`); `Block` folds it into the branch's output
    projection (`scaled_linear`), so this module only holds the parameter under the released name."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))


class Block(nn.Module):
    """Pre-norm transformer block. Stochastic depth drops whole samples: in training the residual
    branch is computed only on the kept subset of the batch and rescaled (as the reference does),
    which saves the dropped samples' compute.

    `forward` accepts a tensor or a list of tensors (one per resolution) so that a sharded block is
    gathered once for all crops of a step.
    """

    def __init__(self, dim: int, num_heads: int, ffn_layer: str, mlp_ratio: float = 4.0,
                 layerscale_init: float | None = 1e-5, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        if ffn_layer == "mlp":
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        elif ffn_layer in ("swiglu", "swiglufused"):
            self.mlp = SwiGLU(dim, swiglu_hidden_dim(dim, mlp_ratio))
        else:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; use one of {FFN_LAYERS}")
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.drop_path = float(drop_path)

    @staticmethod
    def _out_scale(ls: nn.Module, drop_scale: float) -> Tensor | float | None:
        """LayerScale's gamma times the stochastic-depth factor, or None where both are 1."""
        if isinstance(ls, LayerScale):
            return ls.gamma if drop_scale == 1.0 else ls.gamma * drop_scale
        return None if drop_scale == 1.0 else drop_scale

    def _attn_branch(self, x: Tensor, drop_scale: float = 1.0) -> Tensor:
        """ls1(attn(norm1(x))) * drop_scale."""
        return self.attn(self.norm1(x), self._out_scale(self.ls1, drop_scale))

    def _ffn_branch(self, x: Tensor, drop_scale: float = 1.0) -> Tensor:
        """ls2(mlp(norm2(x))) * drop_scale."""
        return self.mlp(self.norm2(x), self._out_scale(self.ls2, drop_scale))

    def _residual(self, x: Tensor, branch) -> Tensor:
        if not (self.training and self.drop_path > 0.0):
            return x + branch(x)
        B = x.shape[0]
        keep = max(int(B * (1.0 - self.drop_path)), 1)
        idx = torch.randperm(B, device=x.device)[:keep]
        if x.device.type == "cpu":
            return add_subset_residual(x, idx, branch, B / keep)
        out = branch(x[idx], B / keep)  # accelerators: no host sync for the run boundaries
        return torch.index_add(x, 0, idx, out.to(x.dtype))

    def _forward_one(self, x: Tensor) -> Tensor:
        x = self._residual(x, self._attn_branch)
        return self._residual(x, self._ffn_branch)

    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        if isinstance(x, (list, tuple)):
            return [self._forward_one(t) for t in x]
        return self._forward_one(x)


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

    def forward_features_list(self, xs: list[Tensor], masks_list: list[Tensor | None]) -> list[dict]:
        """Runs several inputs (e.g. global and local crops); each is one batch through every block."""
        toks = [self.prepare_tokens_with_masks(x, m) for x, m in zip(xs, masks_list)]
        for blk in self.blocks:
            toks = blk(toks)
        return [self._outputs(t, m) for t, m in zip(toks, masks_list)]

    def forward_features(self, x: Tensor | list[Tensor], masks: Tensor | None = None):
        if isinstance(x, list):
            return self.forward_features_list(x, masks if masks is not None else [None] * len(x))
        t = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            t = blk(t)
        return self._outputs(t, masks)

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
    Heads and losses are excluded. Divide achieved FLOP/s by the peak for MFU."""
    def f(size):
        return flops_per_image(arch, size, patch_size, num_register_tokens, ffn_layer)
    student = n_global * f(global_size) + (n_local * f(local_size) if n_local else 0.0)
    return 3.0 * student + n_global * f(global_size)
