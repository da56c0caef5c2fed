"""Retrieval around seed sets (DINOv2 paper, section 3 "Self-supervised image retrieval", appendix A.3).

- sample mode (large seed sets): the k nearest pool images of every seed image (the paper: k = 4 or 32).
- cluster mode (small seed sets): spherical k-means of the pool into n_clusters; every cluster holding at
  least `min_seed_hits` seed images contributes up to `per_cluster` of its images (a seeded random choice;
  the paper: 100,000 clusters, at least 3 seed images, "up to N images per cluster").

`retrieve(pool_emb, candidates, seeds, cfg, seed)` -> {pool index: {"seed_sets": [...], "clusters": [...]}}
for the candidates (pool indices left after deduplication). No entrypoint; the curate phase's
"retrieve" stage.
"""
from __future__ import annotations

import numpy as np

from orchestrator.curate import graph


def sample_mode(pool: np.ndarray, seed_emb: np.ndarray, k: int, cfg) -> np.ndarray:
    """Positions (into `pool`) of the k nearest pool rows of each seed row, deduplicated, sorted."""
    index, _ = graph.make_index(pool, cfg)
    _, ids = graph.knn(index, seed_emb, k)
    return np.unique(ids[ids >= 0])


def cluster_mode(assign: np.ndarray, centroids: np.ndarray, seed_emb: np.ndarray, spec,
                 rng: np.random.Generator) -> dict[int, np.ndarray]:
    """{cluster: positions taken} for the clusters with >= spec.min_seed_hits seed images."""
    seed_cluster = np.argmax(seed_emb @ centroids.T, axis=1)
    hits = np.bincount(seed_cluster, minlength=len(centroids))
    out = {}
    for cluster in np.nonzero(hits >= spec.min_seed_hits)[0].tolist():
        members = np.nonzero(assign == cluster)[0]
        if len(members) > spec.per_cluster:
            members = np.sort(rng.choice(members, spec.per_cluster, replace=False))
        out[int(cluster)] = members
    return out


def retrieve(pool_emb: np.ndarray, candidates: np.ndarray, seeds: dict[str, np.ndarray], cfg, seed: int,
             log=print, kmeans=None) -> tuple[dict[int, dict], dict]:
    """-> ({pool index: {"seed_sets", "clusters"}}, stats). `seeds`: {seed set name: embeddings}; its spec
    is in cfg.seeds (same names). `kmeans` ((centroids, assign) over the candidates) is computed when a
    cluster-mode set needs it and not given; stats["kmeans"] carries it for the caller to keep."""
    pool = np.ascontiguousarray(pool_emb[candidates])
    reasons: dict[int, dict] = {}
    stats = {"per_set": {}, "kmeans": kmeans}
    rng = np.random.default_rng(seed)
    for spec in cfg.seeds:
        seed_emb = np.ascontiguousarray(seeds[spec.name], dtype=np.float32)
        if spec.mode == "sample":
            taken = {-1: sample_mode(pool, seed_emb, spec.k, cfg.search)}
        else:
            if stats["kmeans"] is None:
                log(f"[curate] spherical k-means of {len(pool)} pool images into {cfg.n_clusters} clusters")
                stats["kmeans"] = graph.spherical_kmeans(pool, cfg.n_clusters, cfg.kmeans_iters, seed)
            centroids, assign = stats["kmeans"]
            taken = cluster_mode(assign, centroids, seed_emb, spec, rng)
        n_taken = 0
        for cluster, positions in taken.items():
            for idx in candidates[positions].tolist():
                entry = reasons.setdefault(int(idx), {"seed_sets": [], "clusters": []})
                if spec.name not in entry["seed_sets"]:
                    entry["seed_sets"].append(spec.name)
                if cluster >= 0 and cluster not in entry["clusters"]:
                    entry["clusters"].append(cluster)
            n_taken += len(positions)
        stats["per_set"][spec.name] = {"mode": spec.mode, "seed_images": len(seed_emb), "retrieved": n_taken,
                                       **({"clusters": len(taken)} if spec.mode == "cluster" else {})}
        log(f"[curate] seed set {spec.name} ({spec.mode}, {len(seed_emb)} images): {n_taken} pool images")
    return reasons, stats
