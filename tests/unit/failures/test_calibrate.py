"""Calibration on a synthetic labelled set whose optimum is known analytically.

Scores of right answers ~ Beta(8, 2), of wrong answers ~ Beta(2, 8), half and half. Both densities
share the normaliser B(8, 2) = B(2, 8), so the posterior odds of "wrong" at score s are
((1 − s)/s)^6. The cost-optimal rule passes an answer when wrong_auto·P(wrong|s) ≤ review and
rejects it when reject_good·P(right|s) ≤ review, so with costs 10 / 1 / 5:

    auto_above*   = 1 / (1 + 9^(−1/6)) ≈ 0.5905   (P(wrong|s) = 1/10)
    reject_below* = 1 / (1 + 4^(1/6))  ≈ 0.4425   (P(wrong|s) = 4/5)

With 20 000 examples the proposed thresholds land within 0.05 of these (over 20 seeds the worst
miss was 0.024), and their true expected cost is within 2% of the optimum's.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from sidecar.cli import build_parser
from sidecar.failures.calibrate import Calibration, Costs, Example
from sidecar.failures.cli import run_calibrate

N = 20_000
TOLERANCE = 0.05
COSTS = Costs(wrong_auto=10, review=1, reject_good=5)
AUTO_STAR = 1 / (1 + 9 ** (-1 / 6))
REJECT_STAR = 1 / (1 + 4 ** (1 / 6))


def synthetic(n: int = N, seed: int = 7) -> list[Example]:
    rng = random.Random(seed)
    right = [Example(rng.betavariate(8, 2), wrong=False) for _ in range(n // 2)]
    wrong = [Example(rng.betavariate(2, 8), wrong=True) for _ in range(n // 2)]
    return right + wrong


def beta_cdf(x: float, a: int, b: int) -> float:
    """Regularised incomplete beta for integer a, b: P(Binomial(a+b−1, x) ≥ a)."""
    n = a + b - 1
    return sum(math.comb(n, k) * x**k * (1 - x) ** (n - k) for k in range(a, n + 1))


def true_cost(reject_below: float, auto_above: float) -> float:
    """Expected cost per answer under the true distributions."""
    right_below = beta_cdf(reject_below, 8, 2)
    right_review = beta_cdf(auto_above, 8, 2) - right_below
    wrong_review = beta_cdf(auto_above, 2, 8) - beta_cdf(reject_below, 2, 8)
    wrong_auto = 1 - beta_cdf(auto_above, 2, 8)
    return 0.5 * (COSTS.reject_good * right_below + COSTS.review * right_review) + 0.5 * (
        COSTS.review * wrong_review + COSTS.wrong_auto * wrong_auto
    )


def test_the_analytic_optimum_is_where_the_posterior_crosses_the_cost_ratios() -> None:
    def p_wrong(s: float) -> float:
        odds = ((1 - s) / s) ** 6
        return odds / (1 + odds)

    assert p_wrong(AUTO_STAR) == pytest.approx(COSTS.review / COSTS.wrong_auto)
    assert 1 - p_wrong(REJECT_STAR) == pytest.approx(COSTS.review / COSTS.reject_good)
    best = true_cost(REJECT_STAR, AUTO_STAR)
    for dr in (-0.02, 0.02):
        for da in (-0.02, 0.02):
            assert true_cost(REJECT_STAR + dr, AUTO_STAR + da) > best


def test_minimum_cost_thresholds_land_near_the_analytic_optimum() -> None:
    calibration = Calibration(synthetic())
    proposed = calibration.minimise_cost(COSTS)
    assert proposed.auto_above == pytest.approx(AUTO_STAR, abs=TOLERANCE)
    assert proposed.reject_below == pytest.approx(REJECT_STAR, abs=TOLERANCE)
    regret = true_cost(proposed.reject_below, proposed.auto_above) / true_cost(
        REJECT_STAR, AUTO_STAR
    )
    assert regret < 1.02
    # The empirical cost it reports is the cost of those thresholds on the examples.
    again = calibration.evaluate(proposed.reject_below, proposed.auto_above, COSTS)
    assert again.cost_per_answer == pytest.approx(proposed.cost_per_answer)
    # And no other pair on the examples is cheaper (spot-check a grid).
    for r in (0.3, 0.4, 0.45, 0.5):
        for a in (0.55, 0.6, 0.7, 0.8):
            other = calibration.evaluate(r, a, COSTS)
            assert other.cost_per_answer is not None and proposed.cost_per_answer is not None
            assert other.cost_per_answer >= proposed.cost_per_answer - 1e-12


def test_at_a_fixed_review_rate_it_catches_more_errors_than_random_review() -> None:
    calibration = Calibration(synthetic())
    for rate in (0.05, 0.1, 0.2):
        e = calibration.at_review_rate(rate)
        assert e.review_share <= rate + 1e-9
        assert e.review_share == pytest.approx(rate, abs=0.001)
        assert e.reject_below == 0.0 and e.reject_share == 0.0
        assert e.random_caught == pytest.approx(e.review_share * e.wrong_total)
        # Reviewing the least confident 10% catches ~20% of all wrong answers (nearly every
        # reviewed one is wrong); random review catches 10%.
        assert e.caught_by_review > 1.8 * e.random_caught
    # With costs, a reject band appears below the review window and the window still beats
    # random review.
    joint = calibration.at_review_rate(0.1, COSTS)
    assert joint.review_share <= 0.1 + 1e-9
    assert joint.reject_below > 0
    assert joint.caught_by_review + joint.stopped_by_reject > 5 * joint.random_caught


def test_weights_stand_for_unsampled_answers() -> None:
    # One audit sample with weight 100 counts like 100 identical examples.
    heavy = Calibration([Example(0.95, True, weight=100), Example(0.5, False)])
    many = Calibration([Example(0.95, True)] * 100 + [Example(0.5, False)])
    assert heavy.minimise_cost(COSTS) == many.minimise_cost(COSTS)


def test_degenerate_sets() -> None:
    with pytest.raises(ValueError):
        Calibration([])
    all_right = Calibration([Example(s / 10, False) for s in range(1, 10)])
    proposed = all_right.minimise_cost(COSTS)
    assert proposed.review_share == 0 and proposed.reject_share == 0
    all_wrong = Calibration([Example(s / 10, True) for s in range(1, 10)])
    proposed = all_wrong.minimise_cost(COSTS)
    assert proposed.auto_share == 0 and proposed.wrong_auto == 0


def test_cli_from_labelled_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "labelled.jsonl"
    with path.open("w") as out:
        for e in synthetic(4000, seed=3):
            label = "wrong" if e.wrong else "correct"
            out.write(json.dumps({"confidence": e.score, "label": label, "route": "r"}) + "\n")
    png = tmp_path / "calibrate.png"

    def run(*argv: str) -> int:
        return run_calibrate(build_parser().parse_args(["calibrate", "--input", str(path), *argv]))

    assert run("--json", "--png", str(png)) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "cost" and data["examples"]["count"] == 4000
    assert data["proposed"]["auto_above"] == pytest.approx(AUTO_STAR, abs=0.1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert run("--target-review-rate", "0.1") == 0
    text = capsys.readouterr().out
    assert "auto_above:" in text and "random review of 10.0% catches 10.0%" in text
    assert run("--target-review-rate", "2") == 2
    assert run("--route", "other") == 1
