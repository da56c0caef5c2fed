"""Balancing by hierarchical k-means with resampling, after Vo et al. (2024), "Automatic data curation
for self-supervised learning: a clustering-based approach".

- Level 1 clusters the images into levels[0] clusters; level l clusters level l-1's centroids into
  levels[l] clusters (hierarchical k-means). At each level, `resample_steps` times, the k-means is
  re-fitted on an even sample: from every cluster, the points closest to its centroid, as many as the
  smallest cluster's share r = max(1, n_points // (4 k)) (Vo et al., sec. 4: "resampling" moves centroids
  off the dense head concepts towards a uniform cover).
- Sampling is top-down and balanced: the target is split evenly over the top-level clusters (a cluster
  with fewer images gives all it has and its unused share goes to the others), recursively down to the
  level-1 clusters, which give a seeded random choice of their images.

Simplified against the paper: spherical k-means (cosine) at every level, the resample size rule above,
and the "r" of their sampling is the even split. No entrypoint; the curate phase's "balance" stage.
"""
from __future__ import annotations

import numpy as np

from orchestrator.curate import graph


def _resampled_kmeans(x: np.ndarray, k: int, steps: int, iters: int, seed: int) -> np.ndarray:
    """Assignment of x's rows to k clusters after `steps` resampled re-fits."""
    centroids, assign = graph.spherical_kmeans(x, k, iters, seed)
    for step in range(steps):
        per = max(1, len(x) // (4 * len(centroids)))
        sims = np.einsum("ij,ij->i", x, centroids[assign])
        take = np.concatenate([np.nonzero(assign == c)[0][np.argsort(-sims[assign == c])[:per]]
                               for c in np.unique(assign)])
        centroids, _ = graph.spherical_kmeans(x[take], len(centroids), iters, seed + step + 1)
        assign = np.argmax(x @ centroids.T, axis=1)
    return assign


def _split(total: int, sizes: list[int]) -> list[int]:
    """Even split of `total` over groups holding `sizes` items; small groups give all, the rest share."""
    share, left, order = [0] * len(sizes), total, np.argsort(sizes, kind="stable")
    for rank, g in enumerate(order.tolist()):
        share[g] = min(sizes[g], left // (len(sizes) - rank))
        left -= share[g]
    return share


def balance(x: np.ndarray, cfg, iters: int, seed: int) -> np.ndarray:
    """Row indices (sorted) of a balanced subset of x ([n, d], unit rows) of size min(cfg.target, n)."""
    level_x, tree = x, []  # tree[l]: cluster (at level l+1) of each unit of level l (level 0 = points)
    for level, k in enumerate(cfg.levels):
        k = max(1, min(k, len(level_x)))
        assign = _resampled_kmeans(np.ascontiguousarray(level_x, np.float32), k, cfg.resample_steps, iters,
                                   seed + 100 * level)
        _, assign = np.unique(assign, return_inverse=True)  # drop empty clusters
        tree.append(assign)
        cents = np.stack([level_x[assign == c].mean(0) for c in range(assign.max() + 1)])
        level_x = cents / np.linalg.norm(cents, axis=1, keepdims=True).clip(1e-12)
    units = [[np.array([i]) for i in range(len(x))]]  # units[l][c]: the points under unit c of level l
    for assign in tree:
        units.append([np.concatenate([units[-1][u] for u in np.nonzero(assign == c)[0]])
                      for c in range(assign.max() + 1)])
    top = list(range(len(units[-1])))
    rng = np.random.default_rng(seed)
    return np.sort(_spread(len(units) - 1, top, min(cfg.target, len(x)), units, tree, rng))


def _spread(level: int, group: list[int], n: int, units, tree, rng) -> np.ndarray:
    """n points from the units `group` of `level`, split evenly over them, recursively down the tree."""
    if level == 0:
        pts = np.array(group)
        return rng.choice(pts, n, replace=False) if n < len(pts) else pts
    shares = _split(n, [len(units[level][u]) for u in group])
    parts = [_spread(level - 1, np.nonzero(tree[level - 1] == u)[0].tolist(), m, units, tree, rng)
             for u, m in zip(group, shares) if m]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)
