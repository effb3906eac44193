"""`sidecar doctor`: is this sidecar set up right? One pass / warn / fail line per check.

    sidecar doctor [--policy FILE] [--admin-url URL] [--json]

Checks, in the order printed:

- `policy`: the file validates (every problem with its field path), with the environment's
  overrides applied as `sidecar run` applies them, and its `reviews` section fits the environment;
- `upstream <name>`: each upstream accepts a TCP connection and answers HTTP to a probe (`GET
  /v2/health/ready` when a route speaks KServe V2, `GET /v1/models` for OpenAI-style routes, else
  `GET /`); any HTTP answer proves the protocol, a 5xx warns;
- `state dir`: `SIDECAR_STATE_DIR` is a writable directory (or can be created);
- `review store`: the SQLite file passes `PRAGMA integrity_check`, or, with PostgreSQL
  (`SIDECAR_DATABASE_URL`), the database is reachable and every migration is applied;
- `failure store`: the same integrity check on `failures.db`;
- `otlp`: the endpoint from `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`
  accepts a test export (an empty `ExportTraceServiceRequest` POSTed to `/v1/traces`); warns when
  no endpoint is set or export is turned off;
- `tokens`: `SIDECAR_ADMIN_TOKEN` and `SIDECAR_REVIEWER_TOKEN` are set when the admin listener is
  not loopback-only (fail), `SIDECAR_APP_TOKEN` too (warn);
- `effective policy` (with `--admin-url`): the running sidecar's `GET /admin/policy` matches the
  file (secrets are redacted on both sides; `server`, the listeners, comes from flags and env and
  is not compared);
- `clock`: the monotonic clock advances, the wall clock is later than this build, and (with
  `--admin-url`) the sidecar's `Date` header is within a few seconds of ours;
- `http parser`: aiohttp's C HTTP parser is loaded (warn when it fell back to pure Python, which
  `sidecar run` refuses without `--allow-pure-python-parser`).

Exit status: 0 every check passed, 1 some warned, 2 any failed. `--json` prints
`{"exit_code", "summary", "checks": [{"check", "name", "status", "message", "details"}]}`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import email.utils
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:  # the heavy imports wait until a check runs (`sidecar --help` stays fast)
    from sidecar.database import Migration
    from sidecar.policy.loader import LoadedPolicy
    from sidecar.policy.schema import Policy

__all__ = ["CheckResult", "Doctor", "add_doctor_parser", "exit_code", "run_doctor"]

Status = Literal["pass", "warn", "fail"]

#: No build of this sidecar is older than this; a wall clock before it is wrong.
_BUILD_FLOOR = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
#: Most seconds the sidecar's `Date` header may differ from our clock before a warning (the
#: header has whole seconds).
_MAX_SKEW = 5.0
_MAX_DIFFS = 20


@dataclass(frozen=True)
class CheckResult:
    check: str
    name: str
    status: Status
    message: str
    details: tuple[str, ...] = field(default=())


def exit_code(results: Sequence[CheckResult]) -> int:
    statuses = {r.status for r in results}
    return 2 if "fail" in statuses else 1 if "warn" in statuses else 0


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# -- the policy ----------------------------------------------------------------------------------


def check_policy(path: Path, env: Mapping[str, str]) -> tuple[CheckResult, LoadedPolicy | None]:
    from sidecar.policy.loader import Overrides, PolicyError, load_policy
    from sidecar.policy.reviews import review_settings
    from sidecar.review.settings import ReviewSettingsError

    try:
        loaded = load_policy(path, Overrides.from_env(env))
        review_settings(loaded.policy.reviews, env)
    except PolicyError as exc:
        count = len(exc.errors)
        return (
            CheckResult(
                "policy",
                "policy",
                "fail",
                f"{path}: invalid ({count} problem{'s' if count != 1 else ''}; "
                "`sidecar run` would not start)",
                tuple(exc.errors),
            ),
            None,
        )
    except ReviewSettingsError as exc:
        return CheckResult("policy", "policy", "fail", f"{path}: reviews: {exc}"), None
    policy = loaded.policy
    ups, routes = len(policy.upstreams), len(policy.routes)
    message = (
        f"{path}: valid ({ups} upstream{'s' if ups != 1 else ''}, "
        f"{routes} route{'s' if routes != 1 else ''})"
    )
    return CheckResult("policy", "policy", "pass", message), loaded


# -- upstreams -----------------------------------------------------------------------------------


def probe_path(policy: Policy, upstream: str) -> str:
    """A harmless GET that any server of the protocol the routes speak answers."""
    default = policy.default_upstream or next(iter(policy.upstreams))
    prefixes = []
    for route in policy.routes:
        uses = (route.upstream or default) == upstream or any(
            link.upstream == upstream for link in route.fallback
        )
        if uses:
            prefixes.append(route.match.path_prefix)
    if any(p.startswith("/v2") for p in prefixes):
        return "/v2/health/ready"  # KServe V2 (MLServer, Triton, the demo model)
    if any(p.startswith("/v1") for p in prefixes):
        return "/v1/models"  # OpenAI-compatible servers
    return "/"


async def check_upstream(name: str, url: str, path: str, timeout: float) -> CheckResult:
    import aiohttp

    label = f"upstream {name}"
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
        writer.close()
    except (OSError, TimeoutError) as exc:
        return CheckResult(
            "upstream", label, "fail", f"{url}: no TCP connection to {host}:{port}: {_reason(exc)}"
        )
    connected = time.monotonic() - started
    started = time.monotonic()
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url + path, allow_redirects=False) as resp,
        ):
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return CheckResult(
            "upstream",
            label,
            "fail",
            f"{url}: TCP connects, but GET {path} got no HTTP answer: {_reason(exc)} "
            "(is this the model server's HTTP port?)",
        )
    took = time.monotonic() - started
    message = f"{url}: TCP connect {_ms(connected)}; GET {path} → HTTP {status} in {_ms(took)}"
    if status >= 500:
        return CheckResult("upstream", label, "warn", message + " (answers, but not healthy)")
    return CheckResult("upstream", label, "pass", message)


# -- state and stores ----------------------------------------------------------------------------


def check_state_dir(state_dir: Path) -> CheckResult:
    where = f"{state_dir} (SIDECAR_STATE_DIR)"
    if state_dir.exists():
        if not state_dir.is_dir():
            return CheckResult(
                "state_dir", "state dir", "fail", f"{where} exists but is not a directory"
            )
        try:
            with tempfile.NamedTemporaryFile(dir=state_dir, prefix=".doctor-"):
                pass
        except OSError as exc:
            return CheckResult("state_dir", "state dir", "fail", f"{where}: not writable: {exc}")
        return CheckResult("state_dir", "state dir", "pass", f"{where}: writable")
    ancestor = state_dir.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return CheckResult(
            "state_dir", "state dir", "fail", f"{where}: cannot be created: {ancestor} is a file"
        )
    try:
        with tempfile.TemporaryDirectory(dir=ancestor, prefix=".doctor-"):
            pass
    except OSError as exc:
        return CheckResult(
            "state_dir", "state dir", "fail", f"{where}: cannot be created in {ancestor}: {exc}"
        )
    return CheckResult(
        "state_dir", "state dir", "pass", f"{where}: does not exist yet; will be created on start"
    )


def _integrity(path: Path) -> list[str] | None:
    """`PRAGMA integrity_check` rows, or None when the file does not exist yet."""
    if not path.exists():
        return None
    # mode=rw: never create the file; the check itself writes nothing.
    conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=2.0)
    try:
        rows = conn.execute("PRAGMA integrity_check(20)").fetchall()
    finally:
        conn.close()
    return [str(row[0]) for row in rows]


async def check_sqlite(check: str, label: str, path: Path) -> CheckResult:
    try:
        rows = await asyncio.to_thread(_integrity, path)
    except sqlite3.Error as exc:
        return CheckResult(
            check,
            label,
            "fail",
            f"{path}: cannot be opened as SQLite: {exc} (move it aside; the sidecar creates a "
            "new one)",
        )
    if rows is None:
        return CheckResult(check, label, "pass", f"{path}: not created yet (created on first use)")
    if rows == ["ok"]:
        return CheckResult(check, label, "pass", f"{path}: integrity ok")
    return CheckResult(
        check, label, "fail", f"{path}: PRAGMA integrity_check found damage", tuple(rows)
    )


async def check_postgres(
    url: str,
    schema: str | None,
    timeout: float,
    *,
    check: str = "review_store",
    label: str = "review store",
    component: str | None = None,
    migrations: Sequence[Migration] | None = None,
) -> CheckResult:
    """The database answers and `component`'s migrations (default: the review queue's) are all
    applied, as `sidecar migrate` records them in `sidecar_migrations`."""
    import psycopg
    from psycopg import errors

    from sidecar.database import display_url

    if component is None or migrations is None:
        from sidecar.review.postgres import COMPONENT, MIGRATIONS

        component, migrations = COMPONENT, MIGRATIONS
    where = display_url(url) + (f" (schema {schema})" if schema else "")
    kwargs: dict[str, Any] = {"connect_timeout": max(2, round(timeout)), "autocommit": True}
    if schema:
        kwargs["options"] = f"-c search_path={schema}"
    newest = max(m.version for m in migrations)
    try:
        async with asyncio.timeout(timeout + 1):
            conn = await psycopg.AsyncConnection.connect(url, **kwargs)
    except (psycopg.Error, TimeoutError) as exc:
        return CheckResult(check, label, "fail", f"{where}: unreachable: {_reason(exc)}")
    try:
        cursor = await conn.execute(
            "SELECT max(version) FROM sidecar_migrations WHERE component = %s", (component,)
        )
        row = await cursor.fetchone()
    except errors.UndefinedTable:
        return CheckResult(
            check,
            label,
            "fail",
            f"{where}: reachable but not migrated (no sidecar_migrations table); "
            "run `sidecar migrate` or start the sidecar once",
        )
    except psycopg.Error as exc:
        return CheckResult(check, label, "fail", f"{where}: {_reason(exc)}")
    finally:
        await conn.close()
    version = row[0] if row is not None and row[0] is not None else 0
    if version < newest:
        return CheckResult(
            check,
            label,
            "fail",
            f"{where}: schema at version {version}, this sidecar needs {newest}; "
            "run `sidecar migrate`",
        )
    if version > newest:
        return CheckResult(
            check,
            label,
            "fail",
            f"{where}: schema version {version} is newer than this sidecar ({newest}); upgrade it",
        )
    return CheckResult(check, label, "pass", f"{where}: reachable, migrated (version {version})")


# -- tracing export ------------------------------------------------------------------------------


def _otlp_headers(env: Mapping[str, str]) -> dict[str, str]:
    raw = env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS")
    headers: dict[str, str] = {}
    for item in (raw or "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            headers[unquote(key.strip())] = unquote(value.strip())
    return headers


async def check_otlp(env: Mapping[str, str], timeout: float) -> CheckResult:
    import aiohttp

    label = "otlp"
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return CheckResult("otlp", label, "warn", "OTEL_SDK_DISABLED=true: no traces are exported")
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if "none" in exporters.split(","):
        return CheckResult(
            "otlp", label, "warn", "OTEL_TRACES_EXPORTER=none: no traces are exported"
        )
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if traces:
        endpoint, source = traces, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    elif base:
        endpoint, source = base.rstrip("/") + "/v1/traces", "OTEL_EXPORTER_OTLP_ENDPOINT"
    elif "otlp" in exporters.split(","):
        endpoint, source = "http://localhost:4318/v1/traces", "the OTLP default"
    else:
        return CheckResult(
            "otlp",
            label,
            "warn",
            "OTEL_EXPORTER_OTLP_ENDPOINT is not set: traces are not exported "
            "(set it to the collector, e.g. http://jaeger:4318)",
        )
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    parts = urlsplit(endpoint if "://" in endpoint else "http://" + endpoint)
    if protocol == "grpc":
        port = parts.port or 4317
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(parts.hostname, port)
            writer.close()
        except (OSError, TimeoutError) as exc:
            return CheckResult(
                "otlp", label, "fail", f"{endpoint} ({source}, gRPC): unreachable: {_reason(exc)}"
            )
        return CheckResult(
            "otlp",
            label,
            "pass",
            f"{endpoint} ({source}, gRPC): accepts connections (test exports are sent over "
            "http/protobuf only)",
        )
    headers = {"Content-Type": "application/x-protobuf", **_otlp_headers(env)}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            # An empty ExportTraceServiceRequest serialises to zero bytes.
            session.post(endpoint, data=b"", headers=headers, allow_redirects=False) as resp,
        ):
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return CheckResult(
            "otlp",
            label,
            "fail",
            f"{endpoint} ({source}): unreachable: {_reason(exc)}; spans will be dropped "
            "(requests are not affected)",
        )
    if 200 <= status < 300:
        return CheckResult(
            "otlp", label, "pass", f"{endpoint} ({source}): accepted a test export (HTTP {status})"
        )
    hint = " (is this the OTLP/HTTP port, usually 4318?)" if status in (404, 405) else ""
    return CheckResult(
        "otlp", label, "fail", f"{endpoint} ({source}): refused a test export: HTTP {status}{hint}"
    )


# -- tokens --------------------------------------------------------------------------------------


def check_tokens(admin_host: str, env: Mapping[str, str]) -> CheckResult:
    from sidecar.app import _is_loopback

    names = ("SIDECAR_ADMIN_TOKEN", "SIDECAR_REVIEWER_TOKEN", "SIDECAR_APP_TOKEN")
    present = [n for n in names if env.get(n)]
    if _is_loopback(admin_host):
        have = ", ".join(present) if present else "none"
        return CheckResult(
            "tokens",
            "tokens",
            "pass",
            f"admin listener on {admin_host} (loopback only): tokens optional (set: {have})",
        )
    missing = [n for n in names[:2] if not env.get(n)]
    if missing:
        return CheckResult(
            "tokens",
            "tokens",
            "fail",
            f"admin listener on {admin_host} is not loopback-only and {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: those routes answer 403 to everyone",
        )
    notes = []
    if not env.get("SIDECAR_APP_TOKEN"):
        notes.append("SIDECAR_APP_TOKEN is not set: POST /feedback answers 403")
    short = [n for n in present if len(env[n]) < 16]
    if short:
        notes.append(f"shorter than 16 characters: {', '.join(short)}")
    if notes:
        return CheckResult(
            "tokens", "tokens", "warn", f"admin listener on {admin_host}: " + "; ".join(notes)
        )
    return CheckResult(
        "tokens", "tokens", "pass", f"admin listener on {admin_host}: admin and reviewer tokens set"
    )


# -- the running sidecar -------------------------------------------------------------------------


def policy_differences(file: Any, running: Any, path: str = "") -> list[str]:
    """Field paths where two JSON-shaped policies differ, each with both values."""
    if isinstance(file, dict) and isinstance(running, dict):
        out: list[str] = []
        for key in [*file, *(k for k in running if k not in file)]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in running:
                out.append(f"{sub}: in the file only ({json.dumps(file[key])})")
            elif key not in file:
                out.append(f"{sub}: in the running sidecar only ({json.dumps(running[key])})")
            else:
                out += policy_differences(file[key], running[key], sub)
        return out
    if isinstance(file, list) and isinstance(running, list):
        if len(file) != len(running):
            return [f"{path}: {len(file)} items in the file, {len(running)} running"]
        out = []
        for i, (a, b) in enumerate(zip(file, running, strict=True)):
            out += policy_differences(a, b, f"{path}[{i}]")
        return out
    if file != running:
        return [f"{path}: file {json.dumps(file)}, running {json.dumps(running)}"]
    return []


@dataclass
class RunningSidecar:
    """What `GET /admin/policy` said: the policy and the answer's `Date` against our clock."""

    result: CheckResult
    date: float | None = None
    received_at: float | None = None


async def check_running(
    admin_url: str, loaded: LoadedPolicy | None, policy_path: Path, env: Mapping[str, str]
) -> RunningSidecar:
    import aiohttp

    from sidecar.server.admin import _redact

    label = "effective policy"
    token = env.get("SIDECAR_ADMIN_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(
                admin_url + "/admin/policy", headers=headers, allow_redirects=False
            ) as resp,
        ):
            received_at = time.time()
            status = resp.status
            body = await resp.text()
            date_header = resp.headers.get("Date")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return RunningSidecar(
            CheckResult("effective_policy", label, "fail", f"{admin_url}: {_reason(exc)}")
        )
    date = None
    if date_header:
        try:
            date = email.utils.parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError):
            date = None
    running = RunningSidecar(CheckResult("effective_policy", label, "pass", ""), date, received_at)
    if status != 200:
        hint = " (set SIDECAR_ADMIN_TOKEN to the sidecar's)" if status in (401, 403) else ""
        running.result = CheckResult(
            "effective_policy",
            label,
            "fail",
            f"{admin_url}/admin/policy: HTTP {status}{hint}",
        )
        return running
    if loaded is None:
        running.result = CheckResult(
            "effective_policy",
            label,
            "fail",
            f"cannot compare: {policy_path} is invalid (see `policy`)",
        )
        return running
    try:
        data = json.loads(body)
        live = dict(data["policy"])
        source = data.get("source")
    except (ValueError, KeyError, TypeError):
        running.result = CheckResult(
            "effective_policy", label, "fail", f"{admin_url}/admin/policy: not a policy document"
        )
        return running
    mine = _redact(loaded.policy.model_dump(mode="json", by_alias=True))
    # Listener addresses come from flags and the environment of that process, not the file.
    mine.pop("server", None)
    live.pop("server", None)
    diffs = policy_differences(mine, live)
    if diffs:
        shown = diffs[:_MAX_DIFFS]
        if len(diffs) > _MAX_DIFFS:
            shown.append(f"... and {len(diffs) - _MAX_DIFFS} more")
        running.result = CheckResult(
            "effective_policy",
            label,
            "fail",
            f"the sidecar at {admin_url} runs a different policy ({source}) than {policy_path}: "
            f"{len(diffs)} difference{'s' if len(diffs) != 1 else ''} (a reload failed? "
            "see sidecar logs for policy_reload_failed; SIGHUP reloads)",
            tuple(shown),
        )
        return running
    running.result = CheckResult(
        "effective_policy",
        label,
        "pass",
        f"the sidecar at {admin_url} runs {policy_path} as written (source {source}; "
        "listeners not compared)",
    )
    return running


# -- clock and parser ----------------------------------------------------------------------------


def build_time() -> dt.datetime:
    """When this sidecar was built or installed: its package's file time, never before the floor."""
    import sidecar

    try:
        stamp = dt.datetime.fromtimestamp(Path(sidecar.__file__).stat().st_mtime, tz=dt.UTC)
    except (OSError, TypeError):
        return _BUILD_FLOOR
    return max(stamp, _BUILD_FLOOR)


async def check_clock(running: RunningSidecar | None) -> CheckResult:
    first = time.monotonic()
    await asyncio.sleep(0.01)
    second = time.monotonic()
    if second <= first:
        return CheckResult(
            "clock", "clock", "fail", f"the monotonic clock did not advance ({first} → {second})"
        )
    now = dt.datetime.now(dt.UTC)
    built = build_time()
    if now < built:
        return CheckResult(
            "clock",
            "clock",
            "fail",
            f"the wall clock ({now:%Y-%m-%d %H:%M:%SZ}) is before this build "
            f"({built:%Y-%m-%d %H:%M:%SZ}): fix the system time (NTP)",
        )
    message = f"monotonic clock advances; wall clock {now:%Y-%m-%d %H:%M:%SZ} is after the build"
    if running is not None and running.date is not None and running.received_at is not None:
        # The Date header is truncated to the second: up to 1 s behind by construction.
        skew = running.received_at - running.date
        if skew < -_MAX_SKEW or skew > _MAX_SKEW + 1:
            return CheckResult(
                "clock",
                "clock",
                "warn",
                f"{message}, but the sidecar's Date header is {abs(skew):.1f}s "
                f"{'behind' if skew > 0 else 'ahead of'} this clock (traces and review ages "
                "will not line up)",
            )
        message += f"; the sidecar's clock agrees (Date header within {max(0.0, skew):.1f}s)"
    return CheckResult("clock", "clock", "pass", message)


def check_parser(env: Mapping[str, str]) -> CheckResult:
    import aiohttp

    from sidecar.app import c_parser_loaded

    version = aiohttp.__version__
    if c_parser_loaded():
        return CheckResult(
            "http_parser", "http parser", "pass", f"aiohttp {version}: C HTTP parser loaded"
        )
    why = (
        "AIOHTTP_NO_EXTENSIONS is set"
        if env.get("AIOHTTP_NO_EXTENSIONS")
        else "no C extensions for this platform"
    )
    return CheckResult(
        "http_parser",
        "http parser",
        "warn",
        f"aiohttp {version} fell back to its pure-Python HTTP parser ({why}), which has a record "
        "of request-smuggling bugs; `sidecar run` refuses it without --allow-pure-python-parser",
    )


# -- all of it -----------------------------------------------------------------------------------


@dataclass
class Doctor:
    policy_path: Path
    admin_url: str | None = None
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    timeout: float = 3.0

    async def run(self) -> list[CheckResult]:
        # Imported now, not inside the concurrent checks: a first import blocks the event loop
        # and would show up as connect time.
        import aiohttp  # noqa: F401

        import sidecar.app  # noqa: F401
        from sidecar.policy.reviews import review_settings
        from sidecar.policy.schema import ReviewsPolicy
        from sidecar.review.settings import ReviewSettingsError, state_dir_from_env

        env = self.env
        results: list[CheckResult] = []
        policy_result, loaded = check_policy(self.policy_path, env)
        results.append(policy_result)
        pending: list[Awaitable[CheckResult]] = []
        if loaded is not None:
            policy = loaded.policy
            for name, upstream in policy.upstreams.items():
                path = probe_path(policy, name)
                pending.append(check_upstream(name, upstream.url, path, self.timeout))
        state_dir = state_dir_from_env(env)
        stores: list[Awaitable[CheckResult]] = []
        reviews = loaded.policy.reviews if loaded is not None else ReviewsPolicy()
        try:
            settings = review_settings(reviews, env)
        except ReviewSettingsError:
            settings = None  # reported by the policy check
        if settings is not None and settings.backend == "postgres" and settings.database_url:
            stores.append(
                check_postgres(settings.database_url, settings.database_schema, self.timeout)
            )
        else:
            from sidecar.review.sqlite import DB_NAME as REVIEWS_DB

            stores.append(check_sqlite("review_store", "review store", state_dir / REVIEWS_DB))
        from sidecar.failures.sqlite import DB_NAME as FAILURES_DB

        stores.append(check_sqlite("failure_store", "failure store", state_dir / FAILURES_DB))
        running_task = None
        if self.admin_url:
            url = self.admin_url if "://" in self.admin_url else "http://" + self.admin_url
            running_task = check_running(url.rstrip("/"), loaded, self.policy_path, env)
        gathered = await asyncio.gather(
            asyncio.gather(*pending),
            asyncio.gather(*stores),
            check_otlp(env, self.timeout),
            running_task if running_task is not None else _none(),
        )
        upstreams, store_results, otlp, running = gathered
        results += upstreams
        results.append(check_state_dir(state_dir))
        results += store_results
        results.append(otlp)
        if loaded is not None:
            results.append(check_tokens(loaded.policy.server.admin_host, env))
        if running is not None:
            results.append(running.result)
        results.append(await check_clock(running))
        results.append(check_parser(env))
        return results


async def _none() -> None:
    return None


# -- the command ---------------------------------------------------------------------------------


def add_doctor_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "doctor", help="check the set-up: policy, upstreams, stores, tracing, tokens, clock"
    )
    p.add_argument(
        "--policy", help="policy file (env SIDECAR_POLICY, default policies/default.yaml)"
    )
    p.add_argument(
        "--admin-url",
        help="a running sidecar's admin listener: compare its effective policy and clock",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def format_results(results: Sequence[CheckResult]) -> str:
    width = max((len(r.name) for r in results), default=0)
    lines = []
    for r in results:
        lines.append(f"{r.status.upper():<4}  {r.name:<{width}}  {r.message}")
        lines.extend(f"{'':<4}  {'':<{width}}    {detail}" for detail in r.details)
    counts = {s: sum(1 for r in results if r.status == s) for s in ("pass", "warn", "fail")}
    lines.append(
        f"doctor: {counts['pass']} passed, {counts['warn']} warning"
        f"{'s' if counts['warn'] != 1 else ''}, {counts['fail']} failed"
    )
    return "\n".join(lines)


def run_doctor(args: argparse.Namespace) -> int:
    policy = args.policy or os.environ.get("SIDECAR_POLICY") or "policies/default.yaml"
    doctor = Doctor(Path(policy), admin_url=args.admin_url)
    results = asyncio.run(doctor.run())
    code = exit_code(results)
    if args.json:
        document = {
            "exit_code": code,
            "summary": {
                s: sum(1 for r in results if r.status == s) for s in ("pass", "warn", "fail")
            },
            "checks": [{**asdict(r), "details": list(r.details)} for r in results],
        }
        print(json.dumps(document, indent=2))
    else:
        print(format_results(results))
    sys.stdout.flush()
    return code
