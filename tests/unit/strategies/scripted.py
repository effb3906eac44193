"""Test doubles for strategy unit tests: a scripted transport, a streaming body and a context.

`Scripted` stands where the transport sits in the pipeline. It plays a queued sequence of
`ProxyResponse`s and exceptions (one per call), counts calls and, like the real transport,
bumps `ctx.attempts` and consumes the request body once per attempt. A `FakeClock` in the
context lets it simulate upstream latency without sleeping.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from sidecar.clock import FakeClock
from sidecar.context import RequestContext
from sidecar.pipeline import BytesBody, ProxyRequest, ProxyResponse, RequestBody, ResponseBody

__all__ = [
    "ClosableBytesBody",
    "Scripted",
    "StreamingBody",
    "hang",
    "make_ctx",
    "make_request",
    "response",
]

Step = ProxyResponse | BaseException | Callable[[ProxyRequest, RequestContext], Awaitable[Any]]


def make_ctx(clock: FakeClock, **overrides: Any) -> RequestContext:
    fields: dict[str, Any] = {
        "request_id": "req-1",
        "route": "default",
        "upstream": "model",
        "clock": clock,
        "started": clock.monotonic(),
        "method": "POST",
        "path": "/v2/models/m/infer",
    }
    fields.update(overrides)
    return RequestContext(**fields)


def make_request(
    body: bytes | RequestBody = b"{}",
    *,
    method: str = "POST",
    headers: list[tuple[str, str]] | None = None,
    path_qs: str = "/v2/models/m/infer",
) -> ProxyRequest:
    request_body = body if isinstance(body, RequestBody) else RequestBody(body)
    return ProxyRequest(method, path_qs, list(headers or []), request_body)


class StreamingBody:
    """A response body shaped like the transport's `StreamBody`: `prefetch`, `read_chunk`,
    `read_all(limit)` and `close`, with counters to assert on.

    `gate`, when given, makes `prefetch` wait for it (an Event never set models a hang).
    `prefetch_delay` advances `clock` to simulate time to first byte.
    """

    def __init__(
        self,
        chunks: Iterable[bytes] = (),
        *,
        gate: asyncio.Event | None = None,
        clock: FakeClock | None = None,
        prefetch_delay: float = 0.0,
        prefetch_error: BaseException | None = None,
        read_error: BaseException | None = None,
    ) -> None:
        self._chunks = iter(chunks)
        self._buffer: list[bytes] = []
        self._eof = False
        self.gate = gate
        self.clock = clock
        self.prefetch_delay = prefetch_delay
        self.prefetch_error = prefetch_error
        self.read_error = read_error
        self.closed = False
        self.prefetched = False
        self.chunks_read = 0
        self.read_all_limits: list[int] = []

    def _next_raw(self) -> bytes:
        if self.read_error is not None:
            raise self.read_error
        chunk = next(self._chunks, b"")
        if chunk:
            self.chunks_read += 1
        else:
            self._eof = True
        return chunk

    async def prefetch(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.clock is not None and self.prefetch_delay:
            self.clock.advance(self.prefetch_delay)
        if self.prefetch_error is not None:
            raise self.prefetch_error
        self.prefetched = True
        chunk = self._next_raw()
        if chunk:
            self._buffer.append(chunk)

    async def read_chunk(self) -> bytes:
        if self._buffer:
            return self._buffer.pop(0)
        if self._eof or self.closed:
            return b""
        await asyncio.sleep(0)
        return self._next_raw()

    async def read_all(self, limit: int) -> bytes | None:
        self.read_all_limits.append(limit)
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = await self.read_chunk()
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                self._buffer[:0] = parts
                return None

    def close(self) -> None:
        self.closed = True


class ClosableBytesBody(BytesBody):
    """A `BytesBody` that remembers it was closed (no `prefetch`/`read_all`)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.closed = False

    def close(self) -> None:
        super().close()
        self.closed = True


def response(
    status: int = 200,
    body: bytes | ResponseBody = b"{}",
    *,
    headers: list[tuple[str, str]] | None = None,
    content_type: str | None = "application/json",
) -> ProxyResponse:
    hdrs = list(headers or [])
    if content_type is not None:
        hdrs.append(("Content-Type", content_type))
    response_body = ClosableBytesBody(body) if isinstance(body, bytes) else body
    return ProxyResponse(status, hdrs, response_body)


def hang(event: asyncio.Event | None = None) -> Callable[[ProxyRequest, RequestContext], Any]:
    """A step that awaits an Event that is never set (unless the test sets it)."""
    gate = event or asyncio.Event()

    async def step(request: ProxyRequest, ctx: RequestContext) -> ProxyResponse:
        await gate.wait()
        return response(200)

    return step


class Scripted:
    """A transport `Handler` playing `steps` in order; each call takes one step.

    A step is a `ProxyResponse` (returned), an exception (raised) or an async callable (awaited
    and its result treated as a step). Running past the script fails the test loudly.
    `latency` advances the context's FakeClock on each call, before the step is played.
    """

    def __init__(self, *steps: Step, latency: float = 0.0) -> None:
        self.steps: deque[Step] = deque(steps)
        self.latency = latency
        self.calls = 0
        self.requests: list[ProxyRequest] = []
        self.contexts: list[RequestContext] = []
        self.returned: list[ProxyResponse] = []

    def extend(self, *steps: Step) -> None:
        self.steps.extend(steps)

    async def __call__(self, request: ProxyRequest, ctx: RequestContext) -> ProxyResponse:
        self.calls += 1
        ctx.attempts += 1
        self.requests.append(request)
        self.contexts.append(ctx)
        payload = request.body.payload()
        if not isinstance(payload, bytes):
            await _drain(payload)
        if self.latency:
            clock = ctx.clock
            assert isinstance(clock, FakeClock)
            clock.advance(self.latency)
        if not self.steps:
            raise AssertionError(f"script exhausted: unexpected call #{self.calls}")
        step = self.steps.popleft()
        if not isinstance(step, ProxyResponse | BaseException):
            step = await step(request, ctx)
        if isinstance(step, BaseException):
            raise step
        assert isinstance(step, ProxyResponse)
        self.returned.append(step)
        return step


async def _drain(stream: AsyncIterator[bytes]) -> None:
    async for _ in stream:
        pass
