"""Linear probe on a frozen backbone, as the DINOv2 reference's eval/linear.py does it.

    dinoray eval linear --weights runs/smoke/pretrain/final \
        --train runs/shards/cifar10-train --test runs/shards/cifar10-test --json

Features are computed once (in parallel: `features.embed_splits`): the CLS token of the last 1 and
last 4 blocks and the average-pooled patch tokens of the last block, after the final norm. A grid of
linear heads, {last 1, last 4 blocks} x {CLS, CLS + pooled patches} x LRS, is trained together in one
pass over the cached features: SGD, momentum 0.9, no weight decay, cosine schedule to 0, lr scaled by
batch/256, weights N(0, 0.01). The head is chosen on VAL_FRACTION of the train split held out (seeded);
the test split is read only after that choice, and only the chosen head's test accuracy is reported.
"""
from __future__ import annotations

import json
import math
import time

import torch
import torch.nn.functional as F

from orchestrator.eval import features
from orchestrator.pipeline.schema import EvalCfg

# the learning-rate grid and epochs: the job schema's defaults (the reference's, with sources there)
LRS = tuple(EvalCfg().linear_lrs)
EPOCHS = EvalCfg().linear_epochs
BATCH = 128            # the reference's per-GPU batch; lr is scaled by BATCH / 256
VAL_FRACTION = 0.1     # of the train split, held out to choose the head
MOMENTUM = 0.9
SMALL_GRID = 10_000_000  # head weights below which the heads train on one CPU thread


def head_configs(n_rows: int) -> list[tuple[int, bool]]:
    """(blocks, avgpool) pairs for features with n_rows - 1 CLS rows and one pooled-patch row."""
    n_last = n_rows - 1
    return [(blocks, pool) for blocks in sorted({1, n_last}) for pool in (False, True)]


def holdout_split(n: int, fraction: float = VAL_FRACTION, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices): a seeded random `fraction` of 0..n-1 held out (at least one each)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(max(1, int(round(n * fraction))), n - 1)
    return perm[n_val:], perm[:n_val]


def head_masks(n_rows: int, dim: int) -> tuple[list[tuple[int, bool]], torch.Tensor]:
    """(configs, mask [n_rows * dim, len(configs)]): which inputs of the flattened features each config uses.
    A head over a config is a head over every row whose other weights stay exactly 0, so the whole grid
    is one matmul."""
    configs = head_configs(n_rows)
    mask = torch.zeros(n_rows, dim, len(configs))
    for j, (blocks, pool) in enumerate(configs):
        mask[n_rows - 1 - blocks:n_rows - 1, :, j] = 1
        mask[n_rows - 1, :, j] = float(pool)
    return configs, mask.reshape(n_rows * dim, len(configs))


def train_heads(feats: torch.Tensor, labels: torch.Tensor, n_classes: int, *, lrs=LRS, epochs: int = EPOCHS,
                batch_size: int = BATCH, seed: int = 0) -> dict:
    """The grid, every config x every lr of `lrs`, trained together in one pass over `feats` [N, rows, D]:
    {"configs", "w" [rows*D, configs, lrs, C], "b" [configs, lrs, C]}."""
    g = torch.Generator().manual_seed(seed)
    configs, mask = head_masks(feats.shape[1], feats.shape[2])
    x_all = feats.flatten(1).float()
    d, n_cfg, n_lr = x_all.shape[1], len(configs), len(lrs)
    mask = mask[:, :, None, None]
    w = torch.randn(d, n_cfg, n_lr, n_classes, generator=g) * 0.01 * mask
    b = torch.zeros(n_cfg, n_lr, n_classes)
    bw, bb = torch.zeros_like(w), torch.zeros_like(b)
    lr = (torch.tensor(lrs, dtype=torch.float32) * batch_size / 256)[None, :, None]
    steps_per_epoch = max(1, len(labels) // batch_size)
    total = epochs * steps_per_epoch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x_all, labels, mask, w, b, bw, bb, lr = (t.to(device) for t in (x_all, labels, mask, w, b, bw, bb, lr))
    threads = torch.get_num_threads()
    if w.numel() < SMALL_GRID:  # tiny matmuls: one thread beats several that wait on each other (6x here)
        torch.set_num_threads(1)
    try:
        _sgd(x_all, labels, w, b, bw, bb, lr, mask, batch_size, total, steps_per_epoch, g)
    finally:
        torch.set_num_threads(threads)
    return {"configs": configs, "w": w.cpu(), "b": b.cpu()}


def _sgd(x_all, labels, w, b, bw, bb, lr, mask, batch_size, total, steps_per_epoch, g) -> None:
    """SGD with momentum over the whole grid at once, in place (see train_heads)."""
    d, n_cfg, n_lr, n_classes = w.shape
    for step in range(total):
        if step % steps_per_epoch == 0:
            perm = torch.randperm(len(labels), generator=g).to(labels.device)
        idx = perm[(step % steps_per_epoch) * batch_size:(step % steps_per_epoch + 1) * batch_size]
        x, y = x_all[idx], labels[idx]
        logits = (x @ w.view(d, -1)).view(len(y), n_cfg, n_lr, n_classes) + b
        # mean cross-entropy of every head: d/dlogits = (softmax - onehot) / batch
        grad = (logits.softmax(-1) - F.one_hot(y, n_classes)[:, None, None]) / len(y)
        bw.mul_(MOMENTUM).add_((x.T @ grad.view(len(y), -1)).view_as(w) * mask)
        bb.mul_(MOMENTUM).add_(grad.sum(0))
        scale = 0.5 * (1 + math.cos(math.pi * step / total))  # CosineAnnealingLR to 0, stepped per iteration
        w.sub_(bw * (lr * scale))
        b.sub_(bb * (lr * scale))


def head_accuracies(heads: dict, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[configs, lrs] top-1 of every head of the grid on (feats, labels)."""
    w, b = heads["w"], heads["b"]
    x = feats.flatten(1)
    correct = torch.zeros(w.shape[1], w.shape[2])
    for start in range(0, len(labels), 4096):
        logits = (x[start:start + 4096] @ w.reshape(x.shape[1], -1)).view(-1, *b.shape) + b
        correct += (logits.argmax(-1) == labels[start:start + 4096, None, None]).float().sum(0)
    return correct / max(1, len(labels))


def choose_head(heads: dict, val_f: torch.Tensor, val_l: torch.Tensor, lrs=LRS) -> dict:
    """The grid's best head on the held-out val split: {"blocks", "avgpool", "lr", "val_top1", "index", "grid"}."""
    accs = head_accuracies(heads, val_f, val_l)
    flat = int(accs.flatten().argmax())  # ties: the first config, then the smallest lr
    c, i = divmod(flat, accs.shape[1])
    blocks, pool = heads["configs"][c]
    return {"blocks": blocks, "avgpool": pool, "lr": lrs[i], "val_top1": float(accs[c, i]), "index": (c, i),
            "grid": {f"blocks{cb}{'+pool' if cp else ''}": [round(float(v), 4) for v in accs[j]]
                     for j, (cb, cp) in enumerate(heads["configs"])}}


def check_classes(train_l: torch.Tensor, test_l: torch.Tensor, train_url: str, test_url: str) -> int:
    """The class count; refuses a test split with labels the train split never has."""
    n_classes = int(train_l.max()) + 1
    extra = sorted(set(test_l.unique().tolist()) - set(train_l.unique().tolist()))
    if extra:
        raise ValueError(f"class-count mismatch: {test_url} has labels {extra[:10]} that {train_url} "
                         f"(labels 0..{n_classes - 1}) never has; build both splits from the same class folders")
    return n_classes


def probe(train: tuple, embed_test, *, lrs=LRS, epochs: int = EPOCHS, batch_size: int = BATCH, seed: int = 0,
          urls: tuple[str, str] = ("train", "test")) -> dict:
    """Train the grid on `train` (features, labels) minus the held-out part, choose on the held-out part,
    then call `embed_test()` -> (features, labels) and report the chosen head's test top-1."""
    feats, labels = train
    t0 = time.time()
    fit, val = holdout_split(len(labels), VAL_FRACTION, seed)
    n_classes = int(labels.max()) + 1
    heads = train_heads(feats[fit], labels[fit], n_classes, lrs=lrs, epochs=epochs, batch_size=batch_size,
                        seed=seed)
    chosen = choose_head(heads, feats[val], labels[val], lrs)
    seconds_heads = time.time() - t0
    test_f, test_l = embed_test()  # only now: the choice above never saw the test split
    check_classes(labels, test_l, *urls)
    c, i = chosen["index"]
    one = {"configs": [heads["configs"][c]], "w": heads["w"][:, c:c + 1, i:i + 1].contiguous(),
           "b": heads["b"][c:c + 1, i:i + 1]}
    top1 = float(head_accuracies(one, test_f, test_l)[0, 0])
    return {"top1": top1, "head": {k: chosen[k] for k in ("blocks", "avgpool", "lr")},
            "val_top1": chosen["val_top1"], "grid_val_top1": chosen["grid"], "lrs": list(lrs), "epochs": epochs,
            "n_train": len(fit), "n_val": len(val), "n_test": len(test_l), "n_classes": n_classes,
            "seconds_heads": round(seconds_heads, 2)}


def linear_eval(weights, train_url: str, test_url: str, *, image_size: int | None = None,
                batch_size: int = features.EMBED_BATCH, storage_options: dict | None = None,
                train_limit: int | None = None, test_limit: int | None = None, parallel: int = 1, map_fn=None,
                lrs=LRS, epochs: int = EPOCHS, seed: int = 0) -> dict:
    """Embed the train split (parallel), train and choose the head, then embed the test split; see `probe`."""
    t0 = time.time()
    size = features.image_size_of(weights, image_size, storage_options)
    plans = features.labelled_plans({"train": train_url, "test": test_url}, storage_options,
                                    {"train": train_limit, "test": test_limit})
    kw = dict(batch_size=batch_size, storage_options=storage_options, parallel=parallel, map_fn=map_fn,
              kind="blocks")
    train = features.embed_splits(weights, {"train": plans["train"]}, size, **kw)["train"]
    seconds_train_features = time.time() - t0

    def embed_test():
        return features.embed_splits(weights, {"test": plans["test"]}, size, **kw)["test"]

    res = probe(train, embed_test, lrs=lrs, epochs=epochs, seed=seed, urls=(train_url, test_url))
    return {**res, "image_size": size, "seconds_train_features": round(seconds_train_features, 2),
            "seconds": round(time.time() - t0, 2)}


def cmd_linear(args) -> int:
    """dinoray eval linear --weights W --train URL --test URL [--epochs N] [--json]"""
    res = linear_eval(args.weights, args.train, args.test, image_size=args.image_size, epochs=args.epochs,
                      batch_size=args.batch_size)
    if args.json:
        print(json.dumps(res))
    else:
        head = res["head"]
        print(f"linear top-1 {100 * res['top1']:.2f}% (head: last {head['blocks']} blocks"
              f"{' + pooled patches' if head['avgpool'] else ''}, lr {head['lr']}; val {100 * res['val_top1']:.2f}%;"
              f" {res['n_test']} test / {res['n_train']} train images)")
    return 0
