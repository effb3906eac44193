"""The reviewer API on the admin listener (bearer token of the `reviewer` scope,
`SIDECAR_REVIEWER_TOKEN`), and the capability status URL a caller reads without a token.

    GET  /reviews                  list, filtered by route, status and age; paginated
    GET  /reviews/{id}             one item: request, model answer, confidence, decision
    POST /reviews/next/claim       claim the oldest pending item (204 when none); concurrent
                                   callers on any replica get different items
    POST /reviews/{id}/claim       take a lease on an item (409 while someone else holds one)
    POST /reviews/{id}/resolve     approve / override (with a corrected answer) / reject, once
    GET  /reviews/status/{token}   the caller's status URL: status and decision only
    GET  /reviews/openapi.json     this API as an OpenAPI 3.1 document

Errors use the sidecar's JSON envelope. Store failures answer 503; nothing here blocks the event
loop (SQLite calls run on the store's own thread, PostgreSQL is asynchronous). The reviewers' web
page (`sidecar.review.ui`, `/ui/`) is mounted with these routes.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from sidecar.errors import FailureMode, SidecarError
from sidecar.policy.units import parse_duration
from sidecar.review.desk import ReviewDesk
from sidecar.review.openapi import REVIEWER_PATTERN, ROUTE_PATTERN, openapi_document
from sidecar.review.store import (
    Decision,
    Resolution,
    ReviewConflict,
    ReviewItem,
    ReviewNotFound,
    ReviewQuery,
    ReviewStatus,
    ReviewStoreError,
)
from sidecar.server.admin import error_json, json_response, require_scope
from sidecar.server.state import STATE

__all__ = ["add_review_routes", "item_json", "summary_json"]

_ID = re.compile(r"^[0-9a-f]{32}$")
_REVIEWER = re.compile(REVIEWER_PATTERN)
_ROUTE = re.compile(ROUTE_PATTERN)
# ASCII only, as the OpenAPI document says (Python's int() and \d also take other digits).
_DURATION = re.compile(r"[0-9]+(\.[0-9]+)?(ms|s|m|h)?")
_INTEGER = re.compile(r"-?[0-9]{1,9}")
_MAX_LIMIT = 500
_MAX_NAME = 200
_MAX_NOTE = 4000
_MAX_LEASE = 86400.0


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    moment = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def summary_json(item: ReviewItem) -> dict[str, Any]:
    return {
        "id": item.id,
        "route": item.route,
        "status": item.status.value,
        "confidence": item.confidence,
        "created_at": _iso(item.created_at),
        "reason": item.reason,
        "action": item.action,
        "request_id": item.request_id,
        "trace_id": item.trace_id,
        "claimed_by": item.claimed_by,
        "lease_until": _iso(item.lease_until),
        "decision": item.decision.value if item.decision else None,
    }


def item_json(item: ReviewItem, status_url: str | None) -> dict[str, Any]:
    return {
        **summary_json(item),
        "request": item.request,
        "answer": item.answer,
        "reviewer": item.reviewer,
        "note": item.note,
        "corrected_answer": item.corrected,
        "resolved_at": _iso(item.resolved_at),
        "status_url": status_url,
    }


def _bad(message: str, status: int = 400) -> SidecarError:
    return SidecarError(FailureMode.CLIENT_ERROR, message, status=status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _answers_errors(handler: Handler) -> Handler:
    """Store and request errors → the envelope (404, 409, 400, 503)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except SidecarError as err:
            return error_json(err)
        except ReviewNotFound as exc:
            return error_json(_bad(str(exc), 404))
        except ReviewConflict as exc:
            return error_json(_bad(str(exc), 409))
        except ReviewStoreError as exc:
            return error_json(
                SidecarError(
                    FailureMode.OVERLOADED, f"the review store is unavailable: {exc}", status=503
                )
            )

    return wrapped


def _desk(request: web.Request) -> ReviewDesk:
    return request.app[STATE].review_queue()


def _review_id(request: web.Request) -> str:
    review_id = request.match_info["id"]
    if not _ID.match(review_id):
        raise _bad(f"no review {review_id[:64]}", 404)
    return review_id


def _age(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if not _DURATION.fullmatch(raw):
        raise _bad(f"{name}: a duration such as 30s, 5m or 2h")
    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise _bad(f"{name}: {exc}") from None


_LIST_PARAMS = frozenset({"route", "status", "older_than", "newer_than", "limit", "cursor"})


def _query(request: web.Request) -> ReviewQuery:
    q = request.query
    unknown = sorted(set(q) - _LIST_PARAMS)
    if unknown:
        # The OpenAPI document forbids other parameters; a typo must not widen the listing.
        raise _bad(f"unknown query parameter(s): {', '.join(repr(u) for u in unknown)}")
    status = None
    if "status" in q:
        try:
            status = ReviewStatus(q["status"])
        except ValueError:
            raise _bad("status: must be pending, claimed or resolved") from None
    limit = 50
    if "limit" in q:
        if not _INTEGER.fullmatch(q["limit"]):
            raise _bad("limit: must be an integer")
        limit = int(q["limit"])
        if not 1 <= limit <= _MAX_LIMIT:
            raise _bad(f"limit: must be from 1 to {_MAX_LIMIT}")
    route = q.get("route")
    if route is not None and (len(route) > _MAX_NAME or not _ROUTE.fullmatch(route)):
        raise _bad(f"route: a route name (letters, digits, _.-; at most {_MAX_NAME})")
    return ReviewQuery(
        route=route,
        status=status,
        min_age=_age(request, "older_than"),
        max_age=_age(request, "newer_than"),
        limit=limit,
        cursor=q.get("cursor"),
    )


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise _bad("the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise _bad("the body must be a JSON object")
    return data


def _name(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or len(value) > _MAX_NAME or not _REVIEWER.fullmatch(value):
        raise _bad(
            f"{key}: a name of letters, digits, spaces and _.@+- "
            f"(at most {_MAX_NAME} characters) is required"
        )
    return value


def _lease(data: dict[str, Any]) -> float | None:
    if "lease_seconds" not in data:
        return None
    lease = data["lease_seconds"]
    if isinstance(lease, bool) or not isinstance(lease, int | float) or not 0 < lease <= _MAX_LEASE:
        raise _bad(f"lease_seconds: a number above 0 and at most {_MAX_LEASE:g}")
    return float(lease)


@require_scope("reviewer")
@_answers_errors
async def list_reviews(request: web.Request) -> web.StreamResponse:
    query = _query(request)
    desk = _desk(request)
    try:
        page = await desk.list(query)
    except ValueError as exc:
        raise _bad(f"cursor: {exc}") from None
    return json_response(
        {"items": [summary_json(item) for item in page.items], "next_cursor": page.next_cursor}
    )


@require_scope("reviewer")
@_answers_errors
async def get_review(request: web.Request) -> web.StreamResponse:
    review_id = _review_id(request)
    desk = _desk(request)
    item = await desk.get(review_id)
    if item is None:
        raise ReviewNotFound(f"no review {review_id}")
    return json_response(item_json(item, desk.status_url(item.id)))


@require_scope("reviewer")
@_answers_errors
async def claim_review(request: web.Request) -> web.StreamResponse:
    review_id = _review_id(request)
    data = await _body(request)
    reviewer = _name(data, "reviewer")
    lease = _lease(data)
    desk = _desk(request)
    item = await desk.claim(review_id, reviewer, lease)
    return json_response(item_json(item, desk.status_url(item.id)))


@require_scope("reviewer")
@_answers_errors
async def claim_next_review(request: web.Request) -> web.StreamResponse:
    data = await _body(request)
    reviewer = _name(data, "reviewer")
    lease = _lease(data)
    route = data.get("route")
    if "route" in data and (
        not isinstance(route, str) or len(route) > _MAX_NAME or not _ROUTE.fullmatch(route)
    ):
        raise _bad(f"route: a route name (letters, digits, _.-; at most {_MAX_NAME})")
    desk = _desk(request)
    item = await desk.claim_next(reviewer, route, lease)
    if item is None:
        return web.Response(status=204)
    return json_response(item_json(item, desk.status_url(item.id)))


@require_scope("reviewer")
@_answers_errors
async def resolve_review(request: web.Request) -> web.StreamResponse:
    review_id = _review_id(request)
    data = await _body(request)
    try:
        decision = Decision(str(data.get("decision")))
    except ValueError:
        raise _bad("decision: must be approve, override or reject") from None
    reviewer = _name(data, "reviewer")
    note = data.get("note")
    if note is not None and (not isinstance(note, str) or len(note) > _MAX_NOTE):
        raise _bad(f"note: a string of at most {_MAX_NOTE} characters")
    if decision is Decision.OVERRIDE and "answer" not in data:
        raise _bad("answer: an override needs the corrected answer (any JSON value)")
    resolution = Resolution(
        decision=decision,
        reviewer=reviewer,
        note=note,
        corrected=data.get("answer") if decision is Decision.OVERRIDE else None,
    )
    desk = _desk(request)
    item = await desk.resolve(review_id, resolution)
    return json_response(item_json(item, desk.status_url(item.id)))


@_answers_errors
async def review_status(request: web.Request) -> web.StreamResponse:
    """The capability URL: no token, only status and decision, and the same 404 for a forged
    token as for a missing item."""
    desk = _desk(request)
    await desk.ensure_signer()
    review_id = desk.verify(request.match_info["token"])
    item = await desk.get(review_id) if review_id is not None else None
    if item is None:
        raise _bad("no such review status", 404)
    return json_response(
        {"status": item.status.value, "decision": item.decision.value if item.decision else None}
    )


async def openapi(request: web.Request) -> web.StreamResponse:
    return web.Response(
        body=json.dumps(openapi_document(), indent=2).encode(), content_type="application/json"
    )


async def _report_backlog(app: web.Application) -> None:
    await app[STATE].review_queue().refresh_backlog()


def add_review_routes(app: web.Application) -> None:
    # Fixed paths first: `/reviews/{id}` would otherwise take them.
    app.router.add_get("/reviews/openapi.json", openapi)
    app.router.add_get("/reviews/status/{token}", review_status)
    app.router.add_get("/reviews", list_reviews)
    app.router.add_post("/reviews/next/claim", claim_next_review)
    app.router.add_get("/reviews/{id}", get_review)
    app.router.add_post("/reviews/{id}/claim", claim_review)
    app.router.add_post("/reviews/{id}/resolve", resolve_review)
    app.on_startup.append(_report_backlog)
    from sidecar.review.ui import add_review_ui

    add_review_ui(app)
