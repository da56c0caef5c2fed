"""Backbone: interop with the released DINOv2 state dicts, pos-embed interpolation, meta builds."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import ARCHS, DINOHead, build_backbone, build_hub_backbone, flops_per_image
from model import layers
from model.layers import Attention

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "dinov2_hub_state_dicts.json"
HUB = json.loads(REF.read_text())
SMALL = ("dinov2_vits14", "dinov2_vits14_reg")


@pytest.mark.parametrize("name", sorted(HUB))
def test_keys_shapes_and_param_count_match_reference(name):
    ref = HUB[name]
    m = build_hub_backbone(name, device="meta")
    assert {k: list(v.shape) for k, v in m.state_dict().items()} == ref["state_dict"]
    assert list(m.state_dict()) == list(ref["state_dict"])  # same key order too
    assert sum(p.numel() for p in m.parameters()) == ref["num_params"]
    assert m.num_register_tokens == ref["num_register_tokens"]


def test_vitg_param_count_and_swiglu_on_meta():
    m = build_backbone("vit_giant2", img_size=518, patch_size=14, device="meta")
    assert sum(p.numel() for p in m.parameters()) == 1_136_480_768
    assert m.blocks[0].mlp.w3.in_features == 4096
    assert m.pos_embed.is_meta and m.n_blocks == 40 and m.embed_dim == 1536


@pytest.mark.parametrize("name", sorted(HUB))
def test_reference_named_state_dict_loads_strict(name, tmp_path):
    shapes = HUB[name]["state_dict"]
    if name in SMALL:
        g = torch.Generator().manual_seed(0)
        sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        path = tmp_path / "ckpt.pth"
        torch.save(sd, path)
        sd = torch.load(path, weights_only=True)
        m = build_hub_backbone(name)
        m.load_state_dict(sd, strict=True)
        assert torch.equal(m.pos_embed, sd["pos_embed"])
        out = m.eval().forward_features(torch.randn(1, 3, 56, 42, generator=g))
        assert out["x_norm_patchtokens"].shape == (1, 4 * 3, 384)
        assert out["x_norm_regtokens"].shape == (1, HUB[name]["num_register_tokens"], 384)
    else:  # large models: check names/shapes through load_state_dict on the meta device
        sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        m = build_hub_backbone(name, device="meta")
        m.load_state_dict(sd, strict=True, assign=True)
        sd.pop("norm.bias")
        with pytest.raises(RuntimeError, match="norm.bias"):
            m.load_state_dict(sd, strict=True, assign=True)


def _grid(m):
    n = m.pos_embed.shape[1] - 1
    M = int(n ** 0.5)
    return m.pos_embed.detach()[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)


def test_pos_embed_interpolation_518_and_98_no_registers():
    m = build_hub_backbone("dinov2_vits14")  # offset 0.1, no antialias
    assert m.interpolate_pos_encoding(37 * 37, 518, 518) is m.pos_embed  # native grid: as stored
    p98 = m.interpolate_pos_encoding(49, 98, 98)
    assert p98.shape == (1, 50, 384)
    want = F.interpolate(_grid(m), scale_factor=(7.1 / 37, 7.1 / 37), mode="bicubic", antialias=False)
    assert torch.allclose(p98[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 49, -1), atol=1e-6)
    assert torch.equal(p98[:, 0], m.pos_embed[:, 0])
    # a model trained at 224 px (16x16 grid) evaluated at 518
    m224 = build_backbone("vit_small", img_size=224, patch_size=14)
    p518 = m224.interpolate_pos_encoding(37 * 37, 518, 518)
    want = F.interpolate(_grid(m224), scale_factor=(37.1 / 16, 37.1 / 16), mode="bicubic")
    assert torch.allclose(p518[:, 1:], want.permute(0, 2, 3, 1).reshape(1, -1, 384), atol=1e-6)


def test_pos_embed_interpolation_registers_uses_size_and_antialias():
    m = build_hub_backbone("dinov2_vits14_reg")
    p98 = m.interpolate_pos_encoding(49, 98, 98)
    want = F.interpolate(_grid(m), size=(7, 7), mode="bicubic", antialias=True)
    assert torch.allclose(p98[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 49, -1), atol=1e-6)
    other = F.interpolate(_grid(m), scale_factor=(7.1 / 37, 7.1 / 37), mode="bicubic")
    assert not torch.allclose(want, other, atol=1e-3)  # the two recipes differ, so the test bites
    # non-square input: grid follows (H/14, W/14)
    assert m.interpolate_pos_encoding(4 * 6, 56, 84).shape == (1, 25, 384)


def test_pos_embed_interpolation_in_float32_under_bf16():
    m = build_hub_backbone("dinov2_vits14").bfloat16()
    p = m.interpolate_pos_encoding(49, 98, 98)
    assert p.dtype == torch.bfloat16 and torch.isfinite(p.float()).all()


def test_token_layout_registers_after_pos_embed_and_mask_token():
    m = build_backbone("vit_pico", img_size=16, patch_size=4, num_register_tokens=4)
    with torch.no_grad():
        m.mask_token.fill_(7.0)
    x = torch.randn(2, 3, 16, 16)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, 3] = True
    t = m.prepare_tokens_with_masks(x, masks)
    assert t.shape == (2, 1 + 4 + 16, 64)
    assert torch.equal(t[:, 1:5], m.register_tokens.expand(2, -1, -1))  # no position embedding
    assert torch.allclose(t[:, 0], (m.cls_token + m.pos_embed[:, :1])[:, 0].expand(2, -1))
    assert torch.allclose(t[0, 5 + 3], 7.0 + m.pos_embed[0, 1 + 3])
    assert not torch.allclose(t[1, 5 + 3], 7.0 + m.pos_embed[0, 1 + 3])
    out = m.forward_features(x, masks)
    assert out["x_norm_regtokens"].shape == (2, 4, 64) and out["masks"] is masks
    assert torch.equal(m(x), m.forward_features(x)["x_norm_clstoken"])


def test_forward_features_list_matches_separate_calls():
    torch.manual_seed(0)
    m = build_backbone("vit_pico", img_size=32, patch_size=4).eval()
    a, b = torch.randn(3, 3, 32, 32), torch.randn(5, 3, 16, 16)
    outs = m.forward_features_list([a, b], [None, None])
    assert torch.allclose(outs[0]["x_norm_clstoken"], m.forward_features(a)["x_norm_clstoken"], atol=1e-5)
    assert torch.allclose(outs[1]["x_prenorm"], m.forward_features(b)["x_prenorm"], atol=1e-5)


def test_drop_path_only_in_training_and_layerscale_off():
    m = build_backbone("vit_pico", img_size=16, patch_size=4, drop_path_rate=0.5, layerscale_init=None)
    assert "blocks.0.ls1.gamma" not in m.state_dict()
    x = torch.randn(8, 3, 16, 16)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    y1 = m(x)
    torch.manual_seed(1)
    assert not torch.allclose(y1, m(x))


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="unknown arch"):
        build_backbone("vit_huge")
    with pytest.raises(ValueError, match="ffn_layer"):
        build_backbone("vit_pico", patch_size=4, img_size=16, ffn_layer="moe")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_backbone("vit_pico", patch_size=4, img_size=16)(torch.randn(1, 3, 18, 16))


def test_dino_head_shapes_and_weight_norm_names():
    h = DINOHead(64, out_dim=100, hidden_dim=32, bottleneck_dim=16)
    assert h(torch.randn(5, 64)).shape == (5, 100)
    sd = h.state_dict()
    assert sd["last_layer.weight_g"].shape == (100, 1) and sd["last_layer.weight_v"].shape == (100, 16)
    assert "last_layer.bias" not in sd
    # prototype rows have norm g: logits of a unit input are bounded by 1
    assert h(torch.randn(5, 64)).abs().max() <= 1.0 + 1e-5


def test_flops_per_image_close_to_2_params_tokens():
    for arch in ("vit_small", "vit_base", "vit_large", "vit_giant2"):
        m = build_backbone(arch, img_size=224, patch_size=14, device="meta")
        n_params = sum(p.numel() for p in m.blocks.parameters())
        dense = 2 * n_params * 257  # 16x16 patches + CLS
        f = flops_per_image(arch, 224, 14)
        assert dense < f < 1.15 * dense, arch
    assert flops_per_image("vit_small", 518, 14) > 5 * flops_per_image("vit_small", 224, 14)
    assert set(ARCHS) >= {"vit_pico", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2"}


def test_residual_stream_stays_fp32_under_bf16_autocast():
    m = build_backbone("vit_pico", img_size=16, patch_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.forward_features(torch.randn(2, 3, 16, 16))
    assert out["x_prenorm"].dtype == torch.float32


def _plain_attention(attn, x, n_q=None):
    """What autograd makes of the matmul form (the reference's ops, the scale inside the first matmul)."""
    B, N, _ = x.shape
    q, k, v = attn.qkv(x).view(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).flatten(1, 2)
    q = q[:, :n_q]
    s = torch.baddbmm(q.new_empty(1, 1, 1), q, k.transpose(1, 2), beta=0.0, alpha=q.shape[-1] ** -0.5)
    o = torch.bmm(s.softmax(-1), v)
    return o.view(B, attn.num_heads, -1, o.shape[-1]).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_attention_matmul_form_matches_autograd_and_kernel(dtype, monkeypatch):
    """On CPU the attention is the matmul form with a hand-written backward (`_MatmulAttention`)
    wherever a backward follows, and in bf16 without one. Its outputs and its input and qkv-weight
    gradients equal autograd's of the same ops exactly, every token's and CLS-only (a last block that
    reads CLS); without grad it stays within rounding of SDPA in float32, and fp32 keeps SDPA's kernel,
    as does every case whose score tensor passes the matmul form's memory limit."""
    torch.manual_seed(0)
    attn = Attention(384, 6)  # ViT-S: 64-wide heads
    x = torch.randn(3, 17, attn.qkv.in_features)
    g = torch.randn(3, 17, attn.qkv.in_features)
    bf16 = dtype == torch.bfloat16
    for read, n_q in ((None, None), (torch.arange(3) * 17, 1)):
        ins = [x.clone().requires_grad_() for _ in range(2)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = attn(ins[0], rows=read)
            plain = attn.proj(_plain_attention(attn, ins[1], n_q))
        plain = plain.flatten(0, 1) if read is not None else plain
        assert out.dtype == dtype and torch.equal(out, plain)
        gout = (g.flatten(0, 1)[:3] if read is not None else g).to(dtype)
        got = torch.autograd.grad(out, [ins[0], attn.qkv.weight], gout)
        want = torch.autograd.grad(plain, [ins[1], attn.qkv.weight], gout)
        for a, b in zip(got, want):
            assert a.abs().max() > 0 and torch.equal(a, b)
    with torch.no_grad():
        q, k, v = attn.qkv(x).view(3, 17, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        ref = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 17, -1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            no_grad_out = attn(x)
            plain = attn.proj(_plain_attention(attn, x))
            q, k, v = attn.qkv(x).view(3, 17, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            by_kernel = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 17, -1))
    assert (no_grad_out.float() - ref).abs().max() <= (2e-2 if bf16 else 1e-5) * ref.abs().max()
    assert not torch.equal(plain, by_kernel)  # the two forms round differently: the next check can fail
    assert torch.equal(no_grad_out, plain if bf16 else by_kernel)
    monkeypatch.setattr(layers, "_SCORES_MAX_BYTES", 0)  # scores too large: SDPA's kernel, grad or not
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        assert torch.equal(attn(xg), by_kernel)
        with torch.no_grad():
            assert torch.equal(attn(x), by_kernel)
