"""Every export format loads strict where users load DINOv2, and gives the features we give (CPU, fp32).

Tolerances (docs/eval.md): hf is exact up to float error (1e-4); dinov2 exports of archs with a
released counterpart carry a position embedding resampled to 37x37, so at the training resolution
the CLS agrees to cosine >= 0.999 and patch tokens to cosine >= 0.99 (measured 0.99998 / 0.9995)."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import model as dmodel
from orchestrator.eval import export, features

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "dinov2_hub_state_dicts.json"


def trained_like(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (LayerScale at 0.5, tokens non-zero) so that every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
            elif name.endswith(("cls_token", "register_tokens", "mask_token")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return net.eval()


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_dinov2_export_of_a_224px_vits14_loads_strict_into_the_released_model(tmp_path, name):
    ours = trained_like(dmodel.build_backbone(img_size=224, patch_size=14, **dmodel.HUB_MODELS[name]))
    res = export.export_state_dict(ours.state_dict(), "dinov2", str(tmp_path / "w.pth"))
    assert res["hub_model"] == name and res["img_size"] == 518
    sd = torch.load(tmp_path / "w.pth", weights_only=True)
    released = json.loads(REFERENCE.read_text())[name]["state_dict"]
    assert {k: list(v.shape) for k, v in sd.items()} == released  # the released checkpoint's contract
    hub = dmodel.build_hub_backbone(name)
    hub.load_state_dict(sd, strict=True)
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours.forward_features(x), hub.eval().forward_features(x)
    cls = F.cosine_similarity(a["x_norm_clstoken"], b["x_norm_clstoken"], dim=-1)
    patches = F.cosine_similarity(a["x_norm_patchtokens"], b["x_norm_patchtokens"], dim=-1)
    assert cls.min() > 0.999 and patches.min() > 0.99, (cls.min(), patches.min())
    assert not torch.equal(a["x_norm_clstoken"], b["x_norm_clstoken"])  # the resampling is real


def test_dinov2_export_without_layerscale_gets_unit_gammas_and_same_features_at_518(tmp_path):
    ours = trained_like(dmodel.build_backbone("vit_small", img_size=518, layerscale_init=None))
    res = export.export_state_dict(ours.state_dict(), "dinov2", str(tmp_path / "w.pth"))
    hub = dmodel.build_hub_backbone(res["hub_model"])
    hub.load_state_dict(torch.load(tmp_path / "w.pth", weights_only=True), strict=True)
    x = torch.rand(1, 3, 518, 518)
    with torch.no_grad():  # same grid, no resampling: the export is exact
        torch.testing.assert_close(hub.eval()(x), ours(x), atol=1e-5, rtol=0)


def test_tiny_arch_exports_at_its_own_size_and_says_so(tmp_path):
    ours = trained_like(dmodel.build_backbone("vit_pico", img_size=32, patch_size=4))
    res = export.export_state_dict(ours.state_dict(), "dinov2", str(tmp_path / "w.pth"))
    assert res["hub_model"] is None and res["img_size"] == 32 and "no released DINOv2 counterpart" in res["note"]
    again = features.backbone_from_state_dict(features.load_state_dict(str(tmp_path / "w.pth")))
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(again(x), ours(x))


@pytest.mark.parametrize("kw", [dict(), dict(num_register_tokens=4, interpolate_antialias=True,
                                                 interpolate_offset=0.0),
                                dict(ffn_layer="swiglufused", layerscale_init=None)],
                         ids=["plain", "registers", "swiglu-no-layerscale"])
def test_hf_export_loads_in_transformers_with_equal_outputs(tmp_path, kw):
    import transformers  # the dev extra installs it
    ours = trained_like(dmodel.build_backbone("vit_tiny", img_size=56, patch_size=14, **kw))
    res = export.export_state_dict(ours.state_dict(), "hf", str(tmp_path / "hf"))
    cls = transformers.Dinov2WithRegistersModel if kw.get("num_register_tokens") else transformers.Dinov2Model
    theirs, info = cls.from_pretrained(res["path"], output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        out = theirs.eval()(pixel_values=x)
        ref = ours.forward_features(x)
    seq = torch.cat([ref["x_norm_clstoken"][:, None], ref["x_norm_regtokens"], ref["x_norm_patchtokens"]], dim=1)
    torch.testing.assert_close(out.last_hidden_state, seq, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.pooler_output, ref["x_norm_clstoken"], atol=1e-4, rtol=0)


def test_unknown_or_removed_format_is_refused_with_the_alternative(tmp_path):
    net = dmodel.build_backbone("vit_pico", img_size=32, patch_size=4)
    with pytest.raises(ValueError, match="timm loads the dinov2 format"):
        export.export_state_dict(net.state_dict(), "timm", str(tmp_path / "w"))
    with pytest.raises(ValueError, match="not a DINOv2 backbone state dict"):
        export.export_state_dict({"weight": torch.zeros(2)}, "dinov2", str(tmp_path / "w"))
