"""The doctor's pure parts: probe paths, policy differences, token rules, exit codes, output."""

from __future__ import annotations

from typing import Any

from sidecar.doctor import (
    CheckResult,
    check_tokens,
    exit_code,
    format_results,
    policy_differences,
    probe_path,
)
from sidecar.policy.loader import parse_policy


def policy(*prefixes: str, fallback: str | None = None) -> Any:
    routes: list[dict[str, Any]] = [
        {"name": f"r{i}", "match": {"path_prefix": p}, "upstream": "main"}
        for i, p in enumerate(prefixes)
    ]
    upstreams = {"main": {"url": "http://127.0.0.1:1"}, "small": {"url": "http://127.0.0.1:2"}}
    if fallback:
        routes[0]["fallback"] = [{"upstream": "small"}, {"static": {"status": 200, "json": {}}}]
    return parse_policy({"upstreams": upstreams, "routes": routes})


def test_probe_path_follows_the_protocol_the_routes_speak() -> None:
    assert probe_path(policy("/v2/models/fraud"), "main") == "/v2/health/ready"
    assert probe_path(policy("/v1/chat/completions"), "main") == "/v1/models"
    assert probe_path(policy("/"), "main") == "/"
    # KServe wins when both are routed to one server.
    assert probe_path(policy("/v1/chat", "/v2/models/x"), "main") == "/v2/health/ready"
    # A fallback upstream is probed as its routes use it; an unused one with GET /.
    assert probe_path(policy("/v1/chat", fallback="small"), "small") == "/v1/models"
    assert probe_path(policy("/v1/chat"), "small") == "/"


def test_policy_differences_name_field_paths() -> None:
    file = {"routes": [{"retry": {"max_attempts": 1}, "name": "a"}], "tracing": {"x": 0.1}}
    running = {"routes": [{"retry": {"max_attempts": 3}, "name": "a"}], "extra": True}
    assert policy_differences(file, running) == [
        "routes[0].retry.max_attempts: file 1, running 3",
        'tracing: in the file only ({"x": 0.1})',
        "extra: in the running sidecar only (true)",
    ]
    assert policy_differences({"a": [1, 2]}, {"a": [1]}) == ["a: 2 items in the file, 1 running"]
    assert policy_differences({"a": 1.0}, {"a": 1}) == []


def test_tokens_rule() -> None:
    assert check_tokens("127.0.0.1", {}).status == "pass"
    assert check_tokens("localhost", {}).status == "pass"
    assert check_tokens("::1", {}).status == "pass"
    failed = check_tokens("0.0.0.0", {"SIDECAR_ADMIN_TOKEN": "a" * 20})
    assert failed.status == "fail"
    assert "SIDECAR_REVIEWER_TOKEN is not set" in failed.message
    short = {n: "short" for n in ("SIDECAR_ADMIN_TOKEN", "SIDECAR_REVIEWER_TOKEN")}
    short["SIDECAR_APP_TOKEN"] = "x" * 20
    warned = check_tokens("10.0.0.5", short)
    assert warned.status == "warn"
    assert "shorter than 16 characters: SIDECAR_ADMIN_TOKEN, SIDECAR_REVIEWER_TOKEN" in (
        warned.message
    )


def test_exit_code_and_text() -> None:
    ok = CheckResult("a", "alpha", "pass", "fine")
    warn = CheckResult("b", "beta", "warn", "hmm")
    fail = CheckResult("c", "gamma check", "fail", "broken", ("x.y: bad", "z: worse"))
    assert exit_code([ok]) == 0
    assert exit_code([ok, warn]) == 1
    assert exit_code([warn, fail, ok]) == 2
    assert format_results([ok, warn, fail]).splitlines() == [
        "PASS  alpha        fine",
        "WARN  beta         hmm",
        "FAIL  gamma check  broken",
        "                     x.y: bad",
        "                     z: worse",
        "doctor: 1 passed, 1 warning, 1 failed",
    ]
