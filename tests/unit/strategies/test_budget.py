"""RetryBudget: deposits earn `ratio` retries for `ttl`; `min_per_second` accrues with time."""

from __future__ import annotations

import random

import pytest

from sidecar.clock import FakeClock
from sidecar.strategies.budget import RetryBudget, RetryBudgetConfig


def ratio_only(clock: FakeClock, ratio: float = 0.2, ttl: float = 10.0) -> RetryBudget:
    return RetryBudget(RetryBudgetConfig(ratio=ratio, min_per_second=0.0, ttl=ttl), clock)


def drain(budget: RetryBudget, limit: int = 10_000) -> int:
    """Withdraw until refused; return how many were allowed."""
    allowed = 0
    while allowed < limit and budget.try_withdraw():
        allowed += 1
    return allowed


# -- ratio -------------------------------------------------------------------------------------


def test_empty_budget_without_min_per_second_refuses() -> None:
    budget = ratio_only(FakeClock())
    assert budget.available() == 0.0
    assert budget.try_withdraw() is False
    assert budget.refused == 1
    assert budget.withdrawn == 0


def test_deposits_earn_ratio_withdrawals() -> None:
    budget = ratio_only(FakeClock(), ratio=0.2)
    for _ in range(10):
        budget.deposit()
    assert budget.deposited == 10
    assert budget.available() == pytest.approx(2.0)
    assert drain(budget) == 2
    assert budget.withdrawn == 2
    assert budget.refused == 1
    assert budget.available() == pytest.approx(0.0)


def test_a_fraction_of_a_token_is_not_a_retry() -> None:
    budget = ratio_only(FakeClock(), ratio=0.2)
    for _ in range(4):
        budget.deposit()
    assert budget.available() == pytest.approx(0.8)
    assert budget.try_withdraw() is False
    budget.deposit()
    assert budget.try_withdraw() is True


def test_withdrawals_are_paid_back_only_by_new_deposits() -> None:
    budget = ratio_only(FakeClock(), ratio=0.5)
    for _ in range(2):
        budget.deposit()
    assert drain(budget) == 1
    budget.deposit()
    assert budget.try_withdraw() is False  # 3 x 0.5 - 1 = 0.5
    budget.deposit()
    assert budget.try_withdraw() is True  # 4 x 0.5 - 1 = 1


# -- min_per_second ----------------------------------------------------------------------------


def test_new_budget_starts_with_one_seconds_reserve() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetConfig(ratio=0.0, min_per_second=3.0), clock)
    assert budget.available() == pytest.approx(3.0)
    assert drain(budget) == 3
    assert budget.try_withdraw() is False


def test_min_per_second_accrues_with_fake_time() -> None:
    clock = FakeClock()
    # 8 a second and steps of 1/16 s keep the arithmetic exact in binary floating point.
    budget = RetryBudget(RetryBudgetConfig(ratio=0.0, min_per_second=8.0), clock)
    drain(budget)
    assert budget.try_withdraw() is False
    clock.advance(0.0625)
    assert budget.available() == pytest.approx(0.5)
    assert budget.try_withdraw() is False
    clock.advance(0.0625)
    assert budget.try_withdraw() is True
    assert budget.try_withdraw() is False
    clock.advance(0.375)
    assert drain(budget) == 3


def test_min_per_second_is_capped_at_one_seconds_worth() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetConfig(ratio=0.0, min_per_second=10.0), clock)
    drain(budget)
    clock.advance(60.0)
    assert budget.available() == pytest.approx(10.0)
    assert drain(budget) == 10


def test_slow_min_per_second_still_accrues_whole_tokens() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetConfig(ratio=0.0, min_per_second=0.5), clock)
    drain(budget)
    clock.advance(1.0)
    assert budget.try_withdraw() is False
    clock.advance(1.0)
    assert budget.try_withdraw() is True
    clock.advance(3600.0)
    assert budget.available() == pytest.approx(1.0)  # the cap is one token, not 0.5


def test_zero_min_per_second_never_accrues() -> None:
    clock = FakeClock()
    budget = ratio_only(clock)
    clock.advance(1000.0)
    assert budget.available() == 0.0
    assert budget.try_withdraw() is False


def test_ratio_is_spent_before_the_free_allowance() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetConfig(ratio=1.0, min_per_second=1.0), clock)
    budget.deposit()
    assert budget.available() == pytest.approx(2.0)
    assert budget.try_withdraw() is True
    # The deposit paid for that one; the free token is still there.
    assert budget.available() == pytest.approx(1.0)
    assert budget.try_withdraw() is True
    assert budget.try_withdraw() is False


# -- ttl ---------------------------------------------------------------------------------------


def test_deposits_expire_after_ttl() -> None:
    clock = FakeClock()
    budget = ratio_only(clock, ratio=1.0, ttl=10.0)
    for _ in range(5):
        budget.deposit()
    assert budget.available() == pytest.approx(5.0)
    clock.advance(8.5)  # still inside the window, whatever the slot alignment
    assert budget.available() == pytest.approx(5.0)
    clock.advance(1.6)  # ttl passed
    assert budget.available() == 0.0
    assert budget.try_withdraw() is False


def test_deposits_expire_one_by_one() -> None:
    clock = FakeClock()
    budget = ratio_only(clock, ratio=1.0, ttl=10.0)
    budget.deposit()
    clock.advance(5.0)
    budget.deposit()
    budget.deposit()
    clock.advance(5.5)  # the first has expired, the later two have not
    assert budget.available() == pytest.approx(2.0)
    clock.advance(5.0)
    assert budget.available() == 0.0


def test_withdrawals_expire_with_the_window() -> None:
    clock = FakeClock()
    budget = ratio_only(clock, ratio=1.0, ttl=10.0)
    for _ in range(3):
        budget.deposit()
    assert drain(budget) == 3
    clock.advance(11.0)
    for _ in range(3):
        budget.deposit()
    # Old withdrawals no longer count against fresh deposits.
    assert budget.available() == pytest.approx(3.0)
    assert drain(budget) == 3


def test_withdrawal_made_late_outlives_the_deposits_that_paid_for_it() -> None:
    clock = FakeClock()
    budget = ratio_only(clock, ratio=1.0, ttl=10.0)
    budget.deposit()
    clock.advance(9.5)
    assert budget.try_withdraw() is True
    clock.advance(1.0)  # the deposit expired; the withdrawal has not
    budget.deposit()
    assert budget.try_withdraw() is False


# -- the bound over a run ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "min_per_second", "ttl", "seed"),
    [(0.2, 10.0, 10.0, 1), (0.1, 1.0, 5.0, 2), (0.5, 0.0, 10.0, 3), (0.0, 5.0, 10.0, 4)],
)
def test_retries_stay_within_ratio_times_requests_plus_min_per_second(
    ratio: float, min_per_second: float, ttl: float, seed: int
) -> None:
    clock = FakeClock()
    config = RetryBudgetConfig(ratio=ratio, min_per_second=min_per_second, ttl=ttl)
    budget = RetryBudget(config, clock)
    rng = random.Random(seed)
    started = clock.monotonic()
    requests = retries = 0
    for _ in range(3000):
        clock.advance(rng.expovariate(100.0))  # ~100 requests a second, bursty
        budget.deposit()
        requests += 1
        for _ in range(rng.randint(0, 3)):  # a storm: many requests want retries
            if budget.try_withdraw():
                retries += 1
    elapsed = clock.monotonic() - started
    reserve = max(min_per_second, 1.0) if min_per_second > 0 else 0.0
    bound = ratio * requests + min_per_second * elapsed + reserve
    assert retries == budget.withdrawn
    assert retries <= bound
    # Demand exceeds the budget, so a working budget hands out nearly all of it.
    assert retries >= 0.85 * bound
    assert budget.refused > 0
