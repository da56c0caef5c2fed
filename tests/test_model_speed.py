"""The CPU step's faster paths give the numbers of the plain ones (within fp32 tolerance):
stochastic depth by contiguous runs vs index_add, Sinkhorn-Knopp by scaling vectors vs the log domain."""

from __future__ import annotations

import pytest
import torch

from model import losses as L
from model.drop_path import add_subset_residual
from model.vit import Block


def _index_add_residual(x, idx, branch, scale):
    """The reference's drop_add_residual_stochastic_depth."""
    return torch.index_add(x, 0, idx, branch(x[idx]) * scale)


def test_subset_residual_equals_index_add_values_and_gradients():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    for B, idx in ((8, [5, 0, 6, 2, 7, 1]), (8, [3]), (5, [4, 0, 1, 2, 3]), (6, [2, 3])):
        idx = torch.tensor(idx)
        grads = []
        for fn in (_index_add_residual, add_subset_residual):
            x = torch.randn(B, 4, 16, generator=torch.Generator().manual_seed(B), requires_grad=True)
            lin.zero_grad()
            branch = lin if fn is _index_add_residual else (lambda t, s: lin(t) * s)
            y = fn(x, idx, branch, B / len(idx))
            y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
            grads.append((y.detach(), x.grad, lin.weight.grad.clone(), lin.bias.grad.clone()))
        for want, got in zip(*grads):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layerscale", [0.5, None])
@pytest.mark.parametrize("drop_path", [0.3, 0.0])
def test_block_same_as_plain_residuals_with_index_add(layerscale, drop_path):
    """Block folds LayerScale and the stochastic-depth factor into each branch's output projection;
    the plain form scales the branch output and adds it with index_add (the reference's)."""
    blk = Block(32, 2, "mlp", layerscale_init=layerscale, drop_path=drop_path).train()
    ls = (lambda t, m: t * m.gamma) if layerscale else (lambda t, m: t)
    x0 = torch.randn(10, 7, 32, generator=torch.Generator().manual_seed(1))
    outs = []
    for plain in (True, False):
        x = x0.clone().requires_grad_(True)
        blk.zero_grad()
        torch.manual_seed(3)  # same kept samples in both runs
        if plain:
            keep = int(10 * (1 - drop_path))
            idx = torch.randperm(10)[:keep] if drop_path else torch.arange(10)
            y = _index_add_residual(x, idx, lambda t: ls(blk.attn(blk.norm1(t)), blk.ls1), 10 / keep)
            idx = torch.randperm(10)[:keep] if drop_path else torch.arange(10)
            y = _index_add_residual(y, idx, lambda t: ls(blk.mlp(blk.norm2(t)), blk.ls2), 10 / keep)
        else:
            y = blk(x)
        y.square().sum().backward()
        outs.append([y.detach(), x.grad] + [p.grad.clone() for p in blk.parameters()])
    for want, got in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_sinkhorn_scaling_equals_log_domain():
    g = torch.Generator().manual_seed(0)
    for B, K, scale, temp in ((40, 24, 1.0, 0.07), (300, 4096, 0.3, 0.04), (7, 1000, 2.0, 0.1), (1, 50, 1.0, 0.07)):
        x = torch.randn(B, K, generator=g) * scale
        got, want = L.sinkhorn_knopp(x, temp), L.sinkhorn_knopp_log(x, temp)
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-4)
        torch.testing.assert_close(got.sum(1), torch.ones(B), atol=1e-5, rtol=0)


def test_sinkhorn_falls_back_to_log_domain_where_exp_underflows():
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)) * 50.0
    x[3] -= 500.0  # a sample far below every prototype's best: its column underflows to 0
    got = L.sinkhorn_knopp(x, teacher_temp=0.04)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, L.sinkhorn_knopp_log(x, 0.04), atol=0, rtol=0)
