"""Assemble and run the sidecar: load the policy, build both listeners, serve until a signal,
then drain.

Drain on SIGTERM/SIGINT: readiness answers 503 at once; after `SIDECAR_DRAIN_DELAY` the listeners
stop accepting; in-flight requests get up to `SIDECAR_DRAIN_GRACE` to finish; then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.policy.builder import build_runtime
from sidecar.policy.loader import Overrides, PolicyError, load_policy
from sidecar.policy.units import parse_duration
from sidecar.server.admin import admin_app
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

    @classmethod
    def with_env(cls, policy_path: Path, overrides: Overrides, **kwargs: Any) -> RunSettings:
        env = os.environ
        return cls(
            policy_path=policy_path,
            overrides=overrides,
            drain_delay=parse_duration(env.get("SIDECAR_DRAIN_DELAY", "0s")),
            drain_grace=parse_duration(env.get("SIDECAR_DRAIN_GRACE", "20s")),
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
        self._runners: list[web.AppRunner] = []
        self._sites: list[web.TCPSite] = []
        self.proxy_address = ""
        self.admin_address = ""

    def load(self) -> None:
        loaded = load_policy(self.settings.policy_path, self.settings.overrides)
        self.state.runtime = build_runtime(
            loaded.policy, loaded.source, self.state, loaded.base_dir
        )
        self.state.admin_loopback_only = _is_loopback(loaded.policy.server.admin_host)

    async def start(self) -> None:
        assert self.state.runtime is not None
        server = self.state.runtime.policy.server
        proxy = web.AppRunner(proxy_app(self.state), handler_cancellation=True, access_log=None)
        admin = web.AppRunner(admin_app(self.state), handler_cancellation=True, access_log=None)
        for runner, host, port in (
            (proxy, server.host, server.port),
            (admin, server.admin_host, server.admin_port),
        ):
            await runner.setup()
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
            self._runners.append(runner)
            self._sites.append(site)
        self.proxy_address = _bound(proxy)
        self.admin_address = _bound(admin)

    async def drain(self) -> None:
        state = self.state
        state.draining = True
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

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        await self.state.close()


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
    )
    await stop.wait()
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
    return asyncio.run(_serve(settings))
