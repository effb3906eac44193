"""`sidecar demo-model` as a real process, driven by real aiohttp clients over loopback.

Each fault's observable effect, the global fault schedule, stats, the OpenAI and KServe V2 formats
and the proxy-test helpers. One server serves the module; every test starts from a clean slate
(no global faults, no held streams, zeroed stats). SSE pacing's exact schedule is checked on the
app served in-process with a fake clock; the real process only shows its lower bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import math
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web

from sidecar.cli import build_parser
from sidecar.clock import FakeClock
from sidecar.demo.server import create_app
from tests.support.processes import RunningProcess, sidecar_cmd, start_process

CUT = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)
ANSWER = "Hello from the fault-injecting demo model."


@pytest.fixture(scope="module")
def demo() -> Iterator[RunningProcess]:
    rp = start_process(sidecar_cmd("demo-model", "--port", "0"))
    try:
        yield rp
    finally:
        rp.stop()
    # Resets and cancelled requests must be quiet: no tracebacks, no aiohttp error logs.
    noise = [line for line in rp.lines if "Traceback" in line or "Error handling" in line]
    assert not noise, "\n".join(rp.lines)


@pytest.fixture
def base(demo: RunningProcess) -> str:
    return f"http://{demo.ready['address']}"


@pytest.fixture
async def http(base: str) -> AsyncIterator[aiohttp.ClientSession]:
    # force_close: a reset never hits a pooled connection (aiohttp would retry it silently).
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as session:
        async with session.delete("/_demo/faults") as resp:
            assert resp.status == 200
        async with session.post("/_demo/release") as resp:
            assert resp.status == 200
        async with session.post("/_demo/stats/reset") as resp:
            assert resp.status == 200
        yield session


def fault(spec: str) -> dict[str, str]:
    return {"x-demo-fault": spec}


async def read_event(resp: aiohttp.ClientResponse) -> str:
    """One SSE event's `data:` payload."""
    data: list[str] = []
    while True:
        line = await resp.content.readline()
        if not line:
            raise EOFError("stream ended inside an event")
        text = line.decode().rstrip("\r\n")
        if text == "":
            if data:
                return "\n".join(data)
            continue
        if text.startswith("data: "):
            data.append(text[len("data: ") :])


async def read_events(resp: aiohttp.ClientResponse) -> list[str]:
    events = []
    while True:
        event = await read_event(resp)
        events.append(event)
        if event == "[DONE]":
            assert await resp.content.read() == b""
            return events


async def get_json(http: aiohttp.ClientSession, path: str) -> Any:
    async with http.get(path) as resp:
        assert resp.status == 200
        return await resp.json()


async def add_fault(http: aiohttp.ClientSession, **payload: Any) -> None:
    async with http.post("/_demo/faults", json=payload) as resp:
        assert resp.status == 200, await resp.text()


# --- start-up and shutdown ---------------------------------------------------------------------


def test_listening_line_names_the_bound_port(demo: RunningProcess) -> None:
    host, _, port = demo.ready["address"].rpartition(":")
    assert host == "127.0.0.1"
    assert int(port) > 0
    assert sum(1 for r in demo.records() if r.get("event") == "listening") == 1


async def test_sigterm_exits_cleanly_with_a_hung_request() -> None:
    rp = start_process(sidecar_cmd("demo-model", "--port", "0"))
    try:
        base = f"http://{rp.ready['address']}"
        async with aiohttp.ClientSession(base, timeout=aiohttp.ClientTimeout(total=10)) as http:

            async def hang() -> None:
                async with http.get("/healthz", headers=fault("hang")) as resp:
                    await resp.read()

            hung = asyncio.create_task(hang())
            deadline = time.monotonic() + 5
            while (await get_json(http, "/_demo/stats"))["in_flight"] != 1:
                assert time.monotonic() < deadline, "the hung request never arrived"
                await asyncio.sleep(0.02)  # polling interval
            rp.signal(signal.SIGTERM)
            with pytest.raises(CUT):
                await hung
        assert await asyncio.to_thread(rp.proc.wait, 10) == 0
    finally:
        rp.stop()
    assert not any("Traceback" in line for line in rp.lines)
    assert rp.records()[-1]["event"] == "stopping"


# --- OpenAI-style ------------------------------------------------------------------------------


async def test_chat_completion_json(http: aiohttp.ClientSession) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with http.post("/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        data = await resp.json()
    assert data["object"] == "chat.completion"
    assert data["model"] == "m"
    assert isinstance(data["id"], str) and isinstance(data["created"], int)
    choice = data["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": ANSWER}
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] is None
    assert data["usage"]["total_tokens"] == (
        data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]
    )


async def test_chat_stream_is_sse_ending_with_done(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/chat/completions", json={"stream": True}) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        events = await read_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert 5 <= len(chunks) <= 8
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == ANSWER
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_completions_json_and_stream(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/completions", json={"prompt": "say hi"}) as resp:
        data = await resp.json()
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == ANSWER
    async with http.post("/v1/completions", json={"prompt": "hi", "stream": True}) as resp:
        assert resp.content_type == "text/event-stream"
        events = await read_events(resp)
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == ANSWER


async def test_chat_logprobs_equal_ln_confidence(http: aiohttp.ClientSession) -> None:
    body = {"logprobs": True, "top_logprobs": 2}
    headers = fault("confidence=0.42")
    async with http.post("/v1/chat/completions", json=body, headers=headers) as resp:
        data = await resp.json()
    content = data["choices"][0]["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == ANSWER
    for entry in content:
        assert entry["logprob"] == pytest.approx(math.log(0.42))
        assert bytes(entry["bytes"]).decode() == entry["token"]
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["token"] == entry["token"]
    # Default confidence, streamed: logprobs in every content chunk.
    async with http.post("/v1/chat/completions", json={"stream": True, "logprobs": True}) as resp:
        chunks = [json.loads(e) for e in (await read_events(resp))[:-1]]
    with_tokens = [c for c in chunks if c["choices"][0]["delta"].get("content")]
    assert len(with_tokens) >= 5
    for chunk in with_tokens:
        (entry,) = chunk["choices"][0]["logprobs"]["content"]
        assert entry["logprob"] == pytest.approx(math.log(0.95))


async def test_completion_logprobs_equal_ln_confidence(http: aiohttp.ClientSession) -> None:
    body = {"prompt": "hi", "logprobs": 2}
    async with http.post("/v1/completions", json=body, headers=fault("confidence=0.3")) as resp:
        logprobs = (await resp.json())["choices"][0]["logprobs"]
    assert "".join(logprobs["tokens"]) == ANSWER
    assert logprobs["token_logprobs"] == pytest.approx([math.log(0.3)] * len(logprobs["tokens"]))
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0
    headers = fault("confidence=0.3")
    async with http.post("/v1/completions", json={**body, "stream": True}, headers=headers) as resp:
        chunks = [json.loads(e) for e in (await read_events(resp))[:-1]]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["text"]]
    assert streamed and all(
        lp["token_logprobs"] == [pytest.approx(math.log(0.3))] for lp in streamed
    )


# --- KServe V2 ---------------------------------------------------------------------------------


async def test_kserve_infer_default_and_confidence(http: aiohttp.ClientSession) -> None:
    async with http.post("/v2/models/fraud/infer", json={"inputs": []}) as resp:
        data = await resp.json()
    assert data["model_name"] == "fraud"
    assert isinstance(data["id"], str)
    (output,) = data["outputs"]
    assert output["name"] == "predict_proba"
    assert output["datatype"] == "FP64"
    assert output["shape"] == [1, 2]
    assert max(output["data"]) == pytest.approx(0.95)
    body = {"inputs": [{"name": "x", "shape": [3, 2], "datatype": "FP64", "data": [1] * 6}]}
    async with http.post("/v2/models/fraud/infer", json=body, headers=fault("confidence=0.7")) as r:
        output = (await r.json())["outputs"][0]
    assert output["shape"] == [3, 2]
    assert output["data"] == pytest.approx([0.7, 0.3] * 3)


async def test_kserve_metadata_and_health(http: aiohttp.ClientSession) -> None:
    assert (await get_json(http, "/v2/models/fraud"))["name"] == "fraud"
    await get_json(http, "/v2/health/ready")
    await get_json(http, "/healthz")


# --- faults before the response ----------------------------------------------------------------


async def test_latency_delays_the_response(http: aiohttp.ClientSession) -> None:
    start = time.monotonic()
    async with http.get("/healthz", headers=fault("latency=300ms")) as resp:
        assert resp.status == 200
    assert time.monotonic() - start >= 0.3


async def test_hang_never_answers(http: aiohttp.ClientSession) -> None:
    with pytest.raises(asyncio.TimeoutError):
        async with http.get("/healthz", headers=fault("hang"), timeout=aiohttp.ClientTimeout(0.5)):
            pass


async def test_reset_closes_without_a_response(http: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.post("/v1/chat/completions", json={}, headers=fault("reset")):
            pass
    # The server is fine afterwards.
    await get_json(http, "/healthz")


async def test_status_with_and_without_retry_after(http: aiohttp.ClientSession) -> None:
    headers = fault("status=503,retry_after=1s")
    async with http.post("/v1/chat/completions", json={}, headers=headers) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["code"] == 503
    async with http.get("/healthz", headers=fault("status=429")) as resp:
        assert resp.status == 429
        assert "Retry-After" not in resp.headers


async def test_malformed_json_and_empty(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/completions", json={}, headers=fault("malformed_json")) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        with pytest.raises(ValueError):
            json.loads(await resp.read())
    async with http.post("/v2/models/m/infer", json={}, headers=fault("empty")) as resp:
        assert resp.status == 200
        assert await resp.read() == b""


async def test_bad_fault_header_is_400_naming_the_item(http: aiohttp.ClientSession) -> None:
    async with http.get("/healthz", headers=fault("latency=10ms,explode")) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["item"] == "explode"
    assert "explode" in error["message"]


# --- faults in the body ------------------------------------------------------------------------


async def test_first_byte_delay_sends_headers_then_waits(http: aiohttp.ClientSession) -> None:
    start = time.monotonic()
    headers = fault("first_byte_delay=400ms")
    async with http.post("/v1/chat/completions", json={"stream": True}, headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        events = await read_events(resp)
    assert time.monotonic() - start >= 0.4
    assert events[-1] == "[DONE]"
    start = time.monotonic()
    async with http.get("/bytes/10", headers=fault("first_byte_delay=300ms")) as resp:
        assert resp.status == 200
        assert await resp.read() == bytes(range(10))
    assert time.monotonic() - start >= 0.3


async def test_reset_mid_stream_sends_headers_then_cuts(http: aiohttp.ClientSession) -> None:
    headers = fault("reset_mid_stream")
    async with http.post("/v1/chat/completions", json={"stream": True}, headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        first = json.loads(await read_event(resp))
        assert first["choices"][0]["delta"]["content"] == "Hello"
        with pytest.raises(CUT):
            await resp.content.read()


async def test_reset_mid_body_of_a_plain_response(http: aiohttp.ClientSession) -> None:
    async with http.get("/bytes/100000", headers=fault("reset_mid_stream")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "100000"
        with pytest.raises(CUT):
            await resp.read()


async def test_stall_mid_stream_pauses_after_the_first_event(http: aiohttp.ClientSession) -> None:
    headers = fault("stall_mid_stream=500ms")
    start = time.monotonic()
    async with http.post("/v1/completions", json={"stream": True}, headers=headers) as resp:
        assert resp.status == 200
        first = json.loads(await read_event(resp))
        events = await read_events(resp)
    # The stall starts once the first event is written, so only the whole stream is timed.
    assert time.monotonic() - start >= 0.5
    assert first["choices"][0]["text"] == "Hello"
    assert len(events) >= 5 and events[-1] == "[DONE]"


async def test_hold_after_first_waits_for_release(http: aiohttp.ClientSession) -> None:
    headers = fault("hold_after_first")
    async with http.post("/v1/chat/completions", json={"stream": True}, headers=headers) as resp:
        json.loads(await read_event(resp))
        rest = asyncio.create_task(read_events(resp))
        done, _ = await asyncio.wait({rest}, timeout=0.3)
        assert not done, "a held stream finished without a release"
        async with http.post("/_demo/release") as rel:
            assert (await rel.json())["released"] == 1
        events = await asyncio.wait_for(rest, 5)
    assert events[-1] == "[DONE]"


# --- pacing: chunk_interval --------------------------------------------------------------------


def chat_events_in_order(events: list[str]) -> None:
    """Six tokens, the finish chunk, then `[DONE]`: the whole answer, nothing lost or reordered."""
    assert len(events) == 8
    chunks = [json.loads(e)["choices"][0] for e in events[:7]]
    assert "".join(c["delta"].get("content", "") for c in chunks) == ANSWER
    assert [c["finish_reason"] for c in chunks] == [None] * 6 + ["stop"]
    assert events[7] == "[DONE]"


async def test_chunk_interval_spaces_the_events(http: aiohttp.ClientSession) -> None:
    headers = fault("chunk_interval=50ms")
    start = time.monotonic()
    async with http.post("/v1/chat/completions", json={"stream": True}, headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        events = await read_events(resp)
    # The server waits 50 ms before each of the 7 events after the first; a lower bound only.
    assert time.monotonic() - start >= 7 * 0.05 - 1e-6
    chat_events_in_order(events)


async def test_chunk_interval_flag_paces_every_stream_without_counting_a_fault() -> None:
    rp = start_process(sidecar_cmd("demo-model", "--port", "0", "--chunk-interval", "50ms"))
    try:
        base = f"http://{rp.ready['address']}"
        async with aiohttp.ClientSession(base, timeout=aiohttp.ClientTimeout(total=10)) as http:
            start = time.monotonic()
            async with http.post("/v1/completions", json={"stream": True}) as resp:
                events = await read_events(resp)
            assert time.monotonic() - start >= 7 * 0.05 - 1e-6
            assert len(events) == 8 and events[-1] == "[DONE]"
            stats = await get_json(http, "/_demo/stats")
        assert (stats["requests"], stats["faulted"]) == (1, 0)
    finally:
        rp.stop()


def test_chunk_interval_flag_needs_a_unit(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["demo-model", "--chunk-interval", "1.5s"])
    assert args.chunk_interval == 1.5
    assert build_parser().parse_args(["demo-model"]).chunk_interval == 0.0
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["demo-model", "--chunk-interval", "20"])
    assert info.value.code == 2
    assert "is not a duration" in capsys.readouterr().err


@contextlib.asynccontextmanager
async def serve_in_process(app: web.Application) -> AsyncIterator[aiohttp.ClientSession]:
    """`app` on a free loopback port, with a client session for it."""
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(f"http://{host}:{port}", timeout=timeout) as http:
            yield http
    finally:
        await runner.cleanup()


@pytest.fixture
async def paced() -> AsyncIterator[tuple[FakeClock, aiohttp.ClientSession]]:
    """The demo app with `chunk_interval=50ms` and a fake clock: its waits are recorded in
    `clock.sleeps` and take no time."""
    clock = FakeClock()
    async with serve_in_process(create_app(sleep=clock.sleep, chunk_interval=0.05)) as http:
        yield clock, http


async def _stream(http: aiohttp.ClientSession, clock: FakeClock, **kw: Any) -> None:
    """Read one whole chat stream, the recorded waits cleared first."""
    clock.sleeps.clear()
    async with http.post("/v1/chat/completions", json={"stream": True}, **kw) as resp:
        assert resp.status == 200
        chat_events_in_order(await read_events(resp))


class GatedSleep:
    """A sleep that hands each call to the test and returns only when the test wakes it."""

    def __init__(self) -> None:
        self.calls: asyncio.Queue[tuple[float, asyncio.Future[None]]] = asyncio.Queue()

    async def __call__(self, seconds: float) -> None:
        wake = asyncio.get_running_loop().create_future()
        await self.calls.put((seconds, wake))
        await wake


async def test_each_event_after_the_first_waits_for_its_own_interval() -> None:
    # Lockstep: while the server sits in its k-th wait, event k has not come; once woken, it
    # does. Waiting 7 times and then sending a burst never delivers event 1 (wait_for fails);
    # sending a burst and then waiting shows event k early (the short look can only miss that,
    # never fail a server that paces).
    gate = GatedSleep()
    async with serve_in_process(create_app(sleep=gate, chunk_interval=0.05)) as http:
        body = {"stream": True}
        async with http.post("/v1/chat/completions", json=body) as resp:
            events = [await asyncio.wait_for(read_event(resp), 5)]
            for k in range(1, 8):
                seconds, wake = await asyncio.wait_for(gate.calls.get(), 5)
                assert seconds == 0.05
                nxt = asyncio.create_task(read_event(resp))
                done, _ = await asyncio.wait({nxt}, timeout=0.05)
                assert not done, f"event {k} came while the server was still waiting"
                wake.set_result(None)
                events.append(await asyncio.wait_for(nxt, 5))
            assert await resp.content.read() == b""
        assert gate.calls.empty()
    chat_events_in_order(events)


async def test_default_pacing_waits_before_each_event_after_the_first(
    paced: tuple[FakeClock, aiohttp.ClientSession],
) -> None:
    clock, http = paced
    await _stream(http, clock)
    assert clock.sleeps == [0.05] * 7
    clock.sleeps.clear()
    async with http.post("/v1/completions", json={"stream": True}) as resp:
        assert len(await read_events(resp)) == 8
    assert clock.sleeps == [0.05] * 7
    clock.sleeps.clear()
    async with http.post("/v1/chat/completions", json={}) as resp:  # JSON: nothing to pace
        assert (await resp.json())["choices"][0]["message"]["content"] == ANSWER
    assert clock.sleeps == []
    assert (await get_json(http, "/_demo/stats"))["faulted"] == 0


async def test_a_fault_overrides_the_default_pacing_header_first(
    paced: tuple[FakeClock, aiohttp.ClientSession],
) -> None:
    clock, http = paced
    await _stream(http, clock, headers=fault("chunk_interval=20ms"))
    assert clock.sleeps == [0.02] * 7
    await _stream(http, clock, headers=fault("chunk_interval=0ms"))
    assert clock.sleeps == []
    await add_fault(http, spec="chunk_interval=10ms", count=2)
    await _stream(http, clock)
    assert clock.sleeps == [0.01] * 7
    await _stream(http, clock, headers=fault("chunk_interval=30ms"))
    assert clock.sleeps == [0.03] * 7
    await _stream(http, clock)  # the global fault is used up: the default again
    assert clock.sleeps == [0.05] * 7


async def test_pacing_comes_after_the_first_event_faults(
    paced: tuple[FakeClock, aiohttp.ClientSession],
) -> None:
    clock, http = paced
    await _stream(http, clock, headers=fault("first_byte_delay=1s,stall_mid_stream=2s"))
    assert clock.sleeps == [1.0, 2.0] + [0.05] * 7


# --- global faults -----------------------------------------------------------------------------


async def test_global_count(http: aiohttp.ClientSession) -> None:
    await add_fault(http, spec="status=503", count=2)
    assert (await get_json(http, "/_demo/faults"))["faults"][0]["remaining"] == 2
    statuses = []
    for _ in range(3):
        async with http.get("/healthz") as resp:
            statuses.append(resp.status)
    assert statuses == [503, 503, 200]
    assert (await get_json(http, "/_demo/faults"))["faults"] == []


async def test_global_seconds(http: aiohttp.ClientSession) -> None:
    start = time.monotonic()
    await add_fault(http, spec="status=500", seconds=0.5)
    async with http.get("/healthz") as resp:
        assert resp.status == 500
    deadline = time.monotonic() + 5
    while True:
        async with http.get("/healthz") as resp:
            if resp.status == 200:
                break
            assert resp.status == 500
        assert time.monotonic() < deadline, "the timed fault never ended"
        await asyncio.sleep(0.05)  # polling interval
    assert time.monotonic() - start >= 0.5


async def test_global_rate(http: aiohttp.ClientSession) -> None:
    await add_fault(http, spec="status=500", rate=0.5)
    statuses = []
    for _ in range(40):
        async with http.get("/healthz") as resp:
            statuses.append(resp.status)
    assert set(statuses) == {200, 500}


async def test_global_faults_stack_with_the_header(http: aiohttp.ClientSession) -> None:
    await add_fault(http, spec="latency=200ms", count=1)
    await add_fault(http, spec="confidence=0.6", count=1)
    start = time.monotonic()
    async with http.post("/v2/models/m/infer", json={}, headers=fault("latency=100ms")) as resp:
        data = await resp.json()
    assert time.monotonic() - start >= 0.3
    assert data["outputs"][0]["data"] == pytest.approx([0.6, 0.4])


async def test_global_fault_errors_and_clear(http: aiohttp.ClientSession) -> None:
    async with http.post("/_demo/faults", data=b"{nope") as resp:
        assert resp.status == 400
        assert "JSON" in (await resp.json())["error"]["message"]
    async with http.post("/_demo/faults", json={"spec": "bogus", "count": 1}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["item"] == "bogus"
    await add_fault(http, spec="status=503", count=5)
    await add_fault(http, spec="latency=1s", seconds=30)
    assert len((await get_json(http, "/_demo/faults"))["faults"]) == 2
    async with http.delete("/_demo/faults") as resp:
        assert (await resp.json())["cleared"] == 2
    async with http.get("/healthz") as resp:
        assert resp.status == 200


# --- stats -------------------------------------------------------------------------------------


async def test_stats_count_arrivals_and_keep_last_headers(http: aiohttp.ClientSession) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with http.get("/healthz", headers=fault("status=503")) as resp:
        assert resp.status == 503
    async with http.post("/v1/chat/completions", json={}, headers={"traceparent": traceparent}):
        pass
    stats = await get_json(http, "/_demo/stats")
    assert stats["requests"] == 2
    assert stats["by_path"] == {"/healthz": 1, "/v1/chat/completions": 1}
    assert stats["in_flight"] == 0
    assert stats["last_headers"]["traceparent"] == traceparent
    async with http.post("/_demo/stats/reset") as resp:
        assert resp.status == 200
    assert (await get_json(http, "/_demo/stats"))["requests"] == 0


# --- proxy-test helpers ------------------------------------------------------------------------


async def test_echo_reports_the_request(http: aiohttp.ClientSession) -> None:
    body = b"x" * 5000
    headers = {"X-First": "1", "x-second": "2"}
    url = yarl.URL("/echo/a/b?q=1&r=%2F", encoded=True)
    async with http.put(url, data=body, headers=headers) as resp:
        data = await resp.json()
    assert data["method"] == "PUT"
    assert data["path"] == "/echo/a/b?q=1&r=%2F"
    names = [name for name, _ in data["headers"]]
    assert names.index("X-First") < names.index("x-second")
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert data["body_len"] == 5000


async def test_redirect_cookie_gzip_bytes_and_404(http: aiohttp.ClientSession, base: str) -> None:
    async with http.get("/redirect", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "http://127.0.0.1:1/elsewhere"
    async with http.get("/set-cookie") as resp:
        assert resp.headers["Set-Cookie"] == "session=secret; Path=/"
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        async with raw.get(f"{base}/gzip") as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            first = await resp.read()
        async with raw.get(f"{base}/gzip") as resp:
            assert await resp.read() == first
    json.loads(gzip.decompress(first))
    async with http.get("/bytes/1000") as resp:
        data = await resp.read()
    assert data == bytes(i % 256 for i in range(1000))
    async with http.get("/no/such/path") as resp:
        assert resp.status == 404
        assert "error" in await resp.json()
