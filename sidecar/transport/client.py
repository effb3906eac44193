"""The aiohttp client for one upstream, and the one boundary where aiohttp's exceptions become
`SidecarError`s with a failure mode.

Configured as DESIGN.md's library traps say: redirects never followed, no cookie jar, no headers
the caller did not send, no decompression (bodies pass byte for byte), a pool larger than the
in-flight limit, and `sock_connect` for the connect timeout so a pool wait is never mistaken for
a refused connection.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from yarl import URL

from sidecar.clock import Clock
from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError
from sidecar.pipeline import ProxyRequest, ProxyResponse, read_up_to

__all__ = ["StreamBody", "UpstreamClient", "map_client_error"]

_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def map_client_error(exc: BaseException, *, after_headers: bool) -> SidecarError:
    """aiohttp exception → SidecarError. Before response headers a broken connection is a
    `connect_error`; after them, the stream was interrupted."""
    if isinstance(exc, SidecarError):
        return exc
    if after_headers:
        return SidecarError(
            FailureMode.STREAM_INTERRUPTED, f"upstream stream broke: {_describe(exc)}"
        )
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return SidecarError(FailureMode.CONNECT_ERROR, "connecting to the upstream timed out")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return SidecarError(
            FailureMode.CONNECT_ERROR, f"cannot connect to the upstream: {_describe(exc)}"
        )
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return SidecarError(
            FailureMode.CONNECT_ERROR, "upstream closed the connection before answering"
        )
    if isinstance(exc, aiohttp.ClientResponseError):
        return SidecarError(
            FailureMode.INVALID_OUTPUT, f"upstream sent a malformed response: {exc.message}"
        )
    if isinstance(exc, aiohttp.ClientPayloadError):
        return SidecarError(
            FailureMode.CLIENT_ERROR, "request body could not be sent upstream", status=400
        )
    if isinstance(exc, aiohttp.ClientOSError | ConnectionError | OSError):
        return SidecarError(
            FailureMode.CONNECT_ERROR, f"connection to the upstream failed: {_describe(exc)}"
        )
    return SidecarError(FailureMode.CONNECT_ERROR, f"upstream request failed: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class StreamBody:
    """An upstream response body read chunk by chunk, with the idle limit between chunks.

    `prefetch()` reads ahead until the first chunk (or, for SSE, the first `data:` line) so the
    first-byte timeout is checked before anything reaches the caller and a retry is still possible.
    """

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        ctx: RequestContext,
        clock: Clock,
        idle_timeout: float | None,
    ) -> None:
        self._response = response
        self._ctx = ctx
        self._clock = clock
        self._idle = idle_timeout
        self._buffer: list[bytes] = []
        self._eof = False
        self._last = clock.monotonic()
        self._sse = "text/event-stream" in (response.headers.get("Content-Type") or "").lower()

    async def _read_raw(self) -> bytes:
        try:
            if self._idle is None:
                chunk = await self._response.content.readany()
            else:
                async with asyncio.timeout(self._idle):
                    chunk = await self._response.content.readany()
        except TimeoutError:
            self.close()
            raise SidecarError(
                FailureMode.STREAM_STALLED,
                f"upstream sent nothing for {self._idle:g}s in the middle of the body",
            ) from None
        except asyncio.CancelledError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise map_client_error(exc, after_headers=True) from exc
        now = self._clock.monotonic()
        if chunk:
            gap = now - self._last
            self._ctx.stream_max_gap = max(self._ctx.stream_max_gap, gap)
            self._ctx.stream_chunks += 1
        self._last = now
        if not chunk:
            self._eof = True
            self._response.release()
        return chunk

    async def prefetch(self) -> None:
        """Read until the first body byte (first `data:` line for SSE) or the end."""
        seen = b""
        while not self._eof:
            chunk = await self._read_raw()
            if not chunk:
                return
            self._buffer.append(chunk)
            if not self._sse:
                return
            seen = (seen + chunk)[-65536:]
            if seen.startswith(b"data:") or b"\ndata:" in seen:
                return

    async def read_chunk(self) -> bytes:
        if self._buffer:
            return self._buffer.pop(0)
        if self._eof:
            return b""
        return await self._read_raw()

    async def read_all(self, limit: int) -> bytes | None:
        """Everything up to `limit` bytes; None (and the rest left unread) when over it."""
        parts, over = await read_up_to(self, limit)
        if over:
            self._buffer[:0] = parts
            return None
        return b"".join(parts)

    def close(self) -> None:
        self._eof = True
        with contextlib.suppress(Exception):
            self._response.close()


class UpstreamClient:
    """One pooled aiohttp session per upstream origin."""

    def __init__(self, name: str, origin: str, pool_size: int, clock: Clock) -> None:
        self.name = name
        self.origin = URL(origin)
        self.clock = clock
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._pool_size, limit_per_host=0, enable_cleanup_closed=False
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=_SKIP_AUTO,
                timeout=aiohttp.ClientTimeout(total=None),
                requote_redirect_url=False,
                trust_env=False,
            )
        return self._session

    def target(self, path_qs: str) -> URL:
        """Origin + the request's path and query; nothing else of the request chooses the host."""
        if not path_qs.startswith("/") or path_qs.startswith("//"):
            raise SidecarError(
                FailureMode.CLIENT_ERROR,
                "request target must be a path (origin-form), not a host",
                status=400,
            )
        url = URL(str(self.origin) + path_qs, encoded=True)
        if (url.scheme, url.host, url.port) != (
            self.origin.scheme,
            self.origin.host,
            self.origin.port,
        ) or url.user:
            raise SidecarError(
                FailureMode.CLIENT_ERROR, "request target changes the upstream", status=400
            )
        return url

    async def send(
        self,
        request: ProxyRequest,
        ctx: RequestContext,
        *,
        connect_timeout: float | None,
        idle_timeout: float | None,
    ) -> ProxyResponse:
        """Send one attempt; return once response headers arrived (the body streams later)."""
        url = self.target(request.path_qs)
        payload = request.body.payload()
        # aiohttp keeps only the last of two headers whose names differ only in case
        # (`ClientSession._prepare_headers`); names are case-insensitive, so each is spelt like
        # its first occurrence and every one is sent.
        spelling: dict[str, str] = {}
        headers = [(spelling.setdefault(k.lower(), k), v) for k, v in request.headers]
        if not isinstance(payload, bytes):
            # Stream framing stays the caller's when it declared a length.
            length = ctx.extra.get("request_content_length")
            if isinstance(length, int):
                headers.append(("Content-Length", str(length)))
        session = self._get_session()
        started = self.clock.monotonic()
        try:
            response = await session.request(
                request.method,
                url,
                headers=headers,
                data=None if payload == b"" else payload,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout),
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The caller's own body broke (over the limit, stalled, malformed): a client error,
            # never a failure of the upstream (so the breaker and budget do not count it).
            body_error = ctx.extra.get("body_error")
            if isinstance(body_error, SidecarError):
                raise body_error from exc
            raise map_client_error(exc, after_headers=False) from exc
        finally:
            ctx.upstream_seconds += self.clock.monotonic() - started
        ctx.upstream_status = response.status
        body = StreamBody(response, ctx, self.clock, idle_timeout)
        length = response.content_length
        chunked = "chunked" in (response.headers.get("Transfer-Encoding") or "").lower()
        return ProxyResponse(
            status=response.status,
            reason=response.reason,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers],
            body=body,
            content_length=None if chunked else length,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
