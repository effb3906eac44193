"""Open an embedded SQLite store the way both of the sidecar's stores need it: WAL journal, the
chosen `synchronous` level, a busy timeout, the schema applied in one immediate transaction, and
the file readable by its owner only (it holds callers' requests and answers).

Switching a new file to WAL does not wait on SQLite's busy handler: when another writer (another
process, or a second store on the same file) is setting it up at the same moment, SQLite answers
"database is locked" at once. That is retried for a few seconds. Blocking: call it off the event
loop.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

__all__ = ["open_wal_database"]


def open_wal_database(
    path: Path, *, synchronous: str, schema: str, schema_version: int, wait: float = 5.0
) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    deadline = time.monotonic() + wait
    while True:
        try:
            return _open(path, synchronous, schema, schema_version)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _open(path: Path, synchronous: str, schema: str, schema_version: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch to WAL (journal_mode={mode})")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > schema_version:
            raise sqlite3.OperationalError(
                f"schema version {version} is newer than this sidecar ({schema_version})"
            )
        conn.execute("BEGIN IMMEDIATE")
        for statement in schema.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version={schema_version}")
        conn.execute("COMMIT")
        os.chmod(path, 0o600)
    except BaseException:
        conn.close()
        raise
    return conn
