"""Worker-side setup of a training phase: the meta-architecture (initialised from an earlier phase
where the phase kind says so), the data loader, and the analytical FLOPs per image.

Everything here takes the phase as resolved once by the driver (`config.ResolvedPhase`); nothing
resolves a phase again. No entrypoint; called by orchestrator/training/worker.py (`dinoray run JOB`
runs it on Ray).
"""
from __future__ import annotations

import ctypes
import dataclasses
import math

import torch
import torch.nn.functional as F

from orchestrator.layout import RunLayout
from orchestrator.pipeline import config
from orchestrator.training import checkpoint


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for the next step instead of returning it to the OS.

    By default glibc serves large blocks (above a threshold that moves between 128 KiB and 32 MiB)
    with mmap and unmaps them when freed, and trims the heap's free top: a training step on CPU then
    page-faults through every fresh activation, step after step (an fp32 [256, 65, 512] GELU took
    14 ms against 4.5 ms once the memory was kept; docs/training.md, fourth CPU round). With mmap off
    and trimming off the process holds its peak, as PyTorch's caching allocators do on accelerators.
    Call it in CPU-training processes only; returns False where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1  # -1: never trim (mallopt(3))


def flush_subnormals() -> bool:
    """Flush subnormal floats to zero (torch.set_flush_denormal) and check it on every intra-op thread.

    The setting is per thread: intra-op threads started before this call keep computing subnormals, so
    call it before the process's first parallel op. Returns True only if a multiply split over all
    threads flushed its subnormal inputs."""
    if not torch.set_flush_denormal(True):
        return False
    tiny = torch.ones(32768 * 4 * torch.get_num_threads(), dtype=torch.int32).view(torch.float32)  # 1.4e-45
    return bool(((tiny * 1.5).view(torch.int32) == 0).all())


def prepare_cpu_process(keep_memory: bool = True) -> dict[str, bool]:
    """What a CPU training process sets before its first step; returns what took effect.

    - glibc keeps freed memory (`keep_freed_memory`; skipped with keep_memory=False);
    - subnormal floats are flushed to zero (`flush_subnormals`): a matmul with subnormal operands ran
      ~190x slower here, elementwise ops ~10x (docs/training.md, fourth CPU round). Values under
      1.2e-38 become 0, as on GPUs' fast paths.
    """
    return {"keep_freed_memory": keep_memory and keep_freed_memory(),
            "flush_subnormals": flush_subnormals()}


def _interp_pos_embed(pe: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[1, 1+M*M, D] -> [1, n_tokens, D] (bicubic on the patch grid; CLS kept)."""
    if pe.shape[1] == n_tokens:
        return pe
    m, g = int(math.isqrt(pe.shape[1] - 1)), int(math.isqrt(n_tokens - 1))
    grid = pe[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
    return torch.cat([pe[:, :1].float(), grid.permute(0, 2, 3, 1).reshape(1, g * g, -1)], 1).to(pe.dtype)


def _fit_pos_embeds(state: dict, target: dict) -> dict:
    return {k: _interp_pos_embed(v, target[k].shape[1]) if k.endswith("pos_embed") and k in target else v
            for k, v in state.items()}


def _model_cfg(resolved: config.ResolvedPhase, arch: str | None, defaults: dict) -> dict:
    cfg = {k: v for k, v in config.model_cfg(resolved, arch).items() if k in defaults}
    cfg["n_global_crops"] = resolved.crops.n_global
    return cfg


def build_meta(job: config.JobSpec, resolved: config.ResolvedPhase, student_arch: str | None, *,
               teacher: config.ResolvedPhase | None = None) -> torch.nn.Module:
    """The phase's meta-architecture on CPU, identical on every rank (built under `job.seed`; the
    caller's random state is left as it was), initialised from the previous phase where the phase
    kind says so. `teacher`: the resolved `from_phase` of a distill phase (its frozen teacher)."""
    from model import DistillMetaArch, SSLMetaArch
    from model.distill import DISTILL_DEFAULT_CFG
    from model.ssl import DEFAULT_CFG
    phase = resolved.phase
    source = RunLayout.of(job).phase(phase.from_phase) if phase.from_phase else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.seed)
        if phase.kind == "distill":
            if teacher is None:
                raise ValueError(f"{job.source}: phase '{phase.name}': build_meta needs the resolved teacher "
                                 f"phase '{phase.from_phase}' (teacher=config.resolve(job, '{phase.from_phase}'))")
            cfg = _model_cfg(resolved, student_arch, DISTILL_DEFAULT_CFG)
            cfg.update(teacher_arch=teacher.model.arch, teacher_ffn_layer=teacher.model.ffn_layer,
                       teacher_num_register_tokens=teacher.model.num_register_tokens)
            full = checkpoint.load_consolidated(source.final_model)
            weights = {k[len("teacher."):]: v for k, v in full.items() if k.startswith("teacher.")}
            probe = DistillMetaArch(cfg, None, device="meta").teacher.state_dict()
            meta = DistillMetaArch(cfg, _fit_pos_embeds(weights, probe))
        else:
            meta = SSLMetaArch(_model_cfg(resolved, None, DEFAULT_CFG))
            if phase.kind == "highres":
                full = checkpoint.load_consolidated(source.final_model)
                meta.load_state_dict(_fit_pos_embeds(full, meta.state_dict()), strict=True)
    return meta.train()


def make_loader(job, resolved: config.ResolvedPhase, rank: int, world: int, state, data_workers: int | None = None):
    """The phase's multi-crop loader for stream `rank` of `world` (the batch's micro-batch streams: workers x
    accumulation steps), at the data position `state` (None: the start), with `data_workers` DataLoader
    processes (default data.num_workers)."""
    crops = dataclasses.asdict(resolved.crops)  # every CropsCfg field is a MultiCrop argument
    model = resolved.model
    kw = dict(batch_size=resolved.optim.batch_size // world, rank=rank, world_size=world, seed=job.seed,
              crops=crops, patch_size=model.patch_size, state=state)
    if job.data.train.startswith("synthetic://"):
        return SyntheticLoader(int(job.data.train.split("://")[1] or 64), mask=model, **kw)
    from orchestrator.data.loader import MultiCropLoader
    mask = dict(mask_ratio_min_max=tuple(model.mask_ratio_min_max), mask_probability=model.mask_probability)
    workers = job.data.num_workers if data_workers is None else data_workers
    return MultiCropLoader(job.data.train, mask=mask, num_workers=workers,
                           storage_options=job.storage_options, error_budget=job.data.error_budget,
                           with_keys=job.debug.trace_samples, **kw)


def train_flops_per_image(resolved: config.ResolvedPhase, arch: str) -> float:
    """Backbone FLOPs per image per step: student fwd+bwd on all crops, teacher fwd on the globals."""
    from model import flops_per_image
    m, c = resolved.model, resolved.crops
    kw = dict(patch_size=m.patch_size, num_register_tokens=m.num_register_tokens)
    g, loc = flops_per_image(arch, c.global_size, **kw), flops_per_image(arch, c.local_size, **kw)
    return 3 * (c.n_global * g + c.n_local * loc) + c.n_global * g


class SyntheticLoader:
    """Random uint8 images, deterministic in (seed, epoch, image index), with the loader protocol:
    `len()`, iteration, `state_dict()` / `state=` for exact resume, `.skipped`. Selected with
    data.train: "synthetic://N" (N images per epoch). For benchmarks and backend tests only."""

    def __init__(self, n_images: int, *, batch_size, rank, world_size, seed, crops, patch_size, mask, state=None):
        self.n, self.B, self.rank, self.world, self.seed = n_images, batch_size, rank, world_size, seed
        self.crops, self.p, self.mask = crops, patch_size, mask
        self.epoch, self.pos = (state["epoch"], state["pos"]) if state else (0, 0)
        self.skipped = 0
        if len(self) < 1:
            raise ValueError(f"synthetic://{n_images}: fewer images than one global batch ({batch_size * world_size})")

    def __len__(self) -> int:
        return self.n // (self.B * self.world)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def __iter__(self):
        from model.masking import collate_masks
        c = self.crops
        while self.pos < len(self):
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
            ids = order[self.rank::self.world][self.pos * self.B:(self.pos + 1) * self.B].tolist()
            gens = [torch.Generator().manual_seed(self.seed * 1_000_003 + i) for i in ids]
            glob = [torch.randint(0, 256, (c["n_global"], 3, c["global_size"], c["global_size"]), generator=g,
                                  dtype=torch.uint8) for g in gens]
            loc = [torch.randint(0, 256, (c["n_local"], 3, c["local_size"], c["local_size"]), generator=g,
                                 dtype=torch.uint8) for g in gens]
            mg = torch.Generator().manual_seed(self.seed * 31 + self.epoch * 100_003 + self.pos * 17 + self.rank)
            batch = {"global_crops": torch.stack(glob, 1).flatten(0, 1),
                     "local_crops": torch.stack(loc, 1).flatten(0, 1),
                     "labels": torch.tensor(ids, dtype=torch.long),
                     **collate_masks(c["n_global"] * self.B, c["global_size"] // self.p, mg,
                                     tuple(self.mask.mask_ratio_min_max), self.mask.mask_probability)}
            self.pos += 1
            yield batch
        self.epoch, self.pos = self.epoch + 1, 0


def step_schedules(optim, steps: int) -> dict:
    """The phase's per-step schedules (lr, wd, teacher momentum and temperature, last-layer freeze) from
    its effective optim settings: model.schedules.build_schedules, for the worker and in-process loops."""
    from model import schedules
    return schedules.build_schedules(
        steps, base_lr=optim.base_lr, batch_size=optim.batch_size, warmup_iters=optim.warmup_iters,
        min_lr=optim.min_lr, wd=optim.weight_decay, momentum=optim.momentum_teacher,
        teacher_temp=optim.teacher_temp, teacher_temp_warmup_iters=optim.teacher_temp_warmup_iters,
        freeze_last_layer_iters=optim.freeze_last_layer_iters)


def train_in_process(job, resolved: config.ResolvedPhase, steps: int) -> torch.nn.Module:
    """`steps` steps of a pretrain phase in this process on one rank (no Ray, no backend): the same
    model, loader, AdamW groups and schedules as a worker, plain AdamW and EMA. For test fixtures and
    benchmarks that need a trained backbone (tests/conftest.py `smoke_backbone`, bench/curate.py).
    The caller's random state is left as it was. Returns the meta-architecture."""
    from model import schedules
    from orchestrator.training.backends import adamw_groups
    o = resolved.optim
    meta = build_meta(job, resolved, None)
    opt = torch.optim.AdamW(adamw_groups(meta, o), lr=0.0, betas=o.adamw_betas)
    sched = step_schedules(o, steps)
    loader = make_loader(job, resolved, 0, 1, None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.seed + 1)
        step = 0
        while step < steps:
            for batch in loader:
                values = schedules.apply_schedules(opt, sched, step)
                loss, _ = meta(batch, teacher_temp=values["teacher_temp"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(meta.student.parameters(), o.clip_grad)
                opt.step()
                meta.update_ema_(values["momentum"])
                step += 1
                if step == steps:
                    break
    return meta
