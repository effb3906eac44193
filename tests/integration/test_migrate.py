"""`sidecar migrate`: creates the review queue's and the failure store's tables in PostgreSQL
(then has nothing to do), prepares the SQLite file without PostgreSQL, and says clearly, with
exit status 1, when the database cannot be reached."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.timeout(60)


def migrate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "migrate", *args],
        env=full,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_migrate_postgres_then_nothing_to_do(postgres: str, pg_schema: str) -> None:
    env = {"SIDECAR_DATABASE_URL": postgres, "SIDECAR_DATABASE_SCHEMA": pg_schema}
    first = migrate(env)
    assert first.returncode == 0, first.stderr
    assert "reviews: " in first.stdout and "migrations applied: 1, 2, 3" in first.stdout
    assert "failures: " in first.stdout and "migrations applied: 1\n" in first.stdout
    again = migrate(env)
    assert again.returncode == 0
    assert again.stdout.count("none (up to date)") == 2
    with psycopg.connect(postgres, options=f"-c search_path={pg_schema}") as raw:
        tables = {
            r[0]
            for r in raw.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (pg_schema,),
            )
        }
    assert {"reviews", "review_outbox", "sidecar_keys", "failures", "request_counts"} <= tables


def test_migrate_sqlite_and_an_unreachable_database(tmp_path: Path) -> None:
    done = migrate({"SIDECAR_STATE_DIR": str(tmp_path / "state")})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "state" / "reviews.db").is_file()
    down = migrate({"SIDECAR_DATABASE_URL": "postgresql://app:secret-pw@127.0.0.1:1/db"})
    assert down.returncode == 1
    assert "postgresql://app@127.0.0.1:1/db is unreachable" in down.stderr
    assert "secret-pw" not in down.stderr + down.stdout
    bad = migrate({"SIDECAR_DATABASE_URL": "mysql://x/y"})
    assert bad.returncode == 2 and "postgresql://" in bad.stderr
