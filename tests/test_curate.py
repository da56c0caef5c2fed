"""Curation building blocks (orchestrator/curate): k-NN graph, components, IVF-PQ, retrieval, balancing,
bad inputs. Fast, no Ray; synthetic vectors where the property is about the algorithm, not the embedder.
The end-to-end tests on CIFAR-10 images and Ray are in tests/test_curate_phase.py."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import model as dmodel
from orchestrator.curate import balance, dedup, graph, retrieve
from orchestrator.curate.embed import check_embedder, shard_list
from orchestrator.storage import Store

FLAT = types.SimpleNamespace(index="flat", flat_max=0, nlist=0, pq_m=0, nprobe=0)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clusters(n_per, n_clusters, dim=32, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    labels = np.repeat(np.arange(n_clusters), n_per)
    return _unit(centres[labels] + spread * rng.normal(size=(len(labels), dim))), labels


def test_components_are_transitive_and_keep_the_smallest_index():
    sims = np.array([[0.9, 0.1], [0.7, 0.1], [0.8, 0.1], [0.9, 0.9], [0.1, 0.1]])
    ids = np.array([[3, 0], [2, 0], [3, 1], [2, 0], [-1, -1]])  # 0-3, 1-2, 2-3 (>0.6): one component
    rows, cols = np.nonzero((sims > 0.6) & (ids >= 0))
    comp = graph.components(5, rows, ids[rows, cols])
    assert comp.tolist() == [0, 0, 0, 0, 4]
    assert graph.components(5, ids[rows, cols][::-1], rows[::-1]).tolist() == [0, 0, 0, 0, 4]  # order-free
    assert graph.components(5, np.zeros(0, int), np.zeros(0, int)).tolist() == [0, 1, 2, 3, 4]


def test_self_dedup_removes_exact_and_near_copies():
    x, _ = _clusters(1, 200, dim=128, spread=0.0)  # random pairs: cosine ~ N(0, 0.09), far below 0.45
    rng = np.random.default_rng(1)
    copies = _unit(x[:50] + 0.02 * rng.normal(size=(50, x.shape[1])))
    pool = np.concatenate([x, copies])
    cfg = types.SimpleNamespace(k=8, threshold=0.9, exclude_threshold=0.45, whiten=False, normalize=False)
    res = dedup.self_dedup(pool, np.ones(len(pool), bool), cfg, FLAT)
    assert res["duplicates"] == 50 and res["keep"][:200].all() and not res["keep"][200:].any()
    exclude = _unit(x[100:110] + 0.02 * rng.normal(size=(10, x.shape[1])))
    rel = dedup.relative_dedup(pool, res["component"], res["keep"], exclude, cfg, FLAT)
    assert rel["dropped_components"] == 10 and not rel["keep"][100:110].any() and rel["keep"].sum() == 190


def test_multiview_dedup_matches_crop_views_with_background_margins():
    """role: copy rows (full view + crop views): a copy whose full view matches one crop view of its original
    is found; with dedup.normalize the threshold is a margin above each image's background neighbours."""
    from orchestrator.curate import copydesc
    rng = np.random.default_rng(3)
    n, views, dim = 300, 5, 32
    emb = _unit(rng.normal(size=(n * views, dim))).reshape(n, views, dim)  # background cosines ~ N(0, 0.18)
    for copy, orig in ((299, 0), (298, 1)):
        emb[copy, 0] = _unit(emb[orig, 3:4] + 0.05 * rng.normal(size=(1, dim)))[0]
    cfg = types.SimpleNamespace(k=16, threshold=0.35, exclude_threshold=0.35, whiten=False, normalize=True)
    res = dedup.self_dedup(emb.reshape(n, -1), np.ones(n, bool), cfg, FLAT, views=views)
    assert res["duplicates"] == 2 and res["component"][299] == 0 and res["component"][298] == 1
    raw = dedup.self_dedup(emb.reshape(n, -1), np.ones(n, bool), types.SimpleNamespace(**{**vars(cfg), "normalize": False,
                           "threshold": 0.9}), FLAT, views=views)
    assert raw["duplicates"] == 2  # the copies' raw cosine ~0.96; the background's best ~0.6
    exclude = _unit(rng.normal(size=(2 * views, dim))).reshape(2, views, dim)
    exclude[0, 0] = _unit(emb[7, 2:3] + 0.05 * rng.normal(size=(1, dim)))[0]  # its full view: a crop of pool image 7
    exclude[1, 4] = _unit(emb[5, 0:1] + 0.05 * rng.normal(size=(1, dim)))[0]  # one of its crops: pool image 5
    rel = dedup.relative_dedup(emb.reshape(n, -1), res["component"], res["keep"], exclude.reshape(2, -1), cfg,
                               FLAT, views=views)
    assert set(np.nonzero(~rel["keep"] & res["keep"])[0]) == {5, 7}  # both directions of the search
    w = copydesc.whiten_fit(emb.reshape(-1, dim))
    assert np.allclose(np.linalg.norm(copydesc.whiten(emb[:, 0], w), axis=1), 1, atol=1e-5)
    assert len(copydesc.crop_boxes(32, [0.65, 0.75, 0.85], 3)) == 27


def test_ivfpq_recall_against_exact():
    x, _ = _clusters(40, 500, dim=32)  # 20,000 vectors in tight clusters: a hard case for PQ ranking
    copies = _unit(x[:200] + 0.01 * np.random.default_rng(2).normal(size=(200, 32)))
    pool = np.concatenate([x, copies])
    search = types.SimpleNamespace(index="ivfpq", flat_max=0, nlist=0, pq_m=0, nprobe=0)
    assert graph.ivfpq_params(len(pool), 32, search) == {"nlist": 517, "pq_m": 8, "nprobe": 32}  # n // 39 caps
    index, desc = graph.make_index(pool, search)
    assert desc["index"] == "ivfpq"
    flat, _ = graph.make_index(pool, FLAT)
    q = pool[::100]
    _, approx = graph.knn(index, q, 10)
    _, exact = graph.knn(flat, q, 10)
    recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(approx, exact)])
    _, ids = graph.knn(index, copies, 2)
    found = np.mean([i in row for i, row in enumerate(ids)])
    print(f"IVF-PQ on 20,200 synthetic vectors: recall@10 {recall:.3f}, near copies found {found:.3f}")
    assert recall >= 0.5 and found >= 0.9


def test_retrieval_modes_on_synthetic_clusters():
    x, labels = _clusters(50, 10)
    seeds = {"s": x[labels == 3][:5], "c": x[labels == 7][:6]}
    cfg = types.SimpleNamespace(seeds=[types.SimpleNamespace(name="s", mode="sample", k=4),
                                       types.SimpleNamespace(name="c", mode="cluster", per_cluster=20,
                                                             min_seed_hits=3)],
                                n_clusters=10, kmeans_iters=20, search=FLAT)
    reasons, stats = retrieve.retrieve(x, np.arange(len(x)), seeds, cfg, seed=0, log=lambda *_: None)
    by_set = {name: [i for i, why in reasons.items() if name in why["seed_sets"]] for name in seeds}
    assert len(by_set["s"]) <= 20 and all(labels[i] == 3 for i in by_set["s"])
    assert len(by_set["c"]) == 20 and all(labels[i] == 7 for i in by_set["c"])
    assert stats["per_set"]["c"]["clusters"] == 1
    assert all(len(reasons[i]["clusters"]) == 1 for i in by_set["c"])


def test_balance_spreads_the_target_over_clusters():
    head, _ = _clusters(900, 1, dim=16, spread=0.05)
    tail, tail_labels = _clusters(10, 10, dim=16, spread=0.05, seed=1)
    x = np.concatenate([head, tail])
    cfg = types.SimpleNamespace(target=100, levels=[40, 11], resample_steps=2)
    chosen = balance.balance(x, cfg, iters=20, seed=0)
    assert len(chosen) == 100 and len(np.unique(chosen)) == 100
    from_head = int((chosen < 900).sum())
    print(f"balanced 100 of 900 head + 100 tail images: {from_head} from the head (uniform sampling: ~90)")
    assert from_head <= 60 and len(np.unique(tail_labels[chosen[chosen >= 900] - 900])) == 10


def test_embedder_size_must_be_a_multiple_of_the_patch(tmp_path):
    net = dmodel.build_backbone("vit_pico", img_size=32, patch_size=4, layerscale_init=None)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    assert check_embedder(Store(str(tmp_path / "w.pth")), 0) == 32
    with pytest.raises(ValueError, match=r"w.pth: image_size 30 is not a multiple of its patch size 4; use 32"):
        check_embedder(Store(str(tmp_path / "w.pth")), 30)


def test_empty_shard_set_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "index.json").write_text('{"format": "dinoray-shards/1", "total": 0, "shards": []}')
    with pytest.raises(ValueError, match="empty: index.json lists no images"):
        shard_list(Store(str(tmp_path / "empty")))
    with pytest.raises(FileNotFoundError, match="missing/index.json not found"):
        shard_list(Store(str(tmp_path / "missing")))
