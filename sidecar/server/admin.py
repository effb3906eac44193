"""The admin listener: health, readiness, metrics (open) and `/admin/*` (token scopes).

`/healthz` says the process is alive; `/readyz` says a policy is loaded and the sidecar is not
draining. Admin routes need `SIDECAR_ADMIN_TOKEN` as a bearer token; when that variable is unset
they are allowed only while the admin listener is bound to loopback.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from sidecar.errors import FailureMode, SidecarError
from sidecar.server.respond import envelope, error_status
from sidecar.server.state import STATE, SidecarState

__all__ = ["admin_app", "error_json", "json_response", "require_scope"]

# "webhook": a Slack (or similar) webhook URL is itself a credential.
_SECRET_KEYS = (
    "token",
    "secret",
    "password",
    "authorization",
    "api_key",
    "apikey",
    "dsn",
    "webhook",
)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(data, indent=2, sort_keys=False, default=str).encode(),
        content_type="application/json",
    )


def error_json(err: SidecarError, request_id: str = "") -> web.Response:
    return web.Response(
        status=error_status(err),
        body=envelope(err, None, request_id),
        content_type="application/json",
    )


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if any(word in str(key).lower() for word in _SECRET_KEYS):
                out[key] = "<redacted>"
            else:
                out[key] = _redact(item)
        return out
    if isinstance(value, list):
        return [_redact(v) for v in value]
    if (
        isinstance(value, str)
        and "://" in value
        and "@" in value.split("://", 1)[1].split("/", 1)[0]
    ):
        scheme, rest = value.split("://", 1)
        return f"{scheme}://<redacted>@{rest.split('@', 1)[1]}"
    return value


Scope = str  # "admin" | "reviewer" | "app"


def require_scope(
    scope: Scope,
) -> Callable[
    [Callable[[web.Request], Awaitable[web.StreamResponse]]],
    Callable[[web.Request], Awaitable[web.StreamResponse]],
]:
    """Decorator: the handler runs only with the bearer token of `scope`."""

    def wrap(
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            denied = check_token(request, scope)
            if denied is not None:
                return denied
            return await handler(request)

        return guarded

    return wrap


def check_token(request: web.Request, scope: Scope) -> web.Response | None:
    state = request.app[STATE]
    expected = {
        "admin": state.admin_token,
        "reviewer": state.reviewer_token,
        "app": state.app_token,
    }[scope]
    env_name = {
        "admin": "SIDECAR_ADMIN_TOKEN",
        "reviewer": "SIDECAR_REVIEWER_TOKEN",
        "app": "SIDECAR_APP_TOKEN",
    }[scope]
    if not expected:
        if state.admin_loopback_only:
            return None
        return error_json(
            SidecarError(
                FailureMode.CLIENT_ERROR,
                f"{env_name} is not set and the admin listener is not loopback-only",
                status=403,
            )
        )
    header = request.headers.get("Authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        response = error_json(
            SidecarError(FailureMode.CLIENT_ERROR, f"a valid {scope} token is required", status=401)
        )
        response.headers["WWW-Authenticate"] = 'Bearer realm="sidecar"'
        return response
    return None


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining:
        return json_response({"status": "draining"}, status=503)
    if state.runtime is None:
        return json_response({"status": "no policy loaded"}, status=503)
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of the app's own registry (open, like the health checks)."""
    body, content_type = request.app[STATE].metrics.render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


@require_scope("admin")
async def policy(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.runtime is None:
        return json_response({"error": "no policy loaded"}, status=503)
    data = state.runtime.policy.model_dump(mode="json", by_alias=True)
    return json_response({"source": state.runtime.source, "policy": _redact(data)})


@require_scope("admin")
async def breakers(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return json_response({"breakers": [b.snapshot() for b in state.breakers.values()]})


@require_scope("admin")
async def bulkheads(request: web.Request) -> web.Response:
    """Each bulkhead's in-flight count, queue and (adaptive) limit."""
    state = request.app[STATE]
    return json_response({"bulkheads": [b.snapshot() for b in state.bulkheads.values()]})


@require_scope("admin")
async def force_breaker(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["upstream"]
    breaker = state.breakers.get(name)
    if breaker is None:
        return error_json(
            SidecarError(FailureMode.CLIENT_ERROR, f"no breaker named {name!r}", status=404)
        )
    action = request.query.get("action")
    if action is None and request.can_read_body:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            action = body.get("action") or body.get("state")
    if action not in ("open", "close", "closed", "reset"):
        return error_json(
            SidecarError(
                FailureMode.CLIENT_ERROR,
                'send {"action": "open" | "close" | "reset"}',
                status=400,
            )
        )
    breaker.force("close" if action == "closed" else action)
    return json_response(breaker.snapshot())


def admin_app(state: SidecarState) -> web.Application:
    app = web.Application()
    app[STATE] = state
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/policy", policy)
    app.router.add_get("/admin/breakers", breakers)
    app.router.add_get("/admin/bulkheads", bulkheads)
    app.router.add_post("/admin/breakers/{upstream}", force_breaker)
    from sidecar.review.api import add_review_routes  # it imports this module's helpers

    add_review_routes(app)
    from sidecar.failures.feedback import add_feedback_routes  # imports this module too

    add_feedback_routes(app)
    from sidecar.server.status import add_status_routes  # GET /admin/status; imports this module

    add_status_routes(app)
    return app
