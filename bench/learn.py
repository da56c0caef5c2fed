"""Learning benchmark: k-NN accuracy on CIFAR-10 against pretraining time (a benchmark, not a CI test).

    .venv/bin/python bench/learn.py                          # 60 min of training (--minutes), ~65 min wall
    .venv/bin/python bench/learn.py --minutes 24             # the schedule fitted to 24 min instead
    .venv/bin/python bench/learn.py --steps 300 --evals 3    # a quick look (~5 min)
    .venv/bin/python bench/learn.py --job jobs/smoke_cpu.yaml --set optim.base_lr=0.002 ...

What it does, in one process (no Ray, so no per-phase start-up cost):
  1. decodes the labelled CIFAR-10 shards (data.eval_train / data.eval_test of the job) once, with the
     same preprocessing as `dinoray eval knn` (orchestrator.eval.knn);
  2. prints the baselines measured with the same k-NN (k=20 and 10, T=0.07, cosine, the whole train
     split as memory bank, the test split as queries): raw pixels (mean-centred, L2-normalised) and a
     randomly initialised backbone of the trained arch without LayerScale;
  3. pretrains the job's `pretrain` phase (model, crops, optim of the job file, then BENCH_SETS, then
     --set) on the train shards without labels: the worker loop of orchestrator/training/worker.py
     (schedules -> loss under the job's autocast -> backward -> clip -> AdamW -> EMA), on one rank
     with the global batch, the process set up as a CPU worker's (batches made in this process between
     steps unless --loader-workers), for --minutes of training,
     with the schedules fitted to that budget from the measured step time
     (after --fit-after steps, then again at each k-NN point from the steps since the last fit);
  4. runs the k-NN on the EMA teacher's backbone (what the pipeline exports) at --evals points and
     prints the curve: step, images seen, training seconds (k-NN time excluded), k-NN top-1.

Data: the job's shards (build them with `.venv/bin/python -m orchestrator.demo --shards-only`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import build_backbone, normalize_images  # noqa: E402
from model.schedules import apply_schedules, param_groups  # noqa: E402
from orchestrator.pipeline import config  # noqa: E402
from orchestrator.eval import features, knn as evaluate  # noqa: E402
from orchestrator.training import setup  # noqa: E402
from orchestrator.training.backends import autocast_dtype  # noqa: E402
from orchestrator.data.loader import MultiCropLoader  # noqa: E402

# The 60-minute recipe on top of the smoke job (whose values and reasons are in jobs/smoke_cpu.yaml):
# the same crops and optimiser, a wider backbone; the schedule's length is fitted to --minutes (run() below).
BENCH_SETS = [
    "model.arch=vit_nano",                   # pico at twice the width: 1.35-1.45x its step on an AMX CPU; the hour
                                             # ends at 60.02% against pico's 56.88% (docs/learning.md, 7th round)
    "optim.warmup_iters=30",
    "optim.momentum_teacher=[0.96,0.996]",   # the teacher slows down over a long run, as in the paper
    "optim.base_lr=0.004",                   # 8-min budgets: 0.002 / 0.004 / 0.008 / 0.016 gave 41.8 / 43.0 / 41.9 /
    "optim.min_lr=0.0007",                   # 39.3% (docs/learning.md); the cosine still ends at half the peak
]


def load_split(url: str, image_size: int, cache: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 3, S, S] and int64 [N] of a labelled shard set (evaluate's decode + resize)."""
    if cache and os.path.exists(cache):
        d = torch.load(cache, weights_only=True)
        return d["x"], d["y"]
    imgs, labels = [], []
    for data, label in features.iter_labelled(url):
        imgs.append(features.to_tensor(data, image_size))
        labels.append(label)
    x, y = torch.stack(imgs), torch.tensor(labels)
    if cache:
        torch.save({"x": x, "y": y}, cache)
    return x, y


@torch.no_grad()
def embed(net: torch.nn.Module, x: torch.Tensor, bs: int = 512) -> torch.Tensor:
    was = net.training
    net.eval()
    out = torch.cat([F.normalize(net(normalize_images(x[i:i + bs])).float(), dim=-1) for i in range(0, len(x), bs)])
    net.train(was)
    return out


def knn(net, data, ks=(20, 10)) -> dict[int, float]:
    (xtr, ytr), (xte, yte) = data
    return evaluate.knn_accuracy(embed(net, xtr), ytr, embed(net, xte), yte, ks=ks, temperature=0.07)


def raw_pixels(data, ks=(20, 10)) -> dict[int, float]:
    (xtr, ytr), (xte, yte) = data
    ftr, fte = xtr.flatten(1).float(), xte.flatten(1).float()
    mean = ftr.mean(0)
    return evaluate.knn_accuracy(F.normalize(ftr - mean, dim=-1), ytr, F.normalize(fte - mean, dim=-1), yte,
                                 ks=ks, temperature=0.07)


def make_loader(job, r, aug: dict, num_workers: int) -> MultiCropLoader:
    m = r.model
    crops = {**dataclasses.asdict(r.crops), **aug}
    mask = dict(mask_ratio_min_max=tuple(m.mask_ratio_min_max), mask_probability=m.mask_probability)
    return MultiCropLoader(job.data.train, batch_size=r.optim.batch_size, rank=0, world_size=1, seed=job.seed,
                           crops=crops, patch_size=m.patch_size, mask=mask, num_workers=num_workers)


def pct(acc: dict) -> str:
    return " ".join(f"k={k} {100 * v:5.2f}%" for k, v in acc.items())


def run(meta, evaluated, job, r, data, args, t_wall, label, fixed: bool) -> list:
    """The worker loop of orchestrator/training/worker.py on one rank; k-NN of `evaluated` along the way.

    A training-time budget (--minutes) unless `fixed` (--steps, --distill-steps) keeps the phase's
    length: the schedules are built for a provisional 100 x --fit-after steps (so that up to the fit the
    cosine has barely started: the rate stays within 0.1% of the peak), and after --fit-after steps rebuilt
    for the steps that fit the budget at the measured step time (never shorter than the warm-up), so the
    cosine ends when the budget does.
    k-NN at --evals evenly spaced points of training time (of steps when fixed)."""
    steps, o = r.phase.steps if fixed else 100 * args.fit_after, r.optim
    opt = torch.optim.AdamW(param_groups(meta.student, layer_decay=o.layer_decay,
                                         patch_embed_lr_mult=o.patch_embed_lr_mult), lr=0.0, betas=o.adamw_betas)
    sched = setup.step_schedules(o, steps)
    compute = autocast_dtype(job.precision.autocast, torch.device("cpu"))  # as the workers' backend does
    loader = make_loader(job, r, json.loads(args.aug), args.loader_workers)
    budget = args.minutes * 60
    # k-NN points: evenly spaced in steps for a fixed length, else in training time
    marks = [(steps if fixed else budget) * (i + 1) / args.evals for i in range(args.evals)]
    print(f"[{label}] compute {compute}, batch {o.batch_size}, at most {budget / 60:g} min of training, "
          + (f"{steps} steps; k-NN at step 0 and steps {', '.join(f'{m:.0f}' for m in marks)}"
             if fixed else f"steps fitted to the budget after {args.fit_after}; k-NN at 0 and "
             f"{', '.join(f'{m / 60:g}' for m in marks)} min"), flush=True)
    print(f"{'step':>6} {'images':>8} {'train_s':>8} {'wall_s':>7} {'img/s':>6} {'loss':>7}  k-NN top-1", flush=True)
    acc = knn(evaluated, data)
    print(f"{0:>6} {0:>8} {0.0:>8.0f} {time.perf_counter() - t_wall:>7.0f} {'':>6} {'':>7}  {pct(acc)}", flush=True)
    curve = [(0, 0.0, acc)]
    it, step, train_s, losses = iter(loader), 0, 0.0, []
    fit_at = None  # (step, train_s) of the last fit of the schedules to the budget
    while step < steps:
        t_step = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        vals = apply_schedules(opt, sched, step)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32):
            loss, parts = meta(batch, teacher_temp=vals["teacher_temp"])
        loss.backward()
        params = [p for p in meta.student.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, o.clip_grad)
        opt.step()
        meta.update_ema_(vals["momentum"])
        step += 1
        losses.append(loss.item())
        train_s += time.perf_counter() - t_step
        if step == 5:
            warm_s = train_s  # the first steps are slower (allocations, loader start-up): not timed for the fit
        if step == args.fit_after and not fixed:
            per_step = (train_s - warm_s) / (step - 5)
            steps = max(step + 1, o.warmup_iters + 1, step + int((budget - train_s) / per_step))
            sched = setup.step_schedules(o, steps)
            fit_at = (step, train_s)
            print(f"[{label}] {per_step:.3f} s/step over steps 6-{step}: the schedules now span "
                  f"{steps} steps ({steps * o.batch_size / loader.total:.1f} epochs)", flush=True)
        elif fit_at and marks and train_s >= marks[0] and train_s < budget:
            # Refit at each k-NN mark from the steps since the last fit: the step time drifts here (0.47-0.77
            # s/step within one hour), and a schedule fitted once ended the fourth round's hour 12 min early.
            per_step = (train_s - fit_at[1]) / (step - fit_at[0])
            refit = max(step + 1, o.warmup_iters + 1, step + int((budget - train_s) / per_step))
            if abs(refit - steps) > 0.01 * steps:
                print(f"[{label}] {per_step:.3f} s/step over steps {fit_at[0] + 1}-{step}: the schedules now "
                      f"span {refit} steps (were {steps})", flush=True)
                steps, sched = refit, setup.step_schedules(o, refit)
            fit_at = (step, train_s)
        over = train_s >= budget
        line = (f"{step:>6} {step * o.batch_size:>8} {train_s:>8.0f} {time.perf_counter() - t_wall:>7.0f} "
                f"{step * o.batch_size / train_s:>6.0f} {np.mean(losses[-20:]):>7.3f}  ")
        at = step if fixed else train_s
        if (marks and at >= marks[0]) or over or step == steps:
            while marks and at >= marks[0]:
                marks.pop(0)
            acc = knn(evaluated, data)
            curve.append((step, train_s, acc))
            print(line + pct(acc), flush=True)
        elif args.progress and step % args.progress == 0:
            print(line + " ".join(f"{k} {float(v):.3f}" for k, v in parts.items()), flush=True)
        if over and step < steps:
            print(f"stopped at step {step}/{steps}: --minutes {args.minutes} of training reached", flush=True)
            break
    return curve


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default="jobs/smoke_cpu.yaml")
    ap.add_argument("--set", action="append", default=[], help="job override a.b=c (after BENCH_SETS)")
    ap.add_argument("--no-bench-sets", action="store_true", help="train the job's pretrain phase as it is")
    ap.add_argument("--steps", type=int, default=None,
                    help="a fixed schedule length (--set phases.pretrain.steps=N) instead of one fitted to --minutes")
    ap.add_argument("--minutes", type=float, default=60.0,
                    help="training-time budget (k-NN time excluded); the schedules end with it unless --steps")
    ap.add_argument("--fit-after", type=int, default=60,
                    help="the schedules are fitted to the budget from the time of steps 6 to this one (> 5)")
    ap.add_argument("--evals", type=int, default=10,
                    help="k-NN points evenly spaced in training time, or in steps with --steps (plus step 0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loader-workers", type=int, default=0,
                    help="DataLoader processes doing the augmentation; 0: in the training process, between steps "
                         "(on 2 cores a loader process takes CPU from the step's 2 threads: 60-step A/B, "
                         "twice, 0.381 / 0.382 s/step in process against 0.408 / 0.407 with 1 process)")
    ap.add_argument("--aug", default="{}", help='extra MultiCrop args as JSON, e.g. {"blur_p": [0.5, 0.1, 0.2]}')
    ap.add_argument("--train-limit", type=int, default=None, help="k-NN memory bank size (default: whole split)")
    ap.add_argument("--cache", default=None, help="folder to keep the decoded eval images in (faster reruns)")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--distill-steps", type=int, default=0,
                    help="then distill the trained teacher into the job's distill student for N steps")
    ap.add_argument("--save", default=None, help="save the pretrained SSLMetaArch state dict here")
    ap.add_argument("--load", default=None, help="skip pretraining: load an SSLMetaArch state dict saved by --save")
    ap.add_argument("--progress", type=int, default=0, help="print a progress line every N steps")
    args = ap.parse_args(argv)
    if args.fit_after <= 5:
        ap.error("--fit-after must be > 5: the first 5 steps are not timed for the fit")

    t_wall = time.perf_counter()
    torch.set_num_threads(args.threads)
    host = setup.prepare_cpu_process()  # as the training workers (and the DataLoader processes forked from here)
    sets = ([] if args.no_bench_sets else list(BENCH_SETS)) + args.set
    if args.steps:
        sets.append(f"phases.pretrain.steps={args.steps}")
    job = config.load_job(args.job, sets)
    r = config.resolve(job, "pretrain")
    print(f"job {args.job} + {sets}; CPU process: {host}", flush=True)
    print(f"model {json.dumps(config.model_cfg(r))}\ncrops {r.crops}\noptim {r.optim}", flush=True)

    t0 = time.perf_counter()
    cache = (lambda s: os.path.join(args.cache, f"knn_{s}_{r.eval.image_size}.pt")) if args.cache else (lambda s: None)
    if args.cache:
        os.makedirs(args.cache, exist_ok=True)
    xtr, ytr = load_split(job.data.eval_train, r.eval.image_size, cache("train"))
    xte, yte = load_split(job.data.eval_test, r.eval.image_size, cache("test"))
    if args.train_limit:
        xtr, ytr = xtr[:args.train_limit], ytr[:args.train_limit]
    data = ((xtr, ytr), (xte, yte))
    print(f"k-NN data: {len(xtr)} train / {len(xte)} test images decoded in {time.perf_counter() - t0:.0f}s", flush=True)

    if not args.skip_baselines:
        print(f"baseline raw pixels (mean-centred, L2-normalised): {pct(raw_pixels(data))}", flush=True)
        torch.manual_seed(job.seed)
        rnd = build_backbone(r.model.arch, img_size=r.crops.global_size, patch_size=r.model.patch_size,
                             layerscale_init=None)
        print(f"baseline random-init {r.model.arch} (no LayerScale): {pct(knn(rnd, data))}", flush=True)

    meta = setup.build_meta(job, r, None)
    if args.load:
        meta.load_state_dict(torch.load(args.load, weights_only=True))
        print(f"pretrained model loaded from {args.load}: {pct(knn(meta.teacher['backbone'], data))}", flush=True)
    else:
        curve = run(meta, meta.teacher["backbone"], job, r, data, args, t_wall, "pretrain",
                    fixed=bool(args.steps))
        best = max(curve, key=lambda c: c[2][20])
        print(f"best k=20: {100 * best[2][20]:.2f}% at step {best[0]} ({best[1] / 60:.1f} min of training); "
              f"total wall {(time.perf_counter() - t_wall) / 60:.1f} min", flush=True)
    if args.save:
        torch.save(meta.state_dict(), args.save)
    if args.distill_steps:
        from model import DistillMetaArch
        from model.distill import DISTILL_DEFAULT_CFG
        dsets = sets + [f"phases.distill.steps={args.distill_steps}"]
        djob = config.load_job(args.job, dsets)
        rd = config.resolve(djob, "distill")
        student = rd.phase.students[0]
        cfg = setup._model_cfg(rd, student, DISTILL_DEFAULT_CFG)
        cfg.update(teacher_arch=r.model.arch, teacher_ffn_layer=r.model.ffn_layer,
                   teacher_num_register_tokens=r.model.num_register_tokens)
        torch.manual_seed(job.seed)
        dmeta = DistillMetaArch(cfg, meta.teacher).train()
        print(f"distillation of the pretrained teacher into {student} (no highres phase in between): "
              f"{rd.optim}", flush=True)
        curve = run(dmeta, dmeta.student_ema["backbone"], djob, rd, data, args, t_wall, "distill",
                    fixed=True)
        print(f"distilled {student}: k=20 {100 * curve[-1][2][20]:.2f}%; total wall "
              f"{(time.perf_counter() - t_wall) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
