"""infra/kuberay: the RayJob and RayCluster manifests against KubeRay's CRD schemas and the Kubernetes
schemas, the fields that matter, and what makes them survive spot nodes (autoscaler v2, the elastic
range, the preStop drain hook parsed by the real `ray drain-node` CLI, grace periods, GPU placement).

    .venv/bin/python -m pytest tests/test_kuberay.py -q
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from orchestrator import metrics

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
K8S_VERSION = "1.32"


def _yaml(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d]


def _project_version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


def _pin(pkg: str) -> str:
    """The == pin of a dependency in pyproject.toml (tomllib needs Python 3.11; the project allows 3.10)."""
    return re.search(rf'"{re.escape(pkg)}(?:\[[^\]]*\])?==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)


def _cluster_specs():
    (job,) = _yaml("kuberay/rayjob-vitg14.yaml")
    (cluster,) = _yaml("kuberay/raycluster-interactive.yaml")
    return job, cluster, [job["spec"]["rayClusterSpec"], cluster["spec"]]


def test_kuberay_manifests_match_the_crd_schemas():
    from jsonschema import Draft7Validator

    job, cluster, _ = _cluster_specs()
    for doc, schema in ((job, "rayjob_v1"), (cluster, "raycluster_v1")):
        validator = Draft7Validator(json.loads((SCHEMAS / f"{schema}.schema.json").read_text()))
        errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, errors
    # the schema catches a wrong type, so the check above could fail
    bad = json.loads(json.dumps(job))
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = "32"
    assert list(Draft7Validator(json.loads((SCHEMAS / "rayjob_v1.schema.json").read_text())).iter_errors(bad))


def test_core_objects_match_the_kubernetes_schemas():
    import kubernetes_validate as kv

    (secret,) = _yaml("kuberay/s3-secret.example.yaml")
    kv.validate(secret, K8S_VERSION, strict=True)
    _, _, specs = _cluster_specs()
    for spec in specs:
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                         "template": group["template"]}, K8S_VERSION, strict=True)
    with pytest.raises(kv.ValidationError):
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                     "template": {"spec": {"containers": [{"name": "x", "imagee": "y"}]}}}, K8S_VERSION, strict=True)


def test_kuberay_fields_that_matter():
    job, cluster, specs = _cluster_specs()
    version = _project_version()
    (secret,) = _yaml("kuberay/s3-secret.example.yaml")
    secret_keys = set(secret["stringData"])
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secret_keys
    assert all(v in ("REPLACE_ME", "", "us-east-1") for v in secret["stringData"].values())  # no real creds

    # RayJob: entrypoint, lifecycle
    entry = job["spec"]["entrypoint"]
    assert "dinoray run jobs/vitg14_pipeline.yaml" in entry and (REPO / "jobs/vitg14_pipeline.yaml").exists()
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    job_spec = yaml.safe_load((REPO / "jobs/vitg14_pipeline.yaml").read_text())

    for spec in specs:
        assert spec["rayVersion"] == _pin("ray")
        head, workers = spec["headGroupSpec"], spec["workerGroupSpecs"]
        hc = head["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in hc["resources"].get("limits", {})  # CPU head
        for group in [head, *workers]:
            pod = group["template"]["spec"]
            (c,) = pod["containers"]
            assert c["image"] == f"registry.example.com/dinoray:{version}"
            assert {"name": "metrics", "containerPort": metrics.DEFAULT_METRICS_PORT} in c["ports"]
            assert group["rayStartParams"]["metrics-export-port"] == str(metrics.DEFAULT_METRICS_PORT)
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["resources"]["requests"] and c["resources"]["limits"]
            refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(refs)
            assert all(r["name"] == secret["metadata"]["name"] and r["key"] in secret_keys for r in refs.values())
            assert not [e for e in c["env"] if "AWS_SECRET" in e["name"] and "value" in e]
            shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            (vol,) = [v for v in pod["volumes"] if v["name"] == shm[0]["name"]]
            assert vol["emptyDir"]["medium"] == "Memory"
            assert pod["terminationGracePeriodSeconds"] >= 60
        for w in workers:
            c = w["template"]["spec"]["containers"][0]
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == "8"
            assert w["rayStartParams"]["num-gpus"] == "8"
            assert w["minReplicas"] <= w["replicas"] <= w["maxReplicas"]
            assert w["template"]["spec"]["terminationGracePeriodSeconds"] >= 300  # the drain deadline + Ray's stop
    # the RayJob's GPUs equal the job spec's training world size
    (w,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    lo, hi = _elastic_range(job_spec["num_workers"])
    if lo == hi:
        assert w["replicas"] * 8 == job_spec["num_workers"]


# --------------------------------------------------------------------------- spot nodes, scale-out
def _elastic_range(num_workers) -> tuple[int, int]:
    """A job spec's num_workers: an int (fixed) or [min, max] (elastic)."""
    return (num_workers, num_workers) if isinstance(num_workers, int) else tuple(num_workers)


def _workers(spec: dict):
    for group in spec["workerGroupSpecs"]:
        yield group, group["template"]["spec"], group["template"]["spec"]["containers"][0]


def test_worker_groups_follow_the_elastic_range_with_autoscaler_v2():
    job, _, specs = _cluster_specs()
    lo, hi = _elastic_range(yaml.safe_load((REPO / "jobs/vitg14_pipeline.yaml").read_text())["num_workers"])
    (w,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = int(w["rayStartParams"]["num-gpus"])
    assert (w["minReplicas"] * gpus, w["maxReplicas"] * gpus) == (lo, hi)
    assert w["replicas"] == w["maxReplicas"]  # start at full size (and Kueue admits at replicas)
    assert job["spec"]["backoffLimit"] > 0  # a retry re-runs `dinoray run`, which resumes
    for spec in specs:
        assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    # the optional Kueue label is there, commented out, with its explanation
    text = (INFRA / "kuberay/rayjob-vitg14.yaml").read_text()
    assert re.search(r"^\s*# kueue\.x-k8s\.io/queue-name: \S+", text, re.M) and "gang scheduling" in text.lower()
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]


def test_gpu_placement_object_store_and_nccl():
    _, _, specs = _cluster_specs()
    for spec in specs:
        groups = [(spec["headGroupSpec"], spec["headGroupSpec"]["template"]["spec"])]
        groups += [(g, pod) for g, pod, _ in _workers(spec)]
        for group, pod in groups:
            store = int(group["rayStartParams"]["object-store-memory"])
            (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
            assert 0 < store < _bytes(shm["emptyDir"]["sizeLimit"])  # plasma lives in /dev/shm
        for _, pod, container in _workers(spec):
            assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["NCCL_SOCKET_IFNAME"]
    readme = (INFRA / "README.md").read_text()
    for word in ("NCCL_SOCKET_IFNAME", "FI_PROVIDER=efa", "aws-ofi-nccl", "vpc.amazonaws.com/efa"):
        assert word in readme, word


def _bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", quantity).groups()
    return int(number) * 1024 ** ("Ki Mi Gi Ti".split().index(unit) + 1 if unit else 0)


def _prestop_commands(container: dict) -> list[list[str]]:
    """The preStop hook's shell commands, split into argv lists with the container's env filled in."""
    shell, flag, script = container["lifecycle"]["preStop"]["exec"]["command"]
    assert (shell, flag) == ("/bin/sh", "-c")
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env |= {"FQ_RAY_IP": "dinoray-head-svc.dinoray.svc.cluster.local", "HOSTNAME": "worker-0"}  # set by k8s
    script = re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], script)
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token == ";":
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in commands + [current] if c]


def test_prestop_hook_drains_with_a_deadline_inside_the_grace_period():
    """The hook's `ray drain-node` flags parse with the real CLI (the installed Ray, the image's pin)."""
    from ray.scripts.scripts import drain_node  # the click command `ray drain-node` runs

    ray_cli = REPO / ".venv" / "bin" / "ray"
    ray_cli = str(ray_cli) if ray_cli.exists() else shutil.which("ray")
    help_text = subprocess.run([ray_cli, "drain-node", "--help"], capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0, help_text.stderr
    _, _, specs = _cluster_specs()
    seen = 0
    for spec in specs:
        for _, pod, container in _workers(spec):
            commands = _prestop_commands(container)
            (drain,) = [c for c in commands if "drain-node" in c]
            argv = [a for a in drain if not re.fullmatch(r"\w+=.*", a)]  # drop VAR=value prefixes
            assert argv[:2] == ["ray", "drain-node"], argv
            args = argv[2:]
            for flag in (a.split("=")[0] for a in args if a.startswith("--")):
                assert flag in help_text.stdout, f"`ray drain-node --help` does not list {flag}"
            ctx = drain_node.make_context("drain-node", list(args))  # click parses and type-checks
            assert ctx.params["reason"] == "DRAIN_NODE_REASON_PREEMPTION"
            deadline = ctx.params["deadline_remaining_seconds"]
            assert ctx.params["address"].endswith(":6379") and ctx.params["reason_message"]
            # the pod stays up until the deadline, and the grace period covers it plus Ray's stop
            assert ["sleep", str(deadline)] in commands
            grace = pod["terminationGracePeriodSeconds"]
            assert deadline + 30 <= grace <= deadline + 120, (deadline, grace)
            seen += 1
    assert seen == 2
    import click

    with pytest.raises(click.UsageError):  # the same parse rejects a wrong reason and unknown flags
        drain_node.make_context("drain-node", ["--reason", "DRAIN_NODE_REASON_SPOT", "--reason-message", "x"])
    with pytest.raises(click.UsageError):
        drain_node.make_context("drain-node", ["--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message",
                                               "x", "--deadline-s", "60"])


def _sigterm_claims(text: str) -> list[str]:
    """Sentences that tie SIGTERM to a checkpoint without a negation."""
    text = re.sub(r"\s*\n\s*#?\s*", " ", text)  # comment lines joined into sentences
    return [s for s in re.split(r"(?<=[.:;])\s", text)
            if "SIGTERM" in s and "checkpoint" in s.lower() and not re.search(r"\b(nothing|not|no)\b", s, re.I)]


def test_no_claim_of_a_checkpoint_on_sigterm():
    """Nothing handles SIGTERM: no sentence may promise a checkpoint on it (issue 11)."""
    for path in [INFRA / "README.md", *sorted((INFRA / "kuberay").glob("*.yaml"))]:
        assert not _sigterm_claims(path.read_text()), path.name
    old = "# Preemption: SIGTERM, then this long to write a checkpoint\n# before SIGKILL.\n"  # what was there
    assert _sigterm_claims(old) and not _sigterm_claims("Nothing handles SIGTERM. It resumes from a checkpoint.")


def test_readme_links_rays_train_dashboards():
    readme = (INFRA / "README.md").read_text()
    assert "train_grafana_dashboard.json" in readme
    assert "https://docs.ray.io/en/latest/cluster/kubernetes/k8s-ecosystem/prometheus-grafana.html" in readme


# Shapes of the Prometheus Operator objects: the fields we use, from the monitoring.coreos.com/v1
# CRDs (prometheus-operator v0.82, openAPIV3Schema), closed with additionalProperties: false so a
# misspelt key fails here (the API server would prune it silently).
