"""Curation benchmarks: embedding throughput, the IVF-PQ k-NN graph against exact search, what curation buys.

    .venv/bin/python bench/curate.py [--images 10000] [--vectors 1000000] [--dim 64] [--queries 10000]
                                     [--skip-embed] [--skip-graph] [--json]
    nice -n 19 .venv/bin/python bench/curate.py --what-it-buys [--subset 5000] [--steps 300]
                                     [--embed-steps 180] [--seed-classes airplane,...] [--mode sample]

1. Embedding throughput, images/s per core, on CPU: `orchestrator.curate.embed.embed_set` (Ray Data:
   shard read + decode tasks, an actor pool of 1 embedding actor, per-shard fp16 files) against a plain
   single-process torch loop over the same shards (read, decode, resize, forward, no files), side by
   side. Images: the first N CIFAR-10 test JPEGs (../shared/data/cifar10/test.tar) as shards of 500;
   model: a randomly initialised vit_pico/4 at 32 px (throughput does not depend on the weights).
   Per core = images/s divided by the cores the run used (Ray: the CPUs Ray was given; the loop: 1,
   torch threads = 1).
2. k-NN graph on SYNTHETIC vectors (not real embeddings): N unit vectors of DIM dimensions drawn from
   a mixture of 1000 spherical Gaussian clusters (so neighbours are meaningful). The IVF-PQ index
   (parameters from the pool size as in the curate phase, `ivfpq_params`) is built and queried with k =
   64 for a sample of queries; recall@k is measured against exact (Flat) search of the same queries,
   and the full graph time (all N queries) is extrapolated from the sample's time (say so: "est.").
3. What curation buys (`--what-it-buys`, runs only this section). Cost: ~4 min of shard building, decoding
   and embedding, plus the pretrain steps (--embed-steps + 2 x --steps) at ~0.2 s (quiet) to ~3 s (2 cores
   shared with other jobs) each; docs/curation.md's numbers: --embed-steps 40 --steps 80 under load.
   jobs/smoke_cpu.yaml's pretrain recipe (vit_pico/4, 32 px, batch 128), run in this process as the
   `smoke_backbone` fixture does, for --steps steps on each of two --subset-image subsets of the CIFAR-10
   train pool: one retrieved around a seed set by orchestrator/curate/retrieve.py (`mode: sample`, the
   smallest k of 1, 2, 4, ... whose union reaches the size, then a seeded random --subset of it; or
   `--mode cluster`), one uniformly random; both written by orchestrator/curate/write.py. Seeds: the first
   half (name order) of the CIFAR-10 test images of --seed-classes; retrieval embedder: the same recipe
   for --embed-steps steps on the full 50,000-image pool (its L2-normalised CLS, as the curate phase's
   retrieval embedder). k-NN (orchestrator/eval/knn.py, k = 10 / 20, T = 0.07) on the other test half,
   with two memory banks: the 25,000 train images of the seed classes, and the chosen subset itself.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
CIFAR_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "test.tar"


def _shards(tmp: str, n: int) -> str:
    from orchestrator.data.build import build
    from orchestrator.storage import Store
    src = os.path.join(tmp, "src")
    with tarfile.open(CIFAR_TEST) as tf:
        members = sorted((m for m in tf.getmembers() if m.name.endswith(".jpg")), key=lambda m: m.name)[:n]
        tf.extractall(src, members=members, filter="data")
    build(Store(src), Store(os.path.join(tmp, "shards")), samples_per_shard=500, shuffle_seed=None, quiet=True)
    return os.path.join(tmp, "shards")


def _plain_loop(shards: str, weights: str, size: int, batch: int) -> float:
    """images/s of one process: read shards, decode, resize, forward."""
    import torch
    from orchestrator.data import samples
    from orchestrator.eval import features
    from orchestrator.storage import Store
    torch.set_num_threads(1)
    embed = features.make_embedder(Store(weights), "cls")
    t0, n, buf = time.perf_counter(), 0, []
    for url, count in features.shard_plan(shards):
        for sample in samples.read_shard(Store(url), 0, count):
            buf.append(features.to_tensor(samples.sample_image(sample)[1], size))
            if len(buf) == batch:
                embed(torch.stack(buf))
                n, buf = n + len(buf), []
    if buf:
        embed(torch.stack(buf))
        n += len(buf)
    return n / (time.perf_counter() - t0)


def bench_embed(n_images: int, batch: int = 256) -> dict:
    import ray
    import torch
    import model as dmodel
    from orchestrator.curate import embed
    from orchestrator.storage import Store
    with tempfile.TemporaryDirectory(prefix="bench-curate-") as tmp:
        shards = _shards(tmp, n_images)
        weights = os.path.join(tmp, "w.pth")
        torch.manual_seed(0)
        torch.save(dmodel.build_backbone("vit_pico", img_size=32, patch_size=4, layerscale_init=None).state_dict(),
                   weights)
        plain = _plain_loop(shards, weights, 32, batch)
        cpus = 2
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        try:
            res = embed.embed_set(Store(shards), Store(os.path.join(tmp, "emb")), Store(weights), 32,
                                  batch_size=batch, concurrency=(1, 1), log=lambda *_: None)
        finally:
            ray.shutdown()
        ray_rate = round(res["images"] / res["seconds"], 1)  # actor start-up included
    return {"images": n_images, "plain_img_s": round(plain, 1), "plain_per_core": round(plain, 1),
            "ray_img_s": ray_rate, "ray_cpus": cpus, "ray_per_core": round(ray_rate / cpus, 1),
            "ray_seconds_incl_startup": res["seconds"]}


def _synthetic(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    x = centres[rng.integers(0, 1000, n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_graph(n: int, dim: int, n_queries: int, k: int = 64) -> dict:
    import faiss
    from orchestrator.curate import graph
    x = _synthetic(n, dim)
    queries = x[np.random.default_rng(1).choice(n, n_queries, replace=False)]
    t0 = time.perf_counter()
    flat, _ = graph.make_index(x, types.SimpleNamespace(index="flat"))
    _, exact = graph.knn(flat, queries, k)
    exact_s = time.perf_counter() - t0
    out = {"vectors": n, "dim": dim, "queries": n_queries, "k": k, "threads": faiss.omp_get_max_threads(),
           "exact_sample_s": round(exact_s, 2), "exact_graph_s_est": round(exact_s * n / n_queries, 1), "ivfpq": []}
    search = types.SimpleNamespace(index="ivfpq", flat_max=0, nlist=0, pq_m=0, nprobe=0)
    t0 = time.perf_counter()
    index, desc = graph.make_index(x, search)
    build_s = time.perf_counter() - t0
    for nprobe in sorted({8, 32, desc["nprobe"]}):
        index.nprobe = nprobe
        t0 = time.perf_counter()
        _, ids = graph.knn(index, queries, k)
        sample_s = time.perf_counter() - t0
        recall = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ids, exact)])
        out["ivfpq"].append({**desc, "nprobe": nprobe, "build_s": round(build_s, 1), "sample_s": round(sample_s, 2),
                             "graph_s_est": round(sample_s * n / n_queries + build_s, 1),
                             f"recall@{k}": round(float(recall), 3)})
    return out


# --------------------------------------------------------------------------- what curation buys
def _decode_pool(url: str) -> dict:
    """Every image of a labelled shard folder, decoded once: {"x": uint8 [N, 3, 32, 32], "label", "shard",
    "pos", "key"} in index order (the pool record the curate writer needs)."""
    import torch
    from orchestrator.data import index as shard_index
    from orchestrator.data import samples
    from orchestrator.eval.features import to_tensor
    from orchestrator.storage import Store
    index, folder = shard_index.read_index(Store(url))
    out = {"x": [], "label": [], "shard": [], "pos": [], "key": []}
    for info in index["shards"]:
        for pos, sample in enumerate(samples.read_shard(folder / info["name"], 0, int(info["count"]))):
            out["x"].append(to_tensor(samples.sample_image(sample)[1], 32))
            out["label"].append(int(sample["cls"]))
            out["shard"].append(info["name"])
            out["pos"].append(pos)
            out["key"].append(sample["__key__"])
    return {**out, "x": torch.stack(out["x"]), "label": np.array(out["label"]), "classes": index["classes"]}


def _test_halves(classes: list[str], seed_classes: list[str]):
    """(seed images, eval images, eval labels): per seed class, the first / second half of its CIFAR-10
    test images in name order."""
    import torch
    from orchestrator.eval.features import to_tensor
    by_class: dict[str, list] = {}
    with tarfile.open(CIFAR_TEST) as tf:
        for m in sorted((m for m in tf.getmembers() if m.name.endswith(".jpg")), key=lambda m: m.name):
            cls = m.name.split("/")[-2]
            if cls in seed_classes:
                by_class.setdefault(cls, []).append(to_tensor(tf.extractfile(m).read(), 32))
    seeds, test, labels = [], [], []
    for cls, imgs in by_class.items():
        half = len(imgs) // 2
        seeds += imgs[:half]
        test += imgs[half:]
        labels += [classes.index(cls)] * (len(imgs) - half)
    return torch.stack(seeds), torch.stack(test), np.array(labels)


def _features(sd: dict, x) -> "torch.Tensor":
    """L2-normalised CLS features (the curate retrieval embedder's and the k-NN eval's) of uint8 images."""
    import torch
    from orchestrator.eval.features import make_embedder
    embed = make_embedder(sd, "cls")
    return torch.cat([embed(x[i:i + 512]) for i in range(0, len(x), 512)])


def _pretrain(train_url: str, steps: int, tmp: str) -> dict:
    """jobs/smoke_cpu.yaml's pretrain recipe for `steps` steps on `train_url`, in this process (no Ray), as the
    `smoke_backbone` fixture (tests/conftest.py) runs it -> the teacher backbone's state dict."""
    from orchestrator.pipeline import config
    from orchestrator.training.setup import train_in_process
    job = config.load_job(str(Path(__file__).resolve().parents[1] / "jobs" / "smoke_cpu.yaml"), [
        f"storage={tempfile.mkdtemp(dir=tmp)}", f"data.train={train_url}", f"data.eval_train={train_url}",
        f"data.eval_test={train_url}", f"phases.pretrain.steps={steps}"])
    meta = train_in_process(job, config.resolve(job, "pretrain"), steps)
    return {k: v.detach().clone().float() for k, v in meta.teacher["backbone"].state_dict().items()}


def _retrieve(pool_emb: np.ndarray, seed_emb: np.ndarray, size: int, mode: str, clusters: int) -> tuple:
    """`size` pool positions retrieved around the seeds by orchestrator/curate/retrieve.py -> (positions,
    setting). sample: the smallest k of 1, 2, 4, ... whose union reaches `size`; cluster: `clusters` k-means
    clusters, those with >= 3 seed images. A seeded random `size` of the retrieved set is kept."""
    from orchestrator.curate import retrieve
    from orchestrator.pipeline.schema import CurateSearchCfg, CurateSeedSetCfg
    cands = np.arange(len(pool_emb))
    for k in ([1, 2, 4, 8, 16, 32, 64] if mode == "sample" else [0]):
        spec = CurateSeedSetCfg(name="seed", mode=mode, k=k or 4, min_seed_hits=3)
        cfg = types.SimpleNamespace(seeds=[spec], search=CurateSearchCfg(), n_clusters=clusters, kmeans_iters=20)
        reasons, stats = retrieve.retrieve(pool_emb, cands, {"seed": seed_emb}, cfg, seed=0, log=lambda *_: None)
        if len(reasons) >= size:
            break
    if len(reasons) < size:
        raise SystemExit(f"retrieval ({mode}) found only {len(reasons)} images, fewer than --subset {size}")
    got = np.array(sorted(reasons))
    setting = f"k={k}" if mode == "sample" else f"{clusters} clusters, {stats['per_set']['seed']['clusters']} used"
    return np.sort(np.random.default_rng(0).choice(got, size, replace=False)), f"{setting}, {len(got)} retrieved"


def _write_subset(train_url: str, pool: dict, chosen: np.ndarray, out: str, why: str) -> str:
    """The chosen pool images as shards by the curate writer (orchestrator/curate/write.py)."""
    from orchestrator.curate import write
    from orchestrator.data import index as shard_index
    from orchestrator.eval.features import local_map
    from orchestrator.storage import Store
    _, folder = shard_index.read_index(Store(train_url))
    items = [{"key": f"{j:09d}", "shard": pool["shard"][i], "pos": pool["pos"][i], "source_key": pool["key"][i],
              "why": {"seed_sets": [why]}} for j, i in enumerate(chosen.tolist())]
    write.write_selection(folder, Store(out), items, classes=pool["classes"], samples_per_shard=1000,
                          curation={"bench": why}, map_fn=local_map, log=lambda *_: None)
    return out


def _knn_rows(sd: dict, pool: dict, bank5: np.ndarray, chosen: np.ndarray, test_x, test_l: np.ndarray) -> dict:
    """k-NN top-1 (k = 10, 20) on the held-out test half: memory bank the 5-class train images, and the subset."""
    import torch
    from orchestrator.eval.knn import knn_accuracy
    need = bank5 if chosen is None else np.union1d(bank5, chosen)  # embed only the images a bank holds
    feats, test = _features(sd, pool["x"][need]), (_features(sd, test_x), torch.from_numpy(test_l))
    labels = torch.from_numpy(pool["label"][need])
    out = {}
    for bank, rows in (("bank_5class", bank5), ("bank_subset", chosen)):
        if rows is not None:
            idx = torch.from_numpy(np.searchsorted(need, rows))
            out[bank] = {str(k): round(v, 4) for k, v in knn_accuracy(feats[idx], labels[idx], *test).items()}
    return out


def bench_buys(subset: int, steps: int, embed_steps: int, seed_classes: list[str], mode: str, clusters: int,
               log=print) -> dict:
    """Pretrain on a curated and a random subset of CIFAR-10 train (equal size, equal steps); k-NN of each."""
    from orchestrator.demo import build_cifar_shards
    t0, times = time.perf_counter(), {}

    def lap(name):
        times[name] = round(time.perf_counter() - t0 - sum(times.values()), 1)
        log(f"[buys] {name}: {times[name]} s")
    with tempfile.TemporaryDirectory(prefix="bench-buys-") as tmp:
        urls = build_cifar_shards(Path(tmp), log=lambda *_: None)
        pool = _decode_pool(urls["train"])
        seeds, test_x, test_l = _test_halves(pool["classes"], seed_classes)
        bank5 = np.nonzero(np.isin(pool["label"], [pool["classes"].index(c) for c in seed_classes]))[0]
        lap("shards + decode")
        embedder = _pretrain(urls["train"], embed_steps, tmp)
        lap(f"embedder pretrain ({embed_steps} steps, full pool)")
        curated, setting = _retrieve(_features(embedder, pool["x"]).numpy(), _features(embedder, seeds).numpy(),
                                     subset, mode, clusters)
        res = {"subset": subset, "steps": steps, "embed_steps": embed_steps, "seed_classes": seed_classes,
               "mode": mode, "retrieval": setting, "n_seeds": len(seeds), "n_test": len(test_l),
               "n_bank_5class": len(bank5), "embedder": _knn_rows(embedder, pool, bank5, None, test_x, test_l)}
        lap("embed + retrieve + embedder k-NN")
        chosen_random = np.sort(np.random.default_rng(1).choice(len(pool["label"]), subset, replace=False))
        for name, chosen in (("curated", curated), ("random", chosen_random)):
            url = _write_subset(urls["train"], pool, chosen, os.path.join(tmp, name), name)
            sd = _pretrain(url, steps, tmp)
            res[name] = {"seed_class_share": round(float(np.isin(chosen, bank5).mean()), 3),
                         **_knn_rows(sd, pool, bank5, chosen, test_x, test_l)}
            lap(f"{name}: write + pretrain ({steps} steps) + k-NN")
    return {**res, "seconds": times, "total_s": round(time.perf_counter() - t0, 1)}


def _print_buys(b: dict) -> None:
    print(f"what curation buys: vit_pico/4 at 32 px, smoke pretrain recipe, {b['steps']} steps on {b['subset']} "
          f"CIFAR-10 train images each; seeds {b['n_seeds']} test images of {', '.join(b['seed_classes'])} "
          f"(first half), k-NN on the other half ({b['n_test']}); retrieval {b['mode']} ({b['retrieval']}) with "
          f"the embedder pretrained {b['embed_steps']} steps on the full 50,000-image pool")
    e = b["embedder"]["bank_5class"]
    print(f"  embedder (full pool, {b['embed_steps']} steps): k-NN top-1 k=10 {e['10']:.4f} k=20 {e['20']:.4f} "
          f"(bank: {b['n_bank_5class']} 5-class train images)")
    for name in ("curated", "random"):
        r = b[name]
        print(f"  {name}: seed-class share {r['seed_class_share']:.3f}; k-NN top-1 bank 5-class train "
              f"k=10 {r['bank_5class']['10']:.4f} k=20 {r['bank_5class']['20']:.4f} | bank = the subset "
              f"k=10 {r['bank_subset']['10']:.4f} k=20 {r['bank_subset']['20']:.4f}")
    print(f"  time {b['total_s']} s: " + "; ".join(f"{k} {v} s" for k, v in b["seconds"].items()), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/curate.py")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--skip-embed", action="store_true")
    parser.add_argument("--skip-graph", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--what-it-buys", action="store_true", help="run only section 3 (module doc: cost)")
    parser.add_argument("--subset", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--embed-steps", type=int, default=180)
    parser.add_argument("--seed-classes", default="airplane,automobile,bird,cat,deer")
    parser.add_argument("--mode", choices=("sample", "cluster"), default="sample")
    parser.add_argument("--clusters", type=int, default=100)
    args = parser.parse_args(argv)
    res = {}
    if args.what_it_buys:
        res["buys"] = bench_buys(args.subset, args.steps, args.embed_steps, args.seed_classes.split(","),
                                 args.mode, args.clusters)
        _print_buys(res["buys"])
        if args.json:
            print(json.dumps(res))
        return 0
    if not args.skip_embed:
        res["embed"] = bench_embed(args.images)
        e = res["embed"]
        print(f"embedding {e['images']} CIFAR-10 images (vit_pico/4, 32 px, CPU): plain torch loop "
              f"{e['plain_per_core']} img/s/core | Ray Data embed_set {e['ray_per_core']} img/s/core "
              f"({e['ray_img_s']} img/s on {e['ray_cpus']} CPUs: {e['images']} images in "
              f"{e['ray_seconds_incl_startup']} s, actor start-up included) | ratio "
              f"{e['ray_per_core'] / e['plain_per_core']:.2f}", flush=True)
    if args.skip_graph:
        if args.json:
            print(json.dumps(res))
        return 0
    res["graph"] = bench_graph(args.vectors, args.dim, args.queries)
    g = res["graph"]
    print(f"k-NN graph, {g['vectors']} SYNTHETIC {g['dim']}-d vectors, k={g['k']}, {g['threads']} threads: exact "
          f"{g['exact_sample_s']} s for {g['queries']} queries (full graph est. {g['exact_graph_s_est']} s)")
    for row in g["ivfpq"]:
        print(f"  IVF-PQ nlist {row['nlist']} m {row['pq_m']} nprobe {row['nprobe']}: build {row['build_s']} s, "
              f"{row['sample_s']} s for the sample (graph est. {row['graph_s_est']} s, "
              f"{g['exact_graph_s_est'] / max(row['graph_s_est'], 1e-9):.1f}x faster), recall@{g['k']} "
              f"{row['recall@' + str(g['k'])]}")
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
