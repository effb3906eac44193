"""The last-known-good cache of the `cache` fallback: good answers kept per request, per caller.

A key is the route, the method and path, the configured identity headers (default
`authorization`, so one caller never gets another's answer) and a SHA-256 of the request body.
Entries expire after `ttl` and the least recently used go first beyond `max_entries`. Only
answers whose whole body was delivered are stored, and only up to `max_body` bytes: a larger
answer is classified `too_large` and not kept (the bytes read are capped, never unbounded).
What counts as good (the confidence gate's auto band, or a plain 2xx without a gate) is decided
by the fallback strategy when the request is over.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.clock import Clock
from sidecar.pipeline import ProxyRequest, ResponseBody, header_value, read_up_to

__all__ = ["CacheConfig", "CachedAnswer", "LastKnownGood", "RecordingBody", "cache_key"]

#: Response headers that describe one delivery, not the answer: never replayed from the cache.
_NOT_STORED = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "date",
        "set-cookie",
        "x-request-id",
        "x-trace-id",
        "retry-after",
        "age",
    }
)


@dataclass(frozen=True)
class CacheConfig:
    ttl: float = 600.0
    max_entries: int = 1000
    key_headers: tuple[str, ...] = ("authorization",)
    max_body: int = 1024 * 1024


@dataclass(frozen=True)
class CachedAnswer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float


def cache_key(route: str, request: ProxyRequest, key_headers: Sequence[str]) -> str | None:
    """The entry key, or None when the body was too large to keep (nothing to hash)."""
    data = request.body.data
    if data is None:
        return None
    h = hashlib.sha256()
    for part in (route, request.method.upper(), request.path_qs):
        h.update(part.encode("utf-8", "surrogateescape") + b"\0")
    for name in key_headers:
        value = header_value(request.headers, name)
        # An absent header and an empty one are different callers.
        h.update(
            name.lower().encode()
            + (b"=" + value.encode("latin-1", "replace") if value is not None else b"!")
            + b"\0"
        )
    h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


def storable_headers(headers: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple(
        (k, v)
        for k, v in headers
        if k.lower() not in _NOT_STORED and not k.lower().startswith("x-sidecar-")
    )


class LastKnownGood:
    """A bounded LRU of answers with a TTL, read on the injected clock."""

    def __init__(self, config: CacheConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self._entries: OrderedDict[str, CachedAnswer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.clock.monotonic() - entry.stored_at > self.config.ttl:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, status: int, headers: Sequence[tuple[str, str]], body: bytes) -> None:
        if len(body) > self.config.max_body:
            return
        self._entries[key] = CachedAnswer(
            status=status,
            headers=storable_headers(headers),
            body=body,
            stored_at=self.clock.monotonic(),
        )
        self._entries.move_to_end(key)
        while len(self._entries) > self.config.max_entries:
            self._entries.popitem(last=False)


class RecordingBody:
    """Passes a body through while keeping a copy of up to `cap` bytes.

    `complete` turns True when the body was read to its end; `too_large` when it outgrew the cap
    (the copy is dropped at once, so memory stays bounded).
    """

    def __init__(self, inner: ResponseBody, cap: int) -> None:
        self._inner = inner
        self._cap = cap
        self._parts: list[bytes] = []
        self._size = 0
        self._pushed_back: list[bytes] = []
        self.complete = False
        self.too_large = False

    @property
    def data(self) -> bytes | None:
        if not self.complete or self.too_large:
            return None
        return b"".join(self._parts)

    async def read_chunk(self) -> bytes:
        if self._pushed_back:
            return self._pushed_back.pop(0)
        chunk = await self._inner.read_chunk()
        if not chunk:
            self.complete = True
            return chunk
        if not self.too_large:
            self._size += len(chunk)
            if self._size > self._cap:
                self.too_large = True
                self._parts = []
            else:
                self._parts.append(chunk)
        return chunk

    async def read_all(self, limit: int) -> bytes | None:
        """Everything up to `limit` bytes; None (and the rest left unread) when over it."""
        parts, over = await read_up_to(self, limit)
        if over:
            self._pushed_back[:0] = parts
            return None
        return b"".join(parts)

    def close(self) -> None:
        self._inner.close()
