"""Live progress of a run, read from its storage: step, images/s, ETA, loss, last committed checkpoint.

    dinoray status runs/smoke            # one line per phase
    dinoray status runs/smoke --json     # pipeline.json with the live fields filled in

A running training phase's progress comes from what its workers write as they go (orchestrator/layout.py
names the paths): the tail of `{phase}/metrics.jsonl` (rank 0 appends one record per step; on object
storage it is uploaded at each checkpoint commit, and its last records every `metrics.live_every_s`
seconds as `metrics.live.jsonl`) and the `checkpoints/step-N/COMMITTED` markers.
Imports neither torch nor Ray, so `dinoray status` answers in well under 2 s; the driver's console
(orchestrator/pipeline/console.py) polls the same `key_progress` while a phase trains.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

from orchestrator.layout import PhaseDir, RunLayout
from orchestrator.pipeline import state as run_state
from orchestrator.pipeline.schema import TRAINING_KINDS
from orchestrator.pipeline.state import PipelineError
from orchestrator.storage import Store

TAIL_BYTES = 1 << 16      # the end of metrics.jsonl read per poll: about 150 records
RATE_RECORDS = 20         # records behind images/s and the step time of the ETA
LIVE_KEYS = ("step", "steps", "images_per_s", "eta_s", "loss", "checkpoint", "checkpoint_step", "updated")


def tail_records(store: Store, nbytes: int = TAIL_BYTES) -> list[dict]:
    """The last complete JSON lines of a JSON-lines file ([] when it does not exist yet)."""
    try:
        size = store.size()
    except FileNotFoundError:
        return []
    data = store.read_bytes(max(0, size - nbytes), size).decode(errors="replace")
    lines = data.splitlines()
    if size > nbytes:
        lines = lines[1:]  # the first line may be cut
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written right now
    return out


def step_records(phase: PhaseDir) -> list[dict]:
    """The last step records of a phase folder: metrics.jsonl's tail, then on object storage the newer
    ones of metrics.live.jsonl (uploaded between the commits that upload metrics.jsonl)."""
    recs = [r for r in tail_records(phase.metrics) if isinstance(r.get("step"), int)]
    if not phase.root.is_local:
        last = recs[-1]["step"] if recs else 0
        recs += [r for r in tail_records(phase.metrics_live) if isinstance(r.get("step"), int) and r["step"] > last]
    return recs


def key_progress(phase: PhaseDir, steps: int, now: float | None = None, batch_size: int | None = None) -> dict:
    """Progress of one phase folder (a phase, or one distillation student) from its files. images/s is
    the whole job's, the global `batch_size` over the wall time per step (checkpoint stalls included);
    without `batch_size` (a run started before pipeline.json recorded it), rank 0's own rate."""
    now = time.time() if now is None else now
    recs = step_records(phase)
    committed = phase.committed_steps()
    out = {"step": 0, "steps": steps, "images_per_s": None, "eta_s": None, "loss": None,
           "checkpoint": str(phase.checkpoint(committed[-1])) if committed else None,
           "checkpoint_step": committed[-1] if committed else None, "updated": None}
    if not recs:
        out["step"] = committed[-1] if committed else 0
        return out
    last = recs[-1]
    window = recs[-RATE_RECORDS:]
    rates = [r["images_per_s"] for r in window if isinstance(r.get("images_per_s"), (int, float))]
    out.update(step=last["step"], loss=_number(last.get("loss")), updated=last.get("time"),
               images_per_s=statistics.median(rates) if rates else None)
    step_s = _wall_per_step(window)
    if step_s is not None:
        out["eta_s"] = max(0, steps - last["step"]) * step_s
        if batch_size:
            out["images_per_s"] = batch_size / max(step_s, 1e-9)
    return out


def _number(value):
    return value if isinstance(value, (int, float)) else None  # "nan" is written as a string


def _wall_per_step(recs: list[dict]) -> float | None:
    """Wall seconds per step over the records (checkpoint stalls included), else the last step_s."""
    timed = [r for r in recs if isinstance(r.get("time"), (int, float))]
    if len(timed) >= 2 and timed[-1]["step"] > timed[0]["step"]:
        return (timed[-1]["time"] - timed[0]["time"]) / (timed[-1]["step"] - timed[0]["step"])
    step_s = recs[-1].get("step_s") if recs else None
    return step_s if isinstance(step_s, (int, float)) else None


def phase_folders(layout: RunLayout, entry: dict) -> list[str]:
    """The folders a phase entry of pipeline.json trains into: its `keys` when recorded, else the
    phase's name, or for a distill phase the `{name}-{arch}` folders present."""
    if entry.get("keys"):
        return list(entry["keys"])
    if entry.get("kind") == "distill":
        found = [n for n in layout.root.ls() if n.startswith(f"{entry['name']}-")]
        return found or [entry["name"]]
    return [entry["name"]]


def phase_progress(layout: RunLayout, entry: dict, now: float | None = None) -> dict:
    """Live fields (LIVE_KEYS) of a running training phase, from the folder being trained now
    (distillation trains its students one after another), plus `folders`: per folder progress."""
    folders = {key: key_progress(layout.phase(key), entry["steps"], now, entry.get("batch_size"))
               for key in phase_folders(layout, entry)}
    active = next((p for key, p in folders.items() if not layout.phase(key).final_done.exists()),
                  list(folders.values())[-1])
    return {**active, "folders": folders}


def live_state(layout: RunLayout, state: dict, now: float | None = None) -> dict:
    """pipeline.json with every running training phase's entry overlaid with its live progress."""
    phases = []
    for entry in state["phases"]:
        if entry["state"] == "running" and entry.get("kind") in TRAINING_KINDS:
            entry = {**entry, **phase_progress(layout, entry, now)}
        phases.append(entry)
    return {**state, "phases": phases}


def layout_of(run_url: str, options: dict | None = None) -> RunLayout:
    """The RunLayout of a run given as its root URL `{storage}/{name}`."""
    run = Store(run_url, options)
    return RunLayout(run.parent, run.name)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def describe(p: dict) -> str:
    """'step 130/180  41.2 img/s  ETA 1:05  loss 5.123  ckpt step 120': one progress record as text."""
    parts = [f"step {p['step']}/{p['steps']}"]
    if p.get("images_per_s") is not None:
        parts.append(f"{p['images_per_s']:.1f} img/s")
    if p.get("eta_s") is not None and p["step"] < p["steps"]:
        parts.append(f"ETA {fmt_duration(p['eta_s'])}")
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4g}")
    parts.append(f"ckpt step {p['checkpoint_step']}" if p.get("checkpoint_step") is not None else "no ckpt yet")
    return "  ".join(parts)


def fmt_status(state: dict, now: float | None = None) -> str:
    """One line per phase; running training phases with their live progress."""
    now = time.time() if now is None else now
    lines = [f"run {state['name']} ({state['storage']})"]
    for e in state["phases"]:
        head = f"  {e['name']:<12} {e['kind']:<9} {e['state']:<8}"
        if e["state"] == "running" and "eta_s" in e:
            age = f"  (updated {fmt_duration(now - e['updated'])} ago)" if e.get("updated") else ""
            lines.append(f"{head} {describe(e)}{age}")
        else:
            lines.append(f"{head} step {e['step']}/{e['steps']}  {e.get('checkpoint') or '-'}")
        if e.get("error"):
            lines.append(f"      error: {e['error']}")
    return "\n".join(lines)


def run_status(run_url: str, options: dict | None = None) -> dict:
    """pipeline.json of the run at `run_url` with live progress; PipelineError names the file."""
    layout = layout_of(run_url, options)
    return live_state(layout, run_state.read(layout))


def cmd_status(args) -> int:
    """`dinoray status RUN [--json]`: the run's phases, a running one with step, images/s, ETA, checkpoint."""
    try:
        state = run_status(args.run_url)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(json.dumps(state, default=str) if args.json else fmt_status(state))
    return 0
