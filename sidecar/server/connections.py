"""Connection-level protection aiohttp does not have: a header-read deadline and a cap on open
connections.

`GuardedSite` listens like aiohttp's `TCPSite`, but wraps each connection's protocol in a
`GuardedProtocol`. The guard counts open connections (past the cap a new connection gets a 503 and
is closed before any byte is parsed) and runs a watchdog: a connection that has started a request
head (or has just opened) and not completed it within `header_timeout` gets a 408 and is closed,
so a slow client cannot hold a connection forever (slowloris). While a request is being handled,
the body-idle deadline in the proxy handler applies instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, cast

from aiohttp import StreamReader, web
from aiohttp.http import RawRequestMessage
from aiohttp.web_runner import BaseRunner, BaseSite

from sidecar.errors import FailureMode, SidecarError

__all__ = ["ConnectionGuard", "GuardedProtocol", "GuardedSite"]


def _plain_response(status: int, reason: str, message: str, mode: str) -> bytes:
    body = json.dumps(
        {"error": {"message": message, "type": "sidecar_error", "code": mode, "failure_mode": mode}}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nx-sidecar-outcome: rejected\r\n"
        f"x-sidecar-failure-mode: {mode}\r\n"
    )
    if status == 503:
        head += "Retry-After: 1\r\n"
    return head.encode() + b"\r\n" + body


def _parser_failed(inner: asyncio.Protocol) -> bool:
    """Whether aiohttp's request handler has queued a parse error (anything that is not a
    request message) behind the request it is serving."""
    queued = getattr(inner, "_messages", ())
    return any(not isinstance(message, RawRequestMessage) for message, _payload in queued)


class ConnectionGuard:
    """Shared by every connection of one listener."""

    def __init__(self, *, max_connections: int, header_timeout: float, log: Any = None) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.log = log
        self.open: set[GuardedProtocol] = set()
        self.by_transport: dict[int, GuardedProtocol] = {}
        self.refused = 0
        self.header_timeouts = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        interval = max(0.05, min(1.0, self.header_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for proto in list(self.open):
                if (
                    proto.head_started is not None
                    and now - proto.head_started > self.header_timeout
                ):
                    self.header_timeouts += 1
                    proto.timeout_head()

    def request_started(
        self, transport: asyncio.BaseTransport | None, body: StreamReader | None = None
    ) -> None:
        proto = self.by_transport.get(id(transport)) if transport is not None else None
        if proto is not None:
            proto.in_request = True
            proto.head_started = None
            proto.body = body

    def request_finished(self, transport: asyncio.BaseTransport | None) -> None:
        proto = self.by_transport.get(id(transport)) if transport is not None else None
        if proto is not None:
            proto.in_request = False
            proto.tail = b""
            proto.body = None


class GuardedProtocol(asyncio.Protocol):
    """Delegates everything to aiohttp's request handler, watching the request head."""

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        self.inner = inner
        self.guard = guard
        self.transport: asyncio.Transport | None = None
        self.head_started: float | None = None
        self.in_request = False
        self.tail = b""
        self.refused = False
        self.body: StreamReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass but has its methods.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        guard = self.guard
        if len(guard.open) >= guard.max_connections:
            guard.refused += 1
            self.refused = True
            transport.write(
                _plain_response(
                    503,
                    "Service Unavailable",
                    f"the sidecar has {guard.max_connections} open connections; try again",
                    "overloaded",
                )
            )
            transport.close()
            return
        guard.open.add(self)
        guard.by_transport[id(transport)] = self
        self.head_started = asyncio.get_running_loop().time()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if not self.in_request:
            window = self.tail + data
            if b"\r\n\r\n" in window:
                self.head_started = None
                self.tail = window[window.rfind(b"\r\n\r\n") + 4 :][-3:]
            else:
                if self.head_started is None:
                    self.head_started = asyncio.get_running_loop().time()
                self.tail = window[-3:]
        self.inner.data_received(data)
        body = self.body
        if body is not None and not body.is_eof() and _parser_failed(self.inner):
            # aiohttp's parser failed inside the body being read (a bad chunk size, say): it
            # queues a 400 for after the handler but never ends that body, so the handler and
            # its upstream request would wait for a timeout. End the body with the error now.
            self.body = None
            body.set_exception(
                SidecarError(
                    FailureMode.CLIENT_ERROR, "the request body's framing is malformed", status=400
                )
            )

    def eof_received(self) -> bool | None:
        if self.refused:
            return None
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self.guard.open.discard(self)
        if self.transport is not None:
            self.guard.by_transport.pop(id(self.transport), None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def timeout_head(self) -> None:
        self.head_started = None
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(
            _plain_response(
                408,
                "Request Timeout",
                f"the request head did not arrive within {self.guard.header_timeout:g}s",
                "client_error",
            )
        )
        self.transport.close()


class GuardedSite(BaseSite):
    """Like `web.TCPSite`, with every connection wrapped by a `ConnectionGuard`."""

    __slots__ = ("_bound", "_guard", "_host", "_port")

    def __init__(
        self,
        runner: BaseRunner,
        host: str,
        port: int,
        guard: ConnectionGuard,
        *,
        shutdown_timeout: float = 60.0,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, shutdown_timeout=shutdown_timeout, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = guard
        self._bound = port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._bound}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        guard = self._guard

        def factory() -> asyncio.Protocol:
            inner = server()
            return GuardedProtocol(inner, guard)

        self._server = await loop.create_server(
            factory, self._host, self._port, backlog=self._backlog, reuse_address=True
        )
        if self._server.sockets:
            self._bound = self._server.sockets[0].getsockname()[1]
        guard.start()

    async def stop(self) -> None:
        await self._guard.stop()
        await super().stop()


def site_for(runner: web.AppRunner, host: str, port: int, guard: ConnectionGuard) -> GuardedSite:
    return GuardedSite(runner, host, port, guard)
