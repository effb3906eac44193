"""The fault-injecting demo model: an aiohttp app that plays a model server for examples and tests.

It answers like an OpenAI-compatible server (`/v1/chat/completions`, `/v1/completions`, JSON or
SSE, optional logprobs) and like a KServe V2 server (`/v2/models/{name}/infer`), and offers a few
helpers for proxy tests (`/echo/...`, `/redirect`, `/set-cookie`, `/gzip`, `/bytes/{n}`).

Faults come from the `x-demo-fault: SPEC` request header and from global faults registered through
`/_demo/faults` (see `sidecar.demo.faults`); both stack, the header first. They apply to every path
(health checks included) except `/_demo/*`, the control plane, which is never faulted and never
counted in `/_demo/stats`. Before the response: latency, hang, reset, status, empty,
malformed_json. After the headers: first_byte_delay. After the first chunk (an SSE event, or the
first half of any other body): reset_mid_stream, stall_mid_stream, hold_after_first. Before each
SSE event after the first: chunk_interval, the pacing of a model generating tokens; the server-wide
default (`--chunk-interval`) applies when no fault sets it, and is not counted as a fault.

`main(host, port)` runs it until SIGINT/SIGTERM (`sidecar demo-model`); `create_app()` builds the
same app for in-process use. All state lives in the app (`web.AppKey`s).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import math
import random
import signal
import socket
import struct
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from sidecar.demo.faults import FaultSchedule, FaultSpec, FaultSpecError, parse_spec

__all__ = [
    "DEFAULT_CONFIDENCE",
    "FAULT_HEADER",
    "HoldGate",
    "Stats",
    "create_app",
    "main",
]

FAULT_HEADER = "x-demo-fault"
DEFAULT_CONFIDENCE = 0.95
MODEL_NAME = "demo-model"
#: The canned answer, one SSE chunk per token.
ANSWER_TOKENS = ("Hello", " from", " the", " fault-injecting", " demo", " model.")
_ALTERNATIVE_TOKENS = (" maybe", " perhaps", " a", " it", " this", " that", " so", " and")
_MIN_PROBABILITY = 1e-9  # ln(0) is not JSON; confidence=0 reports this instead
_MAX_BYTES = 64 * 1024 * 1024
_MAX_ROWS = 10_000
_GZIP_PLAIN = b'{"message": "this body was gzip-compressed by the demo model"}\n'
_MALFORMED_JSON = b'{"id": "demo-malformed", "choices": [{"text": "cut off here'
_JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Sleep = Callable[[float], Awaitable[None]]


@dataclass
class Stats:
    """Requests seen by the model endpoints (everything except `/_demo/*`), counted on arrival."""

    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    faulted: int = 0
    by_path: Counter[str] = field(default_factory=Counter)
    last_request: dict[str, str] | None = None
    last_headers: dict[str, str] = field(default_factory=dict)

    def arrive(self, request: web.Request) -> None:
        self.requests += 1
        self.by_path[request.path] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.last_request = {"method": request.method, "path": request.raw_path}
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self.last_headers = headers

    def reset(self) -> None:
        """Zero the counters; requests still in flight stay counted in `in_flight`."""
        self.requests = self.faulted = 0
        self.max_in_flight = self.in_flight
        self.by_path.clear()
        self.last_request = None
        self.last_headers = {}

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "faulted": self.faulted,
            "by_path": dict(self.by_path),
            "last_request": self.last_request,
            "last_headers": self.last_headers,
        }


class HoldGate:
    """Streams with `hold_after_first` wait here until `release()` (POST /_demo/release)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._waiting = 0
        self._closed = False

    async def wait(self) -> None:
        if self._closed:
            return
        event = self._event
        self._waiting += 1
        try:
            await event.wait()
        finally:
            if not event.is_set():  # the client went away before the release
                self._waiting -= 1

    def release(self) -> int:
        """Let every held stream finish; returns how many were held."""
        released, self._waiting = self._waiting, 0
        self._event.set()
        self._event = asyncio.Event()
        return released

    def close(self) -> None:
        """Release everything now and never hold again (shutdown)."""
        self._closed = True
        self.release()


SCHEDULE = web.AppKey("demo_schedule", FaultSchedule)
STATS = web.AppKey("demo_stats", Stats)
GATE = web.AppKey("demo_gate", HoldGate)
SHUTDOWN = web.AppKey("demo_shutdown", asyncio.Event)
SLEEP: web.AppKey[Sleep] = web.AppKey("demo_sleep")
CHUNK_INTERVAL = web.AppKey("demo_chunk_interval", float)
FAULT = web.RequestKey("demo_fault", FaultSpec)


class _RequestError(Exception):
    """A bad request to the demo model itself; answered as a 400 JSON error."""

    def __init__(self, message: str, *, status: int = 400, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


# --- responses ---------------------------------------------------------------------------------


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _json_error(
    status: int,
    message: str,
    code: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    error = {"message": message, "type": "demo_error", "code": code, **extra}
    return web.Response(
        status=status, body=_dumps({"error": error}), content_type=_JSON, headers=headers
    )


def _reset(request: web.Request, *, hard: bool) -> None:
    """Close the connection without a (complete) response. `hard` sends a TCP RST.

    A soft reset is a plain close: bytes already handed to the kernel still arrive, then EOF, so a
    client sees the headers and first chunk before the cut."""
    transport = request.transport
    if transport is None:
        return
    if hard:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _after_first_chunk(request: web.Request, fault: FaultSpec) -> bool:
    """Apply the mid-body faults; False when the connection was cut (write nothing more)."""
    if fault.reset_mid_stream:
        _reset(request, hard=False)
        return False
    if fault.stall_mid_stream > 0:
        await request.app[SLEEP](fault.stall_mid_stream)
    if fault.hold_after_first:
        await request.app[GATE].wait()
    return True


async def _send(
    request: web.Request,
    body: bytes,
    *,
    status: int = 200,
    content_type: str = _JSON,
    headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """Send a whole body; with a mid-body fault, send the first half, apply it, then the rest."""
    fault = request.get(FAULT, FaultSpec())
    if not fault.mid_body or not body:
        return web.Response(status=status, body=body, content_type=content_type, headers=headers)
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_type = content_type
    resp.content_length = len(body)
    await resp.prepare(request)  # a StreamResponse sends its headers at once
    if fault.first_byte_delay > 0:
        await request.app[SLEEP](fault.first_byte_delay)
    cut = max(1, len(body) // 2)
    await resp.write(body[:cut])
    if not await _after_first_chunk(request, fault):
        return resp
    await resp.write(body[cut:])
    await resp.write_eof()
    return resp


async def _send_sse(request: web.Request, events: Sequence[object]) -> web.StreamResponse:
    """Send `data: {json}` events then `data: [DONE]`; mid-body faults act after the first.

    Every event after the first, `[DONE]` included, waits `chunk_interval` before it is written:
    a wait after the previous write, not a fixed timetable, so no two events leave closer together
    than the interval (the tests rely on that lower bound)."""
    fault = request.get(FAULT, FaultSpec())
    sleep = request.app[SLEEP]
    interval = fault.chunk_interval
    if interval is None:
        interval = request.app[CHUNK_INTERVAL]
    resp = web.StreamResponse(status=200, headers={"Cache-Control": "no-cache"})
    resp.content_type = "text/event-stream"
    await resp.prepare(request)
    if fault.first_byte_delay > 0:
        await sleep(fault.first_byte_delay)
    payloads = [b"data: " + _dumps(event) + b"\n\n" for event in events]
    payloads.append(b"data: [DONE]\n\n")
    for index, payload in enumerate(payloads):
        if index > 0 and interval > 0:
            await sleep(interval)
        await resp.write(payload)
        if index == 0 and not await _after_first_chunk(request, fault):
            return resp
    await resp.write_eof()
    return resp


async def _read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; an empty body counts as `{}`."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _RequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise _RequestError("request body must be a JSON object")
    return payload


# --- middleware: stats and faults --------------------------------------------------------------


def _is_control(request: web.Request) -> bool:
    return request.path == "/_demo" or request.path.startswith("/_demo/")


async def _run(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Call the handler, answering our own and aiohttp's HTTP errors as JSON."""
    try:
        return await handler(request)
    except _RequestError as exc:
        return _json_error(exc.status, exc.message, exc.code)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        code = "not_found" if exc.status == 404 else f"http_{exc.status}"
        message = f"{exc.reason}: {request.method} {request.path}"
        return _json_error(exc.status, message, code, headers=headers)


async def _apply_faults(
    request: web.Request, handler: Handler, fault: FaultSpec
) -> web.StreamResponse:
    """Faults before the response, in order: latency, hang, reset, status, empty, malformed."""
    if fault.latency > 0:
        await request.app[SLEEP](fault.latency)
    if fault.hang:
        await request.app[SHUTDOWN].wait()  # or the client leaves and cancels this handler
        _reset(request, hard=True)
        return web.Response()  # never written: the transport is closed
    if fault.reset:
        _reset(request, hard=True)
        return web.Response()
    if fault.status is not None:
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(math.ceil(fault.retry_after))
        body = {
            "message": f"demo fault: status {fault.status}",
            "type": "demo_fault",
            "code": fault.status,
        }
        return await _send(request, _dumps({"error": body}), status=fault.status, headers=headers)
    if fault.empty:
        return web.Response(status=200, body=b"", content_type=_JSON)
    if fault.malformed_json:
        return await _send(request, _MALFORMED_JSON)
    return await _run(request, handler)


@web.middleware
async def _demo_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if _is_control(request):
        return await _run(request, handler)
    app = request.app
    stats = app[STATS]
    stats.arrive(request)
    try:
        try:
            own = parse_spec(",".join(request.headers.getall(FAULT_HEADER, [])))
        except FaultSpecError as exc:
            return _json_error(
                400, f"bad {FAULT_HEADER} header: {exc.message}", "invalid_fault", item=exc.item
            )
        fault = own.combine(app[SCHEDULE].draw())
        if not fault.is_empty:
            stats.faulted += 1
        request[FAULT] = fault
        return await _apply_faults(request, handler, fault)
    finally:
        stats.in_flight -= 1


# --- OpenAI-style endpoints --------------------------------------------------------------------


def _confidence(request: web.Request) -> float:
    fault = request.get(FAULT, FaultSpec())
    return DEFAULT_CONFIDENCE if fault.confidence is None else fault.confidence


def _logprob(probability: float) -> float:
    return math.log(max(probability, _MIN_PROBABILITY))


def _alternatives(token: str, count: int, confidence: float) -> list[tuple[str, float]]:
    """`count` tokens the model did not pick. They share the probability the pick left over but
    never rank above it, so the picked token always comes first in `top_logprobs`."""
    if count <= 0:
        return []
    logprob = _logprob(min(confidence, (1.0 - confidence) / count))
    alts = [t for t in _ALTERNATIVE_TOKENS if t != token][:count]
    return [(alt, logprob) for alt in alts]


def _int_param(payload: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = payload.get(name)
    if value is None or value is False:
        return None
    if value is True:
        return low
    if not isinstance(value, int) or not low <= value <= high:
        raise _RequestError(f"{name} must be an integer from {low} to {high}")
    return value


def _chat_logprobs(tokens: Sequence[str], confidence: float, top: int) -> dict[str, Any]:
    lp = _logprob(confidence)
    content = []
    for token in tokens:
        candidates = [(token, lp), *_alternatives(token, top - 1, confidence)][:top]
        candidates.sort(key=lambda c: -c[1])
        content.append(
            {
                "token": token,
                "logprob": lp,
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": p, "bytes": list(t.encode())} for t, p in candidates
                ],
            }
        )
    return {"content": content}


def _completion_logprobs(
    tokens: Sequence[str], confidence: float, top: int, offset: int
) -> dict[str, Any]:
    lp = _logprob(confidence)
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": list(tokens),
        "token_logprobs": [lp for _ in tokens],
        "top_logprobs": [
            dict([(token, lp), *_alternatives(token, max(top, 1) - 1, confidence)])
            for token in tokens
        ],
        "text_offset": offsets,
    }


def _usage(prompt: str) -> dict[str, int]:
    prompt_tokens = max(1, len(prompt.split()))
    completion_tokens = len(ANSWER_TOKENS)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chat_prompt(payload: Mapping[str, Any]) -> str:
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return ""
    parts = [m.get("content") for m in messages if isinstance(m, dict)]
    return " ".join(p for p in parts if isinstance(p, str))


def _wants_usage(payload: Mapping[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    payload = await _read_json(request)
    confidence = _confidence(request)
    want_logprobs = payload.get("logprobs") is True
    top = (_int_param(payload, "top_logprobs", 0, 20) or 0) if want_logprobs else 0
    model = payload.get("model") if isinstance(payload.get("model"), str) else MODEL_NAME
    base = {"id": f"chatcmpl-demo-{uuid.uuid4().hex[:24]}", "created": int(time.time())}
    base["model"] = model
    usage = _usage(_chat_prompt(payload))
    if payload.get("stream") is True:
        base["object"] = "chat.completion.chunk"
        events: list[object] = []
        for index, token in enumerate(ANSWER_TOKENS):
            delta = {"role": "assistant", "content": token} if index == 0 else {"content": token}
            logprobs = _chat_logprobs([token], confidence, top) if want_logprobs else None
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}
            events.append({**base, "choices": [choice]})
        final = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
        events.append({**base, "choices": [final]})
        if _wants_usage(payload):
            events.append({**base, "choices": [], "usage": usage})
        return await _send_sse(request, events)
    answer = "".join(ANSWER_TOKENS)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": answer},
        "logprobs": _chat_logprobs(ANSWER_TOKENS, confidence, top) if want_logprobs else None,
        "finish_reason": "stop",
    }
    body = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
    return await _send(request, _dumps(body))


async def _completions(request: web.Request) -> web.StreamResponse:
    payload = await _read_json(request)
    confidence = _confidence(request)
    top = _int_param(payload, "logprobs", 0, 20)
    model = payload.get("model") if isinstance(payload.get("model"), str) else MODEL_NAME
    prompt = payload.get("prompt")
    prompt_text = prompt if isinstance(prompt, str) else ""
    base = {
        "id": f"cmpl-demo-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    usage = _usage(prompt_text)
    if payload.get("stream") is True:
        events: list[object] = []
        offset = 0
        for token in ANSWER_TOKENS:
            logprobs = (
                None if top is None else _completion_logprobs([token], confidence, top, offset)
            )
            offset += len(token)
            choice = {"text": token, "index": 0, "logprobs": logprobs, "finish_reason": None}
            events.append({**base, "choices": [choice]})
        final = {"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}
        events.append({**base, "choices": [final]})
        if _wants_usage(payload):
            events.append({**base, "choices": [], "usage": usage})
        return await _send_sse(request, events)
    choice = {
        "text": "".join(ANSWER_TOKENS),
        "index": 0,
        "logprobs": None
        if top is None
        else _completion_logprobs(ANSWER_TOKENS, confidence, top, 0),
        "finish_reason": "stop",
    }
    return await _send(request, _dumps({**base, "choices": [choice], "usage": usage}))


async def _list_models(request: web.Request) -> web.StreamResponse:
    model = {"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "sidecar-demo"}
    return await _send(request, _dumps({"object": "list", "data": [model]}))


# --- KServe V2 endpoints -----------------------------------------------------------------------


def _input_rows(payload: Mapping[str, Any]) -> int:
    """Rows of the first input (`shape[0]`), 1 when there is none."""
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs or not isinstance(inputs[0], dict):
        return 1
    shape = inputs[0].get("shape")
    if isinstance(shape, list) and shape and isinstance(shape[0], int) and shape[0] >= 1:
        if shape[0] > _MAX_ROWS:
            raise _RequestError(f"at most {_MAX_ROWS} input rows")
        return int(shape[0])
    return 1


async def _infer(request: web.Request) -> web.StreamResponse:
    payload = await _read_json(request)
    rows = _input_rows(payload)
    top = _confidence(request)
    row = [top, round(1.0 - top, 12)]
    request_id = payload.get("id")
    body = {
        "model_name": request.match_info["name"],
        "model_version": "1",
        "id": request_id if isinstance(request_id, str) else uuid.uuid4().hex,
        "outputs": [
            {"name": "predict_proba", "shape": [rows, 2], "datatype": "FP64", "data": row * rows}
        ],
    }
    return await _send(request, _dumps(body))


async def _model_metadata(request: web.Request) -> web.StreamResponse:
    body = {
        "name": request.match_info["name"],
        "versions": ["1"],
        "platform": "sidecar-demo",
        "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [-1, -1]}],
        "outputs": [{"name": "predict_proba", "datatype": "FP64", "shape": [-1, 2]}],
    }
    return await _send(request, _dumps(body))


async def _server_metadata(request: web.Request) -> web.StreamResponse:
    body = {"name": "sidecar-demo-model", "version": "1", "extensions": []}
    return await _send(request, _dumps(body))


async def _ready(request: web.Request) -> web.StreamResponse:
    return await _send(request, _dumps({"ready": True}))


async def _live(request: web.Request) -> web.StreamResponse:
    return await _send(request, _dumps({"live": True}))


async def _healthz(request: web.Request) -> web.StreamResponse:
    return await _send(request, _dumps({"status": "ok"}))


# --- proxy-test helpers ------------------------------------------------------------------------


def _decode_header(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


async def _echo(request: web.Request) -> web.StreamResponse:
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_any():  # streamed: no client_max_size cap
        digest.update(chunk)
        length += len(chunk)
    body = {
        "method": request.method,
        "path": request.raw_path,
        "headers": [[_decode_header(k), _decode_header(v)] for k, v in request.raw_headers],
        "body_sha256": digest.hexdigest(),
        "body_len": length,
    }
    return await _send(request, _dumps(body))


async def _redirect(request: web.Request) -> web.StreamResponse:
    headers = {"Location": "http://127.0.0.1:1/elsewhere"}
    return await _send(
        request, _dumps({"redirect": headers["Location"]}), status=302, headers=headers
    )


async def _set_cookie(request: web.Request) -> web.StreamResponse:
    headers = {"Set-Cookie": "session=secret; Path=/"}
    return await _send(request, _dumps({"cookie": "set"}), headers=headers)


async def _gzip(request: web.Request) -> web.StreamResponse:
    body = gzip.compress(_GZIP_PLAIN, mtime=0)
    return await _send(request, body, headers={"Content-Encoding": "gzip"})


async def _bytes(request: web.Request) -> web.StreamResponse:
    size = int(request.match_info["n"])
    if size > _MAX_BYTES:
        raise _RequestError(f"at most {_MAX_BYTES} bytes")
    pattern = bytes(range(256))
    body = (pattern * (size // 256 + 1))[:size]
    return await _send(request, body, content_type="application/octet-stream")


# --- control plane: /_demo/* -------------------------------------------------------------------


async def _add_fault(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _RequestError(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    schedule = request.app[SCHEDULE]
    try:
        fault = schedule.add_from_json(payload)
    except FaultSpecError as exc:
        return _json_error(400, exc.message, "invalid_fault", item=exc.item)
    now = schedule.now()
    return web.json_response({"added": fault.describe(now), "faults": schedule.active()})


async def _list_faults(request: web.Request) -> web.StreamResponse:
    return web.json_response({"faults": request.app[SCHEDULE].active()})


async def _clear_faults(request: web.Request) -> web.StreamResponse:
    return web.json_response({"cleared": request.app[SCHEDULE].clear()})


async def _release(request: web.Request) -> web.StreamResponse:
    return web.json_response({"released": request.app[GATE].release()})


async def _stats(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[STATS].as_json())


async def _reset_stats(request: web.Request) -> web.StreamResponse:
    stats = request.app[STATS]
    stats.reset()
    return web.json_response(stats.as_json())


# --- app and process ---------------------------------------------------------------------------


async def _on_shutdown(app: web.Application) -> None:
    """Let held streams finish and hung requests go, so shutdown is not stuck on them."""
    app[SHUTDOWN].set()
    app[GATE].close()


def create_app(
    *,
    clock: Callable[[], float] | None = None,
    rng: random.Random | None = None,
    sleep: Sleep | None = None,
    chunk_interval: float = 0.0,
) -> web.Application:
    """The demo model app. `clock` (monotonic seconds) and `rng` drive the global fault schedule;
    `sleep` makes every fault's wait (latency, first_byte_delay, stall_mid_stream,
    chunk_interval); `chunk_interval` (seconds) paces SSE events when no fault sets it.

    Run it with `handler_cancellation=True` so a client that goes away ends a hung request."""
    if not (chunk_interval >= 0 and math.isfinite(chunk_interval)):
        raise ValueError(f"chunk_interval must be a number of seconds >= 0, not {chunk_interval}")
    app = web.Application(middlewares=[_demo_middleware], client_max_size=16 * 1024 * 1024)
    app[SCHEDULE] = FaultSchedule(now=clock or time.monotonic, rng=rng or random.Random())
    app[SLEEP] = sleep or asyncio.sleep
    app[CHUNK_INTERVAL] = chunk_interval
    app[STATS] = Stats()
    app[GATE] = HoldGate()
    app[SHUTDOWN] = asyncio.Event()
    app.on_shutdown.append(_on_shutdown)
    r = app.router
    r.add_post("/v1/chat/completions", _chat_completions)
    r.add_post("/v1/completions", _completions)
    r.add_get("/v1/models", _list_models)
    r.add_post("/v2/models/{name}/infer", _infer)
    r.add_get("/v2/models/{name}", _model_metadata)
    r.add_get("/v2/models/{name}/ready", _ready)
    r.add_get("/v2", _server_metadata)
    r.add_get("/v2/health/ready", _ready)
    r.add_get("/v2/health/live", _live)
    r.add_get("/healthz", _healthz)
    r.add_route("*", "/echo", _echo)
    r.add_route("*", "/echo/{tail:.*}", _echo)
    r.add_get("/redirect", _redirect)
    r.add_get("/set-cookie", _set_cookie)
    r.add_get("/gzip", _gzip)
    r.add_get(r"/bytes/{n:\d+}", _bytes)
    r.add_post("/_demo/faults", _add_fault)
    r.add_get("/_demo/faults", _list_faults)
    r.add_delete("/_demo/faults", _clear_faults)
    r.add_post("/_demo/release", _release)
    r.add_get("/_demo/stats", _stats)
    r.add_post("/_demo/stats/reset", _reset_stats)
    return app


def _format_address(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _serve(host: str, port: int, chunk_interval: float) -> None:
    log = structlog.get_logger("sidecar.demo")
    runner = web.AppRunner(
        create_app(chunk_interval=chunk_interval),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=2.0,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info("listening", address=_format_address(runner.addresses[0]))
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()


def main(host: str, port: int, *, chunk_interval: float = 0.0) -> int:
    """Run the demo model on `host:port` (0 picks a free port) until SIGINT or SIGTERM, pacing
    SSE events `chunk_interval` seconds apart unless a request's faults say otherwise."""
    try:
        asyncio.run(_serve(host, port, chunk_interval))
    except KeyboardInterrupt:  # a second Ctrl-C before the handlers were installed
        return 0
    except OSError as exc:
        structlog.get_logger("sidecar.demo").error("bind_failed", error=str(exc))
        return 1
    return 0
