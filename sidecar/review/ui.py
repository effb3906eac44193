"""The reviewers' web page at `/ui/` on the admin listener: the queue, one item, and the decision.

Server-rendered HTML (templates and static files ship as package data) with a little vanilla
JavaScript for keyboard shortcuts; every action is a plain form post, so the mouse (and a browser
without scripts) works too.

    GET  /ui/                      the open items, oldest first: age, route, confidence, status
    GET  /ui/reviews/{id}          input, model answer, confidence, trace id, and the decision form
    POST /ui/reviews/{id}/claim    take the lease (someone else's live lease: a visible error)
    POST /ui/reviews/{id}/resolve  approve / override with a corrected answer (JSON) / reject
    POST /ui/reviews/{id}/reveal   show the masked sensitive fields (logged)
    GET|POST /ui/login, POST /ui/logout

Access needs the reviewer token (`SIDECAR_REVIEWER_TOKEN`; without one the page refuses, even on
loopback). The login form does not keep the token in the browser: the session cookie
(HttpOnly, SameSite=Strict, Path=/ui/) carries the reviewer's name and an expiry, signed with a
key derived from the token, so rotating the token ends every session, and any replica with the
same token accepts it. Every form post carries a CSRF token derived from the session (the login
form: from a short-lived cookie), and a cross-origin `Origin` is refused. Fields the policy lists
in `reviews.sensitive_fields` (JSONPath into the request and answer bodies) are masked until the
reviewer asks to reveal them; each reveal is logged as `review_field_revealed`.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import html
import json
import re
import secrets
import string
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Any

from aiohttp import web

from sidecar.review.desk import ReviewDesk
from sidecar.review.events import iso_time
from sidecar.review.openapi import REVIEWER_PATTERN
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
from sidecar.server.state import STATE
from sidecar.strategies.confidence_extract import compile_json_path
from sidecar.telemetry.logging import get_logger

__all__ = ["MASK", "add_review_ui", "mask_fields"]

MASK = "«sensitive: masked»"
SESSION_COOKIE = "sidecar_review_session"
LOGIN_COOKIE = "sidecar_review_login"
SESSION_SECONDS = 8 * 3600
_LOGIN_SECONDS = 3600
_QUEUE_LIMIT = 200
_ID = re.compile(r"^[0-9a-f]{32}$")
_REVIEWER = re.compile(REVIEWER_PATTERN)
_MAX_NOTE = 4000
_MAX_ANSWER = 1024 * 1024
_KEYS_QUEUE = "<kbd>j</kbd>/<kbd>k</kbd> move · <kbd>Enter</kbd> open · click a row to open"
_KEYS_ITEM = (
    "<kbd>a</kbd> approve · <kbd>o</kbd> override (edit, then <kbd>Ctrl</kbd>+<kbd>Enter</kbd>) · "
    "<kbd>r</kbd> reject · <kbd>c</kbd> claim · <kbd>v</kbd> reveal · "
    "<kbd>j</kbd>/<kbd>k</kbd> next/previous · <kbd>q</kbd> queue"
)

log = get_logger("sidecar.review.ui")


def _load(folder: str, suffix: str) -> MappingProxyType[str, str]:
    root = resources.files("sidecar.review").joinpath(folder)
    return MappingProxyType(
        {f.name: f.read_text(encoding="utf-8") for f in root.iterdir() if f.name.endswith(suffix)}
    )


_TEMPLATES = MappingProxyType(
    {name: string.Template(text) for name, text in _load("templates", ".html").items()}
)
_STATIC = MappingProxyType(
    {
        "ui.css": (_load("static", ".css")["ui.css"], "text/css"),
        "ui.js": (_load("static", ".js")["ui.js"], "text/javascript"),
    }
)
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer Chromium sends `Origin: null` on posts.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

e = html.escape


# --- sessions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    reviewer: str
    nonce: str
    csrf: str


def _key(token: str) -> bytes:
    return hmac.new(token.encode(), b"sidecar-review-ui-session", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _csrf(key: bytes, nonce: str) -> str:
    return hmac.new(key, b"csrf:" + nonce.encode(), hashlib.sha256).hexdigest()[:40]


def _new_session(token: str, reviewer: str) -> tuple[str, Session]:
    key = _key(token)
    nonce = secrets.token_hex(16)
    payload = _b64(
        json.dumps({"r": reviewer, "n": nonce, "exp": int(time.time()) + SESSION_SECONDS}).encode()
    )
    sig = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    return f"{payload}.{sig}", Session(reviewer, nonce, _csrf(key, nonce))


def _read_session(request: web.Request) -> Session | None:
    token = request.app[STATE].reviewer_token
    cookie = request.cookies.get(SESSION_COOKIE, "")
    if not token or "." not in cookie:
        return None
    key = _key(token)
    payload, _, sig = cookie.partition(".")
    expected = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(sig.encode(), expected.encode()):
        return None
    try:
        data = json.loads(_unb64(payload))
        reviewer, nonce, exp = str(data["r"]), str(data["n"]), int(data["exp"])
    except (ValueError, KeyError, TypeError):
        return None
    if exp < time.time() or not _REVIEWER.fullmatch(reviewer):
        return None
    return Session(reviewer, nonce, _csrf(key, nonce))


def _cookie(
    response: web.StreamResponse, request: web.Request, name: str, value: str, age: int
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=age,
        path="/ui/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )


def _same_origin(request: web.Request) -> bool:
    """Browsers send `Origin` on form posts; one from elsewhere is a cross-site post."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    allowed = {f"{request.scheme}://{request.host}"}
    public = request.app[STATE].review_queue().base_url
    if public:
        allowed.add(public.rstrip("/"))
    return origin in allowed


# --- masking -----------------------------------------------------------------------------------


def _parse(body: Any) -> Any:
    if isinstance(body, str):
        try:
            return json.loads(body)
        except ValueError:
            return None
    return None


def mask_fields(document: Any, paths: tuple[str, ...]) -> tuple[Any, list[str]]:
    """The document with every value a path matches replaced by `MASK`, and the paths that
    matched something."""
    matched: list[str] = []
    document = copy.deepcopy(document)  # jsonpath-ng updates in place
    for path in paths:
        expr = compile_json_path(path)
        if expr.find(document):
            matched.append(path)
            document = expr.update(document, MASK)
    return document, matched


def _pretty(body: Any, paths: tuple[str, ...], reveal: bool) -> tuple[str, list[str]]:
    """HTML for a captured body: JSON pretty-printed (sensitive fields masked unless revealed),
    anything else as text."""
    parsed = _parse(body)
    if parsed is None:
        return e("" if body is None else str(body)), []
    masked, matched = mask_fields(parsed, paths) if paths else (parsed, [])
    shown = parsed if reveal else masked
    text = e(json.dumps(shown, indent=2, ensure_ascii=False))
    if not reveal and matched:
        text = text.replace(e(json.dumps(MASK, ensure_ascii=False)), _span_mask())
    return text, matched


def _span_mask() -> str:
    return f'<span class="masked">{e(json.dumps(MASK, ensure_ascii=False))}</span>'


def _sensitive(request: web.Request) -> tuple[str, ...]:
    runtime = request.app[STATE].runtime
    if runtime is None:
        return ()
    return tuple(runtime.policy.reviews.sensitive_fields)


# --- rendering ---------------------------------------------------------------------------------


def _page(
    request: web.Request,
    *,
    title: str,
    page: str,
    content: str,
    session: Session | None,
    flash: str = "",
    keys: str = "",
    status: int = 200,
) -> web.Response:
    who = ""
    if session is not None:
        who = (
            f'<span class="session">Signed in as <strong>{e(session.reviewer)}</strong>'
            f'<form method="post" action="/ui/logout"><input type="hidden" name="csrf" '
            f'value="{e(session.csrf)}"><button class="link" type="submit">Sign out</button>'
            "</form></span>"
        )
    body = _TEMPLATES["layout.html"].substitute(
        title=e(title), page=page, session=who, flash=flash, content=content, keys=keys
    )
    return web.Response(
        text=body, status=status, content_type="text/html", charset="utf-8", headers=_HEADERS
    )


def _alert(message: str, kind: str = "error") -> str:
    role = "alert" if kind == "error" else "status"
    return f'<div class="alert {kind}" role="{role}" id="flash">{e(message)}</div>'


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def _confidence(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _status_text(item: ReviewItem) -> str:
    if item.status is ReviewStatus.CLAIMED:
        return f"claimed by {item.claimed_by}"
    if item.status is ReviewStatus.RESOLVED and item.decision is not None:
        return f"resolved: {item.decision.value}"
    return item.status.value


async def _open_items(desk: ReviewDesk) -> tuple[list[ReviewItem], bool]:
    pending = await desk.list(ReviewQuery(status=ReviewStatus.PENDING, limit=_QUEUE_LIMIT))
    claimed = await desk.list(ReviewQuery(status=ReviewStatus.CLAIMED, limit=_QUEUE_LIMIT))
    items = sorted([*pending.items, *claimed.items], key=lambda i: (i.created_at, i.id))
    more = pending.next_cursor is not None or claimed.next_cursor is not None
    return items[:_QUEUE_LIMIT], more or len(items) > _QUEUE_LIMIT


def _unavailable(request: web.Request, session: Session | None, exc: Exception) -> web.Response:
    return _page(
        request,
        title="Unavailable",
        page="error",
        content="<h1>The review queue is unavailable</h1>",
        flash=_alert(f"The review store cannot be reached: {exc}"),
        session=session,
        status=503,
    )


# --- handlers ----------------------------------------------------------------------------------

Handler = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]


def _signed_in(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A session is required; a form post also needs its CSRF token and a same-origin
    `Origin`."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        session = _read_session(request)
        if session is None:
            if request.method == "GET":
                raise web.HTTPSeeOther("/ui/login")
            return _page(
                request,
                title="Signed out",
                page="error",
                content='<h1>Signed out</h1><p><a href="/ui/login">Sign in again</a></p>',
                flash=_alert("Your session has ended: sign in again."),
                session=None,
                status=401,
            )
        if request.method == "POST":
            form = await request.post()
            given = str(form.get("csrf", ""))
            if not _same_origin(request) or not hmac.compare_digest(
                given.encode(), session.csrf.encode()
            ):
                return _page(
                    request,
                    title="Refused",
                    page="error",
                    content='<h1>Refused</h1><p><a href="/ui/">Back to the queue</a></p>',
                    flash=_alert("This form was not sent from the review page (CSRF check)."),
                    session=session,
                    status=403,
                )
        try:
            return await handler(request, session)
        except ReviewStoreError as exc:
            return _unavailable(request, session, exc)

    return guarded


async def login_form(request: web.Request) -> web.StreamResponse:
    if _read_session(request) is not None:
        raise web.HTTPSeeOther("/ui/")
    return _login_page(request, "", "", 200)


def _login_page(request: web.Request, reviewer: str, error: str, status: int) -> web.Response:
    nonce = secrets.token_hex(16)
    flash = _alert(error) if error else ""
    if not request.app[STATE].reviewer_token:
        flash = _alert("The review page needs SIDECAR_REVIEWER_TOKEN to be set on the sidecar.")
    content = _TEMPLATES["login.html"].substitute(
        csrf=nonce, reviewer=e(reviewer), hours=SESSION_SECONDS // 3600
    )
    response = _page(
        request,
        title="Sign in",
        page="login",
        content=content,
        session=None,
        flash=flash,
        status=status,
    )
    _cookie(response, request, LOGIN_COOKIE, nonce, _LOGIN_SECONDS)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    reviewer = str(form.get("reviewer", "")).strip()
    given = str(form.get("token", ""))
    csrf = str(form.get("csrf", ""))
    expected_csrf = request.cookies.get(LOGIN_COOKIE, "")
    if (
        not expected_csrf
        or not _same_origin(request)
        or not hmac.compare_digest(csrf.encode(), expected_csrf.encode())
    ):
        return _login_page(request, reviewer, "The sign-in form expired: try again.", 403)
    token = request.app[STATE].reviewer_token
    if not token:
        return _login_page(request, reviewer, "", 403)
    if not hmac.compare_digest(given.encode(), token.encode()):
        log.warning("review_ui_login_failed", reviewer=reviewer[:200], remote=request.remote)
        return _login_page(request, reviewer, "That is not the reviewer token.", 401)
    if len(reviewer) > 200 or not _REVIEWER.fullmatch(reviewer):
        return _login_page(
            request, reviewer, "Your name: letters, digits, spaces and _.@+- only.", 400
        )
    cookie, _ = _new_session(token, reviewer)
    response = _see_other("/ui/")
    _cookie(response, request, SESSION_COOKIE, cookie, SESSION_SECONDS)
    response.del_cookie(LOGIN_COOKIE, path="/ui/")
    log.info("review_ui_login", reviewer=reviewer)
    return response


@_signed_in
async def logout(request: web.Request, session: Session) -> web.StreamResponse:
    response = _see_other("/ui/login")
    response.del_cookie(SESSION_COOKIE, path="/ui/")
    return response


@_signed_in
async def queue(request: web.Request, session: Session) -> web.StreamResponse:
    desk = request.app[STATE].review_queue()
    items, more = await _open_items(desk)
    now = desk.clock.wall()
    rows = []
    for n, item in enumerate(items):
        href = f"/ui/reviews/{item.id}"
        rows.append(
            f'<tr data-href="{href}" data-id="{item.id}" id="row-{n}">'
            f'<td class="age">{_age(now - item.created_at)}</td>'
            f"<td>{e(item.route)}</td>"
            f'<td class="confidence">{_confidence(item.confidence)}</td>'
            f"<td>{e(item.reason)}</td>"
            f"<td>{e(_status_text(item))}</td>"
            f'<td><a href="{href}"><code>{item.id[:12]}</code></a></td></tr>'
        )
    flash = ""
    done, decision = request.query.get("done", ""), request.query.get("decision", "")
    if _ID.fullmatch(done) and decision in {d.value for d in Decision}:
        flash = _alert(f"Resolved {done[:12]}: {decision}.", "ok")
    content = _TEMPLATES["queue.html"].substitute(
        count=len(items),
        more="More items wait beyond these." if more else "",
        rows="\n".join(rows),
        empty='<p class="empty" id="empty">Nothing to review.</p>' if not items else "",
    )
    return _page(
        request,
        title="Queue",
        page="queue",
        content=content,
        session=session,
        flash=flash,
        keys=_KEYS_QUEUE,
    )


async def _item_page(
    request: web.Request,
    session: Session,
    review_id: str,
    *,
    reveal: bool = False,
    flash: str = "",
    status: int = 200,
    note: str = "",
    answer: str | None = None,
) -> web.StreamResponse:
    desk = request.app[STATE].review_queue()
    item = await desk.get(review_id)
    if item is None:
        return _page(
            request,
            title="Not found",
            page="error",
            content='<h1>No such review</h1><p><a href="/ui/">Back to the queue</a></p>',
            flash=_alert(f"There is no review {review_id[:64]}."),
            session=session,
            status=404,
        )
    paths = _sensitive(request)
    request_body, req_matched = _pretty(item.request.get("body"), paths, reveal)
    answer_body, ans_matched = _pretty(item.answer.get("body"), paths, reveal)
    matched = sorted(set(req_matched) | set(ans_matched))
    if reveal and matched:
        log.info(
            "review_field_revealed",
            review_id=item.id,
            reviewer=session.reviewer,
            route=item.route,
            trace_id=item.trace_id,
            fields=matched,
        )
    mask_note = ""
    if matched and not reveal:
        mask_note = (
            f'<div class="alert warn" id="masked-note">{len(matched)} sensitive field(s) masked'
            f" ({e(', '.join(matched))}). "
            f'<form method="post" action="/ui/reviews/{item.id}/reveal" class="inline">'
            f'<input type="hidden" name="csrf" value="{e(session.csrf)}">'
            '<button type="submit" id="reveal" data-key="v">Reveal (v)</button>'
            "<span>Revealing is logged.</span></form></div>"
        )
    elif matched:
        mask_note = _alert(
            f"Sensitive fields shown ({', '.join(matched)}); this reveal was logged.", "warn"
        )
    items, _ = await _open_items(desk)
    ids = [i.id for i in items]
    prev = nxt = ""
    if item.id in ids:
        at = ids.index(item.id)
        if at > 0:
            prev = f'<a id="prev-item" href="/ui/reviews/{ids[at - 1]}">&uarr; Previous (k)</a>'
        if at + 1 < len(ids):
            nxt = f'<a id="next-item" href="/ui/reviews/{ids[at + 1]}">&darr; Next (j)</a>'
    elif ids:
        nxt = f'<a id="next-item" href="/ui/reviews/{ids[0]}">&darr; Next open item (j)</a>'
    decision_facts = ""
    actions = ""
    if item.status is ReviewStatus.RESOLVED:
        corrected = ""
        if item.decision is Decision.OVERRIDE:
            corrected = (
                "<dt>Corrected answer</dt><dd><pre>"
                + e(json.dumps(item.corrected, indent=2, ensure_ascii=False))
                + "</pre></dd>"
            )
        decision_facts = (
            f"<dt>Decision</dt><dd>{e(item.decision.value if item.decision else '')} by "
            f"{e(item.reviewer or '')} at {e(iso_time(item.resolved_at) or '')}</dd>"
            + (f"<dt>Note</dt><dd>{e(item.note)}</dd>" if item.note else "")
            + corrected
        )
    else:
        answer_masked = bool(ans_matched) and not reveal
        prefill = answer
        if prefill is None:
            parsed = _parse(item.answer.get("body"))
            prefill = (
                ""
                if answer_masked or parsed is None
                else json.dumps(parsed, indent=2, ensure_ascii=False)
            )
        if item.status is ReviewStatus.CLAIMED:
            holder = "you" if item.claimed_by == session.reviewer else item.claimed_by or ""
            claim_note = f"Claimed by {holder} until {iso_time(item.lease_until)}."
        else:
            claim_note = "Claim it so that nobody else decides it meanwhile."
        actions = _TEMPLATES["actions.html"].substitute(
            id=item.id,
            csrf=e(session.csrf),
            claim_note=e(claim_note),
            answer_hint=e(
                "Reveal the sensitive fields to start from the model's answer"
                if answer_masked
                else "The corrected answer as JSON"
            ),
            answer_prefill=e(prefill),
            note=e(note),
        )
    content = _TEMPLATES["item.html"].substitute(
        prev=prev,
        next=nxt,
        short_id=item.id[:12],
        status=item.status.value,
        status_text=e(_status_text(item)),
        confidence=_confidence(item.confidence),
        route=e(item.route),
        reason=e(item.reason),
        action=e(item.action),
        created_iso=e(iso_time(item.created_at) or ""),
        age=_age(desk.clock.wall() - item.created_at),
        trace_id=e(item.trace_id),
        request_id=e(item.request_id),
        decision_facts=decision_facts,
        mask_note=mask_note,
        request_meta=e(f"{item.request.get('method', '')} {item.request.get('path', '')}"),
        request_body=request_body,
        answer_meta=e(f"HTTP {item.answer.get('status', '')}"),
        answer_body=answer_body,
        actions=actions,
    )
    return _page(
        request,
        title=f"Review {item.id[:12]}",
        page="item",
        content=content,
        session=session,
        flash=flash,
        keys=_KEYS_ITEM,
        status=status,
    )


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, **_HEADERS})


def _review_id(request: web.Request) -> str:
    review_id = request.match_info["id"]
    if not _ID.fullmatch(review_id):
        raise web.HTTPNotFound(text="no such review")
    return review_id


@_signed_in
async def item_page(request: web.Request, session: Session) -> web.StreamResponse:
    return await _item_page(request, session, _review_id(request))


@_signed_in
async def reveal(request: web.Request, session: Session) -> web.StreamResponse:
    return await _item_page(request, session, _review_id(request), reveal=True)


@_signed_in
async def claim(request: web.Request, session: Session) -> web.StreamResponse:
    review_id = _review_id(request)
    desk = request.app[STATE].review_queue()
    try:
        await desk.claim(review_id, session.reviewer)
    except ReviewConflict as exc:
        return await _item_page(request, session, review_id, flash=_alert(str(exc)), status=409)
    except ReviewNotFound:
        return await _item_page(request, session, review_id)
    return await _item_page(
        request, session, review_id, flash=_alert("Claimed: it is yours for now.", "ok")
    )


@_signed_in
async def resolve(request: web.Request, session: Session) -> web.StreamResponse:
    review_id = _review_id(request)
    form = await request.post()
    note = str(form.get("note", "")).strip()
    answer_text = str(form.get("answer", ""))

    async def again(message: str, status: int) -> web.StreamResponse:
        return await _item_page(
            request,
            session,
            review_id,
            flash=_alert(message),
            status=status,
            note=note,
            answer=answer_text,
        )

    try:
        decision = Decision(str(form.get("decision", "")))
    except ValueError:
        return await again("Choose approve, override or reject.", 400)
    if len(note) > _MAX_NOTE:
        return await again(f"The note is longer than {_MAX_NOTE} characters.", 400)
    corrected: Any = None
    if decision is Decision.OVERRIDE:
        if not answer_text.strip():
            return await again("An override needs the corrected answer (JSON).", 400)
        if len(answer_text) > _MAX_ANSWER:
            return await again("The corrected answer is too large.", 400)
        try:
            corrected = json.loads(answer_text)
        except ValueError as exc:
            return await again(f"The corrected answer is not valid JSON: {exc}", 400)
    desk = request.app[STATE].review_queue()
    try:
        await desk.resolve(
            review_id,
            Resolution(
                decision=decision, reviewer=session.reviewer, note=note or None, corrected=corrected
            ),
        )
    except ReviewConflict as exc:
        return await again(str(exc), 409)
    except ReviewNotFound:
        return await again("There is no such review.", 404)
    raise web.HTTPSeeOther(f"/ui/?done={review_id}&decision={decision.value}")


async def static(request: web.Request) -> web.StreamResponse:
    found = _STATIC.get(request.match_info["name"])
    if found is None:
        raise web.HTTPNotFound()
    text, content_type = found
    return web.Response(
        text=text,
        content_type=content_type,
        charset="utf-8",
        headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"},
    )


async def to_queue(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/ui/")


def add_review_ui(app: web.Application) -> None:
    app.router.add_get("/ui", to_queue)
    app.router.add_get("/ui/", queue)
    app.router.add_get("/ui/login", login_form)
    app.router.add_post("/ui/login", login)
    app.router.add_post("/ui/logout", logout)
    app.router.add_get("/ui/static/{name}", static)
    app.router.add_get("/ui/reviews/{id}", item_page)
    app.router.add_post("/ui/reviews/{id}/claim", claim)
    app.router.add_post("/ui/reviews/{id}/resolve", resolve)
    app.router.add_post("/ui/reviews/{id}/reveal", reveal)
