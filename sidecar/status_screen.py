"""The one screen of `sidecar status`, drawn with `rich` from the `/admin/status` document.

A header line (policy, uptime, in flight, the rate window), a table of routes (request rate,
shares of success / fallback / escalated / error, failures by mode in the window, the breaker and
its next probe, retry budget left, in flight against the bulkhead's limit), a table of every
breaker, and the review backlog. Pure: a document in, a renderable out.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Mapping
from typing import Any

from rich.console import Group, JustifyMethod, RenderableType
from rich.table import Table
from rich.text import Text

__all__ = ["render_status"]

_STATE_STYLE = {"closed": "green", "half-open": "yellow", "open": "bold red"}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def _state(breaker: Mapping[str, Any] | None) -> Text:
    if not breaker:
        return Text("—")
    state = str(breaker.get("state"))
    return Text(state, style=_STATE_STYLE.get(state, ""))


def _probe(breaker: Mapping[str, Any] | None) -> str:
    if not breaker or breaker.get("next_probe_in") is None:
        return "—"
    return "in " + _age(float(breaker["next_probe_in"]))


def _failures(failures: Mapping[str, Mapping[str, float]]) -> str:
    parts = [f"{mode} {int(n['window'])}" for mode, n in failures.items() if n.get("window")]
    return ", ".join(parts) if parts else "—"


def _in_flight(bulkhead: Mapping[str, Any] | None) -> str:
    if not bulkhead:
        return "— (no limit)"
    text = f"{bulkhead['in_flight']}/{bulkhead['limit']}"
    if bulkhead.get("queued"):
        text += f" +{bulkhead['queued']} queued"
    return text


def _routes_table(status: Mapping[str, Any]) -> Table:
    table = Table(title="Routes", title_justify="left", expand=False)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("Route", "left"),
        ("Upstream", "left"),
        ("Req/s", "right"),
        ("Success", "right"),
        ("Fallback", "right"),
        ("Escalated", "right"),
        ("Error", "right"),
        ("Failures by mode", "left"),
        ("Breaker", "left"),
        ("Next probe", "left"),
        ("Budget left", "right"),
        ("In flight", "right"),
    )
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=name != "Failures by mode")
    for route in status.get("routes", []):
        shares = route.get("shares", {})
        budget = route.get("retry_budget")
        table.add_row(
            route["name"],
            route.get("upstream") or "—",
            f"{route['requests']['rate_per_second']:.2f}",
            _share(shares.get("success")),
            _share(shares.get("fallback")),
            _share(shares.get("escalated")),
            _share(shares.get("error")),
            _failures(route.get("failures", {})),
            _state(route.get("breaker")),
            _probe(route.get("breaker")),
            f"{budget['available']:.1f}" if budget else "—",
            _in_flight(route.get("bulkhead")),
        )
    return table


def _breakers_table(status: Mapping[str, Any]) -> Table:
    table = Table(title="Breakers", title_justify="left", expand=False)
    for name in ("Breaker", "State", "Next probe", "Calls/failures (window)", "Opens", "Recovery"):
        table.add_column(name, no_wrap=True)
    for b in status.get("breakers", []):
        recovery = b.get("last_recovery_seconds")
        table.add_row(
            b["upstream"],
            _state(b),
            _probe(b),
            f"{b.get('window_calls', 0)}/{b.get('window_failures', 0)}",
            str(b.get("open_count", 0)),
            _age(recovery) if recovery is not None else "—",
        )
    return table


def render_status(status: Mapping[str, Any], url: str) -> RenderableType:
    """The one screen: a header line, the routes, the breakers and the review backlog."""
    policy = status.get("policy") or {}
    header = Text()
    header.append("sidecar ", style="bold")
    header.append(url)
    header.append(f"  ·  policy {policy.get('source')}")
    header.append(f"  ·  up {_age(status.get('uptime_seconds'))}")
    header.append(f"  ·  in flight {status.get('in_flight', 0)}")
    header.append(f"  ·  rates over the last {_age(status.get('window_seconds'))}")
    if status.get("draining"):
        header.append("  ·  DRAINING", style="bold red")
    stamp = status.get("time", "")
    with contextlib.suppress(ValueError, TypeError):
        stamp = dt.datetime.fromisoformat(stamp).astimezone().strftime("%H:%M:%S")
    header.append(f"  ·  {stamp}", style="dim")
    reviews = status.get("reviews") or {}
    backlog = Text("Review backlog: ", style="bold")
    pending = int(reviews.get("pending") or 0)
    if pending:
        backlog.append(f"{pending} pending, oldest {_age(reviews.get('oldest_age_seconds'))}")
    else:
        backlog.append("empty")
    store = reviews.get("store")
    if store and store != "ok":
        backlog.append(f"  (store: {store})", style="yellow")
    return Group(header, _routes_table(status), _breakers_table(status), backlog)
