"""Linear probe vs k-NN on CIFAR-10: time (features, then heads / neighbour search) and accuracy, side by
side with the yardsticks (random-init backbone of the same arch, raw pixels), plus copy-detection mAP.

    .venv/bin/python bench/eval.py --weights runs/smoke/pretrain/final [--train-limit 50000 --test-limit 10000]

WEIGHTS: a phase's final/ folder or an exported file (after `make demo`: runs/smoke/pretrain/final).
Shards: runs/shards/cifar10-{train,test} (built by `make demo`, or built here when missing). Everything
runs in this process (one task, no Ray), so the times are one core-set's, comparable with each other.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.demo import build_cifar_shards  # noqa: E402
from orchestrator.eval import baselines, features, knn, linear, retrieval  # noqa: E402


def run_one(name: str, weights, shards: dict, args) -> dict:
    limits = dict(train_limit=args.train_limit, test_limit=args.test_limit, image_size=args.image_size)
    out = {"name": name}
    t0 = time.perf_counter()
    out["knn"] = knn.knn_eval(weights, shards["train"], shards["test"], **limits)
    out["knn_s"] = time.perf_counter() - t0
    if weights is not None:
        out["linear"] = linear.linear_eval(weights, shards["train"], shards["test"], epochs=args.epochs, **limits)
    out["retrieval"] = retrieval.retrieval_eval(weights, shards["test"], image_size=args.image_size)
    print(json.dumps({k: v for k, v in out.items()}, default=str), flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, help="final/ folder or exported backbone file")
    p.add_argument("--shards", default="runs/shards", help="folder holding cifar10-train / cifar10-test shards")
    p.add_argument("--train-limit", type=int, default=None, help="train images (default: all 50,000)")
    p.add_argument("--test-limit", type=int, default=None, help="test images (default: all 10,000)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=linear.EPOCHS)
    args = p.parse_args()
    shards = build_cifar_shards(Path(args.shards))
    sd = features.load_state_dict(args.weights)
    rows = [run_one("trained", sd, shards, args), run_one("random-init", baselines.random_state_dict(sd), shards, args),
            run_one("raw pixels", None, shards, args)]
    print(f"\n{'backbone':<12}{'k-NN k=20':>10}{'k-NN s':>8}{'linear':>8}{'feat s':>8}{'heads s':>8}"
          f"{'total s':>8}{'lin/knn t':>10}{'copy mAP':>9}{'R@1':>7}")
    for r in rows:
        lin = r.get("linear")
        cells = [f"{100 * r['knn']['top1']['20']:>9.2f}%", f"{r['knn_s']:>8.1f}"]
        if lin:
            feat_s = lin["seconds"] - lin["seconds_heads"]
            cells += [f"{100 * lin['top1']:>7.2f}%", f"{feat_s:>8.1f}", f"{lin['seconds_heads']:>8.1f}",
                      f"{lin['seconds']:>8.1f}", f"{lin['seconds'] / r['knn_s']:>9.2f}x"]
        else:
            cells += [f"{'-':>8}"] * 4 + [f"{'-':>10}"]
        cells += [f"{100 * r['retrieval']['map']:>8.2f}%", f"{100 * r['retrieval']['recall_at_1']:>6.2f}%"]
        print(f"{r['name']:<12}" + "".join(cells))
    head = rows[0]["linear"]["head"]
    print(f"\nchosen head (trained): last {head['blocks']} blocks{' + pooled patches' if head['avgpool'] else ''}, "
          f"lr {head['lr']}; {rows[0]['linear']['n_train']} train / {rows[0]['linear']['n_val']} held-out val")
    return 0


if __name__ == "__main__":
    sys.exit(main())
