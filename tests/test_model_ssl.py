"""SSLMetaArch / DistillMetaArch: loss composition, gradients, teacher, EMA, options."""

import pytest
import torch

from model import DEFAULT_CFG, DistillMetaArch, SSLMetaArch, ema_update_, normalize_images
from model.ssl import student_head_losses
from model.masking import collate_masks

TINY = dict(arch="vit_pico", patch_size=4, img_size=32, head_n_prototypes=64, head_hidden_dim=48,
            head_bottleneck_dim=16, ibot_separate_head=False)


def make_batch(B=4, n_local=3, seed=0, G=32, Lsz=16, patch=4):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "global_crops": torch.randint(0, 256, (2 * B, 3, G, G), dtype=torch.uint8, generator=g),
        "local_crops": torch.randint(0, 256, (n_local * B, 3, Lsz, Lsz), dtype=torch.uint8, generator=g),
        "labels": torch.full((B,), -1, dtype=torch.long),
    }
    batch.update(collate_masks(2 * B, G // patch, g))
    return batch


def test_forward_parts_and_weighted_total():
    torch.manual_seed(0)
    m = SSLMetaArch({**TINY, "koleo_loss_weight": 0.3, "ibot_loss_weight": 0.7})
    loss, parts = m(make_batch(), teacher_temp=0.05)
    assert set(parts) == {"dino_global", "dino_local", "ibot", "koleo"}
    want = parts["dino_global"] + parts["dino_local"] + 0.3 * parts["koleo"] + 0.7 * parts["ibot"]
    assert torch.allclose(loss.detach(), want, atol=1e-5)
    assert all(torch.isfinite(v) and v.ndim == 0 for v in parts.values())
    assert parts["ibot"] > 0 and parts["dino_local"] > parts["dino_global"]  # 6 local vs 2 global terms


@pytest.mark.parametrize("separate", [False, True])
def test_head_losses_equal_the_plain_autograd_form(separate):
    """student_head_losses (heads returning their rows' cross entropies; tied heads in one call) against
    the heads' logits through log_softmax, pair by pair: values and every head parameter's gradient."""
    torch.manual_seed(0)
    m = SSLMetaArch({**TINY, "ibot_separate_head": separate})
    B, n_l, K, T = 4, 3, 64, 0.1
    cls, patches = torch.randn((2 + n_l) * B, 64), torch.randn(11, 64)
    t_cls, t_patch = torch.softmax(torch.randn(2 * B, K) / 0.05, -1), torch.softmax(torch.randn(11, K) / 0.05, -1)
    weight = torch.rand(11)
    got = student_head_losses(m.student, cls, patches, t_cls, t_patch, weight, 2, n_l, T)
    heads = dict(m.student.named_children())
    heads.pop("backbone")
    g_got = torch.autograd.grad(sum(got.values()), [p for h in heads.values() for p in h.parameters()])

    def ce(t, logits):
        return -(t * torch.log_softmax(logits / T, -1)).sum(-1).mean()
    s = m.student["dino_head"](cls).split(B)
    t0, t1 = t_cls.split(B)
    s_patch = m.student["ibot_head" if separate else "dino_head"](patches)
    want = {"dino_global": (ce(t1, s[0]) + ce(t0, s[1])) / 8,
            "dino_local": sum(ce(t, s[c]) for c in range(2, 2 + n_l) for t in (t0, t1)) / 8,
            "ibot": (-(t_patch * torch.log_softmax(s_patch / T, -1)).sum(-1) * weight).sum() / (2 * B)}
    g_want = torch.autograd.grad(sum(want.values()), [p for h in heads.values() for p in h.parameters()])
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-5), k
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g_got, g_want))


def test_gradients_reach_student_only():
    torch.manual_seed(0)
    m = SSLMetaArch(TINY).train()
    assert not m.teacher.training and m.student.training
    assert all(not p.requires_grad for p in m.teacher.parameters())
    loss, _ = m(make_batch(), teacher_temp=0.05)
    loss.backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    grads = {n: p.grad for n, p in m.student.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert grads["backbone.mask_token"].abs().sum() > 0  # iBOT reaches the mask token
    assert grads["dino_head.last_layer.weight_v"].abs().sum() > 0


def test_teacher_starts_as_student_copy_and_ema():
    torch.manual_seed(0)
    m = SSLMetaArch(TINY)
    t, s = m.ema_pairs()
    assert len(t) == len(s) and all(torch.equal(a, b) for a, b in zip(t, s))
    with torch.no_grad():
        for p in s:
            p.add_(1.0)
    before = [a.clone() for a in t]
    m.update_ema_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(t, before))  # m=1 keeps the teacher
    ema_update_(t, s, 0.5)
    assert all(torch.allclose(a, b + 0.5) for a, b in zip(t, before))
    m.update_ema_(0.0)
    assert all(torch.equal(a, b) for a, b in zip(t, s))  # m=0 copies the student
    with pytest.raises(ValueError, match="matching lists"):
        ema_update_(t[:1], s, 0.5)


def test_no_local_crops_and_no_masks():
    torch.manual_seed(0)
    m = SSLMetaArch(TINY)
    b = make_batch(n_local=0)
    for k in ("masks", "mask_indices_list", "masks_weight"):
        b.pop(k)
    loss, parts = m(b, teacher_temp=0.05)
    assert parts["dino_local"] == 0 and parts["ibot"] == 0 and torch.isfinite(loss)
    loss.backward()


def test_bf16_autocast_and_softmax_centering():
    torch.manual_seed(0)
    m = SSLMetaArch({**TINY, "centering": "softmax", "ibot_separate_head": True,
                     "ibot_n_prototypes": 32})
    assert m.teacher["ibot_head"].last_layer.out_features == 32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = m(make_batch(), teacher_temp=0.05)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert m.dino_centering.center.abs().sum() > 0  # centre moved
    assert m.student["ibot_head"].last_layer.weight_v.grad is not None


def test_gram_anchoring_option():
    torch.manual_seed(0)
    m = SSLMetaArch({**TINY, "gram_loss_weight": 2.0})
    loss, parts = m(make_batch(), teacher_temp=0.05)
    assert "gram" in parts and parts["gram"] >= 0
    assert SSLMetaArch(TINY).gram_teacher is None
    with torch.no_grad():
        m.teacher["backbone"].norm.weight.add_(1.0)
    m.update_gram_teacher_()
    assert torch.equal(m.gram_teacher.norm.weight, m.teacher["backbone"].norm.weight)


def test_bad_cfg_and_batch_fail_clearly():
    with pytest.raises(ValueError, match="unknown model cfg keys"):
        SSLMetaArch({**TINY, "head_n_prototype": 3})
    with pytest.raises(ValueError, match="centering"):
        SSLMetaArch({**TINY, "centering": "mean"})
    m = SSLMetaArch(TINY)
    b = make_batch()
    b["global_crops"] = b["global_crops"][:7]
    with pytest.raises(ValueError, match="n_global_crops"):
        m(b, teacher_temp=0.05)
    with pytest.raises(TypeError, match="uint8"):
        normalize_images(torch.zeros(1, 3, 4, 4, dtype=torch.int32))


def test_normalize_images():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    y = normalize_images(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                                                       (1 - 0.406) / 0.225]))


def test_meta_build_of_giant_and_defaults():
    m = SSLMetaArch({"arch": "vit_giant2", "head_n_prototypes": 131072, "head_bottleneck_dim": 384,
                     "ibot_separate_head": True}, device="meta")
    assert m.student["backbone"].pos_embed.is_meta
    assert m.student["dino_head"].last_layer.weight_v.shape == (131072, 384)
    assert DEFAULT_CFG["koleo_loss_weight"] == 0.1 and DEFAULT_CFG["student_temp"] == 0.1


def test_model_defaults_agree_with_the_job_schema():
    """One source of defaults: every key the model cfg shares with the job schema's ModelCfg has
    ModelCfg's default (ibot_n_prototypes: None in the model means 'head_n_prototypes')."""
    import dataclasses

    from model.losses import LOSS_PARTS
    from orchestrator.pipeline.schema import ModelCfg
    schema = {f.name: f.default for f in dataclasses.fields(ModelCfg)}
    shared = sorted(set(schema) & set(DEFAULT_CFG))
    assert {"ibot_separate_head", "ffn_layer", "head_n_prototypes"} <= set(shared)
    model = {**DEFAULT_CFG, "ibot_n_prototypes": DEFAULT_CFG["ibot_n_prototypes"] or DEFAULT_CFG["head_n_prototypes"]}
    assert {k: model[k] for k in shared} == {k: schema[k] for k in shared}
    assert len(set(LOSS_PARTS)) == len(LOSS_PARTS) and {"dino_global", "ibot", "feature"} <= set(LOSS_PARTS)


def test_distill_arch():
    torch.manual_seed(0)
    m = DistillMetaArch({**TINY, "teacher_arch": "vit_tiny", "drop_path_rate": 0.3})
    assert m.teacher["backbone"].embed_dim == 192 and m.student["backbone"].embed_dim == 64
    assert all(b.drop_path == 0.0 for b in m.student["backbone"].blocks)  # no stochastic depth
    m.train()
    loss, parts = m(make_batch(), teacher_temp=0.05)
    assert set(parts) == {"dino_global", "dino_local", "ibot", "koleo"}
    loss.backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    assert all(p.grad is None for p in m.student_ema.parameters())
    assert m.student["backbone"].mask_token.grad is None  # student is never masked
    t, s = m.ema_pairs()
    with torch.no_grad():
        s[0].add_(1.0)
    m.update_ema_(0.0)
    assert torch.equal(t[0], s[0]) and m.final_backbone() is m.student_ema["backbone"]
    # teacher from a trained SSL teacher's state dict
    ssl = SSLMetaArch({**TINY, "arch": "vit_tiny"})
    d2 = DistillMetaArch({**TINY, "teacher_arch": "vit_tiny"}, teacher=ssl.teacher.state_dict())
    assert torch.equal(d2.teacher["backbone"].pos_embed, ssl.teacher["backbone"].pos_embed)
    with pytest.raises(ValueError, match="no keys under"):
        DistillMetaArch({**TINY, "teacher_arch": "vit_tiny"},
                        teacher={"x." + k: v for k, v in ssl.teacher.state_dict().items()})


def test_distill_feature_term_regresses_the_teacher_cls():
    torch.manual_seed(0)
    m = DistillMetaArch({**TINY, "teacher_arch": "vit_tiny", "feature_loss_weight": 2.0}).train()
    proj = m.student["feat_proj"]  # widths differ (64 -> 192): a learned projection
    assert (proj.in_features, proj.out_features) == (64, 192) and "feat_proj" in m.student_ema
    batch = make_batch()
    loss, parts = m(batch, teacher_temp=0.05)
    assert 0.0 < parts["feature"] < 2.0  # 1 - mean cosine
    want = parts["dino_global"] + parts["dino_local"] + 0.1 * parts["koleo"] + parts["ibot"] + 2.0 * parts["feature"]
    assert torch.allclose(loss.detach(), want, atol=1e-5)
    # same width, heads off: no projection, no student heads, and the term alone moves the student's
    # own CLS onto the teacher's
    t = SSLMetaArch(TINY).teacher
    f = DistillMetaArch({**TINY, "teacher_arch": "vit_pico", "feature_loss_weight": 1.0, "dino_loss_weight": 0.0,
                         "ibot_loss_weight": 0.0, "koleo_loss_weight": 0.0}, teacher=t).train()
    assert set(f.student) == {"backbone"}
    opt = torch.optim.AdamW(f.student.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss, parts = f(batch, teacher_temp=0.05)
        first = parts["feature"] if first is None else first
        assert parts["dino_global"] == 0 and parts["ibot"] == 0
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts["feature"] < 0.3 * first
    assert all(p.grad is None for p in f.teacher.parameters())
