"""`sidecar doctor` against real things on loopback: each check failing on purpose (bad policy,
a closed port, a port that is not HTTP, an unusable state directory, corrupt SQLite files, an
unreachable or unmigrated PostgreSQL, an unreachable OTLP endpoint, a non-loopback admin listener
without tokens, a running sidecar with another policy, aiohttp's pure-Python parser) with a clear
message and the right exit code, and a healthy set-up (demo model, a real OTLP receiver, a running
sidecar) exiting 0 with every line passing, as text and as `--json`.

Most cases run the checks in-process (`Doctor(...).run()`, what the command runs, with an explicit
environment); the command itself runs as a subprocess where its output and exit status matter.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.doctor import CheckResult, Doctor, check_postgres, exit_code
from tests.conftest import REPO, SidecarFactory, write_policy
from tests.support.otlp import OtlpReceiver
from tests.support.processes import sidecar_cmd

pytestmark = pytest.mark.timeout(60)

ADMIN_TOKEN = "admin-token-0123456789"
REVIEWER_TOKEN = "reviewer-token-0123456789"
APP_TOKEN = "app-token-0123456789"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def policy(model_url: str, **extra: Any) -> dict[str, Any]:
    """Two routes on the demo model; the KServe route makes the probe `/v2/health/ready`."""
    data: dict[str, Any] = {
        "upstreams": {"model": {"url": model_url}},
        "routes": [
            {"name": "fraud", "match": {"path_prefix": "/v2/models/fraud"}, "upstream": "model"},
            {"name": "default", "match": {"path_prefix": "/"}, "upstream": "model"},
        ],
    }
    data.update(extra)
    return data


@pytest.fixture
async def otlp() -> AsyncIterator[OtlpReceiver]:
    receiver = await OtlpReceiver().start()
    yield receiver
    await receiver.stop()


def base_env(tmp_path: Path, otlp: OtlpReceiver | None = None, **extra: str) -> dict[str, str]:
    env = {"SIDECAR_STATE_DIR": str(tmp_path / "state")}
    if otlp is not None:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp.endpoint
    env.update(extra)
    return env


async def doctor(
    path: Path, env: dict[str, str], admin_url: str | None = None
) -> tuple[int, dict[str, CheckResult]]:
    results = await Doctor(path, admin_url=admin_url, env=env).run()
    return exit_code(results), {r.name: r for r in results}


def cli_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without anything the doctor reads, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "SIDECAR_")) and k != "AIOHTTP_NO_EXTENSIONS"
    }
    env.update(extra)
    return env


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *sidecar_cmd("doctor", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=cli_env(env),
        cwd=REPO,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 45)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


# -- healthy -------------------------------------------------------------------------------------


async def test_healthy_setup_passes_every_check(
    tmp_path: Path, model_url: str, otlp: OtlpReceiver, start_sidecar: SidecarFactory
) -> None:
    path = write_policy(tmp_path, policy(model_url), "healthy.yaml")
    tokens = {"SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN, "SIDECAR_REVIEWER_TOKEN": REVIEWER_TOKEN}
    sc = start_sidecar(path, env=tokens)
    env = base_env(tmp_path, otlp, **tokens)
    (code, text), (json_code, raw) = await asyncio.gather(
        run_cli("--policy", str(path), "--admin-url", sc.admin_url, env=env),
        run_cli("--policy", str(path), "--admin-url", sc.admin_url, "--json", env=env),
    )
    assert code == 0, text
    lines = text.strip().splitlines()
    checks = lines[:-1]
    assert all(line.startswith("PASS  ") for line in checks), text
    names = [line.split("  ")[1].strip() for line in checks]
    assert names[:2] == ["policy", "upstream model"]
    for name in ("state dir", "review store", "failure store", "otlp", "tokens"):
        assert name in names
    assert names[-3:] == ["effective policy", "clock", "http parser"]
    assert "GET /v2/health/ready → HTTP 200" in text
    assert (
        f"{otlp.endpoint}/v1/traces (OTEL_EXPORTER_OTLP_ENDPOINT): accepted a test export" in text
    )
    assert "runs " + str(path) + " as written" in text
    assert "the sidecar's clock agrees" in text
    assert lines[-1] == f"doctor: {len(checks)} passed, 0 warnings, 0 failed"
    # The test exports reached the receiver (the sidecar itself exports nowhere here).
    assert otlp.requests >= 2

    assert json_code == 0, raw
    document = json.loads(raw)
    assert document["exit_code"] == 0
    assert document["summary"] == {"pass": len(checks), "warn": 0, "fail": 0}
    assert [c["name"] for c in document["checks"]] == names
    assert {c["status"] for c in document["checks"]} == {"pass"}
    first = document["checks"][0]
    assert set(first) == {"check", "name", "status", "message", "details"}
    assert first["check"] == "policy" and first["details"] == []


# -- each check failing on purpose ---------------------------------------------------------------


async def test_invalid_policy_names_every_field_and_exits_2(tmp_path: Path, model_url: str) -> None:
    bad = policy(model_url)
    bad["routes"][0]["retry"] = {"max_attempts": 0, "surprise": 1}
    path = write_policy(tmp_path, bad, "bad.yaml")
    code, text = await run_cli("--policy", str(path), env=base_env(tmp_path))
    assert code == 2, text
    assert "FAIL  policy" in text
    assert f"{path}: invalid (2 problems; `sidecar run` would not start)" in text
    detail = [line.strip() for line in text.splitlines() if line.startswith(" ")]
    assert "routes[0].retry.max_attempts: Input should be greater than or equal to 1" in detail
    assert "routes[0].retry.surprise: unknown field" in detail
    # Checks that need no policy still ran.
    assert "PASS  state dir" in text
    assert text.strip().endswith("1 failed")


async def test_missing_policy_file(tmp_path: Path) -> None:
    code, results = await doctor(tmp_path / "nope.yaml", base_env(tmp_path))
    assert code == 2
    assert results["policy"].status == "fail"
    assert results["policy"].details[0].startswith("(file): cannot read")


async def test_closed_upstream_port_fails(tmp_path: Path, otlp: OtlpReceiver) -> None:
    port = closed_port()
    path = write_policy(tmp_path, policy(f"http://127.0.0.1:{port}"))
    code, results = await doctor(path, base_env(tmp_path, otlp))
    assert code == 2
    check = results["upstream model"]
    assert check.status == "fail"
    assert check.message == (
        f"http://127.0.0.1:{port}: no TCP connection to 127.0.0.1:{port}: connection refused"
    )


async def test_upstream_that_is_not_http_fails(tmp_path: Path) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-not-a-model-server\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        path = write_policy(tmp_path, policy(f"http://127.0.0.1:{port}"))
        code, results = await doctor(path, base_env(tmp_path))
    finally:
        server.close()
        await server.wait_closed()
    assert code == 2
    check = results["upstream model"]
    assert check.status == "fail"
    assert "TCP connects, but GET /v2/health/ready got no HTTP answer" in check.message


async def test_openai_routes_probe_v1_models(tmp_path: Path, model_url: str) -> None:
    data = policy(model_url)
    data["routes"] = [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "upstream": "model"}]
    path = write_policy(tmp_path, data)
    _, results = await doctor(path, base_env(tmp_path))
    assert results["upstream model"].status == "pass"
    assert "GET /v1/models → HTTP 200" in results["upstream model"].message


async def test_state_dir_that_is_a_file_fails(tmp_path: Path, model_url: str) -> None:
    path = write_policy(tmp_path, policy(model_url))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    code, results = await doctor(path, base_env(tmp_path, SIDECAR_STATE_DIR=str(blocker)))
    assert code == 2
    assert results["state dir"].status == "fail"
    assert results["state dir"].message == (
        f"{blocker} (SIDECAR_STATE_DIR) exists but is not a directory"
    )
    below = blocker / "state"
    code, results = await doctor(path, base_env(tmp_path, SIDECAR_STATE_DIR=str(below)))
    assert code == 2
    assert results["state dir"].message == (
        f"{below} (SIDECAR_STATE_DIR): cannot be created: {blocker} is a file"
    )


async def test_missing_state_dir_is_created_on_start(tmp_path: Path, model_url: str) -> None:
    path = write_policy(tmp_path, policy(model_url))
    fresh = tmp_path / "new" / "state"
    _, results = await doctor(path, base_env(tmp_path, SIDECAR_STATE_DIR=str(fresh)))
    assert results["state dir"].status == "pass"
    assert "does not exist yet; will be created on start" in results["state dir"].message
    assert results["review store"].status == "pass"
    assert "not created yet" in results["review store"].message
    assert not fresh.exists()  # the doctor changes nothing


async def test_corrupt_sqlite_files_fail(tmp_path: Path, model_url: str) -> None:
    path = write_policy(tmp_path, policy(model_url))
    state = tmp_path / "state"
    state.mkdir()
    (state / "reviews.db").write_bytes(b"this is not a database, it is a text file" * 100)
    (state / "failures.db").write_bytes(b"\x00garbage" * 1000)
    code, results = await doctor(path, base_env(tmp_path))
    assert code == 2
    for name, file in (("review store", "reviews.db"), ("failure store", "failures.db")):
        check = results[name]
        assert check.status == "fail", check
        assert check.message.startswith(f"{state / file}: cannot be opened as SQLite: ")
        assert "file is not a database" in check.message


async def test_postgres_unreachable_unmigrated_and_migrated(
    tmp_path: Path, model_url: str, postgres: str, pg_schema: str
) -> None:
    from sidecar.review.postgres import PostgresReviewStore

    path = write_policy(tmp_path, policy(model_url))
    port = closed_port()
    dead = f"postgresql://postgres:hunter2@127.0.0.1:{port}/test"
    code, results = await doctor(path, base_env(tmp_path, SIDECAR_DATABASE_URL=dead))
    check = results["review store"]
    assert code == 2 and check.status == "fail"
    assert check.message.startswith(f"postgresql://postgres@127.0.0.1:{port}/test: unreachable")
    assert "hunter2" not in check.message

    env = base_env(tmp_path, SIDECAR_DATABASE_URL=postgres, SIDECAR_DATABASE_SCHEMA=pg_schema)
    code, results = await doctor(path, env)
    check = results["review store"]
    assert check.status == "fail"
    assert "reachable but not migrated" in check.message
    assert "sidecar migrate" in check.message

    store = PostgresReviewStore(postgres, schema=pg_schema)
    try:
        await store.migrate()
    finally:
        await store.close()
    _, results = await doctor(path, env)
    check = results["review store"]
    assert check.status == "pass", check
    assert f"(schema {pg_schema}): reachable, migrated (version " in check.message

    # The same check for another component's migrations (the failure store's, sharing the
    # database): its own version is compared, not the review queue's.
    from sidecar.failures.postgres import COMPONENT, MIGRATIONS, PostgresFailureStore

    def failures_check() -> Any:
        return check_postgres(
            postgres,
            pg_schema,
            3.0,
            check="failure_store",
            label="failure store",
            component=COMPONENT,
            migrations=MIGRATIONS,
        )

    check = await failures_check()
    assert check.status == "fail"
    assert check.message.endswith(
        "schema at version 0, this sidecar needs "
        f"{max(m.version for m in MIGRATIONS)}; run `sidecar migrate`"
    )
    failures = PostgresFailureStore(postgres, schema=pg_schema)
    try:
        await failures.migrate()
    finally:
        await failures.close()
    assert (await failures_check()).status == "pass"


async def test_otlp_unreachable_fails_and_unset_warns(tmp_path: Path, model_url: str) -> None:
    path = write_policy(tmp_path, policy(model_url))
    port = closed_port()
    env = base_env(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}")
    code, results = await doctor(path, env)
    assert code == 2
    check = results["otlp"]
    assert check.status == "fail"
    assert check.message.startswith(
        f"http://127.0.0.1:{port}/v1/traces (OTEL_EXPORTER_OTLP_ENDPOINT): unreachable"
    )
    assert "requests are not affected" in check.message

    code, results = await doctor(path, base_env(tmp_path))
    assert code == 1
    assert results["otlp"].status == "warn"
    assert "OTEL_EXPORTER_OTLP_ENDPOINT is not set" in results["otlp"].message


async def test_otlp_endpoint_that_is_not_otlp_fails(
    tmp_path: Path, model_url: str, otlp: OtlpReceiver
) -> None:
    path = write_policy(tmp_path, policy(model_url))
    # The demo model answers HTTP, but not OTLP.
    env = base_env(tmp_path, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=model_url + "/v1/traces")
    code, results = await doctor(path, env)
    assert code == 2
    assert results["otlp"].status == "fail"
    assert "refused a test export: HTTP 404 (is this the OTLP/HTTP port" in results["otlp"].message
    # The signal-specific variable is used as it is.
    env = base_env(tmp_path, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=otlp.endpoint + "/v1/traces")
    _, results = await doctor(path, env)
    assert results["otlp"].status == "pass"


async def test_public_admin_listener_needs_tokens(
    tmp_path: Path, model_url: str, otlp: OtlpReceiver
) -> None:
    path = write_policy(tmp_path, policy(model_url, server={"admin_host": "0.0.0.0"}))
    code, results = await doctor(path, base_env(tmp_path, otlp))
    assert code == 2
    assert results["tokens"].status == "fail"
    assert results["tokens"].message == (
        "admin listener on 0.0.0.0 is not loopback-only and SIDECAR_ADMIN_TOKEN and "
        "SIDECAR_REVIEWER_TOKEN are not set: those routes answer 403 to everyone"
    )
    # The environment's override counts as `sidecar run` applies it.
    loopback = write_policy(tmp_path, policy(model_url), "loopback.yaml")
    env = base_env(tmp_path, otlp, SIDECAR_ADMIN_HOST="0.0.0.0", SIDECAR_ADMIN_TOKEN=ADMIN_TOKEN)
    code, results = await doctor(loopback, env)
    assert code == 2
    assert "SIDECAR_REVIEWER_TOKEN is not set" in results["tokens"].message
    # Both set: the missing app token only warns.
    env["SIDECAR_REVIEWER_TOKEN"] = REVIEWER_TOKEN
    code, results = await doctor(loopback, env)
    assert results["tokens"].status == "warn"
    assert "SIDECAR_APP_TOKEN is not set: POST /feedback answers 403" in results["tokens"].message
    assert code == 1, [r for r in results.values() if r.status != "pass"]
    env["SIDECAR_APP_TOKEN"] = APP_TOKEN
    code, results = await doctor(loopback, env)
    assert results["tokens"].status == "pass"
    assert code == 0


async def test_running_sidecar_with_another_policy_fails(
    tmp_path: Path, model_url: str, otlp: OtlpReceiver, start_sidecar: SidecarFactory
) -> None:
    running = policy(model_url)
    running["routes"][0]["retry"] = {"max_attempts": 3}
    sc = start_sidecar(
        write_policy(tmp_path, running, "running.yaml"),
        env={"SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    mine = policy(model_url)
    mine["routes"][0]["retry"] = {"max_attempts": 1}
    mine["routes"].append({"name": "extra", "match": {"path_prefix": "/x"}})
    path = write_policy(tmp_path, mine, "mine.yaml")

    code, results = await doctor(path, base_env(tmp_path, otlp), admin_url=sc.admin_url)
    assert code == 2
    check = results["effective policy"]
    assert check.status == "fail"
    assert check.message == (
        f"{sc.admin_url}/admin/policy: HTTP 401 (set SIDECAR_ADMIN_TOKEN to the sidecar's)"
    )

    env = base_env(tmp_path, otlp, SIDECAR_ADMIN_TOKEN=ADMIN_TOKEN)
    code, results = await doctor(path, env, admin_url=sc.admin_url)
    assert code == 2
    check = results["effective policy"]
    assert check.status == "fail"
    assert check.message.startswith(
        f"the sidecar at {sc.admin_url} runs a different policy ({tmp_path / 'running.yaml'}) "
        f"than {path}: 1 difference"
    )
    assert check.details == ("routes: 3 items in the file, 2 running",)

    mine["routes"].pop()
    write_policy(tmp_path, mine, "mine.yaml")
    code, results = await doctor(path, env, admin_url=sc.admin_url)
    check = results["effective policy"]
    assert check.details == ("routes[0].retry.max_attempts: file 1, running 3",)
    assert "1 difference " in check.message
    # The same file as the sidecar's: the check passes (and so does the clock comparison).
    code, results = await doctor(tmp_path / "running.yaml", env, admin_url=sc.admin_url)
    assert results["effective policy"].status == "pass"
    assert results["clock"].status == "pass"
    assert code == 0, [r for r in results.values() if r.status != "pass"]


async def test_unreachable_admin_url_fails(tmp_path: Path, model_url: str) -> None:
    path = write_policy(tmp_path, policy(model_url))
    url = f"http://127.0.0.1:{closed_port()}"
    code, results = await doctor(path, base_env(tmp_path), admin_url=url)
    assert code == 2
    assert results["effective policy"].status == "fail"
    assert results["effective policy"].message.startswith(url + ": ")


async def test_pure_python_parser_warns(tmp_path: Path, model_url: str, otlp: OtlpReceiver) -> None:
    path = write_policy(tmp_path, policy(model_url))
    env = base_env(tmp_path, otlp, AIOHTTP_NO_EXTENSIONS="1")
    code, text = await run_cli("--policy", str(path), env=env)
    assert code == 1, text
    warn = [line for line in text.splitlines() if line.startswith("WARN")]
    assert len(warn) == 1, text
    assert warn[0].startswith("WARN  http parser")
    assert "fell back to its pure-Python HTTP parser (AIOHTTP_NO_EXTENSIONS is set)" in warn[0]
    assert "--allow-pure-python-parser" in warn[0]
    assert text.strip().endswith("1 warning, 0 failed")
