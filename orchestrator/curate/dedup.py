"""Self- and relative deduplication on copy-detection embeddings (DINOv2 paper, section 3 and appendix A).

`cfg` is a CurateDedupCfg, `search` a CurateSearchCfg (pipeline/schema.py).

- `self_dedup(emb, ok, cfg, search)`: the k-NN graph of the pool (k = cfg.k), edges with cosine > cfg.threshold,
  one image kept per connected component: the one with the smallest pool index (deterministic).
- `relative_dedup(emb, comp, keep, exclude, cfg, search)`: every component holding a pool image whose cosine to
  some exclude-set image is > cfg.exclude_threshold is dropped whole.

No entrypoint; `orchestrator.curate.phase` runs them as the "dedup" and "exclude" stages.
"""
from __future__ import annotations

import numpy as np

from orchestrator.curate import graph


def self_dedup(emb: np.ndarray, ok: np.ndarray, cfg, search, seed: int = 0) -> dict:
    """-> {"keep": bool [n], "component": int [n], "duplicates": int, "index": {...}} (undecodable rows dropped)."""
    index, desc = graph.make_index(emb, search, seed)
    rows, cols = graph.edges(index, emb, cfg.k + 1, cfg.threshold)  # +1: each image finds itself
    comp = graph.components(len(emb), rows, cols)
    keep = (comp == np.arange(len(emb))) & ok
    return {"keep": keep, "component": comp, "duplicates": int(ok.sum() - keep.sum()), "index": desc}


def relative_dedup(emb: np.ndarray, comp: np.ndarray, keep: np.ndarray, exclude: np.ndarray, cfg, search,
                   seed: int = 0) -> dict:
    """-> {"keep": bool [n], "dropped_components": int, "hits": int}: `keep` minus every component that
    reaches an exclude-set image. Searches the exclude images' neighbours among the whole pool (duplicates
    included), so a copy of an evaluation image drops its component even when it was not the one kept."""
    if not len(exclude):
        return {"keep": keep.copy(), "dropped_components": 0, "hits": 0}
    index, _ = graph.make_index(emb, search, seed)
    _, hit = graph.edges(index, exclude, cfg.k, cfg.exclude_threshold)
    hit = np.unique(hit)
    bad = np.unique(comp[hit])
    out = keep & ~np.isin(comp, bad)
    return {"keep": out, "dropped_components": int(len(bad)), "hits": int(len(hit))}
