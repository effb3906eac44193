"""Measure the confidence gate on the held-out set and write the table into README.md.

  python results.py                          # through the sidecar on :8700 (MLServer behind it)
  python results.py --mlserver URL           # straight to MLServer, the policy's thresholds here
  python results.py --limit 200 --no-write   # a quick look, README untouched

Every held-out transaction is scored once. Through the sidecar, an answer counts as sent to
review when the caller got `x-sidecar-outcome: escalated` (the audit sample of confident answers
is not counted: it is a check on the gate, not the gate); straight against MLServer, when its top
`predict_proba` is below the policy's `auto_above` (the review and reject bands both escalate in
policy.yaml). Then, for the gate and for reviewing the same number of answers picked at random:
the accuracy of the answers that pass without review, and how many of the model's errors a
reviewer gets to see. Random review's numbers are expected values (any one draw varies).

Through the sidecar each transaction carries `x-request-id: holdout-<n>`, so running this again
does not queue the same review twice. Needs PyYAML (run it with the sidecar's virtualenv).
"""

from __future__ import annotations

import argparse
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml
from v2 import post, read_holdout  # beside this script

HERE = Path(__file__).resolve().parent
BEGIN = "<!-- results:begin (written by results.py) -->"
END = "<!-- results:end -->"


@dataclass
class Scored:
    label: int
    predicted: int
    top: float
    escalated: bool

    @property
    def error(self) -> bool:
        return self.predicted != self.label


def thresholds(policy: Path, route: str) -> tuple[float, float]:
    doc = yaml.safe_load(policy.read_text())
    for item in doc["routes"]:
        if item["name"] == route:
            gate = item["confidence"]
            return float(gate["auto_above"]), float(gate["reject_below"])
    raise SystemExit(f"{policy}: no route named {route!r}")


def score(
    base_url: str, via_sidecar: bool, auto_above: float, n: int, row: tuple[list[float], int]
) -> Scored:
    features, label = row
    answer = post(base_url, features, request_id=f"holdout-{n}" if via_sidecar else None)
    proba = answer.proba
    if answer.status != 200 or proba is None:
        raise SystemExit(
            f"transaction {n}: HTTP {answer.status}, outcome {answer.outcome} "
            f"{answer.headers.get('x-sidecar-failure-mode', '')}: is the model up? {answer.body}"
        )
    predicted = max(range(len(proba)), key=proba.__getitem__)
    top = proba[predicted]
    escalated = answer.outcome == "escalated" if via_sidecar else top < auto_above
    return Scored(label, predicted, top, escalated)


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def table(scored: list[Scored], source: str, auto_above: float, reject_below: float) -> str:
    n = len(scored)
    frauds = sum(s.label for s in scored)
    errors = sum(s.error for s in scored)
    reviewed = [s for s in scored if s.escalated]
    passed = [s for s in scored if not s.escalated]
    caught = sum(s.error for s in reviewed)
    rate = len(reviewed) / n
    passed_ok = sum(not s.error for s in passed)
    missed_fraud = sum(s.label == 1 and s.predicted == 0 for s in passed)
    all_missed_fraud = sum(s.label == 1 and s.predicted == 0 for s in scored)
    accuracy = (n - errors) / n
    lines = [
        f"{n:,} held-out transactions ({frauds} fraud, {pct(frauds, n)}), scored {source}; "
        f"gate: `auto_above: {auto_above}`, `reject_below: {reject_below}` (both bands "
        f"escalate). The model alone is right on {pct(n - errors, n)} of them "
        f"({errors} errors).",
        "",
        "| | confidence gate | random review, same rate (expected) |",
        "|---|---:|---:|",
        f"| answers sent to review | {len(reviewed):,} ({pct(len(reviewed), n)}) "
        f"| {len(reviewed):,} ({pct(len(reviewed), n)}) |",
        f"| accuracy of auto-approved answers | {pct(passed_ok, len(passed))} "
        f"| {100 * accuracy:.1f}% |",
        f"| model errors caught by review | {caught} of {errors} ({pct(caught, errors)}) "
        f"| {rate * errors:.1f} of {errors} ({pct(rate * errors, errors)}) |",
        f"| model errors auto-approved unseen | {errors - caught} | {(1 - rate) * errors:.1f} |",
        f"| missed frauds auto-approved unseen | {missed_fraud} of {all_missed_fraud} "
        f"| {(1 - rate) * all_missed_fraud:.1f} of {all_missed_fraud} |",
    ]
    return "\n".join(lines)


def write_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(content):
        raise SystemExit(f"{readme}: no results markers ({BEGIN} ... {END})")
    readme.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", content))


def main() -> None:
    parser = argparse.ArgumentParser(description="Measure the confidence gate on held-out data.")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--sidecar", default="http://127.0.0.1:8700", help="the sidecar's proxy")
    target.add_argument("--mlserver", help="score straight against MLServer instead")
    parser.add_argument("--policy", type=Path, default=HERE / "policy.yaml")
    parser.add_argument("--route", default="fraud")
    parser.add_argument("--holdout", type=Path, default=HERE / "data" / "holdout.csv")
    parser.add_argument("--limit", type=int, help="score only the first N transactions")
    parser.add_argument("--workers", type=int, default=4, help="requests in flight")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()

    auto_above, reject_below = thresholds(args.policy, args.route)
    rows = read_holdout(args.holdout)[: args.limit]
    via_sidecar = args.mlserver is None
    base_url = args.sidecar if via_sidecar else args.mlserver
    with ThreadPoolExecutor(args.workers) as pool:
        scored = list(
            pool.map(
                lambda item: score(base_url, via_sidecar, auto_above, *item),
                enumerate(rows),
            )
        )
    source = "through the sidecar" if via_sidecar else "straight against MLServer"
    text = table(scored, source, auto_above, reject_below)
    print(text)
    if not args.no_write:
        write_readme(args.readme, text)
        print(f"\nwritten to {args.readme}", file=sys.stderr)


if __name__ == "__main__":
    main()
