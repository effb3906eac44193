"""Assemble and run the sidecar: load the policy, build both listeners, serve until a signal,
then drain.

Drain on SIGTERM/SIGINT: readiness answers 503 at once; after `SIDECAR_DRAIN_DELAY` the listeners
stop accepting; in-flight requests get up to `SIDECAR_DRAIN_GRACE` to finish; then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_runner import BaseSite

from sidecar import eventloop
from sidecar.failures.capture import install_failure_capture
from sidecar.policy.builder import build_runtime
from sidecar.policy.loader import Overrides, PolicyError, load_policy
from sidecar.policy.registry import PolicyWatcher
from sidecar.policy.reviews import review_settings
from sidecar.policy.units import parse_duration
from sidecar.review.desk import ReviewDesk
from sidecar.review.settings import ReviewSettingsError
from sidecar.server.admin import admin_app
from sidecar.server.connections import ConnectionGuard, GuardedSite
from sidecar.server.observe import install_telemetry
from sidecar.server.proxy import proxy_app
from sidecar.server.state import SidecarState
from sidecar.telemetry.logging import get_logger

__all__ = ["RunSettings", "Sidecar", "run"]

log = get_logger("sidecar")


@dataclass(frozen=True)
class RunSettings:
    policy_path: Path
    overrides: Overrides = field(default_factory=Overrides)
    allow_pure_python_parser: bool = False
    drain_delay: float = 0.0
    drain_grace: float = 20.0
    reload_interval: float = 1.0
    #: `auto` (uvloop when installed: about 15% less CPU per request), `uvloop` or `asyncio`.
    event_loop: str = "auto"

    @classmethod
    def with_env(cls, policy_path: Path, overrides: Overrides, **kwargs: Any) -> RunSettings:
        env = os.environ
        return cls(
            policy_path=policy_path,
            overrides=overrides,
            drain_delay=parse_duration(env.get("SIDECAR_DRAIN_DELAY", "0s")),
            drain_grace=parse_duration(env.get("SIDECAR_DRAIN_GRACE", "20s")),
            reload_interval=parse_duration(env.get("SIDECAR_RELOAD_INTERVAL", "1s")),
            event_loop=eventloop.parse_choice(env.get("SIDECAR_EVENT_LOOP", "auto")),
            **kwargs,
        )


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def c_parser_loaded() -> bool:
    """True when aiohttp uses its C HTTP parser (the pure-Python one has a smuggling record)."""
    from aiohttp import http_parser

    return http_parser.HttpRequestParser is not http_parser.HttpRequestParserPy


class Sidecar:
    """One sidecar: state, the proxy and admin apps, and their runners."""

    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings
        self.state = SidecarState()
        env = os.environ
        self.state.admin_token = env.get("SIDECAR_ADMIN_TOKEN") or None
        self.state.reviewer_token = env.get("SIDECAR_REVIEWER_TOKEN") or None
        self.state.app_token = env.get("SIDECAR_APP_TOKEN") or None
        # Per-app tracer provider, metrics registry and alert rules (no process globals).
        install_telemetry(self.state)
        # Failure records on a bounded queue, written by a background task (SIDECAR_STATE_DIR).
        install_failure_capture(self.state)
        self._drain_started: float | None = None
        self._runners: list[web.AppRunner] = []
        self._sites: list[BaseSite] = []
        self.watcher: PolicyWatcher
        self.proxy_address = ""
        self.admin_address = ""

    def load(self) -> None:
        loaded = load_policy(self.settings.policy_path, self.settings.overrides)
        if self.state.reviews is None:
            # The queue's store (SQLite or the shared PostgreSQL) is fixed until a restart.
            try:
                desk = ReviewDesk.from_settings(
                    review_settings(loaded.policy.reviews), clock=self.state.clock
                )
            except ReviewSettingsError as exc:
                raise PolicyError(loaded.source, [f"reviews: {exc}"]) from None
            desk.metrics = self.state.metrics
            self.state.reviews = desk
        self.state.runtime = build_runtime(
            loaded.policy, loaded.source, self.state, loaded.base_dir
        )
        self.state.admin_loopback_only = _is_loopback(loaded.policy.server.admin_host)
        self.watcher = PolicyWatcher(self.settings.policy_path, self.settings.overrides)

    def reload(self, force: bool = False) -> bool:
        """Swap in a changed policy. Invalid: logged, counted, the old policy keeps serving."""
        old = self.state.runtime
        try:
            loaded = self.watcher.force() if force else self.watcher.poll()
            if loaded is None:
                return False
            runtime = build_runtime(loaded.policy, loaded.source, self.state, loaded.base_dir)
        except PolicyError as exc:
            self.state.reload_failures += 1
            log.error("policy_reload_failed", source=exc.source, errors=exc.errors)
            return False
        except Exception as exc:
            self.state.reload_failures += 1
            log.error(
                "policy_reload_failed", source=str(self.settings.policy_path), errors=[str(exc)]
            )
            return False
        if old is not None and old.policy.server != loaded.policy.server:
            log.warning("policy_server_section_changed", note="listeners change only on restart")
        self.state.runtime = runtime  # one reference swap: in-flight requests keep theirs
        self.state.reloads += 1
        log.info("policy_reloaded", source=loaded.source, routes=[r.name for r in runtime.routes])
        return True

    async def watch(self) -> None:
        interval = self.settings.reload_interval
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            self.reload()

    async def start(self) -> None:
        assert self.state.runtime is not None
        server = self.state.runtime.policy.server
        limits = self.state.runtime.policy.limits
        proxy = web.AppRunner(
            proxy_app(self.state),
            handler_cancellation=True,
            access_log=None,
            # aiohttp's own parser limits sit above ours, so the handler answers 431 with the
            # envelope; only far larger heads get aiohttp's plain 400.
            max_line_size=2 * limits.max_header_bytes,
            max_field_size=2 * limits.max_header_bytes,
            max_headers=2 * limits.max_headers + 16,
            keepalive_timeout=limits.keepalive_timeout,
            # A body left unread (refused with 413/408, or answered early) closes the connection
            # at once instead of being drained for seconds.
            lingering_time=0,
            # A compressed request body is forwarded as sent: decoded here, it would no longer
            # match its Content-Encoding or the Content-Length kept for a streamed body.
            auto_decompress=False,
        )
        admin = web.AppRunner(admin_app(self.state), handler_cancellation=True, access_log=None)
        guard = ConnectionGuard(
            max_connections=limits.max_connections, header_timeout=limits.header_timeout
        )
        self.state.guard = guard
        await proxy.setup()
        proxy_site = GuardedSite(proxy, server.host, server.port, guard)
        await proxy_site.start()
        self._runners.append(proxy)
        self._sites.append(proxy_site)
        await admin.setup()
        admin_site = web.TCPSite(admin, server.admin_host, server.admin_port, reuse_address=True)
        await admin_site.start()
        self._runners.append(admin)
        self._sites.append(admin_site)
        self.proxy_address = _bound(proxy)
        self.admin_address = _bound(admin)
        # Review status URLs point at the admin listener (unless SIDECAR_PUBLIC_ADMIN_URL says).
        self.state.review_queue().default_base_url = "http://" + self.admin_address
        reviews = self.state.review_queue()
        log.info(
            "review_store", location=reviews.settings.describe(), webhook=bool(reviews.webhooks)
        )
        store_error = await reviews.start()  # migrations, shared keys, the webhook sender
        if store_error is not None:
            log.error("review_store_unavailable", error=store_error, note="failing closed")
        if self.state.telemetry is not None:
            await self.state.telemetry.start()  # event-loop lag monitor, alert timer
        # Breakers with `storage: redis://...`: share opens and closes in the background.
        await self.state.shared_breakers().start()
        if self.state.failures is not None:
            await self.state.failures.start()  # the failure store's writer task

    async def drain(self) -> None:
        state = self.state
        state.draining = True
        self._drain_started = state.clock.monotonic()
        log.info("draining", in_flight=state.in_flight, delay=self.settings.drain_delay)
        if self.settings.drain_delay > 0:
            await asyncio.sleep(self.settings.drain_delay)
        # Stop accepting on the proxy; admin keeps answering /readyz with 503 meanwhile.
        with contextlib.suppress(Exception):
            await self._sites[0].stop()
        if state.in_flight > 0:
            try:
                async with asyncio.timeout(self.settings.drain_grace):
                    await state.idle.wait()
            except TimeoutError:
                log.warning("drain_grace_expired", in_flight=state.in_flight)
                # End the streams that outlived the grace visibly (SSE error event / abort).
                state.shutting_down = True
                for body in list(state.streams):
                    body.close()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await state.idle.wait()

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        if self.state.telemetry is not None:
            await self.state.telemetry.close(self._flush_budget())
        if self.state.failures is not None:
            # Bounded: what is still queued after this is counted as dropped.
            await self.state.failures.stop(min(2.0, self._flush_budget()))
        await self.state.close()

    def _flush_budget(self) -> float:
        """Seconds left for flushing traces: what the drain period has not used, at most 5 s
        and at least 0.5 s (a dead collector must not hold up the exit)."""
        settings = self.settings
        period = settings.drain_delay + settings.drain_grace
        if self._drain_started is not None:
            period -= self.state.clock.monotonic() - self._drain_started
        return max(0.5, min(5.0, period))


def _bound(runner: web.AppRunner) -> str:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            host, port = addr[0], addr[1]
            return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return ""


async def _serve(settings: RunSettings) -> int:
    sidecar = Sidecar(settings)
    try:
        sidecar.load()
    except PolicyError as exc:
        log.error("policy_invalid", source=exc.source, errors=exc.errors)
        print(f"sidecar: {exc}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: sidecar.reload(force=True))
    try:
        await sidecar.start()
    except OSError as exc:
        log.error("bind_failed", error=str(exc))
        await sidecar.stop()
        return 1
    assert sidecar.state.runtime is not None
    log.info(
        "listening",
        proxy=sidecar.proxy_address,
        admin=sidecar.admin_address,
        policy=sidecar.state.runtime.source,
        routes=[r.name for r in sidecar.state.runtime.routes],
        pid=os.getpid(),
        event_loop=eventloop.loop_name(),
    )
    # Everything built at start-up (modules, the policy, pydantic and OpenTelemetry objects) lives
    # as long as the process: moved out of the collector's generations, a full collection no
    # longer walks it, which otherwise stalls the event loop for tens of milliseconds.
    gc.collect()
    gc.freeze()
    # Worker threads (failure records, trace export, SQLite) hold the GIL for up to the switch
    # interval before the event loop gets it back; at the default 5 ms that is what a caller's
    # p99 sees while they run. 0.5 ms bounds the wait, and costs nothing while they are idle.
    sys.setswitchinterval(0.0005)
    watcher = asyncio.create_task(sidecar.watch())
    await stop.wait()
    watcher.cancel()
    await sidecar.drain()
    await sidecar.stop()
    log.info("stopped")
    return 0


def run(settings: RunSettings) -> int:
    if not c_parser_loaded() and not settings.allow_pure_python_parser:
        print(
            "sidecar: aiohttp's C HTTP parser is not loaded (pure-Python fallback, which has a "
            "record of request-smuggling bugs). Install aiohttp with its C extensions, or pass "
            "--allow-pure-python-parser to start anyway.",
            file=sys.stderr,
        )
        return 2
    try:
        return eventloop.run(_serve(settings), settings.event_loop)
    except ImportError:
        print("sidecar: SIDECAR_EVENT_LOOP=uvloop but uvloop is not installed", file=sys.stderr)
        return 2
