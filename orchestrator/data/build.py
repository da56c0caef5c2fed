"""Build WebDataset shards of original image bytes: `dinoray shards build`.

    dinoray shards build SRC DST [--samples-per-shard 1000] [--bytes-per-shard 0] [--writers 4]
                                 [--shuffle-seed 0 | --no-shuffle] [--quiet]

SRC: an image folder (label = name of the first sub-folder; none for images at the top), a .tar of
such a folder (a single top-level folder in the tar is its root), or a text file listing image
paths/URLs one per line (optional TAB + label). DST: a local path or any fsspec URL (s3://, gs://,
file://). Credentials come from the environment only.

Output: DST/shard-000000.tar, ... (members `<key>.<jpg|png|...>` holding the original bytes, never
re-encoded, plus `<key>.cls` with the label index when labelled) and DST/index.json (shards with
count/bytes/sha256, classes, total, skipped files with reasons, build parameters; see data/index.py).

Robustness: a corrupt/unreadable image is skipped and listed in index.json; a shard is written to a
temporary file, hashed, described in DST/_build/<shard>.json and only then committed (rename / single
PUT), so a half-written shard never carries its final name. Re-running the same build after an
interruption writes only the missing shards (the plan is deterministic: sources sorted, shuffled with
--shuffle-seed, cut by count/bytes).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from orchestrator import storage
from orchestrator.data.index import FORMAT, INDEX, shard_name
from orchestrator.data.samples import IMAGE_EXTS, check_image, image_ext, is_image_name
from orchestrator.storage import Store

BUILD_DIR = "_build"  # per-shard sidecars of an unfinished build


# ----------------------------------------------------------------------------------- sources

class Source:
    """Enumerates (ref, label, size) entries of SRC and reads their bytes (thread-safe)."""

    def __init__(self, src: Store):
        self.src = src
        self.fs, self.path = fs, path = src.fs()  # opened once: one lookup per image costs 30% of a build
        if not fs.exists(path):
            raise FileNotFoundError(f"SRC {storage.redact(src.url)} does not exist; give an image folder, a .tar "
                                    f"of one, or a text file listing image paths")
        self.members: dict[str, tuple[int, int]] = {}  # tar member -> (data offset, size)
        self.base = ""  # folder (path in self.fs) that relative refs are under
        if fs.isdir(path):
            self.kind, self.base = "folder", path.rstrip("/")
            root = self.base + "/"
            found = fs.find(path, detail=True)
            files = sorted(p for p in found if is_image_name(p))
            self.entries = _label_by_dir([(p[len(root):] if p.startswith(root) else p, found[p].get("size"))
                                          for p in files])
        elif path.lower().endswith(".tar"):
            self.kind = "tar"
            with src.open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
                for m in tf.getmembers():
                    if m.isreg() and is_image_name(m.name):
                        self.members[m.name] = (m.offset_data, m.size)
            self.entries = _label_by_dir([(n, self.members[n][1]) for n in sorted(self.members)], strip_top=True)
        else:
            self.kind, self.base = "list", path.rsplit("/", 1)[0] if "/" in path else ""
            self.entries = _list_entries(src.read_bytes().decode("utf-8"))
        if not self.entries:
            raise ValueError(f"SRC {storage.redact(src.url)} ({self.kind}) holds no images "
                             f"(extensions {list(IMAGE_EXTS)}); check the path")

    def read(self, ref: str) -> bytes:
        if self.kind == "tar":
            offset, size = self.members[ref]
            return self.fs.cat_file(self.path, start=offset, end=offset + size)
        if "://" in ref or os.path.isabs(ref):  # list files may name absolute paths or URLs
            return Store(ref, self.src.options).read_bytes()
        return self.fs.cat_file(f"{self.base}/{ref}" if self.base else ref)


def _list_entries(text: str) -> list[tuple[str, str | None, None]]:
    """Entries of a list file: one path/URL per line, optional TAB + label; '#' comments."""
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        ref, _, label = line.partition("\t")
        entries.append((ref.strip(), label.strip() or None, None))
    return entries


def _label_by_dir(items, strip_top: bool = False):
    """Label = first directory below the root (None for images at the root).

    strip_top (tar sources): a single top-level folder shared by every member ("test/cat/1.jpg") is the
    root, as when a folder is tarred.
    """
    parts = [r.split("/")[:-1] for r, _ in items]
    if strip_top and parts and all(p and p[0] == parts[0][0] for p in parts):
        parts = [p[1:] for p in parts]
    return [(r, p[0] if p else None, size) for (r, size), p in zip(items, parts)]


# ------------------------------------------------------------------------------------- planning

def make_plan(entries, samples_per_shard: int, bytes_per_shard: int, shuffle_seed: int | None):
    """Deterministic list of shards, each a list of (global_key, ref, label)."""
    order = np.arange(len(entries))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(entries))
    shards, cur, cur_bytes = [], [], 0
    for k, idx in enumerate(order):
        ref, label, size = entries[idx]
        size = size or 0
        if cur and ((samples_per_shard and len(cur) >= samples_per_shard)
                    or (bytes_per_shard and cur_bytes + size > bytes_per_shard)):
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((f"{k:09d}", ref, label))
        cur_bytes += size + 1536  # + tar headers of the image and .cls members
    if cur:
        shards.append(cur)
    return shards


def _plan_hash(shard) -> str:
    h = hashlib.sha256()
    for key, ref, label in shard:
        h.update(f"{key}\0{ref}\0{label}\n".encode())
    return h.hexdigest()[:16]


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
    tf.addfile(info, io.BytesIO(data))


class _Progress:
    """Shards and images written, rate and ETA on stderr (in place on a terminal, every 10 s in logs)."""

    def __init__(self, total_shards: int, total_images: int, quiet: bool):
        self.total_shards, self.total_images, self.quiet = total_shards, total_images, quiet
        self.shards = self.images = 0
        self.t0 = self.last = time.monotonic()
        self.lock = threading.Lock()

    def add(self, images=0, shards=0, force=False):
        with self.lock:
            self.images += images
            self.shards += shards
            now = time.monotonic()
            tty = sys.stderr.isatty()
            if self.quiet or (not force and now - self.last < (0.5 if tty else 10.0)):
                return
            self.last = now
            rate = self.images / max(now - self.t0, 1e-6)
            eta = time.strftime("%H:%M:%S", time.gmtime((self.total_images - self.images) / rate)) if rate else "?"
            print(f"{chr(13) if tty else ''}[shards] {self.shards}/{self.total_shards} shards  "
                  f"{self.images}/{self.total_images} images  {rate:.0f} img/s  ETA {eta}",
                  end="" if tty else "\n", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------- writing

def _fill_tar(tmp: str, source: Source, shard, cls_index: dict, name: str, progress) -> tuple[int, list]:
    """Write the shard's readable images (and labels) into local tar `tmp`; -> (count, skipped)."""
    skipped, count = [], 0
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, ref, label in shard:
            try:
                data = source.read(ref)
                reason = check_image(data)
            except Exception as e:  # noqa: BLE001 - one bad file never aborts the build
                data, reason = b"", f"unreadable: {type(e).__name__}: {e}"
            if reason:
                skipped.append({"source": storage.redact(ref), "reason": storage.redact(reason), "shard": name})
            else:
                _add_member(tf, f"{key}.{image_ext(data)}", data)
                if label is not None:
                    _add_member(tf, f"{key}.cls", str(cls_index[label]).encode())
                count += 1
            progress.add(images=1)
    return count, skipped


def _write_shard(source: Source, dst: Store, staging: str, idx: int, shard, classes, progress) -> dict:
    """Write, hash, describe (DST/_build/<shard>.json) and then commit one shard; -> its description."""
    name = shard_name(idx)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=staging)
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
        count, skipped = _fill_tar(tmp, source, shard, {c: i for i, c in enumerate(classes)}, name, progress)
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        info = {"name": name, "count": count, "bytes": os.path.getsize(tmp), "sha256": digest.hexdigest(),
                "plan": _plan_hash(shard), "skipped": skipped}
        # Describe first, then commit the shard: a shard under its final name is always complete.
        (dst / BUILD_DIR / (name + ".json")).write_bytes(json.dumps(info).encode())
        (dst / name).put_file(tmp, move=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    progress.add(shards=1)
    return info


def build(src: Store, dst: Store, *, samples_per_shard: int = 1000, bytes_per_shard: int = 0, writers: int = 4,
          shuffle_seed: int | None = 0, quiet: bool = False, max_shards: int | None = None) -> dict:
    """Build shards from SRC into DST and write DST/index.json; returns the index dict.

    `max_shards` stops after writing that many new shards (used to simulate an interruption).
    """
    if samples_per_shard <= 0 and bytes_per_shard <= 0:
        raise ValueError("give --samples-per-shard > 0 or --bytes-per-shard > 0")
    source = Source(src)
    classes = sorted({lab for _, lab, _ in source.entries if lab is not None})
    plan = make_plan(source.entries, samples_per_shard, bytes_per_shard, shuffle_seed)
    params = {"src": storage.redact(src.url), "src_kind": source.kind, "samples_per_shard": samples_per_shard,
              "bytes_per_shard": bytes_per_shard, "shuffle_seed": shuffle_seed, "n_sources": len(source.entries)}
    done = _completed(dst, plan, params)
    todo = [i for i in range(len(plan)) if i not in done][:max_shards]
    progress = _Progress(len(plan), len(source.entries), quiet)
    progress.add(images=sum(len(plan[i]) for i in done), shards=len(done))
    if not quiet:
        print(f"[shards] {storage.redact(src.url)} -> {storage.redact(dst.url)}: {len(source.entries)} images, "
              f"{len(plan)} shards ({len(done)} already complete)", file=sys.stderr)
    staging, temporary = dst.staging_dir(prefix="dinoray-shards-")  # local DST: the commit is a rename
    try:
        with ThreadPoolExecutor(max_workers=max(1, writers)) as ex:
            futs = {i: ex.submit(_write_shard, source, dst, staging, i, plan[i], classes, progress) for i in todo}
            for i, fut in futs.items():
                done[i] = fut.result()
    finally:
        if temporary:
            shutil.rmtree(staging, ignore_errors=True)
    progress.add(force=True)
    if not quiet:
        print(file=sys.stderr)
    if len(done) < len(plan):
        return {"incomplete": True, "done": len(done), "planned": len(plan)}
    shards = [{k: done[i][k] for k in ("name", "count", "bytes", "sha256", "plan")} for i in range(len(plan))]
    index = {"format": FORMAT, "total": sum(s["count"] for s in shards), "classes": classes,
             "shards": shards, "skipped": [s for i in range(len(plan)) for s in done[i]["skipped"]],
             "params": params}
    (dst / INDEX).write_bytes(json.dumps(storage.redact(index), indent=1).encode())
    (dst / BUILD_DIR).rm(recursive=True)
    return index


def _completed(dst: Store, plan, params) -> dict[int, dict]:
    """Shards of this plan that are already committed (from index.json or _build sidecars)."""
    known: dict[str, dict] = {}
    old = (dst / INDEX).read_json()
    if old is not None:
        if {k: old.get("params", {}).get(k) for k in params} != params:
            raise ValueError(f"{storage.redact(dst.url)}/{INDEX} was built with other parameters "
                             f"({storage.redact(old.get('params'))}); use a new DST or delete the old shards")
        skipped_by = {}
        for s in old.get("skipped", []):
            skipped_by.setdefault(s["shard"], []).append(s)
        for s in old["shards"]:
            known[s["name"]] = dict(s, skipped=skipped_by.get(s["name"], []))
    for name in (dst / BUILD_DIR).ls():
        if name.endswith(".tar.json"):
            info = (dst / BUILD_DIR / name).read_json()
            known[info["name"]] = info
    sizes = _sizes(dst)
    done = {}
    for i, shard in enumerate(plan):
        info = known.get(shard_name(i))
        if info and info.get("plan") == _plan_hash(shard) and sizes.get(shard_name(i)) == info["bytes"]:
            done[i] = info
    return done


def _sizes(folder: Store) -> dict[str, int]:
    """{file name: size} of the files directly in `folder` ({} when it does not exist)."""
    fs, path = folder.fs()
    try:
        return {os.path.basename(e["name"].rstrip("/")): e["size"] for e in fs.ls(path, detail=True)}
    except FileNotFoundError:
        return {}


# -------------------------------------------------------------------------------------------- CLI

def parse_bytes(text: str) -> int:
    """'256MB' / '1.5G' / '4096' -> bytes."""
    text = str(text).strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for suf in ("KB", "MB", "GB", "K", "M", "G"):
        if text.endswith(suf):
            return int(float(text[:-len(suf)]) * mult[suf[0]])
    return int(text)


def cmd_build(args) -> int:
    """`dinoray shards build`: args.src, dst, samples_per_shard, bytes_per_shard, writers, shuffle_seed,
    no_shuffle, quiet. Exit 0 when every shard is written, 2 on bad input."""
    try:
        index = build(Store(args.src), Store(args.dst), samples_per_shard=args.samples_per_shard,
                      bytes_per_shard=parse_bytes(args.bytes_per_shard), writers=args.writers,
                      shuffle_seed=None if args.no_shuffle else args.shuffle_seed, quiet=args.quiet)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {storage.redact(str(e))}", file=sys.stderr)
        return 2
    print(f"wrote {len(index['shards'])} shards, {index['total']} images, {len(index['skipped'])} skipped "
          f"-> {storage.redact((Store(args.dst) / INDEX).url)}")
    for s in index["skipped"][:20]:
        print(f"  skipped {s['source']}: {s['reason']}")
    return 0
