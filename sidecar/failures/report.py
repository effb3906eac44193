"""`sidecar failures report`: what failed in a time range, how, and how fast it recovered.

One row per route and failure mode: the count, the rate against all requests on that route (from
the per-minute request counters the recorder writes, so rates are exact to the minute), p50 and p95
latency (linear interpolation between the nearest ranks), the mean recovery time of the route's
upstream breaker (circuit first open → closed, from the `breaker` records) and the most frequent
causes (the error's message or the upstream's status). A second table lists each breaker's opens,
closes and recovery times. `--json` prints the same numbers; `--png` draws failures over time by
mode and the busiest rows (matplotlib, the `charts` extra).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sidecar.failures.store import (
    FailureQuery,
    FailureRecord,
    FailureStore,
    RecordKind,
    RequestCount,
)
from sidecar.failures.timerange import format_time

__all__ = [
    "BreakerRow",
    "FailureReport",
    "ModeRow",
    "build_report",
    "collect_records",
    "failure_report",
    "percentile",
    "render_text",
    "report_json",
    "text_table",
    "write_png",
]

NO_MODE = "(none)"
_MAX_CAUSE_SHOWN = 70


@dataclass(frozen=True)
class ModeRow:
    route: str
    mode: str
    count: int
    #: Share of all requests on the route in the range; None when none were counted.
    rate: float | None
    p50_ms: float | None
    p95_ms: float | None
    #: Mean circuit recovery (open → closed) of the route's upstream breaker(s), in seconds.
    mean_recovery_s: float | None
    top_causes: list[tuple[str, int]]
    outcomes: dict[str, int]
    upstreams: list[str]


@dataclass(frozen=True)
class BreakerRow:
    breaker: str
    upstream: str
    route: str
    opened: int
    closed: int
    mean_recovery_s: float | None
    max_recovery_s: float | None


@dataclass(frozen=True)
class FailureReport:
    since: float
    until: float
    route: str | None
    requests: int
    requests_by_route: dict[str, int]
    #: Request records (failed, fallback, shed, escalated, rejected).
    failed: int
    user_reported: int
    rows: list[ModeRow]
    breakers: list[BreakerRow]
    bucket_seconds: int
    #: (bucket start, {mode: count}) over the range.
    series: list[tuple[int, dict[str, int]]] = field(default_factory=list)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation between closest ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def collect_records(
    store: FailureStore,
    since: float,
    until: float,
    route: str | None = None,
    kinds: tuple[RecordKind, ...] | None = None,
    modes: tuple[str, ...] | None = None,
) -> list[FailureRecord]:
    records: list[FailureRecord] = []
    cursor: str | None = None
    while True:
        page = await store.list(
            FailureQuery(
                since=since,
                until=until,
                route=route,
                kinds=kinds,
                modes=modes,
                limit=1000,
                cursor=cursor,
            )
        )
        records.extend(page.records)
        if page.next_cursor is None:
            return records
        cursor = page.next_cursor


async def failure_report(
    store: FailureStore, since: float, until: float, route: str | None = None, top: int = 3
) -> FailureReport:
    requests = await collect_records(
        store, since, until, route, kinds=(RecordKind.REQUEST, RecordKind.FEEDBACK)
    )
    breakers = await collect_records(store, since, until, None, kinds=(RecordKind.BREAKER,))
    # Counters are per minute: a range that starts mid-minute includes that whole minute.
    counts = await store.request_counts(math.floor(since / 60) * 60, until, route)
    return build_report(requests, breakers, counts, since, until, route, top)


def _bucket_seconds(since: float, until: float) -> int:
    span = until - since
    if span <= 2 * 86400:
        return 3600
    if span <= 60 * 86400:
        return 86400
    return 7 * 86400


def _recoveries(
    breaker_records: Iterable[FailureRecord],
) -> dict[str, tuple[FailureRecord, int, int, list[float]]]:
    """Per breaker: a sample record, opens, closes, recovery times (open → closed, seconds)."""
    out: dict[str, tuple[FailureRecord, int, int, list[float]]] = {}
    open_since: dict[str, float] = {}
    for record in sorted(breaker_records, key=lambda r: (r.time, r.id)):
        name = str(record.detail.get("breaker") or record.upstream)
        sample, opened, closed, recoveries = out.get(name, (record, 0, 0, []))
        if record.outcome == "open":
            opened += 1
            open_since.setdefault(name, record.time)
        elif record.outcome == "closed":
            closed += 1
            seconds = record.detail.get("recovery_seconds")
            started = open_since.pop(name, None)
            if isinstance(seconds, int | float):
                recoveries.append(float(seconds))
            elif started is not None:
                recoveries.append(record.time - started)
        out[name] = (sample, opened, closed, recoveries)
    return out


def build_report(
    records: Sequence[FailureRecord],
    breaker_records: Sequence[FailureRecord],
    counts: Sequence[RequestCount],
    since: float,
    until: float,
    route: str | None = None,
    top: int = 3,
) -> FailureReport:
    """The report from records already fetched (pure: the unit tests seed it directly)."""
    requests_by_route: dict[str, int] = defaultdict(int)
    for c in counts:
        if route is None or c.route == route:
            requests_by_route[c.route] += c.count
    groups: dict[tuple[str, str], list[FailureRecord]] = defaultdict(list)
    for record in records:
        if route is not None and record.route != route:
            continue
        if record.kind is RecordKind.BREAKER:
            continue
        groups[(record.route, record.mode or NO_MODE)].append(record)

    upstreams_of_routes: dict[str, set[str]] = defaultdict(set)
    for (route_name, _), group in groups.items():
        upstreams_of_routes[route_name].update(r.upstream for r in group if r.upstream)
    recoveries = _recoveries(breaker_records)
    breakers: list[BreakerRow] = []
    for name, (sample, opened, closed, times) in sorted(recoveries.items()):
        if route is not None and not (
            sample.route == route or sample.upstream in upstreams_of_routes.get(route, set())
        ):
            continue
        breakers.append(
            BreakerRow(
                breaker=name,
                upstream=sample.upstream,
                route=sample.route,
                opened=opened,
                closed=closed,
                mean_recovery_s=sum(times) / len(times) if times else None,
                max_recovery_s=max(times) if times else None,
            )
        )

    rows: list[ModeRow] = []
    for (route_name, mode), group in groups.items():
        upstreams = sorted({r.upstream for r in group if r.upstream})
        latencies = [r.latency_ms for r in group if r.latency_ms is not None]
        recovery_times = [
            t
            for _, (sample, _, _, times) in recoveries.items()
            if sample.upstream in upstreams and sample.route in ("", route_name)
            for t in times
        ]
        total = requests_by_route.get(route_name)
        causes = Counter(r.cause or "(unknown)" for r in group)
        rows.append(
            ModeRow(
                route=route_name,
                mode=mode,
                count=len(group),
                rate=len(group) / total if total else None,
                p50_ms=percentile(latencies, 0.5),
                p95_ms=percentile(latencies, 0.95),
                mean_recovery_s=(
                    sum(recovery_times) / len(recovery_times) if recovery_times else None
                ),
                top_causes=causes.most_common(top),
                outcomes=dict(Counter(r.outcome for r in group)),
                upstreams=upstreams,
            )
        )
    rows.sort(key=lambda r: (-r.count, r.route, r.mode))

    bucket = _bucket_seconds(since, until)
    series: dict[int, dict[str, int]] = {}
    start = int(since // bucket) * bucket
    for b in range(start, int(until) + 1, bucket):
        series[b] = {}
    for group in groups.values():
        for record in group:
            b = int(record.time // bucket) * bucket
            modes = series.setdefault(b, {})
            key = record.mode or NO_MODE
            modes[key] = modes.get(key, 0) + 1
    in_scope = [r for group in groups.values() for r in group]
    return FailureReport(
        since=since,
        until=until,
        route=route,
        requests=sum(requests_by_route.values()),
        requests_by_route=dict(requests_by_route),
        failed=sum(1 for r in in_scope if r.kind is RecordKind.REQUEST),
        user_reported=sum(1 for r in in_scope if r.kind is RecordKind.FEEDBACK),
        rows=rows,
        breakers=breakers,
        bucket_seconds=bucket,
        series=sorted(series.items()),
    )


def report_json(report: FailureReport) -> dict[str, Any]:
    data = asdict(report)
    data["since"] = format_time(report.since)
    data["until"] = format_time(report.until)
    data["failed_rate"] = report.failed / report.requests if report.requests else None
    for row in data["rows"]:
        row["top_causes"] = [{"cause": c, "count": n} for c, n in row["top_causes"]]
    data["series"] = [{"start": format_time(b), "modes": modes} for b, modes in report.series]
    return data


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.1f}s"
    if value < 7200:
        return f"{value / 60:.1f}m"
    return f"{value / 3600:.1f}h"


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    last = len(header) - 1

    def line(cells: Sequence[str]) -> str:
        parts = []
        for i, cell in enumerate(cells):
            if i == last and i not in right:
                parts.append(cell)
            elif i in right:
                parts.append(cell.rjust(widths[i]))
            else:
                parts.append(cell.ljust(widths[i]))
        return "  ".join(parts).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _short(cause: str) -> str:
    return cause if len(cause) <= _MAX_CAUSE_SHOWN else cause[: _MAX_CAUSE_SHOWN - 1] + "…"


def render_text(report: FailureReport) -> str:
    scope = f"route {report.route}" if report.route else "all routes"
    lines = [f"Failures {format_time(report.since)} → {format_time(report.until)}, {scope}"]
    rate = f" ({report.failed / report.requests:.2%})" if report.requests else ""
    lines.append(
        f"requests {report.requests:,} · failed, fallback, shed, escalated or rejected "
        f"{report.failed:,}{rate} · user reports {report.user_reported:,}"
    )
    lines.append("")
    if report.rows:
        rows = [
            [
                r.route,
                r.mode,
                f"{r.count:,}",
                "-" if r.rate is None else f"{r.rate:.2%}",
                _ms(r.p50_ms),
                _ms(r.p95_ms),
                _seconds(r.mean_recovery_s),
                "; ".join(f"{_short(c)} ({n})" for c, n in r.top_causes),
            ]
            for r in report.rows
        ]
        header = ["ROUTE", "MODE", "COUNT", "RATE", "P50 MS", "P95 MS", "RECOVERY", "TOP CAUSES"]
        lines.extend(text_table(header, rows, right={2, 3, 4, 5, 6}))
    else:
        lines.append("no failures recorded in this range")
    if report.breakers:
        lines.append("")
        rows = [
            [
                b.breaker,
                str(b.opened),
                str(b.closed),
                _seconds(b.mean_recovery_s),
                _seconds(b.max_recovery_s),
            ]
            for b in report.breakers
        ]
        header = ["BREAKER", "OPENED", "CLOSED", "MEAN RECOVERY", "MAX RECOVERY"]
        lines.extend(text_table(header, rows, right={1, 2, 3, 4}))
    lines.append("")
    lines.append("RATE: share of all requests on the route (per-minute request counters).")
    lines.append(
        "RECOVERY: mean time from a circuit of the route's upstream opening to it closing again."
    )
    return "\n".join(lines) + "\n"


def write_png(report: FailureReport, path: Path) -> None:
    """Failures over time by mode (stacked bars) and the busiest route × mode rows."""
    import datetime

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8))
    modes = sorted({m for _, counts in report.series for m in counts})
    starts = [datetime.datetime.fromtimestamp(b, datetime.UTC) for b, _ in report.series]
    width = report.bucket_seconds / 86400 * 0.9
    base = [0] * len(starts)
    for mode in modes:
        values = [counts.get(mode, 0) for _, counts in report.series]
        top.bar(starts, values, width=width, bottom=base, label=mode, align="edge")
        base = [b + v for b, v in zip(base, values, strict=True)]
    unit = {3600: "hour", 86400: "day"}.get(report.bucket_seconds, "week")
    top.set_title(f"Failures per {unit}, {format_time(report.since)} → {format_time(report.until)}")
    top.set_ylabel("records")
    if modes:
        top.legend(fontsize=8, ncols=min(4, len(modes)))
    top.tick_params(axis="x", labelrotation=30)

    shown = report.rows[:15][::-1]
    labels = [f"{r.route} · {r.mode}" for r in shown]
    bottom.barh(labels, [r.count for r in shown], color="tab:red")
    for y, r in enumerate(shown):
        rate = "" if r.rate is None else f"  {r.rate:.2%}"
        bottom.text(r.count, y, f" {r.count}{rate}", va="center", fontsize=8)
    bottom.set_title("Failures by route and mode")
    bottom.set_xlabel("records")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
