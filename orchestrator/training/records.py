"""The JSON-lines files a training worker appends to: metrics.jsonl (rank 0) and, with
`debug.trace_samples`, trace/rank<r>.jsonl (each rank's micro-batch fingerprints).

On local storage a worker appends to the file itself; on object storage to a local copy that is
uploaded with each committed checkpoint and at the end, and rank 0 uploads the copy's last records
every `metrics.live_every_s` seconds (`LiveTail`, a few tens of KB, from a background thread), so that
`dinoray status` follows the step between commits without a whole-file upload each time. Either way a
(re)start first cuts the file at the step it resumes from, so every step is recorded once.

No entrypoint; used by orchestrator/training/worker.py (`dinoray run JOB`).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time

from orchestrator.layout import PhaseDir
from orchestrator.storage import Store, describe_error

LIVE_BYTES = 1 << 15  # the tail LiveTail uploads: ~48 records, more than dinoray status reads for a rate


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
        path = local_copy(phase_dir, PhaseDir.metrics_rel, step + 1)  # steps are 1-based
        worker.files[PhaseDir.metrics_rel] = path
        if not phase_dir.root.is_local:  # the cut file replaces what went up before the restart
            phase_dir.metrics.put_file(path)
            worker.live = LiveTail(path, phase_dir.metrics_live, worker.job.metrics.live_every_s)
            worker.live.upload()


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


class LiveTail:
    """Uploads the last LIVE_BYTES of the local metrics.jsonl (whole lines) to `remote` when `every_s`
    seconds have passed since the last upload (`maybe_upload`, at each step), in a background thread:
    a step never waits for object storage. A failed upload is reported once and retried at the next."""

    def __init__(self, local_path: str, remote: Store, every_s: float):
        self.local_path, self.remote, self.every_s = local_path, remote, every_s
        self._last, self._thread, self._warned = float("-inf"), None, False

    def maybe_upload(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now - self._last < self.every_s or (self._thread is not None and self._thread.is_alive()):
            return False
        self._last = now
        self._thread = threading.Thread(target=self.upload, name="metrics-live", daemon=True)
        self._thread.start()
        return True

    def upload(self) -> None:
        try:
            size = os.path.getsize(self.local_path)
            with open(self.local_path, "rb") as f:
                f.seek(max(0, size - LIVE_BYTES))
                data = f.read(LIVE_BYTES)  # the file only grows: a line being appended is cut below
            if size > LIVE_BYTES:
                data = data.split(b"\n", 1)[-1]  # the first line may start before the window
            self.remote.write_bytes(data[:data.rfind(b"\n") + 1])
        except Exception as exc:  # noqa: BLE001 - a status feed: it never stops the training
            if not self._warned:
                print(f"dinoray status lags until this upload works: {describe_error(self.remote.url, exc)}")
                self._warned = True

    def close(self) -> None:
        """Wait for an upload in flight, then upload the final tail."""
        if self._thread is not None:
            self._thread.join()
        self.upload()


def trace(path: str, step: int, data_pos: int, batch: dict, stream: int) -> None:
    """Fingerprint of every image of a micro-batch (crop 0 + its labels): equal runs read equal data."""
    g = batch["global_crops"]
    n = g.shape[0] // 2
    ids = [hashlib.sha1(g[i].cpu().numpy().tobytes()).hexdigest()[:12] for i in range(n)]
    ids = [f"{k}:{h}" for k, h in zip(batch["keys"], ids)] if "keys" in batch else ids
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "pos": data_pos, "stream": stream, "ids": ids,
                            "labels": batch["labels"].tolist() if "labels" in batch else None}) + "\n")
