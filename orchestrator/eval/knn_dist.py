"""k-NN at ImageNet scale: the memory bank stays on the workers that compute it.

Each of `parallel` Ray actors (`Bank`) embeds its share of the train split and keeps those features
(fp16; on its GPU when it has one). The test split is embedded by the same actors, each its share; a
share's features stay in Ray's object store. For every test share, every actor searches its own bank
(matrix products chunk by chunk, top-k per query) and returns only (similarity, label) of its top k;
the driver merges those A lists of k per query into the global top k and votes (weighted k-NN, as
`knn.knn_accuracy`). The driver holds O(queries x k x actors) numbers, never the features
(O(dataset x dim)). Same accuracy as `knn.knn_eval` up to fp16 ties.

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
    """One worker's part of the memory bank (a Ray actor: `ray.remote(**opts)(Bank)`)."""

    def __init__(self, weights, image_size: int, batch_size: int, storage_options: dict | None, kind: str):
        self.args = (weights, image_size, batch_size, storage_options, kind)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.feats = torch.empty(0)
        self.labels = torch.empty(0, dtype=torch.long)

    def _embed(self, items):
        weights, size, batch, opts, kind = self.args
        return features.embed_shards(weights, items, size, batch, opts, kind)

    def add(self, items) -> tuple[int, int]:
        """Embed train items into this bank; returns (labelled images it holds, their largest label)."""
        feats, labels = self._embed(items)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32  # CPUs matmul fp16 slowly
        self.feats = torch.cat([self.feats.to(self.device, dtype), feats.to(self.device, dtype)])
        self.labels = torch.cat([self.labels, labels])
        return len(self.labels), int(self.labels.max()) if len(self.labels) else -1

    def embed(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        """Test features and labels of `items` (kept by the caller as an object ref)."""
        return self._embed(items)

    def topk(self, queries: tuple[torch.Tensor, torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities [Q, k'], labels [Q, k']) of each query's k nearest in this bank (k' = min(k, bank))."""
        q = queries[0]
        k = min(k, len(self.labels))
        sims, labs = [], []
        for start in range(0, len(q), CHUNK):
            s = q[start:start + CHUNK].to(self.device, self.feats.dtype) @ self.feats.T
            top_sim, top_idx = s.float().topk(k, dim=1)
            sims.append(top_sim.cpu())
            labs.append(self.labels[top_idx.cpu()])
        return torch.cat(sims), torch.cat(labs)

    @staticmethod
    def labels_of(queries: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
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


def knn_eval_sharded(weights, train_url: str, test_url: str, *, ks=(10, 20), temperature: float = 0.07,
                     image_size: int | None = None, batch_size: int = features.EMBED_BATCH,
                     storage_options: dict | None = None, train_limit: int | None = None,
                     test_limit: int | None = None, parallel: int = 1, actor_options: dict | None = None) -> dict:
    """`knn.knn_eval`'s result, computed by `parallel` Ray actors that keep the features (module doc);
    "driver_bytes" counts every tensor byte the driver received."""
    import ray
    t0 = time.time()
    size = features.image_size_of(weights, image_size, storage_options)
    plans = features.labelled_plans({"train": train_url, "test": test_url}, storage_options,
                                    {"train": train_limit, "test": test_limit})
    kind = "cls" if weights is not None else "pixels"
    if isinstance(weights, dict):
        weights = ray.put(weights)  # one copy in the object store, not one per actor call
    actor = ray.remote(**(actor_options or {}))(Bank)
    train_groups = features.split_work(plans["train"], parallel)
    banks = [actor.remote(weights, size, batch_size, storage_options, kind) for _ in train_groups]
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
    correct, driver_bytes = {k: 0 for k in ks}, sum(t.nbytes for t in truths)
    for ref, truth in zip(shares, truths):
        parts = ray.get([bank.topk.remote(ref, max(ks)) for bank in banks])
        driver_bytes += sum(s.nbytes + lab.nbytes for s, lab in parts)
        for k, c in merge_votes(parts, truth, ks, temperature, n_classes).items():
            correct[k] += c
    for bank in banks:
        ray.kill(bank)
    n_test = listed["test"]
    return {"top1": {str(k): correct[k] / n_test for k in ks}, "n_train": n_train, "n_test": n_test,
            "temperature": temperature, "image_size": size, "parallel": len(banks), "sharded": True,
            "driver_bytes": driver_bytes, "seconds": round(time.time() - t0, 2)}
