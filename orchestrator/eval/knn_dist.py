"""k-NN at ImageNet scale: the memory bank stays on the workers that compute it.

Each of `parallel` Ray actors (`Bank`) embeds its share of the train split and keeps those features
(fp16; on its GPU when it has one). The test split is embedded by the same actors, each its share; a
share's features stay in Ray's object store. For every test share, every actor searches its own bank
(matrix products chunk by chunk, top-k per query) and returns only (similarity, label) of its top k;
the driver merges those A lists of k per query into the global top k and votes (weighted k-NN, as
`knn.knn_accuracy`). The driver holds O(queries x k x actors) numbers, never the features
(O(dataset x dim)). Same accuracy as `knn.knn_eval` up to fp16 ties.

Several sources (an eval phase's backbone and its yardsticks: a random-init backbone, raw pixels) share
one pass (`knn_eval_sharded_many`): each actor decodes its images once and keeps one bank per source, so
its memory is the sum of theirs (the smoke eval: three passes 100 s, one shared pass 83 s; docs/eval.md).

Memory: ImageNet-1k with ViT-g/14 (dim 1536), fp16 features: train 1,281,167 x 1536 x 2 B = 3.9 GB in
all, 3.9 GB / A per actor (0.49 GB each on 8 GPUs); test 50,000 x 1536 x 2 B = 154 MB in the object store;
driver: 50,000 x k=20 x A=8 x (4 + 8) B = 96 MB of top-k lists, merged share by share
(one share: 6,250 queries -> 12 MB). See docs/eval.md.

No entrypoint; `orchestrator/eval/phase.py` uses it for a k-NN-only eval phase on Ray.
"""
from __future__ import annotations

import time

import torch

from orchestrator.eval import features

CHUNK = 4096   # queries per similarity matmul on a worker


class Bank:
    """One worker's part of the memory bank of each source (a Ray actor: `ray.remote(**opts)(Bank)`);
    source i is (weights[i], kinds[i]), all embedded from one decoding of the images
    (features.embed_shards_many). The weights are separate arguments so Ray resolves object refs."""

    def __init__(self, kinds: list[str], image_size: int, batch_size: int, storage_options: dict | None, *weights):
        self.sources, self.args = list(zip(weights, kinds)), (image_size, batch_size, storage_options)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.feats = [torch.empty(0) for _ in kinds]
        self.labels = torch.empty(0, dtype=torch.long)

    def add(self, items) -> tuple[int, int]:
        """Embed train items into this bank; returns (labelled images it holds, their largest label)."""
        feats, labels = features.embed_shards_many(self.sources, items, *self.args)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32  # CPUs matmul fp16 slowly
        self.feats = [torch.cat([old.to(self.device, dtype), new.to(self.device, dtype)])
                      for old, new in zip(self.feats, feats)]
        self.labels = torch.cat([self.labels, labels])
        return len(self.labels), int(self.labels.max()) if len(self.labels) else -1

    def embed(self, items) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Test features (one tensor per source) and labels of `items` (kept by the caller as an object ref)."""
        return features.embed_shards_many(self.sources, items, *self.args)

    def topk(self, queries: tuple[list[torch.Tensor], torch.Tensor], k: int,
             source: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities [Q, k'], labels [Q, k']) of each query's k nearest in this bank (k' = min(k, bank)),
        for one source's features."""
        q, bank = queries[0][source], self.feats[source]
        k = min(k, len(self.labels))
        sims, labs = [], []
        for start in range(0, len(q), CHUNK):
            s = q[start:start + CHUNK].to(self.device, bank.dtype) @ bank.T
            top_sim, top_idx = s.float().topk(k, dim=1)
            sims.append(top_sim.cpu())
            labs.append(self.labels[top_idx.cpu()])
        return torch.cat(sims), torch.cat(labs)

    @staticmethod
    def labels_of(queries: tuple[list[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return queries[1]


def merge_votes(parts: list[tuple[torch.Tensor, torch.Tensor]], truth: torch.Tensor, ks, temperature: float,
                n_classes: int) -> dict[int, int]:
    """Correct predictions per k from every bank's top-k lists of the same queries."""
    sims = torch.cat([s for s, _ in parts], dim=1)
    labs = torch.cat([lab for _, lab in parts], dim=1)
    kmax = min(max(ks), sims.shape[1])
    top_sim, order = sims.topk(kmax, dim=1)
    top_lab = labs.gather(1, order)
    weights = (top_sim / temperature).exp()
    correct = {}
    for k in ks:
        votes = torch.zeros(len(truth), n_classes)
        votes.scatter_add_(1, top_lab[:, :k], weights[:, :k])
        correct[k] = int((votes.argmax(1) == truth).sum())
    return correct


def knn_eval_sharded(weights, train_url: str, test_url: str, **kw) -> dict:
    """`knn.knn_eval`'s result, computed by `parallel` Ray actors that keep the features (module doc);
    "driver_bytes" counts every tensor byte the driver received. Keywords as `knn_eval_sharded_many`."""
    return knn_eval_sharded_many({"": weights}, train_url, test_url, **kw)[""]


def knn_eval_sharded_many(sources: dict, train_url: str, test_url: str, *, ks=(10, 20),
                          temperature: float = 0.07, image_size: int | None = None,
                          batch_size: int = features.EMBED_BATCH, storage_options: dict | None = None,
                          train_limit: int | None = None, test_limit: int | None = None, parallel: int = 1,
                          actor_options: dict | None = None) -> dict[str, dict]:
    """{name: k-NN result} of each {name: weights (URL, state dict, or None: raw pixels)}, all from one
    pass over the images: each actor decodes its share once and embeds it with every source (an eval
    phase's backbone and its yardsticks), so the actors hold every source's bank at once."""
    import ray
    t0 = time.time()
    names = list(sources)
    size = features.image_size_of(next(iter(sources.values())), image_size, storage_options)
    plans = features.labelled_plans({"train": train_url, "test": test_url}, storage_options,
                                    {"train": train_limit, "test": test_limit})
    # a state dict goes into the object store once, not once per actor
    weights = [ray.put(w) if isinstance(w, dict) else w for w in sources.values()]
    kinds = ["cls" if w is not None else "pixels" for w in sources.values()]
    actor = ray.remote(**(actor_options or {}))(Bank)
    train_groups = features.split_work(plans["train"], parallel)
    banks = [actor.remote(kinds, size, batch_size, storage_options, *weights) for _ in train_groups]
    added = ray.get([bank.add.remote(g) for bank, g in zip(banks, train_groups)])
    n_train = sum(n for n, _ in added)
    test_groups = features.split_work(plans["test"], len(banks))
    shares = [bank.embed.remote(g) for bank, g in zip(banks, test_groups)]  # refs: features stay out of the driver
    truths = ray.get([banks[0].labels_of.remote(ref) for ref in shares])
    listed = {split: sum(n for _, n in plan) for split, plan in plans.items()}
    if (n_train, sum(len(t) for t in truths)) != (listed["train"], listed["test"]):
        raise ValueError(f"{train_url} / {test_url}: index.json lists {listed['train']} + {listed['test']} samples "
                         f"but {n_train} + {sum(len(t) for t in truths)} carry an image and a .cls label; the k-NN "
                         "needs labelled shards (`dinoray shards build` of class folders)")
    n_classes = 1 + max([top for _, top in added] + [int(t.max()) for t in truths if len(t)])
    correct = {name: {k: 0 for k in ks} for name in names}
    driver_bytes = {name: sum(t.nbytes for t in truths) for name in names}
    for ref, truth in zip(shares, truths):
        for i, name in enumerate(names):
            parts = ray.get([bank.topk.remote(ref, max(ks), i) for bank in banks])
            driver_bytes[name] += sum(s.nbytes + lab.nbytes for s, lab in parts)
            for k, c in merge_votes(parts, truth, ks, temperature, n_classes).items():
                correct[name][k] += c
    for bank in banks:
        ray.kill(bank)
    n_test, seconds = listed["test"], round(time.time() - t0, 2)
    return {name: {"top1": {str(k): correct[name][k] / n_test for k in ks}, "n_train": n_train, "n_test": n_test,
                   "temperature": temperature, "image_size": size, "parallel": len(banks), "sharded": True,
                   "driver_bytes": driver_bytes[name], "seconds": seconds, "pass_sources": len(names)}
            for name in names}
