"""Backbone weights in, features out: what the k-NN, the linear probe, retrieval and curation share.

- `load_state_dict(src)`: an exported .pth/.safetensors file or a phase's `final/` folder -> state dict.
- `infer_arch(sd)` / `backbone_from_state_dict(sd)`: the architecture read off the tensors' shapes.
- `shard_plan(url, limit)` / `split_work(items, parts)`: labelled shards cut into groups of equal size,
  one group per parallel task (a shard may be split between two groups).
- `embed_shards(weights, items, size, kind=...)`: one task's features and labels (`embed_shards_many`:
  several backbones' from one decoding of the images), `kind` one of
  FEATURE_KINDS: "cls" (L2-normalised CLS, k-NN/retrieval), "blocks" (the linear probe's input: CLS of
  the last LAST_BLOCKS blocks and the average-pooled patch tokens of the last, all after the final norm,
  as the reference's `get_intermediate_layers(..., norm=True)`), "pixels" (the raw-pixel baseline).
- `embed_splits(...)`: several splits at once through `map_fn` (Ray tasks in the eval phase).

No entrypoint; `dinoray eval ...` (orchestrator/eval/knn.py, linear.py, retrieval.py) uses it.
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import model as dmodel
from orchestrator.data import augment
from orchestrator.data import index as shard_index
from orchestrator.data import samples
from orchestrator.layout import PhaseDir
from orchestrator.storage import Store

FEATURE_KINDS = ("cls", "blocks", "pixels")
LAST_BLOCKS = 4          # the reference linear probe's "last 4 blocks" (fewer when the model is shallower)
EMBED_BATCH = 256        # images per forward pass


# --------------------------------------------------------------------------- weights
def load_state_dict(url, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """Read backbone weights from a .pth/.safetensors file or a phase's final/ folder (str URL or Store)."""
    weights = _store(url, storage_options)
    if weights.isdir():
        weights = PhaseDir.backbone_in(weights)
        if not weights.exists():
            raise FileNotFoundError(f"{url}: no {weights.name} inside; pass an exported file or a phase's final/ folder")
    data = weights.read_bytes()
    if weights.url.endswith(".safetensors"):
        from safetensors.torch import load
        return load(data)
    sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return sd.get("backbone", sd) if isinstance(sd, dict) else sd


def infer_arch(sd: dict[str, torch.Tensor]) -> dict:
    """build_backbone kwargs read off a dinov2-named state dict."""
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in sd]
    if missing:
        raise ValueError(f"not a DINOv2 backbone state dict: keys {missing} are missing (got {sorted(sd)[:5]}...)")
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
def _store(url, storage_options: dict | None = None) -> Store:
    return url if isinstance(url, Store) else Store(str(url), storage_options)


def iter_items(items: list[tuple[str, int, int]], storage_options: dict | None = None):
    """Yield (image bytes, label) of the labelled samples [start, stop) of each (shard URL, start, stop);
    samples with no image or no .cls label are skipped (the callers count them)."""
    for shard_url, start, stop in items:
        for sample in samples.read_shard(_store(shard_url, storage_options), start, stop):
            img = samples.sample_image(sample) if sample is not None else None
            if img is not None and "cls" in sample:
                yield img[1], int(sample["cls"])


def iter_labelled(url, storage_options: dict | None = None):
    """Yield (image bytes, label) from every shard listed in URL/index.json, in index order."""
    yield from iter_items([(u, 0, n) for u, n in shard_plan(url, storage_options)], storage_options)


def shard_plan(url, storage_options: dict | None = None, limit: int | None = None) -> list[tuple[str, int]]:
    """[(shard URL, images to take)] in index order, cut at `limit` images (the index counts)."""
    index, folder = shard_index.read_index(_store(url, storage_options))
    plan, left = [], float("inf") if limit is None else limit
    for info in index["shards"]:
        if left <= 0:
            break
        take = int(min(int(info["count"]), left))
        plan.append(((folder / info["name"]).url, take))
        left -= take
    return plan


def labelled_plans(urls: dict[str, str], storage_options: dict | None = None,
                   limits: dict[str, int | None] | None = None) -> dict[str, list[tuple[str, int]]]:
    """{split: shard plan} for {split: shards URL}, each cut at limits[split]; refuses an empty split."""
    plans = {split: shard_plan(url, storage_options, (limits or {}).get(split)) for split, url in urls.items()}
    for split, url in urls.items():
        if not sum(n for _, n in plans[split]):
            raise ValueError(f"{url}: its index.json lists no samples; build labelled shards with "
                             "`dinoray shards build` from class folders")
    return plans


def split_work(items: list[tuple[str, int]], parts: int) -> list[list[tuple[str, int, int]]]:
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


def to_tensor(data: bytes, size: int) -> torch.Tensor:
    """uint8 [3, size, size]: short side resized to size*256/224 (or to size when smaller), centre crop.
    JPEGs decode with libjpeg-turbo (augment.decode: the same pixels as PIL's decoder, 8x faster on CIFAR)."""
    rgb = augment.decode(data)
    if rgb.shape[:2] == (size, size):
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1)
    im = Image.fromarray(rgb)  # the reference eval transform: resize the short side, centre-crop
    short = size if min(im.size) <= size else int(round(size * 256 / 224))
    w, h = im.size
    im = im.resize((max(short, round(w * short / h)), max(short, round(h * short / w))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


# --------------------------------------------------------------------------- features
def block_features(net, x: torch.Tensor) -> torch.Tensor:
    """[B, n + 1, D]: CLS of the last n = min(LAST_BLOCKS, depth) blocks (oldest first), then the average of
    the last block's patch tokens, every token after the final norm (the reference linear probe's input)."""
    n = min(LAST_BLOCKS, len(net.blocks))
    tokens = net.prepare_tokens_with_masks(x)
    outs = []
    for i, blk in enumerate(net.blocks):
        tokens = blk(tokens)
        if i >= len(net.blocks) - n:
            outs.append(net.norm(tokens))
    first_patch = 1 + net.num_register_tokens
    rows = [o[:, 0] for o in outs] + [outs[-1][:, first_patch:].mean(1)]
    return torch.stack(rows, dim=1)


def make_embedder(weights, kind: str, storage_options: dict | None = None):
    """fn(uint8 [B, 3, H, W]) -> float32 features on the CPU, for one of FEATURE_KINDS."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; use one of {FEATURE_KINDS}")
    if kind == "pixels":
        return lambda imgs: F.normalize(dmodel.normalize_images(imgs).flatten(1), dim=-1)
    sd = weights if isinstance(weights, dict) else load_state_dict(weights, storage_options)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = backbone_from_state_dict(sd).to(device)
    fast_bf16 = dmodel.native_bf16(device)  # bf16 where its matmuls are native, fp32 where emulated (slower)

    @torch.no_grad()
    def embed(imgs: torch.Tensor) -> torch.Tensor:
        x = dmodel.normalize_images(imgs.to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast_bf16):
            out = F.normalize(net(x).float(), dim=-1) if kind == "cls" else block_features(net, x)
        return out.float().cpu()
    return embed


def image_size_of(weights, image_size: int | None, storage_options: dict | None = None) -> int:
    if image_size:
        return int(image_size)
    if weights is None:
        raise ValueError("the raw-pixel features need an explicit image_size")
    sd = weights if isinstance(weights, dict) else load_state_dict(weights, storage_options)
    return infer_arch(sd)["img_size"]


def embed_shards(weights, items: list[tuple[str, int, int]], image_size: int | None,
                 batch_size: int = EMBED_BATCH, storage_options: dict | None = None, kind: str = "cls"):
    """Features and labels of labelled images [start, stop) of each (shard URL, start, stop).
    One call is one unit of parallel work (a Ray task in the eval phase). `weights`: a URL, a state
    dict, or None for kind="pixels"."""
    size = image_size_of(weights, image_size, storage_options)
    (feats,), labels = embed_shards_many([(weights, kind)], items, size, batch_size, storage_options)
    return feats, labels


def embed_shards_many(sources: list[tuple], items: list[tuple[str, int, int]], image_size: int,
                      batch_size: int = EMBED_BATCH, storage_options: dict | None = None):
    """([features of each (weights, kind) in `sources`], labels): the images are read and decoded once
    for every source (an eval phase's backbone and its yardsticks in one pass)."""
    embeds = [make_embedder(weights, kind, storage_options) for weights, kind in sources]
    feats, labels, batch = [[] for _ in sources], [], []

    def flush():
        imgs = torch.stack(batch)
        for out, embed in zip(feats, embeds):
            out.append(embed(imgs))
        batch.clear()
    for img, label in iter_items(items, storage_options):
        batch.append(to_tensor(img, image_size))
        labels.append(label)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return [torch.cat(f) if f else torch.empty(0) for f in feats], torch.tensor(labels, dtype=torch.long)


def local_map(fn, arglist):
    """The default `map_fn`: run every call here, one after the other."""
    return [fn(*args) for args in arglist]


def embed_splits(weights, plans: dict[str, list[tuple[str, int]]], image_size: int | None, *,
                 batch_size: int = EMBED_BATCH, storage_options: dict | None = None, parallel: int = 1,
                 map_fn=None, kind: str = "cls") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{split: (features, labels)} for {split: shard plan}: every split's shards are cut into `parallel`
    groups together, each embedded by one `embed_shards` call run by `map_fn(fn, list_of_args)`.
    Refuses shards whose samples carry no image or no .cls label (the index counts every sample)."""
    size = image_size_of(weights, image_size, storage_options)
    tagged = [(split, item) for split, plan in plans.items() for item in plan]
    groups = split_work([item for _, item in tagged], parallel)
    outs = (map_fn or local_map)(embed_shards, [(weights, g, size, batch_size, storage_options, kind)
                                                for g in groups])
    labels = torch.cat([lab for _, lab in outs]) if outs else torch.empty(0, dtype=torch.long)
    listed = sum(n for _, (_, n) in tagged)
    if len(labels) != listed:
        urls = sorted({url.rsplit("/", 1)[0] for _, (url, _) in tagged})
        raise ValueError(f"{' / '.join(urls)}: index.json lists {listed} samples but {len(labels)} carry an "
                         "image and a .cls label; evaluation needs labelled shards (`dinoray shards build` of "
                         "class folders); check them with `dinoray shards verify`")
    feats = torch.cat([f for f, _ in outs if len(f)])
    out, start = {}, 0
    for split, plan in plans.items():
        n = sum(count for _, count in plan)
        out[split] = (feats[start:start + n], labels[start:start + n])
        start += n
    return out
