"""infra/: alert rules (promtool), Grafana queries vs exported metrics, KubeRay manifests, Dockerfile.

    .venv/bin/python -m pytest tests/test_infra.py -q
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
RULES = INFRA / "prometheus" / "rules" / "dinoray.rules.yml"
SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
K8S_VERSION = "1.32"
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
                "and", "or", "unless", "Inf", "NaN", "inf", "nan"}
BUILTIN_SERIES = {"up"}  # written by Prometheus itself


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (strings, matchers, ranges, grouping labels, functions removed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[a-zA-Z_:][\w:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group() in PROMQL_WORDS:
            continue
        names.add(m.group())
    return names


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def _dashboard_exprs() -> list[str]:
    dash = json.loads((INFRA / "grafana" / "dinoray-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", q["query"]))
    return exprs


def test_promql_name_extraction():
    expr = ('histogram_quantile(0.9, sum by (le, phase) (rate(ray_dinoray_step_seconds_bucket{run=~"$run"}'
            '[$__rate_interval]))) + time() - max(x_total offset 5m) or abs(up) == +Inf')
    assert promql_metric_names(expr) == {"ray_dinoray_step_seconds_bucket", "x_total", "up"}


def test_dashboard_and_alert_queries_use_exported_metrics():
    exported = metrics.exported_names()
    exprs = _dashboard_exprs() + [r["expr"] for r in _rules()]
    assert len(exprs) > 20
    used = set()
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - exported - BUILTIN_SERIES
        assert not unknown, f"{expr!r} reads {unknown}, which orchestrator/metrics.py does not export"
        used |= names
    # the dashboard covers the panels
    dash = json.loads((INFRA / "grafana" / "dinoray-dashboard.json").read_text())
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for word in ("loss", "learning rate", "weight decay", "momentum", "temperature", "images/s", "mfu",
                 "data wait", "step time quantiles", "checkpoint age", "k-nn", "phase timeline"):
        assert word in titles, word
    assert {"ray_dinoray_loss", "ray_dinoray_knn_accuracy", "ray_dinoray_phase_state",
            "ray_dinoray_step_seconds_bucket"} <= used
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_every_alert_has_a_promtool_unit_test():
    alerts = {r["alert"] for r in _rules()}
    assert alerts == {"DinorayTrainingStalled", "DinorayNonFiniteLoss", "DinorayDataStarvation",
                      "DinorayCheckpointTooOld", "DinorayRunFailed", "DinorayTargetDown"}
    tested = {}
    for f in sorted((INFRA / "prometheus" / "tests").glob("*.yml")):
        for t in yaml.safe_load(f.read_text())["tests"]:
            for a in t["alert_rule_test"]:
                tested.setdefault(a["alertname"], []).append(bool(a["exp_alerts"]))
    for alert in alerts:  # each one is seen firing and seen quiet
        assert set(tested.get(alert, [])) == {True, False}, alert


@pytest.mark.prometheus
def test_promtool_check_and_unit_tests():
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: run `make prometheus`"
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    conf = subprocess.run([promtool, "check", "config", str(INFRA / "prometheus" / "prometheus.yml")],
                          capture_output=True, text=True)
    assert conf.returncode == 0, conf.stdout + conf.stderr
    tests = sorted(str(p) for p in (INFRA / "prometheus" / "tests").glob("*.yml"))
    run = subprocess.run([promtool, "test", "rules", *tests], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("SUCCESS") == len(tests) == 6


@pytest.mark.prometheus
def test_dashboard_queries_parse_with_promtool(tmp_path):
    """Every dashboard query is valid PromQL (promtool parses each one as a recording rule)."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: run `make prometheus`"
    dash = json.loads((INFRA / "grafana" / "dinoray-dashboard.json").read_text())
    rules = [{"record": f"dashboard:panel{p['id']}:{t['refId']}",
              "expr": t["expr"].replace("$run", "r").replace("$__rate_interval", "1m")}
             for p in dash["panels"] for t in p["targets"]]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in check.stdout, check.stdout + check.stderr
    rules[0]["expr"] = "max by (phase (ray_dinoray_step)"  # and it would catch a broken one
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert subprocess.run([promtool, "check", "rules", str(path)], capture_output=True).returncode != 0


def test_local_scrape_config_targets_the_documented_port():
    cfg = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"127.0.0.1:{metrics.DEFAULT_METRICS_PORT}"]
    assert metrics.local_scrape_url(metrics.DEFAULT_METRICS_PORT).endswith(
        f"{job['static_configs'][0]['targets'][0]}{job['metrics_path']}")


# --------------------------------------------------------------------------- KubeRay
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


def test_podmonitors_select_the_kuberay_pods():
    monitors = _yaml("prometheus/podmonitors.yaml")
    assert {m["kind"] for m in monitors} == {"PodMonitor"}
    _, _, specs = _cluster_specs()
    for node_type, key in (("head", "headGroupSpec"), ("worker", "workerGroupSpecs")):
        (mon,) = [m for m in monitors if m["spec"]["selector"]["matchLabels"].get("ray.io/node-type") == node_type]
        assert "dinoray" in mon["metadata"]["name"]  # job "<ns>/<name>" matches DinorayTargetDown
        wanted = {k: v for k, v in mon["spec"]["selector"]["matchLabels"].items() if not k.startswith("ray.io/")}
        for spec in specs:
            groups = spec[key] if isinstance(spec[key], list) else [spec[key]]
            for g in groups:
                labels = g["template"]["metadata"]["labels"]
                assert wanted.items() <= labels.items()
                ports = {p["name"] for p in g["template"]["spec"]["containers"][0]["ports"]}
                assert {e["port"] for e in mon["spec"]["podMetricsEndpoints"]} <= ports


def test_dockerfile_pins_and_user():
    text = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert base.startswith(f"pytorch/pytorch:{_pin('torch')}-cuda"), base
    assert "runtime" in base or "devel" in base
    assert re.search(r"^RUN pip install \.", text, re.M)
    assert f"ray.__version__ == '{_pin('ray')}'" in text and f"== '{_pin('torch')}'" in text
    for d in ("model", "orchestrator", "jobs"):
        assert re.search(rf"^COPY {d} \./{d}$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "WORKDIR /app" in text  # the RayJob entrypoint does `cd /app`


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
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                          r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {"type": "object", "required": ["name", "namespace"],
         "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _STR_MAP}}
_RULE = {"type": "object", "required": ["expr"], "additionalProperties": False,
         "properties": {"alert": {"type": "string"}, "record": {"type": "string"},
                        "expr": {"type": ["string", "integer"]}, "for": _DURATION, "keep_firing_for": _DURATION,
                        "labels": _STR_MAP, "annotations": _STR_MAP}}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"}, "metadata": _META,
        "spec": {"type": "object", "required": ["groups"], "additionalProperties": False, "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                "properties": {"name": {"type": "string", "minLength": 1}, "interval": _DURATION,
                               "rules": {"type": "array", "items": _RULE}}}}}}}}
_RELABEL = {"type": "object", "additionalProperties": False, "properties": {
    "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "targetLabel": {"type": "string"}, "regex": {"type": "string"}, "replacement": {"type": "string"},
    "separator": {"type": "string"}, "action": {"type": "string"}}}
PODMONITOR_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"}, "metadata": _META,
        "spec": {"type": "object", "required": ["selector"], "additionalProperties": False, "properties": {
            "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
            "selector": {"type": "object", "additionalProperties": False,
                         "properties": {"matchLabels": _STR_MAP, "matchExpressions": {"type": "array"}}},
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "properties": {
                    "port": {"type": "string"}, "path": {"type": "string"}, "interval": _DURATION,
                    "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"},
                    "relabelings": {"type": "array", "items": _RELABEL},
                    "metricRelabelings": {"type": "array", "items": _RELABEL}}}}}}}}


def test_prometheus_operator_objects_validate_and_match_the_rules_file():
    from jsonschema import Draft7Validator

    def errors(schema, doc):
        return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in Draft7Validator(schema).iter_errors(doc)]

    for mon in _yaml("prometheus/podmonitors.yaml"):
        assert not errors(PODMONITOR_SCHEMA, mon)
    (rule,) = _yaml("prometheus/prometheusrule.yaml")
    assert not errors(PROMETHEUS_RULE_SCHEMA, rule)
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]  # one set of rules, two wrappers
    assert rule["metadata"]["labels"].items() >= {"release": "prometheus"}.items()
    # the shapes catch a misspelt key and a bad duration
    bad = json.loads(json.dumps(rule))
    bad["spec"]["groups"][0]["rules"][0]["for"] = "15 minutes"
    bad["spec"]["groups"][0]["rules"][1]["annotation"] = {}
    assert len(errors(PROMETHEUS_RULE_SCHEMA, bad)) == 2
    (mon, _) = _yaml("prometheus/podmonitors.yaml")
    mon["spec"]["podMetricsEndpoints"][0]["targetPort"] = 8080
    assert errors(PODMONITOR_SCHEMA, mon)
