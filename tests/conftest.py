"""Shared pytest fixtures (keep each one small)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR_TEST_TAR = SHARED / "data" / "cifar10" / "test.tar"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS `weed mini`) on 127.0.0.1 with test credentials set in the env.

    Yields dict(endpoint_url, key, secret, bucket); restores the environment and stops it afterwards.
    """
    from s3server import S3Server

    srv = S3Server(tmp_path_factory.mktemp("weed")).start()
    saved = {k: os.environ.get(k) for k in srv.env()}
    os.environ.update(srv.env())
    try:
        yield {"endpoint_url": srv.endpoint_url, "key": srv.key, "secret": srv.secret, "bucket": srv.bucket}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        srv.stop()


@pytest.fixture
def prometheus_server(tmp_path):
    """Factory: prometheus_server(["127.0.0.1:PORT"]) starts a real Prometheus (project config, 1 s scrape)
    on 127.0.0.1 scraping those targets; returns a tests/promserver.PrometheusServer; stopped afterwards."""
    from promserver import PrometheusServer

    servers = []

    def start(targets, interval="1s"):
        servers.append(PrometheusServer(targets, tmp_path / f"prometheus{len(servers)}", interval).start())
        return servers[-1]

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture(scope="session")
def cifar_shards(tmp_path_factory):
    """CIFAR-10 train (50,000) and test (10,000) JPEGs as labelled shards; {split: folder}."""
    from orchestrator.demo import build_cifar_shards

    return build_cifar_shards(tmp_path_factory.mktemp("cifar-shards"), log=lambda *_: None)


SMOKE_STEPS = 100  # the smoke job's pretrain recipe, shortened (180 in jobs/smoke_cpu.yaml)


@pytest.fixture(scope="session")
def smoke_backbone(cifar_shards, tmp_path_factory):
    """A trained vit_pico backbone (teacher) state dict: jobs/smoke_cpu.yaml's pretrain phase for SMOKE_STEPS
    steps, run in this process (no Ray): the same model, loader, AdamW groups and schedules as a worker.
    Costs about 2 minutes on 2 cores; shared by the eval tests (tests/test_eval_*.py)."""
    from orchestrator.pipeline import config
    from orchestrator.training.setup import train_in_process
    job = config.load_job(str(Path(__file__).resolve().parents[1] / "jobs" / "smoke_cpu.yaml"), [
        f"storage={tmp_path_factory.mktemp('smoke-run')}", f"data.train={cifar_shards['train']}",
        f"data.eval_train={cifar_shards['train']}", f"data.eval_test={cifar_shards['test']}",
        f"phases.pretrain.steps={SMOKE_STEPS}"])
    meta = train_in_process(job, config.resolve(job, "pretrain"), SMOKE_STEPS)
    return {k: v.detach().clone().float() for k, v in meta.teacher["backbone"].state_dict().items()}
