"""Copy-detection descriptors on a dinoray backbone: the ISC 2021 / SSCD recipe, scaled to what CPUs allow.

A backbone trained for semantics (DINOv2) ranks two photos of the same kind of object as close as an image
and its edited copy. Copy detection needs instance-level, edit-invariant descriptors. Three pieces, each
measured on the planted-copy test (docs/curation.md):

- `describe(net, u8, grid)`: the last block's normalised patch tokens average-pooled to a grid x grid map,
  each cell L2-normalised, flattened and L2-normalised ([B, grid^2 * dim]). Unlike the CLS token it keeps
  the layout, which is what a copy shares with its original and another image of the same class does not.
- `copy_embedder(weights, cfg)`: query-side multi-crop made symmetric: for every image its full-view
  descriptor and the descriptors of `crop_scales` x `crop_grid`^2 crops (and their horizontal flips), one
  row [1 + views, d] per image. A copy is a crop of its original, so one of the original's crops lines up
  with the copy's full view; dedup (curate/dedup.py) matches full views against every view.
- `finetune(sd, images, copies, ...)`: SSCD-style InfoNCE on (image, edited copy) pairs, starting from a
  pretrained backbone: the copy-detection model the tests build in about a minute.

`whiten_fit` / `whiten` (PCA-whitening fit on the pool itself) live here too; dedup applies them.
No entrypoint; used by curate/embed.py (role: copy), curate/dedup.py, tests and bench/curate.py.
"""
from __future__ import annotations

import itertools
import time

import numpy as np
import torch
import torch.nn.functional as F

CHUNK = 32  # images per forward call of copy_embedder (x n_views crops each)

def crop_boxes(size: int, scales, grid: int) -> list[tuple[int, int, int]]:
    """(top, left, side) of `grid` x `grid` square crops at each scale (fraction of the side), evenly spread."""
    boxes = []
    for scale in scales:
        side = max(1, round(size * scale))
        pos = np.linspace(0, size - side, grid).round().astype(int).tolist() if grid > 1 else [(size - side) // 2]
        boxes += [(top, left, side) for top, left in itertools.product(pos, pos)]
    return boxes


def views(u8: torch.Tensor, scales, grid: int, flip: bool) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> [V, B, 3, H, W]: the full image, then each crop resized back to H x W
    (bicubic, antialiased), then (flip) the same crops mirrored."""
    size = u8.shape[-1]
    x = u8.float()
    out = [u8]
    for top, left, side in crop_boxes(size, scales, grid):
        crop = F.interpolate(x[:, :, top:top + side, left:left + side], size=(size, size), mode="bicubic",
                             align_corners=False, antialias=True)
        out.append(crop.clamp(0, 255).round().to(torch.uint8))
    if flip:
        out += [torch.flip(v, dims=[-1]) for v in out[1:]]
    return torch.stack(out)


def n_views(cfg) -> int:
    """Rows per image that `copy_embedder(weights, cfg)` writes (full view + crops (+ flips))."""
    crops = len(cfg.crop_scales) * cfg.crop_grid ** 2
    return 1 + crops * (2 if cfg.crop_flip else 1)


def describe(net, u8: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, grid*grid*dim] float32, L2-normalised: the last block's normed patch tokens pooled to a grid."""
    import model as dmodel
    tokens = net.prepare_tokens_with_masks(dmodel.normalize_images(u8))
    for blk in net.blocks:
        tokens = blk(tokens)
    patches = net.norm(tokens)[:, 1 + net.num_register_tokens:]
    b, n, d = patches.shape
    side = int(round(n ** 0.5))
    cells = F.adaptive_avg_pool2d(patches.transpose(1, 2).reshape(b, d, side, side), grid)
    return F.normalize(F.normalize(cells, dim=1).flatten(1), dim=-1)


def copy_embedder(weights, cfg, storage_options: dict | None = None):
    """fn(uint8 [B, 3, H, W]) -> float32 [B, n_views(cfg) * d]: each image's full view then its crops."""
    from orchestrator.eval import features
    sd = weights if isinstance(weights, dict) else features.load_state_dict(weights, storage_options)
    net = features.backbone_from_state_dict(sd)

    @torch.no_grad()
    def embed(u8: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in u8.split(CHUNK):  # n_views(cfg) forward passes per image: bound the activations
            v = views(chunk, cfg.crop_scales, cfg.crop_grid, cfg.crop_flip)
            d = describe(net, v.flatten(0, 1), cfg.copy_grid).reshape(v.shape[0], v.shape[1], -1)
            out.append(d.transpose(0, 1).flatten(1))
        return torch.cat(out) if out else torch.zeros(0)
    return embed


def whiten_fit(x: np.ndarray, max_rows: int = 200_000, seed: int = 0, eps: float = 1e-6, dim: int = 0):
    """(mean, projection) of PCA-whitening fit on rows of x (a sample of max_rows), keeping the `dim` leading
    components (0: all); eigenvalues floored at eps x the largest, so directions with no variance are not
    blown up (1e-6 whitens almost fully: 1e-3 left copies and other images apart far less on the test)."""
    if len(x) > max_rows:
        x = x[np.random.default_rng(seed).choice(len(x), max_rows, replace=False)]
    x = x.astype(np.float64)
    mu = x.mean(0)
    w, v = np.linalg.eigh(np.cov((x - mu).T))
    w, v = w[::-1][:dim or None], v[:, ::-1][:, :dim or None]
    return mu.astype(np.float32), (v / np.sqrt(np.maximum(w, eps * w.max()))).astype(np.float32)


def whiten(x: np.ndarray, params) -> np.ndarray:
    """Rows of x whitened and L2-normalised again (float32)."""
    mu, proj = params
    out = (x.astype(np.float32) - mu) @ proj
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def finetune(sd: dict, images: torch.Tensor, copies: torch.Tensor, *, steps: int = 200, batch_size: int = 256,
             lr: float = 1e-3, temperature: float = 0.05, seed: int = 0, log=print) -> dict:
    """A copy-detection model from a pretrained backbone: InfoNCE (SSCD, Pizzi et al. 2022) between two views
    of each image, drawn from the image itself and its edited copies; the descriptor is the CLS token.
    images uint8 [N, 3, H, W], copies uint8 [C, N, 3, H, W] (orchestrator/data/edits.random_copy of each).
    AdamW, 20 warm-up steps, cosine decay. -> the tuned backbone's state dict (the same keys as sd)."""
    import model as dmodel
    from orchestrator.eval import features
    net = features.backbone_from_state_dict(sd).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    pool = torch.cat([images[None], copies])  # view 0: the image, 1..C: its copies
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.randperm(images.shape[0], generator=gen)[:batch_size]
        pick = torch.stack([torch.randperm(pool.shape[0], generator=gen)[:2] for _ in range(len(idx))])
        a, b = pool[pick[:, 0], idx], pool[pick[:, 1], idx]
        z = F.normalize(net(dmodel.normalize_images(torch.cat([a, b]))), dim=-1)
        sim = (z @ z.T / temperature).fill_diagonal_(-1e9)
        n = len(idx)
        loss = F.cross_entropy(sim, torch.cat([torch.arange(n) + n, torch.arange(n)]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"[copy-tune] step {step}/{steps} InfoNCE {loss.item():.3f} ({time.time() - t0:.0f} s)")
    return {k: v.detach().clone() for k, v in net.eval().state_dict().items()}
