"""Write the curated images as new WebDataset shards, one Ray task per output shard, plus index.json.

The selection (pool rows in pool order) is cut into output shards of `samples_per_shard`; each task
reads the source shards its images come from, copies their original bytes (never re-encoded) and
labels under new keys, hashes the tar, describes it in `_build/<shard>.json` and commits it (the
same commit protocol as `dinoray shards build`). A rerun writes only the shards without a matching
description. index.json is the shard index every reader uses (data/index.py) plus a "curation"
section: the counts at each stage and, per output key, its source shard and sample key
("source_shard", "source_sample") and why it was kept ("seed_sets", "clusters").

No entrypoint; the curate phase's "write" stage.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile

from orchestrator import storage
from orchestrator.data import index as shard_index
from orchestrator.data import samples
from orchestrator.data.build import BUILD_DIR
from orchestrator.storage import Store


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    import io
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
    tf.addfile(info, io.BytesIO(data))


def _plan_hash(items: list[dict]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item['key']}\0{item['shard']}\0{item['source_key']}\n".encode())
    return digest.hexdigest()[:16]


def write_shard(source: Store, out: Store, idx: int, items: list[dict]) -> dict:
    """One output shard: items [{"key", "shard", "pos", "source_key"}] copied from the source shards."""
    name = shard_index.shard_name(idx)
    staging, temporary = out.staging_dir(prefix="dinoray-curate-")
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=staging)
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            by_shard: dict[str, dict[int, dict]] = {}
            for item in items:
                by_shard.setdefault(item["shard"], {})[item["pos"]] = item
            for shard, wanted in by_shard.items():
                for pos, sample in enumerate(samples.read_shard(source / shard, 0, max(wanted) + 1)):
                    item = wanted.get(pos)
                    if item is None:
                        continue
                    if sample is None or sample["__key__"] != item["source_key"]:
                        raise OSError(f"{storage.redact((source / shard).url)}: sample {pos} is not "
                                      f"{item['source_key']} any more; the pool changed since it was embedded")
                    ext, data = samples.sample_image(sample)
                    _add_member(tf, f"{item['key']}.{ext}", data)
                    if "cls" in sample:
                        _add_member(tf, f"{item['key']}.cls", sample["cls"])
        digest = hashlib.sha256()
        with open(tmp, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
        info = {"name": name, "count": len(items), "bytes": os.path.getsize(tmp), "sha256": digest.hexdigest(),
                "plan": _plan_hash(items)}
        (out / BUILD_DIR / (name + ".json")).write_json(info)
        (out / name).put_file(tmp, move=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if temporary:
            shutil.rmtree(staging, ignore_errors=True)
    return info


def _done(out: Store, plans: list[list[dict]]) -> dict[int, dict]:
    """Output shards already committed with this plan."""
    done = {}
    for i, items in enumerate(plans):
        name = shard_index.shard_name(i)
        info = (out / BUILD_DIR / (name + ".json")).read_json()
        if info and info["plan"] == _plan_hash(items) and (out / name).exists():
            done[i] = info
    return done


def write_selection(source: Store, out: Store, items: list[dict], *, classes: list, samples_per_shard: int,
                    curation: dict, map_fn, log=print) -> dict:
    """Write `items` (in order; each {"key", "shard", "pos", "source_key", "why"}) as shards under `out`
    with `map_fn(fn, arglist)` (Ray tasks in the phase) and index.json last; -> the index."""
    plans = [items[i:i + samples_per_shard] for i in range(0, len(items), samples_per_shard)]
    done = _done(out, plans)
    todo = [i for i in range(len(plans)) if i not in done]
    log(f"[curate] write {len(items)} images as {len(plans)} shards ({len(done)} already written)")
    strip = [[{k: item[k] for k in ("key", "shard", "pos", "source_key")} for item in plans[i]] for i in todo]
    for i, info in zip(todo, map_fn(write_shard, [(source, out, i, s) for i, s in zip(todo, strip)])):
        done[i] = info
    shards = [done[i] for i in range(len(plans))]
    index = {"format": shard_index.FORMAT, "total": len(items), "classes": classes, "shards": shards,
             "skipped": [], "params": {"curated_from": storage.redact(source.url),
                                       "samples_per_shard": samples_per_shard},
             "curation": dict(curation, images={item["key"]: {"source_shard": item["shard"],
                                                              "source_sample": item["source_key"], **item["why"]}
                                                for item in items})}
    # not redact(index): its dict-key rule would blank every "key"-named field; URLs are redacted where set
    (out / shard_index.INDEX).write_bytes(json.dumps(index, indent=1).encode())
    (out / BUILD_DIR).rm(recursive=True)
    return index
