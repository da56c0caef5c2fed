"""DINO / iBOT projection head: MLP -> bottleneck -> L2 norm -> weight-normalised prototypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import Targets, prototype_cross_entropy


_ROWS = 1024  # rows of the prototypes scaled per call: the float32 product of a block stays in cache


class _WeightNorm(torch.autograd.Function):
    """w = g * v / ||v|| per row, written once in the compute dtype (bf16 under autocast), so the [K, D]
    prototypes are not scaled in float32 and then cast for the matmul. Backward in float32 (float64
    stays float64), three passes over [K, D]: with u = v / ||v||, dg = sum(dw * u) and
    dv = g / ||v|| * (dw - u * dg)."""

    @staticmethod
    def forward(ctx, v: Tensor, g: Tensor, dtype: torch.dtype) -> Tensor:
        acc = torch.promote_types(v.dtype, torch.float32)  # float32 (float64 stays float64, for gradcheck)
        inv = torch.linalg.vector_norm(v.to(acc), dim=1, keepdim=True).reciprocal_()
        w = torch.empty(v.shape, dtype=dtype, device=v.device)
        scale = g.to(acc) * inv
        for a in range(0, v.shape[0], _ROWS):  # by blocks of rows: [65,536 x 256] to bf16 9.6 -> 4.4 ms on CPU
            torch.mul(v[a:a + _ROWS], scale[a:a + _ROWS], out=w[a:a + _ROWS])
        ctx.save_for_backward(v, g, inv)
        return w

    @staticmethod
    def backward(ctx, dw: Tensor):
        v, g, inv = ctx.saved_tensors
        vf, dwf = v.to(inv.dtype), dw.to(inv.dtype, copy=True)
        dg = torch.bmm(dwf.unsqueeze(1), vf.unsqueeze(2)).view(-1, 1).mul_(inv)  # row dots, no [K, D] temporary
        scale = g.to(inv.dtype) * inv
        dv = dwf.mul_(scale).addcmul_(vf, -scale * inv * dg)
        return dv.to(v.dtype), dg.to(g.dtype), None


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| (per output row).

    Parameters are plain tensors named `weight_g` [out, 1] and `weight_v` [out, in], the names of
    `torch.nn.utils.weight_norm` used by the reference checkpoints, but without forward hooks, so
    sharding wrappers see ordinary parameters.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        if not self.weight_v.is_meta:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight_v, a=5 ** 0.5)  # nn.Linear's default
        self.weight_g.fill_(1.0)

    def forward(self, x: Tensor, targets: Targets | None = None, temp: float = 1.0) -> Tensor:
        """Logits x @ w^T [N, out]; with `targets`, instead the rows' cross entropies of their targets
        against logits / temp [N] (`prototype_cross_entropy`: the logits are not kept)."""
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.weight_v.dtype
        w = _WeightNorm.apply(self.weight_v, self.weight_g, dtype)
        if targets is not None:
            return prototype_cross_entropy(x, w, targets, temp)
        return F.linear(x, w)


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3):
        super().__init__()
        nlayers = max(int(nlayers), 1)
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if not self.last_layer.weight_v.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer.reset_parameters()

    def forward(self, x: Tensor, targets: Targets | None = None, temp: float = 1.0) -> Tensor:
        """Prototype logits [N, out]; with `targets`, the rows' cross entropies (WeightNormLinear)."""
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12)
        return self.last_layer(x, targets, temp)
