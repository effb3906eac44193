"""The LLM example end to end: the official `openai` client pointed at a real `sidecar run` with
examples/llm-openai/policy.yaml (only the two upstream URLs changed), in front of two demo models
in OpenAI mode. Streams arrive as they are produced, a stalled stream raises in the client
instead of hanging, and the backup model (then the safe message) answers when the primary is
down; the example's client.py works as its README says.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai import OpenAI

from tests.conftest import SidecarFactory, SidecarProc
from tests.e2e.conftest import LLM_EXAMPLE, example_python, run_bounded
from tests.support.processes import RunningProcess, sidecar_cmd, start_process

pytestmark = pytest.mark.e2e

ANSWER = "Hello from the fault-injecting demo model."
SAFE = "Sorry, I cannot answer right now. Please try again in a moment."
MESSAGES = [{"role": "user", "content": "Say hello."}]
REVIEWER = "e2e-reviewer"
STREAM_IDLE = 5.0  # policy.yaml's timeouts.stream_idle


class DemoModel:
    def __init__(self) -> None:
        self.rp: RunningProcess = start_process(sidecar_cmd("demo-model", "--port", "0"))
        self.url = "http://" + self.rp.ready["address"]

    def control(self, method: str, path: str) -> Any:
        req = urllib.request.Request(
            self.url + path, method=method, data=None if method == "GET" else b""
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read() or b"null")

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.control("GET", "/_demo/stats")
        return stats

    def stop(self) -> None:
        self.rp.stop()


@pytest.fixture
def models() -> Iterator[tuple[DemoModel, DemoModel]]:
    """A primary and a backup demo model of this test's own (a test may stop them)."""
    primary = DemoModel()
    try:
        backup = DemoModel()
    except BaseException:
        primary.stop()
        raise
    try:
        yield primary, backup
    finally:
        for model in (primary, backup):
            if model.rp.proc.poll() is None:
                model.control("POST", "/_demo/release")
            model.stop()


def example_policy(primary: DemoModel, backup: DemoModel) -> dict[str, Any]:
    """The example's policy with the demo models' addresses; schema paths made absolute."""
    doc: dict[str, Any] = yaml.safe_load((LLM_EXAMPLE / "policy.yaml").read_text())
    doc["upstreams"]["primary"]["url"] = primary.url
    doc["upstreams"]["backup"]["url"] = backup.url
    for route in doc["routes"]:
        schema = (route.get("validate") or {}).get("json_schema")
        if schema:
            route["validate"]["json_schema"] = str((LLM_EXAMPLE / schema).resolve())
    return doc


def client(sc: SidecarProc, read_timeout: float = 30.0) -> OpenAI:
    # As client.py: the sidecar retries and falls back; the client itself does not retry.
    return OpenAI(
        base_url=sc.url + "/v1",
        api_key="unused",
        max_retries=0,
        timeout=httpx.Timeout(read_timeout, connect=5.0),
    )


def start(start_sidecar: SidecarFactory, models: tuple[DemoModel, DemoModel]) -> SidecarProc:
    return start_sidecar(example_policy(*models), env={"SIDECAR_REVIEWER_TOKEN": REVIEWER})


@pytest.mark.timeout(90)
def test_client_script_whole_and_streamed(
    start_sidecar: SidecarFactory, models: tuple[DemoModel, DemoModel]
) -> None:
    sc = start(start_sidecar, models)
    script = str(LLM_EXAMPLE / "client.py")

    # As in the README: a whole answer, then the same streamed. The demo model's logprobs say
    # 0.5: the whole answer is judged and queued for review; the stream flows at once and is
    # judged at its end (its headers say what was known at the first token).
    args = ["--base-url", sc.url + "/v1", "--logprobs", "--fault", "confidence=0.5"]
    done = run_bounded([example_python(), script, *args], 60)
    assert done.returncode == 0, done.stdout
    assert f"answer: {ANSWER}" in done.stdout
    assert "outcome=escalated confidence=0.5000 review-id=" in done.stdout, done.stdout
    assert f"stream: {ANSWER}" in done.stdout
    assert "sidecar: outcome=ok" in done.stdout, done.stdout
    # Both are in the review queue: the whole answer and the observed stream (judged at its end,
    # so allow it a moment after the client saw [DONE]).
    req = urllib.request.Request(
        sc.admin_url + "/reviews?route=chat", headers={"Authorization": f"Bearer {REVIEWER}"}
    )
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(req, timeout=5) as resp:
            items = json.loads(resp.read())["items"]
        if len(items) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [(i["reason"], round(i["confidence"], 4)) for i in items] == [("review", 0.5)] * 2


@pytest.mark.timeout(60)
def test_stream_arrives_incrementally(
    start_sidecar: SidecarFactory, models: tuple[DemoModel, DemoModel]
) -> None:
    primary, _ = models
    sc = start(start_sidecar, models)
    raw = client(sc).chat.completions.with_raw_response.create(
        model="demo",
        messages=MESSAGES,
        stream=True,
        logprobs=True,
        extra_headers={"x-demo-fault": "hold_after_first"},
    )
    assert raw.headers["x-sidecar-outcome"] == "ok"
    chunks = iter(raw.parse())
    first = next(chunks)
    assert first.choices[0].delta.content == "Hello"
    # The first token is here while the model is still generating (held until released).
    assert primary.stats()["in_flight"] == 1
    assert primary.control("POST", "/_demo/release")["released"] == 1
    rest = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "Hello" + "".join(rest) == ANSWER
    deadline = time.monotonic() + 5  # the model's handler returns just after its last byte
    while primary.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert primary.stats()["in_flight"] == 0


@pytest.mark.timeout(60)
def test_stalled_stream_raises_in_the_client(
    start_sidecar: SidecarFactory, models: tuple[DemoModel, DemoModel]
) -> None:
    sc = start(start_sidecar, models)
    started = time.monotonic()
    stream = client(sc).chat.completions.create(
        model="demo",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-demo-fault": "hold_after_first"},  # one token, then nothing
    )
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    elapsed = time.monotonic() - started
    # Not a client read timeout (30s): the sidecar ended the stream with an error event.
    assert not isinstance(caught.value, openai.APITimeoutError)
    assert caught.value.code == "stream_stalled"
    assert received == ["Hello"]
    assert STREAM_IDLE <= elapsed < STREAM_IDLE + 10
    record = sc.rp.wait_for_log(lambda r: r.get("event") == "request")
    assert (record["outcome"], record["failure_mode"]) == ("error", "stream_stalled")


@pytest.mark.timeout(90)
def test_backup_then_safe_message_when_models_are_down(
    start_sidecar: SidecarFactory, models: tuple[DemoModel, DemoModel]
) -> None:
    primary, backup = models
    sc = start(start_sidecar, models)
    chat = client(sc).chat.completions

    raw = chat.with_raw_response.create(model="demo", messages=MESSAGES)
    assert raw.headers["x-sidecar-outcome"] == "ok"
    assert (primary.stats()["requests"], backup.stats()["requests"]) == (1, 0)

    primary.stop()
    raw = chat.with_raw_response.create(model="demo", messages=MESSAGES)
    assert raw.parse().choices[0].message.content == ANSWER
    assert raw.headers["x-sidecar-outcome"] == "fallback"
    assert raw.headers["x-sidecar-fallback"] == "upstream"
    assert raw.headers["x-sidecar-failure-mode"] == "connect_error"
    raw = chat.with_raw_response.create(
        model="demo",
        messages=MESSAGES,
        stream=True,
    )
    assert (raw.headers["x-sidecar-outcome"], raw.headers["x-sidecar-fallback"]) == (
        "fallback",
        "upstream",
    )
    assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices) == ANSWER
    assert backup.stats()["requests"] == 2

    # Both down: the safe message, shaped for each kind of caller.
    backup.stop()
    raw = chat.with_raw_response.create(model="demo", messages=MESSAGES)
    assert raw.parse().choices[0].message.content == SAFE
    assert (raw.headers["x-sidecar-outcome"], raw.headers["x-sidecar-fallback"]) == (
        "fallback",
        "static",
    )
    stream = chat.create(model="demo", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == SAFE
