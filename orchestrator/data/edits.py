"""Copy-detection edits: the transformations a near-duplicate detector must see through.

Each edit takes JPEG (or any PIL-readable) bytes and a seeded `numpy.random.Generator` and returns
edited JPEG bytes; the same bytes and generator state give the same output. Used to plant copies in
the curation tests and benchmark (orchestrator/curate, issue 12) and in the copy-detection retrieval
evaluation (orchestrator/eval).

    crop        keep a random 70-90% of each side, at a random position (the issue's "crop 70-90%")
    resize      rescale to 75-150% of the side lengths (bicubic)
    quality     re-encode as JPEG with quality 30-70
    jitter      colour jitter: brightness, contrast, saturation each x[0.7, 1.3]
    flip        horizontal flip (always; the random choice is whether to apply it, see `random_copy`)

`copy_edit(data, rng)` applies all five in that order with one decode and one final encode (at a
random quality in 30-70), which is what a planted copy is. No entrypoint.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

CROP_RANGE = (0.7, 0.9)      # fraction of each side kept (issue 12: crop 70-90%)
RESIZE_RANGE = (0.75, 1.5)   # output side / input side
QUALITY_RANGE = (30, 70)     # JPEG quality (issue 12: 30-70), inclusive
JITTER = 0.3                 # brightness/contrast/saturation factors drawn from [1 - JITTER, 1 + JITTER]
ORDER = ("crop", "resize", "jitter", "flip", "quality")


def decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def encode(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def _crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    frac = rng.uniform(*CROP_RANGE)
    cw, ch = max(1, round(w * frac)), max(1, round(h * frac))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((left, top, left + cw, top + ch))


def _resize(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    scale = rng.uniform(*RESIZE_RANGE)
    w, h = img.size
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)


def _jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(rng.uniform(1 - JITTER, 1 + JITTER))
    return img


def _flip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.mirror(img)


def _quality(rng: np.random.Generator) -> int:
    return int(rng.integers(QUALITY_RANGE[0], QUALITY_RANGE[1] + 1))


_IMAGE_EDITS = {"crop": _crop, "resize": _resize, "jitter": _jitter, "flip": _flip}


def _one(name: str):
    def edit(data: bytes, rng: np.random.Generator) -> bytes:
        if name == "quality":
            return encode(decode(data), _quality(rng))
        return encode(_IMAGE_EDITS[name](decode(data), rng))
    edit.__name__ = name
    edit.__doc__ = f"The `{name}` copy-detection edit alone: JPEG bytes in, JPEG bytes out (see the module doc)."
    return edit


crop, resize, jitter, flip, quality = (_one(n) for n in ORDER)
EDITS = {"crop": crop, "resize": resize, "jitter": jitter, "flip": flip, "quality": quality}


def copy_edit(data: bytes, rng: np.random.Generator, edits: tuple[str, ...] = ORDER) -> bytes:
    """Apply `edits` (names from ORDER, applied in ORDER's order) with one decode and one encode.
    The final JPEG quality is drawn from QUALITY_RANGE when "quality" is among them, else 95."""
    unknown = sorted(set(edits) - set(ORDER))
    if unknown:
        raise ValueError(f"unknown copy edits {unknown}; known: {list(ORDER)}")
    img = decode(data)
    for name in ORDER:
        if name in edits and name != "quality":
            img = _IMAGE_EDITS[name](img, rng)
    return encode(img, _quality(rng) if "quality" in edits else 95)


def random_copy(data: bytes, rng: np.random.Generator, flip_p: float = 0.5) -> bytes:
    """A planted copy: crop, resize, jitter, JPEG quality 30-70 always; horizontal flip with prob. flip_p."""
    names = tuple(n for n in ORDER if n != "flip" or rng.random() < flip_p)
    return copy_edit(data, rng, names)
