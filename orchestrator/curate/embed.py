"""Embed a shard set with Ray Data, one fp16 `.npy` + keys file per shard, resumable by shard.

    read shards (one block per shard) -> decode + resize on CPU tasks (`map_batches`, one shard per call)
    -> embed with an actor pool (`map_batches`, concurrency=(min, max), one GPU per actor when there are GPUs)
    -> the driver gathers rows per shard and writes `shard-NNNNNN.npy` (fp16, L2-normalised rows) and
    `shard-NNNNNN.keys.json` (keys, labels, which rows decoded); the keys file is written last, so a shard
    with a keys file is complete and a rerun embeds only the shards without one.

No entrypoint; `orchestrator.curate.phase.run_curate` calls `embed_set` for the pool, exclude and seed sets.
"""
from __future__ import annotations

import io
import json
import time

import numpy as np

from orchestrator import storage
from orchestrator.data import index as shard_index
from orchestrator.data import samples
from orchestrator.layout import PhaseDir
from orchestrator.storage import Store


def check_embedder(weights: Store, image_size: int) -> int:
    """The image size to embed at (the weights' own when 0); refuses one that is not a multiple of the patch."""
    from orchestrator.eval import features
    arch = features.infer_arch(features.load_state_dict(weights))
    size = image_size or arch["img_size"]
    if size % arch["patch_size"]:
        fix = max(arch["patch_size"], round(size / arch["patch_size"]) * arch["patch_size"])
        raise ValueError(f"embedder {storage.redact(weights.url)}: image_size {size} is not a multiple of its "
                         f"patch size {arch['patch_size']}; use {fix}")
    return size


def shard_list(src: Store) -> tuple[list[tuple[str, int]], Store, dict]:
    """([(shard name, count)], shard folder, index) of a shard set; refuses an empty one."""
    index, folder = shard_index.read_index(src)
    shards = [(s["name"], int(s["count"])) for s in index["shards"]]
    if not sum(n for _, n in shards):
        raise ValueError(f"{storage.redact(src.url)}: index.json lists no images; a curation input needs at "
                         "least one (build it with `dinoray shards build`)")
    return shards, folder, index


class _Decode:
    """map_batches (one shard per batch): the shard's samples as arrays, images uint8 [n, size, size, 3]
    (a zero image with ok=False for a sample that is lost or does not decode)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, batch: dict) -> dict:
        from orchestrator.eval import features
        cols = {"shard": [], "pos": [], "key": [], "label": [], "ok": [], "image": []}
        blank = np.zeros((self.size, self.size, 3), np.uint8)
        for url, options, name, count in zip(batch["url"], batch["options"], batch["name"], batch["count"]):
            shard = Store(str(url), json.loads(str(options)))
            for pos, sample in enumerate(samples.read_shard(shard, 0, int(count))):
                img = samples.sample_image(sample) if sample is not None else None
                image, ok = blank, False
                if img is not None:
                    try:
                        image, ok = features.to_tensor(img[1], self.size).permute(1, 2, 0).numpy(), True
                    except Exception:  # noqa: BLE001 - an undecodable image is recorded, never embedded
                        pass
                cols["shard"].append(str(name))
                cols["pos"].append(pos)
                cols["key"].append(sample["__key__"] if sample is not None else f"lost-{pos}")
                cols["label"].append(int(sample["cls"]) if sample is not None and "cls" in sample else -1)
                cols["ok"].append(ok)
                cols["image"].append(image)
        out = {k: np.array(v) for k, v in cols.items() if k != "image"}
        out["image"] = np.stack(cols["image"]) if cols["image"] else np.zeros((0, self.size, self.size, 3), np.uint8)
        return out


class _Embedder:
    """map_batches actor: loads the backbone once, embeds uint8 images to L2-normalised fp16 CLS features,
    or with a copy descriptor (`descriptor_json`: role copy settings) to copydesc.copy_embedder's rows."""

    def __init__(self, weights_url: str, options_json: str, descriptor_json: str = "null"):
        from orchestrator.eval import features
        weights, descriptor = Store(weights_url, json.loads(options_json)), json.loads(descriptor_json)
        if descriptor:
            from types import SimpleNamespace

            from orchestrator.curate import copydesc
            self.embed = copydesc.copy_embedder(weights, SimpleNamespace(**descriptor))
        else:
            self.embed = features.make_embedder(weights, "cls")

    def __call__(self, batch: dict) -> dict:
        import torch
        imgs = torch.from_numpy(np.ascontiguousarray(batch.pop("image"))).permute(0, 3, 1, 2)
        batch["emb"] = self.embed(imgs).numpy().astype(np.float16)
        return batch


def _write_shard(folder: Store, name: str, rows: list[dict], set_url: str) -> None:
    rows.sort(key=lambda row: row["pos"])
    npy, keys = PhaseDir.embedding_files(folder, name)
    buf = io.BytesIO()
    np.save(buf, np.stack([row["emb"] for row in rows]).astype(np.float16))
    npy.write_bytes(buf.getvalue())
    keys.write_json({"source": storage.redact(set_url), "shard": name, "keys": [str(row["key"]) for row in rows],
                     "labels": [int(row["label"]) for row in rows], "ok": [bool(row["ok"]) for row in rows]})


def embed_set(src: Store, out: Store, weights: Store, image_size: int, *, batch_size: int = 256,
              concurrency: tuple[int, int] = (1, 2), use_gpu: bool = False, log=print, on_rate=None,
              shard_sleep_s: float = 0.0, descriptor: dict | None = None) -> dict:
    """Embed every shard of `src` that `out` has no keys file for; -> {"shards", "embedded", "images", "seconds"}.
    `on_rate(images_per_s, n)` is called after each written shard of n images (the Prometheus gauge);
    `descriptor`: the copy-descriptor settings of a `role: copy` embedder (None: CLS)."""
    import ray
    shards, folder, _ = shard_list(src)
    size = check_embedder(weights, image_size)
    todo = [(name, n) for name, n in shards if not PhaseDir.embedding_files(out, name)[1].exists()]
    log(f"[curate] embed {storage.redact(src.url)}: {len(todo)} of {len(shards)} shards to embed "
        f"({len(shards) - len(todo)} already done), {size} px")
    if not todo:
        return {"shards": len(shards), "embedded": 0, "images": 0, "seconds": 0.0}
    t0, done, images = time.time(), 0, 0
    items = [{"url": (folder / name).url, "options": json.dumps(folder.options), "name": name, "count": n}
             for name, n in todo]
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own per-shard log lines say the same, once per shard
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(_Decode(size), batch_size=1, batch_format="numpy")
    ds = ds.map_batches(_Embedder, fn_constructor_args=(weights.url, json.dumps(weights.options), json.dumps(descriptor)),
                        batch_size=batch_size, concurrency=tuple(concurrency), num_gpus=1 if use_gpu else 0,
                        batch_format="numpy")
    expected, pending = dict(todo), {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["pos"])):
            row = {k: batch[k][i] for k in ("shard", "pos", "key", "label", "ok", "emb")}
            rows = pending.setdefault(str(row["shard"]), [])
            rows.append(row)
            if len(rows) == expected[str(row["shard"])]:
                _write_shard(out, str(row["shard"]), pending.pop(str(row["shard"])), src.url)
                done, images = done + 1, images + len(rows)
                rate = images / max(time.time() - t0, 1e-6)
                log(f"[curate] embedded {done}/{len(todo)} shards, {images} images, {rate:.0f} img/s")
                if on_rate:
                    on_rate(rate, len(rows))
                if shard_sleep_s:  # debug.step_sleep_s: slows the phase down so tests can kill it midway
                    time.sleep(shard_sleep_s)
    if pending:
        raise RuntimeError(f"{storage.redact(src.url)}: shards {sorted(pending)} returned fewer rows than index.json "
                           "lists; run `dinoray shards verify` on it")
    return {"shards": len(shards), "embedded": done, "images": images, "seconds": round(time.time() - t0, 2)}


def load_set(src: Store, out: Store) -> dict:
    """All embeddings of an embedded set in index order: {"emb": fp32 [N, D], "shard", "pos" (row in its shard),
    "key", "label", "ok"}."""
    shards, _, _ = shard_list(src)
    embs, names, keys, labels, oks, pos = [], [], [], [], [], []
    for name, _ in shards:
        npy, keys_file = PhaseDir.embedding_files(out, name)
        meta = keys_file.read_json()
        if meta is None:
            raise FileNotFoundError(f"{storage.redact(keys_file.url)} is missing: embed {storage.redact(src.url)} "
                                    "first (rerun the curate phase)")
        embs.append(np.load(io.BytesIO(npy.read_bytes())).astype(np.float32))
        names += [name] * len(meta["keys"])
        pos += range(len(meta["keys"]))
        keys += meta["keys"]
        labels += meta["labels"]
        oks += meta["ok"]
    return {"emb": np.concatenate(embs), "shard": np.array(names), "pos": np.array(pos), "key": np.array(keys),
            "label": np.array(labels, dtype=np.int64), "ok": np.array(oks, dtype=bool)}
