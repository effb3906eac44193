"""Labelled examples from the review store: what the model answered, how confident it was, and
what a reviewer decided.

Reads through the `ReviewStore` protocol (`list` with a resolved-status filter, page by page), so
any backend works. A reviewer's `approve` labels the answer right; `override` (with a corrected
answer) and `reject` label it wrong. Audit samples (`reason` "audit") are auto-band answers
queued at random: each stands for `1 / audit_sample` answers, which is their weight in
calibration when the policy's `audit_sample` is known.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sidecar.failures.calibrate import Example
from sidecar.failures.redact import Redactor
from sidecar.review.store import Decision, ReviewItem, ReviewQuery, ReviewStatus, ReviewStore

__all__ = [
    "example_of",
    "label_of",
    "labelled_example",
    "open_review_store",
    "read_reviews",
]


def label_of(decision: Decision | None) -> str | None:
    if decision is None:
        return None
    return "correct" if decision is Decision.APPROVE else "wrong"


def open_review_store(state_dir: Path | None = None, policy: Any = None) -> ReviewStore:
    """The review store the sidecar would use (PostgreSQL when the policy's `reviews` section
    and the environment say so, else SQLite under the state directory), opened only to read.
    `FileNotFoundError` when there is no SQLite file: reading must not create an empty one."""
    from dataclasses import replace

    from sidecar.review.settings import open_review_store as open_store
    from sidecar.review.settings import resolve_review_settings

    section = getattr(policy, "reviews", None)
    # Webhooks are for the running sidecar: their variables must not stop a read.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_WEBHOOK")}
    settings = resolve_review_settings(
        env,
        store=getattr(section, "store", "auto"),
        url_env=getattr(section, "url_env", "SIDECAR_DATABASE_URL"),
        database_schema=getattr(section, "database_schema", None),
    )
    if settings.backend == "sqlite":
        from sidecar.review.sqlite import DB_NAME

        if state_dir is not None:
            settings = replace(settings, state_dir=state_dir)
        path = settings.state_dir / DB_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no review store at {path}")
    return open_store(settings)


async def read_reviews(
    store: ReviewStore,
    *,
    route: str | None = None,
    since: float | None = None,
    until: float | None = None,
    resolved_only: bool = True,
) -> list[ReviewItem]:
    """Every item created in [since, until), oldest first."""
    now = time.time()
    items: list[ReviewItem] = []
    cursor: str | None = None
    while True:
        page = await store.list(
            ReviewQuery(
                route=route,
                status=ReviewStatus.RESOLVED if resolved_only else None,
                max_age=(now - since + 60) if since is not None else None,
                min_age=max(0.0, now - until - 60) if until is not None else None,
                limit=500,
                cursor=cursor,
            )
        )
        for item in page.items:
            if since is not None and item.created_at < since:
                continue
            if until is not None and item.created_at >= until:
                continue
            items.append(item)
        if page.next_cursor is None:
            return items
        cursor = page.next_cursor


def _body(part: Mapping[str, Any]) -> Any:
    """A review item's request or answer body, parsed as JSON when it is complete JSON."""
    body = part.get("body")
    if isinstance(body, str) and not part.get("body_truncated"):
        try:
            return json.loads(body)
        except ValueError:
            return body
    return body


def example_of(item: ReviewItem, redactor: Redactor | None = None) -> dict[str, Any]:
    """One JSONL line of `sidecar reviews export`: input, model answer, confidence, decision,
    corrected answer (redacted unless `redactor` is None)."""

    def clean(value: Any) -> Any:
        return redactor.value(value) if redactor is not None else value

    request = dict(item.request)
    answer = dict(item.answer)
    return {
        "review_id": item.id,
        "request_id": item.request_id,
        "trace_id": item.trace_id,
        "route": item.route,
        "reason": item.reason,
        "action": item.action,
        "created_at": item.created_at,
        "resolved_at": item.resolved_at,
        "input": clean(_body(request)),
        "input_meta": clean(
            {k: v for k, v in request.items() if k != "body"}
            | {"path": request.get("path", "").split("?", 1)[0]}
        ),
        "model_answer": clean(_body(answer)),
        "answer_meta": clean({k: v for k, v in answer.items() if k != "body"}),
        "confidence": item.confidence,
        "decision": item.decision.value if item.decision is not None else None,
        "label": label_of(item.decision),
        "corrected_answer": clean(item.corrected),
        "reviewer": item.reviewer,
        "note": redactor.text(item.note) if redactor is not None and item.note else item.note,
    }


def labelled_example(
    confidence: Any, label: Any, reason: str | None, audit_sample: float | None
) -> Example | None:
    """An `Example` from a confidence and a label ("correct"/"wrong"), or None if unusable."""
    if not isinstance(confidence, int | float) or isinstance(confidence, bool):
        return None
    if label not in ("correct", "wrong"):
        return None
    weight = 1.0
    if reason == "audit" and audit_sample:
        weight = 1.0 / audit_sample
    return Example(score=float(confidence), wrong=label == "wrong", weight=weight)
