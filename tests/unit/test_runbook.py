"""docs/runbook.md: a section per `FailureMode` with every part, a Jaeger query that matches what
the spans carry, and only alert names and metric labels that exist. (That every metric it names is
really exported is checked against a running sidecar in tests/integration/test_runbook.py.)"""

from __future__ import annotations

import re

import pytest
import yaml
from prometheus_client import Counter, Histogram

from sidecar.errors import AVAILABILITY_MODES, FailureMode
from sidecar.policy.schema import AlertRulesPolicy
from sidecar.telemetry.metrics import Metrics
from tests.conftest import REPO

RUNBOOK = REPO / "docs" / "runbook.md"
PARTS = ("Means", "The caller got", "Metrics", "Alerts", "Jaeger", "What to do")
#: Modes whose server span has status ERROR (`error=true` in Jaeger).
ERROR_SPANS = AVAILABILITY_MODES | {
    FailureMode.DEADLINE_EXCEEDED,
    FailureMode.CIRCUIT_OPEN,
    FailureMode.OVERLOADED,
}
#: Modes that are the caller's doing or a deliberate answer: never `error=true` by themselves.
QUIET_SPANS = {FailureMode.CLIENT_ERROR, FailureMode.CLIENT_CANCELLED, FailureMode.LOW_CONFIDENCE}


def sections() -> dict[str, str]:
    text = RUNBOOK.read_text(encoding="utf-8")
    found: dict[str, str] = {}
    parts = re.split(r"^### `([a-z0-9_]+)`\s*$", text, flags=re.MULTILINE)
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        assert name not in found, f"two sections for {name}"
        found[name] = re.split(r"^## ", body, flags=re.MULTILINE)[0]
    return found


def part(body: str, name: str) -> str:
    match = re.search(rf"^- \*\*{re.escape(name)}:\*\* (.*?)(?=^- \*\*|\Z)", body, re.M | re.S)
    assert match is not None, f"no '{name}' part"
    return " ".join(match.group(1).split())


def test_every_failure_mode_has_a_section_with_every_part() -> None:
    found = sections()
    assert sorted(found) == sorted(m.value for m in FailureMode)
    for mode, body in found.items():
        for name in PARTS:
            assert len(part(body, name)) > 20, f"{mode}: '{name}' is (nearly) empty"


@pytest.mark.parametrize("mode", list(FailureMode), ids=str)
def test_jaeger_query_matches_the_spans(mode: FailureMode) -> None:
    jaeger = part(sections()[mode.value], "Jaeger")
    if mode == FailureMode.USER_REPORTED:
        # Reported after the fact: found through the original request's ids.
        assert "sidecar.request_id=" in jaeger
        return
    assert f"`sidecar.failure_mode={mode.value}" in jaeger
    if mode in ERROR_SPANS:
        assert f"`sidecar.failure_mode={mode.value} error=true`" in jaeger
    else:
        assert mode in QUIET_SPANS
        assert "not `error=true`" in jaeger


def test_alerts_named_exist() -> None:
    rules = yaml.safe_load((REPO / "deploy/k8s/monitoring/prometheusrule.yaml").read_text())
    prometheus = {r["alert"] for g in rules["spec"]["groups"] for r in g["rules"]}
    in_process = set(AlertRulesPolicy.model_fields)
    text = RUNBOOK.read_text(encoding="utf-8")
    named = set(re.findall(r"\bSidecar[A-Z][A-Za-z]+\b", text))
    assert named, "the runbook names no Prometheus alert"
    assert named <= prometheus, f"not in prometheusrule.yaml: {sorted(named - prometheus)}"
    for mode, body in sections().items():
        alerts = part(body, "Alerts")
        if "in-process" in alerts:
            rules_named = set(re.findall(r"`([a-z_]+)`", alerts.split("in-process", 1)[1]))
            assert rules_named <= in_process, (mode, sorted(rules_named - in_process))


def test_metric_labels_named_exist() -> None:
    metrics = Metrics()
    labels: dict[str, tuple[str, ...]] = {}
    for value in vars(metrics).values():
        if isinstance(value, Counter | Histogram):
            names = tuple(value._labelnames)
            labels[value._name] = names
            labels[value._name + "_total"] = names
    text = RUNBOOK.read_text(encoding="utf-8")
    modes = {m.value for m in FailureMode}
    for name, selector in re.findall(r"\b(sidecar_[a-z0-9_]+)\{([^}]*)\}", text):
        if name not in labels:
            continue  # registered elsewhere (failure capture); the scrape test covers the name
        for label, value in re.findall(r'([a-z_]+)="([^"]*)"', selector):
            assert label in labels[name], f"{name} has no label {label!r}"
            if label in ("mode", "reason") or (label == "result" and value != "ok"):
                assert value in modes, f"{name}{{{label}={value!r}}} is not a failure mode"
