"""infra/: alert rules (promtool), Grafana queries vs exported metrics, PodMonitors and the
PrometheusRule, Dockerfile. The KubeRay manifests: tests/test_kuberay.py.

    .venv/bin/python -m pytest tests/test_infra.py -q
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from orchestrator import metrics
from test_kuberay import _cluster_specs, _pin  # the manifests the PodMonitors select; pyproject pins

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
RULES = INFRA / "prometheus" / "rules" / "dinoray.rules.yml"
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


# --------------------------------------------------------------------------- Prometheus Operator, image
def _yaml(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d]


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
