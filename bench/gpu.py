"""One-GPU throughput of dinoray's own training step (bench/gpu.sh runs it; needs a CUDA torch).

    python3 bench/gpu.py                                   # the default rows on ViT-L/14, then ViT-g/14
    python3 bench/gpu.py --archs vit_large --variants fsdp2,fsdp2+compile --profile fsdp2

Each row builds the step a job runs (orchestrator/training/backends.py: zero_grad, forward, backward,
clip + AdamW, EMA) from the recipe's job file (jobs/vitl14_pipeline.yaml or vitg14_pipeline.yaml,
pretrain phase, its model section: stochastic depth, prototypes, heads) at 32 images per GPU, one
rank (NCCL, world 1), paper crops 2 x 224 + 8 x 98 with iBOT masks, on batches made on the GPU (no
loader). The variants differ only in the job keys named below, so the rows compare like with like.

MFU is reported twice, against the bf16 matmul peak measured in this run:
- model: the backbone FLOPs of the step as if every sample ran every block (model.ssl_flops_per_image;
  the usual MFU, and the figure earlier rounds reported);
- done: the FLOPs the step actually does. Stochastic depth runs a dropped sample's residual branches
  not at all (model/layers.py), so at drop_path_rate 0.4 the student's blocks do ~60% of the model FLOPs.
  It still counts every token in the last block, which runs only on the tokens a loss reads
  (Block._forward_read; uncompiled variants): an over-count of up to ~3/4 of one block of `depth`.
Heads and losses are counted in neither.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model.masking import collate_masks  # noqa: E402
from model.vit import ARCHS, flops_per_image  # noqa: E402

JOBS = {"vit_large": "jobs/vitl14_pipeline.yaml", "vit_giant2": "jobs/vitg14_pipeline.yaml"}
# A variant is BASE[+OPTION...], e.g. "autocast+b64+cudagraphs". BASE -> the job overrides it sets.
BASES = {
    # fp32 parameters, bf16 autocast, no sharding: the ddp backend at one rank (bench/gpu.sh's rows
    # before this file: 35.1% for ViT-L at drop_path 0.3, 65,536 prototypes)
    "autocast": ["backend=ddp", "precision.param_dtype=fp32"],
    # the recipes' backend: FSDP2 with bf16 compute parameters, fp32 gradient reduction
    "fsdp2": ["backend=fsdp2"],
}
# OPTION -> job overrides; "b64" is 64 images per GPU instead of the recipes' 32
OPTIONS = {
    "compile": ["fsdp.compile=true"],  # student's and teacher's blocks torch.compile'd
    "cudagraphs": ["fsdp.compile=true", "fsdp.cudagraphs=true"],  # ...replayed as CUDA graphs (ddp only)
    "noreshard": ["fsdp.reshard_after_forward=false"],  # fsdp2: the student's gathered params kept fwd -> bwd
    "b64": [],
}
DEFAULT_VARIANTS = "autocast,autocast+cudagraphs,fsdp2,autocast+b64+cudagraphs"


def parse_variant(variant: str) -> tuple[str, set[str]]:
    base, *opts = variant.split("+")
    unknown = [o for o in opts if o not in OPTIONS]
    if base not in BASES or unknown:
        raise SystemExit(f"variant {variant!r}: base must be one of {list(BASES)}, options of {list(OPTIONS)}")
    return base, set(opts)


G, L, NL = 224, 98, 8  # paper crops
# --cpu-check: the same code on a pico model on CPU (gloo), to catch a broken script before device time
CPU_CHECK_SETS = ["model.arch=vit_pico", "model.head_n_prototypes=256", "model.ibot_n_prototypes=256",
                  "model.head_bottleneck_dim=64", "precision.autocast=fp32", "precision.param_dtype=fp32",
                  "model.drop_path_rate=0.0"]  # on CPU, stochastic depth takes another path (model/drop_path.py)


def peak_bf16(dev, n=8192, iters=50) -> float:
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.perf_counter() - t)


def step_flops(arch: str, depth: int, drop_path: float, B: int) -> tuple[float, float]:
    """(model, done) backbone FLOPs of one step at batch B, `depth` blocks (see the module doc)."""
    dim, full, _, _ = ARCHS[arch]

    def parts(size):  # (patch embedding, all blocks) forward FLOPs of one image
        embed = 2 * (size // 14) ** 2 * 3 * 14 * 14 * dim
        return embed, (flops_per_image(arch, size) - embed) * depth / full

    def kept(rows):  # model/layers.py Block._draw_kept: max(int(rows * (1 - p)), 1) of `rows` samples
        return max(int(rows * (1.0 - drop_path)), 1) / rows if drop_path > 0 else 1.0

    (eg, bg), (el, bl) = parts(G), parts(L)
    model = B * (3 * (2 * (eg + bg) + NL * (el + bl)) + 2 * (eg + bg))
    done = B * (3 * (2 * (eg + bg * kept(2 * B)) + NL * (el + bl * kept(NL * B))) + 2 * (eg + bg))
    return model, done


def make_batches(dev, job, B, n=2):
    g = torch.Generator().manual_seed(0)
    m = job.model
    out = []
    for _ in range(n):
        out.append({"global_crops": torch.randint(0, 256, (2 * B, 3, G, G), dtype=torch.uint8, generator=g).to(dev),
                    "local_crops": torch.randint(0, 256, (NL * B, 3, L, L), dtype=torch.uint8, generator=g).to(dev),
                    **{k: v.to(dev) for k, v in collate_masks(2 * B, G // 14, g, m.mask_ratio_min_max,
                                                              m.mask_probability).items()}})
    return out


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def build(arch: str, variant: str, depth: int | None, dev, B: int):
    from orchestrator.pipeline import config
    from orchestrator.training import backends, setup
    base, opts = parse_variant(variant)
    sets = ["num_workers=1", f"optim.batch_size={B}", "storage=/tmp/dinoray-gpu-bench"] + BASES[base]
    sets += [s for o in sorted(opts) for s in OPTIONS[o]]
    sets += CPU_CHECK_SETS if dev.type == "cpu" else []
    job = config.load_job(JOBS[arch], sets)
    r = config.resolve(job, "pretrain")
    meta = setup.build_meta(job, r, None)
    full = meta.student["backbone"].n_blocks
    depth = depth or full
    for tower in (meta.student, meta.teacher):  # fewer blocks when the whole model does not fit
        bb = tower["backbone"]
        bb.blocks = bb.blocks[:depth]
        bb.n_blocks = depth
    b = backends.build(meta, job, dev, r.optim)
    for gr in b.optimizer.param_groups:
        gr["lr"], gr["weight_decay"] = 1e-4, 0.04
    return job, r, b, depth, full


def one_step(b, batch):
    b.zero_grad()
    loss, _ = b.forward(batch, teacher_temp=0.07)
    b.backward(loss)
    b.step(3.0)
    b.ema_(0.994)
    return loss


def run(arch, variant, dev, peak, depth=None, steps=10, warmup=4, profile=False, out_dir=None):
    warmup = 1 if dev.type == "cpu" else warmup
    B = 64 if "b64" in parse_variant(variant)[1] else 32  # 32 images per GPU: both recipes
    job, r, b, depth, full = build(arch, variant, depth, dev, B)
    data = make_batches(dev, job, B)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            sync(dev)
            first, t = time.perf_counter() - t0, time.perf_counter()
        loss = one_step(b, data[i % 2])
    sync(dev)
    dt = (time.perf_counter() - t) / steps
    model, done = step_flops(r.model.arch, depth, r.model.drop_path_rate, B)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0
    print(f"{arch:10s} {variant:24s} {depth:2d}/{full} dp {r.model.drop_path_rate:.1f} "
          f"protos {r.model.head_n_prototypes:6d}  step {dt * 1e3:6.1f} ms  {B / dt:6.1f} img/s  "
          f"MFU model {model / dt / peak:5.1%} done {done / dt / peak:5.1%}  mem {mem:5.1f} GiB  "
          f"warm-up {first:5.1f} s  loss {loss.item():.3f}", flush=True)
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for i in range(3):
                one_step(b, data[i % 2])
            sync(dev)
        ka = p.key_averages()
        table = ka.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70)
        if out_dir:
            with open(os.path.join(out_dir, f"profile-{arch}-{variant.replace('+', '_')}.txt"), "w") as fh:
                fh.write(table)
        from torch.autograd import DeviceType
        busy = sum(e.self_device_time_total for e in ka if e.device_type == DeviceType.CUDA) / 3 / 1e3
        print(f"  profile: GPU busy {busy:.1f} ms of a {dt * 1e3:.1f} ms step ({busy / (dt * 1e3):.0%}); top kernels:")
        for line in table.splitlines()[:22]:
            print("  " + line[:150])
    del b, data
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", default="vit_large,vit_giant2", help="comma-separated: vit_large, vit_giant2")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated BASE[+OPTION...], bases {list(BASES)}, options {list(OPTIONS)}")
    p.add_argument("--giant-variant", default="autocast+cudagraphs",
                   help="the variant ViT-g runs (one: it is slow to build)")
    p.add_argument("--profile", default="", help="comma-separated variants to profile after timing (ViT-L only)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for the profile tables")
    p.add_argument("--cpu-check", action="store_true",
                   help="the same code on CPU with a pico model (2 steps a row): checks the script, times nothing")
    args = p.parse_args(argv)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if args.cpu_check:
        dev, peak, args.steps = torch.device("cpu"), 1e12, 2
        dist.init_process_group("gloo", rank=0, world_size=1)
    else:
        assert torch.cuda.is_available(), "bench/gpu.py needs a CUDA GPU (or --cpu-check)"
        dev = torch.device("cuda", 0)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
        peak = peak_bf16(dev)
        print(f"measured bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s", flush=True)
    profiled = set(filter(None, args.profile.split(",")))
    for arch in args.archs.split(","):
        variants = args.variants.split(",") if arch != "vit_giant2" else [args.giant_variant]
        for variant in variants:
            depths = (None,) if arch != "vit_giant2" else (None, 32, 24, 16)
            for depth in depths:
                try:
                    run(arch, variant, dev, peak, depth, steps=args.steps,
                        profile=variant in profiled and arch == "vit_large", out_dir=args.out)
                    break
                except torch.OutOfMemoryError:
                    print(f"{arch} {variant} depth {depth}: out of memory, trying fewer blocks", flush=True)
                    gc.collect()
                    torch.cuda.empty_cache()
                except Exception as exc:  # one broken variant must not cost the others' device time
                    print(f"{arch} {variant}: FAILED {type(exc).__name__}: {str(exc)[:400]}", flush=True)
                    if args.cpu_check:
                        raise
                    gc.collect()
                    torch.cuda.empty_cache()
                    break
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
