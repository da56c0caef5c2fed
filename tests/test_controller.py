"""Controller logic that needs no training: the run lock, config-change refusal, status output."""
import json
import os
import subprocess
import sys

import pytest

from orchestrator.layout import RunLayout
from orchestrator.pipeline import config, controller, state
from orchestrator.storage import Store

JOB = {
    "name": "ctl", "storage": "", "num_workers": 1,
    "data": {"train": "/nonexistent/shards"},
    "model": {"arch": "vit_pico", "patch_size": 4},
    "crops": {"global_size": 32, "local_size": 16},
    "optim": {"batch_size": 8},
    "phases": [{"name": "pretrain", "kind": "pretrain", "steps": 3}],
}


def make_job(tmp_path, overrides=()):
    return config.job_from_dict({**JOB, "storage": str(tmp_path)}, source="ctl.yaml", overrides=overrides)


def test_lock_refuses_a_second_live_driver_and_takes_over_a_dead_one(tmp_path):
    layout = RunLayout(Store(str(tmp_path)), "run")
    first = state.RunLock(layout)
    first.acquire()
    with pytest.raises(controller.PipelineError, match="already being driven by owner"):
        state.RunLock(layout).acquire()
    first.release()
    assert not (tmp_path / "run" / "LOCK").exists()
    # a lock left by a dead process on this host is stale and is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run" / "LOCK").write_text(json.dumps(
        {"owner": "ghost", "host": os.uname().nodename, "pid": int(dead.stdout), "heartbeat": 0}))
    again = state.RunLock(layout)
    again.acquire()
    assert json.loads((tmp_path / "run" / "LOCK").read_text())["owner"] == again.owner["owner"]
    again.release()


def test_changed_config_of_a_finished_phase_is_refused(tmp_path):
    job = make_job(tmp_path)
    run_state = state.load(RunLayout.of(job), job)
    run_state["phases"][0].update(state="done", step=3, config_hash="0123456789abcdef")
    (tmp_path / "ctl").mkdir()
    (tmp_path / "ctl" / "pipeline.json").write_text(json.dumps(run_state))
    with pytest.raises(controller.PipelineError) as err:
        controller.run_pipeline(job, log=lambda *_: None)
    msg = str(err.value)
    assert "phase 'pretrain' was done with a different config" in msg and "--restart-from pretrain" in msg
    assert not (tmp_path / "ctl" / "LOCK").exists(), "a refused run must release its lock"


def test_status_cli_prints_json_with_phases(tmp_path):
    job = make_job(tmp_path)
    (tmp_path / "ctl").mkdir()
    (tmp_path / "ctl" / "pipeline.json").write_text(json.dumps(state.load(RunLayout.of(job), job)))
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", str(tmp_path / "ctl"), "--json"],
                         capture_output=True, text=True, check=True).stdout
    phase = json.loads(out)["phases"][0]
    assert {k: phase[k] for k in ("name", "kind", "state", "step", "steps", "checkpoint")} == {
        "name": "pretrain", "kind": "pretrain", "state": "pending", "step": 0, "steps": 3, "checkpoint": None}
    missing = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 3 and "pipeline.json not found" in missing.stderr


def test_validate_cli_reports_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({**JOB, "storage": str(tmp_path), "optim": {"batch_size": 8, "base_rl": 1}}))
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2 and "optim.base_rl: unknown key; did you mean 'optim.base_lr'?" in res.stderr


@pytest.mark.ray
def test_local_paths_are_refused_on_a_two_node_cluster(tmp_path):
    """A local storage path on a real 2-node Ray cluster (two raylets, one head) is refused with the
    key and the fix; `storage_shared: true` (an NFS/Lustre mount) or object storage is accepted."""
    import ray
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        job = make_job(tmp_path)
        with pytest.raises(controller.PipelineError) as err:
            controller._refuse_node_local_paths(job, ray)
        assert "storage:" in str(err.value) and "2 nodes" in str(err.value) and "storage_shared: true" in str(err.value)
        controller._refuse_node_local_paths(make_job(tmp_path, ["storage_shared=true"]), ray)
        remote = make_job(tmp_path, ["storage=s3://bucket/runs", "data.train=s3://bucket/shards"])
        controller._refuse_node_local_paths(remote, ray)
    finally:
        ray.shutdown()
        cluster.shutdown()
