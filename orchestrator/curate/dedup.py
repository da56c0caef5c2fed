"""Self- and relative deduplication on copy-detection embeddings (DINOv2 paper, section 3 and appendix A).

`cfg` is a CurateDedupCfg, `search` a CurateSearchCfg (pipeline/schema.py). `emb` rows are one image each:
`views` descriptors of `dim` values side by side, the full view first (views = 1 for a CLS embedder;
copydesc.n_views for `role: copy`, whose other views are crops of the image, see curate/copydesc.py).

- `self_dedup(emb, ok, cfg, search, views=...)`: the k-NN graph of the pool: every image's full view is
  searched among all views of all images (k = cfg.k neighbours beyond its own views); the similarity of
  two images is their best-matching view; edges above cfg.threshold; one image kept per connected
  component: the one with the smallest pool index.
- `relative_dedup(emb, comp, keep, exclude, cfg, search, views=...)`: every component holding a pool image
  whose similarity to some exclude-set image is > cfg.exclude_threshold is dropped whole (exclude full
  views against pool views, and pool full views against exclude views).
- `cfg.whiten`: every view is PCA-whitened first, fit on the pool's own views (ISC 2021 post-processing).
- `cfg.normalize`: from each similarity, the mean of both images' similarities to their background
  neighbours (distinct images at ranks BACKGROUND) is subtracted (CSLS, Conneau et al. 2018; the ISC 2021
  score normalisation with the pool as its own background), so the thresholds are margins above what
  an image's ordinary neighbours reach. Costs a second search pass.

No entrypoint; `orchestrator.curate.phase` runs them as the "dedup" and "exclude" stages.
"""
from __future__ import annotations

import numpy as np

from orchestrator.curate import copydesc, graph

BACKGROUND = (2, 11)  # background neighbours for cfg.normalize: distinct images ranked 2..11 (rank 1 may be a copy)


def _views(emb: np.ndarray, views: int, whitening) -> tuple[np.ndarray, np.ndarray]:
    """(full views [n, d], all views [n * views, d]: image i's at rows i*views ...), whitened if asked."""
    every = np.ascontiguousarray(emb.reshape(len(emb) * views, -1), dtype=np.float32)
    if whitening is not None:
        every = copydesc.whiten(every, whitening)
    return np.ascontiguousarray(every[::views]), every


def fit_whitening(emb: np.ndarray, ok: np.ndarray, cfg, views: int, seed: int = 0):
    """PCA-whitening of the decodable pool images' views, or None when cfg.whiten is off."""
    if not cfg.whiten:
        return None
    return copydesc.whiten_fit(emb[ok].reshape(int(ok.sum()) * views, -1), seed=seed)


def _image_hits(index, queries: np.ndarray, k: int, views: int, self_ids: bool):
    """Per search chunk: (first query row, sims [q, k], owner image [q, k], mask [q, k]); mask marks the best
    view of each distinct image in a query's list (not the query's own image when self_ids)."""
    for start in range(0, len(queries), graph.SEARCH_CHUNK):
        sims, ids = index.search(np.ascontiguousarray(queries[start:start + graph.SEARCH_CHUNK]),
                                 min(k, index.ntotal))
        owner = np.where(ids >= 0, ids // views, -1)
        q, kk = owner.shape
        key = (np.arange(q)[:, None] * (owner.max() + 2) + owner + 1).ravel()  # rows are sorted by similarity:
        first = np.zeros(q * kk, bool)                                        # the first hit is the best view
        first[np.unique(key, return_index=True)[1]] = True
        mask = first.reshape(q, kk) & (owner >= 0)
        if self_ids:
            mask &= owner != (start + np.arange(q))[:, None]
        yield start, sims, owner, mask


def _background(index, queries: np.ndarray, k: int, views: int, self_ids: bool) -> np.ndarray:
    """Mean similarity of each query to its background neighbours (distinct images ranked BACKGROUND)."""
    out = np.zeros(len(queries), np.float32)
    lo, hi = BACKGROUND
    for start, sims, _, mask in _image_hits(index, queries, k, views, self_ids):
        rank = np.cumsum(mask, axis=1)
        sel = mask & (rank >= lo) & (rank <= hi)
        out[start:start + len(sims)] = (sims * sel).sum(1) / np.maximum(sel.sum(1), 1)
    return out


def _pairs(index, queries: np.ndarray, k: int, views: int, threshold: float, self_ids: bool,
           q_bg: np.ndarray | None = None, base_bg: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(query rows, base images) whose best-view similarity (minus the mean background when given) > threshold."""
    rows, cols = [], []
    for start, sims, owner, mask in _image_hits(index, queries, k, views, self_ids):
        if q_bg is not None:
            sims = sims - (q_bg[start:start + len(sims), None] + base_bg[np.maximum(owner, 0)]) / 2
        r, c = np.nonzero(mask & (sims > threshold))
        rows.append(r + start)
        cols.append(owner[r, c])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)


def self_dedup(emb: np.ndarray, ok: np.ndarray, cfg, search, seed: int = 0, views: int = 1) -> dict:
    """-> {"keep": bool [n], "component": int [n], "duplicates": int, "index": {...}} (undecodable rows dropped)."""
    full, every = _views(emb, views, fit_whitening(emb, ok, cfg, views, seed))
    index, desc = graph.make_index(every, search, seed)
    k = cfg.k + views  # each image finds its own views too
    bg = _background(index, full, k, views, True) if cfg.normalize else None
    rows, cols = _pairs(index, full, k, views, cfg.threshold, True, bg, bg)
    comp = graph.components(len(emb), rows, cols)
    keep = (comp == np.arange(len(emb))) & ok
    return {"keep": keep, "component": comp, "duplicates": int(ok.sum() - keep.sum()), "index": desc}


def relative_dedup(emb: np.ndarray, comp: np.ndarray, keep: np.ndarray, exclude: np.ndarray, cfg, search,
                   seed: int = 0, views: int = 1, ok: np.ndarray | None = None) -> dict:
    """-> {"keep": bool [n], "dropped_components": int, "hits": int}: `keep` minus every component that
    reaches an exclude-set image. Searches among the whole pool (duplicates included), so a copy of an
    evaluation image drops its component even when it was not the one kept."""
    if not len(exclude):
        return {"keep": keep.copy(), "dropped_components": 0, "hits": 0}
    whitening = fit_whitening(emb, keep if ok is None else ok, cfg, views, seed)
    pool_full, pool_every = _views(emb, views, whitening)
    ex_full, ex_every = _views(exclude, views, whitening)
    index, _ = graph.make_index(pool_every, search, seed)
    k = cfg.k + views
    pool_bg = ex_bg = None
    if cfg.normalize:
        pool_bg = _background(index, pool_full, k, views, True)
        ex_bg = _background(index, ex_full, k, views, False)
    _, hit = _pairs(index, ex_full, k, views, cfg.exclude_threshold, False, ex_bg, pool_bg)
    if views > 1:  # the other direction: a pool image's full view against the exclude images' crops
        ex_index, _ = graph.make_index(ex_every, search, seed)
        rows, _ = _pairs(ex_index, pool_full, views, views, cfg.exclude_threshold, False, pool_bg, ex_bg)
        hit = np.concatenate([hit, rows])
    hit = np.unique(hit)
    bad = np.unique(comp[hit])
    out = keep & ~np.isin(comp, bad)
    return {"keep": out, "dropped_components": int(len(bad)), "hits": int(len(hit))}
