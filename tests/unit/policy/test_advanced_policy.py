"""Policy options of the advanced resilience features: hedging, shared breaker storage, and what
the builder makes of them. All default off."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.policy.builder import breaker_config, hedge_config
from sidecar.policy.loader import PolicyError, parse_policy
from sidecar.policy.schema import BreakerPolicy, HedgePolicy


def base(**route: object) -> dict[str, object]:
    r: dict[str, object] = {"name": "r", "upstream": "model"}
    r.update(route)
    return {"upstreams": {"model": {"url": "http://127.0.0.1:8080"}}, "routes": [r]}


def errors_of(data: object) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(data)
    return info.value.errors


def test_everything_is_off_by_default() -> None:
    policy = parse_policy(base())
    assert policy.routes[0].hedge.enabled is False
    assert policy.upstreams["model"].breaker.storage is None
    assert policy.upstreams["model"].concurrency is None


def test_hedging_a_non_idempotent_route_is_rejected_with_the_field_path() -> None:
    errors = errors_of(base(hedge={"enabled": True}))
    assert errors == [
        "routes[0].hedge.enabled: hedging sends a request twice; only for idempotent routes "
        "(set routes[0].idempotent: true)"
    ]
    # Configured but off is fine anywhere.
    parse_policy(base(hedge={"enabled": False, "delay": "p95"}))


@pytest.mark.parametrize(
    ("delay", "config_delay", "quantile"),
    [("50ms", 0.05, None), (0.2, 0.2, None), ("p95", 0.0, 0.95), ("P99.9", 0.0, 0.999)],
)
def test_hedge_delay_is_fixed_or_a_latency_quantile(
    delay: object, config_delay: float, quantile: float | None
) -> None:
    policy = parse_policy(base(idempotent=True, hedge={"enabled": True, "delay": delay}))
    config = hedge_config(policy.routes[0].hedge)
    assert config.delay == pytest.approx(config_delay)
    assert config.quantile == (pytest.approx(quantile) if quantile is not None else None)
    assert config.max_hedges == 1


@pytest.mark.parametrize(
    ("hedge", "message"),
    [
        ({"delay": "soon"}, "routes[0].hedge.delay: 'soon' is not a duration"),
        ({"delay": "p0"}, "routes[0].hedge.delay: a latency quantile must be between"),
        ({"max_hedges": 0}, "routes[0].hedge.max_hedges: Input should be greater than"),
        ({"max_hedges": 4}, "routes[0].hedge.max_hedges: Input should be less than"),
        ({"after": "1s"}, "routes[0].hedge.after: unknown field"),
    ],
)
def test_bad_hedge_settings_name_the_field(hedge: dict[str, object], message: str) -> None:
    errors = errors_of(base(idempotent=True, hedge={"enabled": True, **hedge}))
    assert len(errors) == 1 and errors[0].startswith(message), errors


def test_breaker_storage_must_be_a_redis_url() -> None:
    data = base()
    data["upstreams"] = {
        "model": {"url": "http://127.0.0.1:8080", "breaker": {"storage": "http://redis:6379"}}
    }
    assert errors_of(data) == [
        "upstreams.model.breaker.storage: must be a redis://, rediss:// or unix:// URL"
    ]
    ok = BreakerPolicy(storage="redis://127.0.0.1:6379/0", storage_prefix="team-a:")
    config = breaker_config(ok)
    assert config.storage == "redis://127.0.0.1:6379/0" and config.storage_prefix == "team-a:"
    assert breaker_config(BreakerPolicy()).storage is None


def test_hedge_policy_defaults() -> None:
    hedge = HedgePolicy()
    assert (hedge.enabled, hedge.delay, hedge.max_hedges) == (False, "50ms", 1)
    assert hedge.seconds == 0.05 and hedge.quantile is None
    assert HedgePolicy(delay=0.2).delay == "0.2s"


def test_the_example_policies_document_every_option_commented_out() -> None:
    repo = Path(__file__).resolve().parents[3]
    for name in ("kserve-classifier.yaml", "llm-openai.yaml"):
        text = (repo / "policies" / name).read_text()
        for option in ("hedge:", "storage: redis://", "adaptive: true"):
            lines = [line.strip() for line in text.splitlines() if option in line]
            assert lines, f"{name} does not show {option}"
            assert all(line.startswith("#") for line in lines), f"{name}: {option} is not off"
