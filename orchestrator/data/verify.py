"""Check shards against their index.json: `dinoray shards verify`.

    dinoray shards verify DST [--workers 4]

Every shard listed in DST/index.json must exist, have the listed size, sha256 and sample count, and
every sample must hold a decodable image and a class index < the number of classes. Prints one line
per problem and exits 1 when there is any (0 when the shards are sound, 2 when the index is missing
or unreadable).
"""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor

from orchestrator import storage
from orchestrator.data.index import read_index
from orchestrator.data.samples import IMAGE_EXTS, check_image, iter_samples
from orchestrator.storage import Store


class _Hashing(io.RawIOBase):
    """A raw reader that feeds every byte it reads from `f` into `digest`."""

    def __init__(self, f, digest):
        self.f, self.digest = f, digest

    def readable(self):
        return True

    def readinto(self, b):
        data = self.f.read(len(b))
        self.digest.update(data)
        b[:len(data)] = data
        return len(data)


def _sample_problems(name: str, key: str, sample: dict, n_classes: int) -> list[str]:
    problems = []
    images = [e for e in sample if e in IMAGE_EXTS]
    if not images:
        problems.append(f"{name}: sample {key} has no image")
    for ext in images:
        reason = check_image(sample[ext])
        if reason:
            problems.append(f"{name}: sample {key}.{ext}: {reason}")
    if "cls" in sample:
        try:
            c = int(sample["cls"])
            assert 0 <= c < max(n_classes, 1)
        except (ValueError, AssertionError):
            problems.append(f"{name}: sample {key}.cls={sample['cls'][:20]!r} not a class index < {n_classes}")
    return problems


def verify_shard(folder: Store, info: dict, n_classes: int) -> list[str]:
    """Problems of one shard described by `info` (an index.json entry); [] when it matches and decodes."""
    name, problems = info["name"], []
    shard = folder / name
    try:
        size = shard.size()
    except FileNotFoundError:
        return [f"{name}: missing (rerun `dinoray shards build` with the same SRC and DST to write it)"]
    if size != info["bytes"]:
        problems.append(f"{name}: {size} bytes, index says {info['bytes']} (truncated or replaced)")
    digest, count = hashlib.sha256(), 0
    try:
        with shard.open("rb") as f:
            for key, sample in iter_samples(io.BufferedReader(_Hashing(f, digest), 1 << 20)):
                count += 1
                problems += _sample_problems(name, key, sample, n_classes)
            while f.read(1 << 20):  # the tar's end blocks count for the hash too
                pass
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{name}: unreadable tar after {count} samples: {type(e).__name__}: {storage.redact(str(e))}")
    if digest.hexdigest() != info["sha256"]:
        problems.append(f"{name}: sha256 {digest.hexdigest()[:12]}... != index {info['sha256'][:12]}... (corrupted)")
    if count != info["count"]:
        problems.append(f"{name}: {count} samples, index says {info['count']}")
    return problems


def verify(dst: Store, *, workers: int = 4) -> list[str]:
    """Return a list of problems (empty when every shard matches the index and decodes)."""
    index, folder = read_index(dst)
    n_classes = len(index.get("classes", []))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        results = list(ex.map(lambda s: verify_shard(folder, s, n_classes), index["shards"]))
    problems = [p for r in results for p in r]
    total = sum(s["count"] for s in index["shards"])
    if total != index.get("total"):
        problems.append(f"index.json: total {index.get('total')} != sum of shard counts {total}")
    return problems


def cmd_verify(args) -> int:
    """`dinoray shards verify`: args.dst, workers. Exit 0 when sound, 1 with problems, 2 on bad input."""
    try:
        problems = verify(Store(args.dst), workers=args.workers)
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
