"""MultiCropLoader on real CIFAR-10 shards: layout, splitting, determinism, resume, bad data, S3."""

import dataclasses
import io
import json
import logging
import tarfile
import time

import pytest
import torch
from conftest import CIFAR_TEST_TAR

from orchestrator import storage
from orchestrator.data.build import build
from orchestrator.data.index import read_index
from orchestrator.data.loader import DataBudgetError, MultiCropLoader
from orchestrator.data.samples import iter_samples
from orchestrator.pipeline.schema import CropsCfg, ModelCfg
from orchestrator.storage import Store

CROPS = {**dataclasses.asdict(CropsCfg()), **dict(global_size=28, local_size=14, n_global=2, n_local=2)}
MASK = dict(mask_ratio_min_max=ModelCfg.mask_ratio_min_max, mask_probability=ModelCfg.mask_probability)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core box
    yield
    torch.set_num_threads(n)


def _subset_folder(root, n):
    """Every 40th image of CIFAR-10 test.tar (all 10 classes) until n, as a class-folder tree."""
    with tarfile.open(CIFAR_TEST_TAR) as tf:
        members = [m for m in tf.getmembers() if m.isreg() and m.name.endswith(".jpg")][::40][:n]
        for m in members:
            p = root / m.name.split("/", 1)[1]
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(tf.extractfile(m).read())
    return root


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """230 real images in uneven shards: 6 x 37 + 1 x 8."""
    base = tmp_path_factory.mktemp("ld")
    src = _subset_folder(base / "src", 230)
    dst = base / "shards"
    index = build(Store(str(src)), Store(str(dst)), samples_per_shard=37, quiet=True)
    assert [s["count"] for s in index["shards"]] == [37] * 6 + [8]
    return dst


def _loader(url, **kw):
    args = dict(batch_size=8, rank=0, world_size=1, seed=3, crops=CROPS, patch_size=14, mask=MASK, num_workers=0)
    args.update(kw)
    return MultiCropLoader(str(url), **args)


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_batch_layout_matches_contract(shard_dir):
    L = _loader(shard_dir, crops=dict(CROPS, n_local=3))
    b = next(iter(L))
    assert b["global_crops"].shape == (16, 3, 28, 28) and b["global_crops"].dtype == torch.uint8
    assert b["local_crops"].shape == (24, 3, 14, 14) and b["local_crops"].dtype == torch.uint8
    assert b["masks"].shape == (16, 4) and b["masks"].dtype == torch.bool
    assert b["mask_indices_list"].dtype == torch.int64
    assert torch.equal(b["mask_indices_list"], b["masks"].flatten().nonzero().flatten())
    assert b["n_masked_patches"].tolist() == [b["mask_indices_list"].numel()]
    assert b["masks_weight"].shape == b["mask_indices_list"].shape and b["upperbound"].dtype == torch.int64
    assert b["labels"].shape == (8,) and b["labels"].min() >= 0 and b["labels"].max() < 10
    assert set(b) == {"global_crops", "local_crops", "masks", "mask_indices_list", "masks_weight",
                      "n_masked_patches", "upperbound", "labels"}
    # no local crops: empty tensor with the right trailing shape
    b0 = next(iter(_loader(shard_dir, crops=dict(CROPS, n_local=0))))
    assert b0["local_crops"].shape == (0, 3, 14, 14)


def test_masks_on_a_real_grid(shard_dir):
    b = next(iter(_loader(shard_dir, crops=dict(CROPS, global_size=56), patch_size=7, batch_size=16)))
    assert b["masks"].shape == (32, 64)
    assert 0 < b["n_masked_patches"].item() <= b["upperbound"].item()
    per_img = b["masks"].sum(1)
    assert (per_img > 0).sum() == 16  # mask_probability 0.5 of 32 crops
    torch.testing.assert_close(b["masks_weight"].sum(), torch.tensor(16.0))


def test_two_ranks_two_workers_cover_every_sample_once(shard_dir):
    index, _ = read_index(Store(str(shard_dir)))
    seen, lens = [], []
    for rank in range(2):
        L = _loader(shard_dir, rank=rank, world_size=2, num_workers=2, with_keys=True, batch_size=8)
        got = [b["keys"] for b in L]
        lens.append((len(L), len(got)))
        seen += [k for keys in got for k in keys]
    assert lens == [(14, 14), (14, 14)]  # 230 // 2 = 115 per rank -> 14 batches of 8 each
    assert len(seen) == len(set(seen)) == 2 * 14 * 8
    assert set(seen) <= {f"{i:09d}" for i in range(index["total"])}


@pytest.mark.parametrize("world", [3, 4])
def test_uneven_shards_give_equal_batch_counts(shard_dir, world):
    counts = []
    for rank in range(world):
        L = _loader(shard_dir, rank=rank, world_size=world, batch_size=5, crops=dict(CROPS, n_local=0))
        counts.append((len(L), sum(1 for _ in L)))
    assert len(set(counts)) == 1 and counts[0][0] == counts[0][1] == (230 // world) // 5


def test_order_is_deterministic_from_seed_and_epoch(shard_dir):
    a = [b["keys"] for b in _loader(shard_dir, with_keys=True)]
    L = _loader(shard_dir, with_keys=True)
    b1 = [b["keys"] for b in L]
    b2 = [b["keys"] for b in L]  # second epoch
    c = [b["keys"] for b in _loader(shard_dir, with_keys=True, seed=4)]
    assert a == b1 and a != b2 and a != c
    assert L.state_dict()["epoch"] == 2


@pytest.mark.parametrize("num_workers,stop", [(0, 5), (2, 3)])
def test_resume_yields_exactly_the_uninterrupted_batches(shard_dir, num_workers, stop):
    full = list(_loader(shard_dir, num_workers=num_workers))
    L = _loader(shard_dir, num_workers=num_workers)
    it = iter(L)
    head = [next(it) for _ in range(stop)]
    state = json.loads(json.dumps(L.state_dict()))  # survives a checkpoint round trip
    assert state["epoch"] == 0 and state["batch"] == stop
    rest = list(_loader(shard_dir, num_workers=num_workers, state=state))
    assert len(head) + len(rest) == len(full) == len(L)
    assert all(_same(x, y) for x, y in zip(head + rest, full))
    # resuming at an epoch boundary starts the next epoch
    L2 = _loader(shard_dir, num_workers=num_workers)
    list(L2)
    nxt = next(iter(_loader(shard_dir, num_workers=num_workers, state=L2.state_dict())))
    L3 = _loader(shard_dir, num_workers=num_workers)
    list(L3)
    assert _same(nxt, next(iter(L3)))


def test_state_of_the_previous_version_resumes_exactly(shard_dir):
    full = list(_loader(shard_dir))
    L = _loader(shard_dir)
    it = iter(L)
    head = [next(it) for _ in range(4)]
    state = {k: v for k, v in L.state_dict().items() if k not in ("layouts", "global_batch")}
    rest = list(_loader(shard_dir, state=dict(state, version=1)))  # as written before layouts existed
    assert len(head) + len(rest) == len(full) and all(_same(x, y) for x, y in zip(head + rest, full))


def test_changed_world_size_on_resume_starts_next_epoch(shard_dir):
    L = _loader(shard_dir, world_size=2)
    next(iter(L))
    with pytest.warns(UserWarning, match="starting epoch 1"):
        L2 = _loader(shard_dir, world_size=3, state=L.state_dict())
    assert L2.state_dict()["epoch"] == 1 and L2.state_dict()["batch"] == 0


@pytest.mark.parametrize("layouts", [[(2, 2, 5), (1, 0, None)], [(1, 0, 5), (2, 2, None)],
                                     [(2, 1, 4), (1, 0, 3), (2, 0, None)]])
def test_resume_at_another_world_size_reshards_the_epoch(shard_dir, layouts):
    """Global batch fixed at 16 (per-rank batch 16 / world): each (world, workers, steps) runs `steps` steps
    on every rank from the previous rank 0's state; over the epoch no image is used twice or skipped."""
    G = 16

    def ranks(world, workers, state):
        return [_loader(shard_dir, rank=r, world_size=world, batch_size=G // world, num_workers=workers,
                        with_keys=True, state=state, crops=dict(CROPS, n_local=0)) for r in range(world)]

    world0, workers0, _ = layouts[0]
    planned = {k for L in ranks(world0, workers0, None) for b in L for k in b["keys"]}  # uninterrupted epoch
    used, state, steps_done = [], None, 0
    for world, workers, steps in layouts:
        loaders = ranks(world, workers, state)
        assert all(len(L) == 230 // G for L in loaders)  # steps per epoch do not depend on the world size
        its = [iter(L) for L in loaders]
        steps = len(loaders[0]) - steps_done if steps is None else steps
        for _ in range(steps):
            step = [k for it in its for k in next(it)["keys"]]
            assert len(step) == G
            used += step
        steps_done += steps
        state = json.loads(json.dumps(loaders[0].state_dict()))  # a checkpoint round trip
        del its
    assert steps_done == 230 // G
    assert len(used) == len(set(used)) == steps_done * G and set(used) == planned
    nxt = ranks(layouts[-1][0], layouts[-1][1], state)[0]  # then the next epoch at the new size
    assert nxt.state_dict()["epoch"] == 1 and nxt.state_dict()["layouts"] == [[0, layouts[-1][0], max(1, layouts[-1][1])]]


def _corrupt_shard(shard_dir, dst, n_bad):
    """Copy of the shards where the first n_bad samples of shard 0 hold truncated JPEGs."""
    import shutil

    shutil.copytree(shard_dir, dst)
    p = dst / "shard-000000.tar"
    with open(p, "rb") as f:
        samples = list(iter_samples(f))
    with tarfile.open(p, "w") as tf:
        for i, (key, sample) in enumerate(samples):
            for ext, data in sample.items():
                if ext == "jpg" and i < n_bad:
                    data = data[: len(data) // 3]
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return dst


def test_corrupt_jpeg_is_skipped_and_counted(shard_dir, tmp_path):
    bad = _corrupt_shard(shard_dir, tmp_path / "bad", 1)
    L = _loader(bad, error_budget=0.05)
    batches = list(L)
    assert L.skipped == 1 and len(batches) == len(L)
    assert all(b["global_crops"].shape == (16, 3, 28, 28) for b in batches)
    assert L.state_dict()["skipped"] == 1


def test_error_budget_exceeded_is_a_clear_error(shard_dir, tmp_path):
    bad = _corrupt_shard(shard_dir, tmp_path / "bad", 30)
    with pytest.raises(DataBudgetError, match=r"over the error budget of 1\.00%.*dinoray shards verify"):
        list(_loader(bad))


def test_transient_errors_are_retried(shard_dir, monkeypatch):
    real, calls = Store.open, {"n": 0}

    def flaky(store, *a, **kw):  # error path only: the first two opens fail like a dropped connection
        calls["n"] += 1
        if calls["n"] <= 2:
            raise ConnectionResetError("connection reset by peer")
        return real(store, *a, **kw)

    expected = list(_loader(shard_dir))
    monkeypatch.setattr(Store, "open", flaky)
    got = list(_loader(f"file://{shard_dir}", backoff=0.01))
    assert calls["n"] > 2 and all(_same(x, y) for x, y in zip(got, expected))


def test_missing_shard_fails_clearly(shard_dir, tmp_path):
    import shutil

    d = tmp_path / "missing"
    shutil.copytree(shard_dir, d)
    (d / "shard-000003.tar").unlink()
    with pytest.raises(OSError, match="shard-000003.tar.*dinoray shards verify"):
        list(_loader(f"file://{d}"))


def test_unreachable_bucket_is_a_clear_error_not_a_hang(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "loaderSecret77")
    t0 = time.monotonic()
    with pytest.raises(OSError) as ei:
        _loader("s3://unreachable-bucket/shards", storage_options={"skip_instance_cache": True})
    assert time.monotonic() - t0 < 60 and "unreachable-bucket" in str(ei.value)
    assert "loaderSecret77" not in str(ei.value)


@pytest.mark.s3
def test_s3_loader_matches_local_and_hides_credentials(s3_server, shard_dir, caplog):
    caplog.set_level(logging.INFO)
    url = f"s3://{s3_server['bucket']}/loader-test"
    fs, path = storage.fs_for(url)
    fs.put(str(shard_dir) + "/", path, recursive=True)
    local = list(_loader(shard_dir, num_workers=2))
    remote = list(_loader(url + "/index.json", num_workers=2))
    assert len(remote) == len(local) and all(_same(x, y) for x, y in zip(remote, local))
    assert s3_server["secret"] not in caplog.text and s3_server["key"] not in caplog.text
