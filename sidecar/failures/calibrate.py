"""Threshold calibration for the confidence gate, from labelled examples (reviewers' decisions).

Stdlib only (the PNG is optional, with matplotlib). An example is a confidence score and whether
the model's answer was wrong (a reviewer rejected or overrode it) or right (approved), with a
weight (an audit sample stands for `1/audit_sample` auto-band answers). The gate's rule is:
reject below `reject_below`, pass automatically at or above `auto_above`, review in between.

Two ways to choose the thresholds:
- **Expected cost** (`minimise_cost`): each wrong answer passed automatically costs
  `wrong_auto`, each review `review`, each good answer rejected `reject_good`; the pair with the
  least total cost on the examples wins. Exact over every cut between distinct scores, O(n).
- **Target review rate** (`at_review_rate`): at most that share of answers is reviewed. Without
  costs there is no reject band and the least confident answers are reviewed (the usual triage);
  with costs, the review window and a reject band below it minimise the cost of what is not
  reviewed.

Every choice is compared with random review at the same rate, which catches that share of the
wrong answers on average.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Calibration",
    "Costs",
    "Evaluation",
    "Example",
    "write_png",
]

#: Review rates shown in the trade-off table.
SWEEP_RATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


@dataclass(frozen=True)
class Example:
    score: float
    wrong: bool
    weight: float = 1.0


@dataclass(frozen=True)
class Costs:
    wrong_auto: float = 10.0
    review: float = 1.0
    reject_good: float = 5.0


@dataclass(frozen=True)
class Evaluation:
    """What a pair of thresholds does to the examples (weights summed; shares of the total)."""

    reject_below: float
    auto_above: float
    total: float
    wrong_total: float
    review_share: float
    reject_share: float
    auto_share: float
    #: Wrong answers in the review band (caught by a reviewer).
    caught_by_review: float
    #: Wrong answers in the reject band (never sent).
    stopped_by_reject: float
    #: Wrong answers passed automatically.
    wrong_auto: float
    #: Good answers rejected.
    good_rejected: float
    #: Wrong answers random review of the same share of answers catches, on average.
    random_caught: float
    #: Expected cost per answer under the given costs (None when no costs were given).
    cost_per_answer: float | None = None

    @property
    def caught_share(self) -> float:
        """Share of all wrong answers caught by review."""
        return self.caught_by_review / self.wrong_total if self.wrong_total else 0.0

    @property
    def stopped_share(self) -> float:
        """Share of all wrong answers that do not go out automatically (reviewed or rejected)."""
        stopped = self.caught_by_review + self.stopped_by_reject
        return stopped / self.wrong_total if self.wrong_total else 0.0

    @property
    def random_share(self) -> float:
        return self.random_caught / self.wrong_total if self.wrong_total else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["caught_share"] = self.caught_share
        data["stopped_share"] = self.stopped_share
        data["random_share"] = self.random_share
        return data


class Calibration:
    """Sorted examples with prefix sums; every evaluation is O(1) or O(log n)."""

    def __init__(self, examples: Iterable[Example]) -> None:
        items = sorted((e for e in examples if e.weight > 0), key=lambda e: e.score)
        if not items:
            raise ValueError("no labelled examples with a confidence score")
        self.scores = [e.score for e in items]
        self.count = len(items)
        self.wrong_count = sum(1 for e in items if e.wrong)
        weights = [0.0]
        wrongs = [0.0]
        for e in items:
            weights.append(weights[-1] + e.weight)
            wrongs.append(wrongs[-1] + (e.weight if e.wrong else 0.0))
        self._w = weights
        self._wr = wrongs
        n = len(items)
        #: Positions where a threshold can fall: before the first, between distinct scores, after
        #: the last. A cut at p puts examples [0, p) below the threshold.
        self.cuts = [0] + [p for p in range(1, n) if self.scores[p - 1] < self.scores[p]] + [n]

    @property
    def total(self) -> float:
        return self._w[-1]

    @property
    def wrong_total(self) -> float:
        return self._wr[-1]

    def threshold(self, cut: int) -> float:
        """The threshold value of a cut: halfway between the scores either side of it."""
        if cut <= 0:
            return 0.0
        if cut >= self.count:
            return max(1.0, self.scores[-1] + 1e-9)
        return (self.scores[cut - 1] + self.scores[cut]) / 2

    def _cut_of(self, threshold: float) -> int:
        return bisect.bisect_left(self.scores, threshold)

    # -- evaluating ------------------------------------------------------------------------------
    def evaluate_cuts(self, i: int, j: int, costs: Costs | None = None) -> Evaluation:
        """Reject [0, i), review [i, j), pass [j, n)."""
        w, wr = self._w, self._wr
        total, wrong_total = w[-1], wr[-1]
        reviewed = w[j] - w[i]
        rejected = w[i]
        wrong_auto = wrong_total - wr[j]
        good_rejected = w[i] - wr[i]
        cost = None
        if costs is not None:
            cost = (
                costs.wrong_auto * wrong_auto
                + costs.review * reviewed
                + costs.reject_good * good_rejected
            ) / total
        return Evaluation(
            reject_below=self.threshold(i) if i > 0 else 0.0,
            auto_above=self.threshold(j),
            total=total,
            wrong_total=wrong_total,
            review_share=reviewed / total,
            reject_share=rejected / total,
            auto_share=(total - w[j]) / total,
            caught_by_review=wr[j] - wr[i],
            stopped_by_reject=wr[i],
            wrong_auto=wrong_auto,
            good_rejected=good_rejected,
            random_caught=reviewed / total * wrong_total,
            cost_per_answer=cost,
        )

    def evaluate(
        self, reject_below: float, auto_above: float, costs: Costs | None = None
    ) -> Evaluation:
        """The gate's own rule: reject `score < reject_below`, pass `score >= auto_above`."""
        i = self._cut_of(reject_below)
        j = max(i, self._cut_of(auto_above))
        evaluation = self.evaluate_cuts(i, j, costs)
        # Report the thresholds as given, not the cut points they fall on.
        return _with_thresholds(evaluation, reject_below, auto_above)

    # -- choosing --------------------------------------------------------------------------------
    def minimise_cost(self, costs: Costs) -> Evaluation:
        """The thresholds with the least expected cost on the examples.

        cost(i, j) = reject_good·good[0,i) + review·all[i,j) + wrong_auto·wrong[j,n)
                   = f(i) + g(j), with f(i) = reject_good·good[0,i) − review·all[0,i)
                                   and g(j) = review·all[0,j) + wrong_auto·wrong[j,n),
        minimised over cuts i ≤ j by keeping the best f seen so far.
        """
        w, wr = self._w, self._wr
        wrong_total = wr[-1]
        best: tuple[float, int, int] | None = None
        best_f: tuple[float, int] | None = None
        for j in self.cuts:
            f = costs.reject_good * (w[j] - wr[j]) - costs.review * w[j]
            if best_f is None or f < best_f[0]:
                best_f = (f, j)
            g = costs.review * w[j] + costs.wrong_auto * (wrong_total - wr[j])
            total = best_f[0] + g
            if best is None or total < best[0] - 1e-12:
                best = (total, best_f[1], j)
        assert best is not None
        return self.evaluate_cuts(best[1], best[2], costs)

    def at_review_rate(self, rate: float, costs: Costs | None = None) -> Evaluation:
        """At most `rate` of the answers reviewed. Without costs: no reject band, the least
        confident answers are reviewed. With costs: the reject band and review window that
        minimise the cost of wrong answers passed and good answers rejected."""
        if not 0 <= rate <= 1:
            raise ValueError("the review rate must be between 0 and 1")
        w, wr = self._w, self._wr
        budget = rate * w[-1] * (1 + 1e-12)
        cuts = self.cuts
        if costs is None:
            j = 0
            for cut in cuts:
                if w[cut] <= budget:
                    j = cut
            return self.evaluate_cuts(0, j)
        wrong_total = wr[-1]
        best: tuple[float, int, int] | None = None
        hi = 0
        for lo_index, i in enumerate(cuts):
            hi = max(hi, lo_index)
            while hi + 1 < len(cuts) and w[cuts[hi + 1]] - w[i] <= budget:
                hi += 1
            j = cuts[hi]
            cost = costs.reject_good * (w[i] - wr[i]) + costs.wrong_auto * (wrong_total - wr[j])
            if best is None or cost < best[0] - 1e-12:
                best = (cost, i, j)
        assert best is not None
        return self.evaluate_cuts(best[1], best[2], costs)

    def sweep(
        self, rates: Sequence[float] = SWEEP_RATES, costs: Costs | None = None
    ) -> list[Evaluation]:
        return [self.at_review_rate(rate, costs) for rate in rates]

    def curve(self, points: int = 101) -> list[tuple[float, float]]:
        """(review share, share of wrong answers caught) reviewing the least confident first."""
        out = []
        for k in range(points):
            e = self.at_review_rate(k / (points - 1))
            out.append((e.review_share, e.caught_share))
        return out


def _with_thresholds(e: Evaluation, reject_below: float, auto_above: float) -> Evaluation:
    data = asdict(e)
    data.update(reject_below=reject_below, auto_above=auto_above)
    return Evaluation(**data)


def write_png(
    path: Path,
    calibration: Calibration,
    examples: Sequence[Example],
    proposed: Evaluation,
    current: Evaluation | None = None,
) -> None:
    """Score histograms by label with the thresholds, and errors caught against review rate
    (thresholds vs random review). Needs matplotlib (the `charts` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    bins = [k / 40 for k in range(41)]
    good = [e for e in examples if not e.wrong]
    bad = [e for e in examples if e.wrong]
    left.hist(
        [e.score for e in good],
        bins=bins,
        weights=[e.weight for e in good],
        alpha=0.6,
        label="approved (right)",
        color="tab:green",
    )
    left.hist(
        [e.score for e in bad],
        bins=bins,
        weights=[e.weight for e in bad],
        alpha=0.6,
        label="rejected / overridden (wrong)",
        color="tab:red",
    )
    left.axvline(proposed.auto_above, color="black", label=f"auto_above {proposed.auto_above:.3f}")
    left.axvline(
        proposed.reject_below,
        color="black",
        linestyle=":",
        label=f"reject_below {proposed.reject_below:.3f}",
    )
    if current is not None:
        left.axvline(current.auto_above, color="gray", linestyle="--", label="current thresholds")
        left.axvline(current.reject_below, color="gray", linestyle="--")
    left.set_xlabel("confidence")
    left.set_ylabel("answers (weighted)")
    left.set_title("Confidence of reviewed answers")
    left.legend(fontsize=8)

    curve = calibration.curve()
    right.plot(
        [x * 100 for x, _ in curve],
        [y * 100 for _, y in curve],
        label="review the least confident",
    )
    right.plot([0, 100], [0, 100], linestyle="--", color="gray", label="random review")
    right.scatter(
        [proposed.review_share * 100],
        [proposed.caught_share * 100],
        color="black",
        zorder=3,
        label="proposed: caught by review",
    )
    if proposed.reject_share > 0:
        right.scatter(
            [proposed.review_share * 100],
            [proposed.stopped_share * 100],
            color="black",
            marker="^",
            zorder=3,
            label="proposed: reviewed or rejected",
        )
    right.set_xlabel("answers reviewed (%)")
    right.set_ylabel("wrong answers caught by review (%)")
    right.set_title("Errors caught vs review volume")
    right.set_xlim(0, 100)
    right.set_ylim(0, 100)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
