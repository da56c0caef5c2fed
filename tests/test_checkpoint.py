"""Checkpoint bookkeeping (fast, no Ray): commit marker, incomplete checkpoints, retention, export.

    .venv/bin/python -m pytest tests/test_checkpoint.py -q
"""
from __future__ import annotations

import json

import pytest
import torch

from orchestrator.layout import PhaseDir
from orchestrator.storage import Store
from orchestrator.training import checkpoint


def _dir(path) -> PhaseDir:
    return PhaseDir(Store(str(path)))


def _fake(run, step, committed=True):
    ckpt = _dir(run).checkpoint(step)
    PhaseDir.rank_extras(ckpt, 0).write_bytes(b"x")
    if committed:
        PhaseDir.committed(ckpt).write_bytes(json.dumps({"step": step}).encode())
    return ckpt


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    assert checkpoint.latest(_dir(tmp_path)) is None
    _fake(tmp_path, 10)
    _fake(tmp_path, 20)
    _fake(tmp_path, 30, committed=False)      # a crash during the save of step 30
    (tmp_path / "checkpoints" / "junk").mkdir()
    step, ckpt = checkpoint.latest(_dir(tmp_path))
    assert step == 20 and ckpt.url.endswith("checkpoints/step-0000020")
    assert checkpoint.list_steps(_dir(tmp_path)) == {10: True, 20: True, 30: False}


class _FakeBackend:
    kind, rank, world = "fsdp2", 0, 1


def test_retention_keeps_last_n_and_drops_stale_incomplete(tmp_path):
    for s in (1, 2, 3):
        _fake(tmp_path, s)
    _fake(tmp_path, 4, committed=False)       # stale: older than the newest commit
    _fake(tmp_path, 9, committed=False)       # newer: maybe still being written, keep
    _fake(tmp_path, 5)
    ckpts = checkpoint.Checkpointer(_FakeBackend(), _dir(tmp_path), keep_last=2, async_save=False)
    ckpts._retain(5)
    assert checkpoint.list_steps(_dir(tmp_path)) == {3: True, 5: True, 9: False}


class _ExportBackend:
    rank, world = 0, 1

    def __init__(self, tensors):
        self.tensors = tensors

    def full_tensors(self):
        yield from self.tensors.items()


def test_export_streams_to_model_and_backbone_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"teacher.backbone.pos_embed": torch.randn(1, 5, 4, generator=g),
               "teacher.backbone.blocks.0.w": torch.randn(4, 4, generator=g).bfloat16(),
               "student.backbone.pos_embed": torch.randn(1, 5, 4, generator=g),
               "dino_centering.center": torch.zeros(0)}
    checkpoint.export_final(_ExportBackend(tensors), _dir(tmp_path), "teacher.backbone.", info={"step": 3})
    model = torch.load(tmp_path / "final" / "model.pth", weights_only=True)
    bb = torch.load(tmp_path / "final" / "backbone.pth", weights_only=True)
    assert model.keys() == tensors.keys() and all(torch.equal(model[k], v) for k, v in tensors.items())
    assert set(bb) == {"pos_embed", "blocks.0.w"} and bb["blocks.0.w"].dtype == torch.bfloat16
    assert checkpoint.final_info(_dir(tmp_path)) == {"step": 3}


def test_export_refuses_a_missing_backbone_prefix(tmp_path):
    with pytest.raises(RuntimeError, match="no tensor under 'teacher.backbone.'"):
        checkpoint.export_final(_ExportBackend({"x": torch.ones(1)}), _dir(tmp_path / "f"), "teacher.backbone.")
    assert checkpoint.final_info(_dir(tmp_path / "f")) is None
