"""iBOT block masking: ratios, block shapes, determinism."""

import torch

from model.masking import MaskGenerator, collate_masks


def _bbox(mask):
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    return rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1


def test_single_block_shape_within_spec():
    gen = MaskGenerator(16)
    g = torch.Generator().manual_seed(0)
    aspects = []
    for _ in range(200):
        m = torch.zeros(16, 16, dtype=torch.bool)
        n = gen._add_block(m, 30, g)  # one block on an empty grid
        assert 4 <= n <= 30 and n == int(m.sum())
        r0, r1, c0, c1 = _bbox(m)
        assert (r1 - r0) * (c1 - c0) == n  # one filled rectangle
        aspects.append((r1 - r0) / (c1 - c0))
    # 0.3..3.3 before rounding to whole patches; rounding sqrt(area * aspect) and sqrt(area / aspect) can
    # stretch a small block to 5 x 1 (area 7.4, aspect 3.3: h = round(4.94) = 5, w = round(1.497) = 1),
    # not further (h = 6 needs area > 9.1 at aspect 3.3, w = 1 needs area < 7.5)
    assert min(aspects) >= 0.2 and max(aspects) <= 5.0
    assert min(aspects) < 1 < max(aspects)


def test_mask_never_exceeds_target():
    gen = MaskGenerator(14)
    g = torch.Generator().manual_seed(1)
    for target in (10, 50, 98):
        n = int(gen(target, g).sum())
        assert 0 < n <= target and n >= 0.5 * target


def test_collate_masks_ratios_stratified_and_half_masked():
    n_crops, grid = 64, 16
    N = grid * grid
    out = collate_masks(n_crops, grid, torch.Generator().manual_seed(0))
    masks = out["masks"]
    assert masks.shape == (n_crops, N) and masks.dtype == torch.bool
    counts = masks.sum(1)
    assert int((counts > 0).sum()) == n_crops // 2  # mask_probability 0.5
    ratios = (counts[counts > 0].float() / N).sort().values
    assert ratios.max() <= 0.5 and ratios.min() >= 0.05
    # stratified over linspace(0.1, 0.5, 33): the k-th smallest ratio stays near its stratum
    strata = torch.linspace(0.1, 0.5, 33)
    assert (ratios <= strata[1:] + 0.02).all()
    assert (ratios[: n_crops // 4].mean() < ratios[n_crops // 4:].mean())
    assert int(out["n_masked_patches"]) == int(counts.sum()) == out["mask_indices_list"].numel()
    assert int(out["upperbound"]) >= int(counts.sum())
    assert torch.allclose(out["masks_weight"].sum(), torch.tensor(float(n_crops // 2)))
    assert torch.equal(masks.flatten().nonzero().flatten(), out["mask_indices_list"])


def test_collate_masks_deterministic_per_generator():
    a = collate_masks(8, 8, torch.Generator().manual_seed(5))["masks"]
    b = collate_masks(8, 8, torch.Generator().manual_seed(5))["masks"]
    c = collate_masks(8, 8, torch.Generator().manual_seed(6))["masks"]
    assert torch.equal(a, b) and not torch.equal(a, c)
