"""Curation benchmarks: embedding throughput, and the IVF-PQ k-NN graph against exact search.

    .venv/bin/python bench/curate.py [--images 10000] [--vectors 1000000] [--dim 64] [--queries 10000]
                                     [--skip-embed] [--skip-graph] [--json]

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/curate.py")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--skip-embed", action="store_true")
    parser.add_argument("--skip-graph", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    res = {}
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
