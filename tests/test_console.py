"""The console of `dinoray run`: the per-phase progress line (plain lines off a terminal, a tqdm bar on
one), worker log echo with --verbose, a worker's output captured into its log file, and a worker's
own error (not Ray's wrapper) with the path of its log. Files are written as a run writes them.

    .venv/bin/python -m pytest tests/test_console.py -q
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator import metrics
from orchestrator.layout import RunLayout
from orchestrator.pipeline import console
from orchestrator.storage import Store

REPO = Path(__file__).resolve().parents[1]


def record(phase, first, last):
    m = metrics.StepMetrics("smoke", phase.key, phase.metrics.local_path, backend="none")
    for step in range(first, last + 1):
        m.record(step, {"step_s": 0.25, "images_per_s": 256.0, "loss": 9.0})


def test_plain_lines_every_tenth_of_the_phase_and_at_the_end(tmp_path):
    phase = RunLayout(Store(str(tmp_path)), "smoke").phase("pretrain")
    out = io.StringIO()
    with console.PhaseProgress(phase, 40, "pretrain", stream=out, tty=False, poll_s=3600) as bar:
        record(phase, 1, 2)
        bar.poll()
        assert out.getvalue() == ""                     # every 4 steps: nothing yet
        record(phase, 3, 9)
        bar.poll()
        bar.poll()                                      # no new step: no new line
        (phase.checkpoint(8) / "rank-0.pt").write_bytes(b"x")
        phase.committed(phase.checkpoint(8)).write_json({"step": 8})
        record(phase, 10, 40)
        bar.poll()                                      # the last step, before its checkpoint commits
        (phase.checkpoint(40) / "rank-0.pt").write_bytes(b"x")
        phase.committed(phase.checkpoint(40)).write_json({"step": 40})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[pretrain] step 9/40  256.0 img/s  ETA ") and "loss 9" in lines[0], lines
    assert lines[0].endswith("no ckpt yet") and lines[1].startswith("[pretrain] step 40/40  256.0 img/s  loss 9")
    assert lines[1].endswith("ckpt step 8") and lines[2].endswith("step 40/40  256.0 img/s  loss 9  ckpt step 40")
    assert len(lines) == 3, lines


def test_terminal_bar_updates_in_place(tmp_path):
    phase = RunLayout(Store(str(tmp_path)), "smoke").phase("highres")
    out = io.StringIO()
    with console.PhaseProgress(phase, 20, "highres", stream=out, tty=True, poll_s=3600) as bar:
        record(phase, 1, 5)
        bar.poll()
        record(phase, 6, 20)
    text = out.getvalue()
    assert "\r" in text and "\n" not in text.rstrip("\n"), repr(text)   # redrawn in place, one line kept
    assert "[highres] 5/20" in text and "[highres] 20/20" in text and "256.0 img/s" in text, repr(text)


def test_verbose_echoes_new_worker_log_lines_once(tmp_path):
    phase = RunLayout(Store(str(tmp_path)), "smoke").phase("pretrain")
    log = Path(phase.worker_log(1).local_path)
    log.parent.mkdir(parents=True)
    out = io.StringIO()
    with console.PhaseProgress(phase, 10, "pretrain", stream=out, tty=False, poll_s=3600, verbose=True) as bar:
        log.write_text("first line\nhalf a li")
        bar.poll()
        with log.open("a") as fh:
            fh.write("ne\n")
        bar.poll()
    assert out.getvalue().splitlines() == ["(pretrain rank1) first line", "(pretrain rank1) half a line"]


def test_worker_output_captures_prints_warnings_fd_writes_and_the_traceback(tmp_path):
    log = RunLayout(Store(str(tmp_path)), "smoke").phase("pretrain").worker_log(0)
    code = textwrap.dedent(f"""
        import os, sys, warnings
        from orchestrator.pipeline import console
        from orchestrator.storage import Store
        try:
            with console.worker_output(Store({log.url!r})):
                print("from print")
                warnings.warn("a warning")
                os.write(2, b"from fd 2\\n")
                raise ValueError("worker boom")
        except ValueError:
            print("back on stdout")
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == "back on stdout\n" and res.stderr == "", res
    text = Path(log.local_path).read_text()
    for expected in ("from print", "UserWarning: a warning", "from fd 2", "Traceback", "ValueError: worker boom"):
        assert expected in text, text


def test_worker_failure_shows_the_workers_error_and_log_path(tmp_path):
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError
    layout = RunLayout(Store(str(tmp_path)), "smoke")
    wrapped = UserExceptionWithTraceback(FloatingPointError("step 3: non-finite loss"),
                                         traceback_str="Traceback (most recent call last):\n ...\n")
    ray_error = WorkerGroupError("Training failed due to worker errors: <long Ray text>", {1: wrapped})
    try:
        try:
            raise ray_error
        except WorkerGroupError as exc:
            raise RuntimeError("phase 'pretrain' failed") from exc
    except RuntimeError as exc:
        text = console.worker_failure(exc, layout, "pretrain")
    assert text == (f"rank 1: FloatingPointError: step 3: non-finite loss\n"
                    f"  full log: {tmp_path}/smoke/logs/pretrain/rank1.log")
    assert console.worker_failure(ValueError("not a worker"), layout, "pretrain") is None
    bare = WorkerGroupError("Training failed", {0: FloatingPointError("step 1: nan")})  # unwrapped, as 2.60 does
    assert console.worker_failure(bare, layout, "pretrain").startswith("rank 0: FloatingPointError: step 1: nan\n")


def test_ray_logs_link_under_the_run(tmp_path):
    layout = RunLayout(Store(str(tmp_path / "runs")), "smoke")
    session = tmp_path / "session_1"
    (session / "logs").mkdir(parents=True)
    (session / "logs" / "raylet.out").write_text("raylet")
    where = console.link_ray_logs(layout, str(session))
    assert Path(where, "raylet.out").read_text() == "raylet" and where == layout.ray_logs.local_path
    assert console.link_ray_logs(layout, str(session)) == where   # a rerun replaces the link
    assert console.ray_init_kwargs(False, local=False) == {"log_to_driver": False, "logging_level": 30}



def test_local_ray_env_states_token_auth_to_ray_already_imported(monkeypatch):
    from ray._raylet import AuthenticationMode, Config, get_authentication_mode
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    Config.initialize("")                             # not what an earlier test's ray.init left cached
    console.local_ray_env()                           # an explicit mode is kept
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and get_authentication_mode() != AuthenticationMode.TOKEN
    monkeypatch.delenv("RAY_AUTH_MODE")
    console.local_ray_env()
    assert get_authentication_mode() == AuthenticationMode.TOKEN   # ray was imported before: refreshed
    monkeypatch.undo()
    Config.initialize("")


@pytest.mark.ray
@pytest.mark.slow
def test_a_failing_worker_shows_its_own_error_and_log_path(tmp_path, cifar_shards):
    """Rank 0 poisons its first batch (debug hook) and fails on the non-finite loss with no rollback
    budget: the console names the worker's FloatingPointError and its log, not Ray's wrapper."""
    sets = ["model.arch=vit_pico", "optim.batch_size=16", "optim.min_lr=1e-6", "optim.warmup_iters=0",
            "optim.teacher_temp_warmup_iters=0", "optim.freeze_last_layer_iters=0", "phases.pretrain.steps=3",
            "debug.nan_steps=[0]", "failure.nonfinite_max_consecutive=1", "failure.max_rollbacks=0",
            "failure.max_failures=0", f"storage={tmp_path}", f"data.train={cifar_shards['train']}",
            f"data.eval_train={cifar_shards['train']}", f"data.eval_test={cifar_shards['test']}"]
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "jobs/smoke_cpu.yaml",
                          *[a for s in sets for a in ("--set", s)]], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    out = res.stdout + res.stderr
    log = tmp_path / "smoke" / "logs" / "pretrain" / "rank0.log"
    assert res.returncode != 0, out
    assert "rank 0: FloatingPointError: step 1: 1 consecutive non-finite steps" in out, out
    assert f"full log: {log}" in out and "Traceback" not in out, out
    text = log.read_text()
    assert "Traceback" in text and "FloatingPointError: step 1" in text, text
