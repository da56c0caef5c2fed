"""k-NN maths, architecture inference from released key names, and export round trips."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import model as dmodel
from orchestrator.eval import features, knn as evaluate
from orchestrator.eval import export

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "dinov2_hub_state_dicts.json"


def test_weighted_knn_against_a_hand_computed_case():
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2])
    test = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.6, 0.8]]), dim=1)
    truth = torch.tensor([0, 1, 1])
    acc = evaluate.knn_accuracy(train, labels, test, truth, ks=(1, 3), temperature=0.07)
    # k=1: nearest neighbours are 0, 1 (label 1: [0.1,0.9]) and for [0.6,0.8] the point [0.7,0.7] (label 2)
    assert acc[1] == pytest.approx(2 / 3)
    # k=3: the third query's neighbours [0.7,0.7] (2), [0.1,0.9] (1), [0,1] (1): exp(sim/T) weights favour
    # class 2 (sim 0.99) over class 1 (0.86 + 0.80) since exp(0.99/0.07) > exp(0.86/0.07) + exp(0.80/0.07)
    assert acc[3] == pytest.approx(2 / 3)


@pytest.mark.parametrize("name", json.loads(REFERENCE.read_text()).keys())
def test_arch_is_inferred_from_released_state_dicts(name):
    ref = json.loads(REFERENCE.read_text())[name]
    sd = {k: torch.empty(v, device="meta") for k, v in ref["state_dict"].items()}
    net = dmodel.build_backbone(device="meta", **features.infer_arch(sd))
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == ref["state_dict"]


@pytest.mark.parametrize("fmt", ["dinov2", "safetensors"])
def test_export_round_trip_loads_strict(tmp_path, fmt):
    net = dmodel.build_backbone("vit_pico", img_size=32, patch_size=4, num_register_tokens=4)
    out = tmp_path / f"w.{fmt}"
    export.export_state_dict(net.state_dict(), fmt, str(out))
    sd = features.load_state_dict(str(out))
    again = features.backbone_from_state_dict(sd)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(again(x), net.eval()(x))


def test_export_refuses_an_unfinished_phase(tmp_path):
    with pytest.raises(FileNotFoundError, match="phase 'pretrain' has not finished"):
        export.export_phase(str(tmp_path), "pretrain", "dinov2", str(tmp_path / "o.pth"))


@pytest.mark.slow
def test_knn_eval_split_into_parallel_groups_matches_one_group(cifar_shards):
    torch.manual_seed(0)
    net = dmodel.build_backbone("vit_pico", img_size=32, patch_size=4, layerscale_init=None)
    sd = net.state_dict()
    items = features.shard_plan(cifar_shards["train"], limit=7000)  # cuts the second 5,000-image shard
    assert [n for _, n in items] == [5000, 2000]
    groups = features.split_work(items + features.shard_plan(cifar_shards["test"], limit=500), 3)
    assert [sum(b - a for _, a, b in g) for g in groups] == [2500, 2500, 2500]
    assert [[(a, b) for _, a, b in g] for g in groups] == [[(0, 2500)], [(2500, 5000)], [(0, 2000), (0, 500)]]
    whole = [(u, 0, n) for u, n in items + features.shard_plan(cifar_shards["test"], limit=500)]
    f1, l1 = features.embed_shards(sd, whole, 32)
    parts = [features.embed_shards(sd, g, 32) for g in groups]
    assert torch.equal(torch.cat([lab for _, lab in parts]), l1) and len(l1) == 7500
    torch.testing.assert_close(torch.cat([f for f, _ in parts]), f1, atol=1e-5, rtol=0)
    calls = []

    def recording_map(fn, arglist):
        calls.append(len(arglist))
        return [fn(*a) for a in arglist]

    one = evaluate.knn_eval(sd, cifar_shards["train"], cifar_shards["test"], train_limit=7000, test_limit=500)
    three = evaluate.knn_eval(sd, cifar_shards["train"], cifar_shards["test"], train_limit=7000, test_limit=500,
                              parallel=3, map_fn=recording_map)
    assert calls == [3] and three["parallel"] == 3 and (three["n_train"], three["n_test"]) == (7000, 500)
    for k in ("10", "20"):
        assert abs(three["top1"][k] - one["top1"][k]) <= 1 / 500  # at most one tie broken differently
    assert one["top1"]["20"] > 0.15  # a random pico already beats chance (10%) on CIFAR-10


def test_knn_eval_on_unlabelled_shards_says_what_is_missing(tmp_path):
    from PIL import Image

    from orchestrator.data.build import build
    from orchestrator.storage import Store
    src = tmp_path / "flat"  # images with no class folders: shards without .cls labels
    src.mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(src / f"{i}.jpg")
    build(Store(str(src)), Store(str(tmp_path / "s")), samples_per_shard=4, quiet=True)
    net = dmodel.build_backbone("vit_pico", img_size=32, patch_size=4)
    with pytest.raises(ValueError, match=r"lists 12 samples but 0 carry an image and a \.cls label"):
        evaluate.knn_eval(net.state_dict(), str(tmp_path / "s"), str(tmp_path / "s"), parallel=2)
