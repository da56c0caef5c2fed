"""Elastic training on a real multi-node Ray cluster on one machine: a scripted run with 2 interruptions.

    .venv/bin/python bench/elastic.py [--out /tmp/dinoray-bench-elastic] [--images 256]

`ray.cluster_utils.Cluster`: a head with no CPUs (the driver and Ray Train's controller) and two
1-CPU worker nodes A and B, one Ray Train worker each (num_workers [1, 2], fsdp2, gloo), training
vit_pico for one epoch of real CIFAR-10 images (256 images, batch 8: 32 steps).
  1. drain B with reason preemption and a deadline (`ray drain-node`, what KubeRay's preStop runs):
     the workers commit a just-in-time checkpoint and wait; at the deadline B is removed (the cloud
     reclaims the spot node) and Ray restarts the group on A alone (world 1, 2 micro-batches per
     step); then a replacement node C joins;
  2. kill A outright (`remove_node`, no notice): the group restarts on C from the last committed
     checkpoint.
Printed: per event, seconds from the event to the just-in-time commit (drain) and to the next step,
steps lost (taken, then redone), the restarts by reason, and goodput (kept step time / wall time of
the phase). tests/test_elastic_cluster.py runs the same `scenario` and checks what it must show.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator.layout import RunLayout  # noqa: E402
from orchestrator.pipeline import config  # noqa: E402

DRAIN_DEADLINE_S = 20
CIFAR_TEST_TAR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10", "test.tar")


def cifar_subset(folder: str, n: int) -> str:
    """`n` real CIFAR-10 test images as shards of 64 (one epoch = n // 8 steps at batch 8)."""
    from orchestrator.data.build import build
    from orchestrator.storage import Store
    with tarfile.open(CIFAR_TEST_TAR) as tf:
        members = [m for m in tf.getmembers() if m.isreg() and m.name.endswith(".jpg")][::31][:n]
        for m in members:
            path = os.path.join(folder, "src", m.name.split("/", 1)[1])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(tf.extractfile(m).read())
    build(Store(os.path.join(folder, "src")), Store(os.path.join(folder, "shards")), samples_per_shard=64, quiet=True)
    return os.path.join(folder, "shards")


def make_job(root: str, data: str, steps: int) -> config.JobSpec:
    return config.job_from_dict({
        "name": "elastic", "storage": root, "storage_shared": True, "backend": "fsdp2", "num_workers": [1, 2],
        "seed": 1, "data": {"train": data, "num_workers": 0},
        "model": {"arch": "vit_pico", "patch_size": 8, "head_n_prototypes": 256, "head_hidden_dim": 64,
                  "head_bottleneck_dim": 32, "ibot_n_prototypes": 256},
        "crops": {"global_size": 32, "local_size": 16, "n_local": 2},
        "optim": {"batch_size": 8, "base_lr": 0.01, "warmup_iters": 2},
        "checkpoint": {"every_steps": 8, "keep_last": 2, "async_save": False},
        # one failure allowed: were the drain counted as a failure, the node loss would end the run
        "failure": {"max_failures": 1, "max_preemption_failures": 1},
        "debug": {"trace_samples": True, "step_sleep_s": 0.5},
        "phases": [{"name": "pretrain", "kind": "pretrain", "steps": steps}]}, source="bench/elastic.py")


def _records(phase) -> list[dict]:
    """metrics.jsonl as written so far (a line being appended is left for the next look)."""
    text = phase.metrics.read_bytes().decode() if phase.metrics.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def _wait(what: str, cond, timeout: float = 300.0, every: float = 0.25):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"bench/elastic.py: waited {timeout:.0f} s for {what}")


def _next_step_after(phase, event_t: float, step: int) -> float:
    """Seconds from `event_t` to the record of `step` written after it (the restarted group's)."""
    rec = _wait(f"step {step} after the restart",
                lambda: next((r for r in _records(phase) if r["step"] == step and r["time"] > event_t), None))
    return rec["time"] - event_t


def drain(address: str, node_id: str, deadline_s: int) -> None:
    """What KubeRay's preStop hook runs (infra/kuberay): drain for preemption with a deadline."""
    subprocess.run(["ray", "drain-node", "--address", address, "--node-id", node_id,
                    "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (bench)",
                    "--deadline-remaining-seconds", str(deadline_s)], check=True, capture_output=True,
                   env={**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]})


def scenario(root: str, data: str, steps: int, log=print) -> dict:
    """Run the scripted phase; returns what happened (see the module docstring)."""
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.training import driver
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    node_a, node_b = cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)
    job, out, result = make_job(root, data, steps), {}, {}
    phase = RunLayout.of(job).phase("pretrain")
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        cluster.wait_for_nodes()
        t_start = time.time()
        thread = threading.Thread(target=lambda: result.update(driver.run_phase(job, "pretrain")), daemon=True)
        thread.start()
        _wait("a periodic checkpoint and 2 more steps",
              lambda: phase.committed_steps() and _records(phase)[-1:] and
              _records(phase)[-1]["step"] >= phase.committed_steps()[-1] + 2)
        out["periodic_before_drain"] = phase.committed_steps()[-1]
        t_drain = time.time()
        drain(cluster.address, node_b.node_id, DRAIN_DEADLINE_S)
        log(f"drained node B at step {_records(phase)[-1]['step']}")
        marker = _wait("the just-in-time checkpoint", lambda: phase.preempted.read_json(), timeout=60)
        out["jit_step"], out["jit_s"] = marker["step"], time.time() - t_drain
        out["jit_committed"] = out["jit_step"] in phase.committed_steps()
        out["deadline_s"] = marker["deadline_s"] - t_drain
        _wait("the drain deadline", lambda: time.time() >= marker["deadline_s"], timeout=120)
        out["drain_steps_lost"] = max(r["step"] for r in _records(phase)) - out["jit_step"]  # taken, to be redone
        cluster.remove_node(node_b, allow_graceful=False)  # the cloud reclaims the node at the deadline
        out["drain_restart_s"] = _next_step_after(phase, t_drain, out["jit_step"] + 1)
        out["world_after_drain"] = phase.restarts.read_json()["world_size"]
        log(f"after the drain: step {out['jit_step'] + 1} {out['drain_restart_s']:.1f} s after it")
        cluster.add_node(num_cpus=1)   # the replacement spot node
        _wait("2 steps on the remaining node", lambda: _records(phase)[-1]["step"] >= out["jit_step"] + 3)
        last_ckpt, last_step = phase.committed_steps()[-1], _records(phase)[-1]["step"]
        t_kill = time.time()
        cluster.remove_node(node_a, allow_graceful=False)
        log(f"killed node A at step {last_step} (last checkpoint {last_ckpt})")
        out["loss_restart_s"] = _next_step_after(phase, t_kill, last_ckpt + 1)
        out["loss_steps_lost"] = last_step - last_ckpt
        out["ckpt_before_kill"] = last_ckpt
        thread.join(timeout=600)
        out["wall_s"] = time.time() - t_start
    finally:
        ray.shutdown()
        cluster.shutdown()
    recs = _records(phase)
    record = phase.restarts.read_json()
    out.update(done=result.get("step"), steps=steps, restarts=record["restarts"],
               goodput=sum(r["step_s"] for r in recs) / (time.time() - record["phase_start_unixtime"]))
    out["metrics_steps"] = [r["step"] for r in recs]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/dinoray-bench-elastic")
    ap.add_argument("--images", type=int, default=256)
    args = ap.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    data = cifar_subset(os.path.join(args.out, "data"), args.images)
    res = scenario(os.path.join(args.out, "runs"), data, steps=args.images // 8)
    res.pop("metrics_steps")
    print(json.dumps(res, indent=1))
    print(f"\n| event | to JIT commit (s) | to next step (s) | steps lost |\n|---|---|---|---|\n"
          f"| drain (deadline {res['deadline_s']:.0f} s) | {res['jit_s']:.1f} | {res['drain_restart_s']:.1f} | "
          f"{res['drain_steps_lost']} |\n| node loss | - | {res['loss_restart_s']:.1f} | {res['loss_steps_lost']} |\n"
          f"\ngoodput {res['goodput']:.1%} over {res['wall_s']:.0f} s; restarts {res['restarts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
