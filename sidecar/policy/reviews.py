"""Policy → the review queue's settings: the `reviews` section plus the environment, resolved
once at start into `sidecar.review.settings.ReviewSettings` (where the queue is stored, the
webhook, the fields the review page masks)."""

from __future__ import annotations

from collections.abc import Mapping

from sidecar.policy.schema import ReviewsPolicy
from sidecar.review.settings import ReviewSettings, resolve_review_settings

__all__ = ["review_settings"]


def review_settings(policy: ReviewsPolicy, env: Mapping[str, str] | None = None) -> ReviewSettings:
    """Raises `ReviewSettingsError` when the policy and the environment disagree (e.g. `store:
    postgres` without a URL, a webhook without its secret)."""
    hook = policy.webhook
    return resolve_review_settings(
        env,
        store=policy.store,
        url_env=policy.url_env,
        database_schema=policy.database_schema,
        pool_size=policy.pool_size,
        timeout=policy.timeout,
        sensitive_fields=policy.sensitive_fields,
        webhook_url=hook.url,
        webhook_secret_env=hook.secret_env,
        webhook_timeout=hook.timeout,
        webhook_backoff_base=hook.backoff.base,
        webhook_backoff_max=hook.backoff.max,
        webhook_max_age=hook.max_age,
        webhook_outbox_max=hook.outbox_max,
    )
