"""Copy-detection edits (orchestrator/data/edits.py) on real CIFAR-10 JPEGs: deterministic, in range."""
from __future__ import annotations

import tarfile

import numpy as np
import pytest

from conftest import CIFAR_TEST_TAR
from orchestrator.data import edits


@pytest.fixture(scope="module")
def jpeg():
    with tarfile.open(CIFAR_TEST_TAR) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(".jpg"))
        return tf.extractfile(member).read()


def test_each_edit_is_seeded_and_changes_the_image(jpeg):
    src = np.asarray(edits.decode(jpeg), dtype=np.float32)
    for name, fn in edits.EDITS.items():
        out = fn(jpeg, np.random.default_rng(3))
        assert out[:3] == b"\xff\xd8\xff", name
        assert out == fn(jpeg, np.random.default_rng(3)), f"{name} is not deterministic"
        img = np.asarray(edits.decode(out), dtype=np.float32)
        assert img.shape != src.shape or np.abs(img - src).mean() > 0.5, f"{name} left the image unchanged"


def test_crop_and_resize_ranges(jpeg):
    w = edits.decode(jpeg).size[0]
    for seed in range(20):
        side = edits.decode(edits.crop(jpeg, np.random.default_rng(seed))).size[0]
        assert round(w * 0.7) <= side <= round(w * 0.9)
        side = edits.decode(edits.resize(jpeg, np.random.default_rng(seed))).size[0]
        assert round(w * 0.75) <= side <= round(w * 1.5)


def test_flip_mirrors(jpeg):
    src = np.asarray(edits.decode(jpeg), dtype=np.float32)
    out = np.asarray(edits.decode(edits.flip(jpeg, np.random.default_rng(0))), dtype=np.float32)
    assert np.abs(out - src[:, ::-1]).mean() < np.abs(out - src).mean()


def test_copy_edit_rejects_unknown_names(jpeg):
    with pytest.raises(ValueError, match="unknown copy edits.*blur"):
        edits.copy_edit(jpeg, np.random.default_rng(0), ("crop", "blur"))
    a = edits.random_copy(jpeg, np.random.default_rng(5))
    assert a == edits.random_copy(jpeg, np.random.default_rng(5))
