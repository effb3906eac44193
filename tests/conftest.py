"""Shared fixtures: the real demo model and real `sidecar run` processes on loopback."""

from __future__ import annotations

import json
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.support.processes import RunningProcess, sidecar_cmd, start_process
from tests.support.upstreams import RecordingUpstream

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_model() -> Iterator[RunningProcess]:
    """One demo model for the whole session (tests reset its faults and stats)."""
    rp = start_process(sidecar_cmd("demo-model", "--port", "0"))
    rp.ready["url"] = "http://" + rp.ready["address"]
    try:
        yield rp
    finally:
        rp.stop()


@pytest.fixture
async def model_url(demo_model: RunningProcess) -> AsyncIterator[str]:
    url: str = demo_model.ready["url"]
    async with aiohttp.ClientSession() as session:
        await session.delete(f"{url}/_demo/faults")
        await session.post(f"{url}/_demo/release")
        await session.post(f"{url}/_demo/stats/reset")
    yield url
    async with aiohttp.ClientSession() as session:
        await session.delete(f"{url}/_demo/faults")
        await session.post(f"{url}/_demo/release")


class SidecarProc:
    def __init__(self, rp: RunningProcess) -> None:
        self.rp = rp
        self.url = "http://" + rp.ready["proxy"]
        self.admin_url = "http://" + rp.ready["admin"]


SidecarFactory = Callable[..., SidecarProc]


def write_policy(tmp_path: Path, policy: dict[str, Any] | str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    if isinstance(policy, str):
        path.write_text(textwrap.dedent(policy))
    else:
        path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def simple_policy(upstream: str, **route: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "default", "match": {"path_prefix": "/"}, "upstream": "model"}
    base.update(route)
    return {"upstreams": {"model": {"url": upstream}}, "routes": [base]}


@pytest.fixture
def start_sidecar(tmp_path: Path) -> Iterator[SidecarFactory]:
    """Start `sidecar run --port 0 --admin-port 0` with a policy (dict, YAML text or path)."""
    started: list[RunningProcess] = []

    def factory(
        policy: dict[str, Any] | str | Path,
        *args: str,
        env: dict[str, str] | None = None,
        ready: Any = None,
    ) -> SidecarProc:
        path = policy if isinstance(policy, Path) else write_policy(tmp_path, policy)
        full_env = {"SIDECAR_STATE_DIR": str(tmp_path / "state")}
        full_env.update(env or {})
        rp = start_process(
            sidecar_cmd("run", "--policy", str(path), "--port", "0", "--admin-port", "0", *args),
            env=full_env,
            ready=ready,
        )
        started.append(rp)
        return SidecarProc(rp)

    yield factory
    for rp in started:
        rp.stop()


@pytest.fixture(scope="session")
def postgres() -> str:
    """URL of the machine's PostgreSQL (`test` database); skips, or fails in CI, without it."""
    from tests.support.postgres import require_postgres

    return require_postgres()


@pytest.fixture
def pg_schema(postgres: str) -> Iterator[str]:
    """A fresh PostgreSQL schema for one test, dropped afterwards."""
    from tests.support.postgres import schema_for_test

    with schema_for_test(postgres) as schema:
        yield schema


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
    ) as session:
        yield session


@pytest.fixture
async def recording_upstream() -> AsyncIterator[RecordingUpstream]:
    up = await RecordingUpstream().start()
    yield up
    await up.stop()


@pytest.fixture
async def decoy() -> AsyncIterator[RecordingUpstream]:
    up = await RecordingUpstream().start()
    yield up
    await up.stop()


def dumps(data: Any) -> str:
    return json.dumps(data)
