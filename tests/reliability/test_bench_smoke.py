"""The benchmark harness measures what it says: every scheduled request is sent and counted once,
latency runs from the scheduled send, late sends are visible, streams and timeouts are seen, and
a quick run's report never erases the full run's section. Nothing here times the sidecar."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from scripts import bench_report
from scripts.bench_load import Client, Request, Sample, _Conn, percentile, run_open_loop
from scripts.bench_scenarios import (
    CHAT,
    SSE,
    SSE_CHUNK_INTERVAL_MS,
    _fold,
    _mean_gap,
    agg,
    summarize,
    with_fault,
)


def _hostport(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


async def _model_requests(url: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/_demo/stats") as resp:
        return int((await resp.json())["requests"])


@pytest.mark.timeout(60)
async def test_every_scheduled_request_is_sent_once_and_answered(model_url: str) -> None:
    res = await run_open_loop(*_hostport(model_url), CHAT, rate=100, duration=1.0)
    assert len(res.samples) == 100
    assert all(s.ok and s.status == 200 for s in res.samples)
    assert await _model_requests(model_url) == 100
    scheduled = sorted(s.scheduled for s in res.samples)
    gaps = [b - a for a, b in itertools.pairwise(scheduled)]
    assert all(abs(g - 0.01) < 1e-6 for g in gaps)  # a fixed schedule, whatever the answers did
    summary = summarize(res)
    assert summary["errors"] == 0
    assert 0 < summary["p50"] <= summary["p99"] <= summary["max"]


@pytest.mark.timeout(60)
async def test_late_sends_are_counted_and_charged_to_latency(model_url: str) -> None:
    stalled: list[float] = []

    def stall(elapsed: float) -> None:
        if elapsed >= 0.1 and not stalled:
            stalled.append(elapsed)
            time.sleep(0.1)  # the generator falls behind for 100 ms

    res = await run_open_loop(*_hostport(model_url), CHAT, rate=200, duration=0.5, on_tick=stall)
    assert res.late_sends >= 10
    late = [s for s in res.samples if s.late > 0.05]
    assert late and all(s.latency >= s.late for s in late)


@pytest.mark.timeout(60)
async def test_streams_report_first_event_and_every_event(model_url: str) -> None:
    res = await run_open_loop(*_hostport(model_url), SSE, rate=20, duration=0.5)
    assert len(res.samples) == 10
    for s in res.samples:
        assert s.ok
        assert s.events == 8  # six tokens, the finish chunk, [DONE]
        assert s.first_event is not None and 0 < s.first_event <= s.latency


@pytest.mark.timeout(60)
async def test_paced_streams_take_their_intervals(model_url: str) -> None:
    interval = SSE_CHUNK_INTERVAL_MS / 1000.0
    paced = with_fault(SSE, f"chunk_interval={SSE_CHUNK_INTERVAL_MS}ms")
    res = await run_open_loop(*_hostport(model_url), paced, rate=20, duration=0.5)
    assert len(res.samples) == 10
    for s in res.samples:
        assert s.ok and s.events == 8
        assert s.first_event is not None and s.last_event is not None
        # The model waited 7 intervals after the first event, all after the scheduled send.
        assert s.last_event >= 7 * interval - 1e-6
        assert s.first_event <= s.last_event <= s.latency


def _read(conn: _Conn, payload: bytes, at: float) -> None:
    assert conn.sample is not None
    conn._events(payload, conn.sample.scheduled + at)


def test_mean_gap_counts_only_the_gaps_the_reads_spanned() -> None:
    event = b"data: {}\n\n"
    conn = _Conn(Client("127.0.0.1", 1))
    conn.sample = Sample(scheduled=100.0)
    _read(conn, event, 0.005)  # a late first read holds events 0 and 1, as two chunks
    _read(conn, event, 0.005)
    for k in range(2, 8):
        _read(conn, event, 0.005 + (k - 1) * 0.02)
    s = conn.sample
    assert (s.events, s.first_read_events) == (8, 2)
    gap = _mean_gap(s)
    assert gap is not None and gap == pytest.approx(0.02)  # not 6 gaps spread over 7
    assert s.max_gap == pytest.approx(0.02)

    conn.sample = Sample(scheduled=100.0)
    _read(conn, event * 8, 0.005)  # back to back: one read, no gap seen
    assert conn.sample.events == 8 and _mean_gap(conn.sample) is None


def test_only_blocks_with_data_are_events() -> None:
    conn = _Conn(Client("127.0.0.1", 1))
    conn.sample = Sample(scheduled=100.0)
    _read(conn, b": keep-alive\n\ndata: {}\n", 0.01)  # a comment, then half an event
    assert conn.sample.events == 0 and conn.sample.first_event is None
    _read(conn, b"\ndata: [DONE]\n\n: sidecar-outcome ok confidence=0.95\n\n", 0.03)
    assert conn.sample.events == 2
    assert conn.sample.first_event == pytest.approx(0.03)


@pytest.mark.timeout(60)
async def test_a_hung_request_times_out_at_the_callers_limit(model_url: str) -> None:
    res = await run_open_loop(
        *_hostport(model_url), with_fault(CHAT, "hang"), rate=10, duration=0.3, timeout=0.3
    )
    assert [s.error for s in res.samples] == ["timeout"] * 3
    assert all(0.3 <= s.latency < 1.0 for s in res.samples)


@pytest.mark.timeout(60)
async def test_status_and_connection_errors_are_errors(model_url: str) -> None:
    res = await run_open_loop(
        *_hostport(model_url), with_fault(CHAT, "status=503"), rate=20, duration=0.25
    )
    assert [s.status for s in res.samples] == [503] * 5
    assert summarize(res)["error_kinds"] == {"503": 5}
    # Nothing listens on port 1: the connection error is a sample, not a crash.
    res = await run_open_loop("127.0.0.1", 1, Request(), rate=10, duration=0.2, warm_connections=0)
    assert all(s.error and s.error.startswith("connect") for s in res.samples)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 99.9) == 100
    assert math.isnan(percentile([], 50))
    assert agg([3.0, 1.0, 2.0]) == {
        "median": 2.0,
        "min": 1.0,
        "max": 3.0,
        "values": [3.0, 1.0, 2.0],
    }


def _fake_results(mode: str, added_p50: float) -> dict[str, Any]:
    def run(p50: float, cpu: float | None) -> dict[str, Any]:
        out = {"p50": p50, "p99": p50 * 2, "errors": 0, "n": 100, "late": 0}
        if cpu is not None:
            out["cpu_ms"] = cpu
        return out

    runs = {
        "direct": [run(1.0, None) for _ in range(3)],
        "all": [run(1.0 + added_p50, 0.2) for _ in range(3)],
    }
    return {"mode": mode, "rounds": 3, "healthy": {"200": _fold(runs, ["direct", "all"])}}


def test_report_sections_and_targets(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    bench_report.write(_fake_results("full", 0.3), out, tmp_path)
    bench_report.write(_fake_results("quick", 0.9), out, tmp_path)
    text = out.read_text()
    full = text.split("<!-- bench:full:start -->")[1]
    quick = text.split("<!-- bench:quick:start -->")[1].split("<!-- bench:quick:end -->")[0]
    assert "Full run" in full and "Quick run" in quick
    # The full section still has its own figure after the quick run rewrote its section.
    target = "| added p50 ≤ 0.5 ms at 200 rps, every feature on |"
    assert f"{target} 0.300 [0.300–0.300] ms | met |" in full
    assert f"{target} 0.900 [0.900–0.900] ms | **missed** |" in quick
    cpu = "| ≤ 0.33 CPU-ms per request, every feature on (200 rps) |"
    assert f"{cpu} 0.200 [0.200–0.200] CPU-ms | met |" in full


def test_the_quick_run_is_what_make_bench_quick_runs() -> None:
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert "-m scripts.bench --quick" in makefile


@pytest.mark.timeout(60)
async def test_open_loop_keeps_its_schedule_while_answers_are_slow(model_url: str) -> None:
    # 500 ms per answer, 10 requests in 225 ms: every one is sent before the first answer.
    res = await asyncio.wait_for(
        run_open_loop(
            *_hostport(model_url), with_fault(CHAT, "latency=500ms"), rate=40, duration=0.25
        ),
        10,
    )
    assert len(res.samples) == 10 and all(s.ok for s in res.samples)
    last_send = max(s.scheduled + s.late for s in res.samples)
    first_answer = min(s.scheduled + s.latency for s in res.samples)
    assert last_send < first_answer
