"""Sharded checkpoints on any Store (local or fsspec), with a commit marker, retention and async save.

Layout under a phase folder (orchestrator/layout.py `PhaseDir`, which names every path):

    checkpoints/step-0000100/            one checkpoint
        .metadata, __0_0.distcp, ...     DCP shards (fsdp2, ddp): any world size can load them
        <tag>/..., teacher_fp32-rank<r>.pt   DeepSpeed's own files (deepspeed) + fp32 EMA partitions
        rank-<r>.pt                      per-rank extras: step, loader state, RNG, counters, config hash
        COMMITTED                        JSON, written LAST by rank 0 once every rank has finished
    final/model.pth, final/backbone.pth, final/DONE   consolidated export (see `export_final`)

A checkpoint counts only when COMMITTED exists; `latest()` ignores the rest. With async save (DCP
only), the training thread pays for staging the shards to host memory (the "stall"); the writes run
in a background thread on a separate gloo group, and rank 0 writes COMMITTED when DCP's finish step
(which waits for every rank) is done. Retention keeps the last `keep_last` committed checkpoints.

No entrypoint; exercised by `.venv/bin/python -m pytest tests/test_checkpoint.py -q`.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist

from orchestrator.layout import PhaseDir
from orchestrator.storage import Store


def list_steps(phase: PhaseDir) -> dict[int, bool]:
    """{step: committed} for every checkpoint folder of the phase."""
    out = {}
    for name in phase.checkpoints.ls():
        step = PhaseDir.parse_step(name)
        if step is not None:
            out[step] = PhaseDir.committed(phase.checkpoints / name).exists()
    return out


def latest(phase: PhaseDir) -> tuple[int, Store] | None:
    """(step, location) of the newest committed checkpoint; incomplete ones are ignored."""
    done = sorted(s for s, ok in list_steps(phase).items() if ok)
    return (done[-1], phase.checkpoint(done[-1])) if done else None


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _load_torch(store: Store) -> object:
    return torch.load(io.BytesIO(store.read_bytes()), map_location="cpu", weights_only=True)


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


class Checkpointer:
    """Save/load one phase's checkpoints for a `backends.Backend`. Every method is collective."""

    def __init__(self, backend, phase: PhaseDir, *, keep_last: int = 3, async_save: bool = True,
                 on_commit=None):
        """`keep_last`: committed checkpoints kept. `on_commit(step)`: called on every rank after each
        commit; when given, it registers the checkpoint with Ray Train, whose num_to_keep then retains
        the committed checkpoints (this class only removes crashed saves' leftovers)."""
        self.backend, self.phase = backend, phase
        self.keep_last, self.on_commit = keep_last, on_commit
        self.last_committed: int | None = None  # step of this process's last commit (equal on every rank)
        self.rank, self.world = backend.rank, backend.world
        self.dcp = backend.kind in ("fsdp2", "ddp")
        self.async_save = async_save and self.dcp
        self._pending = None   # (step, location, future, t0) of an async save not yet committed
        self.last_async_s = None
        self._pg = None
        if self.async_save and self.world > 1:
            self._pg = dist.new_group(backend="gloo")  # background writes never share the training group

    # ------------------------------------------------------------------ save
    def save(self, step: int, extras: dict) -> dict:
        """Start (async) or do (sync) a save of the current state at `step`. Returns timings:
        stall_s (time the training thread was blocked) and save_s (sync: whole save)."""
        t0 = time.perf_counter()
        self.wait()                      # at most one save in flight
        ckpt = self.phase.checkpoint(step)
        if self.rank == 0 and ckpt.exists():   # leftovers of a crashed attempt at the same step
            ckpt.rm(recursive=True)
        self._barrier()
        extras = {**extras, "step": step, "world_size": self.world, "backend": self.backend.kind,
                  "rng": rng_state()}
        PhaseDir.rank_extras(ckpt, self.rank).write_bytes(_torch_bytes(extras))
        if self.dcp:
            self._save_dcp(ckpt, step)
        else:
            self._save_deepspeed(ckpt, step)
            self._commit(step, ckpt)
        stall = time.perf_counter() - t0
        return {"stall_s": stall, "save_s": None if self._pending else stall}

    def _dcp_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(self.backend.meta, self.backend.optimizer)
        return {"model": msd, "optim": osd}

    def _save_dcp(self, ckpt: Store, step: int) -> None:
        """DCP's planner and layout, raw bytes per rank file (`ckpt_io.RawWriter`). Async: the copy to
        host buffers runs in the background too; the optimiser's next step waits for it (`ckpt_io.Stager`)."""
        import torch.distributed.checkpoint as dcp
        from orchestrator.training import ckpt_io
        state = self._dcp_state()
        writer, planner = ckpt_io.RawWriter(ckpt), ckpt_io.planner()
        if self.async_save:
            if getattr(self, "_stager", None) is None:  # one per Checkpointer: its host buffers are reused
                self._stager = ckpt_io.Stager(self.backend.optimizer)
            state = ckpt_io.snapshot_buffers(state, self.backend.meta)
            resp = dcp.async_save(state, storage_writer=writer, planner=planner, process_group=self._pg,
                                  async_stager=self._stager.dcp)
            self._stager.started(resp.staging_completion)
            self._pending = (step, ckpt, resp.upload_completion, time.perf_counter())
        else:
            dcp.save(state, storage_writer=writer, planner=planner)
            self._barrier()
            self._commit(step, ckpt)

    def _save_deepspeed(self, ckpt: Store, step: int) -> None:
        """DeepSpeed writes {base}/{tag}/: in place when local, else into a staging folder that each
        rank uploads (the files it wrote) and removes."""
        tag = PhaseDir.checkpoint_tag(step)
        base, staged = self.phase.checkpoints.staging_dir(prefix="ds-")
        try:
            self.backend.engine.save_checkpoint(base, tag=tag, save_latest=False)
            teacher = [t.cpu() for t in self.backend.teacher_fp32]
            torch.save(teacher, os.path.join(base, tag, PhaseDir.teacher_fp32_name(self.rank)))
            if staged:
                ckpt.upload_dir(os.path.join(base, tag))
        finally:
            if staged:
                shutil.rmtree(base, ignore_errors=True)
        self._barrier()

    def poll(self) -> int | None:
        """Non-blocking: commit an async save whose writes have finished; returns its step."""
        if self._pending is None:
            return None
        fut = self._pending[2]
        done = torch.tensor([1 if fut.done() else 0])
        if self.world > 1:  # every rank must agree before the marker is written
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if not done.item():
            return None
        return self._finish_pending()

    def wait(self) -> int | None:
        """Block until the in-flight async save (if any) is committed; returns its step."""
        if self._pending is None:
            return None
        self._pending[2].result()
        self._barrier()
        return self._finish_pending()

    def _finish_pending(self) -> int:
        step, ckpt, fut, t0 = self._pending
        fut.result()  # re-raises a failed background write
        self._pending = None
        self._commit(step, ckpt)
        self.last_async_s = time.perf_counter() - t0
        return step

    def _commit(self, step: int, ckpt: Store) -> None:
        if self.rank == 0:
            info = {"step": step, "world_size": self.world, "backend": self.backend.kind, "time": time.time()}
            PhaseDir.committed(ckpt).write_bytes(json.dumps(info).encode())
            self._retain(step)
        self._barrier()
        self.last_committed = step
        if self.on_commit is not None:
            self.on_commit(step)

    def _retain(self, newest: int) -> None:
        """Drop the leftovers of crashed saves (uncommitted, older than `newest`) and, unless Ray Train
        retains them (`on_commit`), committed checkpoints beyond the last `keep_last`. Never both: Ray
        fails the run when a folder it retains is gone before it removes it."""
        steps = list_steps(self.phase)
        done = sorted(s for s, ok in steps.items() if ok)
        old = done[:-self.keep_last] if self.on_commit is None else []
        drop = old + [s for s, ok in steps.items() if not ok and s < newest]
        for step in drop:
            ckpt = self.phase.checkpoint(step)
            if step in done:  # un-commit first so a concurrent reader never sees a half-deleted one
                PhaseDir.committed(ckpt).rm()
            ckpt.rm(recursive=True)

    @property
    def fence_s(self) -> float:
        """Training-thread seconds spent so far waiting for async staging copies (before optimiser steps)."""
        stager = getattr(self, "_stager", None)
        return stager.fence_s if stager is not None else 0.0

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # ------------------------------------------------------------------ load
    def load(self, ckpt: Store) -> dict:
        """Load weights, optimiser and teacher state; returns this rank's extras (rank 0's when the
        checkpoint was written by a different world size: DCP reshards, the loader state is global)."""
        info = PhaseDir.committed(ckpt).read_json()
        if info["backend"] != self.backend.kind:
            raise RuntimeError(f"{ckpt.url}: written by backend '{info['backend']}', this run uses "
                               f"'{self.backend.kind}'; resume with the same backend or start a new run name")
        if self.dcp:
            self._load_dcp(ckpt)
        else:
            if info["world_size"] != self.world:
                raise RuntimeError(f"{ckpt.url}: DeepSpeed checkpoint of {info['world_size']} ranks cannot be "
                                   f"loaded by {self.world}; use backend fsdp2 to change the world size")
            self._load_deepspeed(ckpt, info["step"])
        rank = self.rank if info["world_size"] == self.world else 0
        extras = _load_torch(PhaseDir.rank_extras(ckpt, rank))
        extras["resharded"] = info["world_size"] != self.world
        self._barrier()
        return extras

    def _load_dcp(self, ckpt: Store) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict
        from orchestrator.training import ckpt_io
        if getattr(self, "_stager", None) is not None:
            self._stager.fence()  # never load into tensors a background copy is still reading
        state = self._dcp_state()
        dcp.load(state, storage_reader=ckpt_io.RawReader(ckpt))
        set_state_dict(self.backend.meta, self.backend.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def _load_deepspeed(self, ckpt: Store, step: int) -> None:
        tag = PhaseDir.checkpoint_tag(step)
        base, staged = self.phase.checkpoints.staging_dir(prefix="ds-")
        try:
            if staged:
                ckpt.download_dir(os.path.join(base, tag))
            self.backend.engine.load_checkpoint(base, tag=tag, load_lr_scheduler_states=False)
            teacher = torch.load(os.path.join(base, tag, PhaseDir.teacher_fp32_name(self.rank)),
                                 map_location="cpu", weights_only=True)
            for dst, src in zip(self.backend.teacher_fp32, teacher):
                dst.copy_(src)
            self.backend.sync_teacher_()
        finally:
            if staged:
                shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------- consolidated export
def export_final(backend, phase: PhaseDir, backbone_prefix: str, info: dict | None = None) -> None:
    """Write the phase's final model (every tower: backbones, heads, centres) and final backbone (the
    tower's backbone under `backbone_prefix`, in dinov2 key names), then the DONE marker (JSON `info`).

    Streamed: one parameter is gathered at a time; rank 0 writes it into its own file-backed
    (mmap) storage, so anonymous memory never holds more than one full tensor. torch.save then reads
    those pages back while writing each .pth, which is then committed to the phase's final folder."""
    rank = backend.rank
    tmp = tempfile.mkdtemp(prefix="dinoray-export-") if rank == 0 else None
    try:
        full: dict[str, torch.Tensor] = {}
        for i, (name, t) in enumerate(backend.full_tensors()):
            if rank != 0:
                continue
            t = t.contiguous()
            if t.numel() == 0:
                full[name] = t.clone()
                continue
            mapped = torch.from_file(os.path.join(tmp, f"{i}.bin"), shared=True, size=t.numel(), dtype=t.dtype)
            mapped.copy_(t.reshape(-1))
            full[name] = mapped.view(t.shape)
            del t
        if rank == 0:
            bb = {k[len(backbone_prefix):]: v for k, v in full.items() if k.startswith(backbone_prefix)}
            if not bb:
                raise RuntimeError(f"export: no tensor under '{backbone_prefix}' (have e.g. {list(full)[:3]})")
            for dest, obj in ((phase.final_model, full), (phase.final_backbone, bb)):
                path = os.path.join(tmp, dest.name)
                torch.save(obj, path)
                dest.put_file(path)
            phase.final_done.write_bytes(json.dumps(info or {}).encode())
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if backend.world > 1:
        dist.barrier()


def final_info(phase: PhaseDir) -> dict | None:
    """The DONE record of a finished phase, or None while its final folder is incomplete."""
    return phase.final_done.read_json()


def load_consolidated(store: Store) -> dict:
    """A final model.pth or backbone.pth as a state dict (memory-mapped when local)."""
    if store.is_local:
        return torch.load(store.local_path, map_location="cpu", weights_only=True, mmap=True)
    return torch.load(io.BytesIO(store.read_bytes()), map_location="cpu", weights_only=True)
