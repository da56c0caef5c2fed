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


def test_dino_loss_is_mean_cross_entropy_over_pairs():
    s1, s2 = _logits(4, 6, 1).requires_grad_(), _logits(4, 6, 2).requires_grad_()
    t1, t2 = F.softmax(_logits(4, 6, 3), -1), F.softmax(_logits(4, 6, 4), -1)
    got = L.dino_loss([s1, s2], [t1, t2], student_temp=0.1)  # computed with t1 + t2 summed, once per s
    want = sum(-(t * F.log_softmax(s / 0.1, -1)).sum(-1).mean() for s in (s1, s2) for t in (t1, t2))
    assert torch.allclose(got, want, rtol=1e-6)
    g_got, g_want = torch.autograd.grad(got, [s1, s2]), torch.autograd.grad(want, [s1, s2])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g_got, g_want))


def test_soft_cross_entropy_equals_log_softmax_form():
    """The fused cross entropy (one float32 copy of the logits; softmax formed in backward) against
    -sum(t * log_softmax(s / T)) in float64: values, gradients, gradcheck; bf16 logits get a float32
    loss and a bf16 gradient, no gradient reaches the targets."""
    s64 = _logits(5, 40, 1).double().requires_grad_()
    t64 = F.softmax(_logits(5, 40, 2), -1).double() * torch.tensor([[1.0], [2.0], [0.5], [1.0], [0.0]]).double()
    assert torch.autograd.gradcheck(lambda s: L.cross_entropy(t64, s, 0.1), (s64,))
    s, t = _logits(37, 1000, 3, scale=3.0).requires_grad_(), F.softmax(_logits(37, 1000, 4), -1)
    w = torch.rand(37, generator=torch.Generator().manual_seed(5))
    want = -(t.double() * F.log_softmax(s.double() / 0.07, -1)).sum(-1)
    (g_want,) = torch.autograd.grad((want * w.double()).sum(), s)
    got = L.cross_entropy(t, s, 0.07)
    (g_got,) = torch.autograd.grad((got * w).sum(), s)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, rtol=1e-5)
    assert torch.allclose(g_got, g_want, rtol=1e-4, atol=1e-6)
    sb = s.detach().bfloat16().requires_grad_()
    tq = t.clone().requires_grad_()
    got = L.cross_entropy(tq, sb, 0.07)
    got.sum().backward()
    assert got.dtype == torch.float32 and sb.grad.dtype == torch.bfloat16 and tq.grad is None
    assert torch.allclose(got.double(), want, rtol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loss stays float32 under autocast
        under = L.cross_entropy(t, s, 0.07)
    assert under.dtype == torch.float32 and torch.allclose(under.double(), want, rtol=1e-5)


def test_ibot_weighting_hand_computed():
    # 3 images, 4 patches each: image 0 has 1 masked patch, image 1 has 3, image 2 none
    masks = torch.tensor([[0, 1, 0, 0], [1, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    f = mask_batch_fields(masks)
    assert f["mask_indices_list"].tolist() == [1, 4, 5, 7]
    assert torch.allclose(f["masks_weight"], torch.tensor([1.0, 1 / 3, 1 / 3, 1 / 3]))
    assert int(f["n_masked_patches"]) == 4
    # teacher one-hot targets; student logits chosen so each CE is a known number
    K, T = 3, 0.1
    t = torch.eye(K)[[0, 1, 2, 0]]
    s = torch.zeros(4, K)
    s[0, 0] = 2.0 * T  # CE = log(e^2 + 2) - 2
    ce = torch.tensor([math.log(math.e ** 2 + 2) - 2] + [math.log(3.0)] * 3)
    want = (ce[0] * 1.0 + ce[1:].sum() / 3) / 3  # divided by the number of images
    got = L.ibot_loss(s, t, f["masks_weight"], n_images=3, student_temp=T)
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
