"""Multi-crop throughput: the dinov2 reference pipeline vs ours, side by side, on the same JPEGs.

    .venv/bin/python bench/data.py [--seconds 15] [--batch-size 32] [--n-photos 64] [--torchvision] [--json]
    .venv/bin/python bench/data.py --read-only        # the read path alone: tar members, JPEG decode

Two image sets: CIFAR-10 test images (32x32 JPEGs from ../shared/data/cifar10/test.tar) and generated
photo-sized JPEGs (~500x375, smooth gradients + shapes + noise, quality 90). Paper crops: 2 x 224 +
8 x 98. Both pipelines run in this process on one core (torch threads = 1), alternating rounds, on the
same in-memory JPEG bytes, and include collation (crop-major stacking + iBOT masks).

Reference = facebookresearch/dinov2 `DataAugmentationDINO` + `collate_data_and_masks`, i.e. PIL decode
(`Image.open(...).convert("RGB")`) and torchvision's PIL code paths. torchvision is not installable
beside this torch, so each op is reproduced with the same PIL/numpy/torch calls torchvision makes:
RandomResizedCrop (get_params algorithm, img.crop().resize(BICUBIC)), horizontal flip (PIL transpose),
ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8 in a random order (ImageEnhance.Brightness/Contrast/Color,
hue via PIL HSV + uint8 shift), RandomGrayscale p=0.2 (convert("L") stacked x3), GaussianBlur
(kernel 9, sigma U(0.1, 2): torchvision converts the PIL image to a tensor and runs a 9x9 conv2d with
reflect padding), RandomSolarize(128) p=0.2 on the second global crop (ImageOps.solarize),
ToTensor + Normalize(ImageNet). Blur probabilities 1.0 / 0.1 / 0.5 as in the paper for both pipelines.

Ours = orchestrator.data.augment.MultiCrop through MultiCropLoader._make_batch (uint8 out; the model
normalises on the accelerator). The printed pixel statistics (mean/std per crop type on the 0-255
scale) show both produce the same output distribution.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "test.tar"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- reference (PIL)

def _rrc_params(rng, height, width, scale, ratio=(3 / 4, 4 / 3)):
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_r))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _hue_pil(img, factor):
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    np_h += np.uint8(int(factor * 255) % 256)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


def _blur_tv(img, sigma):
    """torchvision F.gaussian_blur on a PIL image: to tensor, 9x9 kernel conv2d, reflect pad, back."""
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().unsqueeze(0)
    k1 = torch.exp(-(torch.arange(-4, 5, dtype=torch.float32) ** 2) / (2 * sigma ** 2))
    k1 = k1 / k1.sum()
    k2 = (k1[:, None] * k1[None, :]).expand(3, 1, 9, 9)
    x = F.conv2d(F.pad(x, (4, 4, 4, 4), mode="reflect"), k2, groups=3)
    return Image.fromarray(x.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy())


def _to_tensor_normalize(img):
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(255)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


class Reference:
    def __init__(self, G=224, L=98, n_local=8, gscale=(0.32, 1.0), lscale=(0.05, 0.32), blur_p=(1.0, 0.1, 0.5)):
        self.G, self.L, self.n_local, self.gscale, self.lscale, self.blur_p = G, L, n_local, gscale, lscale, blur_p

    def _geo(self, img, size, scale, rng):
        i, j, h, w = _rrc_params(rng, img.height, img.width, scale)
        out = img.crop((j, i, j + w, i + h)).resize((size, size), Image.BICUBIC)
        return out.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out

    def _color(self, img, rng, blur_p, solarize_p):
        if rng.random() < 0.8:
            fb, fc, fs, fh = rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.8, 1.2), rng.uniform(-0.1, 0.1)
            for op in rng.permutation(4):
                if op == 0:
                    img = ImageEnhance.Brightness(img).enhance(fb)
                elif op == 1:
                    img = ImageEnhance.Contrast(img).enhance(fc)
                elif op == 2:
                    img = ImageEnhance.Color(img).enhance(fs)
                else:
                    img = _hue_pil(img, fh)
        if rng.random() < 0.2:
            g = np.asarray(img.convert("L"))
            img = Image.fromarray(np.dstack([g, g, g]), "RGB")
        if rng.random() < blur_p:
            img = _blur_tv(img, rng.uniform(0.1, 2.0))
        if rng.random() < solarize_p:
            img = ImageOps.solarize(img, 128)
        return _to_tensor_normalize(img)

    def __call__(self, data: bytes, rng):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        g1 = self._color(self._geo(img, self.G, self.gscale, rng), rng, self.blur_p[0], 0.0)
        g2 = self._color(self._geo(img, self.G, self.gscale, rng), rng, self.blur_p[1], 0.2)
        locs = [self._color(self._geo(img, self.L, self.lscale, rng), rng, self.blur_p[2], 0.0)
                for _ in range(self.n_local)]
        return [g1, g2], locs

    def batch(self, datas, rng, gen, patch=14):
        from model.masking import collate_masks

        outs = [self(d, rng) for d in datas]
        g = torch.stack([o[0][i] for i in range(2) for o in outs])
        lc = torch.stack([o[1][i] for i in range(self.n_local) for o in outs])
        masks = collate_masks(g.shape[0], self.G // patch, gen)
        return {"global_crops": g, "local_crops": lc, **masks}


class TorchvisionReference(Reference):
    """The dinov2 pipeline written with real torchvision transforms (used when torchvision imports).

    Same classes and arguments as dinov2/data/augmentations.py; GaussianBlur uses RandomApply with the
    paper's p directly (the released wrapper's keep_p = 1 - p quirk is noted in orchestrator/data/augment.py).
    """

    def __init__(self, G=224, L=98, n_local=8, gscale=(0.32, 1.0), lscale=(0.05, 0.32), blur_p=(1.0, 0.1, 0.5)):
        super().__init__(G, L, n_local, gscale, lscale, blur_p)
        from torchvision import transforms as T

        bic = T.InterpolationMode.BICUBIC
        self.geo_g = T.Compose([T.RandomResizedCrop(G, scale=gscale, interpolation=bic), T.RandomHorizontalFlip(0.5)])
        self.geo_l = T.Compose([T.RandomResizedCrop(L, scale=lscale, interpolation=bic), T.RandomHorizontalFlip(0.5)])
        cj = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)])
        blur = [T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=p) for p in blur_p]
        norm = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
        self.t1 = T.Compose([cj, blur[0], norm])
        self.t2 = T.Compose([cj, blur[1], T.RandomSolarize(128, p=0.2), norm])
        self.tl = T.Compose([cj, blur[2], norm])

    def __call__(self, data: bytes, rng):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        return [self.t1(self.geo_g(img)), self.t2(self.geo_g(img))], \
            [self.tl(self.geo_l(img)) for _ in range(self.n_local)]


# ------------------------------------------------------------------------------------- images

def cifar_jpegs(n, path=CIFAR):
    out = []
    with tarfile.open(path) as tf:
        members = [m for m in tf.getmembers() if m.isreg() and m.name.endswith(".jpg")]
        for m in members[:: max(1, len(members) // n)][:n]:
            out.append(tf.extractfile(m).read())
    return out


def photo_jpegs(n, seed=0, size=(500, 375)):
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        base = np.stack([np.sin(x / rng.uniform(20, 80) + rng.uniform(0, 6)) * 80 + 128,
                         np.cos(y / rng.uniform(20, 80)) * 80 + 128, (x + y) / (w + h) * 255], -1)
        base += rng.normal(0, 12, base.shape)
        im = Image.fromarray(base.clip(0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            d.ellipse([x0, y0, x0 + int(rng.integers(10, 150)), y0 + int(rng.integers(10, 150))],
                      fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        im.filter(ImageFilter.GaussianBlur(1)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# -------------------------------------------------------------------------------------- bench

def _stats(batch, normalized):
    res = {}
    for k in ("global_crops", "local_crops"):
        x = batch[k].float()
        if normalized:
            x = (x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255
        res[k] = (round(x.mean().item(), 1), round(x.std().item(), 1))
    return res


def compare(name, datas, seconds, batch_size, seed=0, torchvision=False):
    from orchestrator.data.augment import MultiCrop
    from orchestrator.data.loader import MultiCropLoader
    from orchestrator.pipeline.schema import CropsCfg, ModelCfg

    ours = MultiCropLoader.__new__(MultiCropLoader)  # only _make_batch: no shards needed
    crops = MultiCrop(**dataclasses.asdict(CropsCfg()))  # the job defaults: the paper's crops and probabilities
    ours.aug, ours.patch, ours.seed, ours.rank, ours.B = crops, 14, seed, 0, batch_size
    ours.mask_ratio, ours.mask_prob = ModelCfg.mask_ratio_min_max, ModelCfg.mask_probability
    ours.with_keys, ours.urls = False, name
    refs = {"reference": Reference()}
    if torchvision:
        refs["torchvision"] = TorchvisionReference()
    rng = np.random.default_rng(seed)
    names = [*refs, "ours"]
    t, n, stats = {k: 0.0 for k in names}, {k: 0 for k in names}, {k: [] for k in names}
    j = 0
    while min(t.values()) < seconds:
        idx = rng.integers(0, len(datas), batch_size)
        chunk = [datas[i] for i in idx]
        for which in names:
            t0 = time.perf_counter()
            if which == "ours":
                b, _ = ours._make_batch([{"jpg": d} for d in chunk], 0, j, None)
            else:
                b = refs[which].batch(chunk, rng, torch.Generator().manual_seed(j))
            t[which] += time.perf_counter() - t0
            n[which] += batch_size
            if len(stats[which]) < 4:
                stats[which].append(_stats(b, which != "ours"))
        j += 1
    ips = {k: n[k] / t[k] for k in t}

    def avg(which, key, i):
        return round(sum(s[key][i] for s in stats[which]) / len(stats[which]), 1)

    out = {"images": name, "n_jpegs": len(datas), "reference_images_per_s": round(ips["reference"], 1),
           "ours_images_per_s": round(ips["ours"], 1), "ratio": round(ips["ours"] / ips["reference"], 2),
           "pixel_mean_std": {w: {k: (avg(w, k, 0), avg(w, k, 1)) for k in ("global_crops", "local_crops")}
                              for w in names}}
    if torchvision:
        out["torchvision_images_per_s"] = round(ips["torchvision"], 1)
        out["ratio_vs_torchvision"] = round(ips["ours"] / ips["torchvision"], 2)
    return out


def read_path(tar_path: str, rounds: int = 3) -> dict:
    """The eval/curation read path on one tar of JPEGs, in rounds alternating baseline and ours:
    members through tarfile's stream mode vs samples._tar_members, decode through PIL vs augment.decode
    (libjpeg-turbo). Median seconds per 10,000 images and the ratios."""
    from orchestrator.data import augment, samples

    def tarfile_members(f):
        with tarfile.open(fileobj=f, mode="r|*") as tf:
            return [(m.name, tf.extractfile(m).read()) for m in tf if m.isreg()]

    def read(fn):
        with open(tar_path, "rb") as f:
            return [data for name, data in fn(f) if name.endswith(".jpg")]

    jpegs = read(tarfile_members)
    jobs = {"read tarfile": lambda: read(tarfile_members), "read ours": lambda: read(samples._tar_members),
            "decode PIL": lambda: [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in jpegs],
            "decode ours": lambda: [augment.decode(d) for d in jpegs]}
    times = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, fn in jobs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 10_000 / len(jpegs))
    out = {name: round(float(np.median(ts)), 3) for name, ts in times.items()}
    out.update(images=len(jpegs), read_ratio=round(out["read tarfile"] / out["read ours"], 2),
               decode_ratio=round(out["decode PIL"] / out["decode ours"], 2))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=15.0, help="per pipeline per image set")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-photos", type=int, default=64)
    p.add_argument("--cifar", default=str(CIFAR), help="tar of CIFAR-10 JPEGs")
    p.add_argument("--torchvision", action="store_true", help="also run real torchvision transforms")
    p.add_argument("--json", action="store_true")
    p.add_argument("--read-only", action="store_true", help="only the read path: tar members and JPEG decode")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # per-core numbers
    read = read_path(args.cifar)
    if not args.json:
        print(f"read path, {read['images']} CIFAR-10 JPEGs, s per 10,000: tar members tarfile "
              f"{read['read tarfile']} | ours {read['read ours']} | ratio {read['read_ratio']}x; decode PIL "
              f"{read['decode PIL']} | ours {read['decode ours']} | ratio {read['decode_ratio']}x")
    results = [] if args.read_only else [
        compare("cifar10-32px", cifar_jpegs(512, args.cifar), args.seconds, args.batch_size,
                torchvision=args.torchvision),
        compare("photos-500x375", photo_jpegs(args.n_photos), args.seconds, args.batch_size,
                torchvision=args.torchvision)]
    if args.json:
        print(json.dumps([{"read_path": read}, *results]))
        return 0
    for r in results:
        tv = (f" | torchvision {r['torchvision_images_per_s']:6.1f} (ratio {r['ratio_vs_torchvision']:.2f}x)"
              if "torchvision_images_per_s" in r else "")
        print(f"{r['images']:>16}: reference {r['reference_images_per_s']:6.1f} img/s/core | ours "
              f"{r['ours_images_per_s']:6.1f} img/s/core | ratio {r['ratio']:.2f}x{tv}")
        for w, st in r["pixel_mean_std"].items():
            print(f"{'':>18}{w:>9} pixel mean/std  global {st['global_crops']}  local {st['local_crops']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
