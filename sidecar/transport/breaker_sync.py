"""Breaker state shared across replicas through Redis (`breaker.storage: redis://...`).

Local state stays authoritative: each breaker still decides on its own calls, synchronously,
exactly as without sharing. This module only passes news between replicas, in background tasks
using `redis.asyncio` (never a blocking call on the event loop):

- a local transition to open is published on the channel `<storage_prefix><breaker>` and stored
  under the key of the same name until its `open_until` (as wall-clock time), so a replica that
  connects later still learns it; a local close is published and deletes the key;
- a replica that hears of an open (or finds the key when it connects) opens its own circuit until
  the same moment (`CircuitBreaker.adopt_open`) and fails fast without calling the model; one
  that hears of a close ends its open period, so its next call probes (`hasten_probe`): its own
  probe decides whether it closes.

When Redis cannot be reached the breakers keep working locally. The condition is logged once per
outage (`breaker_sync_unavailable`, then `breaker_sync_restored`), counted (the
`on_error` callback, i.e. the metrics counter, and each breaker's snapshot under `shared`), and
the connection is retried with backoff; on reconnecting, a replica announces its own opens again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from sidecar.clock import Clock
from sidecar.context import RequestContext
from sidecar.strategies.breaker import CircuitBreaker, State

__all__ = ["BreakerSync", "redact_url"]

_OUTBOX = 1000


def redact_url(url: str) -> str:
    """The URL without its password (for logs and the admin API)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:<redacted>@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class _Link:
    """One Redis server (one storage URL) and the breakers shared through it."""

    url: str
    client: Any
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)
    #: channel (= key) → breaker name
    channels: dict[str, str] = field(default_factory=dict)
    outbox: asyncio.Queue[dict[str, Any]] = field(
        default_factory=lambda: asyncio.Queue(maxsize=_OUTBOX)
    )
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    subscribed: set[str] = field(default_factory=set)
    #: None until the first exchange; then whether the last one worked.
    available: bool | None = None
    #: Shown in every breaker's snapshot (one dict per server, shared by reference).
    status: dict[str, Any] = field(default_factory=dict)


class BreakerSync:
    """Shares the open/closed state of the breakers that name a `storage` URL."""

    def __init__(
        self,
        clock: Clock,
        *,
        log: Any,
        on_error: Callable[[str], None] | None = None,
        replica: str | None = None,
        timeout: float = 2.0,
        retry_min: float = 0.2,
        retry_max: float = 5.0,
    ) -> None:
        self.clock = clock
        self.log = log
        self.on_error = on_error
        #: Tells this process's messages from the others' (and from an earlier run's).
        self.replica = replica or secrets.token_hex(8)
        self.timeout = timeout
        self.retry_min = retry_min
        self.retry_max = retry_max
        self._links: dict[str, _Link] = {}
        self._started = False

    # -- wiring ----------------------------------------------------------------------------------
    def register(self, breaker: CircuitBreaker) -> None:
        """Share `breaker` through its config's storage URL (a reload's new breaker of the same
        name replaces the old one; one without a storage URL stops the sharing)."""
        url = breaker.config.storage
        for other in self._links.values():
            if other.url != url and other.breakers.get(breaker.name) is not None:
                del other.breakers[breaker.name]
        if url is None:
            return
        link = self._links.get(url)
        if link is None:
            link = self._link(url)
            self._links[url] = link
            if self._started:
                self._start(link)
        link.breakers[breaker.name] = breaker
        link.channels[breaker.config.storage_prefix + breaker.name] = breaker.name
        breaker.sync = link.status
        breaker.listeners.append(self._listener(link))

    def _link(self, url: str) -> _Link:
        client = redis.from_url(  # type: ignore[no-untyped-call]
            url,
            socket_connect_timeout=self.timeout,
            socket_timeout=self.timeout,
            health_check_interval=5,
            retry=Retry(NoBackoff(), 0),
        )
        link = _Link(url=url, client=client)
        link.status.update(
            storage=redact_url(url),
            connected=False,
            errors=0,
            last_error=None,
            published=0,
            received=0,
            adopted_opens=0,
        )
        return link

    def _listener(
        self, link: _Link
    ) -> Callable[[CircuitBreaker, str, str, RequestContext | None], None]:
        def on_transition(
            breaker: CircuitBreaker, old: str, new: str, ctx: RequestContext | None
        ) -> None:
            if link.breakers.get(breaker.name) is not breaker:
                return  # replaced by a reload
            if new == State.OPEN and not breaker.open_adopted:
                self._post(link, breaker, State.OPEN)
            elif new == State.CLOSED:
                self._post(link, breaker, State.CLOSED)

        return on_transition

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._started = True
        for link in self._links.values():
            self._start(link)

    def _start(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        link.tasks = [
            loop.create_task(self._subscriber(link)),
            loop.create_task(self._publisher(link)),
        ]

    async def close(self, timeout: float = 1.0) -> None:
        """Stop the background tasks and close the connections, within `timeout` seconds."""
        self._started = False
        tasks = [t for link in self._links.values() for t in link.tasks]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                if tasks:
                    await asyncio.wait(tasks)
                for link in self._links.values():
                    with contextlib.suppress(Exception):
                        await link.client.aclose()

    # -- outgoing --------------------------------------------------------------------------------
    def _post(self, link: _Link, breaker: CircuitBreaker, state: str) -> None:
        """Queue a local transition for publishing (never waits: runs inside a request)."""
        message = {
            "v": 1,
            "origin": self.replica,
            "breaker": breaker.name,
            "key": breaker.config.storage_prefix + breaker.name,
            "state": state,
            "open_until": self._to_wall(breaker.open_until) if state == State.OPEN else None,
        }
        try:
            link.outbox.put_nowait(message)
        except asyncio.QueueFull:
            self._failed(link, "publish", RuntimeError("outbox full; message dropped"))

    async def _publisher(self, link: _Link) -> None:
        while True:
            message = await link.outbox.get()
            if link.available is False:
                continue  # dropped: our opens are announced again on reconnecting
            key = message.pop("key")
            payload = json.dumps(message, separators=(",", ":"))
            try:
                async with asyncio.timeout(self.timeout):
                    async with link.client.pipeline(transaction=False) as pipe:
                        if message["state"] == State.OPEN:
                            ttl = message["open_until"] - self.clock.wall()
                            if ttl > 0:
                                pipe.set(key, payload, px=max(1, int(ttl * 1000)))
                        else:
                            pipe.delete(key)
                        pipe.publish(key, payload)
                        await pipe.execute()
                link.status["published"] += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(link, "publish", exc)

    # -- incoming --------------------------------------------------------------------------------
    async def _subscriber(self, link: _Link) -> None:
        delay = self.retry_min
        while True:
            pubsub = link.client.pubsub(ignore_subscribe_messages=True)
            link.subscribed = set()
            try:
                async with asyncio.timeout(self.timeout):
                    await self._subscribe(link, pubsub)
                    await self._adopt_stored(link)
                self._restored(link)
                self._announce(link)
                delay = self.retry_min
                while True:
                    if set(link.channels) != link.subscribed:
                        async with asyncio.timeout(self.timeout):
                            await self._subscribe(link, pubsub)
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._on_message(link, message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(link, "subscribe", exc)
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.timeout):
                        await pubsub.aclose()
            await self.clock.sleep(delay)
            delay = min(delay * 2, self.retry_max)

    async def _subscribe(self, link: _Link, pubsub: Any) -> None:
        new = [c for c in link.channels if c not in link.subscribed]
        if new:
            await pubsub.subscribe(*new)
            link.subscribed.update(new)

    async def _adopt_stored(self, link: _Link) -> None:
        """On (re)connecting: adopt the opens other replicas stored while we were away."""
        channels = list(link.channels)
        if channels:
            for channel, raw in zip(channels, await link.client.mget(channels), strict=True):
                if raw is not None:
                    self._apply(link, channel, raw)

    def _announce(self, link: _Link) -> None:
        """On (re)connecting: publish our own opens (those made while Redis was away)."""
        for breaker in link.breakers.values():
            if breaker.state == State.OPEN and not breaker.open_adopted:
                self._post(link, breaker, State.OPEN)

    def _on_message(self, link: _Link, message: dict[str, Any]) -> None:
        channel = message.get("channel")
        if isinstance(channel, bytes):
            channel = channel.decode("utf-8", "replace")
        if isinstance(channel, str):
            self._apply(link, channel, message.get("data"))

    def _apply(self, link: _Link, channel: str, raw: Any) -> None:
        name = link.channels.get(channel)
        breaker = link.breakers.get(name) if name is not None else None
        if breaker is None:
            return
        try:
            data = json.loads(raw)
            origin, state = data["origin"], data["state"]
        except (TypeError, ValueError, KeyError):
            return  # not ours to interpret
        if origin == self.replica:
            return
        link.status["received"] += 1
        if state == State.OPEN and isinstance(data.get("open_until"), int | float):
            until = self.clock.monotonic() + (float(data["open_until"]) - self.clock.wall())
            if breaker.adopt_open(until) and breaker.open_adopted:
                link.status["adopted_opens"] += 1
                self.log.info(
                    "breaker_sync_adopted_open",
                    upstream=breaker.name,
                    origin=origin,
                    open_for=round(until - self.clock.monotonic(), 3),
                )
        elif state == State.CLOSED:
            breaker.hasten_probe()

    # -- availability ----------------------------------------------------------------------------
    def _failed(self, link: _Link, operation: str, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"[:300]
        link.status["errors"] += 1
        link.status["last_error"] = error
        link.status["connected"] = False
        if self.on_error is not None:
            self.on_error(operation)
        if link.available is not False:
            self.log.warning(
                "breaker_sync_unavailable",
                storage=redact_url(link.url),
                operation=operation,
                error=error,
                breakers=sorted(link.breakers),
                note="breakers keep working locally",
            )
        link.available = False

    def _restored(self, link: _Link) -> None:
        if link.available is not True:
            self.log.info(
                "breaker_sync_restored" if link.available is False else "breaker_sync_connected",
                storage=redact_url(link.url),
                breakers=sorted(link.breakers),
            )
        link.available = True
        link.status["connected"] = True

    def _to_wall(self, monotonic: float) -> float:
        return round(self.clock.wall() + (monotonic - self.clock.monotonic()), 3)
