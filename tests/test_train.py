"""Training on a real local Ray cluster (2 CPU workers, gloo) with real CIFAR-10 shards.

    .venv/bin/python -m pytest tests/test_train.py -q -s

Each test is one or two Ray Train runs of a tiny ViT (vit_pico, 32 px crops, batch 8 over 2 ranks).
"""
from __future__ import annotations

import json
import math
import tarfile
import time

import pytest
import torch
from conftest import CIFAR_TEST_TAR

from orchestrator.data.build import build
from orchestrator.layout import RunLayout
from orchestrator.pipeline import config
from orchestrator.storage import Store
from orchestrator.training import checkpoint
from orchestrator.training import driver as train
from orchestrator.training import worker

pytestmark = [pytest.mark.ray, pytest.mark.slow]
STEPS = 20
LOSS_TOL = 0.03   # relative, per step: bf16 compute differs slightly between backends


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """256 real CIFAR-10 test images in 4 shards."""
    base = tmp_path_factory.mktemp("cifar")
    with tarfile.open(CIFAR_TEST_TAR) as tf:
        members = [m for m in tf.getmembers() if m.isreg() and m.name.endswith(".jpg")][::37][:256]
        for m in members:
            p = base / "src" / m.name.split("/", 1)[1]
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(tf.extractfile(m).read())
    build(Store(str(base / "src")), Store(str(base / "shards")), samples_per_shard=64, quiet=True)
    return str(base / "shards")


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """One local Ray cluster for the module, started after the S3 env is set (workers inherit it)."""
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def make_job(storage, data, name, **over) -> config.JobSpec:
    raw = {"name": name, "storage": storage, "backend": "fsdp2", "num_workers": 2, "seed": 1,
           "data": {"train": data, "num_workers": 0},
           "model": {"arch": "vit_pico", "patch_size": 8, "head_n_prototypes": 256, "head_hidden_dim": 64,
                     "head_bottleneck_dim": 32, "ibot_n_prototypes": 256},
           "crops": {"global_size": 32, "local_size": 16, "n_local": 2},
           "optim": {"batch_size": 8, "base_lr": 0.01, "warmup_iters": 2},
           "checkpoint": {"every_steps": 5, "keep_last": 3},
           "failure": {"max_failures": 2},
           "debug": {"trace_samples": True},
           "phases": [{"name": "pretrain", "kind": "pretrain", "steps": STEPS}]}
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    return config.job_from_dict(raw)


def pretrain(job):
    """The pretrain phase's folder (layout.PhaseDir)."""
    return RunLayout.of(job).phase("pretrain")


def metrics(job) -> list[dict]:
    return [json.loads(line) for line in pretrain(job).metrics.read_bytes().decode().splitlines()]


def trace(job, rank=0) -> list[dict]:
    lines = (pretrain(job).root / pretrain(job).trace_rel(rank)).read_bytes().decode().splitlines()
    return [json.loads(line) for line in lines]


def weights(job) -> dict:
    return checkpoint.load_consolidated(pretrain(job).final_model)


@pytest.fixture(scope="module")
def curves(ray_cluster, cifar, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    out = {}
    for backend in ("ddp", "fsdp2", "deepspeed"):
        job = make_job(root, cifar, f"curve-{backend}", backend=backend)
        t0 = time.time()
        res = train.run_phase(job, "pretrain")
        out[backend] = (job, res, time.time() - t0)
    return out


def test_every_backend_runs_and_gives_the_same_loss_curve(curves):
    from model import build_backbone
    ref = [m["loss"] for m in metrics(curves["ddp"][0])]
    assert len(ref) == STEPS and all(math.isfinite(x) for x in ref)
    for backend, (job, res, secs) in curves.items():
        curve = [m["loss"] for m in metrics(job)]
        rel = max(abs(a - b) / abs(b) for a, b in zip(curve, ref))
        print(f"\n{backend} ({secs:.0f}s): max rel diff vs ddp {rel:.2e}; loss "
              + " ".join(f"{x:.4f}" for x in curve))
        assert [m["step"] for m in metrics(job)] == list(range(1, STEPS + 1))
        assert rel < LOSS_TOL, (backend, rel)
        assert res["step"] == STEPS and res["checkpoint"].endswith(f"step-{STEPS:07d}")
        bb = build_backbone("vit_pico", img_size=32, patch_size=8)
        bb.load_state_dict(torch.load(res["backbone"], weights_only=True), strict=True)
        assert checkpoint.list_steps(pretrain(job)) == {10: True, 15: True, 20: True}
    assert curve[-1] < curve[0]  # it learns something


def test_finished_phase_returns_without_training(curves):
    job, res, _ = curves["fsdp2"]
    t0 = time.time()
    again = train.run_phase(job, "pretrain")
    assert again == res and time.time() - t0 < 5


def test_kill_and_resume_on_s3_gives_equal_weights_and_exact_data(curves, cifar, s3_server):
    ref_job = curves["fsdp2"][0]
    so = {"endpoint_url": s3_server["endpoint_url"]}
    job = make_job(f"s3://{s3_server['bucket']}/runs", cifar, "curve-fsdp2", storage_options=so,
                   debug={"kill_at_step": 12, "trace_samples": True})
    res = train.run_phase(job, "pretrain")
    phase = pretrain(job)
    assert phase.debug_marker("killed-at-12").exists(), "the worker was never killed"
    # Ray Train retains keep_last 3; a checkpoint whose report raced the kill is swept at the end
    steps = sorted(checkpoint.list_steps(phase).items())
    assert len(steps) == 3 and all(ok for _, ok in steps) and steps[-1] == (20, True), steps
    assert res["checkpoint"].startswith("s3://") and checkpoint.final_info(phase) == res
    # the JSON-lines files are re-seeded at resume without the redone steps: each step once
    assert [m["step"] for m in metrics(job)] == list(range(1, STEPS + 1))
    live = [json.loads(line)["step"] for line in phase.metrics_live.read_bytes().decode().splitlines()]
    assert live == list(range(1, STEPS + 1)), live   # rank 0's tail for status (all of it: < LIVE_BYTES)
    for rank in (0, 1):   # every step read exactly the batch the uninterrupted run read
        got, ref = trace(job, rank), trace(ref_job, rank)
        assert [(e["step"], e["ids"]) for e in got] == [(e["step"], e["ids"]) for e in ref]
        ids = [i for e in got for i in e["ids"]]
        assert len(ids) == len(set(ids)) == STEPS * 4   # no sample twice, none skipped (< 1 epoch)
    a, b = weights(ref_job), weights(job)
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"\nkill-resume: max abs diff vs uninterrupted {diff:.3g}")
    assert diff == 0.0
    # same data, in the same order, on every step: the loss curves are identical too
    ref = {m["step"]: m["loss"] for m in metrics(ref_job)}
    assert all(m["loss"] == ref[m["step"]] for m in metrics(job)), "a batch differs after resume"


def test_resume_reshards_two_ranks_to_one_and_skips_incomplete(curves):
    job2, _, _ = curves["fsdp2"]
    phase = pretrain(job2)
    phase.final.rm(recursive=True)
    phase.committed(phase.checkpoint(20)).rm()     # 20 and 15 become incomplete
    phase.committed(phase.checkpoint(15)).rm()
    phase.ray_snapshot.rm()  # and Ray Train forgets them (it registers committed checkpoints only)
    job1 = make_job(job2.storage, job2.data.train, job2.name, num_workers=1)
    t_resume = time.time()
    res = train.run_phase(job1, "pretrain")
    ms = metrics(job1)
    # resumed after step 10 on one rank: steps 1-10 are the first run's records, 11-20 new ones,
    # each step recorded once (local storage too: the redone steps' old records were dropped)
    assert [m["step"] for m in ms] == list(range(1, STEPS + 1)), [m["step"] for m in ms]
    assert all((m["time"] < t_resume) == (m["step"] <= 10) for m in ms), [(m["step"], m["time"]) for m in ms]
    assert res["step"] == STEPS and all(math.isfinite(v) for v in res["metrics"].values())
    info = phase.committed(phase.checkpoint(STEPS)).read_json()
    assert info["world_size"] == 1


def test_nan_batches_are_skipped_then_rolled_back(ray_cluster, cifar, tmp_path):
    # data position 2: one poisoned batch, skipped. Positions 6, 7, 8: three in a row -> roll back
    # to step 5 and continue with position 9.
    job = make_job(str(tmp_path), cifar, "nan", backend="ddp", debug={"nan_steps": [2, 6, 7, 8], "trace_samples": True})
    res = train.run_phase(job, "pretrain")
    ms = metrics(job)
    assert ms[-1]["nonfinite_steps_total"] == 4 and ms[-1]["rollbacks_total"] == 1
    assert [m["step"] for m in ms][:6] == [1, 2, 3, 4, 5, 6]
    t = trace(job)
    assert [(e["step"], e["pos"]) for e in t if e["step"] == 5] == [(5, 5), (5, 9)]
    assert len(t) == STEPS + 4 and [e["pos"] for e in t] == list(range(STEPS + 4))  # nothing re-read
    assert all(math.isfinite(v) for v in res["metrics"].values())
    w = weights(job)
    assert all(torch.isfinite(v.float()).all() for v in w.values())


def test_nan_past_rollback_budget_fails_with_step_parts_and_ranks(ray_cluster, cifar, tmp_path):
    job = make_job(str(tmp_path), cifar, "nanfail", backend="ddp",
                   failure={"max_failures": 1, "nonfinite_max_consecutive": 2, "max_rollbacks": 1},
                   checkpoint={"every_steps": 2}, debug={"nan_steps": list(range(3, 40))})
    with pytest.raises(RuntimeError) as e:
        train.run_phase(job, "pretrain")
    msg = str(e.value)
    print("\n" + msg)
    # rank 0's poisoned batch; the global Sinkhorn-Knopp centring spreads NaN to rank 1's DINO/iBOT
    # terms, but rank 1's KoLeo term (student-only, local) stays finite
    assert "step " in msg and "non-finite on ranks [0" in msg and "dino_global=nan" in msg
    assert "rank 1: loss=nan" in msg and "koleo=nan" not in msg.split("rank 1:")[1]
    assert "max_rollbacks=1" in msg


def _phase_in_process(rank, world, job, phase_name, arch):
    """The real worker loop in a plain gloo group (no Ray), given what driver.run_phase gives it."""
    worker.worker_loop(train.worker_config(job, job.phase(phase_name), arch))
    return None


def test_highres_then_distill_start_from_the_previous_phase(curves, cifar):
    from test_backends import spawn
    from model import build_backbone
    base = curves["ddp"][0]
    phases = [{"name": "pretrain", "kind": "pretrain", "steps": STEPS},
              {"name": "highres", "kind": "highres", "from_phase": "pretrain", "steps": 3,
               "crops": {"global_size": 48, "local_size": 24}},
              {"name": "distill", "kind": "distill", "from_phase": "highres", "steps": 3, "students": ["vit_pico"]}]
    job = make_job(base.storage, cifar, base.name, backend="ddp", num_workers=1, phases=phases)
    root = f"{base.storage}/{base.name}"
    spawn(_phase_in_process, 1, job, "highres", None)
    pre, hi = (torch.load(f"{root}/{k}/final/model.pth", weights_only=True) for k in ("pretrain", "highres"))
    assert pre["teacher.backbone.pos_embed"].shape == (1, 17, 64) and hi["teacher.backbone.pos_embed"].shape == (1, 37, 64)
    k = "teacher.backbone.blocks.1.mlp.fc1.weight"
    drift, scale = (hi[k] - pre[k]).abs().max().item(), pre[k].abs().max().item()
    assert drift < 0.05 * scale, (drift, scale)   # initialised from pretrain, then 3 small EMA steps
    spawn(_phase_in_process, 1, job, "distill", "vit_pico")
    di = torch.load(f"{root}/distill-vit_pico/final/model.pth", weights_only=True)
    teacher = {n: v for n, v in di.items() if n.startswith("teacher.")}
    assert di["teacher.backbone.pos_embed"].shape == (1, 17, 64)   # highres 48 px -> distill crops 32 px
    assert len(teacher) > 10 and all(torch.equal(v, hi[n]) for n, v in teacher.items()
                                     if not n.endswith("pos_embed"))   # the frozen highres teacher
    bb = build_backbone("vit_pico", img_size=32, patch_size=8)   # distill runs at the job's 32 px crops
    bb.load_state_dict(torch.load(f"{root}/distill-vit_pico/final/backbone.pth", weights_only=True), strict=True)
    assert checkpoint.final_info(RunLayout.of(job).phase("distill-vit_pico"))["steps"] == 3
