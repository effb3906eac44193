"""The server's side of telemetry: `install_telemetry` wires the app's `Telemetry` to its state
(breaker transitions, scrape-time gauges, the current policy), and `begin_request` starts a
request's server span from the aiohttp request.

HTTP semantic-convention attributes come from what the caller sent (method, path without the
query, scheme, host, client address, protocol version, user agent); never headers' values
otherwise, bodies or the query string, which may carry secrets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from sidecar.context import RequestContext
from sidecar.policy.schema import Policy
from sidecar.server.state import SidecarState
from sidecar.telemetry.events import FIRST_BYTE_KEY, RequestTelemetry, Telemetry

__all__ = [
    "begin_request",
    "first_byte_sent",
    "install_telemetry",
    "server_attributes",
    "telemetry_of",
]


def server_attributes(request: web.Request) -> dict[str, Any]:
    host = request.host or ""
    address, _, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
    attrs: dict[str, Any] = {
        "http.request.method": request.method,
        "url.path": request.path if request.raw_path.startswith("/") else None,
        "url.scheme": request.scheme,
        "server.address": address or host or None,
        "server.port": int(port) if port.isdigit() else None,
        "client.address": request.remote,
        "network.protocol.version": f"{request.version.major}.{request.version.minor}",
        "user_agent.original": (request.headers.get("User-Agent") or "")[:256] or None,
    }
    return attrs


def telemetry_of(state: SidecarState) -> Telemetry:
    """The app's telemetry; an app built without one (tests) gets one that exports nothing."""
    if state.telemetry is None:
        return install_telemetry(state, env={"OTEL_TRACES_EXPORTER": "none"})
    return state.telemetry


def begin_request(
    state: SidecarState, request: web.Request, ctx: RequestContext
) -> RequestTelemetry:
    return telemetry_of(state).begin(ctx, request.headers, server_attributes(request))


def first_byte_sent(ctx: RequestContext) -> None:
    """The first body byte went to the caller (the first token of a stream)."""
    if FIRST_BYTE_KEY not in ctx.extra:
        ctx.extra[FIRST_BYTE_KEY] = ctx.elapsed()


def install_telemetry(state: SidecarState, env: Mapping[str, str] | None = None) -> Telemetry:
    """Create the app's telemetry and wire it to the state: breaker transitions, scrape-time
    gauges, the current policy (sampling ratio, alert rules) and the routes' path templates."""

    def policy() -> Policy | None:
        return state.runtime.policy if state.runtime is not None else None

    def route_template(name: str) -> str | None:
        runtime = state.runtime
        if runtime is None:
            return None
        for route in runtime.routes:
            if route.name == name:
                return route.path_prefix
        return None

    telemetry = Telemetry(
        state.metrics, state.clock, policy=policy, route_template=route_template, env=env
    )
    state.metrics.watch(
        breakers=lambda: state.breakers.values(),
        in_flight=lambda: state.in_flight,
        wall=state.clock.wall,
    )
    state.breaker_listeners.append(telemetry.breaker_transition)
    for breaker in state.breakers.values():
        breaker.listeners.append(telemetry.breaker_transition)
    state.telemetry = telemetry
    return telemetry
