"""`sidecar failures report` against a seeded store: counts, rates against the per-minute request
counters, p50/p95 latency, mean recovery from breaker records, top causes, the time range and
route filters, the JSON and PNG outputs, and `failures export`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.cli import build_parser
from sidecar.failures.cli import run_failures
from sidecar.failures.report import failure_report, percentile, render_text
from sidecar.failures.sqlite import DB_NAME, SqliteFailureStore
from sidecar.failures.store import FailureRecord, RecordKind, RequestCount

T0 = 1_700_000_040.0  # a minute boundary
MIN = 60


def req(
    n: int,
    t: float,
    route: str,
    mode: str,
    latency: float,
    cause: str,
    outcome: str = "error",
    upstream: str = "model",
) -> FailureRecord:
    return FailureRecord(
        id=f"{n:032x}",
        time=t,
        kind=RecordKind.REQUEST,
        route=route,
        upstream=upstream,
        mode=mode,
        outcome=outcome,
        request_id=f"r{n}",
        latency_ms=latency,
        cause=cause,
    )


def breaker(n: int, t: float, to: str, recovery: float | None = None) -> FailureRecord:
    detail: dict[str, Any] = {"breaker": "model", "from": "x", "to": to}
    if recovery is not None:
        detail["recovery_seconds"] = recovery
    return FailureRecord(
        id=f"b{n:031x}",
        time=t,
        kind=RecordKind.BREAKER,
        route="",
        upstream="model",
        mode=None,
        outcome=to,
        detail=detail,
    )


def seed_records() -> tuple[list[FailureRecord], list[RequestCount]]:
    records = []
    n = 0
    # chat / upstream_5xx: latencies 10, 20, ..., 100 ms; causes 7× "503", 3× "500".
    for i in range(10):
        n += 1
        cause = "upstream answered 503" if i < 7 else "upstream answered 500"
        records.append(req(n, T0 + 10 + i, "chat", "upstream_5xx", 10.0 * (i + 1), cause))
    # chat / connect_error: 4 records, latency 1..4 ms, served by the static fallback.
    for i in range(4):
        n += 1
        records.append(
            req(n, T0 + 100 + i, "chat", "connect_error", 1.0 + i, "connect_error", "fallback")
        )
    # fraud / circuit_open: 5 records on another upstream.
    for i in range(5):
        n += 1
        records.append(
            req(n, T0 + 200 + i, "fraud", "circuit_open", 0.5, "circuit open", upstream="small")
        )
    # One user report on chat.
    records.append(
        FailureRecord(
            id="f" * 32,
            time=T0 + 300,
            kind=RecordKind.FEEDBACK,
            route="chat",
            upstream="model",
            mode="user_reported",
            outcome="ok",
            cause="wrong",
        )
    )
    # Outside the range: must not count.
    records.append(req(999, T0 + 10 * 86400, "chat", "upstream_5xx", 1.0, "late"))
    records.append(req(998, T0 - 3600, "chat", "upstream_5xx", 1.0, "early"))
    # The model's breaker opened twice: recoveries 2 s and 4 s (one from the pairing).
    records += [
        breaker(1, T0 + 20, "open"),
        breaker(2, T0 + 21, "half_open"),
        breaker(3, T0 + 22, "closed", recovery=2.0),
        breaker(4, T0 + 400, "open"),
        breaker(5, T0 + 404, "closed"),
    ]
    counts = [
        RequestCount(int(T0), "chat", "ok", 60),
        RequestCount(int(T0), "chat", "error", 10),
        RequestCount(int(T0) + MIN, "chat", "fallback", 30),
        RequestCount(int(T0) + 2 * MIN, "fraud", "ok", 45),
        RequestCount(int(T0) + 2 * MIN, "fraud", "error", 5),
        RequestCount(int(T0) + 20 * 86400, "chat", "ok", 1000),  # outside
    ]
    return records, counts


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    async def seed() -> None:
        store = SqliteFailureStore(tmp_path / DB_NAME)
        records, counts = seed_records()
        await store.write(records, counts)
        await store.close()

    asyncio.run(seed())
    return tmp_path


def test_percentile_is_linear_between_ranks() -> None:
    values = [10.0 * (i + 1) for i in range(10)]
    assert percentile(values, 0.5) == pytest.approx(55.0)
    assert percentile(values, 0.95) == pytest.approx(95.5)
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0


def test_report_numbers_match_the_seeded_store(state_dir: Path) -> None:
    async def run() -> Any:
        store = SqliteFailureStore(state_dir / DB_NAME, read_only=True)
        try:
            return await failure_report(store, T0, T0 + 86400)
        finally:
            await store.close()

    report = asyncio.run(run())
    assert report.requests == 150
    assert report.requests_by_route == {"chat": 100, "fraud": 50}
    assert report.failed == 19 and report.user_reported == 1
    rows = {(r.route, r.mode): r for r in report.rows}
    assert set(rows) == {
        ("chat", "upstream_5xx"),
        ("chat", "connect_error"),
        ("fraud", "circuit_open"),
        ("chat", "user_reported"),
    }
    five = rows[("chat", "upstream_5xx")]
    assert five.count == 10
    assert five.rate == pytest.approx(0.10)
    assert five.p50_ms == pytest.approx(55.0)
    assert five.p95_ms == pytest.approx(95.5)
    assert five.mean_recovery_s == pytest.approx(3.0)  # (2 + 4) / 2
    assert five.top_causes == [("upstream answered 503", 7), ("upstream answered 500", 3)]
    connect = rows[("chat", "connect_error")]
    assert connect.count == 4 and connect.rate == pytest.approx(0.04)
    assert connect.p50_ms == pytest.approx(2.5) and connect.outcomes == {"fallback": 4}
    fraud = rows[("fraud", "circuit_open")]
    assert fraud.count == 5 and fraud.rate == pytest.approx(0.10)
    assert fraud.mean_recovery_s is None  # its upstream's breaker never opened
    assert report.rows[0] is five  # busiest first
    assert len(report.breakers) == 1
    b = report.breakers[0]
    assert (b.breaker, b.opened, b.closed) == ("model", 2, 2)
    assert b.mean_recovery_s == pytest.approx(3.0) and b.max_recovery_s == pytest.approx(4.0)

    text = render_text(report)
    assert "upstream_5xx" in text and "10.00%" in text and "55.0" in text and "95.5" in text
    assert "upstream answered 503 (7)" in text and "3.0s" in text


def test_route_filter_and_range(state_dir: Path) -> None:
    async def run() -> Any:
        store = SqliteFailureStore(state_dir / DB_NAME, read_only=True)
        try:
            return await failure_report(store, T0, T0 + 150, route="chat")
        finally:
            await store.close()

    report = asyncio.run(run())
    assert {(r.route, r.mode) for r in report.rows} == {
        ("chat", "upstream_5xx"),
        ("chat", "connect_error"),
    }
    assert report.requests == 100  # minutes T0 and T0+60 are in [T0, T0+150)


def cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return run_failures(args)


def test_cli_json_png_and_export(
    state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    since, until = "2023-11-14T22:14:00Z", "2023-11-15T22:14:00Z"
    assert T0 == 1_700_000_040.0  # 2023-11-14T22:14:00Z
    common = ["--state-dir", str(state_dir), "--since", since, "--until", until]
    png = tmp_path / "report.png"
    assert cli(["failures", "report", *common, "--json", "--png", str(png)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["requests"] == 150 and data["failed"] == 19
    row = next(r for r in data["rows"] if r["mode"] == "upstream_5xx")
    assert row["count"] == 10 and row["rate"] == pytest.approx(0.1)
    assert row["p95_ms"] == pytest.approx(95.5) and row["mean_recovery_s"] == pytest.approx(3.0)
    assert row["top_causes"][0] == {"cause": "upstream answered 503", "count": 7}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert cli(["failures", "export", *common, "--mode", "circuit_open"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert {json.loads(line)["mode"] for line in lines} == {"circuit_open"}

    assert cli(["failures", "export", *common, "--kind", "breaker"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5


def test_cli_without_a_store_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["failures", "report", "--state-dir", str(tmp_path / "none")]) == 1
    assert "no failure store" in capsys.readouterr().err
    assert cli(["failures", "report", "--state-dir", str(tmp_path), "--since", "soon"]) == 2
