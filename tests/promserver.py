"""A real Prometheus server for tests (Debian's `prometheus`, installed by `make prometheus`).

Starts on 127.0.0.1 with a free port, a temporary TSDB and the project's local scrape config
(infra/prometheus/prometheus.yml, alert rules included) pointed at the test's metrics endpoint.
Used by the `prometheus_server` fixture in tests/conftest.py.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LOCAL_CONFIG = REPO / "infra" / "prometheus" / "prometheus.yml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_config(targets: list[str], interval: str = "1s") -> dict:
    """The project's local scrape config with the test's targets, a short interval, absolute rule paths."""
    cfg = yaml.safe_load(LOCAL_CONFIG.read_text())
    cfg["global"].update(scrape_interval=interval, evaluation_interval=interval)
    cfg["rule_files"] = [str(LOCAL_CONFIG.parent / f) for f in cfg.get("rule_files", [])]
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "dinoray"]
    job["static_configs"] = [{"targets": list(targets)}]
    return cfg


class PrometheusServer:
    def __init__(self, targets: list[str], workdir: Path, interval: str = "1s"):
        self.workdir = Path(workdir)
        self.targets = list(targets)
        self.interval = interval
        self.port = None
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "PrometheusServer":
        exe = shutil.which("prometheus")
        if exe is None:
            raise RuntimeError("prometheus not found: run `make prometheus` "
                               "(apt-get install -y --no-install-recommends prometheus)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "prometheus.yml"
        conf.write_text(yaml.safe_dump(local_config(self.targets, self.interval)))
        self.port = free_port()
        log = open(self.workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [exe, f"--config.file={conf}", f"--web.listen-address=127.0.0.1:{self.port}",
             f"--storage.tsdb.path={self.workdir / 'tsdb'}", "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: "
                                   f"{(self.workdir / 'prometheus.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus not ready on {self.url} after {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(self, path: str, **params) -> dict:
        """GET /api/v1/<path>; returns `data`, raises on a non-success status."""
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{q}", timeout=10) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]

    def wait_for(self, expr: str, pred, timeout: float = 60.0, poll: float = 1.0) -> list:
        """Poll an instant query until pred(result) is true; return that result."""
        deadline = time.time() + timeout
        result = []
        while time.time() < deadline:
            result = self.query(expr)
            if pred(result):
                return result
            time.sleep(poll)
        raise AssertionError(f"{expr!r} did not satisfy the condition within {timeout}s; last result {result}")
