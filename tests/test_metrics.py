"""orchestrator.metrics without Ray: JSON lines, series names/values (prometheus_client backend), errors.

    .venv/bin/python -m pytest tests/test_metrics.py -q
"""

from __future__ import annotations

import json
import math

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import metrics


def _samples(registry) -> dict:
    """{(sample name, frozenset(labels)): value} of a registry's exposition text."""
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _val(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


def test_record_writes_json_lines_and_series(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    sm = metrics.StepMetrics("r1", "pretrain", str(path), backend="prometheus")
    sm.record(1, {"loss": 2.5, "loss_ibot": 0.75, "lr": 1e-3, "step_s": 0.3, "data_wait_s": 0.02,
                  "nonfinite_steps_total": 0, "mfu": 0.41})
    sm.record(2, {"loss": float("nan"), "step_s": 0.5, "nonfinite_steps_total": 1})
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert lines[0]["loss"] == 2.5 and lines[0]["run"] == "r1" and lines[0]["phase"] == "pretrain"
    assert lines[1]["loss"] == "nan"  # valid JSON; float("nan") reads it back

    s = _samples(sm.registry)
    lab = {"run": "r1", "phase": "pretrain"}
    assert _val(s, "ray_dinoray_step", **lab) == 2
    assert math.isnan(_val(s, "ray_dinoray_loss", component="total", **lab))
    assert _val(s, "ray_dinoray_loss", component="ibot", **lab) == 0.75
    assert _val(s, "ray_dinoray_mfu", **lab) == pytest.approx(0.41)
    assert _val(s, "ray_dinoray_nonfinite_steps_total", **lab) == 1
    assert _val(s, "ray_dinoray_samples_skipped_total", **lab) == 0  # exists from the start
    ranked = {**lab, "rank": "0"}  # step time, data wait and throughput carry the rank
    assert _val(s, "ray_dinoray_step_seconds_count", **ranked) == 2
    assert _val(s, "ray_dinoray_step_seconds_sum", **ranked) == pytest.approx(0.8)
    assert _val(s, "ray_dinoray_step_seconds_bucket", le="0.5", **ranked) == 2
    assert _val(s, "ray_dinoray_step_seconds_bucket", le="0.25", **ranked) == 0
    assert _val(s, "ray_dinoray_data_wait_seconds_count", **ranked) == 1
    # every exported name is declared (and carries dinoray_); labels stay low-cardinality
    names = {n for n, _ in s if not n.endswith("_created")}
    assert names <= metrics.exported_names(), names - metrics.exported_names()
    assert all("dinoray_" in n for n in metrics.exported_names())
    allowed = {"run", "phase", "kind", "component", "k", "state", "le", "rank", "reason"}
    assert all({k for k, _ in labels} <= allowed for _, labels in s)


def test_every_record_key_maps_to_a_declared_metric():
    contract = ("loss loss_dino_global loss_dino_local loss_ibot loss_koleo loss_gram lr wd momentum teacher_temp "
                "images_per_s step_s data_wait_s grad_norm mfu samples_skipped_total nonfinite_steps_total "
                "rollbacks_total ckpt_save_s ckpt_stall_s last_ckpt_unixtime gpu_mem_bytes").split()
    assert set(contract) <= set(metrics.RECORD_KEYS)
    assert all(name in metrics.METRIC_NAMES for name, _ in metrics.RECORD_KEYS.values())
    sm = metrics.StepMetrics("r", "p", backend="prometheus")
    sm.record(3, {k: 1.0 for k in metrics.RECORD_KEYS})
    assert _val(_samples(sm.registry), "ray_dinoray_gpu_memory_bytes", run="r", phase="p") == 1.0


def test_unknown_key_is_rejected_with_a_suggestion():
    sm = metrics.StepMetrics("r", "p", backend="none")
    with pytest.raises(ValueError, match=r"'los' \(did you mean 'loss'\?\)"):
        sm.record(1, {"los": 1.0})
    with pytest.raises(ValueError, match="non-empty run"):
        metrics.StepMetrics("", "p", backend="none")


def test_checkpoint_interval_from_steps_and_seconds():
    sm = metrics.StepMetrics("r", "p", checkpoint_every_steps=100, backend="prometheus")
    sm.record(1, {"step_s": 1.0})
    sm.record(2, {"step_s": 3.0})
    s = _samples(sm.registry)
    assert _val(s, "ray_dinoray_checkpoint_interval_seconds", run="r", phase="p") == pytest.approx(200.0)
    sm2 = metrics.StepMetrics("r", "q", checkpoint_interval_s=900, backend="prometheus")
    sm2.record(1, {"last_ckpt_unixtime": 1234.0})
    s2 = _samples(sm2.registry)
    assert _val(s2, "ray_dinoray_checkpoint_interval_seconds", run="r", phase="q") == 900
    assert _val(s2, "ray_dinoray_last_checkpoint_timestamp_seconds", run="r", phase="q") == 1234.0


def test_pipeline_metrics_states_progress_knn():
    pm = metrics.PipelineMetrics("run7", backend="prometheus")
    pm.phase_state("pretrain", "pretrain", "running")
    pm.phase_state("pretrain", "pretrain", "done")
    pm.progress(0.25)
    pm.knn("eval", 20, 0.8125)
    s = _samples(pm.registry)
    states = {st: _val(s, "ray_dinoray_phase_state", run="run7", phase="pretrain", kind="pretrain", state=st)
              for st in metrics.PHASE_STATES}
    assert states == {"pending": 0, "running": 0, "done": 1, "failed": 0}
    assert _val(s, "ray_dinoray_pipeline_progress", run="run7") == 0.25
    assert _val(s, "ray_dinoray_knn_accuracy", run="run7", phase="eval", k="20") == 0.8125
    with pytest.raises(ValueError, match="not one of"):
        pm.phase_state("pretrain", "pretrain", "exploded")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pm.progress(1.5)


def test_scrape_url_and_port(monkeypatch):
    monkeypatch.delenv("DINORAY_METRICS_PORT", raising=False)
    assert metrics.local_scrape_url() == "http://127.0.0.1:8080/metrics"
    assert metrics.ray_init_kwargs() == {"_metrics_export_port": 8080}
    monkeypatch.setenv("DINORAY_METRICS_PORT", "9123")
    assert metrics.local_scrape_url() == "http://127.0.0.1:9123/metrics"
    assert metrics.ray_init_kwargs(report_interval_ms=1000)["_system_config"] == {"metrics_report_interval_ms": 1000}
    monkeypatch.setenv("DINORAY_METRICS_PORT", "http")
    with pytest.raises(ValueError, match="DINORAY_METRICS_PORT"):
        metrics.metrics_port()


def test_serve_http_exposes_the_registry():
    import urllib.request

    from promserver import free_port

    sm = metrics.StepMetrics("srv", "p", backend="prometheus")
    sm.record(5, {"loss": 1.0})
    port = free_port()
    server, thread = metrics.serve_http(sm.registry, port)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        thread.join(timeout=5)
    assert 'ray_dinoray_step{phase="p",run="srv"} 5.0' in body


def test_loss_components_are_the_models_loss_parts():
    import model  # imports torch, which orchestrator.metrics must not do at import time

    assert metrics.LOSS_PARTS == model.LOSS_PARTS
    assert metrics.LOSS_COMPONENTS == ("total", *model.LOSS_PARTS)
    assert {f"loss_{p}" for p in model.LOSS_PARTS} <= set(metrics.RECORD_KEYS)


def test_every_rank_records_its_own_step_time_and_throughput(tmp_path):
    path = tmp_path / "metrics.jsonl"
    ranks = [metrics.StepMetrics("r", "p", str(path) if rank == 0 else None, rank=rank, backend="prometheus")
             for rank in range(2)]
    for rank, sm in enumerate(ranks):
        sm.record(1, {"step_s": 0.2 + rank, "data_wait_s": 0.1 * rank, "images_per_s": 10.0 - rank, "loss": 1.0})
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1]  # rank 0 writes the lines
    for rank, sm in enumerate(ranks):
        s = _samples(sm.registry)
        assert _val(s, "ray_dinoray_step_seconds_sum", run="r", phase="p", rank=str(rank)) == pytest.approx(0.2 + rank)
        assert _val(s, "ray_dinoray_images_per_second", run="r", phase="p", rank=str(rank)) == 10.0 - rank
        loss = [v for (n, _), v in s.items() if n == "ray_dinoray_loss"]
        assert loss == ([1.0] if rank == 0 else [])  # series without a rank label are rank 0's
    with pytest.raises(ValueError, match="rank"):
        metrics.StepMetrics("r", "p", rank=-1, backend="none")


def test_goodput_counts_lost_work_and_restarts():
    sm = metrics.StepMetrics("r", "p", backend="prometheus")
    sm.phase_start_unixtime = 1000.0
    sm.record(1, {"step_s": 4.0})
    sm.record(2, {"step_s": 6.0, "ckpt_stall_s": 2.0})  # a checkpoint stall is not productive
    assert sm.productive_s == pytest.approx(8.0)
    assert sm.goodput(now=1016.0) == pytest.approx(0.5)
    saved = sm.state()
    sm.record(3, {"step_s": 5.0})  # lost: the restart resumes from the checkpoint of step 2

    again = metrics.StepMetrics("r", "p", backend="prometheus")
    again.resume(saved, "preemption")
    again.record(3, {"step_s": 4.0})
    # 8 s kept + 4 s redone over 40 s since the first start; step 3's first 5 s are lost
    assert again.goodput(now=1040.0) == pytest.approx(0.3)
    s = _samples(again.registry)
    assert 0 < _val(s, "ray_dinoray_goodput_ratio", run="r", phase="p") <= 1
    restarts = {reason: _val(s, "ray_dinoray_restarts_total", run="r", phase="p", reason=reason)
                for reason in metrics.RESTART_REASONS}
    assert restarts == {"preemption": 1, "failure": 0, "resize": 0}
    third = metrics.StepMetrics("r", "p", backend="none")
    third.resume(again.state(), "failure")
    assert third.restarts == {"preemption": 1, "failure": 1, "resize": 0}
    fresh = metrics.StepMetrics("r", "p", backend="none")
    fresh.resume({}, "failure")  # a checkpoint written before state() existed
    assert fresh.restarts["failure"] == 1 and fresh.productive_s == 0.0
    assert fresh.goodput(now=fresh.phase_start_unixtime) == 0.0
    with pytest.raises(ValueError, match="not one of"):
        fresh.resume({}, "oom")


def test_restart_reason():
    assert metrics.restart_reason(preempted=True, world_size=2, saved_world_size=4) == "preemption"
    assert metrics.restart_reason(preempted=False, world_size=4, saved_world_size=2) == "resize"
    assert metrics.restart_reason(preempted=False, world_size=2, saved_world_size=4) == "failure"
    assert metrics.restart_reason(preempted=False, world_size=4, saved_world_size=4) == "failure"
