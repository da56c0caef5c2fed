"""Elastic training on a real multi-node Ray cluster (`ray.cluster_utils.Cluster`: a head and two 1-CPU
worker nodes, plus a replacement), with real CIFAR-10 images: one scripted phase (bench/elastic.py
`scenario`) with a drain for preemption (`ray drain-node` with a deadline) and then the loss of a whole
node without notice.

    .venv/bin/python -m pytest tests/test_elastic_cluster.py -q -s
"""
from __future__ import annotations

import os
import sys

import pytest

from orchestrator.layout import RunLayout

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import elastic as bench_elastic  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]
IMAGES = 256  # one epoch = 32 steps at batch 8


def test_drain_then_node_loss_finishes_the_epoch_exactly(tmp_path, monkeypatch):
    # After the drain deadline Ray 2.60's elastic policy first retries the old worker count and falls
    # back only when that start times out (60 s by default, docs/scale.md). The driver passes this to
    # Ray Train's controller; 30 s still leaves a 1-CPU node ample time to start a worker here.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    data = bench_elastic.cifar_subset(str(tmp_path / "data"), IMAGES)
    out = bench_elastic.scenario(str(tmp_path / "runs"), data, steps=IMAGES // 8, log=print)
    print(out)
    phase = RunLayout.of(bench_elastic.make_job(str(tmp_path / "runs"), data, IMAGES // 8)).phase("pretrain")
    record = phase.restarts.read_json()

    # the phase finished with the full step count; metrics.jsonl holds each step once
    assert out["done"] == IMAGES // 8 and out["metrics_steps"] == list(range(1, IMAGES // 8 + 1))

    # drain: a just-in-time checkpoint after the drain and before its deadline, later than the last
    # periodic one; the run went on with fewer workers and took no step it had to redo
    assert out["jit_committed"] and out["jit_step"] > out["periodic_before_drain"]
    assert out["jit_s"] < out["deadline_s"] and out["drain_steps_lost"] == 0
    assert out["world_after_drain"] == 1
    # restarts by reason; max_failures is 1, so the drain did not draw on it (else the node loss ends the run)
    assert record["restarts"] == {"preemption": 1, "failure": 1, "resize": 0}
    starts = [(s["world_size"], s["step"], s["source"], s["reason"]) for s in record["starts"]]
    # both restarts resumed through ray.train.get_checkpoint(): the just-in-time checkpoint, then the
    # newest committed before the node was killed
    assert starts == [(2, 0, None, None), (1, out["jit_step"], "ray", "preemption"),
                      (1, out["ckpt_before_kill"], "ray", "failure")], starts

    # every image of the epoch exactly once, across world sizes 2 (two ranks) and 1 (two micro-batches)
    seen = [i for rank in (0, 1) for rec in (phase.root / f"trace/rank{rank}.jsonl").read_jsonl()
            if rec["step"] < IMAGES // 8 for i in rec["ids"]]
    assert len(seen) == IMAGES and len(set(seen)) == IMAGES
    streams = {(rec["step"] < out["jit_step"], rec["stream"]) for rank in (0, 1)
               for rec in (phase.root / f"trace/rank{rank}.jsonl").read_jsonl()}
    assert streams == {(True, 0), (True, 1), (False, 0), (False, 1)}

    # Ray sees the checkpoints: its run folder is the phase folder, and its num_to_keep (keep_last 2)
    # left the last two committed ones
    assert phase.ray_snapshot.exists()
    kept = phase.committed_steps()
    assert len(kept) == 2 and kept[-1] == IMAGES // 8, kept
