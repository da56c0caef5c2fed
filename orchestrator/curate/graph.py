"""Faiss k-NN search over L2-normalised embeddings (cosine = inner product) and connected components.

- `make_index(dim, n, cfg)`: exact `IndexFlatIP` up to `cfg.flat_max` vectors, else IVF-PQ with
  `nlist`, `pq_m`, `nprobe` derived from the pool size unless set (`ivfpq_params`).
- `knn(base, queries, k, cfg)`: (similarities, ids) of the k nearest base vectors of each query.
- `edges(index, queries, k, threshold)`: the k-NN pairs above a similarity, filtered per search chunk.
- `components(n, a, b)`: connected components of those edges -> component id per vector (the smallest
  member index: deterministic).
- `spherical_kmeans(x, k, iters, seed)`: faiss k-means on the unit sphere -> (centroids, assignment).

No entrypoint; used by orchestrator.curate.dedup / retrieve / balance and bench/curate.py.
"""
from __future__ import annotations

import math

import numpy as np

SEARCH_CHUNK = 65536  # queries per faiss search call (bounds the [chunk, k] result memory)


def ivfpq_params(n: int, dim: int, cfg) -> dict:
    """IVF-PQ parameters for n vectors: nlist ~ 4 sqrt(n) (faiss's guideline, 39..2^16 train points per list),
    pq_m = dim/4 sub-quantisers of 8 bits (a divisor of dim), nprobe = nlist/16 (at least 8); cfg overrides."""
    nlist = cfg.nlist or int(min(max(4 * math.sqrt(n), 16), max(16, n // 39)))
    m = cfg.pq_m or max(1, dim // 4)
    while dim % m:
        m -= 1
    return {"nlist": nlist, "pq_m": m, "nprobe": cfg.nprobe or max(8, nlist // 16)}


def make_index(base: np.ndarray, cfg, seed: int = 0):
    """A filled faiss index over `base` ([n, d] float32, rows unit-norm) and a description of it."""
    import faiss
    n, dim = base.shape
    kind = cfg.index if cfg.index != "auto" else ("flat" if n <= cfg.flat_max else "ivfpq")
    if kind == "flat":
        index = _on_gpus(faiss.IndexFlatIP(dim))
        index.add(base)
        return index, {"index": "flat", "gpus": faiss.get_num_gpus()}
    params = ivfpq_params(n, dim, cfg)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["pq_m"], 8, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train = base if n <= 256 * params["nlist"] else base[rng.choice(n, 256 * params["nlist"], replace=False)]
    index.cp.seed = seed
    index.train(train)
    index.add(base)
    index.nprobe = params["nprobe"]
    return index, {"index": "ivfpq", **params}


def _on_gpus(index):
    """An exact index on every GPU faiss sees (a faiss-gpu build: infra/Dockerfile installs one in the
    CUDA image); unchanged on CPU. IVF-PQ stays on CPU. Not run in this repository's tests (no GPU)."""
    import faiss
    if faiss.get_num_gpus() == 0 or not hasattr(faiss, "index_cpu_to_all_gpus"):
        return index
    return faiss.index_cpu_to_all_gpus(index)


def knn(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(sims [q, k] float32, ids [q, k] int64; -1 where fewer than k neighbours exist)."""
    k = min(k, index.ntotal)
    sims, ids = [], []
    for start in range(0, len(queries), SEARCH_CHUNK):
        s, i = index.search(np.ascontiguousarray(queries[start:start + SEARCH_CHUNK]), k)
        sims.append(s)
        ids.append(i)
    if not sims:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(sims), np.concatenate(ids)


def edges(index, queries: np.ndarray, k: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(query rows, base ids) of the k-NN pairs with similarity > threshold, filtered chunk by chunk so
    the full [n, k] result never exists at once (at 100M x 64 it would take 77 GB)."""
    rows, cols = [], []
    k = min(k, index.ntotal)
    for start in range(0, len(queries), SEARCH_CHUNK):
        sims, ids = index.search(np.ascontiguousarray(queries[start:start + SEARCH_CHUNK]), k)
        r, c = np.nonzero((sims > threshold) & (ids >= 0))
        rows.append(r + start)
        cols.append(ids[r, c])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component id of each of n vectors in the graph of edges (a[i], b[i]) (see `edges`).
    The id is the smallest index in the component (independent of edge order). Vectorised min-label
    propagation with pointer jumping: O(edges) numpy work per round, O(log n) rounds in practice."""
    label = np.arange(n)
    while True:
        low = np.minimum(label[a], label[b])
        new = label.copy()
        for side in (a, b, label[a], label[b]):  # each endpoint and its current root take the lower label
            np.minimum.at(new, side, low)
        while not np.array_equal(new[new], new):  # pointer jumping: point every node at its root
            new = new[new]
        if np.array_equal(new, label):
            return label
        label = new


def spherical_kmeans(x: np.ndarray, k: int, iters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(unit centroids [k, d], cluster of each row) by faiss spherical k-means; k is capped at len(x)."""
    import faiss
    k = max(1, min(k, len(x)))
    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=max(256, math.ceil(len(x) / k)))
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    _, assign = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return km.centroids, assign[:, 0]
