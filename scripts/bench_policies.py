"""The sidecar policies the benchmark compares, generated for a given model URL.

- `passthrough`: the sidecar as a plain proxy: breaker off, one attempt, no validation, no
  confidence, no bulkhead, timeouts far away.
- `all_features`: the shipped default policy's protections (breaker, retries under a budget,
  validation) with a 1 s deadline, plus a bulkhead and confidence extraction (OpenAI logprobs,
  `observe` mode so streams are not buffered) when the schema has those sections. Tracing and
  metrics are switched on by the environment (`OTEL_EXPORTER_OTLP_ENDPOINT`), not the policy.
- `naive_retry`: "retry 3 times": four attempts, a budget that never refuses, breaker off.

Optional sections are kept only when `sidecar validate` accepts them, so the harness follows the
schema as features land; `dropped` says what was left out.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEADLINE", "PolicySet", "build_policies"]

#: The all-features route's total deadline (the hang scenario's target is this + 50 ms).
DEADLINE = 1.0
POOL = 2048


def _base(model_url: str, upstream: dict[str, Any], route: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": 1,
        "upstreams": {"model": {"url": model_url, "pool_size": POOL, **upstream}},
        "routes": [{"name": "bench", "match": {"path_prefix": "/"}, "upstream": "model", **route}],
    }


def passthrough(model_url: str) -> dict[str, Any]:
    return _base(
        model_url,
        {"breaker": {"enabled": False}},
        {
            "timeouts": {
                "total": "600s",
                "attempt": "600s",
                "connect": "5s",
                "first_byte": None,
                "stream_idle": None,
            },
            "retry": {"max_attempts": 1},
        },
    )


def _protections() -> dict[str, Any]:
    return {
        "timeouts": {
            "total": f"{DEADLINE:g}s",
            "attempt": f"{DEADLINE:g}s",
            "connect": "200ms",
            "first_byte": f"{DEADLINE:g}s",
            "stream_idle": "30s",
        },
        "retry": {"max_attempts": 3, "backoff": {"base": "25ms", "max": "250ms"}},
        "retry_budget": {"ratio": 0.2, "min_per_second": 10, "ttl": "10s"},
        "validate": {"json_body": True, "reject_empty": True, "reject_non_finite": True},
    }


BREAKER = {
    "consecutive_failures": 5,
    "failure_ratio": 0.5,
    "min_calls": 20,
    "window": "30s",
    # Recovery after a heal waits for the next half-open probe: the cap bounds it (issue 12's
    # "99% success within 5 s after the model heals").
    "open_for": "2s",
    "open_for_max": "4s",
    "half_open_probes": 1,
}

CONFIDENCE = {
    "extract": {"kind": "openai_logprobs", "aggregate": "mean"},
    "auto_above": 0.9,
    "reject_below": 0.5,
    "on_review": "escalate",
    "on_reject": "escalate",
    "stream_mode": "observe",
}


def all_features(
    model_url: str,
    *,
    concurrency: dict[str, Any] | None = None,
    with_confidence: bool = True,
    with_concurrency: bool = True,
) -> dict[str, Any]:
    upstream: dict[str, Any] = {"breaker": dict(BREAKER)}
    if with_concurrency:
        upstream["concurrency"] = concurrency or {
            "max_in_flight": 1100,
            "queue": 64,
            "queue_timeout": "100ms",
        }
    route = _protections()
    if with_confidence:
        route["confidence"] = dict(CONFIDENCE)
    return _base(model_url, upstream, route)


def naive_retry(model_url: str) -> dict[str, Any]:
    route = _protections()
    route["retry"] = {"max_attempts": 4, "backoff": {"base": "25ms", "max": "250ms"}}
    route["retry_budget"] = {"ratio": 10, "min_per_second": 100000, "ttl": "10s"}
    return _base(model_url, {"breaker": {"enabled": False}}, route)


def _validate(path: Path) -> tuple[bool, str]:
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "validate", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.returncode == 0, (out.stdout + out.stderr).strip()


@dataclass
class PolicySet:
    """Policy files written under `directory`, by name."""

    directory: Path
    files: dict[str, Path] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    has_confidence: bool = False
    has_concurrency: bool = False

    def write(self, name: str, policy: dict[str, Any]) -> Path:
        path = self.directory / f"{name}.yaml"
        path.write_text(yaml.safe_dump(policy, sort_keys=False))
        ok, output = _validate(path)
        if not ok:
            raise RuntimeError(f"generated policy {name} is invalid:\n{output}")
        self.files[name] = path
        return path

    def overload(self, model_url: str, concurrency: dict[str, Any]) -> Path:
        return self.write(
            "overload",
            all_features(
                model_url,
                concurrency=concurrency,
                with_confidence=self.has_confidence,
                with_concurrency=self.has_concurrency,
            ),
        )


def build_policies(directory: Path, model_url: str) -> PolicySet:
    """Write and validate every policy; optional sections the schema rejects are dropped."""
    schema = json.loads(
        subprocess.run(
            [sys.executable, "-m", "sidecar", "schema"], capture_output=True, text=True, check=True
        ).stdout
    )
    text = json.dumps(schema)
    policies = PolicySet(directory)
    policies.has_confidence = '"confidence"' in text
    policies.has_concurrency = '"concurrency"' in text
    for flag, name in (
        (policies.has_confidence, "confidence"),
        (policies.has_concurrency, "concurrency"),
    ):
        if not flag:
            policies.dropped.append(f"{name} (not in the policy schema)")
    policies.write("passthrough", passthrough(model_url))
    try:
        policies.write(
            "all",
            all_features(
                model_url,
                with_confidence=policies.has_confidence,
                with_concurrency=policies.has_concurrency,
            ),
        )
    except RuntimeError as exc:
        if not policies.has_confidence:
            raise
        policies.has_confidence = False
        policies.dropped.append(f"confidence (sidecar validate rejected it: {exc})")
        policies.write(
            "all",
            all_features(
                model_url, with_confidence=False, with_concurrency=policies.has_concurrency
            ),
        )
    policies.write("naive", naive_retry(model_url))
    return policies
