"""`dinoray status`: a running phase's live step, images/s, ETA, loss and last committed checkpoint, read
from files written the way a run writes them (StepMetrics' metrics.jsonl, checkpoint COMMITTED markers);
torch-free and fast. The polling test during a real Ray run is in tests/test_pipeline.py.

    .venv/bin/python -m pytest tests/test_status.py -q
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from orchestrator import metrics
from orchestrator.layout import RunLayout
from orchestrator.pipeline import progress
from orchestrator.storage import Store

REPO = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000.0


def write_steps(phase, steps, step_s=0.5, batch=64, monkeypatch=None, start=1):
    """Rank 0's metrics.jsonl for steps start..steps, one step every `step_s` wall seconds."""
    clock = {"now": T0 + start * step_s}
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(time=lambda: clock["now"]))
    m = metrics.StepMetrics("smoke", phase.key, phase.metrics.local_path, backend="none")
    for step in range(start, steps + 1):
        m.record(step, {"step_s": step_s, "images_per_s": batch / step_s, "loss": 10.0 - step / 100})
        clock["now"] += step_s
    monkeypatch.undo()


def commit(phase, step, committed=True):
    ckpt = phase.checkpoint(step)
    (ckpt / "rank-0.pt").write_bytes(b"x")
    if committed:
        phase.committed(ckpt).write_json({"step": step})


def running_run(tmp_path, monkeypatch, step=130, steps=180):
    layout = RunLayout(Store(str(tmp_path)), "smoke")
    phases = [{"name": "pretrain", "kind": "pretrain", "state": "running", "step": 0, "steps": steps,
               "checkpoint": None, "error": None, "batch_size": 128},  # 2 ranks of 64 (write_steps: rank 0)
              {"name": "eval", "kind": "eval", "state": "pending", "step": 0, "steps": 0, "checkpoint": None,
               "error": None}]
    layout.pipeline.write_json({"name": "smoke", "storage": str(tmp_path), "phases": phases})
    pre = layout.phase("pretrain")
    write_steps(pre, step, monkeypatch=monkeypatch)
    for s in (100, 120):
        commit(pre, s)
    commit(pre, 140, committed=False)  # being written: does not count
    return layout


def test_running_phase_shows_live_step_rate_eta_and_committed_checkpoint(tmp_path, monkeypatch):
    layout = running_run(tmp_path, monkeypatch)
    state = progress.run_status(str(layout.root))
    live = state["phases"][0]
    assert live["state"] == "running" and live["step"] == 130 and live["steps"] == 180
    assert live["checkpoint_step"] == 120 and live["checkpoint"] == str(layout.phase("pretrain").checkpoint(120))
    assert live["images_per_s"] == pytest.approx(256.0)  # the job's: 128 images per 0.5 s step, not rank 0's 128
    assert progress.key_progress(layout.phase("pretrain"), 180)["images_per_s"] == pytest.approx(128.0)  # no batch
    assert live["eta_s"] == pytest.approx(50 * 0.5)
    assert live["loss"] == pytest.approx(10.0 - 1.30)
    assert state["phases"][1] == json.loads(layout.pipeline.read_bytes())["phases"][1]  # pending: as stored
    text = progress.fmt_status(state, now=live["updated"] + 3)
    assert "step 130/180  256.0 img/s  ETA 0:25  loss 8.7  ckpt step 120  (updated 0:03 ago)" in text, text


def test_tail_is_read_from_a_long_metrics_file(tmp_path, monkeypatch):
    layout = RunLayout(Store(str(tmp_path)), "smoke")
    pre = layout.phase("pretrain")
    write_steps(pre, 2000, monkeypatch=monkeypatch)
    assert pre.metrics.size() > 4 * progress.TAIL_BYTES
    p = progress.key_progress(pre, 3000)
    assert p["step"] == 2000 and p["checkpoint"] is None and p["eta_s"] == pytest.approx(500.0)


def test_no_records_yet_falls_back_to_the_committed_checkpoint(tmp_path):
    layout = RunLayout(Store(str(tmp_path)), "smoke")
    pre = layout.phase("pretrain")
    assert progress.key_progress(pre, 50)["step"] == 0
    commit(pre, 20)
    p = progress.key_progress(pre, 50)
    assert p["step"] == 20 and p["checkpoint_step"] == 20 and p["eta_s"] is None
    assert "step 20/50  ckpt step 20" == progress.describe(p)


def test_distill_reports_the_student_being_trained(tmp_path, monkeypatch):
    layout = RunLayout(Store(str(tmp_path)), "smoke")
    first, second = layout.phase("distill-vit_pico"), layout.phase("distill-vit_small")
    write_steps(first, 10, monkeypatch=monkeypatch)
    first.final_done.write_json({"step": 10})
    write_steps(second, 4, monkeypatch=monkeypatch)
    entry = {"name": "distill", "kind": "distill", "state": "running", "steps": 10}
    p = progress.phase_progress(layout, entry)
    assert p["step"] == 4 and set(p["folders"]) == {"distill-vit_pico", "distill-vit_small"}
    assert p["folders"]["distill-vit_pico"]["step"] == 10


def test_status_cli_is_fast_and_imports_no_torch(tmp_path, monkeypatch):
    layout = running_run(tmp_path, monkeypatch)
    code = ("import sys, time; t = time.perf_counter(); from orchestrator import cli; "
            f"rc = cli.main(['status', {str(layout.root)!r}, '--json']); "
            "print('SECONDS', time.perf_counter() - t, 'TORCH', 'torch' in sys.modules, file=sys.stderr); "
            "sys.exit(rc)")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    state = json.loads(res.stdout)
    assert state["phases"][0]["step"] == 130 and state["phases"][0]["checkpoint_step"] == 120
    assert "TORCH False" in res.stderr, res.stderr
    assert wall < 2.0, f"dinoray status took {wall:.2f} s"


def test_missing_run_names_the_file(tmp_path, capsys):
    rc = progress.cmd_status(types.SimpleNamespace(run_url=str(tmp_path / "nope"), json=False))
    assert rc == 3 and "nope/pipeline.json not found" in capsys.readouterr().err


@pytest.mark.s3
def test_live_tail_on_s3_shows_steps_between_commits(tmp_path, monkeypatch, s3_server, capsys):
    """On object storage metrics.jsonl goes up with each commit; rank 0's LiveTail uploads its last
    records in between (whole lines, at most LIVE_BYTES, rate-limited), and status reads them."""
    from orchestrator.training import records

    opts = {"endpoint_url": s3_server["endpoint_url"]}
    remote = RunLayout(Store(f"s3://{s3_server['bucket']}/live-tail", opts), "smoke").phase("pretrain")
    local = RunLayout(Store(str(tmp_path)), "smoke").phase("pretrain")
    write_steps(local, 100, monkeypatch=monkeypatch)
    remote.metrics.put_file(local.metrics.local_path)          # uploaded with the commit of step 100
    commit(remote, 100)
    write_steps(local, 600, monkeypatch=monkeypatch, start=101)
    assert progress.key_progress(remote, 1000)["step"] == 100  # nothing newer on S3 yet
    live = records.LiveTail(local.metrics.local_path, remote.metrics_live, every_s=30.0)
    assert live.maybe_upload(now=1000.0) and not live.maybe_upload(now=1029.0)  # at most every 30 s
    live.close()
    data = remote.metrics_live.read_bytes()
    steps = [json.loads(line)["step"] for line in data.decode().splitlines()]
    assert local.metrics.size() > records.LIVE_BYTES >= len(data) and data.endswith(b"\n")
    assert steps == list(range(steps[0], 601)) and steps[0] > 101, steps[:3]  # whole lines, the newest
    p = progress.key_progress(remote, 1000)
    assert p["step"] == 600 and p["checkpoint_step"] == 100 and p["eta_s"] == pytest.approx(400 * 0.5)
    # an upload that fails (nothing listens there) is reported once and never raises into the training loop
    down = {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}}}
    monkeypatch.setattr("s3fs.S3FileSystem.retries", 1)  # s3fs's own retries: 5 by default, with back-off
    broken = records.LiveTail(local.metrics.local_path, Store("s3://bucket/x.jsonl", down), 0.0)
    broken.upload()
    broken.upload()
    out = capsys.readouterr().out
    assert out.count("dinoray status lags until this upload works: ") == 1 and "s3://bucket/x.jsonl" in out, out
    assert s3_server["secret"] not in out and "check the bucket name, AWS_ENDPOINT_URL" in out, out
