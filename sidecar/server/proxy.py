"""The proxy handler: the edge between a caller and a route's pipeline.

It checks what the caller sent (target form, upgrades, body size), picks the route, runs the
pipeline, and copies the answer back as a stream. A failure after the first byte ends the stream
visibly: SSE gets a final `event: error`, other bodies are aborted.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler

from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError
from sidecar.failures.capture import CAPTURE_ERROR, CAPTURE_REQUEST, CAPTURE_RESPONSE
from sidecar.outcome import Outcome
from sidecar.pipeline import ProxyRequest, ProxyResponse, RequestBody
from sidecar.policy.builder import RuntimePolicy
from sidecar.server.observe import begin_request, first_byte_sent
from sidecar.server.respond import (
    envelope,
    error_status,
    outcome_of,
    sidecar_headers,
    sse_error_event,
)
from sidecar.server.state import STATE, SidecarState
from sidecar.telemetry.events import FIRST_BYTE_KEY
from sidecar.telemetry.logging import get_logger
from sidecar.transport.headers import clean_request_headers, clean_response_headers, is_upgrade

__all__ = ["ProxyHandler"]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")

log = get_logger("sidecar.access")


def _request_id(request: web.Request) -> str:
    incoming = request.headers.get("x-request-id")
    if incoming and _REQUEST_ID.match(incoming):
        return incoming
    return secrets.token_hex(16)


def _final_outcome(ctx: RequestContext) -> Outcome:
    if ctx.failure_mode == FailureMode.CLIENT_CANCELLED:
        return Outcome.ERROR
    return outcome_of(ctx)


def _error_response(err: SidecarError, ctx: RequestContext) -> web.Response:
    ctx.failure_mode = ctx.failure_mode or err.mode
    ctx.extra[CAPTURE_ERROR] = err  # the failure record's cause and response excerpt
    headers = sidecar_headers(ctx, err)
    response = web.Response(
        status=error_status(err), body=envelope(err, ctx), content_type="application/json"
    )
    for name, value in headers:
        response.headers.add(name, value)
    return response


def _has_dot_segment(target: str) -> bool:
    path = target.split("?", 1)[0]
    if "." not in path and "%2" not in path:
        return False
    for segment in path.split("/"):
        decoded = segment.replace("%2e", ".").replace("%2E", ".")
        if decoded in (".", ".."):
            return True
    return False


def _last_event_end(data: bytes) -> int:
    """Offset just past the last complete SSE event in `data` (a blank line ends an event);
    0 when no event is complete yet."""
    best = 0
    for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        i = data.rfind(sep)
        if i >= 0:
            best = max(best, i + len(sep))
    return best


class ProxyHandler:
    def __init__(self, state: SidecarState) -> None:
        self.state = state

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        state = self.state
        clock = state.clock
        runtime = state.runtime
        ctx = RequestContext(
            request_id=_request_id(request),
            route="",
            upstream="",
            clock=clock,
            started=clock.monotonic(),
            method=request.method,
            path=request.path if request.raw_path.startswith("/") else "",
        )
        # The server span (parent: the caller's traceparent); sets ctx.trace_id and ctx.sink.
        observed = begin_request(state, request, ctx)
        state.request_started()
        if state.guard is not None:
            state.guard.request_started(request.transport, request.content)
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
            # Bulkhead slots are freed and fully delivered answers cached before the log line.
            ctx.finish()
            state.request_finished()
            if state.guard is not None:
                state.guard.request_finished(request.transport)
            # Ends the spans (the sampling decision), records metrics, feeds the alert rules.
            observed.finish(ctx, status, _final_outcome(ctx))
            self._access_log(ctx, status)
            if state.failures is not None:
                # Queues a record for a failed request; never blocks or raises.
                state.failures.request_finished(ctx, status, _final_outcome(ctx))

    async def _handle(
        self, request: web.Request, ctx: RequestContext, runtime: object
    ) -> web.StreamResponse:
        try:
            if not isinstance(runtime, RuntimePolicy):
                raise SidecarError(FailureMode.OVERLOADED, "no policy loaded yet", retry_after=1)
            self._check_request(request)
            self._check_head(request, runtime)
            route = runtime.match(request.method, request.path)
            if route is None:
                raise SidecarError(
                    FailureMode.CLIENT_ERROR,
                    f"no route matches {request.method} {request.path}",
                    status=404,
                )
            ctx.route = route.name
            ctx.upstream = route.upstream
            body = await self._read_body(
                request,
                ctx,
                runtime.max_body,
                route.replay_limit,
                runtime.policy.limits.body_idle,
            )
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
            # Sent once: the caller's id when it was valid, else the one made up here.
            proxy_request.headers[:] = [
                (k, v) for k, v in proxy_request.headers if k.lower() != "x-request-id"
            ]
            proxy_request.headers.append(("x-request-id", ctx.request_id))
            ctx.extra[CAPTURE_REQUEST] = proxy_request  # excerpted only if the request fails
            upstream_response = await route.handler(proxy_request, ctx)
            ctx.extra[CAPTURE_RESPONSE] = upstream_response
        except SidecarError as err:
            # A caller body that broke the limits while streaming upstream is the real cause.
            body_error = ctx.extra.get("body_error")
            return _error_response(body_error if isinstance(body_error, SidecarError) else err, ctx)
        except Exception:
            body_error = ctx.extra.get("body_error")
            if isinstance(body_error, SidecarError):
                return _error_response(body_error, ctx)
            raise
        return await self._stream(request, ctx, upstream_response)

    def _check_head(self, request: web.Request, runtime: RuntimePolicy) -> None:
        limits = runtime.policy.limits
        raw = request.raw_headers
        if len(raw) > limits.max_headers:
            raise SidecarError(
                FailureMode.CLIENT_ERROR,
                f"{len(raw)} request headers is over the limit of {limits.max_headers}",
                status=431,
            )
        size = sum(len(k) + len(v) + 4 for k, v in raw)
        if size > limits.max_header_bytes:
            raise SidecarError(
                FailureMode.CLIENT_ERROR,
                f"request headers of {size} bytes are over the limit of "
                f"{limits.max_header_bytes} bytes",
                status=431,
            )

    def _check_request(self, request: web.Request) -> None:
        version = request.version
        if version.major != 1:
            # HTTP/0.9 and HTTP/2.0 request lines: the sidecar speaks HTTP/1.x only.
            raise SidecarError(
                FailureMode.CLIENT_ERROR,
                f"HTTP/{version.major}.{version.minor} is not supported; use HTTP/1.1",
                status=505,
            )
        codings = ",".join(request.headers.getall("Transfer-Encoding", ()))
        if codings and codings.replace(" ", "").replace("\t", "").lower() != "chunked":
            # Only `chunked` is undone here; forwarding still-coded bytes (`gzip, chunked`)
            # as the body would change what the model receives (RFC 9112 section 6.1).
            raise SidecarError(
                FailureMode.CLIENT_ERROR,
                "transfer codings other than chunked are not supported",
                status=501,
            )
        if codings and version.minor == 0:
            # HTTP/1.0 has no chunked framing: RFC 9112 section 6.1 says treat it as faulty.
            raise SidecarError(
                FailureMode.CLIENT_ERROR,
                "Transfer-Encoding is not valid in an HTTP/1.0 request",
                status=400,
            )
        if request.method == "CONNECT":
            raise SidecarError(FailureMode.CLIENT_ERROR, "CONNECT is not supported", status=501)
        if is_upgrade(request.headers.items()):
            raise SidecarError(
                FailureMode.CLIENT_ERROR,
                "protocol upgrades (WebSocket, h2c) are not supported by the sidecar",
                status=501,
            )
        target = request.raw_path
        if _has_dot_segment(target):
            # `/v1/../admin` would take the /v1 route's policy while the model serves /admin.
            raise SidecarError(
                FailureMode.CLIENT_ERROR,
                "request path must not contain . or .. segments",
                status=400,
            )
        if not target.startswith("/") or target.startswith("//"):
            raise SidecarError(
                FailureMode.CLIENT_ERROR,
                "request target must be a path (origin-form); "
                "absolute and authority forms are refused",
                status=400,
            )

    async def _read_body(
        self,
        request: web.Request,
        ctx: RequestContext,
        max_body: int,
        replay_limit: int,
        idle: float,
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

        async def next_chunk() -> bytes:
            try:
                async with asyncio.timeout(idle):
                    return await content.readany()
            except TimeoutError:
                err = SidecarError(
                    FailureMode.CLIENT_ERROR,
                    f"request body stalled for {idle:g}s",
                    status=408,
                )
                ctx.extra["body_error"] = err
                raise err from None
            except SidecarError as err:
                # The connection guard ends a body whose framing broke mid-stream.
                ctx.extra["body_error"] = err
                raise

        buffered = bytearray()
        while len(buffered) <= replay_limit:
            chunk = await next_chunk()
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
                chunk = await next_chunk()
                if not chunk:
                    return
                total += len(chunk)
                if total > max_body:
                    # Aborts the upstream request: the model never gets a complete body.
                    err = SidecarError(
                        FailureMode.CLIENT_ERROR,
                        f"request body is over the limit of {max_body} bytes",
                        status=413,
                    )
                    ctx.extra["body_error"] = err
                    raise err
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
        self.state.streams.add(upstream.body)
        try:
            await response.prepare(request)
            ctx.response_started = True
            # SSE is forwarded in whole events, so a stream cut in the middle of one never leaves
            # half an event in front of the final error event (which would then be misread).
            pending = b""
            while True:
                chunk = await upstream.body.read_chunk()
                if not chunk:
                    break
                if sse:
                    pending += chunk
                    end = _last_event_end(pending)
                    if end == 0:
                        continue
                    chunk, pending = pending[:end], pending[end:]
                await response.write(chunk)
                first_byte_sent(ctx)
            if pending:
                await response.write(pending)
                first_byte_sent(ctx)
            await response.write_eof()
        except SidecarError as caught:
            err = caught
            if self.state.shutting_down:
                err = SidecarError(
                    FailureMode.STREAM_INTERRUPTED,
                    "the sidecar is shutting down and the drain grace period ran out",
                )
            ctx.failure_mode = err.mode
            ctx.outcome = None
            self._end_visibly(request, response, ctx, err, sse)
            if sse:
                # The error event and the chunked end frame the answer completely, so the
                # connection stays usable: closing it after headers that promised keep-alive
                # would make the caller's next request on it fail with a reset.
                try:
                    await response.write(sse_error_event(err, ctx))
                    await response.write_eof()
                except Exception:
                    response.force_close()
            else:
                if request.transport is not None:
                    request.transport.abort()
        except (ConnectionResetError, ConnectionError):
            ctx.failure_mode = FailureMode.CLIENT_CANCELLED
        finally:
            self.state.streams.discard(upstream.body)
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
        ctx.extra[CAPTURE_ERROR] = err
        if not sse:
            response.force_close()  # the body is aborted: the connection cannot be reused

    def _access_log(self, ctx: RequestContext, status: int) -> None:
        ttfb = ctx.extra.get(FIRST_BYTE_KEY)
        log.info(
            "request",
            method=ctx.method,
            path=ctx.path,
            status=status,
            route=ctx.route or None,
            upstream=ctx.upstream or None,
            outcome=_final_outcome(ctx).value,
            failure_mode=ctx.failure_mode.value if ctx.failure_mode else None,
            fallback=ctx.fallback_kind,
            confidence=ctx.confidence,
            confidence_band=ctx.confidence_band,
            review_id=ctx.review_id,
            attempts=ctx.attempts,
            retries=ctx.retries,
            budget_refused=ctx.budget_refused,
            breaker_state=ctx.breaker_state,
            duration_ms=round(ctx.elapsed() * 1000, 3),
            upstream_ms=round(ctx.upstream_seconds * 1000, 3),
            ttfb_ms=round(ttfb * 1000, 3) if isinstance(ttfb, float) else None,
            request_id=ctx.request_id,
            trace_id=ctx.trace_id,
            span_id=ctx.span_id,
        )


def proxy_app(state: SidecarState, *, client_max_size: int = 1024**2) -> web.Application:
    proxy = ProxyHandler(state)

    @web.middleware
    async def unrouted(request: web.Request, handler: Handler) -> web.StreamResponse:
        # CONNECT's authority form and `OPTIONS *` match no path route: the proxy handler still
        # answers them (501, 400 with the envelope) instead of aiohttp's bare 404.
        if isinstance(request.match_info.http_exception, web.HTTPNotFound):
            return await proxy(request)
        return await handler(request)

    app = web.Application(client_max_size=client_max_size, middlewares=[unrouted])
    app[STATE] = state
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app
