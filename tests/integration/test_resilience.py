"""Resilience scenarios against the real demo model: every failure mode's status, headers and
envelope, upstream attempts counted by the model itself, breaker, budget and deadlines."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import SidecarFactory, SidecarProc, simple_policy
from tests.support.processes import RunningProcess, sidecar_cmd, start_process
from tests.support.relay import Relay, RelayFaults

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


async def stats(http: aiohttp.ClientSession, model_url: str) -> dict[str, Any]:
    async with http.get(model_url + "/_demo/stats") as resp:
        data: dict[str, Any] = await resp.json()
        return data


async def set_fault(http: aiohttp.ClientSession, model_url: str, **fault: Any) -> None:
    async with http.post(model_url + "/_demo/faults", json=fault) as resp:
        assert resp.status == 200, await resp.text()


async def breakers(http: aiohttp.ClientSession, sc: SidecarProc) -> dict[str, dict[str, Any]]:
    async with http.get(sc.admin_url + "/admin/breakers") as resp:
        return {b["upstream"]: b for b in (await resp.json())["breakers"]}


async def wait_until(predicate: Any, timeout: float = 10.0, step: float = 0.05) -> None:
    """Bounded polling of an observable condition (not a sleep to let things settle)."""
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(step)


def assert_envelope(body: dict[str, Any], mode: str, headers: Any) -> None:
    err = body["error"]
    assert err["type"] == "sidecar_error"
    assert err["failure_mode"] == mode
    assert err["code"] == mode
    assert err["request_id"] == headers["x-request-id"]
    assert err["trace_id"] == headers["x-trace-id"]
    assert headers["x-sidecar-failure-mode"] == mode
    assert headers["x-sidecar-outcome"] == "error"


def policy(model_url: str, **route: Any) -> dict[str, Any]:
    breaker = route.pop("_breaker", {"enabled": False})
    p = simple_policy(model_url, **route)
    p["upstreams"]["model"]["breaker"] = breaker
    return p


@pytest.fixture
async def fresh_model() -> AsyncIterator[RunningProcess]:
    rp = start_process(sidecar_cmd("demo-model", "--port", "0"))
    rp.ready["url"] = "http://" + rp.ready["address"]
    yield rp
    rp.stop()


async def test_upstream_5xx_and_429_pass_through(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(policy(model_url, retry={"max_attempts": 1}))
    async with http.post(
        sc.url + "/v1/chat/completions", json=CHAT, headers={"x-demo-fault": "status=500"}
    ) as resp:
        assert resp.status == 500
        assert resp.headers["x-sidecar-failure-mode"] == "upstream_5xx"
        assert resp.headers["x-sidecar-outcome"] == "error"
    async with http.post(
        sc.url + "/v1/chat/completions", json=CHAT, headers={"x-demo-fault": "status=429"}
    ) as resp:
        assert resp.status == 429
        assert resp.headers["x-sidecar-failure-mode"] == "upstream_rate_limited"


async def test_connect_error_is_retried_then_502(
    start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(policy("http://127.0.0.1:9"))
    async with http.get(sc.url + "/anything") as resp:
        assert resp.status == 502
        assert_envelope(await resp.json(), "connect_error", resp.headers)
    rec = sc.rp.wait_for_log(lambda r: r.get("event") == "request")
    assert rec["attempts"] == 3 and rec["failure_mode"] == "connect_error"


async def test_reset_is_connect_error_and_retried(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(policy(model_url))
    async with http.post(
        sc.url + "/v1/chat/completions", json=CHAT, headers={"x-demo-fault": "reset"}
    ) as resp:
        assert resp.status == 502
        assert_envelope(await resp.json(), "connect_error", resp.headers)
    assert (await stats(http, model_url))["requests"] == 3


async def test_attempt_timeout_not_retried_unless_idempotent(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    timeouts = {"total": "5s", "attempt": "300ms"}
    sc = start_sidecar(policy(model_url, timeouts=timeouts))
    async with http.post(
        sc.url + "/v2/models/m/infer", json={}, headers={"x-demo-fault": "latency=2s"}
    ) as resp:
        assert resp.status == 504
        assert_envelope(await resp.json(), "attempt_timeout", resp.headers)
    assert (await stats(http, model_url))["requests"] == 1
    await http.post(model_url + "/_demo/stats/reset")
    sc2 = start_sidecar(policy(model_url, timeouts=timeouts, idempotent=True))
    async with http.post(
        sc2.url + "/v2/models/m/infer", json={}, headers={"x-demo-fault": "latency=2s"}
    ) as resp:
        assert resp.status == 504
        assert resp.headers["x-sidecar-failure-mode"] == "attempt_timeout"
    assert (await stats(http, model_url))["requests"] == 3


async def test_model_hangs_deadline_exceeded(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(policy(model_url, timeouts={"total": "1s"}, idempotent=True))
    started = time.monotonic()
    async with http.post(
        sc.url + "/v2/models/m/infer", json={}, headers={"x-demo-fault": "hang"}
    ) as resp:
        assert resp.status == 504
        assert_envelope(await resp.json(), "deadline_exceeded", resp.headers)
    assert time.monotonic() - started < 1 + 2  # generous guard only


async def test_caller_deadline_shortens_and_is_forwarded(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(policy(model_url, timeouts={"total": "10s"}))
    async with http.post(
        sc.url + "/v2/models/m/infer",
        json={},
        headers={"x-demo-fault": "hang", "x-request-timeout": "0.5"},
    ) as resp:
        assert resp.status == 504
        assert resp.headers["x-sidecar-failure-mode"] == "deadline_exceeded"
    async with http.get(sc.url + "/echo/t", headers={"x-request-timeout": "100"}) as resp:
        seen = {n.lower(): v for n, v in (await resp.json())["headers"]}
    assert 0 < float(seen["x-request-timeout"]) <= 10.0  # never lengthened past the policy


async def test_first_byte_timeout(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    # A model that sends headers early but no first event in time.
    sc2 = start_sidecar(
        policy(model_url, timeouts={"total": "5s", "attempt": "2s", "first_byte": "300ms"})
    )
    async with http.post(
        sc2.url + "/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers={"x-demo-fault": "first_byte_delay=2s"},
    ) as resp:
        assert resp.status == 504
        assert_envelope(await resp.json(), "first_byte_timeout", resp.headers)


async def test_malformed_json_is_invalid_output_and_retried(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(policy(model_url, idempotent=True, validate={}))
    async with http.post(
        sc.url + "/v2/models/m/infer", json={}, headers={"x-demo-fault": "malformed_json"}
    ) as resp:
        assert resp.status == 502
        assert_envelope(await resp.json(), "invalid_output", resp.headers)
    assert (await stats(http, model_url))["requests"] == 3
    await set_fault(http, model_url, spec="malformed_json", count=1)
    async with http.post(sc.url + "/v2/models/m/infer", json={}) as resp:
        assert resp.status == 200
        assert resp.headers["x-sidecar-outcome"] == "retried"
        assert "x-sidecar-failure-mode" not in resp.headers
        assert (await resp.json())["outputs"]
    async with http.post(
        sc.url + "/v2/models/m/infer", json={}, headers={"x-demo-fault": "empty"}
    ) as resp:
        assert resp.status == 502
        assert resp.headers["x-sidecar-failure-mode"] == "invalid_output"


async def test_schema_violation_is_invalid_output(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession, tmp_path: Any
) -> None:
    (tmp_path / "schema.json").write_text('{"type": "object", "required": ["nope"]}')
    sc = start_sidecar(policy(model_url, validate={"json_schema": "schema.json"}))
    async with http.post(sc.url + "/v2/models/m/infer", json={}) as resp:
        assert resp.status == 502
        body = await resp.json()
        assert_envelope(body, "invalid_output", resp.headers)
        assert "nope" in body["error"]["message"]


async def test_retry_after_is_honoured(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(policy(model_url, timeouts={"total": "5s"}))
    await set_fault(http, model_url, spec="status=503,retry_after=1s", count=1)
    started = time.monotonic()
    async with http.post(sc.url + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
        assert resp.headers["x-sidecar-outcome"] == "retried"
    assert time.monotonic() - started >= 1.0  # waited what Retry-After asked
    assert (await stats(http, model_url))["requests"] == 2


async def test_body_over_replay_limit_not_retried(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(policy(model_url, retry={"replay_limit": "1KiB"}))
    await set_fault(http, model_url, spec="status=503", count=1)
    async with http.post(sc.url + "/echo/big", data=os.urandom(10_000)) as resp:
        assert resp.status == 503
        assert resp.headers["x-sidecar-failure-mode"] == "upstream_5xx"
    assert (await stats(http, model_url))["requests"] == 1
    await set_fault(http, model_url, spec="status=503", count=1)
    async with http.post(sc.url + "/echo/small", data=b"x" * 100) as resp:
        assert resp.status == 200
        assert resp.headers["x-sidecar-outcome"] == "retried"


async def test_retry_budget_bounds_attempts_with_breaker_disabled(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    ratio, per_second = 0.2, 10.0
    started = time.monotonic()
    sc = start_sidecar(
        policy(
            model_url,
            retry={"max_attempts": 3, "backoff": {"base": "1ms", "max": "2ms"}},
            retry_budget={"ratio": ratio, "min_per_second": per_second, "ttl": "10s"},
        )
    )
    await set_fault(http, model_url, spec="status=503", seconds=120)
    n = 80

    async def one() -> None:
        async with http.post(sc.url + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 503
            await resp.read()

    for _ in range(n // 8):
        await asyncio.gather(*(one() for _ in range(8)))
    elapsed = time.monotonic() - started
    attempts = (await stats(http, model_url))["requests"]
    records = [r for r in sc.rp.records() if r.get("event") == "request"]
    await wait_until(
        lambda: _async_true(len([r for r in sc.rp.records() if r.get("event") == "request"]) >= n)
    )
    records = [r for r in sc.rp.records() if r.get("event") == "request"]
    refusals = sum(1 for r in records if r["budget_refused"])
    assert attempts > n  # retries happened ...
    assert refusals > 0  # ... and the budget refused some
    # A fresh budget starts with one second's reserve of min_per_second tokens.
    assert attempts <= n * (1 + ratio) + per_second * (elapsed + 1)


async def _async_true(value: bool) -> bool:
    return value


async def test_breaker_opens_and_model_restart_is_not_called_until_probe(
    fresh_model: RunningProcess, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    url = fresh_model.ready["url"]
    port = url.rsplit(":", 1)[1]
    sc = start_sidecar(
        policy(
            url,
            retry={"max_attempts": 1},
            _breaker={"consecutive_failures": 3, "open_for": "2s", "jitter": 0},
        )
    )
    fresh_model.stop()
    for _ in range(3):
        async with http.get(sc.url + "/echo/x") as resp:
            assert resp.status == 502
            assert resp.headers["x-sidecar-failure-mode"] == "connect_error"
    async with http.get(sc.url + "/echo/x") as resp:
        assert resp.status == 503
        assert_envelope(await resp.json(), "circuit_open", resp.headers)
        assert int(resp.headers["Retry-After"]) >= 1
    # The model comes back while the circuit is open: the sidecar must not call it yet.
    restarted = start_process(sidecar_cmd("demo-model", "--port", port))
    try:
        async with http.get(sc.url + "/echo/x") as resp:
            assert resp.status == 503
        assert (await stats(http, url))["requests"] == 0
        state = (await breakers(http, sc))["model"]
        assert state["state"] == "open" and state["next_probe_at"]

        async def probe_passes() -> bool:
            async with http.get(sc.url + "/echo/x") as resp:
                await resp.read()
                return resp.status == 200

        await wait_until(probe_passes, timeout=2 + 3, step=0.1)
        assert (await stats(http, url))["requests"] == 1  # exactly the probe
        state = (await breakers(http, sc))["model"]
        assert state["state"] == "closed"
        assert state["last_recovery_seconds"] >= 2
    finally:
        restarted.stop()


async def test_flapping_model_transitions_visible(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(
        policy(
            model_url,
            retry={"max_attempts": 1},
            _breaker={"consecutive_failures": 2, "open_for": "500ms", "jitter": 0},
        )
    )
    await set_fault(http, model_url, spec="status=500", count=2)
    for _ in range(2):
        async with http.post(sc.url + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 500
    assert (await breakers(http, sc))["model"]["state"] == "open"

    async def closed_again() -> bool:
        async with http.post(sc.url + "/v1/chat/completions", json=CHAT) as resp:
            await resp.read()
        return (await breakers(http, sc))["model"]["state"] == "closed"

    await wait_until(closed_again, timeout=5, step=0.1)
    transitions = (await breakers(http, sc))["model"]["transitions"]
    assert transitions == {"open": 1, "half-open": 1, "closed": 1}


async def test_ratio_opens_breaker(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(
        policy(
            model_url,
            retry={"max_attempts": 1},
            _breaker={"consecutive_failures": 100, "failure_ratio": 0.5, "min_calls": 10},
        )
    )
    for i in range(10):
        fault = {"x-demo-fault": "status=500"} if i % 2 else {}
        async with http.post(sc.url + "/v1/chat/completions", json=CHAT, headers=fault) as resp:
            await resp.read()
    assert (await breakers(http, sc))["model"]["state"] == "open"


async def test_half_open_admits_only_configured_probes(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(
        policy(
            model_url,
            retry={"max_attempts": 1},
            _breaker={"open_for": "300ms", "jitter": 0, "half_open_probes": 1},
        )
    )
    async with http.post(sc.admin_url + "/admin/breakers/model", json={"action": "open"}) as r:
        assert r.status == 200
        assert (await r.json())["state"] == "open"

    async def probe_due() -> bool:
        b = (await breakers(http, sc))["model"]
        return b["next_probe_in"] == 0

    await wait_until(probe_due, timeout=5)
    await http.post(model_url + "/_demo/stats/reset")
    await set_fault(http, model_url, spec="latency=500ms", count=50)

    async def one() -> int:
        async with http.post(sc.url + "/v1/chat/completions", json=CHAT) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(one() for _ in range(10)))
    assert statuses.count(200) == 1
    assert statuses.count(503) == 9
    assert (await stats(http, model_url))["requests"] == 1


async def test_client_hangup_cancels_upstream_and_is_not_a_breaker_failure(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(
        policy(model_url, retry={"max_attempts": 1}, _breaker={"consecutive_failures": 1})
    )
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(0.5):
            async with http.post(
                sc.url + "/v1/chat/completions", json=CHAT, headers={"x-demo-fault": "hang"}
            ) as resp:
                await resp.read()

    async def upstream_call_gone() -> bool:
        return (await stats(http, model_url)).get("in_flight", 0) == 0

    await wait_until(upstream_call_gone, timeout=5)
    rec = sc.rp.wait_for_log(lambda r: r.get("event") == "request")
    assert rec["failure_mode"] == "client_cancelled"
    b = (await breakers(http, sc))["model"]
    assert b["state"] == "closed" and b["consecutive_failures"] == 0


async def test_relay_sliced_writes_stay_byte_identical(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    host, port = model_url.removeprefix("http://").split(":")
    relay = await Relay(host, int(port), RelayFaults(slice_writes=True)).start()
    try:
        sc = start_sidecar(policy(relay.url))
        async with http.get(model_url + "/bytes/5000") as direct:
            expected = await direct.read()
        async with http.get(sc.url + "/bytes/5000") as resp:
            assert resp.status == 200
            assert await resp.read() == expected
        async with http.post(
            sc.url + "/v1/chat/completions", json={**CHAT, "stream": True}
        ) as resp:
            body = await resp.read()
        assert body.rstrip().endswith(b"data: [DONE]")
    finally:
        await relay.stop()


@pytest.mark.parametrize(
    ("faults", "mode", "status"),
    [
        (RelayFaults(reset_before_headers=True), "connect_error", 502),
        (RelayFaults(black_hole=True), "attempt_timeout", 504),
    ],
)
async def test_relay_faults_classified(
    model_url: str,
    start_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    faults: RelayFaults,
    mode: str,
    status: int,
) -> None:
    host, port = model_url.removeprefix("http://").split(":")
    relay = await Relay(host, int(port), faults).start()
    try:
        sc = start_sidecar(
            policy(
                relay.url, retry={"max_attempts": 1}, timeouts={"total": "3s", "attempt": "500ms"}
            )
        )
        async with http.get(sc.url + "/bytes/10") as resp:
            assert resp.status == status
            assert_envelope(await resp.json(), mode, resp.headers)
    finally:
        await relay.stop()


async def test_relay_reset_after_headers(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    host, port = model_url.removeprefix("http://").split(":")
    relay = await Relay(host, int(port), RelayFaults(reset_after_headers=True)).start()
    try:
        sc = start_sidecar(policy(relay.url, retry={"max_attempts": 1}))
        async with http.get(sc.url + "/bytes/1000") as resp:
            # Headers came, the body did not: the first-byte read fails before anything was
            # sent to the caller, so the caller gets a clean error answer.
            assert resp.status == 502
            assert_envelope(await resp.json(), "stream_interrupted", resp.headers)
    finally:
        await relay.stop()
