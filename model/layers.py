"""The ViT's layers: patch embedding, attention, MLP / SwiGLU, LayerScale and the pre-norm block with
sample-wise stochastic depth (model/vit.py builds the backbone from them). Pure PyTorch; parameter
names are the released DINOv2 checkpoints'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .drop_path import add_subset_residual

FFN_LAYERS = ("mlp", "swiglu", "swiglufused")


def swiglu_hidden_dim(dim: int, mlp_ratio: float = 4.0) -> int:
    """SwiGLU hidden width as in the released ViT-g: 2/3 of the MLP width, rounded up to a multiple of 8."""
    hidden = int(dim * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens. `proj` is the released checkpoints' Conv2d (kernel = stride =
    patch), computed as what it is: one matrix product of each patch's pixels with the flattened kernel.
    On CPU, forward + backward, that is 1.5-3.3x faster than the convolution in bf16 (a ViT-S step's crops:
    35 -> 12 ms) and 1.1-1.3x in fp32; only an fp32 forward without grad is slower, by up to 17%, on a
    layer that is <1% of the forward. A border that does not fill a patch is dropped, as the convolution does."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        p = self.proj.kernel_size[0]
        h, w = H // p, W // p
        x = x[:, :, :h * p, :w * p].reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, -1)
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)  # B, N, D


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
            if g is None:
                out[:, :, i].zero_()
            else:
                out[:, :, i].copy_(g.transpose(1, 2))
        return out.flatten(2), None


# The CPU matmul form's limit on one attention's [B * heads, queries, keys] score tensor (held until the
# backward where one follows): above it, SDPA's fused kernel, which never holds all scores at once.
_SCORES_MAX_BYTES = 256 << 20


class _MatmulAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v for q, k, v in qkv [B, N, 3 * C] -> [B, N, C] (heads merged), queries
    from the first `n_q` tokens only (their rows of the output; 1: CLS). On CPU the reference's matmul
    form, with fewer passes than autograd makes of it: q, k, v permuted to [B * heads, N, d] in one copy,
    the scale applied inside the first matmul (`baddbmm`'s alpha), and a backward that writes the three
    gradients into one [B, N, 3 * C] tensor. Outputs and gradients equal autograd's of the same ops bit
    for bit (tests/test_model_backbone.py); forward + backward, 2 threads, bf16: [14, 257] tokens 0.78-0.81x
    and [57, 50] 0.84-0.85x the time of autograd's, fp32 0.86-0.95x SDPA's (docs/training.md, ninth round)."""

    @staticmethod
    def forward(ctx, qkv: Tensor, num_heads: int, n_q: int):
        B, N, C3 = qkv.shape
        d = C3 // (3 * num_heads)
        t = qkv.view(B, N, 3, num_heads, d).permute(2, 0, 3, 1, 4).reshape(3, B * num_heads, N, d)
        q, k, v = t[0][:, :n_q], t[1], t[2]
        p = torch.baddbmm(q.new_empty(1, 1, 1), q, k.transpose(1, 2), beta=0.0, alpha=d ** -0.5).softmax(-1)
        ctx.save_for_backward(t, p)
        ctx.dims = (B, N, num_heads, d, n_q)
        return torch.bmm(p, v).view(B, num_heads, n_q, d).transpose(1, 2).reshape(B, n_q, num_heads * d)

    @staticmethod
    def backward(ctx, grad: Tensor):
        t, p = ctx.saved_tensors
        B, N, H, d, n_q = ctx.dims
        q, k, v = t[0][:, :n_q], t[1], t[2]
        g = grad.view(B, n_q, H, d).transpose(1, 2).reshape(B * H, n_q, d)
        empty = g.new_empty(1, 1, 1)
        out = g.new_empty(B, N, 3, H, d)  # the gradient of qkv, its three parts written in place

        def put(i: int, a: Tensor, n: int = N) -> None:  # [B * H, n, d] -> out[:, :n, i]
            out[:, :n, i].copy_(a.view(B, H, n, d).transpose(1, 2))

        put(2, torch.bmm(p.transpose(1, 2), g))  # dv = p^T g
        ds = torch._softmax_backward_data(torch.bmm(g, v.transpose(1, 2)), p, -1, p.dtype)  # through softmax
        del p
        put(0, torch.baddbmm(empty, ds, k, beta=0.0, alpha=d ** -0.5), n_q)  # dq = ds k * scale
        if n_q < N:
            out[:, n_q:, 0].zero_()
        put(1, torch.baddbmm(empty, ds.transpose(1, 2), q, beta=0.0, alpha=d ** -0.5))  # dk = ds^T q * scale
        return out.view(B, N, 3 * H * d), None, None


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, out_scale: Tensor | float | None = None,
                rows: Tensor | None = None) -> Tensor:
        """[B, N, C] -> [B, N, C]; with `rows` (flat indices into the B * N tokens, each sample's CLS
        first, see Block), only those tokens' outputs [len(rows), C]: keys and values come from every
        token, queries only from CLS where CLS is all that is read."""
        B, N, C = x.shape
        qkv = self.qkv(x)
        cls_only = rows is not None and rows.shape[0] == B
        n_q = 1 if cls_only else N
        scores = B * self.num_heads * n_q * N * qkv.element_size()
        if (x.device.type == "cpu" and scores <= _SCORES_MAX_BYTES
                and (qkv.requires_grad or qkv.dtype != torch.float32)):
            # CPU, up to _SCORES_MAX_BYTES of scores: the matmul form where a backward follows (SDPA's
            # fused backward is 2-5x slower in bf16, 5-14% in fp32) and in bf16 / fp16 without one (5-20%
            # faster than the fused forward); fp32 without a backward keeps the kernel.
            x = _MatmulAttention.apply(qkv, self.num_heads, n_q).view(B * n_q, C)
        else:
            q, k, v = _SplitHeads.apply(qkv, self.num_heads)
            if cls_only:
                q = q[:, :, :1]
            x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B * n_q, C)
        if rows is not None and not cls_only:
            x = x[rows]
        return scaled_linear(x if rows is not None else x.view(B, N, C), self.proj, out_scale)


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
    gathered once for all crops of a step. LayerScale and the stochastic-depth factor are folded into
    each branch's output projection (`scaled_linear`). With `read`, a last block computes only the
    tokens its caller reads (`_forward_read`).
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

    def _draw_kept(self, B: int, device) -> tuple[Tensor, float]:
        """Stochastic depth's kept samples of a batch of B (a random subset) and their factor B / keep."""
        keep = max(int(B * (1.0 - self.drop_path)), 1)
        return torch.randperm(B, device=device)[:keep], B / keep

    def _residual(self, x: Tensor, branch) -> Tensor:
        if not (self.training and self.drop_path > 0.0):
            return x + branch(x)
        idx, scale = self._draw_kept(x.shape[0], x.device)
        if x.device.type == "cpu":
            return add_subset_residual(x, idx, branch, scale)
        out = branch(x[idx], scale)  # accelerators: no host sync for the run boundaries
        return torch.index_add(x, 0, idx, out.to(x.dtype))

    def _forward_one(self, x: Tensor) -> Tensor:
        x = self._residual(x, self._attn_branch)
        return self._residual(x, self._ffn_branch)

    def _forward_read(self, x: Tensor, read: Tensor) -> Tensor:
        """The block's output at each sample's CLS token and at the flat token rows `read` (into
        [B * N]): [B + len(read), C]. The same numbers as `_forward_one(x).flatten(0, 1)` at those rows
        (the same samples dropped), but the attention output projection, the MLP and their norms
        run on those rows only. A dropped sample's rows get a branch factor of 0, a kept one's B / keep."""
        B, N, C = x.shape
        rows = torch.cat([torch.arange(B, device=x.device) * N, read])
        factors = [None, None]
        if self.training and self.drop_path > 0.0:
            for i in range(2):  # drawn in _residual's order: attention's samples, then the MLP's
                idx, scale = self._draw_kept(B, x.device)
                f = x.new_zeros(B)
                f[idx] = scale
                factors[i] = f[rows // N].unsqueeze(1)
        y = self.attn(self.norm1(x), self._out_scale(self.ls1, 1.0), rows)
        h = x.flatten(0, 1)[rows] + (y if factors[0] is None else y * factors[0])
        y = self.mlp(self.norm2(h), self._out_scale(self.ls2, 1.0))
        return h + (y if factors[1] is None else y * factors[1])

    def forward(self, x: Tensor | list[Tensor],
                read: Tensor | list[Tensor | None] | None = None) -> Tensor | list[Tensor]:
        """x: [B, N, C], or a list (one per resolution). `read` (per input): None for every token's
        output, or flat token rows, for [B + len(read), C]: the CLS tokens, then those rows."""
        if isinstance(x, (list, tuple)):
            read = read if read is not None else [None] * len(x)
            return [self._forward_one(t) if r is None else self._forward_read(t, r) for t, r in zip(x, read)]
        return self._forward_one(x) if read is None else self._forward_read(x, read)
