"""Review webhooks end to end: a real `sidecar run` and a real aiohttp receiver on loopback that
answers 500 first. Every event (new items, a resolution) arrives signed (HMAC-SHA256 over the
raw body), nothing is sent on the request path, the outbox survives a restart of the sidecar
while the receiver is still failing, and once the receiver accepts, every event is delivered and
then deleted. Delivery is at least once (a request the receiver handles after its sender gave
up, or one cut by the restart, comes again), so the receiver dedupes on the event id: every copy
of an event carries the same id and the same signed bytes, and the sidecar records each event
delivered once."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import SidecarFactory, SidecarProc, simple_policy

TOKEN = "reviewer-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET = "webhook-secret-0123456789"
INFER = "/v2/models/fraud/infer"
V2_INPUT = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [1.0]}]}

pytestmark = pytest.mark.timeout(60)


@dataclass
class Receiver:
    """Answers `status` (500 until told otherwise) and records every delivery."""

    status: int = 500
    url: str = ""
    attempts: list[dict[str, Any]] = field(default_factory=list)
    accepted: Counter[str] = field(default_factory=Counter)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
        given = request.headers.get("X-Sidecar-Signature", "")
        body = json.loads(raw)
        self.attempts.append(
            {
                "raw": raw,
                "id": body["id"],
                "header_id": request.headers.get("X-Sidecar-Event-Id"),
                "kind": request.headers.get("X-Sidecar-Event"),
                "signed": hmac.compare_digest(expected, given),
                "body": body,
                "answered": self.status,
            }
        )
        if self.status == 200:
            self.accepted[body["id"]] += 1  # the receiver's dedupe key
        self.changed.set()
        return web.Response(status=self.status, text="ok" if self.status == 200 else "down")

    async def wait_until(self, predicate: Any, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"receiver saw: {self.attempts[-5:]}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                pass


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}/hook"
    yield rec
    await runner.cleanup()


def outbox_ids(state: Path) -> list[str]:
    db = sqlite3.connect(state / "reviews.db")
    try:
        return [row[0] for row in db.execute("SELECT id FROM review_outbox ORDER BY seq")]
    finally:
        db.close()


async def test_every_event_is_delivered_signed_and_survives_a_restart(
    model_url: str,
    start_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    policy = simple_policy(
        model_url,
        confidence={"extract": {"kind": "kserve_v2", "output": "predict_proba"}},
        retry={"max_attempts": 1},
    )
    policy["reviews"] = {
        "webhook": {"url": receiver.url, "backoff": {"base": "50ms", "max": "300ms"}}
    }
    env = {
        "SIDECAR_REVIEWER_TOKEN": TOKEN,
        "SIDECAR_WEBHOOK_SECRET": SECRET,
        "SIDECAR_STATE_DIR": str(state),
    }

    async def start() -> SidecarProc:
        # Off the event loop: the receiver runs on it and keeps answering meanwhile, as a real
        # one does (a frozen receiver would hold requests past the sender's timeout).
        return await asyncio.to_thread(start_sidecar, policy, env=env)

    sc = await start()
    review_ids = []
    for i in range(3):
        headers = {"x-demo-fault": "confidence=0.7", "x-request-id": f"hook-{i}"}
        started = time.monotonic()
        async with http.post(sc.url + INFER, json=V2_INPUT, headers=headers) as resp:
            assert resp.status == 202
            review_ids.append(resp.headers["x-sidecar-review-id"])
        # Not on the request path: the receiver is failing, the caller is answered anyway.
        assert time.monotonic() - started < 2
    async with http.post(
        f"{sc.admin_url}/reviews/{review_ids[0]}/resolve",
        json={"decision": "approve", "reviewer": "alice"},
        headers=AUTH,
    ) as resp:
        assert resp.status == 200

    # Four events, each tried (and refused) at least twice: retried with backoff.
    def tried_twice() -> bool:
        counts = Counter(a["id"] for a in receiver.attempts)
        return len(counts) == 4 and min(counts.values()) >= 2

    await receiver.wait_until(tried_twice)
    kinds = Counter(a["kind"] for a in receiver.attempts if a["answered"] == 500)
    assert set(kinds) == {"review.created", "review.resolved"}

    # Stop while the receiver still fails: the events stay in the outbox on disk.
    assert await asyncio.to_thread(sc.rp.stop) == 0
    pending = outbox_ids(state)
    assert len(pending) == 4 and set(pending) == {a["id"] for a in receiver.attempts}
    assert not receiver.accepted

    sc = await start()
    receiver.status = 200
    await receiver.wait_until(lambda: set(receiver.accepted) == set(pending))

    def delivered() -> list[str]:
        return sorted(
            r["event_id"] for r in sc.rp.records() if r.get("event") == "webhook_delivered"
        )

    # Deleted from the outbox, and logged (the log line comes after the delete).
    deadline = time.monotonic() + 10
    while outbox_ids(state) or len(delivered()) < len(pending):
        assert time.monotonic() < deadline, (outbox_ids(state), delivered())
        await asyncio.sleep(0.05)
    # Delivered and deleted: no event can be sent again. At least once: an event may have been
    # accepted more than once, but every copy is the same signed event, so deduping on the id
    # leaves each event exactly once.
    assert set(receiver.accepted) == set(pending), receiver.accepted
    assert all(a["signed"] for a in receiver.attempts)
    assert all(a["header_id"] == a["id"] for a in receiver.attempts)
    copies: dict[str, set[bytes]] = {}
    for a in receiver.attempts:
        copies.setdefault(a["id"], set()).add(a["raw"])
    assert all(len(raw) == 1 for raw in copies.values()), copies
    bodies = {a["id"]: a["body"] for a in receiver.attempts}
    created = sorted(
        b["review"]["request_id"] for b in bodies.values() if b["type"] == "review.created"
    )
    assert created == ["hook-0", "hook-1", "hook-2"]
    (resolved,) = [b for b in bodies.values() if b["type"] == "review.resolved"]
    assert resolved["review"]["id"] == review_ids[0]
    assert resolved["review"]["decision"] == "approve"
    assert "request" not in resolved["review"]  # no caller data in webhooks
    # The sidecar recorded each event delivered exactly once: nothing lost, nothing left over.
    assert delivered() == sorted(pending)


def test_a_webhook_without_its_secret_refuses_to_start(tmp_path: Path) -> None:
    from tests.conftest import write_policy
    from tests.support.processes import sidecar_cmd, start_process

    policy = simple_policy("http://127.0.0.1:9")
    policy["reviews"] = {"webhook": {"url": "http://127.0.0.1:9/hook"}}
    path = write_policy(tmp_path, policy)
    rp = start_process(
        sidecar_cmd("run", "--policy", str(path), "--port", "0", "--admin-port", "0"),
        env={"SIDECAR_WEBHOOK_SECRET": "", "SIDECAR_STATE_DIR": str(tmp_path / "s")},
        ready=False,
    )
    try:
        assert rp.proc.wait(20) == 2
    finally:
        rp.stop()
    assert any("SIDECAR_WEBHOOK_SECRET" in line for line in rp.lines)
