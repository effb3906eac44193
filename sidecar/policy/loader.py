"""Load a policy: read YAML, apply environment and flag overrides, validate, check contradictions.

Every problem is reported with its field path (`routes[0].timeouts.attempt: ...`) so a bad file
stops start-up with a message that says exactly what to fix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sidecar.policy.degradation import degradation_issues
from sidecar.policy.schema import Policy, RoutePolicy, TimeoutsPolicy
from sidecar.policy.units import format_duration

__all__ = [
    "LoadedPolicy",
    "Overrides",
    "PolicyError",
    "check_policy",
    "format_loc",
    "load_policy",
    "parse_policy",
    "policy_json_schema",
]


class PolicyError(Exception):
    """A policy that cannot be used; `errors` holds one `path: message` line per problem."""

    def __init__(self, source: str, errors: Sequence[str]) -> None:
        super().__init__(f"{source}: invalid policy\n" + "\n".join(f"  {e}" for e in errors))
        self.source = source
        self.errors = list(errors)


@dataclass(frozen=True)
class Overrides:
    """Values from the environment or flags that beat the file (flags are applied after env)."""

    upstream_url: str | None = None
    host: str | None = None
    port: int | None = None
    admin_host: str | None = None
    admin_port: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Overrides:
        def port(name: str) -> int | None:
            raw = env.get(name)
            if raw is None or raw == "":
                return None
            try:
                return int(raw)
            except ValueError:
                raise PolicyError(name, [f"{name}: must be a port number, got {raw!r}"]) from None

        return cls(
            upstream_url=env.get("SIDECAR_UPSTREAM_URL") or None,
            host=env.get("SIDECAR_HOST") or None,
            port=port("SIDECAR_PORT"),
            admin_host=env.get("SIDECAR_ADMIN_HOST") or None,
            admin_port=port("SIDECAR_ADMIN_PORT"),
        )

    def then(self, later: Overrides) -> Overrides:
        """These overrides, with every value that `later` sets taking precedence."""
        return Overrides(
            upstream_url=later.upstream_url or self.upstream_url,
            host=later.host or self.host,
            port=later.port if later.port is not None else self.port,
            admin_host=later.admin_host or self.admin_host,
            admin_port=later.admin_port if later.admin_port is not None else self.admin_port,
        )


@dataclass(frozen=True)
class LoadedPolicy:
    policy: Policy
    source: str
    base_dir: Path


def format_loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(policy)"


def _apply_overrides(data: dict[str, Any], overrides: Overrides) -> dict[str, Any]:
    data = dict(data)
    server = dict(data.get("server") or {})
    for key in ("host", "port", "admin_host", "admin_port"):
        value = getattr(overrides, key)
        if value is not None:
            server[key] = value
    if server:
        data["server"] = server
    if overrides.upstream_url:
        upstreams = dict(data.get("upstreams") or {})
        name = data.get("default_upstream") or (next(iter(upstreams)) if upstreams else "default")
        upstreams[name] = {**dict(upstreams.get(name) or {}), "url": overrides.upstream_url}
        data["upstreams"] = upstreams
    return data


def _timeout_issues(prefix: str, t: TimeoutsPolicy) -> list[str]:
    # Defaults are clamped to what the user set (see TimeoutsPolicy.effective); only values the
    # user wrote can contradict each other.
    explicit = t.model_fields_set
    issues = []
    if t.attempt > t.total and "attempt" in explicit:
        issues.append(
            f"{prefix}.attempt: {format_duration(t.attempt)} is longer than the deadline "
            f"timeouts.total ({format_duration(t.total)})"
        )
    if t.connect > t.attempt and "connect" in explicit:
        issues.append(
            f"{prefix}.connect: {format_duration(t.connect)} is longer than the attempt "
            f"timeout ({format_duration(t.attempt)})"
        )
    if t.first_byte is not None and t.first_byte > t.total and "first_byte" in explicit:
        issues.append(
            f"{prefix}.first_byte: {format_duration(t.first_byte)} is longer than the deadline "
            f"timeouts.total ({format_duration(t.total)})"
        )
    return issues


def _route_issues(i: int, route: RoutePolicy, policy: Policy) -> list[str]:
    prefix = f"routes[{i}]"
    issues = []
    if route.upstream is not None and route.upstream not in policy.upstreams:
        issues.append(
            f"{prefix}.upstream: no upstream named {route.upstream!r} "
            f"(have: {', '.join(sorted(policy.upstreams))})"
        )
    issues += _timeout_issues(f"{prefix}.timeouts", route.timeouts)
    backoff = route.retry.backoff
    if backoff.base > backoff.max:
        issues.append(
            f"{prefix}.retry.backoff.base: {format_duration(backoff.base)} is larger than "
            f"backoff.max ({format_duration(backoff.max)})"
        )
    if route.breaker is not None and route.breaker.open_for > route.breaker.open_for_max:
        issues.append(f"{prefix}.breaker.open_for: longer than breaker.open_for_max")
    if route.hedge.enabled and not route.idempotent:
        issues.append(
            f"{prefix}.hedge.enabled: hedging sends a request twice; only for idempotent routes "
            f"(set {prefix}.idempotent: true)"
        )
    gate = route.confidence
    if gate is not None and not route.fallback:
        for band in ("on_review", "on_reject", "on_missing"):
            if getattr(gate, band) == "fallback":
                issues.append(
                    f"{prefix}.confidence.{band}: fallback needs a fallback chain "
                    f"({prefix}.fallback)"
                )
    return issues


def check_policy(policy: Policy) -> list[str]:
    """Contradictions that single fields cannot express, each with its field path."""
    issues: list[str] = []
    if not policy.upstreams:
        issues.append("upstreams: at least one upstream is required")
    if not policy.routes:
        issues.append("routes: at least one route is required")
    if policy.default_upstream is not None and policy.default_upstream not in policy.upstreams:
        issues.append(f"default_upstream: no upstream named {policy.default_upstream!r}")
    for name, upstream in policy.upstreams.items():
        if upstream.breaker.open_for > upstream.breaker.open_for_max:
            issues.append(f"upstreams.{name}.breaker.open_for: longer than breaker.open_for_max")
    seen: dict[str, int] = {}
    for i, route in enumerate(policy.routes):
        if route.name in seen:
            issues.append(
                f"routes[{i}].name: {route.name!r} is already used by routes[{seen[route.name]}]"
            )
        seen.setdefault(route.name, i)
        issues += _route_issues(i, route, policy)
    # Bulkheads and the fallback chain: pool sizes, fallback upstreams, CEL rules compiled now.
    issues += degradation_issues(policy)
    return issues


def parse_policy(data: Any, source: str = "<policy>", overrides: Overrides | None = None) -> Policy:
    """Validate already-loaded YAML data; raise `PolicyError` naming every bad field."""
    if not isinstance(data, dict):
        raise PolicyError(source, ["(policy): must be a mapping with upstreams and routes"])
    if overrides is not None:
        data = _apply_overrides(data, overrides)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors(include_url=False):
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown field"
            errors.append(f"{format_loc(err['loc'])}: {message}")
        raise PolicyError(source, errors) from None
    issues = check_policy(policy)
    if issues:
        raise PolicyError(source, issues)
    return policy


def load_policy(path: str | Path, overrides: Overrides | None = None) -> LoadedPolicy:
    """Read and validate a policy file."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(source, [f"(file): cannot read: {exc.strerror or exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(source, [f"(yaml): {exc}"]) from None
    policy = parse_policy(data, source, overrides)
    base_dir = path.resolve().parent
    issues = _file_issues(policy, base_dir)
    if issues:
        raise PolicyError(source, issues)
    return LoadedPolicy(policy=policy, source=source, base_dir=base_dir)


def _file_issues(policy: Policy, base_dir: Path) -> list[str]:
    """Files a policy names (JSON Schemas) must exist and parse, so `sidecar validate` catches
    them rather than the first request."""
    issues = []
    for i, route in enumerate(policy.routes):
        v = route.validate_
        if v is None or v.json_schema is None:
            continue
        import jsonschema  # only when a route names a schema (idle memory)

        where = f"routes[{i}].validate.json_schema"
        full = (
            Path(v.json_schema) if Path(v.json_schema).is_absolute() else base_dir / v.json_schema
        )
        try:
            schema = json.loads(full.read_text(encoding="utf-8"))
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except OSError as exc:
            issues.append(f"{where}: cannot read {full}: {exc.strerror or exc}")
        except ValueError as exc:
            issues.append(f"{where}: {full} is not JSON: {exc}")
        except jsonschema.exceptions.SchemaError as exc:
            issues.append(f"{where}: {full} is not a valid JSON Schema: {exc.message}")
    return issues


def policy_json_schema() -> str:
    schema = Policy.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Sidecar policy"
    return json.dumps(schema, indent=2, sort_keys=True)
