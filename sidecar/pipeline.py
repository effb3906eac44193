"""The request pipeline: request/response types, the handler signature, and composition.

Core module (stdlib only). Strategies wrap the next handler, outermost first:

    ConfidenceGate → Fallback → Bulkhead → TotalDeadline → Retry → Breaker
        → AttemptTimeout → Transport

A response's body is a `ResponseBody`: either bytes in memory or a stream from the upstream that
the server copies to the caller chunk by chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError

__all__ = [
    "BytesBody",
    "Handler",
    "ProxyRequest",
    "ProxyResponse",
    "RequestBody",
    "ResponseBody",
    "Strategy",
    "compose",
    "header_value",
    "read_up_to",
]

Headers = list[tuple[str, str]]


def header_value(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    lname = name.lower()
    for key, value in headers:
        if key.lower() == lname:
            return value
    return None


class RequestBody:
    """The caller's body. Small bodies are held in memory (`data`) and can be replayed for a
    retry; larger ones keep the bytes already read plus the rest of the stream and can be sent
    once only."""

    def __init__(
        self, data: bytes | None, rest: AsyncIterator[bytes] | None = None, prefix: bytes = b""
    ) -> None:
        self.data = data
        self._rest = rest
        self._prefix = prefix
        self._sent = False

    @classmethod
    def empty(cls) -> RequestBody:
        return cls(b"")

    @property
    def replayable(self) -> bool:
        return self.data is not None

    @property
    def sent(self) -> bool:
        return self._sent

    def payload(self) -> bytes | AsyncIterator[bytes]:
        """What to send upstream for one attempt."""
        if self.data is not None:
            self._sent = True
            return self.data
        if self._sent:
            raise SidecarError(
                FailureMode.CLIENT_ERROR,
                "request body was already sent and is too large to replay",
                status=500,
            )
        self._sent = True
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        if self._prefix:
            yield self._prefix
        if self._rest is not None:
            async for chunk in self._rest:
                yield chunk


@dataclass
class ProxyRequest:
    method: str
    path_qs: str
    headers: Headers
    body: RequestBody = field(default_factory=RequestBody.empty)


class ResponseBody(Protocol):
    """A response body read chunk by chunk; `b""` means the end."""

    async def read_chunk(self) -> bytes: ...

    def close(self) -> None: ...


async def read_up_to(body: ResponseBody, limit: int) -> tuple[list[bytes], bool]:
    """Read `body` to its end or until more than `limit` bytes came: (chunks read, over the
    limit). A body that is over keeps the chunks for the caller to push back."""
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await body.read_chunk()
        if not chunk:
            return parts, False
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return parts, True


class BytesBody:
    """A body already in memory (a validated answer, a fallback, a sidecar error)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._done = False

    async def read_chunk(self) -> bytes:
        if self._done:
            return b""
        self._done = True
        return self.data

    def close(self) -> None:
        self._done = True


@dataclass
class ProxyResponse:
    status: int
    headers: Headers
    body: ResponseBody
    reason: str | None = None
    #: True when the body length is known and must be declared to the caller.
    content_length: int | None = None

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)


Handler = Callable[[ProxyRequest, RequestContext], Awaitable[ProxyResponse]]


class Strategy(Protocol):
    async def __call__(
        self, request: ProxyRequest, ctx: RequestContext, next: Handler
    ) -> ProxyResponse: ...


def compose(strategies: Sequence[Strategy], terminal: Handler) -> Handler:
    """Chain strategies around `terminal`, the first in the list outermost."""
    handler = terminal
    for strategy in reversed(strategies):
        handler = _bind(strategy, handler)
    return handler


def _bind(strategy: Strategy, next_handler: Handler) -> Handler:
    async def call(request: ProxyRequest, ctx: RequestContext) -> ProxyResponse:
        return await strategy(request, ctx, next_handler)

    return call
