"""The `sidecar status` screen rendered from a document like `/admin/status` returns."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from sidecar.status_screen import render_status


def document(state: str = "open") -> dict[str, Any]:
    breaker = {"name": "model", "state": state, "next_probe_in": 3.25, "consecutive_failures": 0}
    return {
        "time": "2025-06-01T12:00:00+00:00",
        "uptime_seconds": 3725,
        "window_seconds": 59.9,
        "policy": {"source": "policies/default.yaml"},
        "draining": True,
        "in_flight": 3,
        "routes": [
            {
                "name": "chat",
                "upstream": "model",
                "requests": {"rate_per_second": 12.345, "window": 740, "total": 9000},
                "shares": {"success": 0.9, "fallback": 0.05, "escalated": 0.0, "error": 0.05},
                "failures": {
                    "upstream_5xx": {"window": 30, "total": 99},
                    "connect_error": {"window": 0, "total": 4},
                },
                "breaker": breaker,
                "retry_budget": {"available": 7.5},
                "bulkhead": {"in_flight": 3, "limit": 64, "queued": 2},
            },
            {
                "name": "idle",
                "upstream": "model",
                "requests": {"rate_per_second": 0, "window": 0, "total": 0},
                "shares": {"success": None, "fallback": None, "escalated": None, "error": None},
                "failures": {},
                "breaker": None,
                "retry_budget": None,
                "bulkhead": None,
            },
        ],
        "breakers": [
            {
                "upstream": "model",
                "state": state,
                "next_probe_in": 3.25,
                "window_calls": 40,
                "window_failures": 30,
                "open_count": 2,
                "last_recovery_seconds": 95.0,
            }
        ],
        "reviews": {"pending": 4, "oldest_age_seconds": 3700.0, "store": "ok"},
    }


def screen(doc: dict[str, Any]) -> str:
    console = Console(width=220, record=True, color_system=None)
    console.print(render_status(doc, "http://127.0.0.1:8701"))
    return console.export_text()


def test_everything_on_one_screen() -> None:
    text = screen(document())
    assert "policy policies/default.yaml" in text
    assert "up 1h02m" in text and "in flight 3" in text and "DRAINING" in text
    assert "rates over the last 59.9s" in text
    chat = next(line for line in text.splitlines() if line.startswith("│ chat "))
    cells = [c.strip() for c in chat.strip("│").split("│")]
    assert cells == [
        "chat", "model", "12.35", "90%", "5%", "0%", "5%",
        "upstream_5xx 30", "open", "in 3.2s", "7.5", "3/64 +2 queued",
    ]  # fmt: skip
    idle = next(line for line in text.splitlines() if line.startswith("│ idle "))
    assert [c.strip() for c in idle.strip("│").split("│")][3:] == [
        "—", "—", "—", "—", "—", "—", "—", "—", "— (no limit)",
    ]  # fmt: skip
    row = next(line for line in text.splitlines() if line.startswith("│ model "))
    assert [c.strip() for c in row.strip("│").split("│")] == [
        "model", "open", "in 3.2s", "40/30", "2", "1m35s",
    ]  # fmt: skip
    assert "Review backlog: 4 pending, oldest 1h01m" in text


def test_closed_breaker_has_no_probe_and_an_empty_backlog() -> None:
    doc = document("closed")
    doc["breakers"][0]["next_probe_in"] = None
    doc["routes"][0]["breaker"]["next_probe_in"] = None
    doc["reviews"] = {"pending": 0, "oldest_age_seconds": None, "store": "unavailable: down"}
    text = screen(doc)
    row = next(line for line in text.splitlines() if line.startswith("│ model "))
    assert [c.strip() for c in row.strip("│").split("│")][1:3] == ["closed", "—"]
    assert "Review backlog: empty  (store: unavailable: down)" in text
