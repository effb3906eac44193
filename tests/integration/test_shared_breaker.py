"""Breaker state shared across replicas through the machine's Redis (127.0.0.1:6379).

Two real `sidecar run` processes share one upstream's breaker: the first sees the failures and
opens; the second learns it and fails fast (503 `circuit_open`) without calling the model, which
the demo model's own request count proves. With an unreachable Redis both keep serving, each
breaker works locally, and the condition is logged and counted.

In CI (`CI` set) a missing Redis fails these tests; elsewhere they are skipped, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import redis.asyncio as redis

from sidecar.clock import MonotonicClock
from sidecar.strategies.breaker import BreakerConfig, CircuitBreaker, State
from sidecar.transport.breaker_sync import BreakerSync, redact_url
from tests.conftest import SidecarFactory, SidecarProc, simple_policy, write_policy

pytestmark = pytest.mark.timeout(60)

#: The machine's Redis (another one with `SIDECAR_TEST_REDIS_URL`).
REDIS_URL = os.environ.get("SIDECAR_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
UNREACHABLE = "redis://127.0.0.1:1/0"
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own on the machine's Redis; its keys are removed after."""
    client = redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1)  # type: ignore[no-untyped-call]
    try:
        await client.ping()
    except (redis.RedisError, OSError) as exc:
        await client.aclose()
        reason = f"no Redis at {REDIS_URL} ({exc}); start one (e.g. `redis-server`)"
        if os.environ.get("CI"):
            pytest.fail(f"Redis is required in CI: {reason}")
        pytest.skip(reason)
    name = f"sidecar-test:{uuid.uuid4().hex}:"
    try:
        yield name
    finally:
        keys = [k async for k in client.scan_iter(match=name + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def policy(model_url: str, storage: str, prefix: str) -> dict[str, Any]:
    p = simple_policy(
        model_url, retry={"max_attempts": 1}, timeouts={"total": "5s", "attempt": "2s"}
    )
    p["upstreams"]["model"]["breaker"] = {
        "consecutive_failures": 3,
        "open_for": "20s",
        "jitter": 0,
        "storage": storage,
        "storage_prefix": prefix,
    }
    return p


async def pair(
    start: SidecarFactory, policy: dict[str, Any], tmp_path: Path
) -> tuple[SidecarProc, SidecarProc]:
    """Two replicas with the same policy file, started side by side."""
    path = write_policy(tmp_path, policy, "replicas.yaml")
    first, second = await asyncio.gather(
        asyncio.to_thread(start, path), asyncio.to_thread(start, path)
    )
    return first, second


async def breaker(http: aiohttp.ClientSession, sc: SidecarProc) -> dict[str, Any]:
    async with http.get(sc.admin_url + "/admin/breakers") as resp:
        (only,) = (await resp.json())["breakers"]
        assert isinstance(only, dict)
        return only


async def post(
    http: aiohttp.ClientSession, sc: SidecarProc, fault: str | None = None
) -> tuple[int, Any]:
    headers = {"x-demo-fault": fault} if fault else {}
    async with http.post(sc.url + "/v1/chat/completions", json=CHAT, headers=headers) as resp:
        await resp.read()
        return resp.status, resp.headers


async def model_requests(http: aiohttp.ClientSession, model_url: str) -> int:
    async with http.get(model_url + "/_demo/stats") as resp:
        return int((await resp.json())["requests"])


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float) -> float:
    """Bounded polling of an observable condition; returns the seconds it took."""
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_one_replica_opens_and_the_other_fails_fast_without_calling_the_model(
    model_url: str,
    start_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    prefix: str,
    tmp_path: Path,
) -> None:
    first, second = await pair(start_sidecar, policy(model_url, REDIS_URL, prefix), tmp_path)
    for sc in (first, second):
        await wait_until(lambda sc=sc: _connected(http, sc), timeout=10)
        assert (await post(http, sc))[0] == 200

    # The first replica sees three failures in a row and opens.
    for _ in range(3):
        assert (await post(http, first, fault="status=500"))[0] == 500
    status, headers = await post(http, first)
    assert status == 503 and headers["x-sidecar-failure-mode"] == "circuit_open"

    # The second learns it within a bounded time, and fails fast from then on.
    took = await wait_until(lambda: _state_is(http, second, State.OPEN), timeout=5)
    assert took < 5
    async with http.post(model_url + "/_demo/stats/reset") as reset:
        assert reset.status == 200
    for _ in range(3):
        status, headers = await post(http, second)
        assert status == 503 and headers["x-sidecar-failure-mode"] == "circuit_open"
        assert 15 <= int(headers["Retry-After"]) <= 21  # until the first replica's open ends
    assert await model_requests(http, model_url) == 0  # the model was never called

    snap = await breaker(http, second)
    assert snap["shared"]["adopted_opens"] == 1 and snap["shared"]["open_adopted"] is True
    assert snap["shared"]["storage"] == REDIS_URL and snap["shared"]["errors"] == 0
    adopted = second.rp.wait_for_log(lambda r: r.get("event") == "breaker_sync_adopted_open")
    assert adopted["upstream"] == "model"


async def test_an_operator_close_on_one_replica_lets_the_other_probe_at_once(
    model_url: str,
    start_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    prefix: str,
    tmp_path: Path,
) -> None:
    first, second = await pair(start_sidecar, policy(model_url, REDIS_URL, prefix), tmp_path)
    for sc in (first, second):
        await wait_until(lambda sc=sc: _connected(http, sc), timeout=10)
    async with http.post(first.admin_url + "/admin/breakers/model?action=open") as resp:
        assert resp.status == 200
    await wait_until(lambda: _state_is(http, second, State.OPEN), timeout=5)
    async with http.post(first.admin_url + "/admin/breakers/model?action=close") as resp:
        assert resp.status == 200
    # The second replica's open period ends now: its next call is its own probe, which closes.
    await wait_until(lambda: _next_probe_due(http, second), timeout=5)
    assert (await post(http, second))[0] == 200
    assert (await breaker(http, second))["state"] == State.CLOSED


async def test_with_redis_unreachable_both_replicas_keep_serving_locally(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    first, second = await pair(
        start_sidecar, policy(model_url, UNREACHABLE, "unreachable:"), tmp_path
    )
    for sc in (first, second):
        record = sc.rp.wait_for_log(lambda r: r.get("event") == "breaker_sync_unavailable")
        assert record["storage"] == UNREACHABLE and record["breakers"] == ["model"]
        for _ in range(3):
            assert (await post(http, sc))[0] == 200
        snap = await breaker(http, sc)
        assert snap["shared"]["connected"] is False and snap["shared"]["errors"] >= 1
        async with http.get(sc.admin_url + "/metrics") as resp:
            text = await resp.text()
        assert 'sidecar_breaker_sync_errors_total{operation="subscribe"}' in text

    # Each breaker still works on its own: the first opens, the second keeps serving.
    for _ in range(3):
        assert (await post(http, first, fault="status=500"))[0] == 500
    status, headers = await post(http, first)
    assert status == 503 and headers["x-sidecar-failure-mode"] == "circuit_open"
    assert (await post(http, second))[0] == 200
    assert (await breaker(http, second))["state"] == State.CLOSED


async def test_a_replica_that_connects_late_finds_the_open_circuit(prefix: str) -> None:
    """In process: an open published before a replica subscribed is found under its key."""
    clock = MonotonicClock()
    config = BreakerConfig(open_for=30, jitter=0, storage=REDIS_URL, storage_prefix=prefix)
    early = CircuitBreaker("model", config, clock)
    late = CircuitBreaker("model", config, clock)
    logs: list[tuple[str, dict[str, Any]]] = []
    first = BreakerSync(clock, log=_Log(logs))
    second = BreakerSync(clock, log=_Log(logs))
    first.register(early)
    await first.start()
    try:
        await wait_until(lambda: _true(early.sync is not None and early.sync["connected"]), 5)
        early.force("open")
        await wait_until(lambda: _true(early.sync is not None and early.sync["published"]), 5)
        second.register(late)
        await second.start()
        await wait_until(lambda: _true(late.state == State.OPEN), timeout=5)
        assert late.open_adopted and abs(late.open_until - early.open_until) < 0.1
        assert ("breaker_sync_connected", {"storage": REDIS_URL, "breakers": ["model"]}) in logs
    finally:
        await first.close()
        await second.close()


def test_passwords_never_leave_the_process() -> None:
    assert redact_url("redis://:s3cret@redis.internal:6380/1") == (
        "redis://:<redacted>@redis.internal:6380/1"
    )
    assert redact_url("rediss://user:pw@host/0") == "rediss://user:<redacted>@host/0"
    assert redact_url(REDIS_URL) == REDIS_URL


class _Log:
    def __init__(self, into: list[tuple[str, dict[str, Any]]]) -> None:
        self.into = into

    def __getattr__(self, level: str) -> Callable[..., None]:
        def log(event: str, **fields: Any) -> None:
            self.into.append((event, fields))

        return log


async def _true(value: bool) -> bool:
    return value


async def _connected(http: aiohttp.ClientSession, sc: SidecarProc) -> bool:
    return bool((await breaker(http, sc))["shared"]["connected"])


async def _state_is(http: aiohttp.ClientSession, sc: SidecarProc, state: str) -> bool:
    return bool((await breaker(http, sc))["state"] == state)


async def _next_probe_due(http: aiohttp.ClientSession, sc: SidecarProc) -> bool:
    snap = await breaker(http, sc)
    return snap["state"] != State.OPEN or snap["next_probe_in"] == 0


async def test_an_outage_is_logged_once_counted_every_time_and_never_blocks_the_breaker() -> None:
    """In process, no Redis needed: an unreachable store, retried with backoff."""
    clock = MonotonicClock()
    config = BreakerConfig(consecutive_failures=1, storage=UNREACHABLE, storage_prefix="x:")
    local = CircuitBreaker("model", config, clock)
    logs: list[tuple[str, dict[str, Any]]] = []
    errors: list[str] = []
    sync = BreakerSync(clock, log=_Log(logs), on_error=errors.append, retry_min=0.01)
    sync.register(local)
    await sync.start()
    try:
        await wait_until(lambda: _true(len(errors) >= 3), timeout=5)
        local.record_failure(local.admit())  # the breaker decides at once, Redis or not
        assert local.state == State.OPEN
        # Nothing is sent while the store is known to be away (the open is announced again on
        # reconnecting), so the request path never waits on it.
        await wait_until(lambda: _true(sync._links[UNREACHABLE].outbox.empty()), timeout=5)
    finally:
        started = time.monotonic()
        await sync.close()
        assert time.monotonic() - started < 1.5
    unavailable = [fields for event, fields in logs if event == "breaker_sync_unavailable"]
    assert len(unavailable) == 1 and unavailable[0]["storage"] == UNREACHABLE
    assert local.sync is not None and local.sync["connected"] is False
    assert local.sync["errors"] == len(errors) and "Error" in str(local.sync["last_error"])
    assert set(errors) == {"subscribe"}


class RedisOutage:
    """A TCP forwarder to the machine's Redis that the test takes down and brings back on the
    same port: to a client, Redis stopped and restarted."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._pumps: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def up(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        self._writers.clear()
        for pump in list(self._pumps):
            pump.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = urlsplit(REDIS_URL)
        up_reader, up_writer = await asyncio.open_connection(target.hostname, target.port or 6379)
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            pump = asyncio.ensure_future(self._pump(src, dst))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            # A peer hanging up or the relay being stopped ends the copy; nothing to report.
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
        finally:
            dst.close()


async def test_after_an_outage_a_replica_announces_the_opens_it_made_meanwhile(
    prefix: str,
) -> None:
    """In process: Redis goes away for one replica, which opens meanwhile; once Redis is back it
    tells the other, which was not told before."""
    outage = RedisOutage()
    await outage.up()
    clock = MonotonicClock()
    logs: list[tuple[str, dict[str, Any]]] = []

    def shared(url: str) -> CircuitBreaker:
        config = BreakerConfig(open_for=30, jitter=0, storage=url, storage_prefix=prefix)
        return CircuitBreaker("model", config, clock)

    cut, direct = shared(outage.url), shared(REDIS_URL)
    cut_sync = BreakerSync(clock, log=_Log(logs), retry_min=0.05, retry_max=0.2)
    direct_sync = BreakerSync(clock, log=_Log([]))
    cut_sync.register(cut)
    direct_sync.register(direct)
    await cut_sync.start()
    await direct_sync.start()
    try:
        for b in (cut, direct):
            await wait_until(lambda b=b: _true(b.sync is not None and b.sync["connected"]), 5)
        await outage.down()
        await wait_until(lambda: _true(cut.sync is not None and not cut.sync["connected"]), 5)
        cut.force("open")  # decided locally while Redis is away
        assert direct.state == State.CLOSED
        await outage.up()
        await wait_until(lambda: _true(direct.state == State.OPEN), timeout=5)
        assert direct.open_adopted
        events = [event for event, _ in logs]
        assert events.count("breaker_sync_unavailable") == 1
        assert events.index("breaker_sync_unavailable") < events.index("breaker_sync_restored")
    finally:
        await outage.down()
        await cut_sync.close()
        await direct_sync.close()
