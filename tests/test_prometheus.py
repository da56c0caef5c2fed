"""End-to-end metrics: Ray workers record steps through StepMetrics, a real Prometheus scrapes Ray's
metrics export port with the project's local config, and its HTTP API shows the series.

    .venv/bin/python -m pytest tests/test_prometheus.py -q
To switch to a smoke training run: replace `_train_steps` with the run and keep the assertions.
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


def _train_steps(n_steps: int, step_s: float, jsonl: str):
    """Stand-in for a training worker: a Ray task recording n_steps through StepMetrics."""
    import ray

    @ray.remote(num_cpus=1)
    def worker(n, dt, path):
        from orchestrator import metrics as m
        with m.StepMetrics(RUN, "pretrain", path, checkpoint_every_steps=4) as sm:
            for step in range(1, n + 1):
                sm.record(step, {"loss": 10.0 / step, "loss_dino_global": 5.0 / step, "loss_ibot": 3.0 / step,
                                 "lr": 1e-4 * step, "wd": 0.04, "momentum": 0.994, "teacher_temp": 0.04,
                                 "images_per_s": 100.0, "step_s": dt, "data_wait_s": dt / 10,
                                 "mfu": 0.4, "samples_skipped_total": 0, "nonfinite_steps_total": 0,
                                 "rollbacks_total": 0})
                time.sleep(dt)
        return n

    return worker.remote(n_steps, step_s, jsonl)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_step_and_loss_series_reach_prometheus(ray_metrics_port, prometheus_server, tmp_path):
    import ray

    prom = prometheus_server([f"127.0.0.1:{ray_metrics_port}"])
    pm = metrics.PipelineMetrics(RUN)  # the driver side, as the controller uses it
    pm.phase_state("pretrain", "pretrain", "running")
    ref = _train_steps(n_steps=30, step_s=0.5, jsonl=str(tmp_path / "steps.jsonl"))
    try:
        step_q = f'max by (run, phase) (ray_dinoray_step{{run="{RUN}"}})'
        first = prom.wait_for(step_q, lambda r: r and float(r[0]["value"][1]) >= 1, timeout=60)
        s1 = float(first[0]["value"][1])
        later = prom.wait_for(step_q, lambda r: r and float(r[0]["value"][1]) >= s1 + 4, timeout=40)
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
        ray.get(ref, timeout=120)
        pm.close()
    lines = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 31))


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

