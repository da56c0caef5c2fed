"""Build and verify WebDataset shards of original image bytes.

    dinoray shards build SRC DST [--samples-per-shard 1000] [--bytes-per-shard 0] [--writers 4]
    dinoray shards verify DST [--workers 4]
    (or: python -m orchestrator.data.shards build SRC DST / python -m orchestrator.data.shards verify DST)

SRC: an image folder (label = name of the first sub-folder; none for images at the top), a .tar of
such a folder (a single top-level folder in the tar is its root), or a text file listing image paths/URLs one per line (optional TAB + label). DST: a local
path or any fsspec URL (s3://, gs://, file://). Credentials come from the environment only.

Output: DST/shard-000000.tar, ... (members `<key>.<jpg|png|...>` holding the original bytes, never
re-encoded, plus `<key>.cls` with the label index when labelled) and DST/index.json (shards with
count/bytes/sha256, classes, total, skipped files with reasons, build parameters).

Robustness: a corrupt/unreadable image is skipped and listed in index.json; a shard is written to a
temporary file, hashed, described in DST/_build/<shard>.json and only then committed (rename / single
PUT), so a half-written shard never carries its final name. Re-running the same build after an
interruption writes only the missing shards (the plan is deterministic: sources sorted, shuffled with
--shuffle-seed, cut by count/bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from orchestrator import storage

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
FORMAT = "dinoray-shards/1"


# ----------------------------------------------------------------------------------- sources

class Source:
    """Enumerates (ref, label, size) entries of SRC and reads their bytes (thread-safe)."""

    def __init__(self, src: str, storage_options: dict | None = None):
        self.src, self.so = src, storage_options
        self.fs, self.path = storage.fs_for(src, storage_options)
        if not self.fs.exists(self.path):
            raise FileNotFoundError(f"SRC {storage.redact(src)} does not exist; give an image folder, a .tar "
                                    f"of one, or a text file listing image paths")
        self.members: dict[str, tuple[int, int]] = {}
        self.base = ""
        if self.fs.isdir(self.path):
            self.kind = "folder"
            files = sorted(p for p in self.fs.find(self.path) if os.path.splitext(p)[1].lower() in IMAGE_EXTS)
            root = self.path.rstrip("/") + "/"
            sizes = {p: self.fs.size(p) for p in files} if storage.protocol_of(src) == "file" else {}
            rels = [(p[len(root):] if p.startswith(root) else p) for p in files]
            self.entries = _label_by_dir([(r, sizes.get(root + r)) for r in rels])
            self.base = root
        elif self.path.lower().endswith(".tar"):
            self.kind = "tar"
            with self.fs.open(self.path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
                for m in tf.getmembers():
                    if m.isreg() and os.path.splitext(m.name)[1].lower() in IMAGE_EXTS:
                        self.members[m.name] = (m.offset_data, m.size)
            self.entries = _label_by_dir([(n, self.members[n][1]) for n in sorted(self.members)], strip_top=True)
        else:
            self.kind = "list"
            text = self.fs.cat_file(self.path).decode("utf-8")
            self.base = os.path.dirname(self.path)
            self.entries = []
            for ln, line in enumerate(text.splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                ref, _, label = line.partition("\t")
                self.entries.append((ref.strip(), label.strip() or None, None))
        if not self.entries:
            raise ValueError(f"SRC {storage.redact(src)} ({self.kind}) holds no images "
                             f"(extensions {sorted(IMAGE_EXTS)}); check the path")

    def read(self, ref: str) -> bytes:
        if self.kind == "tar":
            off, size = self.members[ref]
            if storage.protocol_of(self.src) == "file":
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    return os.pread(fd, size, off)
                finally:
                    os.close(fd)
            return self.fs.cat_file(self.path, start=off, end=off + size)
        if self.kind == "folder":
            return self.fs.cat_file(self.base + ref)
        if "://" in ref or os.path.isabs(ref):
            fs, p = storage.fs_for(ref, self.so)
            return fs.cat_file(p)
        return self.fs.cat_file(storage.join(self.base, ref) if self.base else ref)


def _label_by_dir(items, strip_top: bool = False):
    """Label = first directory below the root (None for images at the root).

    strip_top (tar sources): a single top-level folder shared by every member ("test/cat/1.jpg") is the
    root, as when a folder is tarred.
    """
    parts = [r.split("/")[:-1] for r, _ in items]
    if strip_top and parts and all(p and p[0] == parts[0][0] for p in parts):
        parts = [p[1:] for p in parts]
    return [(r, p[0] if p else None, size) for (r, size), p in zip(items, parts)]


# -------------------------------------------------------------------------------- image checks

def image_ext(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"GIF8",):
        return "gif"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tif"
    return None


def check_image(data: bytes) -> str | None:
    """None when the loader can decode `data` completely, else a short reason."""
    if not data:
        return "empty file"
    ext = image_ext(data)
    if ext is None:
        return "not a known image format (jpg/png/webp/bmp/gif/tif)"
    if ext == "jpg":
        import simplejpeg
        try:
            simplejpeg.decode_jpeg(data, colorspace="RGB", min_factor=8, strict=True)
            return None
        except ValueError:
            pass  # CMYK/odd JPEGs: PIL is the loader's fallback too
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.width < 1 or im.height < 1:
                return "zero-sized image"
    except Exception as e:  # noqa: BLE001 - any decoder failure means corrupt
        return f"undecodable: {type(e).__name__}: {e}"
    return None


# ------------------------------------------------------------------------------------- planning

def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


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
        cur_bytes += size + 1536
    if cur:
        shards.append(cur)
    return shards


def _plan_hash(shard) -> str:
    h = hashlib.sha256()
    for key, ref, label in shard:
        h.update(f"{key}\0{ref}\0{label}\n".encode())
    return h.hexdigest()[:16]


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), 0, 0o644, "", ""
    tf.addfile(ti, io.BytesIO(data))


class _Progress:
    def __init__(self, total_shards: int, total_samples: int, quiet: bool):
        self.ts, self.tn, self.quiet = total_shards, total_samples, quiet
        self.s = self.n = 0
        self.t0 = self.last = time.monotonic()
        self.lock = threading.Lock()

    def add(self, samples=0, shards=0, force=False):
        with self.lock:
            self.n += samples
            self.s += shards
            now = time.monotonic()
            tty = sys.stderr.isatty()
            if self.quiet or (not force and now - self.last < (0.5 if tty else 10.0)):
                return
            self.last = now
            rate = self.n / max(now - self.t0, 1e-6)
            eta = (self.tn - self.n) / rate if rate > 0 else float("inf")
            eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?"
            print(f"{chr(13) if tty else ''}[shards] {self.s}/{self.ts} shards  {self.n}/{self.tn} images  "
                  f"{rate:.0f} img/s  ETA {eta_s}", end="" if tty else "\n", file=sys.stderr, flush=True)


def _write_shard(source: Source, dst: str, idx: int, shard, classes, so, progress) -> dict:
    name = shard_name(idx)
    cls_index = {c: i for i, c in enumerate(classes)}
    skipped, count = [], 0
    tmpdir = None
    if storage.protocol_of(dst) == "file":  # same folder: the commit is a rename
        tmpdir = os.path.abspath(storage.fs_for(dst, so)[1])
        os.makedirs(tmpdir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=tmpdir)
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
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
                progress.add(samples=1)
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        info = {"name": name, "count": count, "bytes": os.path.getsize(tmp), "sha256": h.hexdigest(),
                "plan": _plan_hash(shard), "skipped": skipped}
        # Describe first, then commit the shard: a shard under its final name is always complete.
        storage.atomic_write_bytes(storage.join(dst, "_build", name + ".json"), json.dumps(info).encode(), so)
        storage.atomic_put_file(tmp, storage.join(dst, name), so, move=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    progress.add(shards=1)
    return info


def build(src: str, dst: str, *, samples_per_shard: int = 1000, bytes_per_shard: int = 0, writers: int = 4,
          shuffle_seed: int | None = 0, storage_options: dict | None = None, quiet: bool = False,
          max_shards: int | None = None) -> dict:
    """Build shards from SRC into DST and write DST/index.json; returns the index dict.

    `max_shards` stops after writing that many new shards (used to simulate an interruption).
    """
    if samples_per_shard <= 0 and bytes_per_shard <= 0:
        raise ValueError("give --samples-per-shard > 0 or --bytes-per-shard > 0")
    so = storage_options
    source = Source(src, so)
    classes = sorted({lab for _, lab, _ in source.entries if lab is not None})
    plan = make_plan(source.entries, samples_per_shard, bytes_per_shard, shuffle_seed)
    params = {"src": storage.redact(src), "src_kind": source.kind, "samples_per_shard": samples_per_shard,
              "bytes_per_shard": bytes_per_shard, "shuffle_seed": shuffle_seed, "n_sources": len(source.entries)}
    fs, root = storage.fs_for(dst, so)
    done = _completed(fs, root, dst, plan, params, so)
    todo = [i for i in range(len(plan)) if i not in done]
    if max_shards is not None:
        todo = todo[:max_shards]
    progress = _Progress(len(plan), len(source.entries), quiet)
    progress.add(samples=sum(len(plan[i]) for i in done), shards=len(done))
    if not quiet:
        print(f"[shards] {storage.redact(src)} -> {storage.redact(dst)}: {len(source.entries)} images, "
              f"{len(plan)} shards ({len(done)} already complete)", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=max(1, writers)) as ex:
        futs = {i: ex.submit(_write_shard, source, dst, i, plan[i], classes, so, progress) for i in todo}
        for i, fut in futs.items():
            done[i] = fut.result()
    progress.add(force=True)
    if not quiet:
        print(file=sys.stderr)
    if len(done) < len(plan):
        return {"incomplete": True, "done": len(done), "planned": len(plan)}
    shards = [{k: done[i][k] for k in ("name", "count", "bytes", "sha256", "plan")} for i in range(len(plan))]
    index = {"format": FORMAT, "total": sum(s["count"] for s in shards), "classes": classes,
             "shards": shards, "skipped": [s for i in range(len(plan)) for s in done[i]["skipped"]],
             "params": params}
    storage.atomic_write_bytes(storage.join(dst, "index.json"), json.dumps(storage.redact(index), indent=1).encode(), so)
    try:
        fs.rm(storage.join(root, "_build"), recursive=True)
    except (FileNotFoundError, OSError):
        pass
    return index


def _completed(fs, root, dst, plan, params, so) -> dict[int, dict]:
    """Shards of this plan that are already committed (from index.json or _build sidecars)."""
    known: dict[str, dict] = {}
    idx_path = storage.join(root, "index.json")
    if fs.exists(idx_path):
        old = json.loads(fs.cat_file(idx_path))
        same = {k: old.get("params", {}).get(k) for k in params} == params
        if not same:
            raise ValueError(f"{storage.redact(dst)}/index.json was built with other parameters "
                             f"({storage.redact(old.get('params'))}); use a new DST or delete the old shards")
        skipped_by = {}
        for s in old.get("skipped", []):
            skipped_by.setdefault(s["shard"], []).append(s)
        for s in old["shards"]:
            known[s["name"]] = dict(s, skipped=skipped_by.get(s["name"], []))
    build_dir = storage.join(root, "_build")
    if fs.exists(build_dir):
        for p in fs.ls(build_dir, detail=False):
            if p.endswith(".tar.json"):
                info = json.loads(fs.cat_file(p))
                known[info["name"]] = info
    sizes = {os.path.basename(p["name"]): p["size"] for p in fs.ls(root, detail=True)} if fs.exists(root) else {}
    done = {}
    for i, shard in enumerate(plan):
        info = known.get(shard_name(i))
        if info and info.get("plan") == _plan_hash(shard) and sizes.get(shard_name(i)) == info["bytes"]:
            done[i] = info
    return done


# ---------------------------------------------------------------------------------------- verify

def read_index(url: str, storage_options: dict | None = None) -> tuple[dict, str]:
    """Load index.json given the shard folder or the index.json URL; returns (index, folder URL)."""
    idx_url = url if url.endswith(".json") else storage.join(url, "index.json")
    folder = idx_url.rsplit("/", 1)[0] if "/" in idx_url else "."
    fs, p = storage.fs_for(idx_url, storage_options)
    try:
        raw = fs.cat_file(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"{storage.redact(idx_url)} not found; build shards with "
                                f"`dinoray shards build SRC DST` first") from None
    except Exception as e:  # noqa: BLE001
        raise OSError(f"cannot read {storage.describe_error(idx_url, e)}") from None
    try:
        index = json.loads(raw)
        assert index.get("format") == FORMAT and isinstance(index.get("shards"), list)
    except (ValueError, AssertionError):
        raise ValueError(f"{storage.redact(idx_url)} is not a dinoray shard index (format {FORMAT}); "
                         f"rebuild with `dinoray shards build`") from None
    return index, folder


def iter_tar_samples(fileobj):
    """Yield (key, {ext: bytes}) from a tar stream, grouping consecutive members by key."""
    cur_key, cur = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|") as tf:
        for m in tf:
            if not m.isreg():
                continue
            base = m.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            data = tf.extractfile(m).read()
            if key != cur_key and cur:
                yield cur_key, cur
                cur = {}
            cur_key = key
            cur[ext] = data
    if cur:
        yield cur_key, cur


def verify_shard(folder: str, info: dict, n_classes: int, so=None) -> list[str]:
    name, problems = info["name"], []
    url = storage.join(folder, name)
    fs, p = storage.fs_for(url, so)
    try:
        size = fs.size(p)
    except FileNotFoundError:
        return [f"{name}: missing (rerun `dinoray shards build` with the same SRC and DST to write it)"]
    if size != info["bytes"]:
        problems.append(f"{name}: {size} bytes, index says {info['bytes']} (truncated or replaced)")
    h, count = hashlib.sha256(), 0

    class _Hashing(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def readable(self):
            return True

        def readinto(self, b):
            data = self.f.read(len(b))
            h.update(data)
            b[:len(data)] = data
            return len(data)

    try:
        with storage.open_url(url, "rb", so) as f:
            for key, sample in iter_tar_samples(io.BufferedReader(_Hashing(f), 1 << 20)):
                count += 1
                imgs = [e for e in sample if e in ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif")]
                if not imgs:
                    problems.append(f"{name}: sample {key} has no image")
                for e in imgs:
                    reason = check_image(sample[e])
                    if reason:
                        problems.append(f"{name}: sample {key}.{e}: {reason}")
                if "cls" in sample:
                    try:
                        c = int(sample["cls"])
                        assert 0 <= c < max(n_classes, 1)
                    except (ValueError, AssertionError):
                        problems.append(f"{name}: sample {key}.cls={sample['cls'][:20]!r} not a class index < {n_classes}")
            while f.read(1 << 20):
                pass
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{name}: unreadable tar after {count} samples: {type(e).__name__}: {storage.redact(str(e))}")
    if h.hexdigest() != info["sha256"]:
        problems.append(f"{name}: sha256 {h.hexdigest()[:12]}... != index {info['sha256'][:12]}... (corrupted)")
    if count != info["count"]:
        problems.append(f"{name}: {count} samples, index says {info['count']}")
    return problems


def verify(dst: str, *, workers: int = 4, storage_options: dict | None = None) -> list[str]:
    """Return a list of problems (empty when every shard matches the index and decodes)."""
    index, folder = read_index(dst, storage_options)
    n_classes = len(index.get("classes", []))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        results = list(ex.map(lambda s: verify_shard(folder, s, n_classes, storage_options), index["shards"]))
    problems = [p for r in results for p in r]
    total = sum(s["count"] for s in index["shards"])
    if total != index.get("total"):
        problems.append(f"index.json: total {index.get('total')} != sum of shard counts {total}")
    return problems


# -------------------------------------------------------------------------------------------- CLI

def _parse_bytes(s: str) -> int:
    s = str(s).strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for suf in ("KB", "MB", "GB", "K", "M", "G"):
        if s.endswith(suf):
            return int(float(s[:-len(suf)]) * mult[suf[0]])
    return int(s)


def _cmd_build(args) -> int:
    try:
        index = build(args.src, args.dst, samples_per_shard=args.samples_per_shard,
                      bytes_per_shard=_parse_bytes(args.bytes_per_shard), writers=args.writers,
                      shuffle_seed=None if args.no_shuffle else args.shuffle_seed, quiet=args.quiet)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {storage.redact(str(e))}", file=sys.stderr)
        return 2
    print(f"wrote {len(index['shards'])} shards, {index['total']} images, {len(index['skipped'])} skipped "
          f"-> {storage.redact(storage.join(args.dst, 'index.json'))}")
    for s in index["skipped"][:20]:
        print(f"  skipped {s['source']}: {s['reason']}")
    return 0


def _cmd_verify(args) -> int:
    try:
        problems = verify(args.dst, workers=args.workers)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {storage.redact(str(e))}", file=sys.stderr)
        return 2
    for p in problems:
        print(p)
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {storage.redact(args.dst)}")
        return 1
    print(f"OK: {storage.redact(args.dst)}")
    return 0


def add_commands(subparsers) -> None:
    """Add the `shards` command group (build, verify) to an argparse subparsers object."""
    p = subparsers.add_parser("shards", help="build / verify WebDataset shards")
    sub = p.add_subparsers(dest="shards_cmd", required=True)
    b = sub.add_parser("build", help="images (folder, .tar or list file) -> DST/shard-*.tar + index.json")
    b.add_argument("src")
    b.add_argument("dst")
    b.add_argument("--samples-per-shard", type=int, default=1000)
    b.add_argument("--bytes-per-shard", default="0", help="e.g. 256MB; 0 = by count only")
    b.add_argument("--writers", type=int, default=4, help="shards written in parallel")
    b.add_argument("--shuffle-seed", type=int, default=0)
    b.add_argument("--no-shuffle", action="store_true", help="keep sorted source order")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=_cmd_build)
    v = sub.add_parser("verify", help="check every shard against index.json (count, sha256, decodable)")
    v.add_argument("dst")
    v.add_argument("--workers", type=int, default=4)
    v.set_defaults(func=_cmd_verify)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.data.shards")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_commands(sub)
    args = parser.parse_args(["shards", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
