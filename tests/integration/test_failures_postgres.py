"""Replicas that share a PostgreSQL review queue also share the failure store: a failure seen by a
real `sidecar run` lands in PostgreSQL and `sidecar failures report` reads it from there."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

import aiohttp
import pytest

from tests.conftest import SidecarFactory, simple_policy
from tests.support.processes import sidecar_cmd


@pytest.mark.timeout(60)
async def test_failures_go_to_the_shared_postgres_store(
    model_url: str,
    start_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    postgres: str,
    pg_schema: str,
) -> None:
    env = {"SIDECAR_DATABASE_URL": postgres, "SIDECAR_DATABASE_SCHEMA": pg_schema}
    sc = start_sidecar(simple_policy(model_url, retry={"max_attempts": 1}), env=env)
    async with http.post(
        sc.url + "/v1/chat/completions",
        json={"model": "demo", "messages": []},
        headers={"x-demo-fault": "status=500", "x-request-id": "pg-failure-1"},
    ) as resp:
        assert resp.status == 500
    sc.rp.stop()  # flushes the capture queue on the way out
    deadline = time.monotonic() + 20
    while True:
        report = await asyncio.to_thread(
            subprocess.run,
            sidecar_cmd("failures", "report", "--since", "1h", "--json"),
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        )
        assert report.returncode == 0, report.stderr
        if "upstream_5xx" in report.stdout or time.monotonic() > deadline:
            break
    data = json.loads(report.stdout)
    assert "upstream_5xx" in json.dumps(data)
