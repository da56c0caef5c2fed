"""Copy-detection retrieval on the test split: find each query's edited copies in a database.

    dinoray eval retrieval --weights runs/smoke/pretrain/final --test runs/shards/cifar10-test --json

The first `queries` images of the test split are the queries. Each has `copies` edited copies
(orchestrator/data/edits.py `random_copy`: crop 70-90%, resize, colour jitter, JPEG quality 30-70, flip
with p=0.5), generated deterministically from (seed, image index, copy index). The database holds every
copy and the next `distractors` test images (originals that are no query). Queries and database are
embedded by the backbone (L2-normalised CLS, cosine similarity), in parallel tasks like the k-NN's;
the result is the mean average precision over queries (each query's copies are its relevant items)
and recall@1 (the nearest database item is one of its copies).
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch

from orchestrator.data import edits
from orchestrator.eval import features
from orchestrator.pipeline.schema import EvalCfg

# query images, edited copies of each, distractor images: the job schema's defaults
QUERIES, COPIES, DISTRACTORS = (getattr(EvalCfg(), f"retrieval_{name}")
                                 for name in ("queries", "copies", "distractors"))


def embed_with_copies(weights, items, image_size: int, batch_size: int, storage_options: dict | None,
                      first: int, n_queries: int, n_copies: int, seed: int, kind: str = "cls"):
    """One task: (features of the images of `items`, features of the copies, the image index of each copy).
    Images are numbered from `first` (their index in the whole plan); those below n_queries get copies."""
    embed = features.make_embedder(weights, kind, storage_options)
    origs, copies, owners = [], [], []
    for i, (img, _label) in enumerate(features.iter_items(items, storage_options), start=first):
        origs.append(features.to_tensor(img, image_size))
        if i < n_queries:
            for j in range(n_copies):
                rng = np.random.default_rng([seed, i, j])
                copies.append(features.to_tensor(edits.random_copy(img, rng), image_size))
                owners.append(i)

    def run(tensors):
        out = [embed(torch.stack(tensors[s:s + batch_size])) for s in range(0, len(tensors), batch_size)]
        return torch.cat(out) if out else torch.empty(0)
    return run(origs), run(copies), torch.tensor(owners, dtype=torch.long)


def average_precision(ranked_relevant: torch.Tensor, n_relevant: int) -> float:
    """AP of one ranking: the mean over relevant items of the precision at each one's rank."""
    hits = ranked_relevant.float().cumsum(0)
    ranks = torch.arange(1, len(ranked_relevant) + 1, dtype=torch.float32)
    return float((hits / ranks)[ranked_relevant].sum() / max(1, n_relevant))


def retrieval_scores(query_f, db_f, db_owner, chunk: int = 1024) -> dict:
    """{"map", "recall_at_1"}: db_owner[j] is the query a database item copies, -1 for a distractor."""
    aps, top1 = [], 0
    for start in range(0, len(query_f), chunk):
        sims = query_f[start:start + chunk] @ db_f.T
        order = sims.argsort(dim=1, descending=True)
        for row, q in enumerate(range(start, start + len(order))):
            relevant = db_owner[order[row]] == q
            aps.append(average_precision(relevant, int((db_owner == q).sum())))
            top1 += bool(relevant[0])
    return {"map": float(np.mean(aps)), "recall_at_1": top1 / len(query_f)}


def retrieval_eval(weights, test_url: str, *, queries: int = QUERIES, copies: int = COPIES,
                   distractors: int = DISTRACTORS, image_size: int | None = None,
                   batch_size: int = features.EMBED_BATCH, storage_options: dict | None = None, parallel: int = 1,
                   map_fn=None, seed: int = 0) -> dict:
    """Copy-detection mAP and recall@1 of a backbone (URL or state dict; None: raw pixels) on the test split."""
    if queries < 1 or copies < 1 or distractors < 0:
        raise ValueError(f"retrieval needs queries >= 1 and copies >= 1 (got {queries}, {copies}) and "
                         f"distractors >= 0 (got {distractors})")
    t0 = time.time()
    size = features.image_size_of(weights, image_size, storage_options)
    plan = features.labelled_plans({"test": test_url}, storage_options, {"test": queries + distractors})["test"]
    if sum(n for _, n in plan) <= queries:
        raise ValueError(f"{test_url}: {sum(n for _, n in plan)} images, not enough for {queries} queries and "
                         "any distractor; lower eval.retrieval_queries")
    groups = features.split_work(plan, parallel)
    firsts = np.cumsum([0] + [sum(b - a for _, a, b in g) for g in groups])[:-1]
    kind = "cls" if weights is not None else "pixels"
    outs = (map_fn or features.local_map)(embed_with_copies, [
        (weights, g, size, batch_size, storage_options, int(first), queries, copies, seed, kind)
        for g, first in zip(groups, firsts)])
    origs = torch.cat([o for o, _, _ in outs])
    if len(origs) != sum(n for _, n in plan):
        raise ValueError(f"{test_url}: index.json lists {sum(n for _, n in plan)} samples but {len(origs)} carry "
                         "an image and a .cls label; check the shards with `dinoray shards verify`")
    copy_f = torch.cat([c for _, c, _ in outs if len(c)])
    owners = torch.cat([w for _, _, w in outs])
    db_f = torch.cat([copy_f, origs[queries:]])
    db_owner = torch.cat([owners, torch.full((len(origs) - queries,), -1, dtype=torch.long)])
    scores = retrieval_scores(origs[:queries], db_f, db_owner)
    return {**scores, "n_queries": queries, "n_copies": copies, "n_database": len(db_f), "image_size": size,
            "edits": list(edits.ORDER), "seconds": round(time.time() - t0, 2)}


def cmd_retrieval(args) -> int:
    """dinoray eval retrieval --weights W --test URL [--queries N] [--copies N] [--distractors N] [--json]"""
    res = retrieval_eval(args.weights, args.test, queries=args.queries, copies=args.copies,
                         distractors=args.distractors, image_size=args.image_size, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"copy detection: mAP {100 * res['map']:.2f}%, recall@1 {100 * res['recall_at_1']:.2f}% "
              f"({res['n_queries']} queries x {res['n_copies']} copies, {res['n_database']} database images)")
    return 0
