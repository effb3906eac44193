"""Policy → the confidence gate: turns a route's `confidence` section into a `ConfidenceConfig`
and the gate that wraps the whole route (`ConfidenceGate → Fallback → Bulkhead → ...`).

CEL expressions and JSONPath are already compiled once by the schema's validators, so a bad one
fails `sidecar validate` with its field path; this module only assembles plain configs.
"""

from __future__ import annotations

from sidecar.policy.degradation import response_template
from sidecar.policy.schema import ConfidencePolicy, RoutePolicy
from sidecar.review.store import ReviewQueue
from sidecar.strategies.confidence import Action, ConfidenceConfig, ConfidenceGate, FallbackChain
from sidecar.strategies.confidence_extract import ExtractConfig

__all__ = ["confidence_config", "confidence_gate"]


def confidence_config(policy: ConfidencePolicy) -> ConfidenceConfig:
    e = policy.extract
    return ConfidenceConfig(
        extract=ExtractConfig(
            kind=e.kind,
            output=e.output,
            class_index=e.class_index,
            aggregate=e.aggregate,
            path=e.path,
            header=e.header,
            expression=e.expression,
        ),
        auto_above=policy.auto_above,
        reject_below=policy.reject_below,
        on_review=Action(policy.on_review),
        on_reject=Action(policy.on_reject),
        on_missing=Action(policy.on_missing),
        escalate_respond=policy.escalate.respond,
        hold_timeout=policy.hold.timeout,
        request_info_fields=policy.request_info.fields,
        request_info_message=policy.request_info.message,
        safe_default=(
            response_template(policy.safe_default) if policy.safe_default is not None else None
        ),
        audit_sample=policy.audit_sample,
        stream_mode=policy.stream_mode,
        max_body=policy.max_body,
    )


def confidence_gate(
    route: RoutePolicy, queue: ReviewQueue | None, fallback: FallbackChain | None
) -> ConfidenceGate | None:
    if route.confidence is None:
        return None
    return ConfidenceGate(confidence_config(route.confidence), queue, fallback)
