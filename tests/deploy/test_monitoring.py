"""Alert rules and the Grafana dashboard: the PrometheusRule and compose's rule file say the same,
they use only metrics the sidecar exports, the PromQL parses (promtool, when installed) and the
alerts fire when they should (promtool unit tests)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.kube import K8S, REPO

RULE = K8S / "monitoring" / "prometheusrule.yaml"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = K8S / "monitoring" / "dashboards" / "ai-resilience-sidecar.json"
PROMTOOL_TESTS = Path(__file__).resolve().parent / "promtool" / "alerts_test.yml"

#: The sidecar's metrics that the rules and the dashboard use, with their labels
#: (sidecar/telemetry/metrics.py; tests/deploy/test_manifest_run.py checks a running sidecar
#: exports every one of them).
METRICS = {
    "sidecar_requests_total": {"route", "outcome"},
    "sidecar_failures_total": {"route", "mode"},
    "sidecar_fallbacks_total": {"route", "kind"},
    "sidecar_retries_total": {"route", "reason"},
    "sidecar_retry_budget_refusals_total": {"route"},
    "sidecar_breaker_state": {"upstream"},
    "sidecar_breaker_transitions_total": {"upstream", "to"},
    "sidecar_breaker_recovery_seconds": {"upstream"},
    "sidecar_route_recovery_seconds": {"route"},
    "sidecar_reviews_pending": set(),
    "sidecar_review_oldest_pending_seconds": set(),
    "sidecar_escalations_total": {"route"},
    "sidecar_request_duration_seconds": {"route", "outcome"},
}
#: Labels Prometheus adds to every series (scrape target, Kubernetes discovery).
TARGET_LABELS = {"namespace", "pod", "instance", "job", "le"}
GRAFANA_MACROS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$namespace": ".*",
    "$route": ".*",
}


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULE.read_text())["spec"]["groups"]
    return groups


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(sidecar_[a-z_]+)\b", expr))
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}


def test_compose_alerts_are_the_prometheus_rule_groups() -> None:
    compose_groups = yaml.safe_load(ALERTS.read_text())["groups"]
    assert compose_groups == rule_groups(), (
        "deploy/prometheus/alerts.yml differs from spec.groups of "
        "deploy/k8s/monitoring/prometheusrule.yaml: edit both the same way"
    )


def test_every_alert_is_labelled_and_explained() -> None:
    names = []
    for group in rule_groups():
        for rule in group["rules"]:
            names.append(rule["alert"])
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert len(names) == len(set(names))
    expected = {"SidecarCircuitOpen", "SidecarHighErrorRatio", "SidecarEscalationSpike"}
    assert expected | {"SidecarReviewBacklogStale"} <= set(names)


def test_rules_and_dashboard_use_only_the_sidecars_metrics_and_labels() -> None:
    exprs = [r["expr"] for g in rule_groups() for r in g["rules"]] + dashboard_exprs()
    used: set[str] = set()
    for expr in exprs:
        used |= metric_names(expr)
        assert metric_names(expr) <= set(METRICS), f"unknown metric in {expr}"
        for metric, labels in re.findall(r"(sidecar_[a-z_]+)\{([^}]*)\}", expr):
            base = re.sub(r"_(bucket|count|sum)$", "", metric)
            for label in re.findall(r"([a-z_]+)\s*[=!~]+", labels):
                assert label in METRICS[base] | TARGET_LABELS, f"{metric} has no label {label}"
    assert used == set(METRICS), f"metrics never used: {set(METRICS) - used}"


def test_the_dashboard_is_well_formed() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], int] = {}
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = panel["id"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))


def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        if os.environ.get("CI"):
            pytest.fail(
                "promtool is missing in CI: `make test` installs the Debian package prometheus"
            )
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    return path


def run_promtool(*args: str) -> None:
    proc = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_accepts_the_rules() -> None:
    run_promtool("check", "rules", str(ALERTS))


def test_promtool_unit_tests_fire_the_alerts_when_they_should() -> None:
    run_promtool("test", "rules", str(PROMTOOL_TESTS))


def test_promtool_accepts_the_compose_prometheus_config(tmp_path: Path) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["rule_files"] = [str(ALERTS)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    run_promtool("check", "config", str(path))


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for macro, value in sorted(GRAFANA_MACROS.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(macro, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool("check", "rules", str(path))
