from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sidecar.policy.loader import Overrides, PolicyError, load_policy, parse_policy
from sidecar.policy.units import parse_duration, parse_size

REPO = Path(__file__).resolve().parents[3]


def base(**route: object) -> dict[str, object]:
    r: dict[str, object] = {"name": "r", "upstream": "model"}
    r.update(route)
    return {"upstreams": {"model": {"url": "http://127.0.0.1:8080"}}, "routes": [r]}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("1.5s", 1.5), ("5m", 300.0), ("1h", 3600.0), (3, 3.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["fast", "-1s", "1 week", True, None, "1d"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_sizes() -> None:
    assert parse_size("1MiB") == 1024 * 1024
    assert parse_size("64KiB") == 65536
    assert parse_size(10) == 10
    with pytest.raises(ValueError):
        parse_size("lots")


def test_valid_policy_is_frozen() -> None:
    policy = parse_policy(base(timeouts={"total": "2s", "attempt": "800ms"}))
    assert policy.routes[0].timeouts.total == 2.0
    assert policy.routes[0].timeouts.attempt == 0.8
    with pytest.raises(ValidationError):
        policy.routes[0].timeouts.total = 5  # type: ignore[misc]


def errors_of(data: object) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(data)
    return info.value.errors


def test_unknown_key_names_the_path() -> None:
    assert errors_of(base(retry={"max_attempt": 3})) == [
        "routes[0].retry.max_attempt: unknown field"
    ]


def test_field_constraint_names_the_path() -> None:
    errors = errors_of(base(retry={"max_attempts": 0}))
    assert errors == ["routes[0].retry.max_attempts: Input should be greater than or equal to 1"]


def test_bad_duration_names_the_path() -> None:
    errors = errors_of(base(timeouts={"total": "soon"}))
    assert errors[0].startswith("routes[0].timeouts.total: 'soon' is not a duration")


def test_every_error_is_reported() -> None:
    errors = errors_of(base(timeouts={"total": "x"}, retry={"max_attempts": -1}, bogus=1))
    assert {e.split(":")[0] for e in errors} == {
        "routes[0].timeouts.total",
        "routes[0].retry.max_attempts",
        "routes[0].bogus",
    }


def test_contradiction_attempt_longer_than_deadline() -> None:
    errors = errors_of(base(timeouts={"total": "1s", "attempt": "2s"}))
    assert errors == [
        "routes[0].timeouts.attempt: 2s is longer than the deadline timeouts.total (1s)"
    ]


def test_unknown_upstream() -> None:
    errors = errors_of(base(upstream="nope"))
    assert errors[0].startswith("routes[0].upstream: no upstream named 'nope'")


def test_duplicate_route_names() -> None:
    data = base()
    data["routes"] = [{"name": "a"}, {"name": "a"}]
    assert errors_of(data) == ["routes[1].name: 'a' is already used by routes[0]"]


@pytest.mark.parametrize(
    "url",
    ["ftp://x", "http://user:pw@host:1", "http://host:1/path", "http://host:1/?q=1", "http://"],
)
def test_upstream_url_must_be_an_origin(url: str) -> None:
    data = base()
    data["upstreams"] = {"model": {"url": url}}
    errors = errors_of(data)
    assert errors[0].startswith("upstreams.model.url: ")


def test_env_then_flags_precedence() -> None:
    env = Overrides.from_env(
        {
            "SIDECAR_PORT": "9000",
            "SIDECAR_ADMIN_PORT": "9001",
            "SIDECAR_UPSTREAM_URL": "http://127.0.0.1:1",
        }
    )
    flags = Overrides(port=9100)
    merged = env.then(flags)
    policy = parse_policy(base(), overrides=merged)
    assert policy.server.port == 9100  # flag beats env
    assert policy.server.admin_port == 9001  # env beats file
    assert policy.upstreams["model"].url == "http://127.0.0.1:1"


def test_bad_env_port() -> None:
    with pytest.raises(PolicyError) as info:
        Overrides.from_env({"SIDECAR_PORT": "eighty"})
    assert "SIDECAR_PORT" in info.value.errors[0]


def test_shipped_policies_validate() -> None:
    for path in sorted((REPO / "policies").glob("*.yaml")):
        load_policy(path)
