"""End-to-end metrics: a smoke training run on Ray records steps through StepMetrics, a real
Prometheus scrapes Ray's metrics export port with the project's local config, and its HTTP API
shows the series with the step increasing.

    .venv/bin/python -m pytest tests/test_prometheus.py -q
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator import metrics

pytestmark = [pytest.mark.prometheus, pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
RUN = "promtest"


@pytest.fixture(scope="module")
def ray_metrics_port():
    """A local Ray cluster exporting metrics every second on a free port."""
    ray = pytest.importorskip("ray")
    from promserver import free_port

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning",
             **metrics.ray_init_kwargs(port, report_interval_ms=1000))
    try:
        yield port
    finally:
        ray.shutdown()


def _train_steps(tmp_path, cifar_shards):
    """A real smoke training run (2 Ray Train workers, the smoke job) in a driver-side thread."""
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.pipeline import config
    from orchestrator.training import driver as train

    job = config.load_job(str(REPO / "jobs" / "smoke_cpu.yaml"), [
        f"name={RUN}", f"storage={tmp_path}", f"data.train={cifar_shards['train']}",
        "model.arch=vit_pico", "optim.batch_size=32", "optim.min_lr=1e-6", "phases.pretrain.steps=40",
        "optim.warmup_iters=0", "optim.teacher_temp_warmup_iters=0", "optim.freeze_last_layer_iters=0",
        "debug.step_sleep_s=0.5"])
    pool = ThreadPoolExecutor(1)
    return pool.submit(train.run_phase, job, "pretrain"), tmp_path / RUN / "pretrain" / "metrics.jsonl"


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_step_and_loss_series_reach_prometheus(ray_metrics_port, prometheus_server, tmp_path, cifar_shards):
    prom = prometheus_server([f"127.0.0.1:{ray_metrics_port}"])
    pm = metrics.PipelineMetrics(RUN)  # the driver side, as the controller uses it
    pm.phase_state("pretrain", "pretrain", "running")
    run, jsonl = _train_steps(tmp_path, cifar_shards)
    try:
        step_q = f'max by (run, phase) (ray_dinoray_step{{run="{RUN}"}})'
        first = prom.wait_for(step_q, lambda r: r and float(r[0]["value"][1]) >= 1, timeout=300)
        s1 = float(first[0]["value"][1])
        later = prom.wait_for(step_q, lambda r: r and float(r[0]["value"][1]) >= s1 + 4, timeout=120)
        assert float(later[0]["value"][1]) > s1
        # the recorded history increases
        end = time.time()
        rng = prom.api("query_range", query=step_q, start=end - 60, end=end, step=1)["result"]
        values = [float(v) for _, v in rng[0]["values"]]
        assert values == sorted(values) and values[-1] > values[0], values

        loss = prom.wait_for(f'ray_dinoray_loss{{run="{RUN}"}}', lambda r: len(r) >= 3, timeout=20)
        assert {r["metric"]["component"] for r in loss} >= {"total", "dino_global", "ibot"}
        assert all(r["metric"]["phase"] == "pretrain" for r in loss)
        hist = prom.query(f'sum(ray_dinoray_step_seconds_count{{run="{RUN}"}})')
        assert hist and float(hist[0]["value"][1]) >= 1
        state = prom.wait_for(f'ray_dinoray_phase_state{{run="{RUN}", state="running"}}', bool, timeout=20)
        assert float(state[0]["value"][1]) == 1.0 and state[0]["metric"]["kind"] == "pretrain"

        # every series Prometheus holds from our code is one metrics.py declares
        names = set(prom.api("label/__name__/values"))
        ours = {n for n in names if "dinoray_" in n}
        assert ours and ours <= metrics.exported_names(), ours - metrics.exported_names()

        # the project's alert rules were loaded and evaluate against live data
        groups = prom.api("rules")["groups"]
        alerts = {r["name"] for g in groups for r in g["rules"]}
        assert {"DinorayTrainingStalled", "DinorayNonFiniteLoss", "DinorayDataStarvation",
                "DinorayCheckpointTooOld", "DinorayRunFailed", "DinorayTargetDown"} <= alerts
        assert all(r.get("health") in ("ok", "unknown") for g in groups for r in g["rules"]), groups
        targets = prom.api("targets")["activeTargets"]
        assert [t["health"] for t in targets if t["labels"]["job"] == "dinoray"] == ["up"]

        # every dashboard query is valid PromQL for the real engine
        dash = json.loads((REPO / "infra/grafana/dinoray-dashboard.json").read_text())
        for panel in dash["panels"]:
            for t in panel["targets"]:
                expr = t["expr"].replace("$run", RUN).replace("$__rate_interval", "1m")
                prom.query(expr)  # raises on a parse error
        assert prom.query(f'max by (phase, component) (ray_dinoray_loss{{run=~"{RUN}"}})')
    finally:
        result = run.result(timeout=600)
        pm.close()
    assert result["step"] == 40
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 41))


def test_set_once_gauges_survive_ray_gauge_expiry(ray_metrics_port):
    """Ray drops a gauge ~2 report intervals after its last set; the refresher keeps it exported."""
    pm = metrics.PipelineMetrics("expiry")
    try:
        pm.knn("pretrain", 20, 0.625)
        pm.progress(0.5)
        time.sleep(6)  # > 2 x the 1 s report interval of this cluster
        text = _scrape(ray_metrics_port)
        knn = [ln for ln in text.splitlines() if ln.startswith("ray_dinoray_knn_accuracy{") and 'run="expiry"' in ln]
        assert len(knn) == 1 and 'k="20"' in knn[0] and float(knn[0].rsplit(" ", 1)[1]) == 0.625
        assert re.search(r'^ray_dinoray_pipeline_progress\{[^}]*run="expiry"[^}]*\} 0\.5$', text, re.M)
    finally:
        pm.close()
    deadline = time.time() + 30  # closed: nothing re-sets them, so they age out
    while 'run="expiry"' in _scrape(ray_metrics_port) and time.time() < deadline:
        time.sleep(1)
    assert 'run="expiry"' not in _scrape(ray_metrics_port)

