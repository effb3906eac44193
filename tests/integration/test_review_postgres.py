"""Two real `sidecar run` processes sharing one PostgreSQL review queue (the machine's server,
one schema per test): items queued through either are seen by both, concurrent claims through
both admin APIs claim every item exactly once, a status URL given out by one replica works on
the other, and an unreachable database fails the gate closed with a clear log line."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from tests.conftest import SidecarFactory, SidecarProc, simple_policy

TOKEN = "reviewer-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
INFER = "/v2/models/fraud/infer"
V2_INPUT = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [1.0]}]}
SAFE = {"status": 200, "json": {"decision": "review"}}

pytestmark = pytest.mark.timeout(60)


def gated(model_url: str, **confidence: Any) -> dict[str, Any]:
    confidence.setdefault("extract", {"kind": "kserve_v2", "output": "predict_proba"})
    confidence.setdefault("audit_sample", 0)
    return simple_policy(model_url, confidence=confidence, retry={"max_attempts": 1})


def replica(
    start_sidecar: SidecarFactory, policy: dict[str, Any], env: dict[str, str], state: Path
) -> SidecarProc:
    # Separate state directories: nothing is shared through the file system.
    return start_sidecar(policy, env={**env, "SIDECAR_STATE_DIR": str(state)})


async def escalate(http: aiohttp.ClientSession, sc: SidecarProc, request_id: str) -> str:
    headers = {"x-demo-fault": "confidence=0.7", "x-request-id": request_id}
    async with http.post(sc.url + INFER, json=V2_INPUT, headers=headers) as resp:
        assert resp.status == 202, await resp.text()
        return resp.headers["x-sidecar-review-id"]


async def test_two_replicas_share_one_queue_and_claim_each_item_once(
    model_url: str,
    start_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    postgres: str,
    pg_schema: str,
    tmp_path: Path,
) -> None:
    env = {
        "SIDECAR_REVIEWER_TOKEN": TOKEN,
        "SIDECAR_DATABASE_URL": postgres,
        "SIDECAR_DATABASE_SCHEMA": pg_schema,
    }
    policy = gated(model_url)
    a = replica(start_sidecar, policy, env, tmp_path / "a")
    b = replica(start_sidecar, policy, env, tmp_path / "b")
    for sc in (a, b):
        line = sc.rp.wait_for_log(lambda r: r.get("event") == "review_store")
        assert line["location"].startswith("postgresql://") and pg_schema in line["location"]

    # 24 items, queued through both replicas at once.
    ids = await asyncio.gather(
        *(escalate(http, a if i % 2 else b, f"shared-{i}") for i in range(24))
    )
    assert len(set(ids)) == 24
    for sc in (a, b):
        async with http.get(sc.admin_url + "/reviews?status=pending&limit=100", headers=AUTH) as r:
            page = await r.json()
        assert sorted(i["id"] for i in page["items"]) == sorted(ids)

    # A status URL from one replica is honoured by the other (the key is in the database).
    async with http.get(f"{a.admin_url}/reviews/{ids[0]}", headers=AUTH) as resp:
        status_url = (await resp.json())["status_url"]
    token = status_url.rsplit("/", 1)[1]
    async with http.get(f"{b.admin_url}/reviews/status/{token}") as resp:
        assert (resp.status, await resp.json()) == (200, {"status": "pending", "decision": None})

    # Ten reviewers per replica take "the next item" until the queue is empty.
    claims: list[tuple[str, str]] = []

    async def reviewer(sc: SidecarProc, name: str) -> None:
        while True:
            async with http.post(
                sc.admin_url + "/reviews/next/claim", json={"reviewer": name}, headers=AUTH
            ) as resp:
                if resp.status == 204:
                    return
                assert resp.status == 200, await resp.text()
                item = await resp.json()
            assert item["claimed_by"] == name
            claims.append((item["id"], name))

    await asyncio.gather(
        *(reviewer(sc, f"{tag}{n}") for n in range(10) for sc, tag in ((a, "a"), (b, "b")))
    )
    counted = Counter(review_id for review_id, _ in claims)
    assert sorted(counted) == sorted(ids) and set(counted.values()) == {1}, counted
    assert {name[0] for _, name in claims} == {"a", "b"}  # both replicas handed items out

    # Claims of one named item through both APIs at once: exactly one wins, the rest are 409.
    with psycopg.connect(postgres, options=f"-c search_path={pg_schema}") as raw:
        raw.execute("UPDATE reviews SET status = 'pending', claimed_by = NULL, lease_until = NULL")
    for review_id in ids[:6]:

        async def claim(sc: SidecarProc, name: str, review_id: str = review_id) -> int:
            async with http.post(
                f"{sc.admin_url}/reviews/{review_id}/claim", json={"reviewer": name}, headers=AUTH
            ) as resp:
                return resp.status

        statuses = await asyncio.gather(
            *(claim(sc, f"{tag}{n}") for n in range(4) for sc, tag in ((a, "x"), (b, "y")))
        )
        assert sorted(statuses) == [200] + [409] * 7, statuses

    # A resolution through one replica is final on both.
    async with http.post(
        f"{b.admin_url}/reviews/{ids[10]}/resolve",
        json={"decision": "reject", "reviewer": "admin"},
        headers=AUTH,
    ) as resp:
        assert resp.status == 200
    async with http.get(f"{a.admin_url}/reviews/{ids[10]}", headers=AUTH) as resp:
        item = await resp.json()
    assert (item["status"], item["decision"], item["reviewer"]) == ("resolved", "reject", "admin")


async def test_an_unreachable_database_fails_the_gate_closed(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    env = {
        "SIDECAR_REVIEWER_TOKEN": TOKEN,
        "SIDECAR_DATABASE_URL": "postgresql://sidecar:not-this@127.0.0.1:1/reviews",
    }
    policy = gated(model_url, escalate={"respond": "answer"}, safe_default=SAFE)
    policy["reviews"] = {"store": "postgres", "timeout": "1s"}
    sc = start_sidecar(policy, env=env)
    line = sc.rp.wait_for_log(lambda r: r.get("event") == "review_store_unavailable")
    assert "postgresql://sidecar@127.0.0.1:1/reviews is unreachable" in line["error"]
    assert "not-this" not in json.dumps(sc.rp.records())
    headers = {"x-demo-fault": "confidence=0.7"}
    async with http.post(sc.url + INFER, json=V2_INPUT, headers=headers) as resp:
        body = await resp.json()
        assert (resp.status, body) == (200, {"decision": "review"})
        assert resp.headers["x-sidecar-outcome"] == "rejected"
        assert "x-sidecar-review-id" not in resp.headers
    async with http.get(sc.admin_url + "/reviews", headers=AUTH) as resp:
        assert resp.status == 503
        assert "unreachable" in (await resp.json())["error"]["message"]
    # A confident answer is not affected.
    async with http.post(sc.url + INFER, json=V2_INPUT) as resp:
        assert resp.status == 200 and resp.headers["x-sidecar-outcome"] == "ok"


def test_store_postgres_without_a_url_refuses_to_start(tmp_path: Path) -> None:
    from tests.conftest import write_policy
    from tests.support.processes import sidecar_cmd, start_process

    policy = simple_policy("http://127.0.0.1:9")
    policy["reviews"] = {"store": "postgres"}
    path = write_policy(tmp_path, policy)
    rp = start_process(
        sidecar_cmd("run", "--policy", str(path), "--port", "0", "--admin-port", "0"),
        env={"SIDECAR_DATABASE_URL": "", "SIDECAR_STATE_DIR": str(tmp_path / "s")},
        ready=False,
    )
    try:
        assert rp.proc.wait(20) == 2
    finally:
        rp.stop()
    assert any("SIDECAR_DATABASE_URL is not set" in line for line in rp.lines)
