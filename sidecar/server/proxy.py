"""The proxy handler: the edge between a caller and a route's pipeline.

It checks what the caller sent (target form, upgrades, body size), picks the route, runs the
pipeline, and copies the answer back as a stream. A failure after the first byte ends the stream
visibly: SSE gets a final `event: error`, other bodies are aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import AsyncIterator

from aiohttp import web

from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError
from sidecar.pipeline import ProxyRequest, ProxyResponse, RequestBody
from sidecar.server.respond import (
    envelope,
    error_status,
    outcome_of,
    sidecar_headers,
    sse_error_event,
)
from sidecar.server.state import STATE, SidecarState
from sidecar.telemetry.logging import get_logger
from sidecar.transport.headers import clean_request_headers, clean_response_headers, is_upgrade

__all__ = ["ProxyHandler"]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")

log = get_logger("sidecar.access")


def _request_id(request: web.Request) -> str:
    incoming = request.headers.get("x-request-id")
    if incoming and _REQUEST_ID.match(incoming):
        return incoming
    return secrets.token_hex(16)


def _trace_ids(request: web.Request) -> tuple[str, str]:
    match = _TRACEPARENT.match(request.headers.get("traceparent", "").strip())
    if match and match.group(1) != "0" * 32:
        return match.group(1), secrets.token_hex(8)
    return secrets.token_hex(16), secrets.token_hex(8)


def _error_response(err: SidecarError, ctx: RequestContext) -> web.Response:
    ctx.failure_mode = ctx.failure_mode or err.mode
    headers = sidecar_headers(ctx, err)
    response = web.Response(
        status=error_status(err), body=envelope(err, ctx), content_type="application/json"
    )
    for name, value in headers:
        response.headers.add(name, value)
    return response


class ProxyHandler:
    def __init__(self, state: SidecarState) -> None:
        self.state = state

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        state = self.state
        clock = state.clock
        runtime = state.runtime
        trace_id, span_id = _trace_ids(request)
        ctx = RequestContext(
            request_id=_request_id(request),
            route="",
            upstream="",
            clock=clock,
            started=clock.monotonic(),
            method=request.method,
            path=request.path if request.raw_path.startswith("/") else "",
            trace_id=trace_id,
            span_id=span_id,
        )
        state.request_started()
        status = 0
        try:
            response = await self._handle(request, ctx, runtime)
            status = response.status
            return response
        except asyncio.CancelledError:
            ctx.failure_mode = FailureMode.CLIENT_CANCELLED
            ctx.emit("client_cancelled")
            status = 499
            raise
        finally:
            state.request_finished()
            self._access_log(ctx, status)

    async def _handle(
        self, request: web.Request, ctx: RequestContext, runtime: object
    ) -> web.StreamResponse:
        from sidecar.policy.builder import RuntimePolicy

        try:
            if not isinstance(runtime, RuntimePolicy):
                raise SidecarError(FailureMode.OVERLOADED, "no policy loaded yet", retry_after=1)
            self._check_request(request)
            route = runtime.match(request.method, request.path)
            if route is None:
                raise SidecarError(
                    FailureMode.CLIENT_ERROR,
                    f"no route matches {request.method} {request.path}",
                    status=404,
                )
            ctx.route = route.name
            ctx.upstream = route.upstream
            body = await self._read_body(request, ctx, runtime.max_body, route.replay_limit)
            proxy_request = ProxyRequest(
                method=request.method,
                path_qs=request.raw_path,
                headers=clean_request_headers(
                    [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
                    client_ip=request.remote,
                    proto=request.scheme,
                    host=request.headers.get("Host"),
                ),
                body=body,
            )
            proxy_request.headers.append(("x-request-id", ctx.request_id))
            upstream_response = await route.handler(proxy_request, ctx)
        except SidecarError as err:
            return _error_response(err, ctx)
        return await self._stream(request, ctx, upstream_response)

    def _check_request(self, request: web.Request) -> None:
        if request.method == "CONNECT":
            raise SidecarError(FailureMode.CLIENT_ERROR, "CONNECT is not supported", status=501)
        if is_upgrade(request.headers.items()):
            raise SidecarError(
                FailureMode.CLIENT_ERROR,
                "protocol upgrades (WebSocket, h2c) are not supported by the sidecar",
                status=501,
            )
        target = request.raw_path
        if not target.startswith("/") or target.startswith("//"):
            raise SidecarError(
                FailureMode.CLIENT_ERROR,
                "request target must be a path (origin-form); "
                "absolute and authority forms are refused",
                status=400,
            )

    async def _read_body(
        self, request: web.Request, ctx: RequestContext, max_body: int, replay_limit: int
    ) -> RequestBody:
        declared = request.content_length
        if declared is not None and declared > max_body:
            raise SidecarError(
                FailureMode.CLIENT_ERROR,
                f"request body of {declared} bytes is over the limit of {max_body} bytes",
                status=413,
            )
        if not request.body_exists:
            return RequestBody.empty()
        if declared is not None:
            ctx.extra["request_content_length"] = declared
        content = request.content
        buffered = bytearray()
        while len(buffered) <= replay_limit:
            chunk = await content.readany()
            if not chunk:
                return RequestBody(bytes(buffered))
            buffered += chunk
            if len(buffered) > max_body:
                raise SidecarError(
                    FailureMode.CLIENT_ERROR,
                    f"request body is over the limit of {max_body} bytes",
                    status=413,
                )
        total = len(buffered)

        async def rest() -> AsyncIterator[bytes]:
            nonlocal total
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                total += len(chunk)
                if total > max_body:
                    # Aborts the upstream request: the model never gets a complete body.
                    raise SidecarError(
                        FailureMode.CLIENT_ERROR,
                        f"request body is over the limit of {max_body} bytes",
                        status=413,
                    )
                yield chunk

        return RequestBody(None, rest=rest(), prefix=bytes(buffered))

    async def _stream(
        self, request: web.Request, ctx: RequestContext, upstream: ProxyResponse
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in clean_response_headers(upstream.headers):
            response.headers.add(name, value)
        if ctx.failure_mode is None and upstream.status >= 500 and ctx.outcome is None:
            ctx.failure_mode = FailureMode.UPSTREAM_5XX
        for name, value in sidecar_headers(ctx):
            response.headers[name] = value
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        sse = "text/event-stream" in (response.headers.get("Content-Type") or "").lower()
        try:
            await response.prepare(request)
            ctx.response_started = True
            while True:
                chunk = await upstream.body.read_chunk()
                if not chunk:
                    break
                await response.write(chunk)
            await response.write_eof()
        except SidecarError as err:
            ctx.failure_mode = err.mode
            ctx.outcome = None
            self._end_visibly(request, response, ctx, err, sse)
            if sse:
                with contextlib.suppress(Exception):
                    await response.write(sse_error_event(err, ctx))
                    await response.write_eof()
            else:
                if request.transport is not None:
                    request.transport.abort()
        except (ConnectionResetError, ConnectionError):
            ctx.failure_mode = FailureMode.CLIENT_CANCELLED
        finally:
            upstream.body.close()
        return response

    def _end_visibly(
        self,
        request: web.Request,
        response: web.StreamResponse,
        ctx: RequestContext,
        err: SidecarError,
        sse: bool,
    ) -> None:
        ctx.emit("stream_failed", mode=err.mode.value, sse=sse)
        response.force_close()

    def _access_log(self, ctx: RequestContext, status: int) -> None:
        log.info(
            "request",
            method=ctx.method,
            path=ctx.path,
            status=status,
            route=ctx.route or None,
            upstream=ctx.upstream or None,
            outcome=outcome_of(ctx).value
            if ctx.failure_mode != FailureMode.CLIENT_CANCELLED
            else "error",
            failure_mode=ctx.failure_mode.value if ctx.failure_mode else None,
            attempts=ctx.attempts,
            retries=ctx.retries,
            budget_refused=ctx.budget_refused,
            breaker_state=ctx.breaker_state,
            duration_ms=round(ctx.elapsed() * 1000, 3),
            upstream_ms=round(ctx.upstream_seconds * 1000, 3),
            request_id=ctx.request_id,
            trace_id=ctx.trace_id,
        )


def proxy_app(state: SidecarState, *, client_max_size: int = 1024**2) -> web.Application:
    app = web.Application(client_max_size=client_max_size)
    app[STATE] = state
    handler = ProxyHandler(state)
    app.router.add_route("*", "/{tail:.*}", handler)
    return app
