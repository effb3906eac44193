"""What a running `sidecar run` has imported: optional libraries load only for the policy sections
and settings that use them, so an idle proxy does not carry them (issue 12: idle RSS).

A real `python -m sidecar run` process (through the CLI, as deployed) is asked for its
`sys.modules` on SIGUSR1 once it logs `listening`; the assertions are on module presence, never on
megabytes.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from scripts.bench_policies import CONFIDENCE
from tests.conftest import REPO, write_policy
from tests.support.processes import start_process

pytestmark = pytest.mark.timeout(60)

#: `python -m sidecar ...` that prints its loaded modules as one JSON log line on SIGUSR1.
_PROBE = """
import json, runpy, signal, sys

def dump(signum, frame):
    print(json.dumps({"event": "loaded_modules", "modules": sorted(sys.modules)}), flush=True)

signal.signal(signal.SIGUSR1, dump)
sys.argv = ["sidecar", *sys.argv[1:]]
runpy.run_module("sidecar", run_name="__main__", alter_sys=True)
"""

#: Loaded only by the feature that needs it: PostgreSQL stores (`SIDECAR_DATABASE_URL`), JSON
#: Schema validation, CEL rules and JSONPath extraction, OTLP export, charts, the status screen.
LAZY = (
    "psycopg",
    "psycopg_pool",
    "sidecar.review.postgres",
    "sidecar.failures.postgres",
    "jsonschema",
    "celpy",
    "jsonpath_ng",
    "opentelemetry.exporter.otlp.proto.http",
    "requests",
    "google.protobuf",
    "matplotlib",
    "jinja2",
    "sidecar.status_screen",
)

PASSTHROUGH: dict[str, Any] = {
    "upstreams": {"model": {"url": "http://127.0.0.1:9", "breaker": {"enabled": False}}},
    "routes": [{"name": "all", "upstream": "model", "retry": {"max_attempts": 1}}],
}

#: The benchmark's "all features" route: breaker, retries under a budget, body validation
#: without a schema, a bulkhead and logprob confidence (no CEL, no JSONPath).
ALL_FEATURES: dict[str, Any] = {
    "upstreams": {
        "model": {
            "url": "http://127.0.0.1:9",
            "breaker": {"consecutive_failures": 5, "open_for": "5s"},
            "concurrency": {"max_in_flight": 100, "queue": 8, "queue_timeout": "100ms"},
        }
    },
    "routes": [
        {
            "name": "all",
            "upstream": "model",
            "retry": {"max_attempts": 3},
            "retry_budget": {"ratio": 0.2, "min_per_second": 10, "ttl": "10s"},
            "validate": {"json_body": True, "reject_empty": True, "reject_non_finite": True},
            "confidence": dict(CONFIDENCE),
        }
    ],
}


def loaded_modules(policy: Path, state_dir: Path) -> set[str]:
    env = {
        "SIDECAR_STATE_DIR": str(state_dir),
        # Whatever the test machine has set: no shared database, no trace export.
        "SIDECAR_DATABASE_URL": "",
        "OTEL_TRACES_EXPORTER": "none",
    }
    args = [sys.executable, "-c", _PROBE, "run", "--policy", str(policy)]
    rp = start_process([*args, "--port", "0", "--admin-port", "0"], env=env, cwd=str(REPO))
    try:
        rp.proc.send_signal(signal.SIGUSR1)
        record = rp.wait_for_log(lambda rec: rec.get("event") == "loaded_modules")
    finally:
        rp.stop()
    return set(record["modules"])


def _present(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return [n for n in names if any(m == n or m.startswith(n + ".") for m in modules)]


@pytest.mark.parametrize("policy", [PASSTHROUGH, ALL_FEATURES], ids=["passthrough", "all"])
def test_running_sidecar_leaves_optional_libraries_unloaded(
    policy: dict[str, Any], tmp_path: Path
) -> None:
    modules = loaded_modules(write_policy(tmp_path, policy), tmp_path / "state")
    assert "sidecar.server.proxy" in modules  # the probe saw the serving process
    assert _present(modules, LAZY) == []


def test_a_json_schema_route_loads_jsonschema(tmp_path: Path) -> None:
    """The guard above is not vacuous: the feature that needs a library still loads it."""
    (tmp_path / "answer.json").write_text('{"type": "object"}')
    policy = dict(PASSTHROUGH)
    policy["routes"] = [{**PASSTHROUGH["routes"][0], "validate": {"json_schema": "answer.json"}}]
    modules = loaded_modules(write_policy(tmp_path, policy), tmp_path / "state")
    assert _present(modules, ("jsonschema",)) == ["jsonschema"]
    assert _present(modules, ("psycopg",)) == []
