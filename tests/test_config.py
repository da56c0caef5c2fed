"""Job spec schema: unknown keys, impossible values, overrides, the shipped job files."""
from pathlib import Path

import pytest

from orchestrator.pipeline import config

REPO = Path(__file__).resolve().parents[1]
BASE = {
    "name": "t", "storage": "/tmp/runs", "num_workers": 2,
    "data": {"train": "/tmp/shards", "eval_train": "/tmp/a", "eval_test": "/tmp/b"},
    "model": {"arch": "vit_pico", "patch_size": 4},
    "crops": {"global_size": 32, "local_size": 16},
    "optim": {"batch_size": 64},
    "phases": [{"name": "pretrain", "kind": "pretrain", "steps": 10},
               {"name": "highres", "kind": "highres", "from_phase": "pretrain", "steps": 5,
                "crops": {"global_size": 48}},
               {"name": "eval", "kind": "eval", "from_phase": "highres"}],
}


def load(overrides=(), **changes):
    return config.job_from_dict({**BASE, **changes}, source="job.yaml", overrides=overrides)


@pytest.mark.parametrize("job", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_jobs_validate(job):
    spec = config.load_job(str(job))
    assert spec.phases and all(config.phase_hash(spec, p) for p in spec.phases)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(config.ConfigError) as err:
        load(modle={"arch": "vit_small"})
    assert "job.yaml: modle: unknown key; did you mean 'model'?" in str(err.value)
    with pytest.raises(config.ConfigError, match=r"phases\[1\]\.crops\.global_sise: unknown key; did you mean"):
        load(["phases.highres.crops.global_sise=48"])


@pytest.mark.parametrize("override,message", [
    ("crops.global_size=33", "crops.global_size: 33 is not a multiple of model.patch_size=4; use 32"),
    ("phases.highres.crops.global_size=50", "phases[1].crops.global_size: 50 is not a multiple"),
    ("optim.batch_size=63", "optim.batch_size: 63 images cannot be split evenly over 2 workers (num_workers: 2)"),
    ("num_workers=[2,300]", "optim.batch_size: 64 images cannot be split evenly over 2, 3, 4, 5, 6, 7, ... 300 "
     "(299 counts) workers (num_workers: [2, 300]); use a batch_size that every allowed worker count splits or"),
    ("num_workers=[3,4]", "optim.batch_size: 64 images cannot be split evenly over 3 workers (num_workers: [3, 4]);"
                          " use a batch_size that every allowed worker count splits, e.g. 60"),
    ("num_workers=[2,1]", "num_workers: must be >= 1, or [min, max] with 1 <= min <= max"),
    ("checkpoint.every_steps=aut", "checkpoint.every_steps: expected an integer, got 'aut' or 'aut' is not one of "
                                   "['auto']; did you mean 'auto'?"),
    ("failure.mtbf_hours=0", "failure.mtbf_hours: must be > 0"),
    ("failure.health_check_s=-1", "failure.health_check_s: must be >= 0 seconds"),
    ("phases.highres.from_phase=pretrian", "depends on 'pretrian', which is not a phase of this job; did you mean 'pretrain'?"),
    ("phases.pretrain.from_phase=eval", "depends on 'eval', which comes later"),
    ("storage=''", "storage: missing storage root"),
    ("backend=fsdp", "'fsdp' is not one of ['fsdp2', 'deepspeed', 'ddp']; did you mean 'fsdp2'?"),
    ("optim.base_lr=fast", "optim.base_lr: expected a number, got 'fast'"),
    ("storage_options.secret=abc", "credentials must not be in job files"),
    ("phases.highrs.steps=3", "no phase 'highrs'"),
    ("optim.warmup_iters=10", "optim.warmup_iters: 10 is not shorter than the phase's 10 steps"),
    ("optim.min_lr=0.5", "optim.min_lr: 0.5 is above the phase's peak lr"),
    ("model.feature_loss_weight=1", "model.feature_loss_weight: a pretrain phase has no teacher features"),
])
def test_impossible_values_are_refused_with_their_key(override, message):
    with pytest.raises(config.ConfigError) as err:
        load([override])
    assert message in str(err.value)


def test_elastic_worker_range_keeps_the_global_batch():
    """num_workers [min, max]: at every allowed count the micro-batches of all workers make exactly
    optim.batch_size images, never more per micro-batch than at the maximum count."""
    job = load(["num_workers=[1,4]", "optim.batch_size=48"])
    assert job.workers_range == (1, 4) and job.elastic
    plan = {w: job.accumulation(48, w) for w in range(1, 5)}
    assert plan == {1: 4, 2: 2, 3: 2, 4: 1}
    assert all(48 % (w * a) == 0 and 48 // (w * a) <= 48 // 4 for w, a in plan.items())
    with pytest.raises(config.ConfigError, match="num_workers: an elastic range \\[1, 2\\] needs backend fsdp2 or ddp"):
        load(["num_workers=[1,2]", "backend=deepspeed"])


def test_ray_train_poll_interval_follows_the_largest_worker_count():
    from orchestrator.training.driver import health_check_s
    got = {w: health_check_s(load([f"num_workers={w}", "optim.batch_size=1200"])) for w in (2, 40, 120, 600)}
    assert got == {2: 0.2, 40: 0.4, 120: 1.2, 600: 2.0}           # Ray's own 2 s from 200 workers on
    assert health_check_s(load(["failure.health_check_s=0.5"])) == 0.5


def test_overrides_and_phase_resolution():
    job = load(["optim.base_lr=1e-3", "phases.1.steps=7", "metrics.peak_flops=1.7e12"])
    assert job.optim.base_lr == 1e-3 and job.phase("highres").steps == 7 and job.metrics.peak_flops == 1.7e12
    hr = config.resolve(job, "highres")
    assert hr.crops.global_size == 48 and hr.crops.local_size == 16
    assert config.model_cfg(hr)["img_size"] == 48 and config.model_cfg(hr, arch="vit_tiny")["arch"] == "vit_tiny"


def test_phase_hash_tracks_what_changes_the_result():
    base = load()
    assert config.phase_hash(base, "pretrain") == config.phase_hash(load(["num_workers=1", "optim.batch_size=64"]), "pretrain")
    assert config.phase_hash(base, "pretrain") != config.phase_hash(load(["optim.base_lr=0.1"]), "pretrain")
    # a later phase's change leaves an earlier phase's hash alone
    assert config.phase_hash(base, "pretrain") == config.phase_hash(load(["phases.highres.steps=9"]), "pretrain")


def test_missing_job_file_and_bad_yaml(tmp_path):
    with pytest.raises(config.ConfigError, match="no such job file"):
        config.load_job(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(config.ConfigError, match="bad.yaml: not valid YAML"):
        config.load_job(str(bad))


def test_a_distill_phase_with_no_loss_term_is_refused():
    with pytest.raises(config.ConfigError, match=r"phases\[2\]\.model: dino_loss_weight, ibot_loss_weight and "
                                                 "feature_loss_weight are all 0"):
        config.load_job("jobs/smoke_cpu.yaml", ["phases.distill.model.feature_loss_weight=0"])
