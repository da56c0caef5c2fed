"""Training and pipeline metrics: JSON lines on disk plus Prometheus series.

Transport: Ray's metrics system (``ray.util.metrics``) whenever Ray is initialised
in the calling process (training workers and the ``dinoray run`` driver). Every
Ray node exports the series on its metrics export port (``ray start
--metrics-export-port`` / ``ray.init(_metrics_export_port=...)``), which is what
KubeRay's PodMonitors scrape. Ray prefixes names with ``ray_``: ``dinoray_step``
is scraped as ``ray_dinoray_step``. Without Ray the series go to a
``prometheus_client`` registry under the same exported names (``ray_dinoray_*``),
so dashboards and alerts work either way; ``serve_http`` exposes that registry.

Ray drops a gauge from the export about two report intervals after its last
``set`` (counters and histograms persist). A set-once gauge (phase state,
k-NN accuracy, last-checkpoint time) would vanish, so each instance re-sets its
gauges from a small daemon thread; call ``close()`` when done.

Run the checks:  .venv/bin/python -m pytest tests/test_metrics.py -q
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

DEFAULT_METRICS_PORT = 8080  # KubeRay's default metrics port; override with DINORAY_METRICS_PORT
EXPORT_PREFIX = "ray_"  # what Ray prepends to application metric names

STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
PHASE_STATES = ("pending", "running", "done", "failed")  # the controller's pipeline.json states
# model.LOSS_PARTS, spelled here because importing `model` imports torch (tests/test_metrics.py
# checks the two are equal).
LOSS_PARTS = ("dino_global", "dino_local", "ibot", "koleo", "gram", "feature")
LOSS_COMPONENTS = ("total", *LOSS_PARTS)
RESTART_REASONS = ("preemption", "failure", "resize")

_STEP = ("run", "phase")
_RANKED = _STEP + ("rank",)  # series every rank records, so "max over ranks" sees stragglers
# name -> (type, help, label names). Totals are gauges because TRAIN reports run-wide
# cumulative totals (restored from checkpoints); a gauge keeps them exact across restarts
# and lets the series exist at 0, so increase() sees the first non-finite step.
METRIC_NAMES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "dinoray_step": ("gauge", "Optimizer step of the phase", _STEP),
    "dinoray_loss": ("gauge", "Training loss by component (total = weighted sum)", _STEP + ("component",)),
    "dinoray_lr": ("gauge", "Base learning rate of the current step", _STEP),
    "dinoray_wd": ("gauge", "Weight decay of the current step", _STEP),
    "dinoray_teacher_momentum": ("gauge", "EMA momentum of the teacher", _STEP),
    "dinoray_teacher_temp": ("gauge", "Teacher softmax temperature", _STEP),
    "dinoray_images_per_second": ("gauge", "Training throughput of this rank, images/s", _RANKED),
    "dinoray_step_seconds": ("histogram", "Wall time of a whole iteration, data wait included", _RANKED),
    "dinoray_data_wait_seconds": ("histogram", "Time an iteration waited for its batch", _RANKED),
    "dinoray_grad_norm": ("gauge", "Global gradient norm before clipping", _STEP),
    "dinoray_mfu": ("gauge", "Model FLOPs utilisation (analytical FLOPs / configured peak)", _STEP),
    "dinoray_samples_skipped_total": ("gauge", "Corrupt samples skipped so far in the run", _STEP),
    "dinoray_nonfinite_steps_total": ("gauge", "Steps skipped for a non-finite loss so far", _STEP),
    "dinoray_rollbacks_total": ("gauge", "Rollbacks to the last good checkpoint so far", _STEP),
    "dinoray_checkpoint_save_seconds": ("gauge", "Duration of the last checkpoint save", _STEP),
    "dinoray_checkpoint_stall_seconds": ("gauge", "Training time blocked by the last checkpoint", _STEP),
    "dinoray_last_checkpoint_timestamp_seconds": (
        "gauge", "Unix time of the last checkpoint (phase start before the first)", _STEP),
    "dinoray_checkpoint_interval_seconds": ("gauge", "Expected seconds between checkpoints", _STEP),
    "dinoray_gpu_memory_bytes": ("gauge", "GPU memory allocated by this rank", _STEP),
    "dinoray_goodput_ratio": ("gauge", "Productive step time over wall time since the phase started, "
                              "restarts included", _STEP),
    "dinoray_restarts_total": ("gauge", "Restarts of the phase's workers so far, by reason",
                               _STEP + ("reason",)),
    "dinoray_phase_state": ("gauge", "1 for the current state of a phase, else 0",
                            ("run", "phase", "kind", "state")),
    "dinoray_pipeline_progress": ("gauge", "Fraction of the pipeline done, 0..1", ("run",)),
    "dinoray_knn_accuracy": ("gauge", "k-NN top-1 accuracy of a phase's backbone", ("run", "phase", "k")),
    # curation (orchestrator/curate/phase.py)
    "dinoray_curate_stage": ("gauge", "1 for the stage a curate phase is in, else 0", ("run", "phase", "stage")),
    "dinoray_curate_images_per_second": ("gauge", "Images embedded per second", ("run", "phase", "set")),
    "dinoray_curate_images": ("gauge", "Images left after each curation stage", ("run", "phase", "stage")),
    "dinoray_curate_duplicates": ("gauge", "Images removed as copies (self) or near an exclude set (exclude)",
                                  ("run", "phase", "kind")),
    "dinoray_curate_cluster_size": ("histogram", "Images per k-means cluster of the pool", ("run", "phase")),
}
CLUSTER_BUCKETS = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000, 300000, 1000000)
_BUCKETS = {"dinoray_step_seconds": STEP_BUCKETS, "dinoray_curate_cluster_size": CLUSTER_BUCKETS}

# StepMetrics.record keys -> (metric, extra labels)
RECORD_KEYS: dict[str, tuple[str, dict[str, str]]] = {
    "loss": ("dinoray_loss", {"component": "total"}),
    **{f"loss_{c}": ("dinoray_loss", {"component": c}) for c in LOSS_COMPONENTS[1:]},
    "lr": ("dinoray_lr", {}),
    "wd": ("dinoray_wd", {}),
    "momentum": ("dinoray_teacher_momentum", {}),
    "teacher_temp": ("dinoray_teacher_temp", {}),
    "images_per_s": ("dinoray_images_per_second", {}),
    "step_s": ("dinoray_step_seconds", {}),
    "data_wait_s": ("dinoray_data_wait_seconds", {}),
    "grad_norm": ("dinoray_grad_norm", {}),
    "mfu": ("dinoray_mfu", {}),
    "samples_skipped_total": ("dinoray_samples_skipped_total", {}),
    "nonfinite_steps_total": ("dinoray_nonfinite_steps_total", {}),
    "rollbacks_total": ("dinoray_rollbacks_total", {}),
    "ckpt_save_s": ("dinoray_checkpoint_save_seconds", {}),
    "ckpt_stall_s": ("dinoray_checkpoint_stall_seconds", {}),
    "last_ckpt_unixtime": ("dinoray_last_checkpoint_timestamp_seconds", {}),
    "ckpt_interval_s": ("dinoray_checkpoint_interval_seconds", {}),
    "gpu_mem_bytes": ("dinoray_gpu_memory_bytes", {}),
}


def exported_names() -> set[str]:
    """Every series name a scrape can show (``ray_`` prefix, histogram suffixes)."""
    out = set()
    for name, (kind, _, _) in METRIC_NAMES.items():
        full = EXPORT_PREFIX + name
        out |= {full + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {full}
    return out


def metrics_port(env=None) -> int:
    """Port of the Prometheus endpoint: $DINORAY_METRICS_PORT or 8080."""
    raw = (os.environ if env is None else env).get("DINORAY_METRICS_PORT", str(DEFAULT_METRICS_PORT))
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise ValueError(f"DINORAY_METRICS_PORT={raw!r} is not a TCP port; set it to e.g. 8080")
    return port


def ray_init_kwargs(port: int | None = None, report_interval_ms: int | None = None) -> dict:
    """Keyword arguments for a local ``ray.init`` that exports metrics on ``port``.

    ``report_interval_ms`` lowers Ray's 10 s metrics report interval (tests use 1000).
    """
    kw: dict = {"_metrics_export_port": metrics_port() if port is None else int(port)}
    if report_interval_ms is not None:
        kw["_system_config"] = {"metrics_report_interval_ms": int(report_interval_ms)}
    return kw


def local_scrape_url(port: int | None = None) -> str:
    """URL ``dinoray run`` prints for scraping a local run."""
    return f"http://127.0.0.1:{metrics_port() if port is None else int(port)}/metrics"


def restart_reason(*, preempted: bool, world_size: int, saved_world_size: int) -> str:
    """Why a phase's workers started again from a checkpoint, for ``dinoray_restarts_total{reason}``.

    ``preempted``: the checkpoint resumed from was written for a drain (a just-in-time checkpoint).
    Otherwise a larger world than the checkpoint's is a ``resize`` (elastic growth: nothing failed),
    and the same or a smaller one is a ``failure`` (a worker, node or driver died).
    """
    if preempted:
        return "preemption"
    return "resize" if world_size > saved_world_size else "failure"


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


class _Series:
    """Metric objects of one transport plus the last gauge values (re-set periodically)."""

    def __init__(self, backend: str, registry=None):
        if backend == "auto":
            backend = "ray" if _ray_initialized() else "prometheus"
        if backend not in ("ray", "prometheus", "none"):
            raise ValueError(f"metrics backend {backend!r}: use 'auto', 'ray', 'prometheus' or 'none'")
        self.backend = backend
        self.registry = registry
        if backend == "prometheus" and registry is None:
            from prometheus_client import CollectorRegistry
            self.registry = CollectorRegistry()
        self._objs: dict = {}
        self._gauges: dict = {}  # (name, labels tuple) -> value
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if backend == "ray":
            import ray
            period = max(ray._config.metrics_report_interval_ms(), 1000) / 2000.0
            self._thread = threading.Thread(target=self._refresh, args=(period,),
                                            name="dinoray-metrics", daemon=True)
            self._thread.start()

    def _obj(self, name: str):
        obj = self._objs.get(name)
        if obj is None:
            kind, doc, labels = METRIC_NAMES[name]
            if self.backend == "ray":
                from ray.util import metrics as rm
                if kind == "histogram":
                    bounds = list(_BUCKETS.get(name, WAIT_BUCKETS))
                    obj = rm.Histogram(name, doc, boundaries=bounds, tag_keys=labels)
                else:
                    obj = rm.Gauge(name, doc, tag_keys=labels)
            else:
                import prometheus_client as pc
                full = EXPORT_PREFIX + name
                if kind == "histogram":
                    bounds = _BUCKETS.get(name, WAIT_BUCKETS)
                    obj = pc.Histogram(full, doc, labels, buckets=bounds, registry=self.registry)
                else:
                    obj = pc.Gauge(full, doc, labels, registry=self.registry)
            self._objs[name] = obj
        return obj

    def _write(self, name: str, labels: dict, value: float, observe: bool) -> None:
        obj = self._obj(name)
        if self.backend == "ray":
            (obj.observe if observe else obj.set)(value, tags=labels)
        else:
            child = obj.labels(**labels)
            (child.observe if observe else child.set)(value)

    def set(self, name: str, labels: dict, value: float) -> None:
        if self.backend == "none":
            return
        with self._lock:
            self._gauges[(name, tuple(sorted(labels.items())))] = float(value)
            self._write(name, labels, float(value), observe=False)

    def observe(self, name: str, labels: dict, value: float) -> None:
        if self.backend != "none" and math.isfinite(value):
            with self._lock:
                self._write(name, labels, float(value), observe=True)

    def _refresh(self, period: float) -> None:
        while not self._stop.wait(period):
            with self._lock:
                for (name, labels), value in self._gauges.items():
                    self._write(name, dict(labels), value, observe=False)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _json_value(v: float):
    return v if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))


class StepMetrics:
    """Per-step metrics of one phase on one rank (every rank creates one).

    ``record(step, values)`` updates the series and, where ``jsonl_path`` is given (one rank only),
    appends one JSON line ``{"time", "run", "phase", "step", **values}`` (non-finite floats written
    as "nan"/"inf"/"-inf"). ``values`` keys: see ``RECORD_KEYS``. Totals (``*_total``) are run-wide
    cumulative counts. Step time, data wait and throughput carry a ``rank`` label and are recorded by
    every rank; the other series (loss, lr, goodput, restarts, ...) describe the phase and come from
    rank 0 alone (another rank's ``record`` ignores them).
    The checkpoint interval for the staleness alert comes from ``checkpoint_interval_s``, or
    ``checkpoint_every_steps`` times the mean step time, or a ``ckpt_interval_s`` value.

    Goodput and restarts survive restarts through the checkpoint: put ``state()`` in the
    checkpoint's extras and, after loading one, call ``resume(extras_state, reason)``.
    ``goodput()`` is productive step time (``step_s`` minus ``ckpt_stall_s``, of the steps the
    resumed checkpoint kept) over wall time since the phase first started.
    ``backend``: "auto" (Ray if initialised, else a prometheus_client registry), "ray",
    "prometheus" (``registry`` or a fresh one, see ``.registry``), or "none".
    """

    def __init__(self, run: str, phase: str, jsonl_path: str | None = None, *, rank: int = 0,
                 checkpoint_interval_s: float | None = None, checkpoint_every_steps: int | None = None,
                 backend: str = "auto", registry=None):
        if not run or not phase:
            raise ValueError(f"StepMetrics needs a non-empty run and phase, got run={run!r} phase={phase!r}")
        if int(rank) < 0:
            raise ValueError(f"StepMetrics: rank must be >= 0, got {rank!r}")
        self.run, self.phase, self.rank = str(run), str(phase), int(rank)
        self.jsonl_path = None if jsonl_path is None else Path(jsonl_path)
        if self.jsonl_path is not None:
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        self._series = _Series(backend, registry)
        self.registry = self._series.registry
        self._every_steps = checkpoint_every_steps
        self._step_s_sum = 0.0
        self._step_s_n = 0
        self._labels = {"run": self.run, "phase": self.phase}
        self.phase_start_unixtime = time.time()
        self.productive_s = 0.0
        self.restarts = {reason: 0 for reason in RESTART_REASONS}
        if self.rank != 0:
            return
        self._series.set("dinoray_last_checkpoint_timestamp_seconds", self._labels, self.phase_start_unixtime)
        if checkpoint_interval_s is not None:
            self._series.set("dinoray_checkpoint_interval_seconds", self._labels, checkpoint_interval_s)
        for key in ("samples_skipped_total", "nonfinite_steps_total", "rollbacks_total"):
            self._series.set(RECORD_KEYS[key][0], self._labels, 0.0)
        self._set_restarts()

    def _set_restarts(self) -> None:
        for reason, count in self.restarts.items():
            self._series.set("dinoray_restarts_total", {**self._labels, "reason": reason}, count)

    def state(self) -> dict:
        """What to keep in a checkpoint's extras so goodput and restart counts survive a restart."""
        return {"phase_start_unixtime": self.phase_start_unixtime, "productive_s": self.productive_s,
                "restarts": dict(self.restarts)}

    def resume(self, saved: dict, reason: str) -> None:
        """Continue from a checkpoint's ``state()`` (``{}`` for one written before it existed) and
        count one restart of ``reason`` (see ``restart_reason``)."""
        if reason not in RESTART_REASONS:
            raise ValueError(f"restart reason {reason!r} is not one of {RESTART_REASONS}")
        self.phase_start_unixtime = float(saved.get("phase_start_unixtime", self.phase_start_unixtime))
        self.productive_s = float(saved.get("productive_s", 0.0))
        counts = saved.get("restarts", {})
        self.restarts = {r: int(counts.get(r, 0)) + (r == reason) for r in RESTART_REASONS}
        self._set_restarts()
        self._series.set("dinoray_goodput_ratio", self._labels, self.goodput())

    def goodput(self, now: float | None = None) -> float:
        """Productive step time over wall time since the phase first started, in [0, 1].

        Work lost to a restart (steps after the resumed checkpoint), restart time, checkpoint
        stalls and time with no workers at all count as unproductive.
        """
        wall = (time.time() if now is None else now) - self.phase_start_unixtime
        return 0.0 if wall <= 0 else min(self.productive_s / wall, 1.0)

    def record(self, step: int, values: dict[str, float]) -> None:
        unknown = [k for k in values if k not in RECORD_KEYS]
        if unknown:
            hints = {k: difflib.get_close_matches(k, RECORD_KEYS, n=1) for k in unknown}
            msg = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise ValueError(f"StepMetrics.record: unknown key(s) {msg}; allowed: {sorted(RECORD_KEYS)}")
        vals = {k: float(v) for k, v in values.items()}
        if "gpu_mem_bytes" not in vals:
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                vals["gpu_mem_bytes"] = float(torch.cuda.memory_allocated())
        if self.jsonl_path is not None:
            line = {"time": time.time(), "run": self.run, "phase": self.phase, "step": int(step)}
            line.update({k: _json_value(v) for k, v in vals.items()})
            with open(self.jsonl_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        if self.rank != 0:  # the phase-wide series are rank 0's
            vals = {k: v for k, v in vals.items() if "rank" in METRIC_NAMES[RECORD_KEYS[k][0]][2]}
        else:
            self._series.set("dinoray_step", self._labels, int(step))
        for key, v in vals.items():
            name, extra = RECORD_KEYS[key]
            kind, _, label_names = METRIC_NAMES[name]
            labels = {**self._labels, **extra, **({"rank": str(self.rank)} if "rank" in label_names else {})}
            if kind == "histogram":
                self._series.observe(name, labels, v)
            else:
                self._series.set(name, labels, v)
        step_s = vals.get("step_s") if self.rank == 0 else None
        if step_s is not None and math.isfinite(step_s):
            stall = vals.get("ckpt_stall_s", 0.0)
            self.productive_s += max(step_s - (stall if math.isfinite(stall) else 0.0), 0.0)
            self._series.set("dinoray_goodput_ratio", self._labels, self.goodput())
        if self._every_steps and step_s is not None and math.isfinite(step_s):
            self._step_s_sum += step_s
            self._step_s_n += 1
            interval = self._every_steps * self._step_s_sum / self._step_s_n
            self._series.set("dinoray_checkpoint_interval_seconds", self._labels, interval)

    def close(self) -> None:
        self._series.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PipelineMetrics:
    """Pipeline-level series the controller owns: phase states, progress, k-NN accuracy."""

    def __init__(self, run: str, *, backend: str = "auto", registry=None):
        if not run:
            raise ValueError("PipelineMetrics needs a non-empty run name")
        self.run = str(run)
        self._series = _Series(backend, registry)
        self.registry = self._series.registry

    def phase_state(self, phase: str, kind: str, state: str) -> None:
        if state not in PHASE_STATES:
            raise ValueError(f"phase {phase!r}: state {state!r} is not one of {PHASE_STATES}")
        for s in PHASE_STATES:
            labels = {"run": self.run, "phase": str(phase), "kind": str(kind), "state": s}
            self._series.set("dinoray_phase_state", labels, 1.0 if s == state else 0.0)

    def progress(self, fraction: float) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"pipeline progress {fraction!r} must lie in [0, 1]")
        self._series.set("dinoray_pipeline_progress", {"run": self.run}, fraction)

    def knn(self, phase: str, k: int, accuracy: float) -> None:
        self._series.set("dinoray_knn_accuracy", {"run": self.run, "phase": str(phase), "k": str(int(k))},
                         accuracy)

    def close(self) -> None:
        self._series.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def serve_http(registry, port: int, addr: str = "127.0.0.1"):
    """Expose a prometheus_client registry (the non-Ray backend) on http://addr:port/metrics."""
    from prometheus_client import start_http_server
    return start_http_server(port, addr=addr, registry=registry)
