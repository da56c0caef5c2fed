"""Sharded checkpoints on any fsspec URL, with a commit marker, retention and async save.

Layout under a run directory `{storage}/{job}/{runkey}/`:

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
import re
import shutil
import tempfile
import time

import torch
import torch.distributed as dist

from orchestrator.storage import atomic_put_file, atomic_write_bytes, fs_for, join, protocol_of, storage_options_for

MARKER = "COMMITTED"
DONE = "DONE"
_STEP_RE = re.compile(r"step-(\d{7,})$")


def step_url(run_url: str, step: int) -> str:
    return join(run_url, "checkpoints", f"step-{step:07d}")


def _exists(url: str, so) -> bool:
    fs, path = fs_for(url, so)
    return fs.exists(path)


def _read_json(url: str, so) -> dict:
    fs, path = fs_for(url, so)
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def list_steps(run_url: str, so=None) -> dict[int, bool]:
    """{step: committed} for every checkpoint folder under run_url/checkpoints."""
    fs, root = fs_for(join(run_url, "checkpoints"), so)
    try:
        fs.invalidate_cache()
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return {}
    out = {}
    for e in entries:
        m = _STEP_RE.search(e.rstrip("/"))
        if m:
            out[int(m.group(1))] = fs.exists(e.rstrip("/") + "/" + MARKER)
    return out


def latest(run_url: str, so=None) -> tuple[int, str] | None:
    """(step, url) of the newest committed checkpoint; incomplete ones are ignored."""
    done = sorted(s for s, ok in list_steps(run_url, so).items() if ok)
    return (done[-1], step_url(run_url, done[-1])) if done else None


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _load_torch(url: str, so) -> object:
    fs, path = fs_for(url, so)
    with fs.open(path, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


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
    """Save/load one run's checkpoints for a `backends.Backend`. Every method is collective."""

    def __init__(self, backend, run_url: str, *, storage_options=None, keep_last: int = 3,
                 async_save: bool = True):
        self.b, self.run_url, self.so = backend, run_url.rstrip("/"), storage_options or {}
        self.keep_last = keep_last
        self.rank, self.world = backend.rank, backend.world
        self.dcp = backend.kind in ("fsdp2", "ddp")
        self.async_save = async_save and self.dcp
        self._pending = None   # (step, url, future, t0) of an async save not yet committed
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
        url = step_url(self.run_url, step)
        if self.rank == 0:
            fs, path = fs_for(url, self.so)
            fs.invalidate_cache()
            if fs.exists(path):          # leftovers of a crashed attempt at the same step
                fs.rm(path, recursive=True)
        self._barrier()
        extras = {**extras, "step": step, "world_size": self.world, "backend": self.b.kind,
                  "rng": rng_state()}
        atomic_write_bytes(join(url, f"rank-{self.rank}.pt"), _torch_bytes(extras), self.so)
        if self.dcp:
            self._save_dcp(url, step)
        else:
            self._save_deepspeed(url, step)
            self._commit(step, url)
        stall = time.perf_counter() - t0
        return {"stall_s": stall, "save_s": None if self._pending else stall}

    def _save_dcp(self, url: str, step: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(self.b.meta, self.b.optimizer)
        state = {"model": msd, "optim": osd}
        writer = (dcp.FileSystemWriter(fs_for(url)[1]) if protocol_of(url) == "file"  # no fsspec layer
                  else FsspecWriter(url, **storage_options_for(url, self.so)))
        if self.async_save:
            fut = dcp.async_save(state, storage_writer=writer, process_group=self._pg)
            self._pending = (step, url, fut, time.perf_counter())
        else:
            dcp.save(state, storage_writer=writer)
            self._barrier()
            self._commit(step, url)

    def _save_deepspeed(self, url: str, step: int) -> None:
        tag = f"step-{step:07d}"
        local = protocol_of(url) == "file"
        base = fs_for(join(self.run_url, "checkpoints"), self.so)[1] if local else tempfile.mkdtemp(prefix="ds-")
        try:
            self.b.engine.save_checkpoint(base, tag=tag, save_latest=False)
            teacher = [t.cpu() for t in self.b.teacher_fp32]
            tpath = os.path.join(base, tag, f"teacher_fp32-rank{self.rank}.pt")
            torch.save(teacher, tpath)
            if not local:  # each rank uploads the files it wrote (its own staging folder)
                for dirpath, _, files in os.walk(os.path.join(base, tag)):
                    for fn in files:
                        rel = os.path.relpath(os.path.join(dirpath, fn), os.path.join(base, tag))
                        atomic_put_file(os.path.join(dirpath, fn), join(url, rel), self.so)
        finally:
            if not local:
                shutil.rmtree(base, ignore_errors=True)
        self._barrier()

    def poll(self) -> int | None:
        """Non-blocking: commit an async save whose writes have finished; returns its step."""
        if self._pending is None:
            return None
        step, url, fut, _ = self._pending
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
        step, url, fut, t0 = self._pending
        fut.result()  # re-raises a failed background write
        self._pending = None
        self._commit(step, url)
        self.last_async_s = time.perf_counter() - t0
        return step

    def _commit(self, step: int, url: str) -> None:
        if self.rank == 0:
            info = {"step": step, "world_size": self.world, "backend": self.b.kind, "time": time.time()}
            atomic_write_bytes(join(url, MARKER), json.dumps(info).encode(), self.so)
            self._retain(step)
        self._barrier()

    def _retain(self, newest: int) -> None:
        steps = list_steps(self.run_url, self.so)
        done = sorted(s for s, ok in steps.items() if ok)
        drop = done[:-self.keep_last] + [s for s, ok in steps.items() if not ok and s < newest]
        fs, _ = fs_for(self.run_url, self.so)
        fs.invalidate_cache()  # object stores: a cached listing would leave files behind
        for s in drop:
            u = step_url(self.run_url, s)
            p = fs_for(u, self.so)[1]
            if s in done:  # un-commit first so a concurrent reader never sees a half-deleted one
                fs.rm(p.rstrip("/") + "/" + MARKER)
            fs.rm(p, recursive=True)
            if protocol_of(u) != "file":  # stores with real folders (SeaweedFS) keep an empty one
                fs.invalidate_cache()
                try:
                    fs.rm(p.rstrip("/") + "/")
                except (FileNotFoundError, OSError):
                    pass

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # ------------------------------------------------------------------ load
    def load(self, url: str) -> dict:
        """Load weights, optimiser and teacher state; returns this rank's extras (rank 0's when the
        checkpoint was written by a different world size: DCP reshards, the loader state is global)."""
        info = _read_json(join(url, MARKER), self.so)
        if info["backend"] != self.b.kind:
            raise RuntimeError(f"{url}: written by backend '{info['backend']}', this run uses "
                               f"'{self.b.kind}'; resume with the same backend or start a new run name")
        if self.dcp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
            msd, osd = get_state_dict(self.b.meta, self.b.optimizer)
            state = {"model": msd, "optim": osd}
            reader = (dcp.FileSystemReader(fs_for(url)[1]) if protocol_of(url) == "file"
                      else FsspecReader(url, **storage_options_for(url, self.so)))
            dcp.load(state, storage_reader=reader)
            set_state_dict(self.b.meta, self.b.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        else:
            if info["world_size"] != self.world:
                raise RuntimeError(f"{url}: DeepSpeed checkpoint of {info['world_size']} ranks cannot be "
                                   f"loaded by {self.world}; use backend fsdp2 to change the world size")
            self._load_deepspeed(url, info["step"])
        r = self.rank if info["world_size"] == self.world else 0
        extras = _load_torch(join(url, f"rank-{r}.pt"), self.so)
        extras["resharded"] = info["world_size"] != self.world
        self._barrier()
        return extras

    def _load_deepspeed(self, url: str, step: int) -> None:
        tag = f"step-{step:07d}"
        local = protocol_of(url) == "file"
        base = fs_for(join(self.run_url, "checkpoints"), self.so)[1] if local else tempfile.mkdtemp(prefix="ds-")
        try:
            if not local:
                fs, path = fs_for(url, self.so)
                fs.get(path.rstrip("/") + "/", os.path.join(base, tag) + "/", recursive=True)
            self.b.engine.load_checkpoint(base, tag=tag, load_lr_scheduler_states=False)
            teacher = torch.load(os.path.join(base, tag, f"teacher_fp32-rank{self.rank}.pt"),
                                 map_location="cpu", weights_only=True)
            for dst, src in zip(self.b.teacher_fp32, teacher):
                dst.copy_(src)
            self.b.sync_teacher_()
        finally:
            if not local:
                shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------- consolidated export
def export_final(backend, final_url: str, backbone_prefix: str, so=None, info: dict | None = None) -> None:
    """Write final/model.pth (every tower: backbones, heads, centres) and final/backbone.pth (the
    tower's backbone under `backbone_prefix`, in dinov2 key names), then final/DONE (JSON `info`).

    Streamed: one parameter is gathered at a time; rank 0 writes it into its own file-backed
    (mmap) storage, so anonymous memory never holds more than one full tensor. torch.save then reads
    those pages back while writing the .pth, which is uploaded to `final_url` as a file."""
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
            m = torch.from_file(os.path.join(tmp, f"{i}.bin"), shared=True, size=t.numel(), dtype=t.dtype)
            m.copy_(t.reshape(-1))
            full[name] = m.view(t.shape)
            del t
        if rank == 0:
            bb = {k[len(backbone_prefix):]: v for k, v in full.items() if k.startswith(backbone_prefix)}
            if not bb:
                raise RuntimeError(f"export: no tensor under '{backbone_prefix}' (have e.g. {list(full)[:3]})")
            for fname, obj in (("model.pth", full), ("backbone.pth", bb)):
                path = os.path.join(tmp, fname)
                torch.save(obj, path)
                atomic_put_file(path, join(final_url, fname), so)
            atomic_write_bytes(join(final_url, DONE), json.dumps(info or {}).encode(), so)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if backend.world > 1:
        dist.barrier()


def final_info(run_url: str, so=None) -> dict | None:
    """The DONE record of a finished phase, or None while final/ is incomplete."""
    url = join(run_url, "final", DONE)
    return _read_json(url, so) if _exists(url, so) else None


def load_consolidated(url: str, so=None) -> dict:
    """A final/model.pth or backbone.pth as a state dict (memory-mapped when local)."""
    fs, path = fs_for(url, so)
    if protocol_of(url) == "file":
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    with fs.open(path, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
