"""`sidecar migrate`: create or upgrade the tables of the review queue (and of the failure store,
when it lives in PostgreSQL) without starting the sidecar.

`sidecar run` applies the same migrations on start, so this is for a deploy step that wants the
schema in place before any replica starts (a Kubernetes Job, an init container), or to check that
a database is reachable. The store is chosen as `sidecar run` chooses it: the policy's `reviews`
section (`--policy`, env `SIDECAR_POLICY`; optional) and `SIDECAR_DATABASE_URL`.
Exit status: 0 done (or nothing to do), 1 the database failed or could not be reached, 2 the
policy or the settings are invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

__all__ = ["add_migrate_parser", "run_migrate"]


def add_migrate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "migrate", help="create or upgrade the review queue's tables (PostgreSQL or SQLite)"
    )
    p.add_argument("--policy", help="policy file for its `reviews` section (env SIDECAR_POLICY)")
    p.add_argument(
        "--database-url-env",
        help="read the PostgreSQL URL from this variable (default: the policy's url_env)",
    )


async def _migrate(args: argparse.Namespace) -> int:
    from sidecar.failures.postgres import PostgresFailureStore
    from sidecar.failures.store import FailureStoreError
    from sidecar.policy.loader import PolicyError, load_policy
    from sidecar.policy.reviews import review_settings
    from sidecar.policy.schema import ReviewsPolicy
    from sidecar.review.postgres import PostgresReviewStore
    from sidecar.review.settings import ReviewSettingsError, open_review_store
    from sidecar.review.store import ReviewStoreError

    # Our own message says why the database is unreachable; the pool's retries need not.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    policy_path = args.policy or os.environ.get("SIDECAR_POLICY")
    reviews = ReviewsPolicy()
    if policy_path:
        try:
            reviews = load_policy(Path(policy_path)).policy.reviews
        except PolicyError as exc:
            print(f"sidecar migrate: {exc}", file=sys.stderr)
            return 2
    if args.database_url_env:
        reviews = reviews.model_copy(update={"url_env": args.database_url_env})
    try:
        settings = review_settings(reviews)
    except ReviewSettingsError as exc:
        print(f"sidecar migrate: reviews: {exc}", file=sys.stderr)
        return 2
    store = open_review_store(settings)
    try:
        if isinstance(store, PostgresReviewStore):
            applied = await store.migrate()
            print(f"reviews: {settings.describe()}: migrations applied: {_versions(applied)}")
            # The failure store shares the database (and schema) when it lives in PostgreSQL.
            assert settings.database_url is not None
            failures = PostgresFailureStore(
                settings.database_url, schema=settings.database_schema, timeout=settings.timeout
            )
            try:
                applied = await failures.migrate()
            finally:
                await failures.close()
            print(f"failures: {settings.describe()}: migrations applied: {_versions(applied)}")
        else:
            await store.backlog()  # opens the file and creates or upgrades its tables
            print(f"reviews: {settings.describe()}: ready")
    except (ReviewStoreError, FailureStoreError) as exc:
        print(f"sidecar migrate: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    return 0


def _versions(applied: list[int]) -> str:
    return ", ".join(str(v) for v in applied) if applied else "none (up to date)"


def run_migrate(args: argparse.Namespace) -> int:
    return asyncio.run(_migrate(args))
