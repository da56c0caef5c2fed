"""The eval and export phase runners (orchestrator/eval/phase.py) on a run folder: every backbone of the
`from_phase`, results with their yardsticks, exports under exports/."""
import json
from pathlib import Path

import pytest
import torch

import model as dmodel
from orchestrator.eval import phase as eval_phase
from orchestrator.layout import RunLayout
from orchestrator.pipeline import config

JOB = Path(__file__).resolve().parents[1] / "jobs" / "smoke_cpu.yaml"


def job_with_backbone(tmp_path, cifar=None, extra=()):
    shards = cifar or {"train": str(tmp_path / "none"), "test": str(tmp_path / "none")}
    job = config.load_job(str(JOB), [f"storage={tmp_path / 'runs'}", f"data.train={shards['train']}",
                                     f"data.eval_train={shards['train']}", f"data.eval_test={shards['test']}",
                                     *extra])
    layout = RunLayout.of(job)
    torch.manual_seed(0)
    net = dmodel.build_backbone("vit_pico", img_size=32, patch_size=4, layerscale_init=None)
    for key in layout.phase_dirs(job.phase("distill")):
        dst = layout.phase(key).final_backbone
        Path(dst.local_path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), dst.local_path)
    return job, layout, net


@pytest.mark.parametrize("fmt", ["dinov2", "safetensors", "hf"])
def test_run_export_writes_every_student_of_the_phase(tmp_path, fmt, monkeypatch):
    job, layout, net = job_with_backbone(tmp_path)
    export_phase = job.phase("export")
    monkeypatch.setattr(export_phase, "export_format", fmt)
    lines = []
    res = eval_phase.run_export(job, export_phase, layout, log=lines.append)
    (key, path), = res["metrics"]["files"].items()
    assert key == "distill-vit_pico" and Path(path).exists()
    assert res["metrics"]["exports"][key]["format"] == fmt
    if fmt == "dinov2":
        assert "no released DINOv2 counterpart" in lines[0]
        assert torch.equal(torch.load(path, weights_only=True)["pos_embed"], net.state_dict()["pos_embed"])
    if fmt == "hf":
        assert json.loads((Path(path) / "config.json").read_text())["image_size"] == 32


@pytest.mark.slow
@pytest.mark.ray
def test_run_eval_reports_knn_with_its_yardsticks_and_caches_them(tmp_path, cifar_shards):
    import ray
    job, layout, _ = job_with_backbone(tmp_path, cifar_shards, [
        "eval.max_train_images=1000", "eval.max_test_images=300", "num_workers=2"])
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        lines = []
        res = eval_phase.run_eval(job, job.phase("eval_distill"), layout, log=lines.append)
        again = eval_phase.run_eval(job, job.phase("eval_distill"), layout, log=lines.append)
    finally:
        ray.shutdown()
    got = res["metrics"]["distill-vit_pico"]
    assert got["top1"] == got["knn"]["top1"] and set(got["top1"]) == {"10", "20"}
    assert set(got["baselines"]) == {"random_init", "pixels"}
    assert got["baselines"]["pixels"]["knn"]["top1"]["20"] > 0.2  # raw pixels beat chance on CIFAR-10
    # the stored backbone is itself a fresh init (seed 0): the yardstick is the same eval of the same weights
    assert got["baselines"]["random_init"]["knn"]["top1"] == got["top1"]
    assert again["metrics"]["distill-vit_pico"]["baselines"] == got["baselines"]
    assert sum(line.endswith("(cached)") for line in lines) == 2  # the second run read both


@pytest.mark.slow
@pytest.mark.ray
def test_sharded_knn_keeps_features_on_workers_and_matches_the_gathered_knn(cifar_shards):
    import ray

    from orchestrator.eval import knn, knn_dist
    torch.manual_seed(0)
    sd = dmodel.build_backbone("vit_pico", img_size=32, patch_size=4, layerscale_init=None).state_dict()
    kw = dict(train_limit=6000, test_limit=1000, ks=(10, 20))
    gathered = knn.knn_eval(sd, cifar_shards["train"], cifar_shards["test"], **kw)
    pixels = knn.knn_eval(None, cifar_shards["train"], cifar_shards["test"], image_size=32, **kw)
    ray.init(num_cpus=2, include_dashboard=False)
    try:  # the backbone and the raw pixels from one pass over the images
        both = knn_dist.knn_eval_sharded_many({"net": sd, "pixels": None}, cifar_shards["train"],
                                              cifar_shards["test"], parallel=2, actor_options=dict(num_cpus=1), **kw)
    finally:
        ray.shutdown()
    sharded = both["net"]
    assert (sharded["n_train"], sharded["n_test"], sharded["parallel"], sharded["pass_sources"]) == (6000, 1000, 2, 2)
    for k in ("10", "20"):  # at most one tie broken differently
        assert abs(sharded["top1"][k] - gathered["top1"][k]) <= 1 / 1000
        assert abs(both["pixels"]["top1"][k] - pixels["top1"][k]) <= 1 / 1000
    assert pixels["top1"] != gathered["top1"]  # two different sources, not one bank read twice
    # the driver received the test labels and 2 banks x 20 (similarity, label) pairs per query, nothing more:
    # 1000 x (8 + 2 x 20 x (4 + 8)) bytes, against 7000 x 64 x 4 bytes of features for the gathered k-NN
    assert sharded["driver_bytes"] == 1000 * (8 + 2 * 20 * 12)


@pytest.mark.parametrize("override, message", [
    ("eval.methods=[]", "eval.methods: list at least one of knn, linear, retrieval"),
    ("eval.retrieval_copies=0", "retrieval needs retrieval_queries >= 1, retrieval_copies >= 1"),
    ("eval.linear_epochs=0", "the linear probe needs linear_epochs >= 1"),
    ("eval.methods=[knn,svm]", "svm"),
])
def test_bad_eval_settings_are_refused_by_validate(tmp_path, override, message):
    from orchestrator.pipeline.schema import ConfigError
    from orchestrator.pipeline.validate import validate
    with pytest.raises(ConfigError, match=message):
        validate(config.load_job(str(JOB), ["eval.methods=[knn,linear,retrieval]", override]))


def test_merging_per_bank_top_k_equals_the_k_nn_over_the_whole_bank():
    import torch.nn.functional as F

    from orchestrator.eval import knn, knn_dist
    g = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(300, 16, generator=g), dim=1)
    test = F.normalize(torch.randn(50, 16, generator=g), dim=1)
    train_l, test_l = torch.randint(0, 5, (300,), generator=g), torch.randint(0, 5, (50,), generator=g)
    train_l[-1] = 6  # a class only the train split has: the votes must have room for it
    banks = []
    for lo, hi in ((0, 120), (120, 300)):
        bank = knn_dist.Bank(["pixels"], 32, 8, None, None)
        bank.feats, bank.labels = [train[lo:hi]], train_l[lo:hi]
        banks.append(bank)
    parts = [bank.topk(([test], test_l), 20) for bank in banks]
    merged = knn_dist.merge_votes(parts, test_l, (1, 10, 20), 0.07, 7)
    whole = knn.knn_accuracy(train, train_l, test, test_l, ks=(1, 10, 20))
    assert {k: c / 50 for k, c in merged.items()} == pytest.approx(whole)
