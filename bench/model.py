"""Model benchmark: images/s of one full DINOv2 training step (forward, backward, AdamW, EMA),
`model/` against the reference implementation's modules, side by side, runs interleaved.

Run (from the repo root):
    .venv/bin/python bench/model.py --reference /tmp/dinov2-ref          # ViT-S/14, both rows
    .venv/bin/python bench/model.py --reference /tmp/dinov2-ref --default-allocator  # glibc as it comes
    .venv/bin/python bench/model.py --archs vit_tiny --repeats 2          # model/ only, quick
    .venv/bin/python bench/model.py --reference /tmp/dinov2-ref --dtype fp32 --peak   # against the GEMM peak
    .venv/bin/python bench/model.py --reference /tmp/dinov2-ref --dtype fp32 --gemms  # model/'s products alone

The reference is the released DINOv2 code (facebookresearch/dinov2). Its licence (CC-BY-NC) keeps it
out of this repository; fetch it once, without its pinned dependencies (our torch stays):
    .venv/bin/pip download dinov2==0.0.1.dev2 --no-deps -d /tmp/dinov2-whl
    .venv/bin/python -m zipfile -e /tmp/dinov2-whl/dinov2-0.0.1.dev2-py3-none-any.whl /tmp/dinov2-ref

One step, for both rows: teacher forward on the 2 global crops (no grad), student forward on the
global (iBOT-masked) and local crops, tied DINO/iBOT head with 65,536 prototypes, Sinkhorn-Knopp
centering, DINO + iBOT + KoLeo losses, backward, AdamW (the same parameter groups), EMA teacher update.
The reference row runs its own modules (ViT, DINOHead, DINOLoss, iBOTPatchLoss, KoLeoLoss) the way
its `SSLMetaArch.forward_backward` does; without xFormers (CPU) each crop resolution is one backbone
call, with the reference's subset stochastic depth (`drop_add_residual_stochastic_depth`, what its
nested-tensor training path uses), and the head inputs are concatenated with `torch.cat`. Its AdamW
uses `foreach` (the reference's setting); the model/ row uses `fused=True` (one pass per tensor,
as orchestrator/training/backends.py should). Inputs are random uint8 crops; both rows get the same batch.
`--dtype auto` uses bf16 autocast where the CPU has native bf16 matmuls (AMX / AVX512-BF16) or on
CUDA, fp32 otherwise (bf16 autocast is emulated and ~10x slower on AVX2-only CPUs).
Prints the CPU capability, thread count and load, every step (wall and process CPU seconds: on a
shared machine the CPU seconds vary less), the medians per row and the ratios (of the medians, and the median
of each repeat's own ratio), then analytical FLOPs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import SSLMetaArch, flops_per_image, native_bf16, ssl_flops_per_image  # noqa: E402
from model.masking import collate_masks  # noqa: E402
from model.schedules import param_groups  # noqa: E402
from orchestrator.training.setup import prepare_cpu_process  # noqa: E402


# On CPU both rows run in a process set up as the training workers' (orchestrator.training.setup.
# prepare_cpu_process: glibc keeps freed memory, subnormals flushed to zero): the ratio is compute
# alone. With glibc's default a row's time swings with page faults that depend on what ran before, the
# reference's more than model/'s (docs/training.md, third CPU round); --default-allocator shows that.


def make_batch(B, n_local, gsize, lsize, patch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "global_crops": torch.randint(0, 256, (2 * B, 3, gsize, gsize), dtype=torch.uint8, generator=g),
        "local_crops": torch.randint(0, 256, (n_local * B, 3, lsize, lsize), dtype=torch.uint8, generator=g),
        "labels": torch.full((B,), -1, dtype=torch.long),
    }
    batch.update(collate_masks(2 * B, gsize // patch, g))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _groups(student):
    groups = param_groups(student)
    for g in groups:
        g.pop("names")
    return groups


class OursStep:
    """model/: SSLMetaArch forward, backward, fast AdamW, EMA."""

    name = "model/"

    def __init__(self, arch, args, device):
        self.model = SSLMetaArch({"arch": arch, "patch_size": args.patch_size, "img_size": args.global_size,
                                  "drop_path_rate": args.drop_path, "head_n_prototypes": args.prototypes,
                                  "ibot_separate_head": False}).to(device).train()  # tied, as the reference
        self.opt = torch.optim.AdamW(_groups(self.model.student), lr=1e-4, fused=True)
        if args.compile:  # each block's two residual branches (norm, attention / MLP, LayerScale); stochastic
            for tower in (self.model.student, self.model.teacher):  # depth stays outside, in eager
                for blk in tower["backbone"].blocks:
                    blk._attn_branch = torch.compile(blk._attn_branch, dynamic=False)
                    blk._ffn_branch = torch.compile(blk._ffn_branch, dynamic=False)

    def __call__(self, batch, dtype, device):
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss, _ = self.model(batch, teacher_temp=0.07)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.update_ema_(0.994)
        return loss


class GemmsStep:
    """model/'s matrix products alone: every mm / addmm / bmm / baddbmm of one model/ step (recorded by a
    dispatch mode, with their shapes, strides and dtypes), replayed on random data of that layout. No step
    that does model/'s products can be faster, so reference / this row bounds what model/ can reach."""

    name = "gemms"
    OPS = ("mm", "addmm", "bmm", "baddbmm")

    def __init__(self, ours, batch, dtype, device):
        from torch.utils._python_dispatch import TorchDispatchMode

        calls, ops = [], {getattr(torch.ops.aten, op).default for op in self.OPS}
        ops |= {getattr(torch.ops.aten, op).out for op in self.OPS}
        meta = (lambda a: (a.shape, a.stride(), a.dtype, a.device) if torch.is_tensor(a) else a)

        class Record(TorchDispatchMode):  # the layouts only: holding the tensors would keep the step's memory
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in ops:
                    calls.append((func, [meta(a) for a in args], {k: meta(v) for k, v in (kwargs or {}).items()}))
                return func(*args, **(kwargs or {}))

        with Record():
            ours(batch, dtype, device)
        self.calls = [(f, [self._like(a) for a in args], {k: self._like(v) for k, v in kw.items()})
                      for f, args, kw in calls]
        self.flops = sum(2 * t[-2].numel() * t[-1].shape[-1] for t in
                         ([a for a in args if torch.is_tensor(a)] for _, args, _ in self.calls))

    @staticmethod
    def _like(a):
        """Random data in a recorded (shape, strides, dtype, device) layout; anything else as it was."""
        if not (isinstance(a, tuple) and len(a) == 4 and isinstance(a[2], torch.dtype)):
            return a
        shape, stride, dtype, device = a
        extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 1
        return torch.randn(extent, device=device).to(dtype).as_strided(shape, stride)

    def __call__(self, batch, dtype, device):
        for f, args, kw in self.calls:
            f(*args, **kw)
        return None  # no loss


def _ref_features(backbone, x, masks, drop_add):
    """The reference backbone's forward_features for one resolution, with its list path's subset
    stochastic depth (its per-tensor path switches to subset only above a rate of 0.1)."""
    x = backbone.prepare_tokens_with_masks(x, masks)
    for blk in backbone.blocks:
        if blk.training and blk.sample_drop_ratio > 0.0:
            x = drop_add(x, lambda t, b=blk: b.ls1(b.attn(b.norm1(t))), blk.sample_drop_ratio)
            x = drop_add(x, lambda t, b=blk: b.ls2(b.mlp(b.norm2(t))), blk.sample_drop_ratio)
        else:
            x = blk(x)
    x = backbone.norm(x)
    return {"x_norm_clstoken": x[:, 0], "x_norm_patchtokens": x[:, getattr(backbone, "num_register_tokens", 0) + 1:]}


class RefStep:
    """The reference's modules, driven as its SSLMetaArch.forward_backward + update_teacher do."""

    name = "reference"

    def __init__(self, arch, args, device):
        from dinov2.layers import DINOHead
        from dinov2.layers.block import drop_add_residual_stochastic_depth
        from dinov2.loss import DINOLoss, iBOTPatchLoss, KoLeoLoss
        from dinov2.models import vision_transformer as vits
        self.drop_add = drop_add_residual_stochastic_depth

        def tower():
            bb = vits.__dict__[arch](patch_size=args.patch_size, img_size=args.global_size, init_values=1e-5,
                                     block_chunks=0, drop_path_rate=args.drop_path, drop_path_uniform=True)
            return torch.nn.ModuleDict({"backbone": bb, "dino_head": DINOHead(bb.embed_dim, args.prototypes)})
        self.student, self.teacher = tower().to(device).train(), tower().to(device).eval()
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.dino_loss, self.ibot_loss = DINOLoss(args.prototypes), iBOTPatchLoss(args.prototypes)
        self.koleo = KoLeoLoss()
        self.n_local = args.n_local
        self.opt = torch.optim.AdamW(_groups(self.student), lr=1e-4, foreach=True)

    def _teacher(self, glob, idx, upperbound, teacher_temp):
        out = _ref_features(self.teacher["backbone"], glob, None, self.drop_add)
        cls = out["x_norm_clstoken"].chunk(2)
        cls = torch.cat((cls[1], cls[0]))
        n_cls, n_masked = cls.shape[0], idx.shape[0]
        buf = cls.new_zeros(upperbound + n_cls, cls.shape[-1])
        buf[:n_cls].copy_(cls)
        torch.index_select(out["x_norm_patchtokens"].flatten(0, 1), 0, idx, out=buf[n_cls:n_cls + n_masked])
        logits = self.teacher["dino_head"](buf)
        t_cls = self.dino_loss.sinkhorn_knopp_teacher(logits[:n_cls], teacher_temp).view(2, -1, logits.shape[-1])
        # iBOTPatchLoss.sinkhorn_knopp_teacher all-reduces unconditionally (needs a process group);
        # with one rank and no padding it is DINOLoss's algorithm on the masked rows
        t_patch = self.dino_loss.sinkhorn_knopp_teacher(logits[n_cls:n_cls + n_masked], teacher_temp)
        return t_cls, t_patch

    def __call__(self, batch, dtype, device):
        from model.ssl import normalize_images
        glob, loc = normalize_images(batch["global_crops"]), normalize_images(batch["local_crops"])
        masks, idx, weight = batch["masks"], batch["mask_indices_list"], batch["masks_weight"]
        n_masked, upperbound = idx.shape[0], int(batch["upperbound"])
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bf16"):
            with torch.no_grad():
                t_cls, t_patch = self._teacher(glob, idx, upperbound, 0.07)
            s_glob = _ref_features(self.student["backbone"], glob, masks, self.drop_add)
            s_loc = _ref_features(self.student["backbone"], loc, None, self.drop_add)
            patches = s_glob["x_norm_patchtokens"]
            buf = patches.new_zeros(upperbound, patches.shape[-1])
            buf[:n_masked].copy_(torch.index_select(patches.flatten(0, 1), 0, idx))
            heads_in = [s_loc["x_norm_clstoken"], s_glob["x_norm_clstoken"], buf]
            out = self.student["dino_head"](torch.cat(heads_in)).split([t.shape[0] for t in heads_in])
            n_terms = 2 * self.n_local + 2
            loss = self.dino_loss(out[0].chunk(self.n_local), t_cls) / n_terms
            loss = loss + self.dino_loss([out[1]], [t_cls.flatten(0, 1)]) * 2 / n_terms
            loss = loss + 0.1 * sum(self.koleo(p) for p in s_glob["x_norm_clstoken"].chunk(2))
            loss = loss + self.ibot_loss.forward_masked(out[2][:n_masked], t_patch, masks, n_masked, weight)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            t_params, s_params = list(self.teacher.parameters()), list(self.student.parameters())
            torch._foreach_mul_(t_params, 0.994)
            torch._foreach_add_(t_params, s_params, alpha=1 - 0.994)
        return loss


def head_flops(head, batch, n_local):
    """Head FLOPs of one step (the tied head, as both rows run it): the student's forward + backward
    (3x) on its CLS rows (global and local crops) and masked patch rows, the teacher's forward on
    its CLS and masked rows; per row, 2 x the head's weight elements (its linear layers and the
    prototypes). Losses, Sinkhorn and the optimiser are left out."""
    per_row = 2 * sum(p.numel() for n, p in head.named_parameters() if n.endswith(("weight", "weight_v")))
    n_cls, n_masked = batch["global_crops"].shape[0], batch["mask_indices_list"].numel()
    n_loc = batch["local_crops"].shape[0] if n_local else 0
    return per_row * (3 * (n_cls + n_loc + n_masked) + (n_cls + n_masked))


def gemm_peak(embed_dim, tokens, dtype, device, repeats=5):
    """The best FLOP/s of the backbone's own matrix products ([tokens x D] by the qkv, fc1, fc2 and
    proj weights, forward and weight-gradient layouts) in this process: the rate no step can beat."""
    cdt = torch.bfloat16 if dtype == "bf16" else torch.float32
    best = 0.0
    for k, n in ((embed_dim, 3 * embed_dim), (embed_dim, 4 * embed_dim), (4 * embed_dim, embed_dim)):
        for a, b in (((tokens, k), (k, n)), ((n, tokens), (tokens, k))):
            x, w = torch.randn(*a, device=device).to(cdt), torch.randn(*b, device=device).to(cdt)
            for _ in range(repeats):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                x @ w
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                best = max(best, 2 * a[0] * a[1] * b[1] / (time.perf_counter() - t0))
    return best


def bench_arch(arch, args, dtype, device):
    torch.manual_seed(0)
    steps = {"model/": OursStep(arch, args, device)}
    if args.reference:
        steps["reference"] = RefStep(arch, args, device)
    batch = make_batch(args.batch, args.n_local, args.global_size, args.local_size, args.patch_size, device)
    if args.gemms:
        steps["gemms"] = GemmsStep(steps["model/"], batch, dtype, device)
        print(f"{arch} model/'s matrix products: {len(steps['gemms'].calls)} per step, "
              f"{steps['gemms'].flops / 1e9:.1f} GFLOP", flush=True)
    times: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(args.warmup + args.repeats):  # interleaved: rows share the machine's load alike
        order = list(steps.items())  # and in turns first (ABBA...): neither row always follows the other
        for name, step in (order if rep % 2 == 0 else order[::-1]):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step(batch, dtype, device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            tag = "warmup" if rep < args.warmup else f"rep {rep - args.warmup}"
            shown = f"  loss {loss.item():.4f}" if loss is not None else ""
            print(f"  {arch} {name:9s} {tag:6s} {dt:7.2f} s wall {dc:7.2f} s CPU  load {os.getloadavg()[0]:4.1f}"
                  f"{shown}", flush=True)
            if rep >= args.warmup:
                times[name].append(dt)
                cpu[name].append(dc)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps["model/"](batch, dtype, device)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), flush=True)
    fl = ssl_flops_per_image(arch, args.patch_size, args.global_size, args.local_size, 2, args.n_local)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    for name, s in med.items():
        ips = args.batch / s
        print(f"{arch:10s} {name:9s} {dtype:4s} batch {args.batch} (2x{args.global_size} + "
              f"{args.n_local}x{args.local_size}): {s:8.3f} s/step (median of {len(times[name])})"
              f"  {ips:6.3f} images/s  {ips * fl / 1e9:6.1f} backbone GFLOP/s"
              f"  {med_cpu[name]:8.3f} CPU-s/step", flush=True)
    if args.peak:
        n_tok = args.batch * 2 * ((args.global_size // args.patch_size) ** 2 + 1)
        student = steps["model/"].model.student
        peak = gemm_peak(student["backbone"].embed_dim, n_tok, dtype, device)
        total = args.batch * fl + head_flops(student["dino_head"], batch, args.n_local)
        print(f"{arch:10s} {dtype} GEMM peak at the backbone's shapes {peak / 1e9:7.1f} GFLOP/s; backbone + head "
              f"FLOPs {total / 1e9:.1f} GFLOP/step", flush=True)
        for name, s in med.items():
            print(f"{arch:10s} {name:9s} {total / s / 1e9:7.1f} GFLOP/s = {total / s / peak:5.1%} of the peak",
                  flush=True)
        if "reference" in med:
            print(f"{arch:10s} 1.5x the reference needs {1.5 * total / med['reference'] / peak:5.1%} of the peak",
                  flush=True)
    if "gemms" in med:
        rate = steps["gemms"].flops / med["gemms"] / 1e9
        print(f"{arch:10s} model/'s matrix products alone {med['gemms']:.3f} s/step, {rate:.1f} GFLOP/s: "
              f"{med['gemms'] / med['model/']:.1%} of model/'s step", flush=True)
        if "reference" in med:
            bound = sorted(r / g for r, g in zip(times["reference"], times["gemms"]))
            print(f"{arch:10s} the most model/ can be with these products: {med['reference'] / med['gemms']:.2f}x the "
                  f"reference (paired: median {statistics.median(bound):.2f}x, range {bound[0]:.2f}-{bound[-1]:.2f}x)",
                  flush=True)
    if "reference" in med:
        # on a shared machine the CPU seconds a step consumes vary less than its wall time; the paired
        # ratios (each repeat's two steps, run back to back) follow the host's drift less than the medians
        pairs = sorted(r / m for r, m in zip(times["reference"], times["model/"]))
        print(f"{arch:10s} model/ vs reference: {med['reference'] / med['model/']:.2f}x images/s (wall),"
              f" {med_cpu['reference'] / med_cpu['model/']:.2f}x (CPU seconds per step); paired:"
              f" median {statistics.median(pairs):.2f}x, range {pairs[0]:.2f}-{pairs[-1]:.2f}x", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="vit_small", help="comma-separated model/vit.py ARCHS names")
    p.add_argument("--reference", default=None,
                   help="directory holding the reference `dinov2` package (see above); none: model/ only")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--n-local", type=int, default=8)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=98)
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--prototypes", type=int, default=65536)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per row (interleaved)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true",
                   help="model/ row: torch.compile each block's residual branches (give --warmup 2: compiling)")
    p.add_argument("--peak", action="store_true",
                   help="also time the backbone's GEMM shapes alone and print each row's share of that peak")
    p.add_argument("--gemms", action="store_true",
                   help="also time model/'s matrix products alone (replayed): the bound of model/'s speed-up")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's op table of one model/ step")
    p.add_argument("--default-allocator", action="store_true",
                   help="CPU: leave glibc's allocator as it comes (freed memory returned, page faults each step)")
    args = p.parse_args(argv)
    if args.reference:
        sys.path.insert(0, str(Path(args.reference).resolve()))
    torch.set_num_threads(args.threads)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if native_bf16(args.device) else "fp32")
    print(f"device {args.device} ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} "
          f"threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs), torch {torch.__version__}, "
          f"dtype {dtype}", flush=True)
    if args.device == "cpu":
        host = prepare_cpu_process(keep_memory=not args.default_allocator)
        print(f"CPU process as the training workers' {host}" + ("" if host["keep_freed_memory"] else
              "; glibc default: page faults of large tensors vary from run to run and move the ratio"), flush=True)
    for arch in args.archs.split(","):
        bench_arch(arch, args, dtype, args.device)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print("analytical forward FLOPs per image (backbone, patch 14):")
    for arch in ("vit_small", "vit_base", "vit_large", "vit_giant2"):
        print(f"  {arch:10s} 224px {flops_per_image(arch, 224, 14) / 1e9:7.2f} GFLOP"
              f"  518px {flops_per_image(arch, 518, 14) / 1e9:8.2f} GFLOP"
              f"  train step (2x224+8x98, fwd+bwd+teacher) {ssl_flops_per_image(arch) / 1e9:8.2f} GFLOP")


if __name__ == "__main__":
    main()
