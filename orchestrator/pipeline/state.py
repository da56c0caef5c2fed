"""A run's pipeline state (`pipeline.json`) and the lock that lets one driver at a time run it.

pipeline.json holds, per phase: state (pending/running/done/failed), step, steps, checkpoint, metrics,
timestamps and the config hash that finished it. The lock is an owner-id file in storage with a
heartbeat; a dead owner's lock is taken over (same host: its pid is gone; another host: its
heartbeat is older than the lease).

No entrypoint; used by the controller (`dinoray run`) and `dinoray status`.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid

from orchestrator.layout import RunLayout

LOCK_LEASE_S = 300.0        # a lock whose heartbeat is older than this (another host) is stale
HEARTBEAT_S = 30.0


class PipelineError(RuntimeError):
    """A refusal or failure the user must act on; the message says how."""


def new_phase_entry(phase) -> dict:
    return {"name": phase.name, "kind": phase.kind, "state": "pending", "step": 0, "steps": phase.steps,
            "checkpoint": None, "metrics": {}, "config_hash": None, "started": None, "finished": None,
            "error": None}


def load(layout: RunLayout, job) -> dict:
    """The run's state, created for a new run; phases added to or removed from the job are reconciled."""
    state = layout.pipeline.read_json()
    if state is None:
        state = {"name": job.name, "storage": job.storage, "created": time.time(), "phases": []}
    known = {e["name"]: e for e in state["phases"]}
    state["phases"] = [known.get(p.name) or new_phase_entry(p) for p in job.phases]
    return state


def read(layout: RunLayout) -> dict:
    """The state of a started run (for `dinoray status`)."""
    state = layout.pipeline.read_json()
    if state is None:
        raise PipelineError(f"{layout.pipeline} not found: is RUN_URL '{{storage}}/{{name}}' of a started run?")
    return state


def save(layout: RunLayout, state: dict) -> None:
    layout.pipeline.write_json(state)


class RunLock:
    """An owner-id lock file in storage with a heartbeat; a dead owner's lock is taken over."""

    def __init__(self, layout: RunLayout):
        self.file = layout.lock
        self.owner = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _stale(self, held: dict) -> bool:
        if held.get("host") == self.owner["host"]:
            try:
                os.kill(int(held["pid"]), 0)
                return False
            except (ProcessLookupError, ValueError):
                return True
            except PermissionError:
                return False
        return time.time() - float(held.get("heartbeat", 0)) > LOCK_LEASE_S

    def acquire(self) -> None:
        held = self.file.read_json()
        if held and held.get("owner") != self.owner["owner"] and not self._stale(held):
            raise PipelineError(
                f"{self.file}: this run is already being driven by owner {held['owner']} "
                f"(host {held.get('host')}, pid {held.get('pid')}). Wait for it, or stop it; "
                f"if that driver is gone, its lock expires {LOCK_LEASE_S:.0f} s after its last heartbeat.")
        self._beat()
        if (self.file.read_json() or {}).get("owner") != self.owner["owner"]:
            raise PipelineError(f"{self.file}: another driver took the lock at the same moment; retry later")
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self.file.write_json({**self.owner, "heartbeat": time.time()})

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._beat()

    def release(self) -> None:
        self._stop.set()
        held = self.file.read_json()
        if held and held.get("owner") == self.owner["owner"]:
            self.file.rm()
