"""`make demo`: the smoke pipeline end to end on one machine, offline, on CPU.

    make demo                                  # = .venv/bin/python -m orchestrator.demo
    python -m orchestrator.demo --job jobs/smoke_cpu.yaml --set phases.pretrain.steps=50
    python -m orchestrator.demo --shards-only  # only build the CIFAR-10 shards

Images: CIFAR-10 as JPEGs from ../shared/data/cifar10 (train.tar, test.tar), which the checkout's
sibling `shared/` folder holds; nothing is downloaded. They are turned into WebDataset shards under
runs/shards/, then `dinoray run jobs/smoke_cpu.yaml` runs every phase with local Ray and local files.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10"


def build_cifar_shards(out_dir: Path, splits=("train", "test"), log=print) -> dict[str, str]:
    """Build WebDataset shards of the CIFAR-10 tars once; returns {split: shard folder}."""
    from orchestrator.data.build import build
    from orchestrator.storage import Store
    urls = {}
    for split in splits:
        src = CIFAR / f"{split}.tar"
        if not src.exists():
            raise SystemExit(f"{src} not found: the demo reads CIFAR-10 from ../shared/data/cifar10 "
                             "next to the checkout")
        dst = out_dir / f"cifar10-{split}"
        if not (dst / "index.json").exists():
            log(f"[demo] building shards {dst} from {src}")
            build(Store(str(src)), Store(str(dst)), samples_per_shard=5000, quiet=True)
        urls[split] = str(dst)
    return urls


def summary(state: dict) -> str:
    from orchestrator.pipeline import report
    rows = [f"{'phase':<14}{'kind':<9}{'state':<8}{'steps':>12}{'time s':>9}  final losses / k-NN"]
    for e in state["phases"]:
        extra = ""
        if e["kind"] in ("pretrain", "highres", "distill"):
            extra = "; ".join(f"{k}: loss {m.get('loss', float('nan')):.3f}" for k, m in e.get("metrics", {}).items())
        elif e["kind"] == "eval":
            extra = "; ".join(f"{src}: {report.results_line(res)}" for src, res in e.get("metrics", {}).items())
        rows.append(f"{e['name']:<14}{e['kind']:<9}{e['state']:<8}{e['step']:>6}/{e['steps']:<5}"
                    f"{e.get('seconds', 0):>9.0f}  {extra}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default=str(REPO / "jobs" / "smoke_cpu.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--shards-only", action="store_true")
    args = ap.parse_args(argv)
    os.chdir(REPO)  # the smoke job's paths (runs/...) are relative to the checkout
    t0 = time.time()
    build_cifar_shards(REPO / "runs" / "shards")
    if args.shards_only:
        return 0
    from orchestrator.pipeline import config
    from orchestrator.pipeline import controller
    job = config.load_job(args.job, args.set)
    print(f"[demo] running {args.job}: phases {[p.name for p in job.phases]}, backend {job.backend}, "
          f"{job.workers_range[1]} CPU workers, storage {job.storage}/{job.name}")
    state = controller.run_pipeline(job)
    print("\n" + summary(state))
    print(f"\n[demo] report: {state.get('report')}  (total {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
