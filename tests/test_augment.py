"""Fast multi-crop vs the PIL/torchvision-semantics reference: same ops, same output distribution."""

import dataclasses
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CIFAR_TEST_TAR
from PIL import Image, ImageEnhance, ImageOps

from orchestrator.data import augment as A
from orchestrator.pipeline.schema import CropsCfg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import data as ref  # noqa: E402  bench/data.py: the reference pipeline


def _multicrop(**overrides):
    """MultiCrop with the job's default crops (CropsCfg), `overrides` applied."""
    return A.MultiCrop(**{**dataclasses.asdict(CropsCfg()), **overrides})


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cifar():
    with tarfile.open(CIFAR_TEST_TAR) as tf:
        ms = [m for m in tf.getmembers() if m.isreg() and m.name.endswith(".jpg")][::250]
        return [tf.extractfile(m).read() for m in ms]


def _img(seed=0, size=48):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _planes(arr):  # HxWx3 uint8 -> [3, 1, H, W] float
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(1).float()


def _back(x):
    return x.round().clamp(0, 255)[:, 0].permute(1, 2, 0).to(torch.uint8).numpy().astype(int)


def test_crop_params_match_torchvision_statistics():
    """crop_params draws a batch's crops at once; per crop, the distribution of torchvision's
    RandomResizedCrop.get_params (bench/data.py's scalar copy of it): within the image, the same area and
    aspect statistics, and the same share of centred fallbacks where few of the 10 draws fit."""
    rng, rrng = np.random.default_rng(0), np.random.default_rng(1)
    for (H, W), scale in (((375, 500), (0.32, 1.0)), ((100, 100), (0.9, 1.0)), ((40, 200), (0.05, 0.3))):
        ours = A.crop_params(rng, [(H, W)] * 4000, scale)
        theirs = np.array([ref._rrc_params(rrng, H, W, scale) for _ in range(4000)])
        assert ours.shape == (4000, 4) and ours.dtype == np.int64
        i, j, h, w = ours.T
        assert (i >= 0).all() and (i <= H - h).all() and (j >= 0).all() and (j <= W - w).all() and (h > 0).all()
        for a, b in ((ours, theirs), (theirs, ours)):
            assert abs((a[:, 2] * a[:, 3]).mean() - (b[:, 2] * b[:, 3]).mean()) / (H * W) < 0.015
        fr, ar = h * w / (H * W), w / h
        assert scale[0] - 0.02 <= fr.min() and abs(fr.std() - (theirs[:, 2] * theirs[:, 3] / (H * W)).std()) < 0.015
        assert 3 / 4 - 0.06 <= ar.min() and ar.max() <= 4 / 3 + 0.06  # rounding to whole pixels
        full = ((h == H) & (w == W)).mean(), ((theirs[:, 2] == H) & (theirs[:, 3] == W)).mean()
        assert abs(full[0] - full[1]) < 0.03, full
    fallback = ((100, 100), (0.9, 1.0))  # ~1 draw in 6 fits: some crops take the whole image
    assert 0.05 < ((A.crop_params(rng, [fallback[0]] * 2000, fallback[1])[:, 2:] == 100).all(1)).mean() < 0.5
    assert A.crop_params(rng, [(10, 1000)], (0.9, 1.0)).tolist() == [[0, 493, 10, 13]]  # torchvision's centre fallback
    mixed = A.crop_params(rng, [(10, 1000), (300, 200)] * 50, (0.5, 1.0))  # each crop bounded by its own image
    assert (mixed[0::2, 2] <= 10).all() and (mixed[1::2, 2] <= 300).all() and (mixed[1::2, 2] > 10).any()


def _pil_crops(images, boxes, flips, size):
    """torchvision's resized_crop on PIL images: crop, bicubic resize, then the horizontal flip."""
    out = []
    for img, bb, ff in zip(images, boxes, flips):
        for (y0, x0, y1, x1), flip in zip(bb.tolist(), ff):
            im = Image.fromarray(img).crop((x0, y0, x1, y1)).resize((size, size), Image.BICUBIC)
            out.append(np.asarray(im.transpose(Image.FLIP_LEFT_RIGHT) if flip else im))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).int()


def test_batched_resampling_matches_the_per_crop_kernel_and_pil(cifar):
    """Equal-size small images (CIFAR) resample all crops of a batch at once by matrix products, in the
    order of torch's per-crop uint8 kernel (rows, then columns; the path for other images): equal to it
    up to its fixed-point rounding, and at least as close to PIL's crop + bicubic resize + flip. (Pillow
    13 runs the vertical pass first for some crops taller than wide that it shrinks; both differ from it
    there by the clipping between the two passes.)"""
    mc = _multicrop(global_size=32, local_size=16, n_local=4)
    rng = np.random.default_rng(5)
    plans = mc.plan_images(cifar, rng)
    images, boxes, flips = [p[0] for p in plans], np.stack([p[1] for p in plans]), np.stack([p[2] for p in plans])
    assert flips.any() and not flips.all() and len({b.tobytes() for b in boxes.reshape(-1, 4)}) > 100
    g, lc = mc.resize_crops(images, boxes, flips)
    assert set(mc._tables) == {(32, 32), (16, 32)}  # the batched path ran
    per_crop = _multicrop(global_size=32, local_size=16, n_local=4)
    g2, lc2 = per_crop.resize_crops([np.pad(images[0], ((0, 1), (0, 0), (0, 0)))] + images[1:], boxes, flips)
    assert not per_crop._tables  # two image sizes: crop by crop
    for ours, kernel, size, sl in ((g, g2, 32, slice(0, 2)), (lc, lc2, 16, slice(2, 6))):
        d = (ours[1:].int() - kernel[1:].int()).abs()
        assert d.max() <= 2 and (d == 0).float().mean() > 0.995
        pil = _pil_crops(images[1:], boxes[1:, sl], flips[1:, sl], size)
        d_ours, d_kernel = ((x[1:].flatten(0, 1).int() - pil).abs() for x in (ours, kernel))
        assert d_ours.max() <= max(2, d_kernel.max()) and d_ours.float().mean() < 0.05
        assert (d_ours > 0).sum() <= (d_kernel > 0).sum()
    one = mc.resize_crops(images[:1], boxes[:1], flips[:1])  # one image alone: the same pixels
    assert torch.equal(one[0], g[:1]) and torch.equal(one[1], lc[:1])


@pytest.mark.parametrize("op,pil", [(0, ImageEnhance.Brightness), (1, ImageEnhance.Contrast), (2, ImageEnhance.Color)])
def test_linear_jitter_ops_match_pil(op, pil):
    arr = _img(op)
    for f in (0.6, 1.3):
        ours = _back(A._OPS[op](_planes(arr), torch.tensor([f])))
        theirs = np.asarray(pil(Image.fromarray(arr)).enhance(f)).astype(int)
        assert np.abs(ours - theirs).max() <= 1


def test_hue_matches_pil_hsv_within_quantisation():
    arr = _img(5)
    for f in (-0.1, 0.05):
        ours = _back(A._hue(_planes(arr), torch.tensor([f])))
        theirs = np.asarray(ref._hue_pil(Image.fromarray(arr), f)).astype(int)
        # PIL quantises hue to 1/256 turn and s/v to uint8: a few levels apart on saturated pixels
        assert np.abs(ours - theirs).mean() < 1.5 and np.percentile(np.abs(ours - theirs), 99) <= 8


def test_gray_blur_solarize_match_reference_ops():
    arr = _img(7)
    gray = _back(A._gray(_planes(arr)).unsqueeze(0).expand(3, -1, -1, -1))
    assert np.abs(gray[..., 0] - np.asarray(Image.fromarray(arr).convert("L")).astype(int)).max() <= 1
    blurred = _back(A._blur(_planes(arr), torch.tensor([1.3])))
    assert np.abs(blurred - np.asarray(ref._blur_tv(Image.fromarray(arr), 1.3)).astype(int)).max() <= 1
    sol = _back(A._solarize(_planes(arr)))
    assert np.array_equal(sol, np.asarray(ImageOps.solarize(Image.fromarray(arr), 128)).astype(int))


def test_photometric_probabilities():
    mc = _multicrop()
    rng = np.random.default_rng(1)
    g1, g2, lc = (mc.sample_photometric(rng, 20000, k) for k in ("global1", "global2", "local"))
    assert g1["blur"].all() and abs(g2["blur"].mean() - 0.1) < 0.01 and abs(lc["blur"].mean() - 0.5) < 0.015
    assert abs(g2["solarize"].mean() - 0.2) < 0.01 and not g1["solarize"].any() and not lc["solarize"].any()
    assert abs(lc["jitter"].mean() - 0.8) < 0.01 and abs(lc["gray"].mean() - 0.2) < 0.01
    assert len(np.unique(lc["perm"])) == 24 and lc["h"].min() >= -0.1 and lc["h"].max() <= 0.1


def test_batched_jitter_applies_each_crops_own_op_order():
    """apply_photometric runs the jitter ops position by position over the crops that share an op there;
    every crop must still get exactly its own order, as if it were jittered alone."""
    mc = _multicrop(solarize_p=0.0)
    rng = np.random.default_rng(3)
    n = 96
    p = mc.sample_photometric(rng, n, "local")
    p["gray"][:], p["blur"][:] = False, False  # jitter only: the op order is what is under test
    assert len(np.unique(p["perm"][p["jitter"]])) >= 20
    crops = torch.from_numpy(rng.integers(0, 256, (n, 3, 16, 16), dtype=np.uint8))
    out = A.apply_photometric(crops, p)
    for i in range(n):
        x = crops[i:i + 1].permute(1, 0, 2, 3).float()
        if p["jitter"][i]:
            for op in A.PERMS[p["perm"][i]]:
                x = A._OPS[op](x, torch.tensor([float(p["bcsh"[op]][i])]))
        alone = x.round_().clamp_(0, 255).to(torch.uint8).permute(1, 0, 2, 3)
        assert torch.equal(out[i:i + 1], alone), i


def _run_ours(mc, datas, seed):
    rng = np.random.default_rng(seed)
    res = [mc.crop_image(d, rng) for d in datas]
    g = torch.stack([r[0] for r in res], 1).flatten(0, 1)
    lc = torch.stack([r[1] for r in res], 1).flatten(0, 1)
    return mc.photometric(g, lc, rng)


def test_same_output_distribution_as_reference(cifar):
    mc = _multicrop(global_size=64, local_size=32)
    g, lc = _run_ours(mc, cifar * 3, 0)
    r = ref.Reference(G=64, L=32)
    rng = np.random.default_rng(0)
    outs = [r(d, rng) for d in cifar * 3]
    mean, std = torch.tensor(ref.MEAN).view(3, 1, 1), torch.tensor(ref.STD).view(3, 1, 1)
    rg = torch.stack([(o[0][k] * std + mean) * 255 for o in outs for k in range(2)])
    rl = torch.stack([(o[1][k] * std + mean) * 255 for o in outs for k in range(8)])
    for a, b in ((g.float(), rg), (lc.float(), rl)):
        assert a.shape == b.shape
        assert abs(a.mean() - b.mean()) < 6 and abs(a.std() - b.std()) < 6
        # per-crop brightness spread (jitter/grayscale/solarize mix) is alike too
        assert abs(a.mean((1, 2, 3)).std() - b.mean((1, 2, 3)).std()) < 6


def test_dct_scaled_decode_is_close_to_full_decode():
    datas = ref.photo_jpegs(2, size=(1600, 1200))
    mc_fast = _multicrop(global_size=64, local_size=32)
    mc_full = _multicrop(global_size=64, local_size=32, dct_scaling=False)
    for d in datas:
        a = mc_fast.crop_image(d, np.random.default_rng(3))
        b = mc_full.crop_image(d, np.random.default_rng(3))
        for x, y in zip(a, b):
            assert (x.float() - y.float()).abs().mean() < 4
    assert A.decode(datas[0], 300, 400).shape == (300, 400, 3)  # 1/4 scale, not the full 1200x1600


def test_deterministic_and_uint8(cifar):
    mc = _multicrop(global_size=32, local_size=16, n_local=3)
    a, b = _run_ours(mc, cifar[:4], 9), _run_ours(mc, cifar[:4], 9)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].dtype == torch.uint8 and a[0].shape == (8, 3, 32, 32) and a[1].shape == (12, 3, 16, 16)
    c = _run_ours(mc, cifar[:4], 10)
    assert not torch.equal(a[0], c[0])


def test_corrupt_and_odd_inputs():
    mc = _multicrop(global_size=32, local_size=16)
    rng = np.random.default_rng(0)
    with pytest.raises(Exception):
        mc.crop_image(b"\xff\xd8\xff\xe0garbage", rng)
    buf = io.BytesIO()
    Image.fromarray(_img(1)).convert("L").save(buf, "PNG")  # grayscale PNG -> 3 channels
    g, lc = mc.crop_image(buf.getvalue(), rng)
    assert g.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown crops keys"):
        A.MultiCrop.from_cfg({"global_sz": 3})


def test_crop_keys_are_the_job_crops_section():
    """MultiCrop's required settings are exactly CropsCfg's fields: the job spec holds their only defaults."""
    assert set(A.CROP_KEYS) == {f.name for f in dataclasses.fields(CropsCfg)}
    with pytest.raises(ValueError, match="missing"):
        A.MultiCrop.from_cfg({"global_size": 32})
    with pytest.raises(TypeError):
        A.MultiCrop()  # no defaults outside CropsCfg
