#!/usr/bin/env bash
# One-GPU throughput check (H100/H200, about 5 minutes): DINOv2 student-teacher training steps of
# ViT-L/14 and ViT-g/14 (as many of ViT-g's 40 blocks as fit) at the paper's crops (2 x 224 px
# global + 8 x 98 px local, iBOT masking, 65536 prototypes), bf16 autocast, SDPA attention, fused
# AdamW, EMA teacher. Prints images/s and MFU against the bf16 matmul peak measured in this run.
#
#   bash bench/gpu.sh            # needs python3 with a CUDA build of torch; PYTHON=... to override
#
# MFU = analytical backbone FLOPs per step (student fwd+bwd on all crops + teacher fwd on the global
# crops, model.flops_per_image) / step time / measured peak. Heads and losses are not counted.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"${PYTHON:-python3}" - "$@" <<'EOF'
import time, sys, torch
from model import SSLMetaArch, flops_per_image, schedules
from model.masking import collate_masks

assert torch.cuda.is_available(), "bench/gpu.sh needs a CUDA GPU"
dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True
print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)

def peak_bf16(n=8192, iters=50):
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.perf_counter() - t)

PEAK = peak_bf16()
print(f"measured bf16 matmul peak: {PEAK / 1e12:.0f} TFLOP/s", flush=True)

G, L, NL, B = 224, 98, 8, 32   # paper crops; 32 images per GPU as in the ViT-g recipe (3072 / 96)

def batch(g):
    return {"global_crops": torch.randint(0, 256, (2 * B, 3, G, G), dtype=torch.uint8, generator=g).to(dev),
            "local_crops": torch.randint(0, 256, (NL * B, 3, L, L), dtype=torch.uint8, generator=g).to(dev),
            **{k: v.to(dev) for k, v in collate_masks(2 * B, G // 14, g).items()}}

def run(arch, depth=None, steps=10, warmup=3):
    cfg = dict(arch=arch, patch_size=14, img_size=G, ibot_separate_head=True, head_n_prototypes=65536,
               ibot_n_prototypes=65536, drop_path_rate=0.4 if arch == "vit_giant2" else 0.3,
               layerscale_init=1e-5)
    meta = SSLMetaArch(cfg, device="meta")
    full = meta.student["backbone"].n_blocks
    depth = depth or full
    for tower in (meta.student, meta.teacher):
        bb = tower["backbone"]
        bb.blocks = bb.blocks[:depth]
        bb.n_blocks = depth
    meta.to_empty(device=dev)
    meta.init_weights()
    meta.train()
    opt = torch.optim.AdamW(schedules.param_groups(meta.student, layer_decay=0.9), lr=1e-4, fused=True)
    for gr in opt.param_groups:
        gr.pop("names", None)
    g = torch.Generator().manual_seed(0)
    data = [batch(g) for _ in range(2)]
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize(); t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, parts = meta(data[i % 2], teacher_temp=0.07)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(meta.student.parameters(), 3.0)
        opt.step()
        meta.update_ema_(0.994)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    scale = depth / full
    f_img = 3 * (2 * flops_per_image(arch, G) + NL * flops_per_image(arch, L)) + 2 * flops_per_image(arch, G)
    flops = B * f_img * scale
    mem = torch.cuda.max_memory_allocated() / 2**30
    print(f"{arch:11s} depth {depth:2d}/{full}  batch {B}  step {dt * 1e3:7.1f} ms  "
          f"{B / dt:7.1f} img/s  MFU {flops / dt / PEAK:5.1%}  peak mem {mem:5.1f} GiB  loss {loss.item():.3f}",
          flush=True)
    del meta, opt, data
    torch.cuda.empty_cache()

run("vit_large")
for depth in (40, 32, 24, 16, 8):
    try:
        run("vit_giant2", depth)
        break
    except torch.cuda.OutOfMemoryError:
        print(f"vit_giant2  depth {depth}: out of memory, trying fewer blocks", flush=True)
        torch.cuda.empty_cache()
EOF
