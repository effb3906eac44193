"""`GET /admin/status` and `sidecar status` against a real sidecar and the demo model: the JSON
document after known traffic (rates, shares, failures by mode, breaker, budget, bulkhead, review
backlog), the token scope, and `sidecar status --watch` showing a breaker open and close live, as
frames on a pipe and redrawn in place on a terminal (tmux)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import REPO, SidecarFactory, SidecarProc
from tests.support.processes import RunningProcess, sidecar_cmd, start_process

pytestmark = pytest.mark.timeout(60)

TOKEN = "status-admin-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
V2_INPUT = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [1.0]}]}
#: A row of the breakers table: the breaker's name in the first column, then its state.
BREAKER_ROW = re.compile(r"^│ model\s+│ (closed|open|half-open)\s+│ (\S.*?)\s+│")


def policy(model_url: str) -> dict[str, Any]:
    return {
        "upstreams": {
            "model": {
                "url": model_url,
                "breaker": {"consecutive_failures": 3, "open_for": "1s", "jitter": 0},
                "concurrency": {"max_in_flight": 4, "queue": 2},
            }
        },
        "routes": [
            {
                "name": "chat",
                "match": {"path_prefix": "/v1/chat"},
                "upstream": "model",
                "retry": {"max_attempts": 1},
            },
            {
                "name": "fraud",
                "match": {"path_prefix": "/v2/models/fraud"},
                "upstream": "model",
                "retry": {"max_attempts": 1},
                "confidence": {
                    "extract": {"kind": "kserve_v2", "output": "predict_proba"},
                    "auto_above": 0.9,
                    "reject_below": 0.2,
                },
            },
        ],
    }


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Bounded polling of an observable condition."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


async def status(http: aiohttp.ClientSession, sc: SidecarProc) -> dict[str, Any]:
    async with http.get(sc.admin_url + "/admin/status", headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data


async def chat(http: aiohttp.ClientSession, sc: SidecarProc, fault: str | None = None) -> int:
    headers = {"x-demo-fault": fault} if fault else {}
    async with http.post(sc.url + "/v1/chat/completions", json=CHAT, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_admin_status_json(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(policy(model_url), env={"SIDECAR_ADMIN_TOKEN": TOKEN})
    async with http.get(sc.admin_url + "/admin/status") as resp:
        assert resp.status == 401
    for _ in range(4):
        assert await chat(http, sc) == 200
    for _ in range(2):
        assert await chat(http, sc, "status=500") == 500
    headers = {"x-demo-fault": "confidence=0.7"}
    url = sc.url + "/v2/models/fraud/infer"
    async with http.post(url, json=V2_INPUT, headers=headers) as resp:
        assert resp.status == 202, await resp.text()
        assert resp.headers["x-sidecar-outcome"] == "escalated"

    doc = await status(http, sc)
    assert doc["policy"]["source"].endswith("policy.yaml")
    assert doc["draining"] is False
    assert doc["in_flight"] == 0
    assert 0 < doc["window_seconds"] <= doc["uptime_seconds"]
    routes = {r["name"]: r for r in doc["routes"]}
    assert list(routes) == ["chat", "fraud"]

    chat_route = routes["chat"]
    assert chat_route["upstream"] == "model"
    assert chat_route["requests"]["window"] == 6
    assert chat_route["requests"]["total"] == 6
    assert chat_route["requests"]["rate_per_second"] == pytest.approx(
        6 / doc["window_seconds"], rel=0.05
    )
    assert chat_route["outcomes"]["ok"] == 4
    assert chat_route["outcomes"]["error"] == 2
    assert chat_route["shares"]["success"] == pytest.approx(4 / 6)
    assert chat_route["shares"]["error"] == pytest.approx(2 / 6)
    assert chat_route["shares"]["fallback"] == 0
    assert chat_route["failures"] == {"upstream_5xx": {"window": 2, "total": 2}}
    # Closed: two failures, and the fraud route's answer from the same model reset the run.
    assert chat_route["breaker"] == {
        "name": "model",
        "state": "closed",
        "next_probe_in": None,
        "consecutive_failures": 0,
    }
    assert chat_route["retry_budget"]["available"] > 0
    assert chat_route["retry_budget"]["refused"] == 0
    bulkhead = chat_route["bulkhead"]
    assert (bulkhead["name"], bulkhead["in_flight"], bulkhead["limit"]) == ("model", 0, 4)

    fraud = routes["fraud"]
    assert fraud["outcomes"]["escalated"] == 1
    assert fraud["shares"]["escalated"] == 1.0
    assert fraud["failures"] == {"low_confidence": {"window": 1, "total": 1}}

    reviews = doc["reviews"]
    assert reviews["pending"] == 1
    assert reviews["store"] == "ok"
    assert 0 <= reviews["oldest_age_seconds"] < 30
    assert [b["upstream"] for b in doc["breakers"]] == ["model"]

    # An open circuit shows with the time to its next probe.
    async with http.post(
        sc.admin_url + "/admin/breakers/model", json={"action": "open"}, headers=AUTH
    ) as resp:
        assert resp.status == 200
    doc = await status(http, sc)
    breaker = doc["routes"][0]["breaker"]
    assert breaker["state"] == "open"
    assert 0 < breaker["next_probe_in"] <= 1.0
    assert doc["breakers"][0]["state"] == "open"


# -- sidecar status --watch ----------------------------------------------------------------------


def watcher(sc: SidecarProc) -> RunningProcess:
    env = {"SIDECAR_ADMIN_TOKEN": TOKEN, "COLUMNS": "220"}
    args = sidecar_cmd("status", "--admin-url", sc.admin_url, "--watch", "--interval", "0.2s")
    return start_process(args, env=env, ready=False, cwd=str(REPO))


def breaker_states(lines: list[str]) -> list[tuple[str, str]]:
    """(state, next probe) of the `model` row in each frame, in order."""
    return [(m[1], m[2]) for line in lines if (m := BREAKER_ROW.match(line))]


async def test_status_watch_shows_breaker_open_then_closed(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(policy(model_url), env={"SIDECAR_ADMIN_TOKEN": TOKEN})
    watch = watcher(sc)
    try:

        async def seen(state: str, after: int = 0) -> bool:
            return any(s == state for s, _ in breaker_states(list(watch.lines))[after:])

        await wait_until(lambda: seen("closed"))
        closed_frames = len(breaker_states(list(watch.lines)))
        # Three 503s in a row open the circuit; the model is not called while it is open.
        for _ in range(3):
            assert await chat(http, sc, "status=503") == 503
        assert await chat(http, sc) == 503  # circuit_open, answered by the sidecar
        await wait_until(lambda: seen("open", closed_frames))
        opened = [p for s, p in breaker_states(list(watch.lines)) if s == "open"]
        assert re.fullmatch(r"in \d+\.\ds", opened[0]), opened
        open_frames = len(breaker_states(list(watch.lines)))

        # After `open_for` (1s) the next request is the probe; the model is healthy again.
        async def probe_succeeds() -> bool:
            return await chat(http, sc) == 200

        await wait_until(probe_succeeds, timeout=10)
        await wait_until(lambda: seen("closed", open_frames))
        states = [s for s, _ in breaker_states(list(watch.lines))]
        first_open = states.index("open")
        assert "closed" in states[:first_open]
        assert "closed" in states[first_open:]
        text = "\n".join(watch.lines)
        assert "Routes" in text and "Breakers" in text and "Review backlog: empty" in text
        assert re.search(r"│ chat\s+│ model\s+│", text)
        assert "upstream_5xx 3" in text
        assert "circuit_open 1" in text
    finally:
        watch.stop()  # SIGTERM, then SIGKILL, to the watcher's process group


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
async def test_status_watch_redraws_in_place_on_a_terminal(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    sc = start_sidecar(policy(model_url), env={"SIDECAR_ADMIN_TOKEN": TOKEN})
    session = f"sidecar-status-{uuid.uuid4().hex[:8]}"
    command = " ".join(
        [
            f"SIDECAR_ADMIN_TOKEN={TOKEN}",
            *sidecar_cmd("status", "--admin-url", sc.admin_url, "--watch", "--interval", "0.2s"),
        ]
    )
    socket = str(tmp_path / "tmux.sock")
    tmux = ["tmux", "-S", socket]
    await asyncio.to_thread(
        subprocess.run,
        [*tmux, "new-session", "-d", "-s", session, "-x", "200", "-y", "40", command],
        check=True,
        cwd=REPO,
        env={**os.environ, "TERM": "xterm-256color"},
        timeout=10,
    )

    async def screen() -> str:
        out = await asyncio.to_thread(
            subprocess.run,
            [*tmux, "capture-pane", "-p", "-t", session],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout

    async def shows(state: str) -> bool:
        lines = (await screen()).splitlines()
        return any(m[1] == state for line in lines if (m := BREAKER_ROW.match(line)))

    try:
        await wait_until(lambda: shows("closed"), timeout=20)
        for _ in range(3):
            assert await chat(http, sc, "status=503") == 503
        await wait_until(lambda: shows("open"))
        current = await screen()
        # Redrawn in place: one screen, one breakers table, no scrolling history of frames.
        assert current.count("Breakers") == 1, current
        assert "Review backlog: empty" in current
    finally:
        await asyncio.to_thread(
            subprocess.run, [*tmux, "kill-server"], capture_output=True, timeout=5
        )
