"""Sharding backends (fsdp2 / deepspeed / ddp) behind one small interface.

The worker loop (orchestrator/training/worker.py) only calls, once per step and in this order:

    backend.zero_grad()
    for batch in micro_batches:                    # `accum` of them (gradient accumulation)
        loss, parts = backend.forward(batch, teacher_temp=...)
        backend.backward(loss)                     # gradients of loss / accum, summed
    grad_norm, applied = backend.step(clip_grad)   # clip + optimiser step; skipped when not finite
    backend.ema_(momentum)                         # teacher (or student_ema) <- EMA of the student

plus `backend.optimizer` (for model.schedules.apply_schedules), `full_tensors()` (streamed export),
and `state_bytes()` (memory per rank). The model code (model/) knows nothing about any of this:
parallelism, precision, activation checkpointing and compile are all applied here, in `build()`.

No entrypoint; exercised by `.venv/bin/python -m pytest tests/test_backends.py -q`.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from model import native_bf16

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    """precision.autocast -> the compute dtype; "auto": bf16 where `model.native_bf16`, else fp32."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return DTYPES[name]


# Sub-module trees of the meta-architectures (SSLMetaArch: student/teacher[/gram_teacher];
# DistillMetaArch: student/student_ema/teacher). Only "student" is trained.
TOWERS = ("student", "teacher", "student_ema", "gram_teacher")
# Prefixes that wrappers add to parameter names; exports strip them (dinov2 key names).
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "module.")


def clean_name(name: str) -> str:
    for p in WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


def _towers(meta: nn.Module) -> dict[str, nn.Module]:
    return {n: getattr(meta, n) for n in TOWERS if isinstance(getattr(meta, n, None), nn.Module)}


def _backbones_and_heads(tower: nn.Module) -> list[nn.Module]:
    return list(tower.values()) if isinstance(tower, nn.ModuleDict) else [tower]


def adamw_groups(meta: nn.Module, optim) -> list[dict]:
    from model import schedules
    groups = schedules.param_groups(meta.student, layer_decay=optim.layer_decay,
                                    patch_embed_lr_mult=optim.patch_embed_lr_mult)
    for g in groups:
        g.pop("names", None)
    return groups


class Backend:
    """What the three backends share. `meta` is the unwrapped SSLMetaArch/DistillMetaArch (with
    sharded parameters for fsdp2/deepspeed); `model` is what forward is called on."""

    kind = "base"

    def __init__(self, meta: nn.Module, job, device: torch.device, optim, accum: int = 1):
        self.meta, self.job, self.device, self.optim = meta, job, device, optim
        self.accum = accum  # micro-batches per optimiser step: each backward adds grad(loss) / accum
        grouped = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if grouped else (0, 1)
        self.model: nn.Module = meta
        self.optimizer = None
        self._ac_dtype = autocast_dtype(job.precision.autocast, device)
        self._cudagraphs = job.fsdp.compile and job.fsdp.cudagraphs
        if self._cudagraphs and accum != 1:  # validate.py refuses cudagraphs with an elastic range
            raise ValueError(f"{job.source}: fsdp.cudagraphs needs one micro-batch per step (accum {accum})")

    def autocast(self):
        if self._ac_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._ac_dtype)

    def zero_grad(self) -> None:
        if self._cudagraphs:  # a new step: the graphs may overwrite their previous step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        self.optimizer.zero_grad(set_to_none=True)

    def forward(self, batch: dict, *, teacher_temp: float):
        with self.autocast():
            return self.model(batch, teacher_temp=teacher_temp)

    def backward(self, loss: torch.Tensor) -> None:
        # Every micro-batch's backward reduces its gradients (DDP all-reduce, FSDP2 reduce-scatter into
        # the sharded grads): no unsharded gradient is ever held across micro-batches, at the price
        # of accum reductions per step. Same images, same mean: equal to one step on the whole batch.
        (loss / self.accum if self.accum > 1 else loss).backward()

    def _trainable(self) -> list[torch.Tensor]:
        return [p for p in self.meta.student.parameters() if p.requires_grad]

    def step(self, clip_grad: float) -> tuple[float, bool]:
        """Clip to `clip_grad` (global norm; 0 = no clip) and step. A non-finite gradient norm
        (identical on every rank: it is a global reduction) skips the step and clears the grads."""
        params = self._trainable()
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        norm_f = float(norm)
        if not torch.isfinite(norm):
            self.zero_grad()
            return norm_f, False
        if clip_grad > 0:
            torch.nn.utils.clip_grads_with_norm_(params, clip_grad, norm, foreach=True)
        self.optimizer.step()
        return norm_f, True

    @torch.no_grad()
    def ema_(self, momentum: float) -> None:
        self.meta.update_ema_(momentum)  # local shards only (model.ema_update_), no communication

    def full_tensors(self):
        """Yield (name, tensor) for every entry of meta.state_dict(), one at a time, consolidated.
        Collective: every rank must iterate; only rank 0 receives tensors (others get None)."""
        for name, t in self.meta.state_dict().items():
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            yield clean_name(name), (t.detach().cpu() if self.rank == 0 else None)

    def state_bytes(self) -> dict[str, int]:
        """Bytes of training state held by this rank: parameters (all towers), grads, optimiser state."""
        def nbytes(t):
            t = t.to_local() if hasattr(t, "to_local") else t
            return t.numel() * t.element_size()
        params = sum(nbytes(p) for p in self.meta.parameters())
        grads = sum(nbytes(p.grad) for p in self.meta.parameters() if p.grad is not None)
        opt = sum(nbytes(v) for s in self.optimizer.state.values() for v in s.values()
                  if torch.is_tensor(v) and v.dim() > 0)
        return {"params": params, "grads": grads, "optim": opt, "total": params + grads + opt}


class DDPBackend(Backend):
    """Replicated weights; gradients all-reduced by torch DDP. For models that fit one device."""

    kind = "ddp"

    def __init__(self, meta, job, device, optim, accum=1):
        super().__init__(meta, job, device, optim, accum)
        from torch.nn.parallel import DistributedDataParallel as DDP
        _per_block(meta, job.fsdp)
        meta.to(device)
        if self.world > 1:
            # iBOT's separate head gets no gradient in a step without masked tokens: find unused.
            self.model = DDP(meta, device_ids=[device.index] if device.type == "cuda" else None,
                             broadcast_buffers=False, find_unused_parameters=True)
        # on a GPU the fused kernel: the foreach AdamW took 8% of a ViT-L/14 step's GPU time (bench/gpu.sh)
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(adamw_groups(meta, optim), lr=0.0, betas=optim.adamw_betas,
                                           foreach=not fused, fused=fused)


class FSDP2Backend(Backend):
    """FSDP2 (`fully_shard`): each rank holds 1/N of every parameter, gradient and optimiser state."""

    kind = "fsdp2"

    def __init__(self, meta, job, device, optim, accum=1):
        super().__init__(meta, job, device, optim, accum)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
        precision = job.precision
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[precision.param_dtype],
                                  reduce_dtype=DTYPES[precision.reduce_dtype])
        # uint8 images and float mask weights enter at the root: do not cast them there.
        mp_root = MixedPrecisionPolicy(param_dtype=DTYPES[precision.param_dtype],
                                       reduce_dtype=DTYPES[precision.reduce_dtype], cast_forward_inputs=False)
        mesh = init_device_mesh(device.type, (self.world,))
        meta.to(device)
        # Fixed order, as torchtitan's: (1) activation checkpointing wraps each block, (2) compile
        # compiles each (wrapped) block; both come before (3) sharding, which must see the final
        # module tree; (4) the optimiser is built last, over the sharded (DTensor) parameters.
        _per_block(meta, job.fsdp)
        for name, tower in _towers(meta).items():
            # fsdp.reshard_after_forward false: the student's units keep their gathered parameters from
            # forward to backward (one all-gather per unit and step, not two); frozen towers always reshard
            raf = job.fsdp.reshard_after_forward or name != "student"
            for mod in _backbones_and_heads(tower):
                for blk in getattr(mod, "blocks", []):
                    fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=raf)  # (3a) per block
                fully_shard(mod, mesh=mesh, mp_policy=mp, reshard_after_forward=raf)      # (3b) head / rest
                for method in ("forward_features", "forward_features_list"):
                    if hasattr(mod, method):
                        register_fsdp_forward_method(mod, method)
        # (3c) one root over everything (no parameters of its own): teacher units are non-root, so
        # FSDP reshards them right after their no-grad forward.
        fully_shard(meta, mesh=mesh, mp_policy=mp_root, reshard_after_forward=True)
        self.optimizer = torch.optim.AdamW(adamw_groups(meta, optim), lr=0.0,
                                           betas=optim.adamw_betas, foreach=True)  # (4)


DEEPSPEED_BUCKET = 500_000_000  # DeepSpeed's default reduce and all-gather bucket (elements)


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO stage 2 or 3 (bf16 or fp32 parameters), AdamW with torch_adam.

    The whole meta-architecture is one DeepSpeed engine; the optimiser only sees the student, so the
    teacher is partitioned by ZeRO-3 exactly like the student (every parameter is split the same way,
    by its flat index, and teacher and student parameters have identical shapes), which makes the EMA
    a purely local lerp between matching partitions. The teacher's EMA state is kept in fp32
    (`teacher_fp32`, local partitions) and copied into the teacher's (bf16) partitions after each step;
    it is saved next to DeepSpeed's own checkpoint files. See docs/training.md.
    """

    kind = "deepspeed"

    def __init__(self, meta, job, device, optim, accum=1):
        super().__init__(meta, job, device, optim, accum)
        import deepspeed
        if accum != 1:  # validate.py refuses an elastic range with deepspeed, so the world never shrinks
            raise ValueError(f"{job.source}: DeepSpeedBackend runs at the full worker count only (accum {accum})")
        stage = job.deepspeed.zero_stage
        self.stage = stage
        bf16 = job.precision.param_dtype == "bf16"
        micro = max(1, optim.batch_size // max(self.world, 1))
        # Buckets no larger than the student's gradients: with DeepSpeed's default (5e8 elements, 2 GB in
        # fp32) a ZeRO-2 step of tests/test_backends.py's 0.3M-parameter model took 1.4-3.9 s on CPU,
        # 0.08-0.12 s with this, same losses (one bucket either way); from 5e8 up (ViT-g) the default stays.
        bucket = min(DEEPSPEED_BUCKET, sum(p.numel() for p in meta.student.parameters() if p.requires_grad))
        cfg = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": optim.clip_grad,
            "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
            "bf16": {"enabled": bf16},
            "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "betas": list(optim.adamw_betas),
                                                      "weight_decay": 0.0, "torch_adam": True}},
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }
        if bf16 and job.precision.reduce_dtype == "fp32":
            cfg["communication_data_type"] = "fp32"
        # DeepSpeed JIT-builds its shared-memory all-reduce op (C++, ~55 s on 2 cores, once per machine or
        # pod) when it first wraps the process group on a CPU; only DeepSpeed-inference's all-reduce uses it,
        # training's collectives go through torch.distributed. deepspeed.ops keeps this dict per process.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        _per_block(meta, job.fsdp, compile_towers=("student",))
        meta.to(device)
        self.ema_targets, self.ema_sources = meta.ema_pairs()
        full = [t.detach().float().reshape(-1).clone() for t in self.ema_targets]  # before partitioning
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=meta, model_parameters=adamw_groups(meta, optim), config=cfg)
        self.model = self.engine
        # fp32 EMA state laid out exactly like the teacher's partitions (ZeRO-3) or full (ZeRO-2)
        self.teacher_fp32 = []
        for t, f in zip(self._target_tensors(), full):
            if self.stage == 3:
                n = t.numel()
                f = torch.nn.functional.pad(f, (0, n * self.world - f.numel()))[self.rank * n:(self.rank + 1) * n]
            self.teacher_fp32.append(f.clone().view(t.shape))
        del full

    def _source_tensors(self) -> list[torch.Tensor]:
        """fp32 values of the student's local partitions (ZeRO-3) or full params (ZeRO-2)."""
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param
            return [safe_get_local_fp32_param(p).view(-1) for p in self.ema_sources]
        return [p.data for p in self.ema_sources]

    def _target_tensors(self) -> list[torch.Tensor]:
        if self.stage == 3:
            return [p.ds_tensor.view(-1) for p in self.ema_targets]
        return [p.data for p in self.ema_targets]

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self, clip_grad: float) -> tuple[float, bool]:
        # DeepSpeed clips (gradient_clipping) and skips the step itself when the norm is not finite.
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm if norm is not None else float("nan")), bool(self.engine.was_step_applied())

    @torch.no_grad()
    def ema_(self, momentum: float) -> None:
        src = self._source_tensors()
        n = [min(a.numel(), b.numel()) for a, b in zip(self.teacher_fp32, src)]
        torch._foreach_lerp_([a.view(-1)[:k] for a, k in zip(self.teacher_fp32, n)],
                             [b.view(-1)[:k].float() for b, k in zip(src, n)], 1.0 - float(momentum))
        self.sync_teacher_()

    @torch.no_grad()
    def sync_teacher_(self) -> None:
        """Copy the fp32 EMA state into the teacher's own (possibly bf16, partitioned) parameters."""
        for dst, src in zip(self._target_tensors(), self.teacher_fp32):
            k = min(dst.numel(), src.numel())
            dst.view(-1)[:k].copy_(src.view(-1)[:k])
        # ZeRO-3 keeps small parameters (< stage3_param_persistence_threshold elements: biases, norms,
        # LayerScale, and every parameter of a tiny model) gathered all the time, re-gathered from
        # their partitions after each optimiser step, i.e. before this EMA: without a re-gather here
        # the teacher's forward would use them one EMA step late. Collective (every rank calls it).
        persistent = [p for p in self.ema_targets if self.stage == 3 and getattr(p, "ds_persist", False)]
        if persistent:
            persistent[0].partition(persistent)
            persistent[0].all_gather(persistent)

    def _gather(self, p: torch.nn.Parameter, local: torch.Tensor | None = None) -> torch.Tensor | None:
        """Full value of one ZeRO-3 parameter (or of `local`, a partition laid out like p.ds_tensor)."""
        if self.stage != 3 or not hasattr(p, "ds_tensor"):
            t = p.data if local is None else local
            return t.detach().cpu().view(p.shape) if self.rank == 0 else None
        part = (p.ds_tensor if local is None else local).detach().reshape(-1)
        out = torch.empty(part.numel() * self.world, dtype=part.dtype, device=part.device)
        dist.all_gather_single(out, part.contiguous())
        return out[:p.ds_numel].view(p.ds_shape).cpu() if self.rank == 0 else None

    def full_tensors(self):
        ema = {id(p): t for p, t in zip(self.ema_targets, self.teacher_fp32)}
        params = dict(self.meta.named_parameters())
        for name, t in self.meta.state_dict(keep_vars=True).items():
            p = params.get(name)
            if p is None:
                yield clean_name(name), (t.detach().cpu() if self.rank == 0 else None)
            else:
                yield clean_name(name), self._gather(p, ema.get(id(p)))

    def state_bytes(self) -> dict[str, int]:
        def nb(t):
            return t.numel() * t.element_size()
        if self.stage == 3:
            params = sum(nb(p.ds_tensor) for p in self.meta.parameters())
        else:
            params = sum(nb(p.data) for p in self.meta.parameters())
        inner = self.optimizer.optimizer  # the torch AdamW over DeepSpeed's fp32 partitions
        master = sum(nb(p) for g in inner.param_groups for p in g["params"])
        opt = sum(nb(v) for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
        shadow = sum(nb(t) for t in self.teacher_fp32)
        total = params + master + opt + shadow
        return {"params": params + master + shadow, "grads": 0, "optim": opt, "total": total}


def _per_block(meta: nn.Module, fsdp, compile_towers=("student", "teacher")) -> None:
    """Activation checkpointing on the trained student's blocks, then torch.compile on the blocks of
    `compile_towers` (torchtitan's order: the compiled region is the checkpointed block). Checkpoint
    wrapping renames parameters ('_checkpoint_wrapped_module.'); exports strip it. `Module.compile()`
    compiles in place and renames nothing. With fsdp.cudagraphs the blocks compile in mode
    "reduce-overhead": on a GPU each block's forward and backward replay as CUDA graphs (one launch
    instead of dozens of kernels; Backend.zero_grad marks each step's start for them)."""
    if not (fsdp.activation_checkpointing or fsdp.compile):
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    mode = "reduce-overhead" if fsdp.cudagraphs else None
    for name, tower in _towers(meta).items():
        for mod in _backbones_and_heads(tower):
            blocks = getattr(mod, "blocks", None)
            if blocks is None:
                continue
            for i, blk in enumerate(blocks):
                if fsdp.activation_checkpointing and name == "student":
                    blocks[i] = blk = checkpoint_wrapper(blk)
                if fsdp.compile and name in compile_towers:
                    blk.compile(mode=mode)
            if fsdp.compile and name in compile_towers and hasattr(mod, "skip_unread_tokens"):
                mod.skip_unread_tokens = False  # compiled blocks keep static shapes: the read rows vary


BACKENDS = {"ddp": DDPBackend, "fsdp2": FSDP2Backend, "deepspeed": DeepSpeedBackend}


def build(meta: nn.Module, job, device: torch.device, optim=None, accum: int = 1) -> Backend:
    """Wrap `meta` (built on CPU, identical on every rank) with the job's backend. `optim`: the
    phase's resolved optimiser section (config.resolve(job, phase).optim; default job.optim);
    `accum`: micro-batches per optimiser step (JobSpec.accumulation)."""
    if job.backend not in BACKENDS:
        raise ValueError(f"{job.source}: backend '{job.backend}' is not one of {sorted(BACKENDS)}")
    return BACKENDS[job.backend](meta, job, device, optim or job.optim, accum)
