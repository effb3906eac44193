"""The reviewers' page in a real headless Chromium (Debian's `chromium`, driven by Playwright's
async API; never a downloaded browser): sign in with the reviewer token, read the queue oldest
first, open items with the keyboard and the mouse, see sensitive fields masked until revealed
(and the reveal logged), resolve items (approve, a rejected bad override, a good override,
reject) and watch each leave the queue. Plus what a browser cannot show: the session cookie's
attributes, CSRF refusals, and no access without the reviewer token."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import SidecarFactory, SidecarProc, simple_policy

TOKEN = "reviewer-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
INFER = "/v2/models/fraud/infer"
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SECRET_INPUT = 4242.125

pytestmark = pytest.mark.timeout(60)


def v2_input(value: float) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [value]}]}


def require_chromium() -> None:
    """In CI a missing browser fails the test; elsewhere it skips with the reason."""
    if shutil.which(CHROMIUM) is None:
        reason = (
            f"Debian's chromium is not installed at {CHROMIUM} "
            "(install it with scripts/ensure-system-deps.sh chromium)"
        )
        if os.environ.get("CI"):
            pytest.fail(reason + " - required in CI", pytrace=False)
        pytest.skip(reason)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    require_chromium()
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("playwright is not installed (the test extra)", pytrace=False)
        pytest.skip("playwright is not installed (the test extra)")
    async with async_playwright() as pw:
        instance = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield instance
        finally:
            await instance.close()


async def queue_items(http: aiohttp.ClientSession, sc: SidecarProc, n: int) -> list[str]:
    ids = []
    for i, confidence in enumerate([0.71, 0.62, 0.55][:n]):
        headers = {"x-demo-fault": f"confidence={confidence}", "x-request-id": f"ui-{i}"}
        value = SECRET_INPUT if i == 1 else float(i)
        async with http.post(sc.url + INFER, json=v2_input(value), headers=headers) as resp:
            assert resp.status == 202
            ids.append(resp.headers["x-sidecar-review-id"])
    return ids


async def item(http: aiohttp.ClientSession, sc: SidecarProc, review_id: str) -> Any:
    async with http.get(f"{sc.admin_url}/reviews/{review_id}", headers=AUTH) as resp:
        return await resp.json()


@pytest.fixture
def sidecar(model_url: str, start_sidecar: SidecarFactory) -> SidecarProc:
    policy = simple_policy(
        model_url,
        confidence={"extract": {"kind": "kserve_v2", "output": "predict_proba"}, "audit_sample": 0},
        retry={"max_attempts": 1},
    )
    policy["reviews"] = {"sensitive_fields": ["$.inputs[*].data"]}
    return start_sidecar(policy, env={"SIDECAR_REVIEWER_TOKEN": TOKEN})


async def test_a_reviewer_resolves_items_through_the_page(
    browser: Any, sidecar: SidecarProc, http: aiohttp.ClientSession
) -> None:
    sc = sidecar
    ids = await queue_items(http, sc, 3)
    page = await browser.new_page()
    page.set_default_timeout(10_000)

    # Signing in: the wrong token is refused visibly, the right one opens the queue.
    await page.goto(sc.admin_url + "/ui/")
    assert page.url.endswith("/ui/login")
    await page.fill("#reviewer", "Alice Smith")
    await page.fill("#token", "not-the-token")
    await page.click("button[type=submit]")
    assert "not the reviewer token" in await page.inner_text("[role=alert]")
    await page.fill("#token", TOKEN)
    await page.click("button[type=submit]")
    await page.wait_for_url(re.compile(r"/ui/$"))
    assert "Alice Smith" in await page.inner_text("header")
    (cookie,) = [c for c in await page.context.cookies() if c["name"] == "sidecar_review_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui/"
    assert TOKEN not in cookie["value"]

    # The queue: oldest first, with confidence, route and age.
    rows = page.locator("#queue tbody tr")
    assert await rows.count() == 3
    assert [await r.get_attribute("data-id") for r in await rows.all()] == ids
    first = await rows.nth(0).inner_text()
    assert "0.7100" in first and "default" in first and re.search(r"\d+s", first)

    # Keyboard: j selects the second row, Enter opens it.
    await page.keyboard.press("j")
    assert "selected" in (await rows.nth(1).get_attribute("class") or "")
    await page.keyboard.press("Enter")
    await page.wait_for_url(re.compile(ids[1]))
    assert (await page.inner_text(".confidence")).strip() == "0.6200"
    stored = await item(http, sc, ids[1])
    assert await page.inner_text("#trace-id") == stored["trace_id"]
    assert "0.62" in await page.inner_text("#answer-body")  # the model's answer
    # The sensitive input is masked until revealed, and the reveal is logged.
    assert str(SECRET_INPUT) not in await page.inner_text("#request-body")
    assert "sensitive: masked" in await page.inner_text("#request-body")
    await page.keyboard.press("v")
    await page.wait_for_selector("text=this reveal was logged")
    assert str(SECRET_INPUT) in await page.inner_text("#request-body")
    revealed = sc.rp.wait_for_log(lambda r: r.get("event") == "review_field_revealed")
    assert revealed["review_id"] == ids[1] and revealed["reviewer"] == "Alice Smith"
    assert revealed["fields"] == ["$.inputs[*].data"]
    assert str(SECRET_INPUT) not in json.dumps(revealed)

    # a approves: back on the queue, the item is gone.
    await page.keyboard.press("a")
    await page.wait_for_url(re.compile(r"/ui/\?done="))
    assert "Resolved" in await page.inner_text("#flash")
    assert await rows.count() == 2
    assert ids[1] not in [await r.get_attribute("data-id") for r in await rows.all()]
    done = await item(http, sc, ids[1])
    assert (done["decision"], done["reviewer"]) == ("approve", "Alice Smith")

    # Mouse: click a row, try an override that is not JSON (a visible error), then fix it.
    await rows.nth(1).click()
    await page.wait_for_url(re.compile(ids[2]))
    await page.fill("#answer", "{not json")
    await page.fill("#note", "label was wrong")
    await page.click("#override")
    assert "not valid JSON" in await page.inner_text("[role=alert]")
    assert await page.input_value("#note") == "label was wrong"  # nothing typed is lost
    assert (await item(http, sc, ids[2]))["status"] == "pending"
    await page.fill("#answer", '{"label": "fraud"}')
    await page.focus("#answer")
    await page.keyboard.press("Control+Enter")
    await page.wait_for_url(re.compile(r"/ui/\?done="))
    assert await rows.count() == 1
    done = await item(http, sc, ids[2])
    assert done["decision"] == "override" and done["corrected_answer"] == {"label": "fraud"}
    assert done["note"] == "label was wrong"

    # Someone else's claim is a visible conflict; r rejects once it is free.
    async with http.post(
        f"{sc.admin_url}/reviews/{ids[0]}/claim",
        json={"reviewer": "bob", "lease_seconds": 0.5},
        headers=AUTH,
    ) as resp:
        assert resp.status == 200
    await page.keyboard.press("Enter")
    await page.wait_for_url(re.compile(ids[0]))
    await page.keyboard.press("r")
    assert "claimed by bob" in await page.inner_text("[role=alert]")
    await page.wait_for_timeout(600)  # let bob's half-second lease run out
    await page.keyboard.press("r")
    await page.wait_for_url(re.compile(r"/ui/\?done="))
    assert await page.inner_text("#empty") == "Nothing to review."
    assert (await item(http, sc, ids[0]))["decision"] == "reject"
    await page.close()


async def test_form_posts_need_the_session_and_its_csrf_token(
    sidecar: SidecarProc, http: aiohttp.ClientSession
) -> None:
    sc = sidecar
    (review_id,) = await queue_items(http, sc, 1)
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as browser_like:
        async with browser_like.get(sc.admin_url + "/ui/login") as resp:
            html = await resp.text()
        login_csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
        assert login_csrf is not None
        # The login form itself carries a CSRF token.
        form = {"reviewer": "eve", "token": TOKEN, "csrf": "forged"}
        async with browser_like.post(sc.admin_url + "/ui/login", data=form) as resp:
            assert resp.status == 403
        async with browser_like.get(sc.admin_url + "/ui/login") as resp:
            html = await resp.text()
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
        assert csrf is not None
        form = {"reviewer": "carol", "token": TOKEN, "csrf": csrf.group(1)}
        async with browser_like.post(
            sc.admin_url + "/ui/login", data=form, allow_redirects=False
        ) as resp:
            assert resp.status == 303
        async with browser_like.get(f"{sc.admin_url}/ui/reviews/{review_id}") as resp:
            html = await resp.text()
            assert resp.status == 200
        token = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
        assert token is not None
        url = f"{sc.admin_url}/ui/reviews/{review_id}/resolve"
        async with browser_like.post(url, data={"decision": "approve"}) as resp:
            assert resp.status == 403  # no CSRF token
        async with browser_like.post(
            url,
            data={"decision": "approve", "csrf": token.group(1)},
            headers={"Origin": "http://evil.example"},
        ) as resp:
            assert resp.status == 403  # a cross-site post
        assert (await item(http, sc, review_id))["status"] == "pending"
        async with browser_like.post(
            url, data={"decision": "approve", "csrf": token.group(1)}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
        assert (await item(http, sc, review_id))["reviewer"] == "carol"
    # Without a session: the page sends you to sign in; a post is refused.
    async with http.get(sc.admin_url + "/ui/", allow_redirects=False) as resp:
        assert (resp.status, resp.headers["Location"]) == (303, "/ui/login")
    async with http.post(
        f"{sc.admin_url}/ui/reviews/{review_id}/resolve", data={"decision": "reject"}
    ) as resp:
        assert resp.status == 401
    async with http.get(sc.admin_url + "/ui/login") as resp:
        assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Frame-Options"] == "DENY"


async def test_the_page_refuses_without_a_reviewer_token(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(simple_policy(model_url))  # loopback, no SIDECAR_REVIEWER_TOKEN
    async with http.get(sc.admin_url + "/ui/login") as resp:
        assert "needs SIDECAR_REVIEWER_TOKEN" in await resp.text()
    async with http.get(sc.admin_url + "/ui/", allow_redirects=False) as resp:
        assert resp.status == 303
