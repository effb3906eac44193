"""Processes dying under the sidecar and the sidecar being stopped under load, for real.

- SIGKILL of the model's process group in the middle of an SSE stream: the caller sees a final
  `event: error` naming `stream_interrupted` and no `[DONE]`, the access log records it, and the
  sidecar keeps answering (now with `connect_error`, since nothing listens any more).
- SIGTERM of the sidecar with many requests in flight (delayed answers, and streams between two
  events): every one of them completes with 200 and a whole body, new connections are refused
  while it drains and after, and the process exits 0.

Every process runs in its own process group and is stopped in `finally`; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import SidecarFactory, simple_policy, write_policy
from tests.support.processes import RunningProcess, sidecar_cmd, start_process

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def own_model() -> AsyncIterator[RunningProcess]:
    """A demo model of this test's own, so killing it harms nobody else."""
    rp = start_process(sidecar_cmd("demo-model", "--port", "0"))
    rp.ready["url"] = "http://" + rp.ready["address"]
    try:
        yield rp
    finally:
        rp.stop()


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    """Bounded polling of an observable condition."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


def refused(address: str) -> bool:
    """True when a new TCP connection to `host:port` is refused."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


@pytest.mark.timeout(40)
async def test_sigkill_of_the_model_mid_stream_ends_the_stream_visibly(
    own_model: RunningProcess, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(simple_policy(own_model.ready["url"]))
    async with http.post(
        sc.url + "/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers={"x-demo-fault": "hold_after_first", "x-request-id": "killed-mid-stream"},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["x-sidecar-outcome"] == "ok"  # what was known at the first byte
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
        assert first.startswith(b"data: {")
        own_model.signal(signal.SIGKILL)
        assert own_model.proc.wait(5) == -signal.SIGKILL
        rest = await asyncio.wait_for(resp.content.read(), 10)
    assert b"[DONE]" not in rest
    assert rest.startswith(b"event: error\ndata: "), rest
    envelope = json.loads(rest.split(b"data: ", 1)[1].split(b"\n", 1)[0])["error"]
    assert envelope["failure_mode"] == "stream_interrupted"
    assert envelope["request_id"] == "killed-mid-stream"
    assert envelope["trace_id"] == resp.headers["x-trace-id"]

    record = sc.rp.wait_for_log(
        lambda r: r.get("event") == "request" and r.get("request_id") == "killed-mid-stream"
    )
    assert record["failure_mode"] == "stream_interrupted"
    assert record["outcome"] == "error"
    assert record["status"] == 200

    # The sidecar outlives its model and says why the next request fails.
    async with http.post(sc.url + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 502
        assert resp.headers["x-sidecar-failure-mode"] == "connect_error"
        assert (await resp.json())["error"]["failure_mode"] == "connect_error"
    assert sc.rp.proc.poll() is None


IN_FLIGHT = 40


async def one_request(
    http: aiohttp.ClientSession, url: str, i: int
) -> tuple[int, str | None, bytes]:
    """Three kinds in flight: answers delayed before the headers, SSE streams delayed before the
    headers, and SSE streams paused between their first and second event."""
    kind = i % 4
    payload: dict[str, Any] = {**CHAT, "stream": kind != 0 and kind != 1}
    fault = {0: "latency=2s", 1: "latency=1500ms", 2: "latency=2s", 3: "stall_mid_stream=2s"}[kind]
    headers = {"x-demo-fault": fault, "x-request-id": f"drain-{i}"}
    async with http.post(url + "/v1/chat/completions", json=payload, headers=headers) as resp:
        body = await resp.read()
        return resp.status, resp.headers.get("x-sidecar-outcome"), body


@pytest.mark.timeout(60)
async def test_sigterm_under_load_fails_no_in_flight_request(
    own_model: RunningProcess, tmp_path: Any, http: aiohttp.ClientSession
) -> None:
    # Its own model, so `in_flight` counts only this test's requests.
    model_url = own_model.ready["url"]
    path = write_policy(tmp_path, simple_policy(model_url))
    rp = start_process(
        sidecar_cmd("run", "--policy", str(path), "--port", "0", "--admin-port", "0"),
        env={"SIDECAR_STATE_DIR": str(tmp_path / "state"), "SIDECAR_DRAIN_GRACE": "20s"},
    )
    proxy, admin = rp.ready["proxy"], "http://" + rp.ready["admin"]
    url = "http://" + proxy
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as load:
            tasks = [asyncio.create_task(one_request(load, url, i)) for i in range(IN_FLIGHT)]

            async def all_in_flight() -> bool:
                async with http.get(model_url + "/_demo/stats") as r:
                    return int((await r.json())["in_flight"]) >= IN_FLIGHT

            await wait_until(all_in_flight)
            rp.signal(signal.SIGTERM)
            rp.wait_for_log(lambda r: r.get("event") == "draining")
            async with http.get(admin + "/readyz") as resp:
                assert resp.status == 503

            # While the in-flight requests drain, the proxy takes no new connection.
            async def refusing() -> bool:
                return await asyncio.to_thread(refused, proxy)

            await wait_until(refusing)
            assert not all(t.done() for t in tasks), "the drain ended before it could be seen"

            results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert rp.proc.wait(20) == 0
    finally:
        rp.stop()

    for i, (status, outcome, body) in enumerate(results):
        assert status == 200, (i, status, body[:200])
        assert outcome == "ok", (i, outcome)
        if i % 4 in (0, 1):
            assert json.loads(body)["choices"][0]["message"]["content"]
        else:
            assert body.rstrip().endswith(b"data: [DONE]"), (i, body[-200:])
            assert b"event: error" not in body
    assert refused(proxy)  # and after the exit
    logged = [
        r
        for r in rp.records()
        if r.get("event") == "request" and str(r.get("request_id")).startswith("drain-")
    ]
    assert len(logged) == IN_FLIGHT
    assert {r["status"] for r in logged} == {200}
    assert rp.records()[-1].get("event") == "stopped"
