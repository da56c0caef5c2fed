"""The curate phase end to end on real CIFAR-10 JPEGs and local Ray (issue 12 "Tests").

Embedders, built by the tests (no downloaded weights):
- retrieval (`embedder`): `smoke_backbone` (tests/conftest.py), the smoke job's DINOv2 pretrain of
  vit_pico/4 at 32 px for 100 steps on CIFAR-10 train; its CLS token.
- copy detection (`copy_embedder`, the planted-copy test): that backbone fine-tuned COPY_STEPS steps with
  SSCD-style InfoNCE on (image, edited copy) pairs of COPY_IMAGES CIFAR-10 *train* images
  (orchestrator/curate/copydesc.finetune, about a minute), used with `role: copy` (patch tokens pooled to
  a 4x4 grid, 54 crop views), PCA-whitening fit on the pool and background score normalisation
  (dedup.whiten, dedup.normalize). The planted copies are of *test* images: none was seen in training.

    flock /tmp/dinoray-heavy.lock .venv/bin/python -m pytest tests/test_curate_phase.py -x -q -s
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CIFAR_TEST_TAR, SHARED
from orchestrator.data import edits
from orchestrator.data.build import build
from orchestrator.storage import Store

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
CLS_THRESHOLD = 0.95      # dedup on the smoke backbone's CLS (pipeline test): raw cosines of a semantic embedder
COPY_STEPS, COPY_IMAGES, COPY_EDITS = 400, 8000, 3  # the copy-detection fine-tune (module doc)
# Copy detection (module doc): margins above the background after whitening, not raw cosines like the paper's
# 0.6 / 0.45 (which belong to SSCD's own descriptor space); measured in docs/curation.md.
THRESHOLD = 0.12
EXCLUDE_THRESHOLD = 0.10  # lower than the self margin, as the paper's 0.45 is below its 0.6
MIN_RECALL = 0.9          # issue 12: self-dedup removes >= 90% of planted copies ...
MAX_FALSE = 0.02          # ... and <= 2% of the images without a copy; relative dedup >= 90% of exclude copies


def _cifar(tar_path, limit=None) -> list[tuple[str, bytes]]:
    """[(class/name.jpg, JPEG bytes)] sorted by name."""
    out = []
    with tarfile.open(tar_path) as tf:
        for m in sorted((m for m in tf.getmembers() if m.name.endswith(".jpg")), key=lambda m: m.name):
            out.append(("/".join(m.name.split("/")[-2:]), tf.extractfile(m).read()))
    return out if limit is None else out[:limit]


def _shards(folder: Path, images: list[tuple[str, bytes]], per_shard: int) -> tuple[str, list[str]]:
    """Shards of `images` (relative path -> bytes) without shuffling: key k is the k-th name in sorted order."""
    src = folder.with_name(folder.name + "-src")
    for rel, data in images:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    build(Store(str(src)), Store(str(folder)), samples_per_shard=per_shard, shuffle_seed=None, quiet=True)
    return str(folder), sorted(rel for rel, _ in images)


@pytest.fixture(scope="module")
def embedder(smoke_backbone, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("embedder") / "backbone.pth"
    torch.save(smoke_backbone, path)
    return str(path)


@pytest.fixture(scope="module")
def copy_embedder(smoke_backbone, tmp_path_factory) -> str:
    """`smoke_backbone` fine-tuned for copy detection (module doc) on CIFAR-10 train images and their edits."""
    from orchestrator.curate import copydesc
    from orchestrator.eval.features import to_tensor
    train = _cifar(SHARED / "data" / "cifar10" / "train.tar")
    rng = np.random.default_rng(0)
    datas = [train[i][1] for i in rng.choice(len(train), COPY_IMAGES, replace=False)]
    images = torch.stack([to_tensor(d, 32) for d in datas])
    copies = torch.stack([torch.stack([to_tensor(edits.random_copy(d, rng), 32) for d in datas])
                          for _ in range(COPY_EDITS)])
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):
        sd = copydesc.finetune(smoke_backbone, images, copies, steps=COPY_STEPS, seed=0, log=lambda *_: None)
    print(f"\ncopy-detection fine-tune: {COPY_STEPS} steps in {time.time() - t0:.0f} s")
    path = tmp_path_factory.mktemp("copy-embedder") / "copy.pth"
    torch.save(sd, path)
    return str(path)


@pytest.fixture(scope="module")
def local_ray():
    import ray
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # logical: Ray Train's controller too
    yield ray
    ray.shutdown()


def _job(tmp: Path, curate: dict, phases=(), **top):
    from orchestrator.pipeline import config
    raw = {"name": "cur", "storage": str(tmp / "runs"), "num_workers": 1, **top,
           "phases": [{"name": "curate", "kind": "curate", "curate": curate}, *phases]}
    return config.job_from_dict(raw)


def _run(job):
    from orchestrator.curate.phase import run_curate
    from orchestrator.layout import RunLayout
    lines = []
    res = run_curate(job, job.phase("curate"), RunLayout.of(job), log=lines.append)
    return res, lines


def _kept_sources(out_url: str) -> set[str]:
    from orchestrator.data.index import read_index
    index, _ = read_index(Store(out_url))
    return {img["source_sample"] for img in index["curation"]["images"].values()}, index


def test_planted_copies(tmp_path, embedder, copy_embedder, local_ray):
    """Self-dedup removes >= 90% of planted copies and <= 2% of the images without one; relative dedup
    removes >= 90% of the copies of exclude-set images (issue 12), with the fine-tuned copy embedder."""
    from orchestrator.data.verify import verify
    test = _cifar(CIFAR_TEST_TAR)
    by_class = {}
    for rel, data in test:
        by_class.setdefault(rel.split("/")[0], []).append((rel, data))
    originals = [item for items in by_class.values() for item in items[:30]]        # 300 images
    excluded = [item for items in by_class.values() for item in items[30:32]]       # 20 evaluation images
    rng = np.random.default_rng(0)
    copied = originals[::10]                                                        # 30 with a copy
    planted = [(f"{rel.split('/')[0]}/copy-{rel.split('/')[1]}", edits.random_copy(data, rng))
               for rel, data in copied]
    ex_copies = [(f"{rel.split('/')[0]}/excl-{rel.split('/')[1]}", edits.random_copy(data, rng))
                 for rel, data in excluded]
    pool, names = _shards(tmp_path / "pool", originals + planted + ex_copies, per_shard=50)
    exclude, _ = _shards(tmp_path / "exclude", excluded, per_shard=50)
    job = _job(tmp_path, {"pool": pool, "exclude": [exclude], "embedder": {"weights": embedder},
                          "copy_embedder": {"weights": copy_embedder, "role": "copy"},
                          "dedup": {"threshold": THRESHOLD, "exclude_threshold": EXCLUDE_THRESHOLD,
                                    "whiten": True, "normalize": True},
                          "samples_per_shard": 64})
    res, lines = _run(job)
    kept, index = _kept_sources(res["metrics"]["shards"])
    name_of = {f"{k:09d}": rel for k, rel in enumerate(names)}
    kept_names = {name_of[k] for k in kept}  # after both stages
    from orchestrator.layout import RunLayout
    stage = RunLayout.of(job).phase("curate").curate_stage("dedup", "npz")  # pool order = sorted names
    self_keep = np.load(io.BytesIO(stage.read_bytes()))["keep"]
    after_self = {rel for rel, keep in zip(names, self_keep) if keep}
    pairs = [(rel, f"{rel.split('/')[0]}/copy-{rel.split('/')[1]}") for rel, _ in copied]
    lonely = [rel for rel, _ in originals if rel not in {a for a, _ in pairs}]
    caught = sum(not (a in after_self and b in after_self) for a, b in pairs)
    lost = sum(rel not in after_self for rel in lonely)
    removed = len(names) - len(after_self)
    ex_caught = sum(rel not in kept_names for rel, _ in ex_copies)
    lost_both = sum(rel not in kept_names for rel in lonely)
    recall, false_rate, ex_recall = caught / len(pairs), lost / len(lonely), ex_caught / len(ex_copies)
    precision = (removed - lost) / max(removed, 1)
    print(f"\nplanted copies: self-dedup (margin {THRESHOLD}) recall {recall:.2f} ({caught}/{len(pairs)}), images "
          f"without a copy removed {false_rate:.3f} ({lost}/{len(lonely)}), precision {precision:.2f} "
          f"({removed - lost}/{removed}); relative dedup (margin {EXCLUDE_THRESHOLD}) recall {ex_recall:.2f} "
          f"({ex_caught}/{len(ex_copies)}); images without a copy removed by both stages {lost_both}/{len(lonely)}; "
          f"counts {index['curation']['counts']}")
    assert verify(Store(res["metrics"]["shards"])) == []
    assert index["curation"]["counts"]["pool"] == len(names) == len(self_keep) == 350
    assert recall >= MIN_RECALL and false_rate <= MAX_FALSE and ex_recall >= MIN_RECALL
    assert lost_both / len(lonely) <= 2 * MAX_FALSE  # the exclude stage adds few false removals of its own
    assert any("stage dedup" in ln for ln in lines) and any("stage write" in ln for ln in lines)


def test_retrieval_sample_and_cluster_modes(tmp_path, embedder, local_ray):
    """Seed sets from two classes of the test split pull those classes from the train pool at >= 2x base rate."""
    from orchestrator.data.loader import MultiCropLoader  # noqa: F401 - the loader reads the output (pipeline test)
    train = _cifar(SHARED / "data" / "cifar10" / "train.tar")
    by_class = {}
    for rel, data in train:
        by_class.setdefault(rel.split("/")[0], []).append((rel, data))
    pool, names = _shards(tmp_path / "pool", [it for items in by_class.values() for it in items[:150]], 250)
    seed_classes = ("airplane", "ship")
    test = [it for it in _cifar(CIFAR_TEST_TAR) if it[0].split("/")[0] in seed_classes]
    seeds, _ = _shards(tmp_path / "seeds", test[:50] + test[-50:], 100)
    job = _job(tmp_path, {"pool": pool, "embedder": {"weights": embedder}, "dedup": {"enabled": False},
                          "retrieve": {"n_clusters": 50, "seeds": [
                              {"name": "by-sample", "url": seeds, "mode": "sample", "k": 4},
                              {"name": "by-cluster", "url": seeds, "mode": "cluster", "per_cluster": 60,
                               "min_seed_hits": 5}]}})  # 30 clusters / 3 hits: 0.38; 50 / 5: 0.52
    res, lines = _run(job)
    _, index = _kept_sources(res["metrics"]["shards"])
    name_of = {f"{k:09d}": rel for k, rel in enumerate(names)}
    base = len(seed_classes) / 10
    for mode in ("by-sample", "by-cluster"):
        got = [name_of[img["source_sample"]].split("/")[0] for img in index["curation"]["images"].values()
               if mode in img["seed_sets"]]
        share = sum(c in seed_classes for c in got) / max(len(got), 1)
        print(f"\nretrieval {mode}: {len(got)} images, {share:.2f} from the seed classes (base rate {base:.2f})")
        assert len(got) >= 20 and share >= 2 * base
    clusters = [img["clusters"] for img in index["curation"]["images"].values() if "by-cluster" in img["seed_sets"]]
    assert all(len(c) == 1 for c in clusters)
    assert index["curation"]["counts"]["final"] == index["total"] == len(index["curation"]["images"])


def _kill_during_embedding(job_file: Path, emb_root: Path, tmp: Path) -> None:
    """Start `dinoray curate JOB` (python -m orchestrator.cli curate JOB) and SIGKILL its process group once a shard is embedded."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "curate", str(job_file)], cwd=REPO,
                            start_new_session=True, stdout=open(tmp / "first.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if list(emb_root.rglob("*.keys.json")):
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert list(emb_root.rglob("*.keys.json")), (tmp / "first.log").read_text()[-3000:]


def test_killed_during_embedding_resumes_by_shard(tmp_path, embedder, local_ray):
    import yaml
    test = _cifar(CIFAR_TEST_TAR)[:400]
    pool, _ = _shards(tmp_path / "pool", test, per_shard=50)  # 8 shards
    raw = {"name": "cur", "storage": str(tmp_path / "runs"), "num_workers": 1,
           "debug": {"step_sleep_s": 1.5},  # one embedded shard per 1.5 s: the kill lands mid-embedding
           "phases": [{"name": "curate", "kind": "curate",
                       "curate": {"pool": pool, "embedder": {"weights": embedder}, "dedup": {"enabled": False},
                                  "actors": [1, 1]}}]}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(raw))
    emb_root = tmp_path / "runs" / "cur" / "curate" / "embeddings"
    _kill_during_embedding(job_file, emb_root, tmp_path)
    first = {p: p.stat().st_mtime_ns for p in emb_root.rglob("*.keys.json")}
    assert 1 <= len(first) < 8
    from orchestrator.pipeline import config
    job = config.job_from_dict({**raw, "debug": {}})
    res, lines = _run(job)
    todo = next(ln for ln in lines if "shards to embed" in ln)
    print(f"\nkilled after {len(first)} of 8 shards; rerun: {todo}")
    assert f"{8 - len(first)} of 8 shards to embed ({len(first)} already done)" in todo
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # finished shards were not redone
    assert res["metrics"]["counts"]["final"] == 400


def test_bad_inputs_are_refused_clearly(tmp_path, embedder):
    from orchestrator.pipeline import config
    pool = str(tmp_path / "pool")
    base = {"pool": pool, "embedder": {"weights": embedder}}
    cases = [({**base, "dedup": {"threshold": 1.5}}, r"curate.dedup.threshold: 1.5 is outside \(0, 1\]"),
             ({**base, "dedup": {"exclude_threshold": 0}}, r"curate.dedup.exclude_threshold: 0.0 is outside"),
             ({**base, "retrieve": {"seeds": [{"url": pool}]}}, r"seeds\[0\].name: every seed set needs its own name"),
             ({**base, "embedder": {"weights": "phase:pretrain"}}, r"'phase:pretrain' names no earlier phase"),
             ({**base, "embedder": {"weights": embedder, "role": "copy"}}, r"embedder.role: the retrieval embedder's"),
             ({**base, "copy_embedder": {"role": "copy"}}, r"copy_embedder.weights: role: copy needs its own weights"),
             ({**base, "copy_embedder": {"weights": embedder, "role": "copy", "crop_scales": [0.7, 1.2]}},
              r"crop_scales in \(0, 1\]")]
    for curate, message in cases:
        with pytest.raises(config.ConfigError, match=message):
            _job(tmp_path, curate)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "index.json").write_text('{"format": "dinoray-shards/1", "total": 0, "shards": []}')
    test = _cifar(CIFAR_TEST_TAR)[:20]
    _shards(tmp_path / "pool", test, per_shard=20)
    job = _job(tmp_path, {**base, "retrieve": {"seeds": [{"name": "none", "url": str(tmp_path / "empty")}]},
                          "embedder": {"weights": embedder, "image_size": 30}})
    with pytest.raises(ValueError, match=r"image_size 30 is not a multiple of its patch size 4; use 32"):
        _run(job)
    job = _job(tmp_path, {**base, "retrieve": {"seeds": [{"name": "none", "url": str(tmp_path / "empty")}]}})
    with pytest.raises(ValueError, match=r"empty: index.json lists no images"):
        _run(job)


def test_curate_phase_feeds_pretrain(tmp_path, embedder, local_ray):
    """One job file: curate (dedup + one seed set) -> pretrain on `data.train: phase:curate`, on Ray."""
    import yaml
    from orchestrator.data.loader import MultiCropLoader
    from orchestrator.pipeline import config, controller
    test = _cifar(CIFAR_TEST_TAR)
    pool, _ = _shards(tmp_path / "pool", test[:600:2], per_shard=100)
    seeds, _ = _shards(tmp_path / "seeds", test[1:100:2], per_shard=50)
    raw = yaml.safe_load((REPO / "jobs" / "smoke_cpu.yaml").read_text())
    raw.update(name="curated", storage=str(tmp_path / "runs"), num_workers=1,
               data={"train": "phase:curate", "num_workers": 0}, debug={"trace_samples": True},
               checkpoint={"every_steps": 2, "keep_last": 1})
    raw["optim"].update(batch_size=16, warmup_iters=0, freeze_last_layer_iters=0, min_lr=1e-5)
    raw["phases"] = [
        {"name": "curate", "kind": "curate",
         "curate": {"pool": pool, "embedder": {"weights": embedder}, "dedup": {"threshold": CLS_THRESHOLD},
                    "retrieve": {"seeds": [{"name": "test-odd", "url": seeds, "k": 4}]}, "samples_per_shard": 40}},
        {"name": "pretrain", "kind": "pretrain", "steps": 3}]
    job = config.job_from_dict(raw, source="curated.yaml")
    curated = job.data.train
    assert curated.endswith("/curated/curate/shards")
    lines = []
    controller.run_pipeline(job, log=lines.append)
    state = json.loads((tmp_path / "runs" / "curated" / "pipeline.json").read_text())
    assert [p["state"] for p in state["phases"]] == ["done", "done"], lines[-20:]
    _, index = _kept_sources(curated)
    keys = set(index["curation"]["images"])
    trace = (tmp_path / "runs" / "curated" / "pretrain" / "trace" / "rank0.jsonl").read_text().splitlines()
    read = [ident.split(":")[0].rsplit("/", 1)[-1] for ln in trace for ident in json.loads(ln)["ids"]]
    print(f"\ncurated {index['curation']['counts']}; pretrain read {len(read)} images, all from the curated set")
    assert len(read) == 3 * 16 and set(read) <= keys
    crops = dataclasses.asdict(config.resolve(job, "pretrain").crops)
    loader = MultiCropLoader(curated, batch_size=8, crops=crops, patch_size=4,
                             mask={"mask_ratio_min_max": (0.1, 0.5), "mask_probability": 0.5})
    assert next(iter(loader))["global_crops"].shape[-1] == 32
