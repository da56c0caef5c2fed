"""Model benchmark: images/s of one DINOv2 student-teacher forward+backward step, and analytical FLOPs.

Run (from the repo root):
    .venv/bin/python bench/model.py                      # tiny + ViT-S/14, batch 8, 2x224 + 8x98 crops
    .venv/bin/python bench/model.py --archs vit_small --dtype bf16 --steps 3

A step is: teacher forward on the global crops (no grad), student forward on global (masked) and
local crops, heads, DINO + iBOT + KoLeo losses, backward. Inputs are random uint8 crops with iBOT
masks. `--dtype auto` uses bf16 autocast where the CPU has native bf16 matmuls (AMX / AVX512-BF16)
or on CUDA, fp32 otherwise (bf16 autocast is emulated and ~10x slower on AVX2-only CPUs).
Prints one line per model, then analytical FLOPs per image for ViT-S/B/L/g.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import SSLMetaArch, flops_per_image, ssl_flops_per_image  # noqa: E402
from model.masking import collate_masks  # noqa: E402


def native_bf16(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    cap = torch.backends.cpu.get_cpu_capability()
    return "AVX512" in cap and ("BF16" in cap or "AMX" in cap)


def make_batch(B, n_local, gsize, lsize, patch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "global_crops": torch.randint(0, 256, (2 * B, 3, gsize, gsize), dtype=torch.uint8, generator=g),
        "local_crops": torch.randint(0, 256, (n_local * B, 3, lsize, lsize), dtype=torch.uint8, generator=g),
        "labels": torch.full((B,), -1, dtype=torch.long),
    }
    batch.update(collate_masks(2 * B, gsize // patch, g))
    return {k: v.to(device) for k, v in batch.items()}


def bench_step(arch, args, dtype, device):
    torch.manual_seed(0)
    model = SSLMetaArch({"arch": arch, "patch_size": args.patch_size, "img_size": args.global_size,
                         "drop_path_rate": 0.1 if arch != "vit_tiny" else 0.0,
                         "ibot_separate_head": False}).to(device).train()  # tied heads, as the reference's default
    batch = make_batch(args.batch, args.n_local, args.global_size, args.local_size, args.patch_size, device)
    times = []
    for i in range(args.warmup + args.steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss, _ = model(batch, teacher_temp=0.07)
        loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    ips = args.batch / step_s
    fl = ssl_flops_per_image(arch, args.patch_size, args.global_size, args.local_size, 2, args.n_local)
    print(f"{arch:10s} {dtype:4s} batch {args.batch} (2x{args.global_size} + {args.n_local}x{args.local_size}):"
          f" {step_s:8.3f} s/step  {ips:8.2f} images/s  {ips * fl / 1e9:8.1f} backbone GFLOP/s"
          f"  loss {loss.item():.3f}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="vit_tiny,vit_small")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--n-local", type=int, default=8)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=98)
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if native_bf16(args.device) else "fp32")
    print(f"device {args.device} ({torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}, dtype {dtype}")
    for arch in args.archs.split(","):
        bench_step(arch, args, dtype, args.device)
    print("analytical forward FLOPs per image (backbone, patch 14):")
    for arch in ("vit_small", "vit_base", "vit_large", "vit_giant2"):
        print(f"  {arch:10s} 224px {flops_per_image(arch, 224, 14) / 1e9:7.2f} GFLOP"
              f"  518px {flops_per_image(arch, 518, 14) / 1e9:8.2f} GFLOP"
              f"  train step (2x224+8x98, fwd+bwd+teacher) {ssl_flops_per_image(arch) / 1e9:8.2f} GFLOP")


if __name__ == "__main__":
    main()
