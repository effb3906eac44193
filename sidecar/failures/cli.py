"""`sidecar failures report|export`, `sidecar reviews export` and `sidecar calibrate`.

These read the stores under `SIDECAR_STATE_DIR` (default `./.sidecar`, or `--state-dir`)
directly: the failure store read-only, the review store through its protocol. Nothing is
logged to stdout, so JSON and JSONL output can be piped. Exit status: 0 done, 1 nothing to
read (no store, no labelled examples), 2 bad arguments or policy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO, TypeVar

from sidecar.failures.calibrate import Example

__all__ = [
    "add_calibrate_parser",
    "add_failures_parser",
    "add_reviews_export_parser",
    "run_calibrate",
    "run_failures",
    "run_reviews_export",
]

T = TypeVar("T")


class _Usage(Exception):
    """Bad arguments: printed, exit 2."""


class _Missing(Exception):
    """Nothing to read: printed, exit 1."""


# -- parsers ---------------------------------------------------------------------------------


def _state_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", help="where the stores are (env SIDECAR_STATE_DIR, ./.sidecar)")


def _range_args(p: argparse.ArgumentParser, since: str | None) -> None:
    p.add_argument(
        "--since",
        default=since,
        help="start: a time ago (30m, 36h, 7d, 2w) or an ISO-8601 time"
        + (f" (default {since})" if since else " (default: everything)"),
    )
    p.add_argument("--until", help="end, same forms (default: now)")
    p.add_argument("--route", help="only this route")


def add_failures_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("failures", help="report on and export captured failure records")
    fs = p.add_subparsers(dest="failures_command", required=True)
    report = fs.add_parser(
        "report", help="table by route and failure mode: counts, rates, latency, recovery"
    )
    _state_dir_arg(report)
    _range_args(report, "7d")
    report.add_argument("--json", action="store_true", help="print the numbers as JSON")
    report.add_argument("--png", help="also write a chart to this PNG file (needs matplotlib)")
    report.add_argument("--top", type=int, default=3, help="top causes per row (default 3)")
    export = fs.add_parser("export", help="write the records as JSON lines")
    _state_dir_arg(export)
    _range_args(export, "7d")
    export.add_argument("--mode", action="append", help="only this failure mode (repeatable)")
    export.add_argument(
        "--kind",
        action="append",
        choices=["request", "breaker", "feedback"],
        help="only this kind of record (repeatable)",
    )
    export.add_argument("--output", "-o", help="file to write (default: stdout)")


def add_reviews_export_parser(rs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`sidecar reviews export`, added to the `reviews` group."""
    p = rs.add_parser(
        "export",
        help="write resolved reviews as labelled JSON lines (reads the store directly)",
    )
    _state_dir_arg(p)
    _range_args(p, None)
    p.add_argument("--all", action="store_true", help="include unresolved items (no label)")
    p.add_argument("--policy", help="policy whose failures.redact rules apply (env SIDECAR_POLICY)")
    p.add_argument(
        "--no-redact", action="store_true", help="keep bodies as stored (they may hold PII)"
    )
    p.add_argument("--output", "-o", help="file to write (default: stdout)")


def add_calibrate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "calibrate",
        help="propose auto_above / reject_below from reviewers' decisions",
        description="Propose the confidence gate's thresholds from resolved reviews (and audit "
        "samples): either meet a target review rate or minimise the expected cost.",
    )
    _state_dir_arg(p)
    _range_args(p, None)
    p.add_argument("--input", help="labelled JSON lines (from `sidecar reviews export`) instead")
    p.add_argument(
        "--target-review-rate",
        type=float,
        help="review at most this share of answers (0..1); without costs: no reject band",
    )
    p.add_argument("--cost-wrong-auto", type=float, help="cost of a wrong answer passed (10)")
    p.add_argument("--cost-review", type=float, help="cost of one human review (1)")
    p.add_argument("--cost-reject-good", type=float, help="cost of rejecting a good answer (5)")
    p.add_argument(
        "--policy",
        help="policy file: shows the route's current thresholds and weights audit samples by "
        "1/audit_sample (env SIDECAR_POLICY)",
    )
    p.add_argument("--audit-sample", type=float, help="the audit_sample share (overrides policy)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--png", help="also write a chart to this PNG file (needs matplotlib)")


# -- shared helpers --------------------------------------------------------------------------


def _state_dir(args: argparse.Namespace) -> Path:
    from sidecar.review.settings import state_dir_from_env

    return Path(args.state_dir) if args.state_dir else state_dir_from_env()


def _range(args: argparse.Namespace) -> tuple[float | None, float]:
    from sidecar.failures.timerange import parse_when

    now = time.time()
    try:
        since = parse_when(args.since, now) if args.since else None
        until = parse_when(args.until, now) if args.until else now
    except ValueError as exc:
        raise _Usage(str(exc)) from None
    if since is not None and since >= until:
        raise _Usage("--since must be before --until")
    return since, until


def _policy(path: str | None) -> Any:
    path = path or os.environ.get("SIDECAR_POLICY")
    if not path:
        return None
    from sidecar.policy.loader import PolicyError, load_policy

    try:
        return load_policy(path).policy
    except PolicyError as exc:
        raise _Usage(str(exc)) from None


@contextmanager
def _output(path: str | None) -> Iterator[TextIO]:
    if not path or path == "-":
        yield sys.stdout
        return
    with open(path, "w", encoding="utf-8") as handle:
        yield handle


def _png_check(path: str | None) -> None:
    if path is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise _Usage(
            "--png needs matplotlib: pip install 'ai-resilience-sidecar[charts]'"
        ) from None


def _run(prog: str, work: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        return asyncio.run(work())
    except _Usage as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except (_Missing, FileNotFoundError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


async def _closing(store: Any, work: Awaitable[T]) -> T:
    try:
        return await work
    finally:
        await store.close()


# -- sidecar failures ------------------------------------------------------------------------


def run_failures(args: argparse.Namespace) -> int:
    return _run(f"sidecar failures {args.failures_command}", lambda: _failures(args))


async def _failures(args: argparse.Namespace) -> int:
    from sidecar.failures.report import failure_report, render_text, report_json, write_png
    from sidecar.failures.sqlite import DB_NAME, SqliteFailureStore
    from sidecar.failures.store import FailureStoreError, RecordKind

    since, until = _range(args)
    since = since if since is not None else 0.0
    store: Any
    shared_url = os.environ.get("SIDECAR_DATABASE_URL", "")
    if shared_url.startswith(("postgresql://", "postgres://")):
        # The same store the sidecars write when they share a PostgreSQL queue.
        from sidecar.failures.postgres import PostgresFailureStore

        store = PostgresFailureStore(
            shared_url, schema=os.environ.get("SIDECAR_DATABASE_SCHEMA") or None
        )
    else:
        path = _state_dir(args) / DB_NAME
        if not path.is_file():
            raise _Missing(f"no failure store at {path} (set --state-dir or SIDECAR_STATE_DIR)")
        store = SqliteFailureStore(path, read_only=True)
    try:
        if args.failures_command == "report":
            _png_check(args.png)
            report = await _closing(
                store, failure_report(store, since, until, args.route, args.top)
            )
            if args.json:
                print(json.dumps(report_json(report), indent=2))
            else:
                sys.stdout.write(render_text(report))
            if args.png:
                write_png(report, Path(args.png))
                print(f"chart written to {args.png}", file=sys.stderr)
            return 0
        from sidecar.failures.export import export_failures

        kinds = [RecordKind(k) for k in args.kind] if args.kind else None
        with _output(args.output) as out:
            count = await _closing(
                store,
                export_failures(store, out, since, until, args.route, args.mode, kinds),
            )
        print(f"{count} records exported", file=sys.stderr)
        return 0
    except FailureStoreError as exc:
        raise _Missing(str(exc)) from None


# -- sidecar reviews export ------------------------------------------------------------------


def run_reviews_export(args: argparse.Namespace) -> int:
    return _run("sidecar reviews export", lambda: _reviews_export(args))


def _review_store(args: argparse.Namespace, policy: Any) -> Any:
    """The review store to read: PostgreSQL or SQLite, as the sidecar would pick it."""
    from sidecar.failures.labels import open_review_store
    from sidecar.review.settings import ReviewSettingsError

    try:
        return open_review_store(Path(args.state_dir) if args.state_dir else None, policy)
    except ReviewSettingsError as exc:
        raise _Usage(str(exc)) from None


def _redactor(policy: Any) -> Any:
    from sidecar.failures.capture import capture_config
    from sidecar.failures.redact import Redactor

    section = getattr(policy, "failures", None) if policy is not None else None
    rules = capture_config(section).rules
    return Redactor(rules)


async def _reviews_export(args: argparse.Namespace) -> int:
    from sidecar.failures.export import export_reviews
    from sidecar.review.store import ReviewStoreError

    since, until = _range(args)
    policy = _policy(args.policy)
    redactor = None if args.no_redact else _redactor(policy)
    store = _review_store(args, policy)
    try:
        with _output(args.output) as out:
            count = await _closing(
                store,
                export_reviews(
                    store,
                    out,
                    redactor=redactor,
                    route=args.route,
                    since=since,
                    until=until,
                    resolved_only=not args.all,
                ),
            )
    except ReviewStoreError as exc:
        raise _Missing(str(exc)) from None
    print(f"{count} reviews exported", file=sys.stderr)
    return 0


# -- sidecar calibrate -----------------------------------------------------------------------


def run_calibrate(args: argparse.Namespace) -> int:
    return _run("sidecar calibrate", lambda: _calibrate(args))


def _route_confidence(policy: Any, route: str | None) -> Any:
    """The confidence section of `route` (or of the only gated route)."""
    if policy is None:
        return None
    gated = [r for r in policy.routes if r.confidence is not None]
    if route is not None:
        gated = [r for r in gated if r.name == route]
    if len(gated) == 1:
        return gated[0].confidence
    return None


def _examples_from_file(path: str, route: str | None, audit_sample: float | None) -> list[Example]:
    """Labelled JSON lines (`sidecar reviews export` output, or any file with `confidence` and
    `label` or `decision`, optionally `reason` and `weight`)."""
    from sidecar.failures.labels import labelled_example

    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise _Missing(f"cannot read {path}: {exc.strerror}") from None
    examples = []
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise _Usage(f"{path}:{number}: not JSON") from None
            if not isinstance(row, dict) or (route and row.get("route") != route):
                continue
            label = row.get("label")
            if label is None and row.get("decision"):
                label = "correct" if row["decision"] == "approve" else "wrong"
            example = labelled_example(
                row.get("confidence"), label, row.get("reason"), audit_sample
            )
            if example is None:
                continue
            weight = row.get("weight")
            if isinstance(weight, int | float) and not isinstance(weight, bool) and weight > 0:
                example = Example(example.score, example.wrong, float(weight))
            examples.append(example)
    return examples


async def _examples(
    args: argparse.Namespace,
    policy: Any,
    audit_sample: float | None,
    since: float | None,
    until: float,
) -> list[Example]:
    from sidecar.failures.labels import label_of, labelled_example, read_reviews
    from sidecar.review.store import ReviewStoreError

    if args.input:
        return _examples_from_file(args.input, args.route, audit_sample)
    store = _review_store(args, policy)
    try:
        items = await _closing(
            store, read_reviews(store, route=args.route, since=since, until=until)
        )
    except ReviewStoreError as exc:
        raise _Missing(str(exc)) from None
    examples = []
    for item in items:
        example = labelled_example(
            item.confidence, label_of(item.decision), item.reason, audit_sample
        )
        if example is not None:
            examples.append(example)
    return examples


async def _calibrate(args: argparse.Namespace) -> int:
    from sidecar.failures.calibrate import Calibration, Costs, write_png

    since, until = _range(args)
    rate = args.target_review_rate
    if rate is not None and not 0 <= rate <= 1:
        raise _Usage("--target-review-rate must be between 0 and 1")
    given = [args.cost_wrong_auto, args.cost_review, args.cost_reject_good]
    if any(c is not None and c < 0 for c in given):
        raise _Usage("costs must not be negative")
    default = Costs()
    costs = Costs(
        wrong_auto=default.wrong_auto if args.cost_wrong_auto is None else args.cost_wrong_auto,
        review=default.review if args.cost_review is None else args.cost_review,
        reject_good=default.reject_good if args.cost_reject_good is None else args.cost_reject_good,
    )
    costs_given = any(c is not None for c in given)
    _png_check(args.png)
    policy = _policy(args.policy)
    confidence = _route_confidence(policy, args.route)
    audit_sample = args.audit_sample
    if audit_sample is None and confidence is not None and confidence.audit_sample > 0:
        audit_sample = confidence.audit_sample
    examples = await _examples(args, policy, audit_sample, since, until)
    if not examples:
        raise _Missing(
            "no resolved reviews with a confidence score to learn from"
            + (f" on route {args.route}" if args.route else "")
        )
    calibration = Calibration(examples)
    if rate is not None:
        used = costs if costs_given else None
        proposed = calibration.at_review_rate(rate, used)
        how = f"target review rate {rate:.1%}" + (
            f", costs wrong-auto {costs.wrong_auto:g} / rejected-good {costs.reject_good:g}"
            if used
            else ", no reject band"
        )
        sweep = calibration.sweep(costs=used)
    else:
        used = costs
        proposed = calibration.minimise_cost(costs)
        how = (
            f"minimum expected cost: wrong answer passed {costs.wrong_auto:g}, review "
            f"{costs.review:g}, good answer rejected {costs.reject_good:g}"
        )
        sweep = calibration.sweep(costs=costs)
    current = None
    if confidence is not None:
        current = calibration.evaluate(confidence.reject_below, confidence.auto_above, used)
    warnings = []
    wrong = calibration.wrong_count
    right = calibration.count - wrong
    if wrong < 30 or right < 30:
        warnings.append(
            f"only {right} approved and {wrong} rejected/overridden examples: the thresholds are "
            "rough; collect more reviews (or raise audit_sample)"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "method": "review_rate" if rate is not None else "cost",
                    "costs": vars(costs) if used is not None else None,
                    "examples": {
                        "count": calibration.count,
                        "wrong": wrong,
                        "weighted_total": calibration.total,
                        "weighted_wrong": calibration.wrong_total,
                        "audit_sample": audit_sample,
                        "min_confidence": calibration.scores[0],
                        "max_confidence": calibration.scores[-1],
                    },
                    "proposed": proposed.as_dict(),
                    "current": current.as_dict() if current is not None else None,
                    "sweep": [e.as_dict() for e in sweep],
                    "warnings": warnings,
                },
                indent=2,
            )
        )
    else:
        sys.stdout.write(_calibration_text(calibration, how, proposed, current, sweep, warnings))
    if args.png:
        write_png(Path(args.png), calibration, examples, proposed, current)
        print(f"chart written to {args.png}", file=sys.stderr)
    return 0


def _calibration_text(
    calibration: Any,
    how: str,
    proposed: Any,
    current: Any,
    sweep: list[Any],
    warnings: list[str],
) -> str:
    from sidecar.failures.report import text_table

    wrong = calibration.wrong_count
    p = proposed
    lines = [
        f"Labelled examples: {calibration.count:,} ({wrong:,} wrong, "
        f"{calibration.wrong_total / calibration.total:.1%} weighted), confidence "
        f"{calibration.scores[0]:.3f}–{calibration.scores[-1]:.3f}",
        f"Proposed ({how}):",
        f"  auto_above: {p.auto_above:.3f}",
        f"  reject_below: {p.reject_below:.3f}",
        f"  review {p.review_share:.1%} of answers: catches {p.caught_share:.1%} of the wrong "
        f"answers; random review of {p.review_share:.1%} catches {p.random_share:.1%}",
        f"  reject {p.reject_share:.1%} of answers: stops {p.stopped_share - p.caught_share:.1%} "
        f"of the wrong answers and {p.good_rejected:,.0f} good ones",
        f"  pass the rest: {p.wrong_auto:,.0f} wrong answers go out automatically",
        "",
    ]

    def row(label: str, e: Any) -> list[str]:
        return [
            label,
            f"{e.reject_below:.3f}",
            f"{e.auto_above:.3f}",
            f"{e.review_share:.1%}",
            f"{e.caught_share:.1%}",
            f"{e.random_share:.1%}",
            f"{e.reject_share:.1%}",
            f"{e.stopped_share:.1%}",
            f"{e.good_rejected:,.0f}",
            f"{e.wrong_auto:,.0f}",
            "-" if e.cost_per_answer is None else f"{e.cost_per_answer:.3f}",
        ]

    rows = [row(f"rate ≤ {r:.0%}", e) for r, e in zip(_rates(), sweep, strict=False)]
    if current is not None:
        rows.append(row("current policy", current))
    rows.append(row("proposed", proposed))
    header = [
        "",
        "REJECT_BELOW",
        "AUTO_ABOVE",
        "REVIEWED",
        "CAUGHT BY REVIEW",
        "RANDOM REVIEW",
        "REJECTED",
        "WRONG STOPPED",
        "GOOD REJECTED",
        "WRONG PASSED",
        "COST/ANSWER",
    ]
    lines.extend(text_table(header, rows, right=set(range(1, 11))))
    lines += [
        "",
        "CAUGHT BY REVIEW: share of the wrong answers in the review band; RANDOM REVIEW: share",
        "caught by reviewing as many answers at random; WRONG STOPPED: reviewed or rejected.",
        "Examples come from reviewed answers only (review band, escalated rejects, audit",
        "samples): thresholds outside the scores seen are guesses.",
    ]
    for warning in warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines) + "\n"


def _rates() -> tuple[float, ...]:
    from sidecar.failures.calibrate import SWEEP_RATES

    return SWEEP_RATES
