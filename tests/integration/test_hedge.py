"""Hedged requests against the real demo model: the caller's tail latency drops when a share of
the model's answers are slow, and the extra upstream load stays within the retry budget.

Which requests are slow is decided by the test, not by chance: before every fifth request one
`latency=1s` fault for exactly one upstream request is registered. Without hedging those callers
wait the full second; with hedging the hedge (the next upstream request, fault-free) answers.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import SidecarFactory, SidecarProc, simple_policy, write_policy
from tests.support.otlp import OtlpReceiver

pytestmark = pytest.mark.timeout(60)

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
N = 50
SLOW_EVERY = 5  # a 20% share of requests is slow
RATIO = 0.2
MIN_PER_SECOND = 1.0


async def demo_stats(http: aiohttp.ClientSession, model_url: str) -> dict[str, Any]:
    async with http.get(model_url + "/_demo/stats") as resp:
        data: dict[str, Any] = await resp.json()
        return data


async def add_fault(http: aiohttp.ClientSession, model_url: str, **fault: Any) -> None:
    async with http.post(model_url + "/_demo/faults", json=fault) as resp:
        assert resp.status == 200, await resp.text()


async def metric(http: aiohttp.ClientSession, sc: SidecarProc, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
    async with http.get(sc.admin_url + "/metrics") as resp:
        text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def policy(model_url: str, hedge: dict[str, Any] | None, **budget: float) -> dict[str, Any]:
    route: dict[str, Any] = {
        "idempotent": True,
        "timeouts": {"total": "10s", "attempt": "5s"},
        "retry": {"max_attempts": 1},
        "retry_budget": {"ratio": RATIO, "min_per_second": MIN_PER_SECOND, "ttl": "10s", **budget},
    }
    if hedge is not None:
        route["hedge"] = hedge
    return simple_policy(model_url, **route)


async def timed_post(http: aiohttp.ClientSession, sc: SidecarProc) -> float:
    started = time.monotonic()
    async with http.post(sc.url + "/v1/chat/completions", json=CHAT) as resp:
        await resp.read()
        assert resp.status == 200, resp.headers
    return time.monotonic() - started


async def run_share_of_slow(
    http: aiohttp.ClientSession, model_url: str, sc: SidecarProc
) -> tuple[list[float], float]:
    """N sequential requests, every fifth one's first upstream request slowed by 1s."""
    async with http.post(model_url + "/_demo/stats/reset") as reset:
        assert reset.status == 200
    latencies = []
    started = time.monotonic()
    for i in range(N):
        if i % SLOW_EVERY == 2:
            await add_fault(http, model_url, spec="latency=1s", count=1)
        latencies.append(await timed_post(http, sc))
    return latencies, time.monotonic() - started


def p90(values: list[float]) -> float:
    """Nearest-rank 90th percentile."""
    return sorted(values)[math.ceil(0.9 * len(values)) - 1]


async def test_hedging_cuts_the_tail_and_stays_within_the_retry_budget(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    slow_count = N // SLOW_EVERY

    # Each its own policy file (a shared one would be reloaded by both).
    plain_policy = write_policy(tmp_path, policy(model_url, hedge=None), "plain.yaml")
    hedge = {"enabled": True, "delay": "50ms"}
    hedged_policy = write_policy(tmp_path, policy(model_url, hedge=hedge), "hedged.yaml")
    plain, hedged = await asyncio.gather(
        asyncio.to_thread(start_sidecar, plain_policy),
        asyncio.to_thread(start_sidecar, hedged_policy),
    )
    without, _ = await run_share_of_slow(http, model_url, plain)
    assert sum(1 for s in without if s >= 1.0) == slow_count  # every slow answer was waited for
    assert p90(without) >= 1.0
    assert (await demo_stats(http, model_url))["requests"] == N

    with_hedges, elapsed = await run_share_of_slow(http, model_url, hedged)
    assert p90(with_hedges) < 1.0, sorted(with_hedges)[-10:]
    assert sum(1 for s in with_hedges if s >= 1.0) < slow_count

    upstream = (await demo_stats(http, model_url))["requests"]
    hedges = await metric(http, hedged, "sidecar_events_total", event="hedge")
    won = await metric(http, hedged, "sidecar_events_total", event="hedge_won")
    assert hedges >= slow_count and won >= slow_count
    assert upstream == N + hedges  # each hedge is one more upstream request, nothing else
    assert upstream <= N * (1 + RATIO) + MIN_PER_SECOND * (elapsed + 1)
    # The slow attempts that lost were cancelled as such (their own spans and attempt metrics),
    # and never counted against the breaker.
    lost = await metric(http, hedged, "sidecar_upstream_attempts_total", result="client_cancelled")
    assert lost >= slow_count
    async with http.get(hedged.admin_url + "/admin/breakers") as resp:
        (breaker,) = (await resp.json())["breakers"]
    assert breaker["state"] == "closed" and breaker["window_failures"] == 0


async def test_the_retry_budget_caps_hedges_when_every_answer_is_slow(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    ratio, per_second = 0.1, 1.0
    sc = start_sidecar(
        policy(
            model_url,
            hedge={"enabled": True, "delay": "20ms"},
            ratio=ratio,
            min_per_second=per_second,
        )
    )
    await add_fault(http, model_url, spec="latency=300ms", rate=1.0)
    async with http.post(model_url + "/_demo/stats/reset") as reset:
        assert reset.status == 200
    n, wave = 40, 20
    started = time.monotonic()
    for _ in range(n // wave):
        await asyncio.gather(*(timed_post(http, sc) for _ in range(wave)))
    elapsed = time.monotonic() - started

    upstream = (await demo_stats(http, model_url))["requests"]
    assert n < upstream <= n * (1 + ratio) + per_second * (elapsed + 1)
    skipped = await metric(http, sc, "sidecar_events_total", event="hedge_skipped")
    refused = await metric(http, sc, "sidecar_retry_budget_refusals_total")
    assert skipped > 0 and refused == skipped
    assert upstream == n + await metric(http, sc, "sidecar_events_total", event="hedge")
    skip_logs = [r for r in sc.rp.records() if r.get("event") == "hedge_skipped"]
    assert skip_logs and all(r["reason"] == "budget" for r in skip_logs)


async def test_each_hedge_is_an_attempt_with_its_own_span_and_the_loser_is_cancelled(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    otlp = await OtlpReceiver().start()
    try:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "SIDECAR_TRACE_SUCCESS_RATIO": "1",
        }
        sc = start_sidecar(policy(model_url, hedge={"enabled": True, "delay": "50ms"}), env=env)
        await add_fault(http, model_url, spec="latency=1s", count=1)
        async with http.post(sc.url + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
            trace_id = resp.headers["x-trace-id"]
            await resp.read()
        spans = await otlp.wait_trace(trace_id, spans=3)
    finally:
        await otlp.stop()
    (server,) = [s for s in spans if s.kind == "server"]
    first, hedge = sorted(
        (s for s in spans if s.kind == "client"), key=lambda s: s.attributes["sidecar.attempt"]
    )
    assert server.attributes["sidecar.attempt"] == 2
    assert {"hedge", "hedge_won"} <= set(server.event_names())
    assert first.parent_span_id == hedge.parent_span_id == server.span_id
    # The slow first attempt lost: cancelled (as a hedge that lost), ended when it was cancelled.
    assert first.attributes["sidecar.failure_mode"] == "client_cancelled"
    assert first.end_ns < server.end_ns
    assert hedge.attributes["http.response.status_code"] == 200
    assert "sidecar.failure_mode" not in hedge.attributes
    # The model saw the hedge's own span as its parent.
    seen = (await demo_stats(http, model_url))["last_headers"]
    assert seen["traceparent"].split("-")[2] == hedge.span_id
