"""The command line: validate, schema, and flag > env > file precedence on a real `sidecar run`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import aiohttp

from tests.conftest import REPO, write_policy
from tests.support.processes import sidecar_cmd, start_process


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(sidecar_cmd(*args), capture_output=True, text=True, timeout=60, cwd=REPO)


def test_validate_ok_and_errors(tmp_path: Path) -> None:
    good = run_cli("validate", "policies/default.yaml")
    assert good.returncode == 0, good.stdout + good.stderr
    bad = write_policy(
        tmp_path,
        """
        upstreams: {model: {url: http://127.0.0.1:1}}
        routes:
          - name: r
            upstream: model
            timeouts: {total: 1s, attempt: 5s}
            retry: {max_attempts: 0, surprise: 1}
        """,
    )
    result = run_cli("validate", "policies/default.yaml", str(bad))
    assert result.returncode == 2
    out = result.stdout
    assert f"{bad}: routes[0].retry.max_attempts: Input should be greater than or equal to 1" in out
    assert f"{bad}: routes[0].retry.surprise: unknown field" in out
    missing = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2


def test_validate_reports_contradictions(tmp_path: Path) -> None:
    bad = write_policy(
        tmp_path,
        """
        upstreams: {model: {url: http://127.0.0.1:1}}
        routes: [{name: r, timeouts: {total: 1s, attempt: 5s}}]
        """,
    )
    result = run_cli("validate", str(bad))
    assert result.returncode == 2
    assert "routes[0].timeouts.attempt: 5s is longer than the deadline" in result.stdout


def test_schema_is_json_schema() -> None:
    result = run_cli("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["title"] == "Sidecar policy"
    assert {"upstreams", "routes"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_run_refuses_invalid_policy(tmp_path: Path) -> None:
    bad = write_policy(tmp_path, "upstreams: {}\nroutes: []\n")
    proc = subprocess.run(
        sidecar_cmd("run", "--policy", str(bad), "--port", "0", "--admin-port", "0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "routes: at least one route is required" in proc.stderr


async def test_event_loop_choice_is_named_and_checked(model_url: str, tmp_path: Path) -> None:
    policy = write_policy(
        tmp_path, f'upstreams: {{model: {{url: "{model_url}"}}}}\nroutes: [{{name: all}}]\n'
    )
    args = ("run", "--policy", str(policy), "--port", "0", "--admin-port", "0")
    for choice in ("asyncio", "uvloop"):
        rp = start_process(sidecar_cmd(*args), env={"SIDECAR_EVENT_LOOP": choice})
        try:
            assert rp.ready["event_loop"] == choice
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://{rp.ready['proxy']}/echo/x") as resp:
                    assert resp.status == 200
        finally:
            rp.stop()


def test_an_unknown_event_loop_is_refused(tmp_path: Path) -> None:
    policy = write_policy(
        tmp_path, 'upstreams: {model: {url: "http://127.0.0.1:9"}}\nroutes: [{name: all}]\n'
    )
    proc = subprocess.run(
        sidecar_cmd("run", "--policy", str(policy), "--port", "0", "--admin-port", "0"),
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"SIDECAR_EVENT_LOOP": "trio"},
    )
    assert proc.returncode == 2
    assert "SIDECAR_EVENT_LOOP must be auto, uvloop or asyncio, not 'trio'" in proc.stderr


async def test_flags_beat_env_beat_file(model_url: str, tmp_path: Path) -> None:
    policy = write_policy(
        tmp_path,
        """
        server: {host: 127.0.0.1, port: 1, admin_port: 2}
        upstreams: {model: {url: "http://127.0.0.1:9"}}
        routes: [{name: all}]
        """,
    )
    env = {
        "SIDECAR_POLICY": str(policy),
        "SIDECAR_UPSTREAM_URL": "http://127.0.0.1:10",  # env beats the file's URL ...
        "SIDECAR_PORT": "0",  # ... and the file's port
        "SIDECAR_ADMIN_PORT": "3",
    }
    # ... and flags beat env: --upstream points at the real model, --admin-port 0.
    rp = start_process(sidecar_cmd("run", "--upstream", model_url, "--admin-port", "0"), env=env)
    try:
        proxy, admin = rp.ready["proxy"], rp.ready["admin"]
        assert not proxy.endswith(":1") and not admin.endswith(":3")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{proxy}/echo/x") as resp:
                assert resp.status == 200
            async with http.get(f"http://{admin}/admin/policy") as resp:
                effective = await resp.json()
        assert effective["policy"]["upstreams"]["model"]["url"] == model_url
    finally:
        rp.stop()
    # Env alone (no flag) points the upstream at a closed port: the request fails as connect_error.
    rp = start_process(sidecar_cmd("run"), env=env | {"SIDECAR_ADMIN_PORT": "0"})
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{rp.ready['proxy']}/echo/x") as resp:
                assert resp.status == 502
                assert resp.headers["x-sidecar-failure-mode"] == "connect_error"
    finally:
        rp.stop()


async def test_admin_health_ready_and_token(model_url: str, tmp_path: Path) -> None:
    policy = write_policy(
        tmp_path, f"upstreams: {{model: {{url: '{model_url}'}}}}\nroutes: [{{name: all}}]\n"
    )
    rp = start_process(
        sidecar_cmd("run", "--policy", str(policy), "--port", "0", "--admin-port", "0"),
        env={"SIDECAR_ADMIN_TOKEN": "s3cret"},
    )
    try:
        admin = "http://" + rp.ready["admin"]
        async with aiohttp.ClientSession() as http:
            async with http.get(admin + "/healthz") as resp:
                assert resp.status == 200
            async with http.get(admin + "/readyz") as resp:
                assert resp.status == 200
            async with http.get(admin + "/admin/policy") as resp:
                assert resp.status == 401
            async with http.get(
                admin + "/admin/policy", headers={"Authorization": "Bearer wrong"}
            ) as resp:
                assert resp.status == 401
            async with http.get(
                admin + "/admin/policy", headers={"Authorization": "Bearer s3cret"}
            ) as resp:
                assert resp.status == 200
                assert "s3cret" not in await resp.text()
    finally:
        rp.stop()


def test_every_subcommand_is_wired() -> None:
    """Each subcommand the parser offers has a handler (its --help works and it dispatches)."""
    from sidecar.cli import _COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(_COMMANDS)  # type: ignore[attr-defined]


def test_inject_through_the_cli(tmp_path: Path) -> None:
    manifest = tmp_path / "app.yaml"
    manifest.write_text(
        """
apiVersion: apps/v1
kind: Deployment
metadata: {name: m}
spec:
  selector: {matchLabels: {app: m}}
  template:
    metadata: {labels: {app: m}}
    spec:
      containers: [{name: model, image: model:1, ports: [{containerPort: 8080}]}]
"""
    )
    result = run_cli("inject", str(manifest))
    assert result.returncode == 0, result.stderr
    assert "sidecar" in result.stdout and "restartPolicy: Always" in result.stdout
