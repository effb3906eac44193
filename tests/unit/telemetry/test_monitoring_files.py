"""The PrometheusRule and the Grafana dashboard against the real metrics registry: every series
they query is one `Metrics` exports, with labels it has; each in-process alert rule has its
PrometheusRule twin with the same default threshold; the new rule's promtool unit test passes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from sidecar.clock import FakeClock
from sidecar.policy.schema import AlertsPolicy
from sidecar.strategies.breaker import BreakerConfig, CircuitBreaker
from sidecar.telemetry.metrics import Metrics

REPO = Path(__file__).resolve().parents[3]
RULE = REPO / "deploy" / "k8s" / "monitoring" / "prometheusrule.yaml"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "deploy" / "k8s" / "monitoring" / "dashboards" / "ai-resilience-sidecar.json"
PROMTOOL_TEST = Path(__file__).resolve().parent / "promtool" / "failure_ratio_test.yml"
#: Labels Prometheus adds (scrape target, Kubernetes discovery) and histogram buckets.
TARGET_LABELS = {"namespace", "pod", "instance", "job", "le"}
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gauge": ("",),
}
#: In-process rule → its PrometheusRule twin.
TWINS = {
    "breaker_opened": "SidecarCircuitOpen",
    "failure_ratio": "SidecarFailureRatioHigh",
    "escalation_spike": "SidecarEscalationSpike",
    "review_backlog": "SidecarReviewBacklogStale",
}


def exported() -> dict[str, set[str]]:
    """Series name → label names, from a fresh `Metrics` (one breaker to show its gauge)."""
    metrics = Metrics()
    clock = FakeClock()
    breaker = CircuitBreaker("model", BreakerConfig(), clock)
    metrics.watch(breakers=lambda: [breaker], in_flight=lambda: 0, wall=clock.wall)
    out: dict[str, set[str]] = {}
    for attr in vars(metrics).values():
        if isinstance(attr, MetricWrapperBase):
            (family,) = attr.describe()
            for suffix in SUFFIXES[family.type]:
                out[family.name + suffix] = set(attr._labelnames)
    for family in metrics.registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, set(sample.labels))
    return out


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULE.read_text())["spec"]["groups"]
    return [r for g in groups for r in g["rules"]]


def exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panel_exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return [r["expr"] for r in rules()] + panel_exprs


def test_every_queried_series_is_exported_with_its_labels() -> None:
    series = exported()
    for expr in exprs():
        for name in re.findall(r"\b(sidecar_[a-z_]+)\b", expr):
            assert name in series, f"{name} is not exported (in {expr})"
        for name, selector in re.findall(r"(sidecar_[a-z_]+)\{([^}]*)\}", expr):
            for label in re.findall(r"([a-z_]+)\s*[=!~]+", selector):
                assert label in series[name] | TARGET_LABELS, f"{name} has no label {label}"
        for labels in re.findall(r"\bby \(([^)]*)\)", expr):
            for label in (x.strip() for x in labels.split(",")):
                assert any(label in ls for ls in series.values()) or label in TARGET_LABELS


def test_each_in_process_rule_has_its_prometheus_twin_with_the_same_threshold() -> None:
    by_name = {r["alert"]: r for r in rules()}
    for rule, alert in TWINS.items():
        assert alert in by_name, f"{rule} has no PrometheusRule twin {alert}"
    defaults = AlertsPolicy().rules
    ratio = by_name["SidecarFailureRatioHigh"]["expr"]
    assert f") > {defaults.failure_ratio.threshold}" in ratio
    assert f"[{int(defaults.failure_ratio.window // 60)}m]" in ratio
    backlog = by_name["SidecarReviewBacklogStale"]["expr"]
    assert backlog.rstrip().endswith(f"> {int(defaults.review_backlog.older_than)}")
    spike = by_name["SidecarEscalationSpike"]["expr"]
    assert f"{int(defaults.escalation_spike.factor)} * sum" in spike
    assert f"[{int(defaults.escalation_spike.baseline // 3600)}h]" in spike
    assert f"[{int(defaults.escalation_spike.window // 60)}m]" in spike
    assert "sidecar_breaker_state" in by_name["SidecarCircuitOpen"]["expr"]


def test_the_failure_ratio_rule_fires_as_the_in_process_one_would() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    proc = subprocess.run(
        [promtool, "test", "rules", str(PROMTOOL_TEST)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
