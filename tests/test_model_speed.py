"""The CPU step's faster paths give the numbers of the plain ones (within fp32 tolerance):
stochastic depth by contiguous runs vs index_add (also with a bf16 branch), LayerScale folded into the
projections, the last block on the read tokens only, the patch embedding as one matrix product,
Sinkhorn-Knopp by scaling vectors vs the log domain (and on bf16 logits without a float32 copy), the
prototypes' weight norm written once in the compute dtype. The attention's matmul form: test_model_backbone."""

from __future__ import annotations

import pytest
import torch

from model import DistillMetaArch, SSLMetaArch
from model import losses as L
from model.drop_path import add_subset_residual
from model.heads import WeightNormLinear, _WeightNorm
from model.layers import Block, PatchEmbed
from model.masking import collate_masks


def _index_add_residual(x, idx, branch, scale):
    """The reference's drop_add_residual_stochastic_depth."""
    return torch.index_add(x, 0, idx, branch(x[idx]) * scale)


@pytest.mark.parametrize("branch_dtype", [torch.float32, torch.bfloat16])
def test_subset_residual_equals_index_add_values_and_gradients(branch_dtype):
    """Also with a bf16 branch on the float32 stream (autocast): the sum stays float32, with the branch's
    output promoted inside the addition (within bf16 rounding of index_add of the branch cast to float32:
    the scale meets the branch before its rounding on one side, after it on the other)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    for B, idx in ((8, [5, 0, 6, 2, 7, 1]), (8, [3]), (5, [4, 0, 1, 2, 3]), (6, [2, 3])):
        idx = torch.tensor(idx)
        grads = []
        for fn in (_index_add_residual, add_subset_residual):
            x = torch.randn(B, 4, 16, generator=torch.Generator().manual_seed(B), requires_grad=True)
            lin.zero_grad()
            if fn is _index_add_residual:
                branch = lambda t: lin(t).to(branch_dtype).float()  # noqa: E731
            else:
                branch = lambda t, s: (lin(t) * s).to(branch_dtype)  # noqa: E731
            y = fn(x, idx, branch, B / len(idx))
            y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
            assert y.dtype == torch.float32
            grads.append((y.detach(), x.grad, lin.weight.grad.clone(), lin.bias.grad.clone()))
        tol = dict(atol=1e-6, rtol=1e-5) if branch_dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        for want, got in zip(*grads):
            torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("patch,size", [(4, (32, 32)), (14, (98, 98)), (14, (224, 210)), (8, (35, 29))])
def test_patch_embed_equals_its_convolution_values_and_gradients(patch, size):
    """PatchEmbed's matrix product gives the released Conv2d's tokens and gradients, also where the
    image does not divide into patches (the convolution drops the border: so must we)."""
    torch.manual_seed(0)
    pe = PatchEmbed(patch, 3, 24).double()  # float64: the sums' order differs, the sums do not
    outs = []
    for fn in (lambda x: pe.proj(x).flatten(2).transpose(1, 2), pe):
        x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64,
                        requires_grad=True)
        pe.zero_grad()
        y = fn(x)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y))
        outs.append((y.detach(), x.grad, pe.proj.weight.grad.clone(), pe.proj.bias.grad.clone()))
    assert outs[1][0].shape == (3, (size[0] // patch) * (size[1] // patch), 24)
    for want, got in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


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


def test_sinkhorn_of_bf16_logits_equals_their_float32_copy():
    """bf16 teacher logits (autocast) are promoted inside the first subtraction, not copied to float32 first."""
    x = (torch.randn(300, 4096, generator=torch.Generator().manual_seed(1)) * 0.3).bfloat16()
    got = L.sinkhorn_knopp(x, 0.04)
    assert got.dtype == torch.float32 and x.dtype == torch.bfloat16
    torch.testing.assert_close(got, L.sinkhorn_knopp(x.float(), 0.04), atol=0, rtol=0)


def test_weight_norm_gradients_in_float64():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(40, 8, dtype=torch.float64, generator=g, requires_grad=True)
    gain = (torch.rand(40, 1, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda v, gain: _WeightNorm.apply(v, gain, torch.float64), (v, gain))


@pytest.mark.parametrize("n_out", [300, 2500])  # one block of rows; three, the last partial
@pytest.mark.parametrize("autocast", [False, True])
def test_prototype_layer_equals_plain_weight_norm(autocast, n_out):
    """Logits and the gradients of weight_v, weight_g and the input against v * g / ||v|| through
    autograd (under bf16 autocast: the weight is written in bf16 once instead of cast for the matmul)."""
    torch.manual_seed(0)
    layer = WeightNormLinear(16, n_out)
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 1.5)
    x = torch.randn(12, 16)
    outs = []
    for plain in (True, False):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if plain:
                v = layer.weight_v
                w = v * (layer.weight_g / torch.linalg.vector_norm(v, dim=1, keepdim=True))
                y = torch.nn.functional.linear(xi, w)
            else:
                y = layer(xi)
        (y.float() * torch.linspace(-1, 1, n_out)).sum().backward()
        outs.append([y.float(), xi.grad, layer.weight_v.grad, layer.weight_g.grad])
    tol = dict(atol=1e-2, rtol=1e-2) if autocast else dict(atol=1e-6, rtol=1e-5)
    for want, got in zip(*outs):
        torch.testing.assert_close(got, want, **tol)


def test_sinkhorn_gives_zero_where_exp_would_be_subnormal():
    """Spread logits and a sharp teacher put part of (x - max) / T below log(1.2e-38), where exp is
    subnormal: those entries are 0 (no subnormal exp or matmul operands; slow on CPUs), every other
    entry equals the log-domain algorithm's to 1e-4 relative, however small."""
    x = torch.rand(300, 512, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = (x - x.amax(0)) / 0.02
    assert ((z < -87.34) & (z > -103.98)).float().mean() > 0.05  # the subnormal band is populated
    got, want = L.sinkhorn_knopp(x, 0.02), L.sinkhorn_knopp_log(x, 0.02)
    assert (got[z < -87.34] == 0).all()
    assert (got[z < L._EXP_FLOOR - 1e-3] == 0).all()  # up to log(smallest normal) + 1, where exp is still normal
    normal = want > 1e-30
    torch.testing.assert_close(got[normal], want[normal], atol=0, rtol=1e-4)
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-4)


def test_sinkhorn_falls_back_to_log_domain_where_exp_underflows():
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)) * 50.0
    x[3] -= 500.0  # a sample far below every prototype's best: its column underflows to 0
    got = L.sinkhorn_knopp(x, teacher_temp=0.04)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, L.sinkhorn_knopp_log(x, 0.04), atol=0, rtol=0)


@pytest.mark.parametrize("drop_path", [0.3, 0.0])
@pytest.mark.parametrize("n_read", [0, 5])
def test_block_on_read_rows_equals_full_block_at_those_rows(drop_path, n_read):
    """Block(x, read): each sample's CLS and the rows `read` only; the full block's values and
    gradients at those rows (the same samples dropped)."""
    blk = Block(32, 2, "mlp", layerscale_init=0.5, drop_path=drop_path).train()
    B, N = 10, 7
    x0 = torch.randn(B, N, 32, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    read = torch.randperm(B * (N - 1), generator=g)[:n_read]
    read = read // (N - 1) * N + 1 + read % (N - 1)  # patch rows (never a CLS row)
    rows = torch.cat([torch.arange(B) * N, read])
    up = torch.randn(B + n_read, 32, generator=g)
    outs = []
    for full in (True, False):
        x = x0.clone().requires_grad_(True)
        blk.zero_grad()
        torch.manual_seed(3)
        y = blk(x).flatten(0, 1)[rows] if full else blk(x, read)
        (y * up).sum().backward()
        outs.append([y.detach(), x.grad] + [p.grad.clone() for p in blk.parameters()])
    for want, got in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["ssl", "distill", "distill_no_heads"])
def test_step_reading_only_the_lost_tokens_equals_the_full_last_block(arch):
    """The meta-archs' backbones compute their last block only at the tokens the losses read (CLS,
    masked patches; `skip_unread_tokens`): the loss and every gradient equal those of full last
    blocks, with registers and stochastic depth on."""
    cfg = dict(arch="vit_pico", patch_size=4, img_size=32, head_n_prototypes=64, head_hidden_dim=48,
               head_bottleneck_dim=16, num_register_tokens=2, drop_path_rate=0.3, layerscale_init=0.5)
    if arch != "ssl":
        cfg.update(teacher_arch="vit_pico", feature_loss_weight=1.0)
    if arch == "distill_no_heads":
        cfg.update(dino_loss_weight=0.0, ibot_loss_weight=0.0)
    g = torch.Generator().manual_seed(0)
    batch = {"global_crops": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g),
             "local_crops": torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=g)}
    batch.update(collate_masks(8, 8, g))
    assert 0 < batch["mask_indices_list"].numel() < 8 * 64
    torch.manual_seed(0)
    m = SSLMetaArch(cfg) if arch == "ssl" else DistillMetaArch(cfg)
    m.train()
    with torch.no_grad():
        for p in m.teacher.parameters():  # a teacher unlike the student: both towers' paths matter
            p.add_(torch.randn_like(p) * 0.1)
    results = []
    for skip in (False, True):
        for tower in (m.student, m.teacher):
            tower["backbone"].skip_unread_tokens = skip
        m.zero_grad()
        torch.manual_seed(5)
        loss, parts = m(batch, teacher_temp=0.05)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.student.named_parameters() if p.grad is not None}
        results.append([loss.detach()] + [parts[k] for k in sorted(parts)] + [grads])
    assert len(results[0][-1]) > 10 and results[0][-1].keys() == results[1][-1].keys()
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
