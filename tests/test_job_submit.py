"""`ray job submit` against a real `ray start --head` cluster on 127.0.0.1 runs the smoke pipeline,
and the uploaded working dir leaves out .venv and .git (Ray's 100 MiB package limit)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.ray, pytest.mark.slow]
TINY = ["model.arch=vit_pico", "optim.batch_size=32", "optim.warmup_iters=0", "optim.teacher_temp_warmup_iters=0",
        "optim.freeze_last_layer_iters=0", "phases.highres.optim.warmup_iters=0", "phases.distill.optim.warmup_iters=0",
        "eval.max_train_images=2000", "eval.max_test_images=500"]



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """`ray start --head --block` on 127.0.0.1; stopped by killing its process group, so other Ray
    instances on the machine are left alone. A short --temp-dir keeps socket paths under 107 chars."""
    # RAY_AUTH_MODE pinned: with a ~/.ray/auth_token left on the machine, Ray 2.60's dashboard turns token
    # auth on while the CLI sends none; a local test cluster on 127.0.0.1 needs neither.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")
    head = subprocess.Popen([BIN / "ray", "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                             "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while subprocess.run([BIN / "ray", "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None and time.time() < deadline, "ray start --head did not come up"
            time.sleep(2)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_the_pipeline(ray_head, tmp_path, cifar_shards):
    address, env = ray_head
    overrides = [f"storage={tmp_path}", f"data.train={cifar_shards['train']}",
                 f"data.eval_train={cifar_shards['train']}", f"data.eval_test={cifar_shards['test']}",
                 *TINY, "phases.pretrain.steps=4", "phases.highres.steps=2", "phases.distill.steps=2",
                 "checkpoint.every_steps=2"]
    sets = " ".join(f"--set {o}" for o in overrides)
    entry = f"ls -a && dinoray run jobs/smoke_cpu.yaml {sets}"
    res = subprocess.run([BIN / "ray", "job", "submit", "--address", address, "--working-dir", ".",
                          "--", "bash", "-c", entry], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    listing = set(out.split())
    assert {"jobs", "orchestrator", "model"} <= listing, out[-3000:]
    assert ".venv" not in listing and ".git" not in listing, "the uploaded working dir carried .venv or .git"
    state = json.loads((tmp_path / "smoke" / "pipeline.json").read_text())
    assert all(p["state"] == "done" for p in state["phases"]), state
