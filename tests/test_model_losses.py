"""Losses: Sinkhorn-Knopp (incl. 2 gloo ranks), softmax centering, DINO, iBOT weighting, KoLeo, Gram."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from model import losses as L
from model.masking import mask_batch_fields


def _logits(n, k, seed=0, scale=1.0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale


def test_sinkhorn_rows_and_columns_normalised():
    x = _logits(64, 32)
    q = L.sinkhorn_knopp(x, teacher_temp=0.1, n_iterations=3)
    assert q.shape == (64, 32) and (q >= 0).all()
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-4)  # each sample is a distribution
    q = L.sinkhorn_knopp(x, teacher_temp=0.5, n_iterations=200)
    assert torch.allclose(q.sum(0) * 32 / 64, torch.ones(32), atol=1e-4)  # equal prototype use
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-4)


def _sinkhorn_linear(x, temp, n_it=3):
    """The paper's algorithm written plainly in the linear domain."""
    Q = torch.exp(x / temp).t()
    K, B = Q.shape
    Q /= Q.sum()
    for _ in range(n_it):
        Q /= Q.sum(1, keepdim=True)
        Q /= K
        Q /= Q.sum(0, keepdim=True)
        Q /= B
    return (Q * B).t()


def test_sinkhorn_equals_linear_domain_algorithm():
    x = _logits(40, 24, seed=7)
    torch.testing.assert_close(L.sinkhorn_knopp(x, 0.07), _sinkhorn_linear(x, 0.07), atol=1e-6, rtol=1e-4)


def test_sinkhorn_finite_for_extreme_logits():
    x = _logits(16, 8, scale=50.0)
    q = L.sinkhorn_knopp(x, teacher_temp=0.04)
    assert torch.isfinite(q).all()
    assert torch.allclose(q.sum(1), torch.ones(16), atol=1e-4)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, x, rows, center0):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        lo, hi = rows[rank], rows[rank + 1]
        q = L.sinkhorn_knopp(x[lo:hi], teacher_temp=0.07, process_group=dist.group.WORLD)
        want = L.sinkhorn_knopp(x, teacher_temp=0.07)
        torch.testing.assert_close(q, want[lo:hi], atol=1e-6, rtol=1e-5)
        c = center0.clone()
        L.update_center_(c, x[lo:hi], momentum=0.9, process_group=dist.group.WORLD)
        c_want = center0.clone()
        L.update_center_(c_want, x, momentum=0.9)
        torch.testing.assert_close(c, c_want, atol=1e-6, rtol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sinkhorn_and_center_two_ranks_equal_one_rank():
    x = _logits(10, 16, seed=3)
    center0 = torch.randn(1, 16, generator=torch.Generator().manual_seed(4))
    # unequal split (iBOT: ranks hold different numbers of masked tokens)
    mp.start_processes(_worker, args=(2, _free_port(), x, [0, 3, 10], center0), nprocs=2,
                       join=True, start_method="spawn")


def test_softmax_centering_and_center_update():
    x = _logits(8, 5)
    center = torch.zeros(1, 5)
    p = L.softmax_center(x, center, 0.1)
    assert torch.allclose(p, F.softmax(x / 0.1, -1))
    L.update_center_(center, x, momentum=0.9)
    assert torch.allclose(center, 0.1 * x.mean(0, keepdim=True))


def _ce(t, logits, T):
    """The plain autograd form: -sum(t * log_softmax(logits / T)) per row."""
    return -(t * F.log_softmax(logits / T, -1)).sum(-1)


def test_dino_terms_are_mean_cross_entropy_over_pairs():
    """2 global and 3 local crops of 4 images: every global crop against the other's teacher rows,
    every local crop against both; the mean over images, summed over pairs, over the 8 pairs."""
    B, K, D, T = 4, 6, 5, 0.1
    x, w = _logits(5 * B, D, 1).requires_grad_(), _logits(K, D, 2).requires_grad_()
    t = F.softmax(_logits(2 * B, K, 3), -1)
    s, (t0, t1) = (x @ w.t()).split(B), t.split(B)
    want_g = (_ce(t1, s[0], T).mean() + _ce(t0, s[1], T).mean()) / 8
    want_l = sum(_ce(tj, s[c], T).mean() for c in (2, 3, 4) for tj in (t0, t1)) / 8
    got_g, got_l = L.dino_terms(L.prototype_cross_entropy(x, w, L.dino_targets(t, 2, 3), T), 2, 3)
    assert torch.allclose(got_g, want_g, rtol=1e-6) and torch.allclose(got_l, want_l, rtol=1e-6)
    g_got, g_want = torch.autograd.grad(got_g + 2 * got_l, [x, w]), torch.autograd.grad(want_g + 2 * want_l, [x, w])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g_got, g_want))


@pytest.mark.parametrize("block_bytes", [4 << 20, 4 * 1000 * 5, 4 * 1000])  # all rows; 5 rows; 1 row per block
def test_prototype_cross_entropy_equals_log_softmax_form(monkeypatch, block_bytes):
    """The fused head + cross entropy (logits overwritten by their gradient, block by block) against
    autograd through x @ w^T, log_softmax and the target dot: gradcheck in float64; float32 values and
    gradients for rows in two segments (one indexed) and any block size; bf16 inputs and autocast give
    a float32 loss near float32's, gradients in the inputs' dtypes; no gradient reaches the targets."""
    monkeypatch.setattr(L, "_CPU_BLOCK_BYTES", block_bytes)
    x64, w64 = _logits(5, 8, 1).double().requires_grad_(), _logits(40, 8, 2).double().requires_grad_()
    t64 = F.softmax(_logits(5, 40, 3), -1).double() * torch.tensor([[1.0], [2.0], [0.5], [1.0], [0.0]]).double()
    targets64 = L.Targets((t64, None))
    assert torch.autograd.gradcheck(lambda a, b: L.prototype_cross_entropy(a, b, targets64, 0.1), (x64, w64))
    x, w = _logits(37, 16, 4).requires_grad_(), _logits(1000, 16, 5, scale=0.3).requires_grad_()
    t = F.softmax(_logits(30, 1000, 6), -1)
    idx = torch.tensor([3, 3, 0, 29] * 7)
    rows = torch.cat([t[:9], t[idx]])
    r = torch.rand(37, generator=torch.Generator().manual_seed(7))
    want = _ce(rows.double(), x.double() @ w.double().t(), 0.07)
    g_want = torch.autograd.grad((want * r.double()).sum(), [x, w])
    tq = t.clone().requires_grad_()
    got = L.prototype_cross_entropy(x, w, L.Targets((tq[:9], None), (tq, idx)), 0.07)
    g_got = torch.autograd.grad((got * r).sum(), [x, w])
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, rtol=1e-5)
    assert all(torch.allclose(a, b.float(), rtol=1e-4, atol=1e-5 * b.abs().max().item()) for a, b in zip(g_got, g_want))
    xb, wb = x.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    got = L.prototype_cross_entropy(xb, wb, L.Targets((tq[:9], None), (tq, idx)), 0.07)
    got.sum().backward()
    assert got.dtype == torch.float32 and xb.grad.dtype == wb.grad.dtype == torch.bfloat16 and tq.grad is None
    assert torch.allclose(got.double(), want, rtol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, the loss stays float32
        under = L.prototype_cross_entropy(x, w, L.Targets((t[:9], None), (t, idx)), 0.07)
        g_under = torch.autograd.grad(under.sum(), [x, w])
    assert under.dtype == torch.float32 and torch.allclose(under.double(), want, rtol=2e-2)
    assert g_under[0].dtype == g_under[1].dtype == torch.float32
    with pytest.raises(ValueError, match="cover 9 rows"):
        L.prototype_cross_entropy(x, w, L.Targets((t[:9], None)), 0.07)


def test_ibot_weighting_hand_computed():
    # 3 images, 4 patches each: image 0 has 1 masked patch, image 1 has 3, image 2 none
    masks = torch.tensor([[0, 1, 0, 0], [1, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    f = mask_batch_fields(masks)
    assert f["mask_indices_list"].tolist() == [1, 4, 5, 7]
    assert torch.allclose(f["masks_weight"], torch.tensor([1.0, 1 / 3, 1 / 3, 1 / 3]))
    assert int(f["n_masked_patches"]) == 4
    # teacher one-hot targets; student logits (x @ identity prototypes) chosen so each CE is a known number
    K, T = 3, 0.1
    t = torch.eye(K)[[0, 1, 2, 0]]
    s = torch.zeros(4, K)
    s[0, 0] = 2.0 * T  # CE = log(e^2 + 2) - 2
    ce = torch.tensor([math.log(math.e ** 2 + 2) - 2] + [math.log(3.0)] * 3)
    want = (ce[0] * 1.0 + ce[1:].sum() / 3) / 3  # divided by the number of images
    ce_rows = L.prototype_cross_entropy(s, torch.eye(K), L.Targets((t, None)), T)
    got = L.ibot_terms(ce_rows, f["masks_weight"], n_images=3)
    assert torch.allclose(got, want)


def test_koleo_finite_for_batch_one_and_duplicates():
    one = torch.randn(1, 8, requires_grad=True)
    loss = L.koleo_loss(one)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(one.grad).all()
    dup = torch.ones(4, 8).requires_grad_(True)
    loss = L.koleo_loss(dup)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(dup.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(L.koleo_loss(torch.ones(3, 8).bfloat16()))


def test_koleo_prefers_spread_points():
    spread = torch.eye(8)
    clustered = torch.ones(8, 8) + 0.01 * _logits(8, 8)
    assert L.koleo_loss(spread) < L.koleo_loss(clustered)
    near = torch.ones(4, 8) + 1e-3 * _logits(4, 8)
    near.requires_grad_(True)
    L.koleo_loss(near).backward()
    assert near.grad.abs().sum() > 0  # near-duplicates are pushed apart


def test_gram_loss():
    a = _logits(2 * 9, 16).reshape(2, 9, 16)
    assert L.gram_loss(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert L.gram_loss(a, a * 3.0).item() == pytest.approx(0.0, abs=1e-6)  # scale invariant
    assert L.gram_loss(a, _logits(18, 16, 5).reshape(2, 9, 16)) > 0.01


def test_entropy_extremes():
    K = 16
    assert L.entropy(torch.full((2, K), 1 / K)).item() == pytest.approx(math.log(K), rel=1e-5)
    assert L.entropy(torch.eye(K)).item() == pytest.approx(0.0, abs=1e-6)
