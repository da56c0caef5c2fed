"""iBOT block masking (as in BEiT / DINOv2), driven by an explicit torch.Generator.

Each call takes one 63-bit seed from the torch.Generator and draws every scalar of its block search from a
`random.Random` seeded with it, on numpy grids: 128 masks on an 8 x 8 grid take 4-6 ms on one core, against
37-43 ms with one torch.rand call per scalar. Same generator state in, same masks out.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch import Tensor


def _rng(g: torch.Generator | random.Random) -> random.Random:
    """The scalar RNG of one masking call: `g` itself, or seeded by one draw from a torch.Generator."""
    if isinstance(g, random.Random):
        return g
    return random.Random(int(torch.randint(0, 2**63 - 1, (), generator=g)))


class MaskGenerator:
    """Block masks on an h x w patch grid: rectangles of at least `min_num_patches` patches with
    aspect ratio in [min_aspect, 1/min_aspect], added until the requested count is reached;
    at most `max_num_patches` new patches per block (default: half the grid)."""

    def __init__(self, grid: int | tuple[int, int], min_num_patches: int = 4,
                 max_num_patches: int | None = None, min_aspect: float = 0.3,
                 max_aspect: float | None = None):
        self.height, self.width = (grid, grid) if isinstance(grid, int) else tuple(grid)
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = (0.5 * self.num_patches) if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: np.ndarray, max_patches: float, g: torch.Generator | random.Random) -> int:
        """Fill one rectangle of new patches into the bool grid `mask` (in place); returns how many."""
        rnd = _rng(g)
        for _ in range(10):
            area = rnd.uniform(self.min_num_patches, max_patches)
            aspect = math.exp(rnd.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h * w < self.min_num_patches:  # rounding can shrink a block below the minimum
                continue
            if w < self.width and h < self.height:
                top = rnd.randint(0, self.height - h)
                left = rnd.randint(0, self.width - w)
                region = mask[top:top + h, left:left + w]
                new = h * w - int(np.count_nonzero(region))
                if 0 < new <= max_patches:
                    region[...] = True
                    return new
        return 0

    def grid(self, num_masking_patches: int, g: torch.Generator | random.Random) -> np.ndarray:
        """The bool [height, width] mask as a numpy array."""
        rnd = _rng(g)
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            max_patches = min(num_masking_patches - count, self.max_num_patches)
            delta = self._add_block(mask, max_patches, rnd)
            if delta == 0:
                break
            count += delta
        return mask

    def __call__(self, num_masking_patches: int, generator: torch.Generator | random.Random) -> Tensor:
        return torch.from_numpy(self.grid(num_masking_patches, generator))


def collate_masks(n_crops: int, grid: int | tuple[int, int], generator: torch.Generator,
                  mask_ratio_min_max: tuple[float, float] = (0.1, 0.5), mask_probability: float = 0.5,
                  mask_generator: MaskGenerator | None = None) -> dict[str, Tensor]:
    """Masks for `n_crops` global crops (crop-major order does not matter: they are shuffled).

    A fraction `mask_probability` of the crops is masked; their target ratios are stratified over
    linspace(min, max, n_masked + 1) (one uniform draw per stratum); the rest get empty masks.
    Returns the batch keys masks, mask_indices_list, masks_weight, n_masked_patches, upperbound.
    """
    gen = mask_generator or MaskGenerator(grid)
    rnd = _rng(generator)
    n_tokens = gen.num_patches
    n_masked = int(n_crops * mask_probability)
    probs = np.linspace(mask_ratio_min_max[0], mask_ratio_min_max[1], n_masked + 1).tolist()
    masks = np.zeros((n_crops, gen.height, gen.width), dtype=bool)
    upperbound = 0
    for i in range(n_masked):
        ratio = rnd.uniform(probs[i], probs[i + 1])
        masks[i] = gen.grid(int(n_tokens * ratio), rnd)
        upperbound += int(n_tokens * probs[i + 1])
    order = list(range(n_crops))
    rnd.shuffle(order)
    collated = torch.from_numpy(masks[order].reshape(n_crops, n_tokens))
    return mask_batch_fields(collated, upperbound)


def mask_batch_fields(masks: Tensor, upperbound: int | None = None) -> dict[str, Tensor]:
    """Derived batch fields for bool masks [n_crops, N]."""
    masks = masks.bool()
    idx = masks.flatten().nonzero().flatten()
    per_image = masks.sum(-1).clamp(min=1).float()
    weight = (1.0 / per_image).unsqueeze(-1).expand_as(masks)[masks]
    return {
        "masks": masks,
        "mask_indices_list": idx,
        "masks_weight": weight.float(),
        "n_masked_patches": torch.tensor([idx.numel()], dtype=torch.long),
        "upperbound": torch.tensor([idx.numel() if upperbound is None else upperbound], dtype=torch.long),
    }
