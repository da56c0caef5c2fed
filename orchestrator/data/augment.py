"""DINOv2 multi-crop augmentation on uint8, fast on CPU (no torchvision needed).

Same recipe and distribution as facebookresearch/dinov2 `DataAugmentationDINO` (PIL + torchvision):
  geometric, per crop: RandomResizedCrop(size, scale, ratio=(3/4, 4/3), bicubic) + horizontal flip p=0.5
  photometric, per crop: ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8 (the 4 ops in a random order per crop),
  grayscale p=0.2, Gaussian blur (kernel 9, sigma U(0.1, 2)) with p = 1.0 / 0.1 / 0.5 for the first
  global / second global / local crops, solarize (threshold 128) p=0.2 on the second global crop.
  ImageNet normalisation happens in the model (`model.normalize_images`), so crops stay uint8.

Note on blur: the released dinov2 code wraps torchvision's RandomApply with keep_p = 1 - p, which
in effect blurs with 0 / 0.9 / 0.5. CropsCfg's default follows the paper/issue values (1.0 / 0.1 / 0.5);
pass blur_p=(0.0, 0.9, 0.5) to mimic the released code. bench/data.py uses the same values.

Why it is fast (same outputs distribution, see tests/test_augment.py):
  1. crop parameters are drawn from the JPEG header size before decoding, then the JPEG is decoded
     with libjpeg-turbo DCT scaling (simplejpeg) at the smallest power-of-two scale that still gives
     every crop at least its output resolution (no extra upsampling vs. full-size decode);
  2. crop + resize: where a batch's images share one small size (CIFAR's 32 x 32), every crop at once
     by two batched matrix products with PIL's antialiased bicubic weights (a=-0.5), rounded to uint8
     between the passes (`resize_crops`: 768 crops of a 128-image batch ~8 ms against ~24 ms for as
     many calls of torch's uint8 kernel, whose per-call cost dominates tiny images); other images crop
     by crop with that kernel;
  3. photometric ops run batched over all crops of a batch, in float32 on contiguous channel planes,
     branch-free (no torch.where / bool masks), grouped by the per-crop jitter order.
  They can also run on an accelerator: `photometric(..., device="cuda")`.

No entrypoint; used by orchestrator.data.loader and bench/data.py.
"""

from __future__ import annotations

import io
import math
from itertools import permutations

import numpy as np
import torch
import torch.nn.functional as F

RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
PERMS = list(permutations(range(4)))  # 24 orders of the 4 jitter ops
PERM_TABLE = np.array(PERMS)  # [24, 4]: the op at each of the 4 positions of each order
GRAY = (0.299, 0.587, 0.114)
# The crop settings a MultiCrop needs (the job's `crops:` section, CropsCfg; defaults live only there).
CROP_KEYS = ("global_size", "local_size", "n_global", "n_local", "global_scale", "local_scale", "blur_p",
             "solarize_p")


def crop_params(rng: np.random.Generator, sizes, scale, ratio=RATIO) -> np.ndarray:
    """torchvision RandomResizedCrop.get_params for n crops at once, with a numpy Generator: sizes [n, 2]
    (each crop's image height, width) -> int64 [n, 4] (top, left, h, w). Each crop keeps the first of its
    10 (area, log-aspect) draws that fits its image, else torchvision's centred fallback."""
    hw = np.asarray(sizes, np.int64).reshape(-1, 2)
    n, H, W = len(hw), hw[:, :1], hw[:, 1:]
    target = (H * W) * rng.uniform(scale[0], scale[1], (n, 10))
    aspect = np.exp(rng.uniform(math.log(min(ratio)), math.log(max(ratio)), (n, 10)))
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    rows, first = np.arange(n), fits.argmax(1)
    hit, H, W = fits[rows, first], H[:, 0], W[:, 0]
    wide, tall = W / H > max(ratio), W / H < min(ratio)  # fallback: the whole image, aspect clamped to ratio
    h = np.where(hit, h[rows, first], np.where(tall, np.round(W / min(ratio)).astype(np.int64), H))
    w = np.where(hit, w[rows, first], np.where(wide, np.round(H * max(ratio)).astype(np.int64), W))
    top = np.where(hit, rng.integers(0, H - h + 1), (H - h) // 2)
    left = np.where(hit, rng.integers(0, W - w + 1), (W - w) // 2)
    return np.stack([top, left, h, w], 1)


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the header, without decoding pixels."""
    if data[:3] == b"\xff\xd8\xff":
        import simplejpeg
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            return h, w
        except ValueError:
            pass
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        return im.height, im.width


def decode(data: bytes, min_h: int = 0, min_w: int = 0) -> np.ndarray:
    """RGB uint8 HxWx3, at the smallest power-of-two JPEG scale with h >= min_h and w >= min_w."""
    if data[:3] == b"\xff\xd8\xff":
        import simplejpeg
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_h, min_width=min_w, strict=True)
        except ValueError:
            pass  # CMYK / unusual JPEGs: PIL below (raises for truly corrupt data)
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG" and (min_h or min_w):
            im.draft("RGB", (max(min_w, 1), max(min_h, 1)))
        return np.asarray(im.convert("RGB"))


def _batched_resampling(out: int, side: int) -> bool:
    """Whether crops of `out` px from images with a `side` of that many px resample as matrix products:
    where torch's per-call cost (~30 us) outweighs the dense products' work (CIFAR's 32 px to 32 or 16
    px: ~8 ms against ~24 ms per 128 images; to 224 px it is the other way round, 61 against 78 img/s),
    and the weight table [side + 1, side + 1, out, side] stays under 35 MB."""
    return side <= 64 and out * side <= 2048


def _bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic filter (a = -0.5), support 2."""
    a, x = -0.5, np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _resample_weights(lo, hi, out: int, size: int) -> np.ndarray:
    """[n, out, size]: PIL's antialiased bicubic weights taking the source pixels [lo, hi) of an axis of
    `size` pixels to `out` pixels, zero elsewhere (crop, then resize: torchvision's resized_crop on a PIL
    image never reads outside the crop). Shrinking widens the filter by the scale; rows sum to 1."""
    lo, hi = (np.asarray(v, np.float64)[:, None, None] for v in (lo, hi))
    scale = (hi - lo) / out
    widen = np.maximum(scale, 1.0)
    centre = (np.arange(out)[None, :, None] + 0.5) * scale  # in crop coordinates
    x = np.arange(size)[None, None, :] - lo
    first = np.maximum(np.trunc(centre - 2 * widen + 0.5), 0)
    stop = np.minimum(np.trunc(centre + 2 * widen + 0.5), hi - lo)
    w = _bicubic((x - centre + 0.5) / widen) * ((x >= first) & (x < stop))
    return w / w.sum(-1, keepdims=True)


class MultiCrop:
    """DINOv2 multi-crop: `plan_images` (per batch: crop boxes and flips drawn, images decoded) + `resize_crops`
    (per batch, geometric) + `photometric` (per batch, per crop); `crop_image` is the geometric part for one image."""

    def __init__(self, *, global_size: int, local_size: int, n_global: int, n_local: int, global_scale,
                 local_scale, blur_p, solarize_p: float, jitter=JITTER, jitter_p: float = 0.8, gray_p: float = 0.2,
                 dct_scaling: bool = True):
        """Crop settings as in the job's `crops:` (CropsCfg holds their defaults); jitter / jitter_p /
        gray_p are the DINOv2 recipe's fixed colour settings; dct_scaling=False decodes at full size."""
        if n_global < 1:
            raise ValueError("crops.n_global must be >= 1 (DINOv2 uses 2)")
        self.G, self.L, self.n_global, self.n_local = int(global_size), int(local_size), int(n_global), int(n_local)
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.blur_p, self.solarize_p = tuple(blur_p), solarize_p
        self.jitter, self.jitter_p, self.gray_p = tuple(jitter), jitter_p, gray_p
        self.dct_scaling = dct_scaling
        self._tables: dict[tuple[int, int], torch.Tensor] = {}  # resampling weights by (crop size, image side)

    @classmethod
    def from_cfg(cls, crops: dict) -> "MultiCrop":
        """From a `crops` dict (`dataclasses.asdict(CropsCfg())` and overrides), checking its keys."""
        known = set(CROP_KEYS) | {"jitter", "jitter_p", "gray_p", "dct_scaling"}
        unknown, missing = set(crops) - known, set(CROP_KEYS) - set(crops)
        if unknown:
            raise ValueError(f"unknown crops keys {sorted(unknown)}; known: {sorted(known)}")
        if missing:
            raise ValueError(f"crops keys {sorted(missing)} missing; pass every CropsCfg field "
                             f"(dataclasses.asdict of the job's crops)")
        return cls(**crops)

    # ------------------------------------------------------------------------------ geometric
    def plan_images(self, datas: list[bytes], rng: np.random.Generator) -> list:
        """Draw the crops of a batch's images (all at once) and decode each image: per image (uint8 HxWx3,
        boxes [n_crops, 4] as (y0, x0, y1, x1) in the decoded image's pixels, horizontal flips [n_crops]),
        globals first, then locals; or the exception where its header or pixels do not decode (the loader
        skips that sample, `crop_image` raises it)."""
        plans, sizes = [None] * len(datas), {}
        for k, data in enumerate(datas):
            try:
                sizes[k] = image_size(data)
            except Exception as e:  # noqa: BLE001 - any decoder error means a corrupt image
                plans[k] = e
        ok, ng, nl = list(sizes), self.n_global, self.n_local
        hw = np.array([sizes[k] for k in ok], np.int64).reshape(-1, 2)
        boxes = np.concatenate([crop_params(rng, np.repeat(hw, ng, 0), self.global_scale).reshape(len(ok), ng, 4),
                                crop_params(rng, np.repeat(hw, nl, 0), self.local_scale).reshape(len(ok), nl, 4)], 1)
        flips = rng.random((len(ok), ng + nl)) < 0.5
        top, left, h, w = np.moveaxis(boxes, -1, 0)  # [n, n_crops] each
        # smallest decode scale that keeps every crop at >= its output resolution
        need = np.minimum(1.0, np.array([self.G] * ng + [self.L] * nl) / np.minimum(h, w)).max(1)
        factor = np.ones(len(ok), np.int64)
        for _ in range(3 if self.dct_scaling else 0):
            factor = np.where(need * factor * 2 <= 1.0, factor * 2, factor)
        images, decoded = {}, hw.astype(np.float64)  # decoded height, width (the header's where decoding fails)
        for n, k in enumerate(ok):
            H, W = sizes[k]
            try:
                f = int(factor[n])
                img = decode(datas[k], math.ceil(H / f), math.ceil(W / f)) if f > 1 else decode(datas[k])
                if img.ndim != 3 or img.shape[2] != 3:
                    raise ValueError(f"decoded image has shape {img.shape}, expected HxWx3")
                images[n], decoded[n] = img, img.shape[:2]
            except Exception as e:  # noqa: BLE001
                plans[k] = e
        hd, wd = decoded[:, :1], decoded[:, 1:]
        sy, sx = hd / hw[:, :1], wd / hw[:, 1:]
        y0, x0 = np.round(top * sy), np.round(left * sx)
        y1 = np.maximum(y0 + 1, np.minimum(hd, np.round((top + h) * sy)))
        x1 = np.maximum(x0 + 1, np.minimum(wd, np.round((left + w) * sx)))
        pix = np.stack([y0, x0, y1, x1], -1).astype(np.int64)
        for n, k in enumerate(ok):
            if n in images:
                plans[k] = (images[n], pix[n], flips[n])
        return plans

    def resize_crops(self, images: list[np.ndarray], boxes: np.ndarray, flips: np.ndarray
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop + resize (PIL's antialiased bicubic) + flip every planned crop of a batch: images (one per
        sample), boxes [B, n_crops, 4], flips [B, n_crops] -> uint8 ([B, n_global, 3, G, G], [B, n_local, 3,
        L, L]). Images of one small size (CIFAR's 32 x 32) resample all at once by two matrix products;
        others crop by crop with torch's uint8 kernel."""
        ng, shapes = self.n_global, {im.shape for im in images}
        H, W = images[0].shape[:2]
        if len(shapes) == 1 and all(_batched_resampling(s, n) for s in (self.G, self.L) for n in (H, W)):
            x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().contiguous()  # [B, 3, H, W]
            return (self._resample(x, boxes[:, :ng], flips[:, :ng], self.G),
                    self._resample(x, boxes[:, ng:], flips[:, ng:], self.L))
        g = torch.empty(len(images), ng, 3, self.G, self.G, dtype=torch.uint8)
        loc = torch.empty(len(images), self.n_local, 3, self.L, self.L, dtype=torch.uint8)
        for b, img in enumerate(images):
            if not (img.flags.writeable and img.flags.c_contiguous):
                img = np.array(img)  # PIL arrays are read-only
            t = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0)
            for k, ((y0, x0, y1, x1), flip) in enumerate(zip(boxes[b].tolist(), flips[b])):
                s = self.G if k < ng else self.L
                crop = F.interpolate(t[:, :, y0:y1, x0:x1], size=(s, s), mode="bicubic", antialias=True,
                                     align_corners=False)[0]
                (g[b, k] if k < ng else loc[b, k - ng]).copy_(crop.flip(-1) if flip else crop)
        return g, loc

    def _resample(self, x: torch.Tensor, boxes: np.ndarray, flips: np.ndarray, size: int) -> torch.Tensor:
        """x float [B, 3, H, W] (integer values) -> uint8 [B, k, 3, size, size] for boxes / flips [B, k]:
        rows then columns, each a batched matrix product with the crop's weights, rounded to uint8 between
        the two passes as PIL does; a flip reverses the column weights."""
        B, k = boxes.shape[:2]
        n, (_, _, H, W) = B * k, x.shape
        bx = torch.from_numpy(boxes.reshape(n, 4))
        wx = self._table(size, W)[bx[:, 1], bx[:, 3]]  # [n, size, W]
        flip = torch.from_numpy(flips.reshape(n, 1, 1))
        wx = torch.where(flip, wx.flip(1), wx).transpose(1, 2)  # [n, W, size]
        wy = self._table(size, H)[bx[:, 0], bx[:, 2]]  # [n, size, H]
        src = x.repeat_interleave(k, 0).view(n, 3 * H, W)
        rows = torch.bmm(src, wx).round_().clamp_(0, 255).view(n * 3, H, size)
        wy = wy.unsqueeze(1).expand(n, 3, size, H).reshape(n * 3, size, H)
        out = torch.bmm(wy, rows).round_().clamp_(0, 255)
        return out.to(torch.uint8).view(B, k, 3, size, size)

    def _table(self, out: int, size: int) -> torch.Tensor:
        """[size + 1, size + 1, out, size] float32: the weights of every source range [lo, hi), made
        once per (out, size) and kept on this MultiCrop."""
        if (out, size) not in self._tables:
            lo, hi = np.meshgrid(np.arange(size + 1), np.arange(size + 1), indexing="ij")
            ok = hi > lo
            t = np.zeros((size + 1, size + 1, out, size), np.float32)
            t[ok] = _resample_weights(lo[ok], hi[ok], out, size)
            self._tables[(out, size)] = torch.from_numpy(t)
        return self._tables[(out, size)]

    def crop_image(self, data: bytes, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode + crop + resize + flip one image -> (uint8 [n_global,3,G,G], uint8 [n_local,3,L,L])."""
        plan = self.plan_images([data], rng)[0]
        if isinstance(plan, Exception):
            raise plan
        img, boxes, flips = plan
        g, loc = self.resize_crops([img], boxes[None], flips[None])
        return g[0], loc[0]

    # ---------------------------------------------------------------------------- photometric
    def sample_photometric(self, rng: np.random.Generator, n: int, kind: str) -> dict[str, np.ndarray]:
        """Per-crop parameters. kind: 'global1' | 'global2' | 'local'."""
        b, c, s, h = self.jitter
        p = {"jitter": rng.random(n) < self.jitter_p, "perm": rng.integers(0, len(PERMS), n),
             "b": rng.uniform(max(0.0, 1 - b), 1 + b, n), "c": rng.uniform(max(0.0, 1 - c), 1 + c, n),
             "s": rng.uniform(max(0.0, 1 - s), 1 + s, n), "h": rng.uniform(-h, h, n),
             "gray": rng.random(n) < self.gray_p}
        bp = {"global1": self.blur_p[0], "global2": self.blur_p[1], "local": self.blur_p[2]}[kind]
        p["blur"] = rng.random(n) < bp
        p["sigma"] = rng.uniform(0.1, 2.0, n)
        p["solarize"] = (rng.random(n) < self.solarize_p) if kind == "global2" else np.zeros(n, bool)
        return p

    def photometric(self, global_crops: torch.Tensor, local_crops: torch.Tensor, rng: np.random.Generator,
                    device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Colour ops for crop-major batches (uint8 in, uint8 out; crop 0 of all images first)."""
        B = global_crops.shape[0] // self.n_global
        kinds = ["global1"] + ["global2"] * (self.n_global - 1)
        params = [self.sample_photometric(rng, B, k) for k in kinds]
        gp = {k: np.concatenate([p[k] for p in params]) for k in params[0]}
        lp = self.sample_photometric(rng, local_crops.shape[0], "local")
        return apply_photometric(global_crops, gp, device), apply_photometric(local_crops, lp, device)


# ----------------------------------------------------------------------- batched colour kernels

def _gray(x: torch.Tensor) -> torch.Tensor:
    """x: [3, m, H, W] float -> [m, H, W] (ITU-R 601 luma, as PIL convert("L") / torchvision)."""
    w = torch.tensor(GRAY, dtype=x.dtype, device=x.device).view(1, 3)
    return torch.matmul(w, x.reshape(3, -1)).view(x.shape[1:])


def _brightness(x, f):
    return x.mul_(f.view(1, -1, 1, 1)).clamp_(0, 255)


def _contrast(x, f):
    w = torch.tensor(GRAY, dtype=x.dtype, device=x.device).view(3, 1)
    mean = (x.mean(dim=(2, 3)) * w).sum(0).round_().view(1, -1, 1, 1)  # mean of the uint8 gray image
    f = f.view(1, -1, 1, 1)
    return x.mul_(f).add_(mean * (1 - f)).clamp_(0, 255)


def _saturation(x, f):
    f = f.view(1, -1, 1, 1)
    gray = _gray(x).unsqueeze(0) * (1 - f)  # before x changes in place
    return x.mul_(f).add_(gray).clamp_(0, 255)


_HSV_N = (5.0, 3.0, 1.0)  # hsv2rgb offsets of r, g, b


def _hue(x, f):
    """HSV hue rotation (torchvision adjust_hue) without branches. x holds integer values 0..255."""
    x.round_()  # PIL/torchvision work on uint8 between ops; also makes the max-channel test exact
    r, g, b = x[0], x[1], x[2]
    maxc = x.amax(0)
    c = maxc - x.amin(0)
    ir = (r - maxc).add_(1).clamp_(0, 1)  # 1 where r is the max channel
    ig = (g - maxc).add_(1).clamp_(0, 1).mul_(1 - ir)  # g is max (and r is not)
    ib = 1 - ir - ig
    # hue in sextants: (g-b)/c | 2+(b-r)/c | 4+(r-g)/c, shifted by 6f, as turns + 1 (positive for frac)
    h = ir * (g - b)
    h.addcmul_(ig, (b - r).add_(c, alpha=2)).addcmul_(ib, (r - g).add_(c, alpha=4))
    h.mul_(c.clamp(min=1.0).reciprocal_()).add_(6 * f.view(-1, 1, 1) + 6).div_(6)
    n = torch.tensor(_HSV_N, dtype=x.dtype, device=x.device).view(3, 1, 1, 1) / 6
    k = (h.unsqueeze(0) + n).frac_().sub_(1 / 3).abs_().mul_(-6).add_(2).clamp_(0, 1)  # hsv2rgb triangle
    return torch.addcmul(maxc.unsqueeze(0), c.unsqueeze(0), k, value=-1, out=x)


def _solarize(x):
    s = (x - 127).clamp_(0, 1)  # 1 where x >= 128 (integer-valued x)
    return x.addcmul_(s, 255 - 2 * x)


def _blur(x, sigma):
    """Separable 9-tap Gaussian per crop (torchvision GaussianBlur(kernel_size=9)), reflect padding."""
    m = x.shape[1]
    t = torch.arange(-4, 5, dtype=torch.float32)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    k = k / k.sum(1, keepdim=True)  # [m, 9]
    for dim in (3, 2):
        xp = F.pad(x, (4, 4, 0, 0) if dim == 3 else (0, 0, 4, 4), mode="reflect")
        n = x.shape[dim]
        out = xp.narrow(dim, 0, n) * k[:, 0].view(1, m, 1, 1)
        for tap in range(1, 9):
            out.addcmul_(xp.narrow(dim, tap, n), k[:, tap].view(1, m, 1, 1))
        x = out
    return x


_OPS = (_brightness, _contrast, _saturation, _hue)


def _on_subset(x: torch.Tensor, mask: np.ndarray, fn) -> None:
    """x[:, mask] = fn(x[:, mask], index) for x [3, n, S, S], in place; skips empty subsets."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return
    if idx.size == x.shape[1]:
        x.copy_(fn(x, torch.arange(x.shape[1], device=x.device)))
        return
    ii = torch.as_tensor(idx, device=x.device)
    x.index_copy_(1, ii, fn(x.index_select(1, ii), ii))


CHUNK_BYTES = 4 << 20  # 4 MiB of float32 per chunk: the ~50 passes of the colour ops stay in cache


def apply_photometric(crops: torch.Tensor, p: dict[str, np.ndarray], device=None) -> torch.Tensor:
    """Apply per-crop jitter/gray/blur/solarize described by `p` to uint8 crops [n, 3, S, S]."""
    n = crops.shape[0]
    if n == 0:
        return crops
    dev = crops.device if device is None else torch.device(device)
    chunk = n if dev.type != "cpu" else max(1, CHUNK_BYTES // (3 * crops.shape[2] * crops.shape[3] * 4))
    out = torch.empty_like(crops, device=dev)
    for lo in range(0, n, chunk):
        sl = slice(lo, min(n, lo + chunk))
        x = crops[sl].to(dev, non_blocking=True).permute(1, 0, 2, 3).float().contiguous()  # [3, m, S, S]
        out[sl] = _photometric_chunk(x, {k: v[sl] for k, v in p.items()}).permute(1, 0, 2, 3)
    return out


def _photometric_chunk(x: torch.Tensor, p: dict[str, np.ndarray]) -> torch.Tensor:
    f32 = {k: torch.as_tensor(p[k], dtype=torch.float32, device=x.device) for k in ("b", "c", "s", "h", "sigma")}
    factors = (f32["b"], f32["c"], f32["s"], f32["h"])
    jittered = p["jitter"]
    # position by position: the crops whose order puts op o at this position run o together (at most 16
    # batched calls per chunk; grouping by whole order took up to 24 x 4). Each crop still sees its own order.
    for position in range(4):
        op_here = PERM_TABLE[p["perm"], position]
        for op in np.unique(op_here[jittered]):
            _on_subset(x, jittered & (op_here == op), lambda sub, ii, op=int(op): _OPS[op](sub, factors[op][ii]))
    _on_subset(x, p["gray"], lambda sub, ii: _gray(sub.round_()).unsqueeze(0).expand(3, -1, -1, -1))
    _on_subset(x, p["blur"], lambda sub, ii: _blur(sub.round_(), f32["sigma"][ii]))
    _on_subset(x, p["solarize"], lambda sub, ii: _solarize(sub.round_().clamp_(0, 255)))
    return x.round_().clamp_(0, 255).to(torch.uint8)
