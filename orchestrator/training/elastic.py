"""What a training worker does for long runs on many, changing nodes (called by worker.py):

- checkpoints Ray can see: each committed checkpoint is registered with `ray.train.report(checkpoint=)`
  in place (NO_UPLOAD: the phase folder is the Ray Train run's folder), so Ray's `num_to_keep` retains
  them and `ray.train.get_checkpoint()` names the one to resume from;
- preemption: when Ray drains a node (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION
  --deadline-remaining-seconds N`, as KubeRay's preStop hook and the autoscaler do), every worker sees it
  through `ray.train.get_preemption_info()` at the next step boundary, writes a just-in-time checkpoint,
  and then takes no step that the restart would throw away: it waits for Ray to restart the group on
  the remaining nodes at the deadline (training resumes if the deadline passes and nothing happened);
- restart accounting: restarts.json keeps the phase's first start time and its restarts by reason
  (preemption: a PREEMPTED marker is there; resize: more workers than the last start; else failure),
  for `dinoray_restarts_total{reason}` and `dinoray_goodput_ratio`;
- `checkpoint.every_steps: auto`: the Young-Daly interval from the measured stall and step time.

Run its tests:  .venv/bin/python -m pytest tests/test_elastic.py -q
"""
from __future__ import annotations

import collections
import time

from orchestrator.layout import PhaseDir
from orchestrator.metrics import RESTART_REASONS, restart_reason
from orchestrator.storage import Store
from orchestrator.training import interval

AUTO_FIRST_STEPS = 10   # every_steps auto: the first checkpoint, which measures the stall
STEP_WINDOW = 200      # every_steps auto: the median of the last this many step times
PAUSE_MARGIN_S = 30.0   # after a drain's deadline (+ grace), a worker Ray did not restart trains on


def in_ray_train() -> bool:
    """False when worker_loop runs in a plain torch process group (tests of single phases)."""
    import ray.train
    try:
        ray.train.get_context()
        return True
    except RuntimeError:
        return False


# ------------------------------------------------------------------------ checkpoints Ray can see
def register(step: int, rank: int) -> None:
    """Report the committed checkpoint of `step` to Ray Train in place (every rank calls it: a barrier).
    Its path is in the Ray Train run's folder, which is the phase folder (layout.RunLayout.ray_run)."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode
    checkpoint, tag = None, PhaseDir.checkpoint_tag(step)
    if rank == 0:
        storage = ray.train.get_context().get_storage()
        path = "/".join((storage.experiment_fs_path, PhaseDir.checkpoints_rel, tag))
        checkpoint = Checkpoint(path, filesystem=storage.storage_filesystem)
    ray.train.report({"step": step}, checkpoint=checkpoint, checkpoint_dir_name=tag,
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def sweep_unregistered(phase: PhaseDir) -> list[int]:
    """At the end of a phase (rank 0), once Ray Train has processed every report (and so made its own
    deletions): remove the checkpoint folders Ray does not hold that are older than its newest. These
    are a checkpoint whose report raced its worker's death (Ray 2.60 can lose it; it would stay
    forever, since Ray retains only what it knows) and what is left of a folder whose deletion was
    cut short. Ray fails the run when a folder it holds is gone, so this never touches those.
    Returns the steps removed."""
    import ray.train
    known = {PhaseDir.parse_step(c.checkpoint.path) for c in ray.train.get_all_reported_checkpoints()}
    steps = [PhaseDir.parse_step(name) for name in phase.checkpoints.ls()]
    stray = sorted(s for s in steps if s is not None and s not in known and s < max(known, default=-1))
    for step in stray:
        PhaseDir.committed(phase.checkpoint(step)).rm()
        phase.checkpoint(step).rm(recursive=True)
    return stray


def resume_point(phase: PhaseDir, latest: tuple[int, Store] | None) -> tuple[int, Store, str] | None:
    """(step, location, "ray" | "storage") of the checkpoint to resume from: Ray's latest registered
    one, or `latest` (the newest committed one on storage) where that is newer: a worker that died
    between the commit and the report left it unregistered, and it is complete."""
    import ray.train
    reported = ray.train.get_checkpoint()
    step = PhaseDir.parse_step(reported.path) if reported is not None else None
    if step is not None and not PhaseDir.committed(phase.checkpoint(step)).exists():
        # Ray registers only committed checkpoints: the folder was changed outside dinoray. Resuming
        # from an older one would reuse step names that Ray's retention would then delete.
        raise RuntimeError(f"{phase.checkpoint(step).url}: Ray Train registered this checkpoint but its COMMITTED "
                           f"marker is gone (changed outside dinoray); to resume from the newest complete one "
                           f"(step {latest[0] if latest else 'none'}), delete {phase.ray_snapshot.url}")
    if step is not None and (latest is None or latest[0] <= step):
        return step, phase.checkpoint(step), "ray"
    return (*latest, "storage") if latest else None


# ------------------------------------------------------------------------------------ preemption
def preemption_notice() -> dict | None:
    """{"deadline_s": unix seconds or None, "ranks": [...]} once a node of this run is being drained
    for preemption, else None. Collective: every worker calls it at the same step."""
    import ray.train
    info = ray.train.get_preemption_info()
    if info is None:
        return None
    deadline = info.deadline_ms / 1000.0 if info.deadline_ms else None
    return {"deadline_s": deadline, "ranks": info.preempted_ranks}


def pause_until_restart(deadline_s: float | None, grace_s: float, log) -> None:
    """After the just-in-time checkpoint: take no step that the restart would redo. Ray restarts the
    worker group at the deadline (+ preemption_grace_s); a worker still here later trains on."""
    if deadline_s is None:
        return
    until = deadline_s + grace_s + PAUSE_MARGIN_S
    log(f"waiting for the restart at the drain deadline (in {max(deadline_s - time.time(), 0):.0f} s)")
    while time.time() < until:
        time.sleep(0.5)
    log("the drain deadline passed and no restart came: training on")


# ----------------------------------------------------------------------------- restart accounting
def count_start(phase: PhaseDir, world: int, step: int, source: str | None) -> tuple[str | None, dict]:
    """Record one start of the phase's workers, at `world` workers from `step`, resumed from `source`
    ("ray": ray.train.get_checkpoint(), "storage", None) (rank 0 only). Returns (the restart's reason,
    or None for the phase's first start; the record before this start: {phase_start_unixtime,
    restarts{reason: n}, world_size, starts[{time, world_size, step, source, reason}]}).
    A start after a drain's just-in-time checkpoint is a preemption; else one with more workers than
    the last is a resize (elastic growth), and any other a failure."""
    before = phase.restarts.read_json()
    if before is None:
        before, reason = {"phase_start_unixtime": time.time(), "restarts": {r: 0 for r in RESTART_REASONS},
                          "starts": []}, None
    else:
        reason = restart_reason(preempted=phase.preempted.exists(), world_size=world,
                                saved_world_size=before["world_size"])
    counts = {r: n + (r == reason) for r, n in before["restarts"].items()}
    start = {"time": time.time(), "world_size": world, "step": step, "source": source, "reason": reason}
    phase.restarts.write_json({**before, "restarts": counts, "world_size": world, "starts": [*before["starts"], start]})
    phase.preempted.rm()
    return reason, before


# --------------------------------------------------------------------------- checkpoint interval
class Interval:
    """When to checkpoint: every `every_steps`, or ("auto") first after AUTO_FIRST_STEPS, then every
    Young-Daly interval from the measured stall and step time and `mtbf_hours`."""

    def __init__(self, every_steps, steps: int, mtbf_hours: float, log):
        self.auto, self.steps, self.mtbf, self.log = every_steps == "auto", steps, mtbf_hours, log
        self.every = min(AUTO_FIRST_STEPS, steps) if self.auto else int(every_steps)
        self.last = 0
        self._step_s: collections.deque = collections.deque(maxlen=STEP_WINDOW)  # recent step times

    def due(self, step: int) -> bool:
        return step - self.last >= self.every or step == self.steps

    def observe(self, step: int, step_s: float, stall_s: float | None, agree=None) -> None:
        """After each step: its time, and the stall of a checkpoint taken at it (None: none taken).
        `agree(stall_s, step_s) -> (stall_s, step_s)`: the values every rank uses (the worker's takes
        the largest over the ranks). Each rank measures its own times, and a rank whose interval came
        out one step different would save alone: the save's collectives would then meet another rank's
        step. Called at every checkpoint step of an auto interval, so on every rank at the same steps."""
        self._step_s.append(step_s)
        if stall_s is None:
            return
        self.last = step
        if not self.auto:
            return
        work = sorted(self._step_s)[len(self._step_s) // 2]  # median: a checkpoint step is slower
        if agree is not None:
            stall_s, work = agree(stall_s, work)
        if stall_s > 0:
            self.every = interval.young_daly_steps(stall_s, work, self.mtbf, max_steps=self.steps)
            self.log(f"checkpoint.every_steps auto: stall {stall_s:.3g} s, step {work:.3g} s, MTBF "
                     f"{self.mtbf:g} h -> every {self.every} steps ({self.every * work:.0f} s)")

    def seconds(self) -> float | None:
        """Expected seconds between checkpoints (for the staleness alert), once steps were timed."""
        if not self._step_s:
            return None
        return self.every * sorted(self._step_s)[len(self._step_s) // 2]
