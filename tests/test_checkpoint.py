"""Checkpoint bookkeeping (fast, no Ray): commit marker, incomplete checkpoints, retention, export;
the raw DCP writer/reader (exact round trips, local and S3; crash mid-save; async save-step state).

    .venv/bin/python -m pytest tests/test_checkpoint.py -q
"""
from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

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


# ------------------------------------------------------------------ raw DCP I/O (ckpt_io)
class _TinyBackend:
    """A one-rank 'ddp' backend (no process group): DCP state through the real Checkpointer."""
    kind, rank, world = "ddp", 0, 1

    def __init__(self):
        torch.manual_seed(0)
        self.meta = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5)).to(torch.float32)
        self.meta.register_buffer("center", torch.zeros(1, 5))
        self.optimizer = torch.optim.AdamW(self.meta.parameters(), lr=0.1)
        self.train_step()

    def train_step(self):
        self.meta.center += 1.0                      # a buffer that moves in forward
        self.meta(torch.randn(3, 6)).square().sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def state(self):
        sd = {f"m.{k}": v.clone() for k, v in self.meta.state_dict().items()}
        for i, s in self.optimizer.state.items():
            sd.update({f"o.{i}.{k}": v.clone() for k, v in s.items()})
        return sd


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_raw_dcp_round_trip_is_exact_for_every_dtype_and_layout(tmp_path):
    import torch.distributed.checkpoint as dcp
    from orchestrator.training import ckpt_io
    g = torch.Generator().manual_seed(1)
    src = {"f32": torch.randn(7, 3, generator=g), "bf16": torch.randn(4, 4, generator=g).bfloat16(),
           "strided": torch.randn(6, 4, generator=g).t(), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 2),
           "i64": torch.arange(5), "flag": torch.tensor([True, False]), "obj": {"lr": 0.1, "name": "x"}}
    dcp.save(src, storage_writer=ckpt_io.RawWriter(Store(str(tmp_path))), no_dist=True)
    dst = {k: (torch.empty_like(v) if isinstance(v, torch.Tensor) else {"lr": 0.0, "name": ""}) for k, v in src.items()}
    dcp.load(dst, storage_reader=ckpt_io.RawReader(Store(str(tmp_path))), no_dist=True)
    assert dst["obj"] == src["obj"]
    assert all(torch.equal(dst[k], v) and dst[k].dtype == v.dtype for k, v in src.items() if k != "obj")
    # the stock reader refuses raw files rather than misreading them
    with pytest.raises(CheckpointException) as refused:     # a BaseException
        dcp.load({"f32": torch.empty(7, 3)}, storage_reader=dcp.FileSystemReader(str(tmp_path)), no_dist=True)
    assert "dinoray-raw" in str(refused.getrepr())
    # checkpoints in DCP's own format (written before ckpt_io) still load
    dcp.save({"f32": src["f32"]}, storage_writer=dcp.FileSystemWriter(str(tmp_path / "stock")), no_dist=True)
    old = {"f32": torch.empty(7, 3)}
    dcp.load(old, storage_reader=ckpt_io.RawReader(Store(str(tmp_path / "stock"))), no_dist=True)
    assert torch.equal(old["f32"], src["f32"])


def test_half_written_checkpoint_is_never_loaded_and_async_saves_the_save_step(tmp_path, monkeypatch):
    from orchestrator.training import ckpt_io
    phase = _dir(tmp_path)
    b = _TinyBackend()
    sync = checkpoint.Checkpointer(b, phase, keep_last=5, async_save=False)
    sync.save(1, {"marker": 1})
    at_1 = b.state()
    b.train_step()
    real = ckpt_io.RawWriter.write_data

    def crash(self, plan, planner):          # the rank file is written, then the process "dies"
        real(self, plan, planner)
        raise OSError("killed mid-save")
    monkeypatch.setattr(ckpt_io.RawWriter, "write_data", crash)
    with pytest.raises(CheckpointException) as killed:
        sync.save(2, {"marker": 2})
    assert "killed mid-save" in str(killed.getrepr())
    monkeypatch.undo()
    assert checkpoint.list_steps(phase) == {1: True, 2: False}
    step, ckpt = checkpoint.latest(phase)
    assert step == 1 and sync.load(ckpt)["marker"] == 1 and _equal(b.state(), at_1)
    # async: training goes on while the write runs; the saved state is the one at the save step
    asyn = checkpoint.Checkpointer(b, phase, keep_last=5, async_save=True)
    b.train_step()
    at_3 = b.state()
    asyn.save(3, {"marker": 3})
    b.train_step()                           # the optimiser waits for the staging copy, not the write
    assert not _equal(b.state(), at_3)
    assert asyn.wait() == 3
    assert asyn.load(checkpoint.latest(phase)[1])["marker"] == 3 and _equal(b.state(), at_3)


@pytest.mark.s3
def test_raw_dcp_round_trip_on_s3_multipart_and_single_put(s3_server, monkeypatch):
    import torch.distributed.checkpoint as dcp
    from orchestrator.training import ckpt_io
    monkeypatch.setattr(ckpt_io, "PART", 5 * 2 ** 20)      # 12 MB: a 3-part upload cut from tensor memory
    for name, n in (("multipart", 3_000_000), ("single", 100)):
        src = {"w": torch.randn(n, generator=torch.Generator().manual_seed(2)), "h": torch.ones(3).bfloat16(),
               "opt": {"lr": 0.5}}
        store = Store(f"s3://{s3_server['bucket']}/ckpt-io/{name}")
        dcp.save(src, storage_writer=ckpt_io.RawWriter(store), no_dist=True)
        dst = {"w": torch.empty(n), "h": torch.empty(3, dtype=torch.bfloat16), "opt": {"lr": 0.0}}
        dcp.load(dst, storage_reader=ckpt_io.RawReader(store), no_dist=True)
        assert torch.equal(dst["w"], src["w"]) and torch.equal(dst["h"], src["h"]) and dst["opt"] == {"lr": 0.5}
        assert (store / "__0_0.distcp").size() >= 4 * n
