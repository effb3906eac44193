"""Failure capture end to end: a real `sidecar run` in front of the demo model.

Each kind of failure (connect_error, attempt_timeout, upstream_5xx, invalid_output, circuit_open,
a fallback, a shed request, an escalated and a rejected answer) becomes a stored record; what the
callers sent (emails, card numbers, an SSN at a JSON path, a configured header, a configured
pattern) is asserted absent from the raw bytes of the SQLite file; `sidecar failures report` shows
them; `POST /feedback` links a user report to the original request and trace; and capture never
fails a request when the state directory is unusable (drops are counted)."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import REPO, SidecarFactory, SidecarProc, simple_policy

pytestmark = pytest.mark.timeout(60)

APP_TOKEN = "app-secret-token"
EMAIL = "patient.zero@clinic.example"
CARD = "4111 1111 1111 1111"
SSN = "078-05-1120"
CUSTOMER_TOKEN = "ctok-8c1d7e55"
BEARER = "Bearer sk-live-4f9a0c7e"
ACCOUNT = "ACCT-4471902"
SECRETS = (EMAIL, CARD, "4111111111111111", SSN, CUSTOMER_TOKEN, "sk-live-4f9a0c7e", ACCOUNT)
SAFE = {"decision": "review", "reason": "model_unavailable"}
V2_INPUT = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [1.0]}]}


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def sensitive_body(**extra: Any) -> dict[str, Any]:
    return {
        **extra,
        "customer": {"email": EMAIL, "ssn": SSN, "card": CARD},
        "note": f"account {ACCOUNT}, reach me at {EMAIL}",
    }


def sensitive_headers(request_id: str, fault: str | None = None) -> dict[str, str]:
    headers = {
        "x-request-id": request_id,
        "Authorization": BEARER,
        "x-customer-token": CUSTOMER_TOKEN,
    }
    if fault:
        headers["x-demo-fault"] = fault
    return headers


def route(name: str, upstream: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": name,
        "match": {"path_prefix": f"/echo/{name}"},
        "upstream": upstream,
        "retry": {"max_attempts": 1},
    }
    base.update(fields)
    return base


def failing_policy(model_url: str) -> dict[str, Any]:
    off = {"enabled": False}
    dead = closed_port()
    return {
        "upstreams": {
            "model": {"url": model_url, "breaker": off},
            "dead": {"url": dead, "breaker": off},
            "flaky": {"url": dead, "breaker": {"consecutive_failures": 1, "open_for": "30s"}},
            "narrow": {
                "url": model_url,
                "breaker": off,
                "concurrency": {"max_in_flight": 1, "queue": 0},
            },
        },
        "routes": [
            route("down", "dead"),
            route("slow", "model", timeouts={"attempt": "200ms", "total": "2s"}),
            route("broken", "model"),
            route("invalid", "model", validate={}),
            route("tripped", "flaky"),
            route("fallback", "dead", fallback=[{"static": {"json": SAFE}}]),
            route("shed", "narrow"),
            {
                "name": "gated",
                "match": {"path_prefix": "/v2/models/fraud"},
                "upstream": "model",
                "retry": {"max_attempts": 1},
                "confidence": {
                    "extract": {"kind": "kserve_v2", "output": "predict_proba", "class_index": 0},
                    "auto_above": 0.9,
                    "reject_below": 0.5,
                    "on_review": "escalate",
                    "on_reject": "request_info",
                },
            },
            {"name": "rest", "match": {"path_prefix": "/"}, "upstream": "model"},
        ],
        "failures": {
            "redact": {
                "headers": ["x-customer-token"],
                "json_paths": ["$.customer.ssn"],
                "patterns": ["ACCT-[0-9]+"],
            },
            "max_excerpt": 2048,
        },
    }


def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"  # where the `start_sidecar` fixture points SIDECAR_STATE_DIR


def db_rows(tmp_path: Path, sql: str = "SELECT * FROM failures") -> list[dict[str, Any]]:
    path = state_dir(tmp_path) / "failures.db"
    if not path.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return []
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql).fetchall()]
    except sqlite3.Error:
        return []
    finally:
        conn.close()


async def wait_for(predicate: Any, timeout: float = 10.0) -> Any:
    """Bounded polling of an observable condition."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


async def send(
    http: aiohttp.ClientSession,
    url: str,
    body: Any,
    headers: dict[str, str],
) -> tuple[int, dict[str, str], bytes]:
    async with http.post(url, json=body, headers=headers) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


async def metric(http: aiohttp.ClientSession, sc: SidecarProc, name: str, **labels: str) -> float:
    async with http.get(sc.admin_url + "/metrics") as resp:
        text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_each_kind_of_failure_is_recorded_and_redacted_on_disk(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    sc = start_sidecar(failing_policy(model_url))
    seen: dict[str, dict[str, str]] = {}

    async def echo(name: str, request_id: str, fault: str | None = None) -> int:
        status, headers, _ = await send(
            http, f"{sc.url}/echo/{name}", sensitive_body(), sensitive_headers(request_id, fault)
        )
        seen[request_id] = headers
        return status

    assert await echo("down", "down-1") == 502
    assert await echo("slow", "slow-1", "latency=2s") == 504
    assert await echo("broken", "broken-1", "status=500") == 500
    assert await echo("invalid", "invalid-1", "malformed_json") == 502
    assert await echo("tripped", "trip-1") == 502
    assert await echo("tripped", "trip-2") == 503
    assert await echo("fallback", "fallback-1") == 200
    held = asyncio.create_task(echo("shed", "held-1", "latency=1s"))

    async def admitted() -> bool:
        async with http.get(model_url + "/_demo/stats") as resp:
            return bool((await resp.json())["in_flight"] == 1)

    deadline = time.monotonic() + 10
    while not await admitted():
        assert time.monotonic() < deadline, "the held request never reached the model"
        await asyncio.sleep(0.02)
    assert await echo("shed", "shed-1") == 503
    assert await held == 200
    for request_id, confidence, expected in (("gate-review", 0.7, 202), ("gate-reject", 0.2, 422)):
        status, headers, _ = await send(
            http,
            sc.url + "/v2/models/fraud/infer",
            sensitive_body(**V2_INPUT),
            sensitive_headers(request_id, f"confidence={confidence}"),
        )
        assert status == expected
        seen[request_id] = headers
    assert await echo("rest", "ok-1") == 200

    expected = {
        "down-1": ("down", "dead", "connect_error", "error", 502),
        "slow-1": ("slow", "model", "attempt_timeout", "error", 504),
        "broken-1": ("broken", "model", "upstream_5xx", "error", 500),
        "invalid-1": ("invalid", "model", "invalid_output", "error", 502),
        "trip-1": ("tripped", "flaky", "connect_error", "error", 502),
        "trip-2": ("tripped", "flaky", "circuit_open", "error", 503),
        "fallback-1": ("fallback", "dead", "connect_error", "fallback", 200),
        "shed-1": ("shed", "narrow", "overloaded", "error", 503),
        "gate-review": ("gated", "model", "low_confidence", "escalated", 202),
        "gate-reject": ("gated", "model", "low_confidence", "rejected", 422),
    }

    def stored() -> dict[str, dict[str, Any]] | None:
        rows = {r["request_id"]: r for r in db_rows(tmp_path) if r["kind"] == "request"}
        return rows if len(rows) >= len(expected) else None

    rows = await wait_for(stored)
    assert set(rows) == set(expected), "only failed requests are recorded (not ok-1, held-1)"
    for request_id, (route_name, upstream, mode, outcome, status) in expected.items():
        row = rows[request_id]
        got = (row["route"], row["upstream"], row["mode"], row["outcome"], row["status"])
        assert got == (route_name, upstream, mode, outcome, status), request_id
        headers = seen[request_id]
        assert row["trace_id"] == headers["x-trace-id"]
        assert headers["x-sidecar-outcome"] == outcome
        assert row["latency_ms"] > 0 and row["time"] > time.time() - 120
        request = json.loads(row["request_excerpt"])
        assert request["method"] == "POST" and request["headers"]["authorization"] == "[REDACTED]"
        assert request["headers"]["x-customer-token"] == "[REDACTED]"
        assert request["body"]["customer"] == {
            "email": "[EMAIL]",
            "ssn": "[REDACTED]",
            "card": "[CARD]",
        }
        assert request["body"]["note"] == "account [REDACTED], reach me at [EMAIL]"
        assert len(row["request_excerpt"]) <= 2048
    assert rows["trip-2"]["breaker_state"] == "open"
    assert rows["slow-1"]["attempts"] == 1
    assert rows["gate-review"]["confidence"] == pytest.approx(0.7)
    assert rows["gate-review"]["review_id"] == seen["gate-review"]["x-sidecar-review-id"]
    assert rows["gate-reject"]["confidence_band"] == "reject"
    assert "fallback" in json.loads(rows["fallback-1"]["detail"])["events"]
    assert rows["fallback-1"]["fallback_kind"] == "static"
    # Sidecar-made answers are kept (the envelope); a streamed upstream answer is not copied.
    envelope = json.loads(rows["down-1"]["response_excerpt"])["body"]["error"]
    assert envelope["failure_mode"] == "connect_error" and envelope["request_id"] == "down-1"
    assert json.loads(rows["fallback-1"]["response_excerpt"])["body"] == SAFE
    assert "not kept" in json.loads(rows["broken-1"]["response_excerpt"])["body_note"]
    assert rows["broken-1"]["cause"] == "upstream answered 500"
    assert "not valid JSON" in rows["invalid-1"]["cause"]

    breakers = await wait_for(
        lambda: [r for r in db_rows(tmp_path) if r["kind"] == "breaker"] or None
    )
    assert [(b["upstream"], b["outcome"]) for b in breakers] == [("flaky", "open")]

    def counted() -> dict[tuple[str, str], int] | None:
        rows = db_rows(
            tmp_path,
            "SELECT route, outcome, sum(count) AS n FROM request_counts GROUP BY route, outcome",
        )
        counts = {(r["route"], r["outcome"]): r["n"] for r in rows}
        return counts if sum(counts.values()) == 12 else None

    counts = await wait_for(counted)  # every request, failed or not, per route and outcome
    assert counts[("rest", "ok")] == 1 and counts[("shed", "ok")] == 1
    assert counts[("tripped", "error")] == 2 and counts[("gated", "escalated")] == 1
    assert await metric(http, sc, "sidecar_failure_records_total", kind="request") == 10

    # The team's view: `sidecar failures report` over the same store.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "failures",
        "report",
        "--since",
        "1h",
        "--json",
        "--state-dir",
        str(state_dir(tmp_path)),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode == 0
    data = json.loads(out)
    by_key = {(r["route"], r["mode"]): r["count"] for r in data["rows"]}
    assert by_key[("tripped", "circuit_open")] == 1 and by_key[("shed", "overloaded")] == 1
    assert by_key[("gated", "low_confidence")] == 2
    assert data["failed"] == 10

    # Stop (flushes and checkpoints the WAL), then read every byte the store left on disk.
    assert sc.rp.stop() == 0
    raw = b"".join(p.read_bytes() for p in state_dir(tmp_path).glob("failures.db*"))
    assert b"[EMAIL]" in raw
    for secret in SECRETS:
        assert secret.encode() not in raw, f"{secret!r} reached the failure store"


async def test_feedback_is_linked_to_the_original_request_and_trace(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    sc = start_sidecar(
        simple_policy(model_url, retry={"max_attempts": 1}),
        env={"SIDECAR_APP_TOKEN": APP_TOKEN},
    )
    auth = {"Authorization": f"Bearer {APP_TOKEN}"}
    chat = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    _, failed, _ = await send(
        http,
        sc.url + "/v1/chat/completions",
        chat,
        {"x-request-id": "fb-fail", "x-demo-fault": "status=500"},
    )
    _, ok, _ = await send(http, sc.url + "/v1/chat/completions", chat, {"x-request-id": "fb-ok"})
    await wait_for(lambda: any(r["request_id"] == "fb-fail" for r in db_rows(tmp_path)))

    async def feedback(body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with http.post(
            sc.admin_url + "/feedback",
            data=body if isinstance(body, bytes) else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **(auth if headers is None else headers)},
        ) as resp:
            return resp.status, await resp.json()

    status, body = await feedback(
        {"request_id": "fb-fail", "note": f"wrong; call {EMAIL}", "label": "wrong"}
    )
    assert status == 201, body
    assert body["linked"] is True and body["linked_via"] == "failure_record"
    assert body["trace_id"] == failed["x-trace-id"] and body["route"] == "default"
    status, body = await feedback({"request_id": "fb-ok", "corrected": {"answer": "42"}})
    assert status == 201 and body["linked"] is True and body["linked_via"] == "recent_request"
    assert body["trace_id"] == ok["x-trace-id"]
    status, body = await feedback({"request_id": "never-seen"})
    assert status == 201 and body["linked"] is False and body["linked_via"] is None

    # Bad input: a clear 400; no token: 401; nothing stored for them.
    status, body = await feedback(b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = await feedback({"note": "no id"})
    assert status == 400 and "request_id is required" in body["error"]["message"]
    status, body = await feedback({"request_id": "x", "sentiment": "bad"})
    assert status == 400 and "sentiment" in body["error"]["message"]
    status, body = await feedback({"request_id": "fb-fail"}, headers={})
    assert status == 401

    reports = {r["request_id"]: r for r in db_rows(tmp_path) if r["kind"] == "feedback"}
    assert set(reports) == {"fb-fail", "fb-ok", "never-seen"}
    fail_report = reports["fb-fail"]
    assert fail_report["mode"] == "user_reported"
    assert fail_report["trace_id"] == failed["x-trace-id"]
    assert fail_report["note"] == "wrong; call [EMAIL]"
    assert json.loads(fail_report["detail"])["linked"] is True
    assert json.loads(reports["fb-ok"]["detail"])["corrected"] == {"answer": "42"}


async def test_capture_never_fails_a_request_when_the_state_dir_is_unusable(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    policy = simple_policy(model_url, retry={"max_attempts": 1})
    policy["upstreams"]["model"]["breaker"] = {"enabled": False}
    sc = start_sidecar(policy, env={"SIDECAR_STATE_DIR": str(blocker / "state")})
    chat = {"model": "demo", "messages": [{"role": "user", "content": f"hi {EMAIL}"}]}
    for _ in range(5):
        status, headers, body = await send(
            http, sc.url + "/v1/chat/completions", chat, {"x-demo-fault": "status=503"}
        )
        assert status == 503 and headers["x-sidecar-failure-mode"] == "upstream_5xx"
    status, headers, body = await send(http, sc.url + "/v1/chat/completions", chat, {})
    assert status == 200 and json.loads(body)["choices"]

    async def dropped() -> float:
        return await metric(http, sc, "sidecar_failure_capture_dropped_total", reason="store_error")

    deadline = time.monotonic() + 10
    while await dropped() < 5:
        assert time.monotonic() < deadline, "drops were not counted"
        await asyncio.sleep(0.05)
    # Feedback cannot be stored: it says so instead of pretending.
    async with http.post(sc.admin_url + "/feedback", json={"request_id": "x"}) as resp:
        assert resp.status == 503
    assert any(r.get("event") == "failure_store_failed" for r in sc.rp.records())
    assert sc.rp.stop() == 0
