"""DCP storage I/O at the speed of the disk: raw tensor bytes, one file per rank, async staging.

DCP's stock `FileSystemWriter` runs `torch.save` once per tensor (a zip archive each, written through a
Python callback that copies every byte) and its fsspec variant sends an object store one part at a time.
`RawWriter` keeps DCP's layout (`.metadata`, `__<rank>_0.distcp`, the same planner, so any world size
can load it) but writes each tensor's bytes as they are, straight from the tensor's memory:

- local: the tensors' bytes written in order into the rank's file, each 32 MiB handed to the kernel's
  writeback as soon as written (`write_local`), then fsync: the disk writes while the rest is copied;
- object stores: one (multipart) PUT per rank file, the parts cut from the tensors' own memory
  (`_Segments`), as `fs.pipe_file` would send a bytes object of the same size.

Each tensor item carries the transform descriptor `RAW`, so DCP's stock reader refuses these files
(unknown extension) instead of misreading them; `RawReader` reads them (seek + readinto, then the
slice each rank needs) and falls back to DCP's own path for items without it (older checkpoints).

Save plans are cached (`planner`: DCP's plan caching, no plan exchange while the state's structure
is unchanged). `Stager`: async saves copy the state into reusable host buffers in a background
thread (DCP's `DefaultStager` with async staging); the training thread only waits for that copy where
the state is next modified: a pre-hook on the optimiser's `step` (`Stager.fence`). Tensors that change
in a forward pass (buffers, e.g. centres) are cloned at once (`snapshot_buffers`), so the saved state
is exactly the state at the save step. The stager's buffers (one host copy of the rank's state) live
as long as the Checkpointer.

No entrypoint; exercised by `.venv/bin/python -m pytest tests/test_checkpoint.py -q`.
"""
from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import Future

import torch
from torch.futures import Future as TorchFuture
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _FileSystemWriter, _StorageInfo
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed._shard._utils import narrow_tensor_by_index

from orchestrator.storage import Store

RAW = "dinoray-raw/1"        # transform descriptor: the item is the tensor's raw bytes (C order)
PART = 50 * 2 ** 20          # s3fs pipe_file's part size: files below 2 parts are one PUT
WRITEBACK = 32 * 2 ** 20     # local files: bytes handed to the kernel's writeback at a time


def planner():
    """DCP's default save planner with plan caching: while the state's structure is unchanged, the
    ranks skip sending their plans to the coordinator (DCP compares each new local plan to the last)."""
    from torch.distributed.checkpoint import DefaultSavePlanner
    return DefaultSavePlanner(enable_plan_caching=True)


def _fsspec(store: Store):
    """DCP's fsspec FileSystem and the checkpoint's path in it."""
    from torch.distributed.checkpoint._fsspec_filesystem import FileSystem
    fs = FileSystem()
    return fs, fs.init_path(store.url, **store.fsspec_options())


def _view(data) -> memoryview:
    """The bytes of one resolved write item, without a copy for contiguous CPU tensors."""
    if not isinstance(data, torch.Tensor):
        return data.getbuffer()                      # BYTE_IO: torch.save'd by the planner
    t = data.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


class _Segments:
    """An ordered list of buffers seen as one bytes-like object of their total length: slicing
    copies only the slice (one part), as slicing a bytes object would."""

    def __init__(self, views: list[memoryview]):
        self.views, self.starts, n = views, [], 0
        for v in views:
            self.starts.append(n)
            n += v.nbytes
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, s: slice) -> bytes:
        a, b, _ = s.indices(self.n)
        out = []
        for start, v in zip(self.starts, self.views):
            lo, hi = max(a - start, 0), min(b - start, v.nbytes)
            if lo < hi:
                out.append(v[lo:hi])
        return b"".join(out)

    def __bytes__(self) -> bytes:
        return self[0:self.n]


def write_local(path, views: list[memoryview], step: int = WRITEBACK) -> None:
    """Write `views` one after the other into a new file at `path`, durable on return. Every `step`
    bytes the written range is handed to the kernel's writeback (posix_fadvise DONTNEED starts it
    without waiting and drops the pages once clean), so the disk works while later tensors are
    copied in and the final fsync only waits for the tail."""
    advise = getattr(os, "posix_fadvise", None)
    with open(path, "wb") as f:
        fd, done, handed = f.fileno(), 0, 0
        for mv in views:
            for i in range(0, mv.nbytes, step):
                f.write(mv[i:i + step])
                done += min(step, mv.nbytes - i)
                if advise and done - handed >= step:
                    f.flush()
                    advise(fd, handed, done - handed, os.POSIX_FADV_DONTNEED)
                    handed = done
        f.flush()
        os.fsync(fd)


class RawWriter(_FileSystemWriter):
    """DCP StorageWriter: one file per rank of raw tensor bytes (see the module docstring)."""

    def __init__(self, store: Store):
        super().__init__(store.local_path if store.is_local else store.url, single_file_per_rank=True,
                         sync_files=True, overwrite=True)
        self.remote = not store.is_local
        if self.remote:
            self.fs, self.path = _fsspec(store)

    def write_data(self, plan, planner) -> TorchFuture:
        name = f"{plan.storage_data.prefix}0.distcp"
        views, results, off = [], [], 0
        for item in plan.items:
            mv = _view(planner.resolve_data(item))
            raw = item.type != WriteItemType.BYTE_IO
            info = _StorageInfo(name, off, mv.nbytes, transform_descriptors=[RAW] if raw else None)
            results.append(WriteResult(index=item.index, size_in_bytes=mv.nbytes, storage_data=info))
            views.append(mv)
            off += mv.nbytes
        path = self.fs.concat_path(self.path, name)
        if self.remote:
            self._put(str(path), _Segments(views))
        else:
            write_local(path, views)
        fut: TorchFuture = TorchFuture()
        fut.set_result(results)
        return fut

    def _put(self, path: str, data: _Segments) -> None:
        fs = self.fs.fs
        if "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) and len(data) >= 2 * PART:
            fs.pipe_file(path, data, chunksize=PART)   # multipart, parts uploaded concurrently
        else:
            fs.pipe_file(path, bytes(data))


class RawReader(FileSystemReader):
    """DCP StorageReader for `RawWriter`'s files (and DCP's own, item by item)."""

    def __init__(self, store: Store):
        super().__init__(store.local_path if store.is_local else store.url)
        if not store.is_local:
            self.fs, self.path = _fsspec(store)
        self._chunks: dict = {}

    def set_up_storage_reader(self, metadata, is_coordinator: bool, *args, **kwargs) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        for fqn, md in metadata.state_dict_metadata.items():
            for c in getattr(md, "chunks", ()):
                self._chunks[(fqn, tuple(c.offsets))] = (md.properties.dtype, tuple(c.sizes))

    def read_data(self, plan, planner) -> TorchFuture:
        def is_raw(req):
            return RAW in (self.storage_data[req.storage_index].transform_descriptors or ())
        rest = [r for r in plan.items if not is_raw(r)]
        if rest:
            super().read_data(dataclasses.replace(plan, items=rest), planner).wait()
        per_file: dict[str, list] = {}
        for req in plan.items:
            if is_raw(req):
                per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for rel, reqs in per_file.items():
            with self.fs.create_stream(self.fs.concat_path(self.path, rel), "rb") as f:
                for req in sorted(reqs, key=lambda r: self.storage_data[r.storage_index].offset):
                    self._read_one(f, req, planner)
        fut: TorchFuture = TorchFuture()
        fut.set_result(None)
        return fut

    def _read_one(self, f, req, planner) -> None:
        info = self.storage_data[req.storage_index]
        idx = req.storage_index
        dtype, sizes = self._chunks[(idx.fqn, tuple(idx.offset))]
        buf = torch.empty(info.length, dtype=torch.uint8)
        f.seek(info.offset)
        mv, got = memoryview(buf.numpy()), 0
        while got < info.length:
            n = f.readinto(mv[got:])
            if not n:
                raise EOFError(f"{info.relative_path}: {info.length - got} bytes missing at offset {info.offset + got}")
            got += n
        t = narrow_tensor_by_index(buf.view(dtype).reshape(sizes), req.storage_offsets, req.lengths)
        target = planner.resolve_tensor(req).detach()
        if target.size() != t.size():
            raise RuntimeError(f"{idx.fqn}: checkpoint slice {tuple(t.size())} != target {tuple(target.size())}")
        target.copy_(t)
        planner.commit_tensor(req, target)


def snapshot_buffers(state: dict, module: torch.nn.Module) -> dict:
    """`state` (DCP's {"model": ..., "optim": ...}) with every model tensor that is not a parameter
    (buffers: they may change in the next forward, before the optimiser's fence) cloned now."""
    def storage(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.untyped_storage().data_ptr()
    params = {storage(p) for p in module.parameters()}
    model = {k: (v.clone() if isinstance(v, torch.Tensor) and storage(v) not in params else v)
             for k, v in state["model"].items()}
    return {**state, "model": model}


class Stager:
    """Background staging into reusable host buffers, fenced before the optimiser's next step."""

    def __init__(self, optimizer):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        self.dcp = DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(),
                                                use_shared_memory=False, use_async_staging=True,
                                                use_non_blocking_copy=False))
        self._staging: Future | None = None
        self.fence_s = 0.0                       # training-thread time spent waiting in the fence
        self._hook = optimizer.register_step_pre_hook(lambda *_: self.fence())

    def started(self, staging: Future) -> None:
        self._staging = staging

    def fence(self) -> None:
        """Block until the last staging copy is complete (the state may be modified after it)."""
        if self._staging is not None:
            t0 = time.perf_counter()
            self._staging.result()
            self._staging = None
            self.fence_s += time.perf_counter() - t0

    def close(self) -> None:
        self.fence()
        self._hook.remove()
        self.dcp.close()
