"""The fraud example end to end: the scikit-learn classifier trained by the example's train.py,
served by a real MLServer (its own virtualenv, `serve.sh`), behind a real `sidecar run` with the
example's policy.yaml unchanged (only the upstream URL is given with `--upstream`).

Confident answers pass, uncertain ones are escalated into the review queue, the example's scripts
work, and a crashed MLServer is covered by the rules and the safe default within the deadline
until a restart closes the breaker and the recovery time is recorded.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import SidecarFactory, SidecarProc
from tests.e2e.conftest import FRAUD_EXAMPLE, MLServer, example_python, run_bounded

pytestmark = pytest.mark.e2e

POLICY = FRAUD_EXAMPLE / "policy.yaml"
INFER = "/v2/models/fraud/infer"
TOKEN = "e2e-reviewer"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AUTO_ABOVE = 0.95  # policy.yaml's auto_above
DEADLINE = 2.0  # policy.yaml's timeouts.total
LARGE_AMOUNT = 1000.0  # policy.yaml's fallback rule


def infer_body(features: list[float]) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "transaction",
                "shape": [1, len(features)],
                "datatype": "FP64",
                "data": features,
            }
        ],
        "outputs": [{"name": "predict"}, {"name": "predict_proba"}],
    }


async def infer(
    http: aiohttp.ClientSession, sc: SidecarProc, features: list[float]
) -> tuple[int, Any, Any, float]:
    started = time.monotonic()
    async with http.post(sc.url + INFER, json=infer_body(features)) as resp:
        body = await resp.json()
        return resp.status, resp.headers, body, time.monotonic() - started


def output(body: dict[str, Any], name: str) -> list[Any]:
    return next(o["data"] for o in body["outputs"] if o["name"] == name)


async def breaker(http: aiohttp.ClientSession, sc: SidecarProc) -> dict[str, Any]:
    async with http.get(sc.admin_url + "/admin/breakers") as resp:
        assert resp.status == 200
        return next(b for b in (await resp.json())["breakers"] if b["upstream"] == "mlserver")


async def metric_value(http: aiohttp.ClientSession, sc: SidecarProc, name: str) -> float | None:
    async with http.get(sc.admin_url + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def start(start_sidecar: SidecarFactory, server: MLServer) -> SidecarProc:
    return start_sidecar(POLICY, "--upstream", server.url, env={"SIDECAR_REVIEWER_TOKEN": TOKEN})


@pytest.mark.timeout(90, func_only=True)
async def test_confident_answers_pass_and_uncertain_ones_are_escalated(
    http: aiohttp.ClientSession,
    start_sidecar: SidecarFactory,
    mlserver: MLServer,
    fraud_samples: dict[str, list[dict[str, Any]]],
) -> None:
    sc = start(start_sidecar, mlserver)

    for sample in fraud_samples["confident"]:
        status, headers, body, _ = await infer(http, sc, sample["features"])
        assert status == 200, body
        assert headers["x-sidecar-outcome"] == "ok"
        assert "x-sidecar-failure-mode" not in headers
        # MLServer's own answer, passed through: its probabilities and its class.
        assert body["model_name"] == "fraud"
        assert output(body, "predict_proba") == pytest.approx(sample["predict_proba"], abs=1e-6)
        top = max(sample["predict_proba"])
        assert top >= AUTO_ABOVE
        assert float(headers["x-sidecar-confidence"]) == pytest.approx(top, abs=1e-4)
        assert output(body, "predict") == [sample["label"]]

    uncertain = [
        s
        for s in fraud_samples["uncertain"] + fraud_samples["large_amount"]
        if max(s["predict_proba"]) < AUTO_ABOVE
    ]
    assert len(uncertain) >= 3
    escalated: dict[str, dict[str, Any]] = {}
    for sample in uncertain:
        status, headers, body, _ = await infer(http, sc, sample["features"])
        # The caller is never blocked: it gets the model's answer, marked for review.
        assert status == 200, body
        assert headers["x-sidecar-outcome"] == "escalated"
        assert headers["x-sidecar-failure-mode"] == "low_confidence"
        assert float(headers["x-sidecar-confidence"]) == pytest.approx(
            max(sample["predict_proba"]), abs=1e-4
        )
        assert body["model_name"] == "fraud"
        assert output(body, "predict_proba") == pytest.approx(sample["predict_proba"], abs=1e-6)
        escalated[headers["x-sidecar-review-id"]] = sample

    # Each escalated transaction is in the review queue, with its request and the model's answer.
    async with http.get(sc.admin_url + "/reviews?route=fraud&status=pending") as resp:
        assert resp.status == 403 or resp.status == 401
    async with http.get(sc.admin_url + "/reviews?route=fraud&status=pending", headers=AUTH) as resp:
        assert resp.status == 200
        listed = {item["id"]: item for item in (await resp.json())["items"]}
    assert set(escalated) <= set(listed)
    for review_id, sample in escalated.items():
        top = max(sample["predict_proba"])
        assert listed[review_id]["confidence"] == pytest.approx(top, abs=1e-6)
        assert listed[review_id]["reason"] == ("reject" if top < 0.7 else "review")
        async with http.get(sc.admin_url + f"/reviews/{review_id}", headers=AUTH) as resp:
            item = await resp.json()
        assert json.loads(item["request"]["body"])["inputs"][0]["data"] == sample["features"]
        assert item["status_url"]
    assert await metric_value(http, sc, 'sidecar_escalations_total{route="fraud"}') == len(
        escalated
    )


@pytest.mark.timeout(120, func_only=True)
async def test_example_scripts_send_and_results(
    start_sidecar: SidecarFactory, mlserver: MLServer, fraud_root: Path, tmp_path: Path
) -> None:
    sc = start(start_sidecar, mlserver)

    sent = await asyncio.to_thread(
        run_bounded,
        [
            example_python(),
            str(FRAUD_EXAMPLE / "send.py"),
            "--sidecar",
            sc.url,
            "--samples",
            str(fraud_root / "data" / "samples.json"),
        ],
        60,
    )
    assert sent.returncode == 0, sent.stdout
    rows = sent.stdout.splitlines()[1:]
    assert len(rows) == 8, sent.stdout
    assert sum(" ok " in row for row in rows) >= 3, sent.stdout
    assert (
        sum(re.search(r" escalated .* review [0-9a-f]{32}$", row) is not None for row in rows) >= 3
    )

    # results.py writes its table between the README's markers: on a copy here.
    readme = tmp_path / "README.md"
    shutil.copy(FRAUD_EXAMPLE / "README.md", readme)
    done = await asyncio.to_thread(
        run_bounded,
        [
            example_python(),
            str(FRAUD_EXAMPLE / "results.py"),
            "--sidecar",
            sc.url,
            "--holdout",
            str(fraud_root / "data" / "holdout.csv"),
            "--limit",
            "200",
            "--readme",
            str(readme),
        ],
        90,
    )
    assert done.returncode == 0, done.stdout
    assert done.stdout.startswith("200 held-out transactions"), done.stdout
    assert "| model errors caught by review |" in done.stdout
    written = readme.read_text()
    assert "200 held-out transactions" in written
    assert written.count("<!-- results:begin") == 1 and written.count("<!-- results:end -->") == 1


@pytest.mark.timeout(180, func_only=True)
async def test_model_down_fallback_then_recovery(
    http: aiohttp.ClientSession,
    start_sidecar: SidecarFactory,
    mlserver_factory: Any,
    fraud_samples: dict[str, list[dict[str, Any]]],
) -> None:
    server: MLServer = mlserver_factory()
    sc = start(start_sidecar, server)
    small = next(s for s in fraud_samples["confident"] if s["features"][0] <= LARGE_AMOUNT)
    large = fraud_samples["large_amount"][0]
    assert large["features"][0] > LARGE_AMOUNT

    status, headers, _, _ = await infer(http, sc, small["features"])
    assert (status, headers["x-sidecar-outcome"]) == (200, "ok")
    assert (await breaker(http, sc))["state"] == "closed"

    server.kill()  # a crash: SIGKILL, connections refused from now on
    killed_at = time.monotonic()

    # Small amounts: the static stand-in answer; large ones: the CEL rule's review. Both well
    # within the route's deadline.
    status, headers, body, elapsed = await infer(http, sc, small["features"])
    assert status == 200, body
    assert headers["x-sidecar-outcome"] == "fallback"
    assert headers["x-sidecar-fallback"] == "static"
    assert headers["x-sidecar-failure-mode"] in ("connect_error", "circuit_open")
    assert output(body, "decision") == ["approve"]
    assert body["parameters"]["reason"] == "model_unavailable"
    assert elapsed < DEADLINE

    status, headers, body, elapsed = await infer(http, sc, large["features"])
    assert status == 200, body
    assert headers["x-sidecar-outcome"] == "fallback"
    assert headers["x-sidecar-fallback"] == "rules"
    assert output(body, "decision") == ["review"]
    assert body["parameters"]["rule"] == "large_amount"
    assert elapsed < DEADLINE

    # Three failures in a row open the circuit: then the model is not even called.
    for _ in range(5):
        if (await breaker(http, sc))["state"] == "open":
            break
        await infer(http, sc, small["features"])
    snapshot = await breaker(http, sc)
    assert snapshot["state"] == "open", snapshot
    status, headers, body, elapsed = await infer(http, sc, large["features"])
    assert status == 200
    assert headers["x-sidecar-failure-mode"] == "circuit_open"
    assert (headers["x-sidecar-fallback"], output(body, "decision")) == ("rules", ["review"])
    assert elapsed < DEADLINE
    assert await metric_value(http, sc, 'sidecar_breaker_state{upstream="mlserver"}') == 2

    # MLServer comes back on the same port; the next probe after the open period closes the
    # circuit and the recovery time is recorded.
    await asyncio.to_thread(server.start)
    deadline = time.monotonic() + 60
    while True:
        status, headers, body, _ = await infer(http, sc, small["features"])
        if headers["x-sidecar-outcome"] == "ok":
            break
        assert headers["x-sidecar-outcome"] == "fallback", (status, dict(headers), body)
        assert time.monotonic() < deadline, "the breaker did not close within 60s of the restart"
        await asyncio.sleep(0.25)
    assert body["model_name"] == "fraud"
    down_for = time.monotonic() - killed_at

    snapshot = await breaker(http, sc)
    assert snapshot["state"] == "closed", snapshot
    assert snapshot["transitions"]["closed"] >= 1
    recovery = snapshot["last_recovery_seconds"]
    assert recovery is not None and 0 < recovery <= down_for, snapshot
    assert await metric_value(http, sc, 'sidecar_breaker_state{upstream="mlserver"}') == 0
    assert (
        await metric_value(http, sc, 'sidecar_breaker_recovery_seconds_count{upstream="mlserver"}')
        == 1
    )
    recovered = sc.rp.wait_for_log(lambda r: r.get("event") == "circuit_closed")
    assert recovered["recovery_seconds"] == pytest.approx(recovery, abs=0.01)
