"""Graceful degradation against the real demo model: load shedding, every fallback kind and the
chain's order, the cache's identity boundary, CEL rules, the fallback upstream's own breaker,
and stream failures that OpenAI clients see as errors."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import REPO, SidecarFactory, SidecarProc, write_policy
from tests.integration.test_resilience import wait_until
from tests.support.processes import sidecar_cmd

pytestmark = pytest.mark.timeout(30)

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
SAFE = {"decision": "review", "reason": "model_unavailable"}
INFER = "/v2/models/fraud/infer"


def closed_port() -> str:
    """A loopback URL nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def down_url() -> Iterator[str]:
    yield closed_port()


def route(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "r",
        "match": {"path_prefix": "/"},
        "upstream": "model",
        "retry": {"max_attempts": 1},
    }
    base.update(fields)
    return base


def policy(upstreams: dict[str, Any], *routes: dict[str, Any]) -> dict[str, Any]:
    ups = {}
    for name, spec in upstreams.items():
        spec = {"url": spec} if isinstance(spec, str) else dict(spec)
        spec.setdefault("breaker", {"enabled": False})
        ups[name] = spec
    return {"upstreams": ups, "routes": list(routes)}


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, **headers: str
) -> tuple[int, Any, dict[str, str]]:
    async with http.post(url, json=body, headers=headers) as resp:
        raw = await resp.read()
        try:
            data = json.loads(raw)
        except ValueError:
            data = raw
        return resp.status, data, {k.lower(): v for k, v in resp.headers.items()}


def assert_fallback(headers: dict[str, str], kind: str, mode: str) -> None:
    assert headers["x-sidecar-outcome"] == "fallback"
    assert headers["x-sidecar-fallback"] == kind
    assert headers["x-sidecar-failure-mode"] == mode


async def breakers(http: aiohttp.ClientSession, sc: SidecarProc) -> dict[str, Any]:
    async with http.get(sc.admin_url + "/admin/breakers") as resp:
        return {b["upstream"]: b for b in (await resp.json())["breakers"]}


# -- load shedding -------------------------------------------------------------------------------


async def test_burst_above_the_limit_is_shed_with_retry_after(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    concurrency = {"max_in_flight": 2, "queue": 1, "queue_timeout": "100ms", "retry_after": "2s"}
    sc = start_sidecar(policy({"model": {"url": model_url, "concurrency": concurrency}}, route()))

    async def one() -> tuple[int, Any, dict[str, str]]:
        # Each admitted request holds its slot for a while in the model.
        return await post(
            http, sc.url + "/v1/chat/completions", CHAT, **{"x-demo-fault": "latency=1s"}
        )

    results = await asyncio.gather(*(one() for _ in range(8)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200, 200] + [503] * 6
    for status, body, headers in results:
        if status == 503:
            assert headers["retry-after"] == "2"
            assert headers["x-sidecar-failure-mode"] == "overloaded"
            assert body["error"]["failure_mode"] == "overloaded"
        else:
            assert headers["x-sidecar-outcome"] == "ok"
            assert body["choices"]
    async with http.get(model_url + "/_demo/stats") as resp:
        assert (await resp.json())["requests"] == 2  # the excess never reached the model
    records = [r for r in sc.rp.records() if r.get("event") == "request"]
    assert sum(1 for r in records if r["failure_mode"] == "overloaded") == 6


async def test_queued_request_waits_for_a_slot_instead_of_failing(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    concurrency = {"max_in_flight": 1, "queue": 1, "queue_timeout": "10s"}
    sc = start_sidecar(policy({"model": {"url": model_url, "concurrency": concurrency}}, route()))
    results = await asyncio.gather(
        *(
            post(http, sc.url + "/v1/chat/completions", CHAT, **{"x-demo-fault": "latency=300ms"})
            for _ in range(3)
        )
    )
    assert sorted(status for status, _, _ in results) == [200, 200, 503]


async def test_shed_request_gets_the_fallback_answer(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    concurrency = {"max_in_flight": 1, "queue": 0}
    sc = start_sidecar(
        policy(
            {"model": {"url": model_url, "concurrency": concurrency}},
            route(fallback=[{"static": {"json": SAFE}}]),
        )
    )
    held = asyncio.create_task(
        post(http, sc.url + "/v1/chat/completions", CHAT, **{"x-demo-fault": "latency=1s"})
    )

    async def admitted() -> bool:
        async with http.get(model_url + "/_demo/stats") as resp:
            return bool((await resp.json())["in_flight"] == 1)

    await wait_until(admitted)
    status, body, headers = await post(http, sc.url + "/v1/chat/completions", CHAT)
    assert status == 200 and body == SAFE
    assert_fallback(headers, "static", "overloaded")
    assert (await held)[0] == 200


# -- each fallback kind, and the chain's order ---------------------------------------------------


async def test_static_answers_when_the_model_is_down(
    down_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    static = {"status": 200, "headers": {"x-fallback-reason": "outage"}, "json": SAFE}
    sc = start_sidecar(policy({"model": down_url}, route(fallback=[{"static": static}])))
    status, body, headers = await post(http, sc.url + INFER, {"inputs": []})
    assert status == 200 and body == SAFE
    assert_fallback(headers, "static", "connect_error")
    assert headers["x-fallback-reason"] == "outage"
    rec = sc.rp.wait_for_log(lambda r: r.get("event") == "request")
    assert rec["outcome"] == "fallback" and rec["fallback"] == "static"
    assert rec["failure_mode"] == "connect_error"


async def test_fallback_upstream_answers_when_the_primary_is_down(
    model_url: str, down_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(
        policy({"model": down_url, "small": model_url}, route(fallback=[{"upstream": "small"}]))
    )
    status, body, headers = await post(http, sc.url + "/v1/chat/completions", CHAT)
    assert status == 200 and body["object"] == "chat.completion"  # the small model's answer
    assert_fallback(headers, "upstream", "connect_error")


async def test_cache_answers_with_the_last_good_answer_and_never_crosses_callers(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(policy({"model": model_url}, route(fallback=[{"cache": {"ttl": "1m"}}])))
    url = sc.url + "/v1/chat/completions"
    alice = {"Authorization": "Bearer alice"}
    status, good, headers = await post(http, url, CHAT, **alice)
    assert status == 200 and headers["x-sidecar-outcome"] == "ok"
    async with http.post(
        model_url + "/_demo/faults", json={"spec": "status=503", "seconds": 60}
    ) as armed:
        assert armed.status == 200
    status, body, headers = await post(http, url, CHAT, **alice)
    assert status == 200 and body == good  # byte-for-byte the answer alice got before
    assert_fallback(headers, "cache", "upstream_5xx")
    assert "age" in headers
    # Bob sends the very same request: he never gets alice's answer, he gets the failure.
    status, body, headers = await post(http, url, CHAT, Authorization="Bearer bob")
    assert status == 503
    assert headers["x-sidecar-failure-mode"] == "upstream_5xx"
    assert headers["x-sidecar-outcome"] == "error"
    assert "x-sidecar-fallback" not in headers
    # Nor does a caller without credentials.
    status, _, _ = await post(http, url, CHAT)
    assert status == 503


async def test_rules_pick_the_template_by_the_request(
    down_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    rules = [
        {
            "when": "double(request.inputs[0].data[0]) > 10000.0",
            "respond": {"json": {"decision": "hold"}},
        },
        {
            "when": 'headers["x-tier"] == "gold"',
            "respond": {"status": 202, "json": {"decision": "approve"}},
        },
    ]
    sc = start_sidecar(
        policy(
            {"model": down_url},
            route(fallback=[{"rules": rules}, {"static": {"json": SAFE}}]),
        )
    )
    big = {"inputs": [{"name": "amount", "shape": [1], "datatype": "FP64", "data": [20000]}]}
    small = {"inputs": [{"name": "amount", "shape": [1], "datatype": "FP64", "data": [5.0]}]}
    status, body, headers = await post(http, sc.url + INFER, big)
    assert (status, body) == (200, {"decision": "hold"})
    assert_fallback(headers, "rules", "connect_error")
    status, body, headers = await post(http, sc.url + INFER, small, **{"x-tier": "gold"})
    assert (status, body) == (202, {"decision": "approve"})
    status, body, headers = await post(http, sc.url + INFER, small)
    assert (status, body) == (200, SAFE)  # no rule holds: the next link answers
    assert headers["x-sidecar-fallback"] == "static"


async def test_chain_order_is_respected(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    small = closed_port()
    chain = [
        {"upstream": "small"},
        {"cache": {}},
        {"rules": [{"when": "request.amount > 100", "respond": {"json": {"decision": "hold"}}}]},
        {"static": {"json": SAFE}},
    ]
    sc = start_sidecar(policy({"model": model_url, "small": small}, route(fallback=chain)))
    url = sc.url + "/echo/score"
    # While the model is up, two answers are learned.
    assert (await post(http, url, {"amount": 500}))[0] == 200
    await http.post(model_url + "/_demo/faults", json={"spec": "status=500", "seconds": 60})
    # small is down too → the cache knows this request.
    status, body, headers = await post(http, url, {"amount": 500})
    assert status == 200 and headers["x-sidecar-fallback"] == "cache"
    assert body["path"] == "/echo/score"  # the model's own (echo) answer from before
    # Not cached, a rule holds → rules.
    status, body, headers = await post(http, url, {"amount": 101})
    assert (body, headers["x-sidecar-fallback"]) == ({"decision": "hold"}, "rules")
    # Not cached, no rule holds → static.
    status, body, headers = await post(http, url, {"amount": 1})
    assert (body, headers["x-sidecar-fallback"]) == (SAFE, "static")
    assert headers["x-sidecar-failure-mode"] == "upstream_5xx"
    # The chain stopped at the first link that answered, in order.
    sc.rp.wait_for_log(lambda r: r.get("event") == "request" and r.get("fallback") == "static")
    answered = [r["fallback"] for r in sc.rp.records() if r.get("event") == "request"]
    assert answered == [None, "cache", "rules", "static"]


async def test_fallback_upstream_breaker_opens_when_it_is_down_too(
    down_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    small = closed_port()
    sc = start_sidecar(
        policy(
            {
                "model": {
                    "url": down_url,
                    "breaker": {"consecutive_failures": 2, "open_for": "1m"},
                },
                "small": {"url": small, "breaker": {"consecutive_failures": 2, "open_for": "1m"}},
            },
            route(fallback=[{"upstream": "small"}, {"static": {"json": SAFE}}]),
        )
    )
    for _ in range(2):
        status, body, headers = await post(http, sc.url + INFER, {})
        assert (status, body) == (200, SAFE)
        assert_fallback(headers, "static", "connect_error")
    state = await breakers(http, sc)
    assert state["small"]["state"] == "open"  # small's own breaker, keyed by its name
    assert state["model"]["state"] == "open"
    status, body, headers = await post(http, sc.url + INFER, {})
    assert (status, body) == (200, SAFE)
    assert_fallback(headers, "static", "circuit_open")


async def test_every_link_failing_gives_the_original_failure(
    down_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(
        policy(
            {"model": down_url, "small": closed_port()},
            route(fallback=[{"upstream": "small"}, {"cache": {}}]),
        )
    )
    status, body, headers = await post(http, sc.url + INFER, {})
    assert status == 502
    assert body["error"]["failure_mode"] == "connect_error"
    assert headers["x-sidecar-outcome"] == "error"
    assert "x-sidecar-fallback" not in headers


# -- the shipped example policies keep a route useful through an outage -------------------------


async def test_llm_example_policy_answers_openai_clients_through_an_outage(
    down_url: str, start_sidecar: SidecarFactory
) -> None:
    sc = start_sidecar(REPO / "policies" / "llm-openai.yaml", "--upstream", down_url)
    client = openai.AsyncOpenAI(base_url=sc.url + "/v1", api_key="k", max_retries=0)
    async with client:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-sidecar-fallback"] == "static"
        completion = raw.parse()
        assert "try again" in (completion.choices[0].message.content or "")
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert "try again" in text


async def test_classifier_example_policy_answers_through_an_outage(
    down_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(REPO / "policies" / "kserve-classifier.yaml", "--upstream", down_url)
    big = {"inputs": [{"name": "amount", "shape": [1], "datatype": "FP64", "data": [20000]}]}
    status, body, headers = await post(http, sc.url + INFER, big)
    assert status == 200 and body["outputs"][0]["data"] == ["hold"]
    assert_fallback(headers, "rules", "connect_error")
    status, body, headers = await post(http, sc.url + INFER, {"inputs": []})
    assert status == 200 and body["outputs"][0]["data"] == ["review"]
    assert headers["x-sidecar-fallback"] == "static"


# -- rules are compiled when the policy loads ----------------------------------------------------


def test_a_broken_rule_fails_validate_with_its_field_path(tmp_path: Path) -> None:
    bad = write_policy(
        tmp_path,
        """
        upstreams: {model: {url: http://127.0.0.1:1}}
        routes:
          - name: r
            fallback:
              - cache: {}
              - rules:
                  - when: "request.amount > 10"
                    respond: {json: {decision: hold}}
                  - when: "request.amount >"
                    respond: {json: {decision: oops}}
              - static: {json: {decision: review}}
        """,
    )
    result = subprocess.run(
        sidecar_cmd("validate", str(bad)), capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 2
    assert (
        f"{bad}: routes[0].fallback[1].rules[1].when: not a valid CEL expression at line 1"
        in result.stdout
    ), result.stdout


# -- visible stream failures ---------------------------------------------------------------------


def stream_policy(model_url: str) -> dict[str, Any]:
    return policy(
        {"model": model_url},
        route(
            timeouts={"total": "10s", "first_byte": "5s", "stream_idle": "300ms"},
            # A fallback never answers once bytes reached the caller.
            fallback=[{"static": {"json": SAFE}}],
        ),
    )


@pytest.mark.parametrize(
    ("fault", "mode"),
    [("reset_mid_stream", "stream_interrupted"), ("stall_mid_stream=2s", "stream_stalled")],
)
async def test_openai_client_raises_on_a_broken_stream(
    model_url: str, start_sidecar: SidecarFactory, fault: str, mode: str
) -> None:
    sc = start_sidecar(stream_policy(model_url))
    client = openai.AsyncOpenAI(
        base_url=sc.url + "/v1",
        api_key="k",
        max_retries=0,
        default_headers={"x-demo-fault": fault},
    )
    received: list[str] = []
    async with client:
        stream = await client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")
    assert received  # the first token arrived: the failure came mid-stream
    assert isinstance(info.value.body, dict) and info.value.body["failure_mode"] == mode
    rec = sc.rp.wait_for_log(lambda r: r.get("event") == "request")
    assert rec["failure_mode"] == mode
    assert rec["outcome"] == "error"
    assert rec["fallback"] is None


@pytest.mark.parametrize(
    ("fault", "mode"),
    [("reset_mid_stream", "stream_interrupted"), ("stall_mid_stream=2s", "stream_stalled")],
)
async def test_no_done_after_the_error_event(
    model_url: str,
    start_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    fault: str,
    mode: str,
) -> None:
    sc = start_sidecar(stream_policy(model_url))
    async with http.post(
        sc.url + "/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers={"x-demo-fault": fault},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.read()  # the sidecar ends the stream and closes the connection
    events = [e for e in raw.decode().split("\n\n") if e.strip()]
    assert events[0].startswith("data: {")  # a real token first
    last = events[-1]
    assert last.startswith("event: error\ndata: ")
    envelope = json.loads(last.split("data: ", 1)[1])
    assert envelope["error"]["failure_mode"] == mode
    assert envelope["error"]["type"] == "sidecar_error"
    assert b"[DONE]" not in raw
