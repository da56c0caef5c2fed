"""The JSON-lines files a training worker appends to: metrics.jsonl (rank 0) and, with
`debug.trace_samples`, trace/rank<r>.jsonl (each rank's micro-batch fingerprints).

On local storage a worker appends to the file itself; on object storage to a local copy that is
uploaded with each committed checkpoint and at the end. Either way a (re)start first cuts the file
at the step it resumes from, so every step is recorded once.

No entrypoint; used by orchestrator/training/worker.py (`dinoray run JOB`).
"""
from __future__ import annotations

import hashlib
import json
import os

from orchestrator.layout import PhaseDir


def open_files(worker) -> None:
    """The JSON-lines files this rank appends to, cut at the resumed step (each step recorded once).
    Rank 0 also cuts the traces of ranks that this world size no longer has."""
    step, phase_dir = worker.state.step, worker.phase_dir
    if worker.job.debug.trace_samples:
        worker.files[PhaseDir.trace_rel(worker.rank)] = local_copy(phase_dir, PhaseDir.trace_rel(worker.rank), step)
        gone = worker.world if worker.rank == 0 else None
        while gone is not None and (phase_dir.root / PhaseDir.trace_rel(gone)).exists():
            path = local_copy(phase_dir, PhaseDir.trace_rel(gone), step)
            if not phase_dir.root.is_local:
                (phase_dir.root / PhaseDir.trace_rel(gone)).put_file(path)
            gone += 1
    if worker.rank == 0:
        worker.files[PhaseDir.metrics_rel] = local_copy(phase_dir, PhaseDir.metrics_rel, step + 1)  # 1-based


def local_copy(phase_dir: PhaseDir, rel: str, keep_below: int) -> str:
    """The local file this process appends the phase's JSON-lines file `rel` to: the file itself on
    local storage, else a copy uploaded by `upload` at each commit and at the end. Either way,
    records of steps >= keep_below (to be redone after a resume) are dropped first, so that every
    step is recorded once."""
    folder, _ = phase_dir.root.staging_dir(prefix="dinoray-")
    path = os.path.join(folder, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    source = phase_dir.root / rel
    lines = source.read_bytes().decode().splitlines(keepends=True) if source.exists() else []
    with open(path + ".tmp", "w") as f:
        f.writelines(ln if ln.endswith("\n") else ln + "\n" for ln in lines if step_of(ln) < keep_below)
    os.replace(path + ".tmp", path)
    return path


def step_of(line: str) -> float:
    """The step of a JSON-lines record; infinite for a blank or torn line (a kill mid-append)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def upload(worker) -> None:
    if worker.phase_dir.root.is_local:
        return
    for rel, path in worker.files.items():
        if os.path.exists(path):
            (worker.phase_dir.root / rel).put_file(path)


def trace(path: str, step: int, data_pos: int, batch: dict, stream: int) -> None:
    """Fingerprint of every image of a micro-batch (crop 0 + its labels): equal runs read equal data."""
    g = batch["global_crops"]
    n = g.shape[0] // 2
    ids = [hashlib.sha1(g[i].cpu().numpy().tobytes()).hexdigest()[:12] for i in range(n)]
    ids = [f"{k}:{h}" for k, h in zip(batch["keys"], ids)] if "keys" in batch else ids
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "pos": data_pos, "stream": stream, "ids": ids,
                            "labels": batch["labels"].tolist() if "labels" in batch else None}) + "\n")
