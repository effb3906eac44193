"""Adaptive concurrency against the real demo model: while load runs, the model slows down (a
global latency fault) and recovers; the bulkhead's limit, read from `GET /admin/bulkheads`,
falls and rises with it, and the requests it sheds get 503 `overloaded`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from tests.conftest import SidecarFactory, SidecarProc, simple_policy

pytestmark = pytest.mark.timeout(60)

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
TOKEN = "adaptive-admin-token"
MAX, MIN = 16, 2
WORKERS = 8


@dataclass
class Load:
    """Closed-loop load: each worker sends, reads the answer, pauses briefly, repeats."""

    ok: int = 0
    shed: list[tuple[int, dict[str, str], dict[str, Any]]] = field(default_factory=list)
    other: list[int] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self, http: aiohttp.ClientSession, url: str) -> None:
        while not self.stop.is_set():
            async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
                body = await resp.read()
                if resp.status == 200:
                    self.ok += 1
                elif resp.headers.get("x-sidecar-failure-mode") == "overloaded":
                    self.shed.append((resp.status, dict(resp.headers), _json(body)))
                else:
                    self.other.append(resp.status)
            await asyncio.sleep(0.02)  # pacing of the load generator, not a wait for state


def _json(body: bytes) -> dict[str, Any]:
    data = json.loads(body)
    assert isinstance(data, dict)
    return data


async def bulkhead(http: aiohttp.ClientSession, sc: SidecarProc) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with http.get(sc.admin_url + "/admin/bulkheads", headers=headers) as resp:
        assert resp.status == 200
        (only,) = (await resp.json())["bulkheads"]
        assert isinstance(only, dict)
        return only


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """Bounded polling of an observable condition."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_the_limit_follows_latency_sheds_with_overloaded_and_recovers(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    policy = simple_policy(model_url, timeouts={"total": "10s", "attempt": "5s"})
    policy["upstreams"]["model"]["breaker"] = {"enabled": False}
    policy["upstreams"]["model"]["concurrency"] = {
        "max_in_flight": MAX,
        "queue": 0,
        "adaptive": True,
        "adaptive_latency": "150ms",
        "min_in_flight": MIN,
        "backoff_ratio": 0.7,
        "retry_after": "1s",
    }
    sc = start_sidecar(policy, env={"SIDECAR_ADMIN_TOKEN": TOKEN})
    async with http.get(sc.admin_url + "/admin/bulkheads") as resp:
        assert resp.status == 401  # admin scope

    load = Load()
    workers = [asyncio.ensure_future(load.worker(http, sc.url)) for _ in range(WORKERS)]
    try:
        # Fast model: the limit stays at its maximum and nothing is shed.
        await wait_until(lambda: _true(load.ok >= 40), timeout=15)
        snap = await bulkhead(http, sc)
        assert snap["adaptive"] is True and snap["limit"] == MAX
        assert {"in_flight", "queued", "limit"} <= set(snap)
        assert load.shed == []

        # The model slows down: the limit falls towards its minimum, the excess is shed.
        async with http.post(
            model_url + "/_demo/faults", json={"spec": "latency=400ms", "rate": 1.0}
        ) as resp:
            assert resp.status == 200
        await wait_until(lambda: _limit_at_most(http, sc, MIN + 1), timeout=15)
        await wait_until(lambda: _true(len(load.shed) >= 5), timeout=15)
        status, headers, body = load.shed[0]
        assert status == 503 and headers["x-sidecar-outcome"] == "error"
        assert headers["Retry-After"] == "1"
        assert body["error"]["failure_mode"] == "overloaded"
        # Requests sent before the slowdown finish; then in-flight stays under the lower limit.
        await wait_until(lambda: _in_flight_at_most(http, sc, MIN + 1), timeout=10)

        # The model recovers: so does the limit.
        async with http.delete(model_url + "/_demo/faults") as resp:
            assert resp.status == 200
        await wait_until(lambda: _limit_at_least(http, sc, MAX - 2), timeout=20)
    finally:
        load.stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
    assert load.other == []  # nothing but answers and sheds


async def _true(value: bool) -> bool:
    return value


async def _limit_at_most(http: aiohttp.ClientSession, sc: SidecarProc, limit: int) -> bool:
    return int((await bulkhead(http, sc))["limit"]) <= limit


async def _in_flight_at_most(http: aiohttp.ClientSession, sc: SidecarProc, n: int) -> bool:
    return int((await bulkhead(http, sc))["in_flight"]) <= n


async def _limit_at_least(http: aiohttp.ClientSession, sc: SidecarProc, limit: int) -> bool:
    return int((await bulkhead(http, sc))["limit"]) >= limit
