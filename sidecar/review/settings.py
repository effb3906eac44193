"""Where the review queue keeps its items and whom it tells: plain, frozen settings resolved once
at start from the policy's `reviews` section and the environment, and the store they open.

Backend choice: `store: postgres` (or `auto` with a `postgresql://` URL in the variable that
`url_env` names, `SIDECAR_DATABASE_URL` by default) opens the shared PostgreSQL store; otherwise
the embedded SQLite file under `SIDECAR_STATE_DIR`. Environment variables beat the policy:
`SIDECAR_DATABASE_SCHEMA`, `SIDECAR_WEBHOOK_URL`, `SIDECAR_REVIEW_RETENTION`,
`SIDECAR_REVIEW_LEASE`, `SIDECAR_PUBLIC_ADMIN_URL`. The webhook secret is only ever read from the
environment (`SIDECAR_WEBHOOK_SECRET` unless `secret_env` names another variable).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sidecar.clock import Clock
from sidecar.database import SCHEMA_PATTERN, display_url, is_postgres_url
from sidecar.policy.units import parse_duration
from sidecar.review.store import ReviewStore

__all__ = [
    "DEFAULT_STATE_DIR",
    "ReviewSettings",
    "ReviewSettingsError",
    "WebhookSettings",
    "open_review_store",
    "resolve_review_settings",
    "state_dir_from_env",
]

DEFAULT_STATE_DIR = ".sidecar"
_SCHEMA = re.compile(SCHEMA_PATTERN)


class ReviewSettingsError(ValueError):
    """The policy and the environment do not describe a usable review store or webhook."""


@dataclass(frozen=True)
class WebhookSettings:
    url: str
    secret: bytes
    timeout: float = 5.0
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    #: Undelivered events older than this are dropped (and logged).
    max_age: float = 86400.0
    #: Most events kept in the outbox; past this the oldest are dropped.
    outbox_max: int = 10_000
    #: How often other replicas' events are looked for (this replica's wake the sender at once).
    poll_interval: float = 1.0


@dataclass(frozen=True)
class ReviewSettings:
    backend: Literal["sqlite", "postgres"] = "sqlite"
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    database_url: str | None = None
    database_schema: str | None = None
    pool_size: int = 10
    #: Waiting for a database connection longer than this fails (closed) the operation.
    timeout: float = 3.0
    retention: float = 30 * 86400.0
    lease: float = 300.0
    public_admin_url: str = ""
    sensitive_fields: tuple[str, ...] = ()
    webhook: WebhookSettings | None = None
    #: Where the database URL came from, for messages (`SIDECAR_DATABASE_URL`).
    url_env: str = "SIDECAR_DATABASE_URL"

    def describe(self) -> str:
        if self.backend == "postgres" and self.database_url:
            schema = f" (schema {self.database_schema})" if self.database_schema else ""
            return display_url(self.database_url) + schema
        return str(self.state_dir / "reviews.db")


def state_dir_from_env(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("SIDECAR_STATE_DIR") or DEFAULT_STATE_DIR)


def resolve_review_settings(
    env: Mapping[str, str] | None = None,
    *,
    store: Literal["auto", "sqlite", "postgres"] = "auto",
    url_env: str = "SIDECAR_DATABASE_URL",
    database_schema: str | None = None,
    pool_size: int = 10,
    timeout: float = 3.0,
    sensitive_fields: tuple[str, ...] = (),
    webhook_url: str | None = None,
    webhook_secret_env: str = "SIDECAR_WEBHOOK_SECRET",
    webhook_timeout: float = 5.0,
    webhook_backoff_base: float = 1.0,
    webhook_backoff_max: float = 300.0,
    webhook_max_age: float = 86400.0,
    webhook_outbox_max: int = 10_000,
) -> ReviewSettings:
    """Settings from policy values (the keyword arguments) and the environment."""
    env = os.environ if env is None else env
    url = env.get(url_env) or None
    if store == "postgres" and not url:
        raise ReviewSettingsError(
            f"reviews.store is postgres but {url_env} is not set (a postgresql:// URL)"
        )
    backend: Literal["sqlite", "postgres"] = "sqlite"
    if store == "postgres" or (store == "auto" and url):
        assert url is not None
        if not is_postgres_url(url):
            raise ReviewSettingsError(f"{url_env} must be a postgresql:// URL")
        backend = "postgres"
    schema = env.get("SIDECAR_DATABASE_SCHEMA") or database_schema
    if schema is not None and not _SCHEMA.fullmatch(schema):
        raise ReviewSettingsError(
            f"database schema {schema!r}: lower-case letters, digits and _ (at most 63)"
        )
    hook_url = env.get("SIDECAR_WEBHOOK_URL") or webhook_url
    webhook = None
    if hook_url:
        if not hook_url.startswith(("http://", "https://")):
            raise ReviewSettingsError("the webhook URL must be an http:// or https:// URL")
        secret = env.get(webhook_secret_env) or ""
        if len(secret) < 16:
            raise ReviewSettingsError(
                f"webhooks need a signing secret of at least 16 characters in {webhook_secret_env}"
            )
        webhook = WebhookSettings(
            url=hook_url,
            secret=secret.encode(),
            timeout=webhook_timeout,
            backoff_base=webhook_backoff_base,
            backoff_max=max(webhook_backoff_base, webhook_backoff_max),
            max_age=webhook_max_age,
            outbox_max=webhook_outbox_max,
        )
    try:
        retention = parse_duration(env.get("SIDECAR_REVIEW_RETENTION") or 30 * 86400)
        lease = parse_duration(env.get("SIDECAR_REVIEW_LEASE") or "5m")
    except ValueError as exc:
        raise ReviewSettingsError(str(exc)) from None
    return ReviewSettings(
        backend=backend,
        state_dir=state_dir_from_env(env),
        database_url=url if backend == "postgres" else None,
        database_schema=schema,
        pool_size=pool_size,
        timeout=timeout,
        retention=retention,
        lease=lease,
        public_admin_url=(env.get("SIDECAR_PUBLIC_ADMIN_URL") or "").rstrip("/"),
        sensitive_fields=sensitive_fields,
        webhook=webhook,
        url_env=url_env,
    )


def open_review_store(settings: ReviewSettings, clock: Clock | None = None) -> ReviewStore:
    """The store the settings name; nothing is opened until first use."""
    outbox = settings.webhook.outbox_max if settings.webhook is not None else None
    if settings.backend == "postgres":
        from sidecar.review.postgres import PostgresReviewStore

        assert settings.database_url is not None
        return PostgresReviewStore(
            settings.database_url,
            schema=settings.database_schema,
            clock=clock,
            retention=settings.retention,
            outbox_limit=outbox,
            pool_size=settings.pool_size,
            timeout=settings.timeout,
        )
    from sidecar.review.sqlite import DB_NAME, SqliteReviewStore

    return SqliteReviewStore(
        settings.state_dir / DB_NAME, clock=clock, retention=settings.retention, outbox_limit=outbox
    )
