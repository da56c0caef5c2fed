"""FSDP2 warns when a wrapped module's forward returns a view ("returned a view tensor ... will silently
drop the pre-backward hook"): an in-place op on such a view skips the all-gather. Our backbone's
`forward_features` (an FSDP2 forward method) used to return slices of its normed tokens; it now norms
each slice, so no FSDP2 unit returns a view. Two gloo ranks, one forward/backward, warnings recorded.

    flock /tmp/dinoray-heavy.lock .venv/bin/python -m pytest tests/test_fsdp_views.py -q
"""
from __future__ import annotations

import warnings

import pytest
import torch

import model as dmodel
from test_backends import spawn, tiny_job

pytestmark = [pytest.mark.slow]


def _step_warnings(rank, world, kind):
    from orchestrator.training import backends, setup
    from orchestrator.pipeline import config
    job = tiny_job("fsdp2", num_workers=world)
    r = config.resolve(job, "pretrain")
    meta = setup.build_meta(job, r, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = backends.build(meta, job, torch.device("cpu"), r.optim)
        batch = next(iter(setup.make_loader(job, r, rank, world, None)))
        b.zero_grad()
        loss, _ = b.forward(batch, teacher_temp=0.04)
        b.backward(loss)
        b.step(3.0)
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def test_fsdp2_forward_backward_emits_no_view_warning():
    for rank, caught in enumerate(spawn(_step_warnings, 2, "pretrain")):
        views = [w for w in caught if "view tensor" in w]
        assert not views, f"rank {rank}: {views}"


def test_backbone_outputs_are_not_views_and_equal_the_old_slices():
    torch.manual_seed(0)
    net = dmodel.build_backbone(arch="vit_pico", img_size=32, patch_size=8, num_register_tokens=2)
    x = torch.randn(3, 3, 32, 32)
    out = net.forward_features(x)
    normed = net.norm(out["x_prenorm"])  # the old outputs: slices of one normed tensor
    for key, old in (("x_norm_clstoken", normed[:, 0]), ("x_norm_regtokens", normed[:, 1:3]),
                     ("x_norm_patchtokens", normed[:, 3:])):
        assert out[key]._base is None, f"{key} is a view"
        assert torch.equal(out[key], old), key
