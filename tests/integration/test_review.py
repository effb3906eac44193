"""The confidence gate and the human review queue end to end: real `sidecar run`, the demo model
(confidence per request with `x-demo-fault: confidence=X`), the review API on the admin port, the
capability status URL, the CLI, and the store's durability under SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import REPO, SidecarFactory, SidecarProc, simple_policy

TOKEN = "reviewer-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENV = {"SIDECAR_REVIEWER_TOKEN": TOKEN}
INFER = "/v2/models/fraud/infer"
V2_INPUT = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [1.0]}]}
SAFE = {"status": 200, "json": {"decision": "review"}}


def fault(confidence: float, request_id: str | None = None) -> dict[str, str]:
    headers = {"x-demo-fault": f"confidence={confidence}"}
    if request_id is not None:
        headers["x-request-id"] = request_id
    return headers


def gated(model_url: str, **confidence: Any) -> dict[str, Any]:
    confidence.setdefault("extract", {"kind": "kserve_v2", "output": "predict_proba"})
    route: dict[str, Any] = {"confidence": confidence, "retry": {"max_attempts": 1}}
    if "_fallback" in confidence:
        route["fallback"] = confidence.pop("_fallback")
    return simple_policy(model_url, **route)


async def get_json(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with http.get(url, headers=headers if headers is not None else AUTH) as resp:
        return resp.status, await resp.json()


async def post_json(
    http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with http.post(url, json=body, headers=headers if headers is not None else AUTH) as resp:
        return resp.status, await resp.json()


async def infer(
    http: aiohttp.ClientSession, sc: SidecarProc, headers: dict[str, str]
) -> tuple[int, Any, Any]:
    async with http.post(sc.url + INFER, json=V2_INPUT, headers=headers) as resp:
        return resp.status, resp.headers, await resp.read()


async def metric(http: aiohttp.ClientSession, sc: SidecarProc, prefix: str) -> float:
    async with http.get(sc.admin_url + "/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


async def wait_for(predicate: Any, timeout: float = 10.0) -> Any:
    """Bounded polling of an observable condition."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


# --- Done when ---------------------------------------------------------------------------------


async def test_kserve_example_policy_confident_passes_uncertain_is_reviewed(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    policy = REPO / "policies" / "kserve-classifier.yaml"
    sc = start_sidecar(policy, "--upstream", model_url, env=ENV)

    status, headers, body = await infer(http, sc, {"x-request-id": "confident-1"})
    assert status == 200
    assert headers["x-sidecar-outcome"] == "ok"
    assert headers["x-sidecar-confidence"] == "0.9500"
    assert "x-sidecar-review-id" not in headers
    assert json.loads(body)["outputs"][0]["name"] == "predict_proba"

    # Uncertain: the caller is not blocked; it gets the model's answer, marked.
    status, headers, body = await infer(http, sc, fault(0.7, "uncertain-1"))
    assert status == 200
    assert headers["x-sidecar-outcome"] == "escalated"
    assert headers["x-sidecar-failure-mode"] == "low_confidence"
    assert headers["x-sidecar-confidence"] == "0.7000"
    assert json.loads(body)["outputs"][0]["data"] == [0.7, 0.3]
    review_id = headers["x-sidecar-review-id"]

    # It is in the queue; the API needs the reviewer token.
    async with http.get(sc.admin_url + "/reviews") as resp:
        assert resp.status == 401
    status, page = await get_json(http, sc.admin_url + "/reviews?status=pending&route=classifier")
    assert status == 200
    items = {i["id"]: i for i in page["items"]}
    assert items[review_id]["confidence"] == 0.7
    assert items[review_id]["status"] == "pending"
    assert items[review_id]["request_id"] == "uncertain-1"
    assert items[review_id]["created_at"].endswith("Z")
    status, item = await get_json(http, f"{sc.admin_url}/reviews/{review_id}")
    assert json.loads(item["request"]["body"]) == V2_INPUT
    assert json.loads(item["answer"]["body"])["outputs"][0]["data"] == [0.7, 0.3]
    status_url = item["status_url"]
    assert status_url.startswith(sc.admin_url + "/reviews/status/")

    # The caller's status URL needs no token and shows only status and decision.
    status, seen = await get_json(http, status_url, headers={})
    assert (status, seen) == (200, {"status": "pending", "decision": None})

    status, claimed = await post_json(
        http, f"{sc.admin_url}/reviews/{review_id}/claim", {"reviewer": "alice"}
    )
    assert (status, claimed["status"], claimed["claimed_by"]) == (200, "claimed", "alice")
    status, resolved = await post_json(
        http,
        f"{sc.admin_url}/reviews/{review_id}/resolve",
        {"decision": "approve", "reviewer": "alice", "note": "looks right"},
    )
    assert (status, resolved["status"], resolved["decision"]) == (200, "resolved", "approve")

    status, seen = await get_json(http, status_url, headers={})
    assert (status, seen) == (200, {"status": "resolved", "decision": "approve"})
    # A forged token reads like a missing item.
    async with http.get(status_url[:-2] + "xx") as resp:
        assert resp.status == 404

    assert await metric(http, sc, 'sidecar_escalations_total{route="classifier"}') >= 1
    assert (
        await metric(http, sc, 'sidecar_review_resolution_seconds_count{decision="approve"}') == 1
    )


# --- each action -------------------------------------------------------------------------------


async def test_escalate_accepted_answers_202_with_a_status_url(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(gated(model_url), env=ENV)
    status, headers, body = await infer(http, sc, fault(0.7))
    assert status == 202
    answer = json.loads(body)
    assert answer["review_id"] == headers["x-sidecar-review-id"]
    assert headers["Location"] == answer["status_url"]
    assert headers["x-sidecar-outcome"] == "escalated"
    status, seen = await get_json(http, answer["status_url"], headers={})
    assert seen == {"status": "pending", "decision": None}
    record = sc.rp.wait_for_log(lambda r: r.get("event") == "request")
    assert record["outcome"] == "escalated" and record["review_id"] == answer["review_id"]
    assert record["confidence"] == 0.7 and record["confidence_band"] == "review"


async def test_escalate_default_answers_the_safe_default(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(
        gated(model_url, escalate={"respond": "default"}, safe_default=SAFE), env=ENV
    )
    status, headers, body = await infer(http, sc, fault(0.7))
    assert (status, json.loads(body)) == (200, {"decision": "review"})
    assert headers["x-sidecar-outcome"] == "escalated" and "x-sidecar-review-id" in headers


async def test_request_info_is_a_422_with_a_machine_readable_hint(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(
        gated(
            model_url,
            extract={"kind": "kserve_v2", "output": "predict_proba", "class_index": 0},
            on_reject="request_info",
            request_info={"fields": ["inputs", "customer_history"], "message": "send more"},
        ),
        env=ENV,
    )
    status, headers, body = await infer(http, sc, fault(0.2))
    assert status == 422
    err = json.loads(body)["error"]
    assert err["failure_mode"] == "low_confidence" and err["message"] == "send more"
    assert err["request_info"] == {
        "fields": ["inputs", "customer_history"],
        "band": "reject",
        "confidence": 0.2,
    }
    assert headers["x-sidecar-outcome"] == "rejected"
    assert headers["x-sidecar-failure-mode"] == "low_confidence"
    assert headers["x-sidecar-confidence"] == "0.2000"


async def test_hold_answers_with_the_reviewers_override(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(
        gated(model_url, on_review="hold", hold={"timeout": "20s"}, safe_default=SAFE), env=ENV
    )
    held = asyncio.create_task(infer(http, sc, fault(0.7, "held-1")))

    async def queued() -> Any:
        _, page = await get_json(http, sc.admin_url + "/reviews?status=pending")
        return [i for i in page["items"] if i["request_id"] == "held-1"]

    (item,) = await wait_for(queued)
    assert not held.done()
    corrected = {"model_name": "human", "outputs": [{"name": "label", "data": [1]}]}
    status, _ = await post_json(
        http,
        f"{sc.admin_url}/reviews/{item['id']}/resolve",
        {"decision": "override", "reviewer": "bob", "answer": corrected},
    )
    assert status == 200
    status, headers, body = await asyncio.wait_for(held, 10)
    assert (status, json.loads(body)) == (200, corrected)
    assert headers["x-sidecar-review-id"] == item["id"]
    assert headers["x-sidecar-outcome"] == "escalated"


async def test_hold_without_a_decision_answers_the_safe_default(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(
        gated(model_url, on_review="hold", hold={"timeout": "300ms"}, safe_default=SAFE), env=ENV
    )
    status, headers, body = await infer(http, sc, fault(0.7))
    assert (status, json.loads(body)) == (200, {"decision": "review"})
    assert headers["x-sidecar-outcome"] == "escalated" and "x-sidecar-review-id" in headers


async def test_fallback_answers_from_the_chain_not_judged_again(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    static = {"status": 200, "json": {"outputs": [{"name": "predict_proba", "data": [0.5, 0.5]}]}}
    sc = start_sidecar(gated(model_url, on_review="fallback", _fallback=[{"static": static}]))
    status, headers, body = await infer(http, sc, fault(0.7))
    assert (status, json.loads(body)) == (200, static["json"])
    assert headers["x-sidecar-outcome"] == "fallback"
    assert headers["x-sidecar-fallback"] == "static"
    assert headers["x-sidecar-failure-mode"] == "low_confidence"
    assert "x-sidecar-review-id" not in headers


async def test_missing_confidence_takes_its_own_action(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(gated(model_url, on_missing="request_info"))
    status, headers, _ = await infer(http, sc, {"x-demo-fault": "malformed_json"})
    assert status == 422 and headers["x-sidecar-outcome"] == "rejected"
    assert "x-sidecar-confidence" not in headers
    record = sc.rp.wait_for_log(lambda r: r.get("event") == "request")
    assert record["confidence_band"] == "missing"


async def test_observed_stream_is_judged_at_its_end(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(REPO / "policies" / "llm-openai.yaml", "--upstream", model_url, env=ENV)
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "logprobs": True}
    async with http.post(
        sc.url + "/v1/chat/completions", json=chat, headers=fault(0.6, "stream-1")
    ) as resp:
        assert resp.status == 200
        assert resp.headers["x-sidecar-outcome"] == "ok"  # what was known at the first byte
        text = (await resp.read()).decode()
    assert "data: [DONE]" in text
    last = text.rstrip("\n").splitlines()[-1]
    assert last.startswith(": sidecar-outcome escalated review_id=")
    review_id = last.split("review_id=")[1].split()[0]
    status, item = await get_json(http, f"{sc.admin_url}/reviews/{review_id}")
    assert status == 200 and item["request_id"] == "stream-1" and item["action"] == "observe"
    record = sc.rp.wait_for_log(lambda r: r.get("event") == "request")
    assert record["outcome"] == "escalated" and record["review_id"] == review_id

    # Without logprobs there is nothing to judge: it passes.
    chat["logprobs"] = False
    async with http.post(sc.url + "/v1/chat/completions", json=chat) as resp:
        text = (await resp.read()).decode()
    assert text.rstrip("\n").splitlines()[-1] == ": sidecar-outcome ok band=missing"


# --- the queue's guarantees --------------------------------------------------------------------


async def test_a_retried_request_id_is_queued_once(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(gated(model_url, escalate={"respond": "answer"}), env=ENV)
    ids = set()
    for _ in range(3):
        status, headers, _ = await infer(http, sc, fault(0.7, "retried-1"))
        assert status == 200
        ids.add(headers["x-sidecar-review-id"])
    assert len(ids) == 1
    _, page = await get_json(http, sc.admin_url + "/reviews")
    assert [i["request_id"] for i in page["items"]] == ["retried-1"]


async def test_lease_expiry_and_double_resolve(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(gated(model_url), env=ENV)
    _, headers, _ = await infer(http, sc, fault(0.7))
    url = f"{sc.admin_url}/reviews/{headers['x-sidecar-review-id']}"
    status, item = await post_json(
        http, url + "/claim", {"reviewer": "alice", "lease_seconds": 0.5}
    )
    assert status == 200 and item["claimed_by"] == "alice"
    status, err = await post_json(http, url + "/claim", {"reviewer": "bob"})
    assert status == 409 and err["error"]["failure_mode"] == "client_error"
    status, _ = await post_json(http, url + "/resolve", {"decision": "reject", "reviewer": "bob"})
    assert status == 409

    async def expired() -> bool:
        _, current = await get_json(http, url)
        return bool(current["status"] == "pending")

    await wait_for(expired)
    status, item = await post_json(http, url + "/claim", {"reviewer": "bob"})
    assert status == 200 and item["claimed_by"] == "bob"
    status, item = await post_json(
        http, url + "/resolve", {"decision": "reject", "reviewer": "bob"}
    )
    assert status == 200 and item["decision"] == "reject"
    status, err = await post_json(
        http, url + "/resolve", {"decision": "approve", "reviewer": "bob"}
    )
    assert status == 409 and "already resolved" in err["error"]["message"]
    status, _ = await post_json(http, url + "/resolve", {"decision": "override", "reviewer": "x"})
    assert status == 400  # an override needs its corrected answer
    status, _ = await get_json(http, f"{sc.admin_url}/reviews/{'0' * 32}")
    assert status == 404


async def test_a_failing_store_fails_closed_to_the_safe_default(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    state = tmp_path / "broken-state"
    (state / "reviews.db").mkdir(parents=True)  # a directory where the database should be
    sc = start_sidecar(
        gated(model_url, escalate={"respond": "answer"}, safe_default=SAFE),
        env={**ENV, "SIDECAR_STATE_DIR": str(state)},
    )
    status, headers, body = await infer(http, sc, fault(0.7))
    assert (status, json.loads(body)) == (200, {"decision": "review"})
    assert headers["x-sidecar-failure-mode"] == "low_confidence"
    assert headers["x-sidecar-outcome"] == "rejected"
    assert "x-sidecar-review-id" not in headers
    assert await metric(http, sc, 'sidecar_events_total{event="review_store_failed"') == 1
    # A confident answer is not affected.
    status, headers, _ = await infer(http, sc, {})
    assert status == 200 and headers["x-sidecar-outcome"] == "ok"
    async with http.get(sc.admin_url + "/reviews", headers=AUTH) as resp:
        assert resp.status == 503


async def test_cli_lists_shows_and_resolves(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(gated(model_url), env=ENV)
    _, headers, _ = await infer(http, sc, fault(0.7, "cli-1"))
    review_id = headers["x-sidecar-review-id"]
    env = {**os.environ, "SIDECAR_ADMIN_URL": sc.admin_url, **ENV}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sidecar", "reviews", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    listed = await asyncio.to_thread(cli, "list", "--status", "pending")
    assert listed.returncode == 0 and review_id in listed.stdout and "0.7000" in listed.stdout
    shown = await asyncio.to_thread(cli, "show", review_id)
    assert json.loads(shown.stdout)["request_id"] == "cli-1"
    done = await asyncio.to_thread(
        cli,
        "resolve",
        review_id,
        "--decision",
        "override",
        "--reviewer",
        "carol",
        "--answer",
        '{"label": 1}',
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{review_id}: resolved (override)"
    again = await asyncio.to_thread(cli, "resolve", review_id, "--decision", "approve")
    assert again.returncode == 3 and "already resolved" in again.stderr
    _, item = await get_json(http, f"{sc.admin_url}/reviews/{review_id}")
    assert item["corrected_answer"] == {"label": 1} and item["reviewer"] == "carol"


# --- commit before acknowledge -----------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from sidecar.review.sqlite import SqliteReviewStore
    from sidecar.review.store import NewReview

    async def main(path, prefix):
        store = SqliteReviewStore(path)
        n = 0
        while True:
            n += 1
            result = await store.enqueue(NewReview(
                request_id=f"{prefix}-{n}", trace_id="t", route="r", reason="review",
                action="escalate", confidence=0.5, request={"body": "x" * 512},
                answer={"body": "y" * 512}))
            # Said only now, after enqueue returned (after the commit).
            sys.stdout.write(result.item.id + " " + result.item.request_id + "\\n")
            sys.stdout.flush()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


@pytest.mark.timeout(60)
def test_an_acknowledged_item_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "reviews.db"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = random.Random(6)
    acknowledged: dict[str, str] = {}
    started = time.monotonic()
    runs = 0
    while runs < 20 and time.monotonic() - started < 25:
        runs += 1
        child = subprocess.Popen(
            [sys.executable, str(script), str(path), f"run{runs}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
        )
        assert child.stdout is not None
        # Wait for the first acknowledgement (imports take a while), then kill at a random
        # moment while it keeps writing.
        first = child.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.15))
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate(timeout=10)
        for line in [first, *rest.splitlines(keepends=True)]:
            parts = line.decode().split()
            if line.endswith(b"\n") and len(parts) == 2:  # a cut-off last line is not counted
                acknowledged[parts[0]] = parts[1]
    assert runs >= 5 and len(acknowledged) >= runs
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = dict(db.execute("SELECT id, request_id FROM reviews").fetchall())
        counts = dict(
            db.execute("SELECT request_id, count(*) FROM reviews GROUP BY request_id").fetchall()
        )
    finally:
        db.close()
    for review_id, request_id in acknowledged.items():
        assert rows.get(review_id) == request_id, f"acknowledged {review_id} was lost"
        assert counts[request_id] == 1
    # The setting durability relies on, as the store's own connection has it.
    from sidecar.review.sqlite import SqliteReviewStore

    async def pragmas() -> dict[str, Any]:
        store = SqliteReviewStore(path)
        try:
            return await store.pragmas()
        finally:
            await store.close()

    assert asyncio.run(pragmas()) == {"journal_mode": "wal", "synchronous": 2}
