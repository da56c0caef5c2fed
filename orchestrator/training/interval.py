"""Checkpoint interval from measured costs: the Young-Daly rule, and the goodput it buys.

Pure functions (no torch, no Ray). A checkpoint that stalls training for ``stall_s`` seconds, taken
every ``T`` seconds of work, on a job interrupted on average every ``M`` seconds (its MTBF) that
needs ``restart_s`` to start again, wastes to first order

    stall_s / T          (checkpoint stalls)
  + (T / 2 + restart_s) / M   (per failure: half an interval of lost work, then the restart)

of its wall time. The interval that minimises this is Young's ``T = sqrt(2 * stall_s * M)``
(J. W. Young, CACM 1974; J. T. Daly, FGCS 2006, shows it is the first-order optimum). The worker
turns it into steps with the measured step time: ``young_daly_steps``.

Print the table of docs/scale.md:  .venv/bin/python -m orchestrator.training.interval
"""

from __future__ import annotations

import math

HOUR_S = 3600.0


def young_daly_seconds(stall_s: float, mtbf_hours: float) -> float:
    """Young's optimal checkpoint interval sqrt(2 * C * MTBF), in seconds of work."""
    if not (stall_s > 0 and math.isfinite(stall_s)):
        raise ValueError(f"checkpoint stall must be a positive number of seconds, got {stall_s!r}")
    if not (mtbf_hours > 0 and math.isfinite(mtbf_hours)):
        raise ValueError(f"failure.mtbf_hours must be > 0, got {mtbf_hours!r}")
    return math.sqrt(2.0 * stall_s * mtbf_hours * HOUR_S)


def young_daly_steps(stall_s: float, step_s: float, mtbf_hours: float, *, min_steps: int = 1,
                     max_steps: int | None = None) -> int:
    """Steps between checkpoints: sqrt(2 * stall_s * MTBF) / step_s, rounded, clamped to
    [min_steps, max_steps].

    ``stall_s``: measured training time one checkpoint blocks (``ckpt_stall_s``); ``step_s``: measured
    mean step time; ``mtbf_hours``: mean time between interruptions of the whole job (see
    ``job_mtbf_hours``); ``max_steps``: e.g. the phase length.
    """
    if not (step_s > 0 and math.isfinite(step_s)):
        raise ValueError(f"step time must be a positive number of seconds, got {step_s!r}")
    if min_steps < 1 or (max_steps is not None and max_steps < min_steps):
        raise ValueError(f"need 1 <= min_steps <= max_steps, got min_steps={min_steps}, max_steps={max_steps}")
    steps = max(int(round(young_daly_seconds(stall_s, mtbf_hours) / step_s)), min_steps)
    return steps if max_steps is None else min(steps, max_steps)


def job_mtbf_hours(node_mtbf_hours: float, nodes: int) -> float:
    """MTBF of a job that any one of ``nodes`` independent nodes can interrupt."""
    if nodes < 1 or not node_mtbf_hours > 0:
        raise ValueError(f"need nodes >= 1 and node_mtbf_hours > 0, got {nodes}, {node_mtbf_hours}")
    return node_mtbf_hours / nodes


def expected_goodput(stall_s: float, interval_s: float, restart_s: float, mtbf_hours: float) -> float:
    """Expected fraction of wall time spent on steps that are kept, floored at 0.

    A period is ``P = interval_s + stall_s``; without failures ``interval_s / P`` of it is work.
    Each failure (one per MTBF of wall time) costs the restart plus, on average, half a period:
    goodput = interval_s / P * (1 - (restart_s + P / 2) / MTBF). Good while P and restart_s are
    small against the MTBF (``simulate_goodput`` checks it); to first order in stall_s / interval_s
    this is the module docstring's waste, minimised by ``young_daly_seconds``."""
    if interval_s <= 0 or restart_s < 0 or stall_s < 0 or mtbf_hours <= 0:
        raise ValueError("expected_goodput needs interval_s > 0, restart_s >= 0, stall_s >= 0, mtbf_hours > 0")
    period = interval_s + stall_s
    return max(interval_s / period * (1.0 - (restart_s + period / 2.0) / (mtbf_hours * HOUR_S)), 0.0)


def simulate_goodput(stall_s: float, interval_s: float, restart_s: float, mtbf_hours: float, *,
                     work_s: float, rng) -> float:
    """Monte-Carlo check of ``expected_goodput``: run ``work_s`` seconds of steps, checkpointing every
    ``interval_s`` of work (``stall_s`` each), with exponential failures (mean ``mtbf_hours``, drawn
    from ``rng``, a ``random.Random``) that lose the work since the last checkpoint and cost
    ``restart_s``. Failures can also strike during a checkpoint or a restart. Returns work_s / wall."""
    mtbf_s, done, wall = mtbf_hours * HOUR_S, 0.0, 0.0
    next_failure = rng.expovariate(1.0 / mtbf_s)
    while done < work_s:
        segment = min(interval_s, work_s - done) + stall_s   # work to the next checkpoint, then its stall
        if wall + segment <= next_failure:
            wall += segment
            done += segment - stall_s
            continue
        wall = next_failure + restart_s                        # the segment is lost; restart
        next_failure = wall + rng.expovariate(1.0 / mtbf_s)    # (memoryless: a fresh draw after restart)
    return work_s / wall


def scale_table(rows: list[dict], restarts_s: tuple[float, ...], every_steps: int) -> list[dict]:
    """For each row {gpus, gpus_per_node, step_s, stall_s, node_mtbf_hours}: the job MTBF, the
    Young-Daly interval, the goodput at it for each restart time, and at a fixed ``every_steps``
    (with the last restart time)."""
    out = []
    for row in rows:
        mtbf = job_mtbf_hours(row["node_mtbf_hours"], max(row["gpus"] // row["gpus_per_node"], 1))
        steps = young_daly_steps(row["stall_s"], row["step_s"], mtbf)
        auto_s, fixed_s = steps * row["step_s"], every_steps * row["step_s"]
        out.append({**row, "job_mtbf_hours": mtbf, "auto_steps": steps, "auto_minutes": auto_s / 60.0,
                    "goodput_auto": [expected_goodput(row["stall_s"], auto_s, r, mtbf) for r in restarts_s],
                    "goodput_fixed": expected_goodput(row["stall_s"], fixed_s, restarts_s[-1], mtbf)})
    return out


def _print_table() -> None:
    """The docs/scale.md table; docs/scale.md says where each input comes from."""
    img_per_gpu_s, batch, state_bytes = 55.2, 3072, 20.1e9   # H200 ViT-g/14 images/s, paper batch, state bytes
    stall_rate = 55.6 * 2**20 / 0.54                          # async DCP stall per rank, bytes/s (measured)
    restarts_s, every_steps = (36.0, 300.0), 2500             # measured local restart; node replacement
    rows = [{"gpus": g, "gpus_per_node": 8, "step_s": batch / g / img_per_gpu_s,
             "stall_s": state_bytes / g / stall_rate, "node_mtbf_hours": m, "fleet": fleet}
            for g in (8, 64, 256) for fleet, m in (("on-demand", 3700.0), ("spot", 100.0))]
    print("| GPUs | fleet (node MTBF) | job MTBF | step | stall | Young-Daly interval | "
          + " | ".join(f"goodput, restart {r:.0f} s" for r in restarts_s)
          + f" | goodput, every {every_steps} steps |")
    print("|---" * (7 + len(restarts_s)) + "|")
    for r in scale_table(rows, restarts_s, every_steps):
        print(f"| {r['gpus']} | {r['fleet']} ({r['node_mtbf_hours']:.0f} h) | {r['job_mtbf_hours']:.1f} h | "
              f"{r['step_s']:.2f} s | {r['stall_s']:.1f} s | {r['auto_steps']} steps ({r['auto_minutes']:.0f} min) | "
              + " | ".join(f"{g:.1%}" for g in r["goodput_auto"]) + f" | {r['goodput_fixed']:.1%} |")


if __name__ == "__main__":
    _print_table()
