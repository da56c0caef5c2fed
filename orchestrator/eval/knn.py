"""k-NN evaluation of a backbone on labelled shards (weighted vote, cosine, T=0.07, as DINO/DINOv2 do).

    dinoray eval knn --weights runs/demo/pretrain/final/backbone.pth \
        --train runs/shards/cifar10-train --test runs/shards/cifar10-test --json

W is an exported file (.pth / .safetensors in dinov2 key names) or a phase's `final/` folder.
The architecture is read off the state dict's shapes, so no config is needed.
"""
from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import model as dmodel
from orchestrator.data import shards
from orchestrator import storage

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# --------------------------------------------------------------------------- weights
def load_state_dict(url: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """Read backbone weights from a .pth/.safetensors file or a phase's final/ folder."""
    fs, path = storage.fs_for(url, storage_options)
    if fs.isdir(path):
        path = path.rstrip("/") + "/backbone.pth"
        if not fs.exists(path):
            raise FileNotFoundError(f"{url}: no backbone.pth inside; pass an exported file or a phase's final/ folder")
    with fs.open(path, "rb") as fh:
        data = fh.read()
    if path.endswith(".safetensors"):
        from safetensors.torch import load
        return load(data)
    sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return sd.get("backbone", sd) if isinstance(sd, dict) else sd


def infer_arch(sd: dict[str, torch.Tensor]) -> dict:
    """build_backbone kwargs read off a dinov2-named state dict."""
    dim = sd["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    patch = sd["patch_embed.proj.weight"].shape[-1]
    n_pos = sd["pos_embed"].shape[1] - 1
    grid = int(round(n_pos ** 0.5))
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    swiglu = "blocks.0.mlp.w12.weight" in sd
    layerscale = "blocks.0.ls1.gamma" in sd
    arch = next((name for name, (d, n, _, _) in dmodel.ARCHS.items() if (d, n) == (dim, depth)), None)
    if arch is None:
        raise ValueError(f"no known arch with dim {dim} and depth {depth}; known: {sorted(dmodel.ARCHS)}")
    return dict(arch=arch, img_size=grid * patch, patch_size=patch, num_register_tokens=regs,
                ffn_layer="swiglufused" if swiglu else "mlp",
                layerscale_init=1e-5 if layerscale else None,
                interpolate_antialias=regs > 0, interpolate_offset=0.0 if regs > 0 else 0.1)


def backbone_from_state_dict(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    net = dmodel.build_backbone(**infer_arch(sd))
    net.load_state_dict(sd, strict=True)
    return net.eval()


# --------------------------------------------------------------------------- data
def iter_shard(shard_url: str, storage_options: dict | None = None):
    """Yield (image bytes, label) of one shard's labelled samples, in tar order."""
    with storage.open_url(shard_url, "rb", storage_options) as fh:
        for _key, sample in shards.iter_tar_samples(fh):
            img = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            if img is not None and "cls" in sample:
                yield img, int(sample["cls"])


def iter_labelled(url: str, storage_options: dict | None = None):
    """Yield (image bytes, label) from every shard listed in URL/index.json, in index order."""
    for shard_url, _ in shard_plan(url, storage_options):
        yield from iter_shard(shard_url, storage_options)


def shard_plan(url: str, storage_options: dict | None = None, limit: int | None = None) -> list[tuple[str, int]]:
    """[(shard URL, images to take)] in index order, cut at `limit` images (the index counts)."""
    index, folder = shards.read_index(url, storage_options)
    plan, left = [], float("inf") if limit is None else limit
    for info in index["shards"]:
        if left <= 0:
            break
        take = int(min(int(info["count"]), left))
        plan.append((storage.join(folder, info["name"]), take))
        left -= take
    return plan


def _to_tensor(data: bytes, size: int) -> torch.Tensor:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    if min(im.size) != size:  # resize the short side to size*256/224, centre-crop size (reference eval)
        short = size if min(im.size) <= size else int(round(size * 256 / 224))
        w, h = im.size
        im = im.resize((max(short, round(w * short / h)), max(short, round(h * short / w))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


@torch.no_grad()
def embed_shards(weights: str | dict, items: list[tuple[str, int, int]], image_size: int | None,
                 batch_size: int = 256, storage_options: dict | None = None):
    """L2-normalised CLS features and labels of labelled images [start, stop) of each (shard URL, start, stop).
    One call is one unit of parallel work (a Ray task in the eval phase); `weights` as in knn_eval."""
    sd = load_state_dict(weights, storage_options) if isinstance(weights, str) else weights
    net = backbone_from_state_dict(sd)
    size = image_size or infer_arch(sd)["img_size"]
    feats, labels, batch = [], [], []
    # bf16 where matmuls are fast in it (GPUs, AVX-512/AMX CPUs); on AVX2-only CPUs it is several times slower.
    device = next(net.parameters()).device
    fast_bf16 = device.type == "cuda" or torch.backends.cpu.get_cpu_capability() == "AVX512"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast_bf16)

    def flush():
        with autocast:
            out = net(dmodel.normalize_images(torch.stack(batch).to(device)))
        feats.append(F.normalize(out.float(), dim=-1).cpu())
        batch.clear()

    for shard_url, start, stop in items:
        for i, (img, label) in enumerate(iter_shard(shard_url, storage_options)):
            if i < start:
                continue
            if i >= stop:
                break
            batch.append(_to_tensor(img, size))
            labels.append(label)
            if len(batch) == batch_size:
                flush()
    if batch:
        flush()
    return (torch.cat(feats) if feats else torch.empty(0)), torch.tensor(labels, dtype=torch.long)


def _split_work(items: list[tuple[str, int]], parts: int) -> list[list[tuple[str, int, int]]]:
    """Cut [(shard, n)] into `parts` groups of equal image counts (+-1), in order, as [(shard, start, stop)]
    pieces: a shard may be split between two groups (the second skips the first's samples unread)."""
    total = sum(n for _, n in items)
    parts = max(1, min(parts, total))
    bounds = [total * i // parts for i in range(parts + 1)]
    groups, offset = [[] for _ in range(parts)], 0
    for shard_url, n in items:
        for g in range(parts):
            lo, hi = max(bounds[g], offset), min(bounds[g + 1], offset + n)
            if lo < hi:
                groups[g].append((shard_url, lo - offset, hi - offset))
        offset += n
    return [g for g in groups if g]


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


def knn_eval(weights: str | dict, train_url: str, test_url: str, *, ks=(10, 20), temperature=0.07,
             image_size: int | None = None, batch_size: int = 256, storage_options: dict | None = None,
             train_limit: int | None = None, test_limit: int | None = None, parallel: int = 1,
             map_fn=None) -> dict:
    """Embed both splits and return {"top1": {k: acc}, "n_train", "n_test", "image_size", "seconds"}.

    The shards of both splits are cut into `parallel` groups of about equal size, each embedded by one
    `embed_shards` call; `map_fn(fn, list_of_args) -> list_of_results` runs them (the eval phase passes
    Ray tasks; the default runs them here, one after the other)."""
    t0 = time.time()
    sd = load_state_dict(weights, storage_options) if isinstance(weights, str) else weights
    size = image_size or infer_arch(sd)["img_size"]
    plans = {"train": shard_plan(train_url, storage_options, train_limit),
             "test": shard_plan(test_url, storage_options, test_limit)}
    for split, url in (("train", train_url), ("test", test_url)):
        if not sum(n for _, n in plans[split]):
            raise ValueError(f"{url}: its index.json lists no samples; build labelled shards with "
                             "`dinoray shards build` from class folders")
    tagged = [(split, item) for split, plan in plans.items() for item in plan]
    groups = _split_work([item for _, item in tagged], parallel)
    run = map_fn or (lambda fn, arglist: [fn(*a) for a in arglist])
    outs = run(embed_shards, [(weights, g, size, batch_size, storage_options) for g in groups])
    # back to per-split tensors: every group's rows follow its items' order, items follow `tagged`
    labels = torch.cat([lab for _, lab in outs])
    listed = sum(n for _, (_, n) in tagged)
    if len(labels) != listed:
        raise ValueError(f"{train_url} / {test_url}: index.json lists {listed} samples but {len(labels)} carry an "
                         "image and a .cls label; the k-NN needs labelled shards (`dinoray shards build` of class "
                         "folders); check them with `dinoray shards verify`")
    feats = torch.cat([f for f, _ in outs if len(f)])
    n_train = sum(n for split, (_, n) in tagged if split == "train")
    train_f, train_l, test_f, test_l = feats[:n_train], labels[:n_train], feats[n_train:], labels[n_train:]
    acc = knn_accuracy(train_f, train_l, test_f, test_l, ks, temperature)
    return {"top1": {str(k): v for k, v in acc.items()}, "n_train": len(train_f), "n_test": len(test_f),
            "image_size": size, "temperature": temperature, "parallel": len(groups),
            "seconds": round(time.time() - t0, 2)}


# --------------------------------------------------------------------------- CLI
def _cmd_knn(args) -> int:
    ks = [int(k) for k in args.k.split(",")]
    res = knn_eval(args.weights, args.train, args.test, ks=ks, temperature=args.temperature,
                   image_size=args.image_size, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res["top1"].items():
            print(f"k={k:>3}  top-1 {100 * v:.2f}%  ({res['n_test']} test / {res['n_train']} train images)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate a backbone").add_subparsers(dest="eval_command", metavar="EVAL")
    p = ev.add_parser("knn", help="weighted k-NN on labelled shards")
    p.add_argument("--weights", required=True, help="exported backbone file or a phase's final/ folder")
    p.add_argument("--train", required=True, help="labelled shards URL (memory bank)")
    p.add_argument("--test", required=True, help="labelled shards URL (queries)")
    p.add_argument("--k", default="10,20", help="comma-separated k values (default 10,20)")
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--image-size", type=int, default=None, help="default: the weights' training size")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_knn)
