"""k-NN evaluation of a backbone on labelled shards (weighted vote, cosine, T=0.07, as DINO/DINOv2 do).

    dinoray eval knn --weights runs/demo/pretrain/final/backbone.pth \
        --train runs/shards/cifar10-train --test runs/shards/cifar10-test --json

W is an exported file (.pth / .safetensors in dinov2 key names) or a phase's `final/` folder.
The architecture is read off the state dict's shapes, so no config is needed.
"""
from __future__ import annotations

import json
import time

import torch

from orchestrator.eval import features


# --------------------------------------------------------------------------- k-NN
def knn_accuracy(train_f, train_l, test_f, test_l, ks=(10, 20), temperature: float = 0.07,
                 chunk: int = 1024) -> dict[int, float]:
    """Weighted k-NN (DINO): top-k cosine neighbours vote with weight exp(sim / T)."""
    n_classes = int(max(train_l.max(), test_l.max())) + 1
    kmax = min(max(ks), len(train_f))
    correct = {k: 0 for k in ks}
    for start in range(0, len(test_f), chunk):
        sims = test_f[start:start + chunk] @ train_f.T
        top_sim, top_idx = sims.topk(kmax, dim=1)
        top_lab = train_l[top_idx]
        weights = (top_sim / temperature).exp()
        truth = test_l[start:start + chunk]
        for k in ks:
            votes = torch.zeros(len(truth), n_classes)
            votes.scatter_add_(1, top_lab[:, :k], weights[:, :k])
            correct[k] += int((votes.argmax(1) == truth).sum())
    return {k: correct[k] / len(test_f) for k in ks}


def knn_eval(weights, train_url: str, test_url: str, *, ks=(10, 20), temperature=0.07,
             image_size: int | None = None, batch_size: int = features.EMBED_BATCH,
             storage_options: dict | None = None, train_limit: int | None = None,
             test_limit: int | None = None, parallel: int = 1, map_fn=None) -> dict:
    """Embed both splits and return {"top1": {k: acc}, "n_train", "n_test", "image_size", "seconds"}.
    `weights`: a URL, a state dict, or None for the raw-pixel baseline (then image_size is required).

    The shards of both splits are cut into `parallel` groups of about equal size, each embedded by one
    `embed_shards` call; `map_fn(fn, list_of_args) -> list_of_results` runs them (the eval phase passes
    Ray tasks; the default runs them here, one after the other)."""
    t0 = time.time()
    size = features.image_size_of(weights, image_size, storage_options)
    plans = features.labelled_plans({"train": train_url, "test": test_url}, storage_options,
                                    {"train": train_limit, "test": test_limit})
    parts = features.split_work([item for plan in plans.values() for item in plan], parallel)
    feats = features.embed_splits(weights, plans, size, batch_size=batch_size, storage_options=storage_options,
                                  parallel=parallel, map_fn=map_fn, kind="cls" if weights is not None else "pixels")
    res = knn_result(feats["train"], feats["test"], ks, temperature)
    return {**res, "image_size": size, "parallel": len(parts), "seconds": round(time.time() - t0, 2)}


def knn_result(train: tuple, test: tuple, ks=(10, 20), temperature: float = 0.07) -> dict:
    """{"top1": {k: acc}, "n_train", "n_test", "temperature"} from (L2-normalised features, labels) pairs."""
    acc = knn_accuracy(train[0], train[1], test[0], test[1], ks, temperature)
    return {"top1": {str(k): v for k, v in acc.items()}, "n_train": len(train[0]), "n_test": len(test[0]),
            "temperature": temperature}


# --------------------------------------------------------------------------- CLI
def cmd_knn(args) -> int:
    ks = [int(k) for k in args.k.split(",")]
    res = knn_eval(args.weights, args.train, args.test, ks=ks, temperature=args.temperature,
                   image_size=args.image_size, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res["top1"].items():
            print(f"k={k:>3}  top-1 {100 * v:.2f}%  ({res['n_test']} test / {res['n_train']} train images)")
    return 0
