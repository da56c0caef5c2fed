"""What `dinoray run` (and so `make demo` and a `ray job submit` log) prints while a phase trains.

    dinoray run jobs/smoke_cpu.yaml             # one progress line per phase, Ray and workers in {run}/logs/
    dinoray run jobs/smoke_cpu.yaml --verbose   # the same, plus Ray's own output and every worker's log lines

- `PhaseProgress`: while `trainer.fit()` blocks the driver, a thread polls the phase's files
  (orchestrator/pipeline/progress.py) and shows step/steps, images/s, ETA, loss and the last committed
  checkpoint: a tqdm bar updated in place on a terminal, a plain line every `steps / LINES_PER_PHASE`
  steps otherwise (logs, `ray job submit`). With `verbose`, it also prints the workers' new log lines.
- `ray_init_kwargs(verbose, local)`, `local_ray_env()`: Ray's actors and workers do not
  print on the driver (`log_to_driver`), and a local Ray starts without warnings;
  `link_ray_logs(layout, session_dir)` makes a local run's Ray session logs `{run}/logs/ray`.
- `worker_output(log)`: run inside a Ray Train worker, sends its stdout and stderr (prints, Python
  warnings, C++ logs, its traceback) to `{run}/logs/{phase}/rank<r>.log` (on object storage: a local
  file uploaded by the `sync()` it yields and at exit).
- `worker_failure(exc, layout, key)`: the worker's own error and the path of its full log, in place
  of Ray's wrapper traceback.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
import tempfile
import threading
import traceback

from orchestrator.layout import PhaseDir, RunLayout
from orchestrator.pipeline import progress
from orchestrator.storage import Store

LINES_PER_PHASE = 10      # plain (non-terminal) output: one line per tenth of the phase, and the last step
POLL_S = 1.0              # how often the console reads a local run's files
REMOTE_POLL_S = 5.0       # and an object store's (its records go up every metrics.live_every_s there)
AUTH_MODE_ENV = "RAY_AUTH_MODE"   # Ray's switch for token authentication ("token" or "disabled")


def _mark(p: dict) -> tuple:
    return p["step"], p["checkpoint_step"]


def _is_tty(stream) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


class PhaseProgress:
    """`with PhaseProgress(layout.phase(key), steps, label): trainer.fit()` shows the phase's progress."""

    def __init__(self, phase: PhaseDir, steps: int, label: str, *, stream=None, verbose: bool = False,
                 tty: bool | None = None, poll_s: float | None = None, batch_size: int | None = None):
        self.phase, self.steps, self.label, self.verbose = phase, steps, label, verbose
        self.batch_size = batch_size  # the global batch: images/s of the whole job (else rank 0's)
        self.stream = stream if stream is not None else sys.stdout
        self.tty = _is_tty(self.stream) if tty is None else tty
        self.poll_s = poll_s if poll_s is not None else (POLL_S if phase.root.is_local else REMOTE_POLL_S)
        self.every = max(1, math.ceil(steps / LINES_PER_PHASE))
        self.last = None           # the last progress record read
        self._printed = (-1, None)   # (step, checkpoint_step) of the last plain line
        self._offsets: dict[str, int] = {}
        self._bar = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"progress-{label}", daemon=True)

    def __enter__(self) -> "PhaseProgress":
        if self.tty:
            from tqdm import tqdm
            self._bar = tqdm(total=self.steps, desc=f"[{self.label}]", unit="step", file=self.stream,
                             dynamic_ncols=True, bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {postfix}")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        if self._bar is not None:
            self._bar.close()
        elif self.last is not None and self.last["step"] > 0 and _mark(self.last) != self._printed:
            self._line(self.last)  # the last step, or a checkpoint committed after it was printed

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except OSError:  # storage hiccup: the next poll tries again; training is not disturbed
                continue

    def poll(self) -> dict:
        """Read the phase's files once and show what changed."""
        p = progress.key_progress(self.phase, self.steps, batch_size=self.batch_size)
        if self.verbose:
            self._echo_worker_logs()
        self.last = p
        if self._bar is not None:
            self._bar.n = min(p["step"], self.steps)
            self._bar.set_postfix_str(progress.describe(p).split("  ", 1)[-1], refresh=False)
            self._bar.refresh()
        elif p["step"] // self.every > max(self._printed[0], 0) // self.every or (
                p["step"] == self.steps and self._printed[0] != self.steps):
            self._line(p)
        return p

    def _line(self, p: dict) -> None:
        self._printed = _mark(p)
        print(f"[{self.label}] {progress.describe(p)}", file=self.stream, flush=True)

    def _echo_worker_logs(self) -> None:
        logs = self.phase.worker_log(0).parent
        for name in logs.ls():
            log = logs / name
            start = self._offsets.get(name, 0)
            size = log.size()
            if size <= start:
                continue
            text = log.read_bytes(start, size).decode(errors="replace")
            complete = text.rsplit("\n", 1)[0] if "\n" in text else ""
            self._offsets[name] = start + len(complete.encode()) + (1 if complete or "\n" in text else 0)
            for line in complete.splitlines():
                self._write(f"({self.label} {name.removesuffix('.log')}) {line}")

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)


# ------------------------------------------------------------------------------ Ray's own output
def ray_init_kwargs(verbose: bool, local: bool) -> dict:
    """Keyword arguments for the driver's `ray.init`. Ray's actors and workers print on the driver only
    with --verbose (their output stays in Ray's session logs and, for training workers, in
    {run}/logs/), and so do Ray's own INFO lines. A new local cluster gets the dashboard: Ray Train's
    PlacementGroupCleaner polls the State API, which the dashboard serves; without it the cleaner
    logs "Failed to query Ray Train Controller actor state" every few seconds of every phase."""
    kwargs = {"log_to_driver": bool(verbose), "logging_level": logging.INFO if verbose else logging.WARNING}
    if local:  # on a free port: 8265 stays free for a `ray start --head` on the same machine
        kwargs.update(include_dashboard=True, dashboard_port=_free_port())
    return kwargs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_ray_env() -> None:
    """Before a new local cluster starts: Ray's token authentication stays on (Ray 2.60's default for
    local clusters), stated explicitly so that Ray does not warn that it chose it (an explicit
    RAY_AUTH_MODE, e.g. `disabled`, is kept). Ray reads its configuration when it is imported, so the
    cached copy is refreshed, as Ray's own `_enable_token_auth` does; otherwise this process would not
    send the token that the cluster it starts requires."""
    if AUTH_MODE_ENV in os.environ:
        return
    os.environ[AUTH_MODE_ENV] = "token"
    from ray._raylet import Config
    Config.initialize("")


def link_ray_logs(layout: RunLayout, session_dir: str | None) -> str | None:
    """Make `{run}/logs/ray` point at the local Ray session's log folder; returns where Ray's logs are.
    A run on object storage cannot hold a link: the path is returned for the console to print."""
    if not session_dir:
        return None
    ray_logs = os.path.join(session_dir, "logs")
    if not layout.ray_logs.is_local:
        return ray_logs
    link = layout.ray_logs.local_path
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.islink(link):
        os.unlink(link)
    if not os.path.exists(link):
        os.symlink(ray_logs, link)
    return link


# ------------------------------------------------------------------------------ inside a worker
@contextlib.contextmanager
def worker_output(log: Store):
    """Inside a training worker: this process's stdout and stderr (file descriptors 1 and 2, so C++
    and warnings too) go to `log` until exit; an exception's traceback is written there before it
    propagates. Yields `sync()`, which uploads the file when `log` is remote (call it at commits)."""
    local, upload = _local_file(log)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fh = open(local, "a", buffering=1, encoding="utf-8")
    os.dup2(fh.fileno(), 1)
    os.dup2(fh.fileno(), 2)
    sync = (lambda: log.put_file(local)) if upload else (lambda: None)
    try:
        yield sync
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        fh.close()
        sync()


def _local_file(log: Store) -> tuple[str, bool]:
    """(local path to append to, whether it must be uploaded): the file itself when local."""
    if log.is_local:
        os.makedirs(os.path.dirname(log.local_path), exist_ok=True)
        return log.local_path, False
    return os.path.join(tempfile.mkdtemp(prefix="dinoray-log-"), log.name), True


# ------------------------------------------------------------------------------ failures
def _worker_failures(exc: BaseException) -> dict:
    """{rank: exception} of Ray Train's WorkerGroupError anywhere in exc's cause chain, else {}."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            return failures
        exc = exc.__cause__ or exc.__context__
    return {}


def worker_failure(exc: BaseException, layout: RunLayout, key: str) -> str | None:
    """'rank 0: ValueError: boom (full log: {run}/logs/{key}/rank0.log)' per failed worker, or None
    when exc is not a worker's failure. Ray hands back the worker's exception itself, or wrapped in a
    UserExceptionWithTraceback (its `_base_exc`; its str() is the whole traceback)."""
    failures = _worker_failures(exc)
    if not failures:
        return None
    lines = []
    for rank, err in sorted(failures.items()):
        base = getattr(err, "_base_exc", err)  # Ray's wrapper, or the worker's exception itself
        text = f"{type(base).__name__}: {str(base).strip()}"
        lines.append(f"rank {rank}: {text}\n  full log: {layout.phase(key).worker_log(rank)}")
    return "\n".join(lines)
