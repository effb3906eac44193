"""Send transactions through the sidecar and print what came back.

  python send.py                       # the sample transactions from data/samples.json
  python send.py --holdout 20          # 20 random held-out transactions
  python send.py --loop 1s             # the samples again every second, until Ctrl-C

For each: the amount, the true label, the decision the caller got (the model's `legit`/`fraud`,
or a fallback's `review`/`approve`), `x-sidecar-outcome`, the confidence the gate read, and the
review id (escalated) or the fallback and its cause (model down). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import urllib.error
from pathlib import Path

from v2 import LABELS, Answer, post, read_holdout  # beside this script

HERE = Path(__file__).resolve().parent


def _seconds(text: str) -> float:
    return float(text[:-2]) / 1000 if text.endswith("ms") else float(text.rstrip("s"))


def _row(kind: str, features: list[float], label: int | None, answer: Answer, ms: float) -> str:
    note = ""
    if "x-sidecar-review-id" in answer.headers:
        note = f"review {answer.headers['x-sidecar-review-id']}"
    elif "x-sidecar-fallback" in answer.headers:
        note = (
            f"fallback={answer.headers['x-sidecar-fallback']} "
            f"({answer.headers.get('x-sidecar-failure-mode', '?')})"
        )
    elif answer.status != 200:
        note = f"HTTP {answer.status} {answer.headers.get('x-sidecar-failure-mode', '')}"
    confidence = "-" if answer.confidence is None else f"{answer.confidence:.4f}"
    truth = "-" if label is None else LABELS[label]
    return (
        f"{kind:<13}{features[0]:>10.2f}  {truth:<6} {answer.decision:<8} {answer.outcome:<10}"
        f"{confidence:>10} {ms:>6.0f}ms  {note}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Send transactions through the sidecar.")
    parser.add_argument("--sidecar", default="http://127.0.0.1:8700", help="the sidecar's proxy")
    parser.add_argument("--samples", type=Path, default=HERE / "data" / "samples.json")
    parser.add_argument("--holdout", type=int, metavar="N", help="send N held-out transactions")
    parser.add_argument("--loop", type=_seconds, metavar="INTERVAL", help="repeat, e.g. 1s")
    args = parser.parse_args()

    if args.holdout:
        rows = read_holdout(args.samples.parent / "holdout.csv")
        picked = random.Random(0).sample(rows, min(args.holdout, len(rows)))
        batch = [("holdout", features, label) for features, label in picked]
    else:
        samples = json.loads(args.samples.read_text())
        batch = [(k, s["features"], s["label"]) for k, items in samples.items() for s in items]

    print(
        f"{'kind':<13}{'amount':>10}  {'truth':<6} {'decision':<8} {'outcome':<10}"
        f"{'confidence':>10} {'time':>8}  review / fallback"
    )
    try:
        while True:
            for kind, features, label in batch:
                started = time.monotonic()
                try:
                    answer = post(args.sidecar, features)
                except (urllib.error.URLError, ConnectionError) as exc:
                    raise SystemExit(f"cannot reach the sidecar at {args.sidecar}: {exc}") from None
                ms = (time.monotonic() - started) * 1000
                print(_row(kind, features, label, answer, ms), flush=True)
            if not args.loop:
                break
            time.sleep(args.loop)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
