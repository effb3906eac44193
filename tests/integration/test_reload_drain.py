"""Hot reload (including the ConfigMap `..data` symlink swap), graceful drain on SIGTERM with
traffic in flight, and the start-up check for aiohttp's C parser, all on the real `sidecar run`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.conftest import simple_policy
from tests.support.processes import sidecar_cmd, start_process

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


def configmap_dir(root: Path, policy: dict[str, Any], version: int) -> None:
    """Lay out a directory the way kubelet mounts a ConfigMap: `..data` → a timestamped dir."""
    target = root / f"..2026_{version:04d}"
    target.mkdir()
    (target / "policy.yaml").write_text(yaml.safe_dump(policy))
    tmp_link = root / "..data_tmp"
    if tmp_link.is_symlink():
        tmp_link.unlink()
    tmp_link.symlink_to(target.name)
    os.replace(tmp_link, root / "..data")  # atomic swap, as kubelet does
    link = root / "policy.yaml"
    if not link.is_symlink():
        link.symlink_to("..data/policy.yaml")


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_configmap_swap_reloads_and_invalid_keeps_old(model_url: str, tmp_path: Path) -> None:
    root = tmp_path / "cm"
    root.mkdir()
    first = simple_policy(model_url, match={"path_prefix": "/v1"})
    configmap_dir(root, first, 1)
    rp = start_process(
        sidecar_cmd(
            "run", "--policy", str(root / "policy.yaml"), "--port", "0", "--admin-port", "0"
        ),
        env={"SIDECAR_RELOAD_INTERVAL": "100ms"},
    )
    try:
        url = "http://" + rp.ready["proxy"]
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/echo/a") as resp:
                assert resp.status == 404  # not routed by the first policy
            # A valid new policy: the route now covers everything.
            configmap_dir(root, simple_policy(model_url, match={"path_prefix": "/"}), 2)

            async def routed() -> bool:
                async with http.get(url + "/echo/a") as resp:
                    return resp.status == 200

            await wait_for(routed)
            rp.wait_for_log(lambda r: r.get("event") == "policy_reloaded")
            # An invalid one is logged and the previous policy keeps serving.
            bad = simple_policy(model_url, match={"path_prefix": "/"})
            bad["routes"][0]["retry"] = {"max_attempts": 0}
            configmap_dir(root, bad, 3)
            failed = rp.wait_for_log(lambda r: r.get("event") == "policy_reload_failed")
            assert any("routes[0].retry.max_attempts" in e for e in failed["errors"])
            async with http.get(url + "/echo/a") as resp:
                assert resp.status == 200
    finally:
        rp.stop()


async def test_sigterm_drains_in_flight_requests(model_url: str, tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(simple_policy(model_url)))
    rp = start_process(
        sidecar_cmd("run", "--policy", str(path), "--port", "0", "--admin-port", "0"),
        env={"SIDECAR_DRAIN_DELAY": "300ms", "SIDECAR_DRAIN_GRACE": "10s"},
    )
    url, admin = "http://" + rp.ready["proxy"], "http://" + rp.ready["admin"]
    try:
        async with aiohttp.ClientSession() as http:

            async def one() -> int:
                async with http.post(
                    url + "/v1/chat/completions", json=CHAT, headers={"x-demo-fault": "latency=1s"}
                ) as resp:
                    await resp.read()
                    return resp.status

            tasks = [asyncio.create_task(one()) for _ in range(5)]

            async def all_in_flight() -> bool:
                async with http.get(model_url + "/_demo/stats") as r:
                    return int((await r.json())["in_flight"]) >= 5

            await wait_for(all_in_flight)
            os.killpg(rp.pid, signal.SIGTERM)
            rp.wait_for_log(lambda r: r.get("event") == "draining")
            async with http.get(admin + "/readyz") as resp:
                assert resp.status == 503
            statuses = await asyncio.gather(*tasks)
        assert statuses == [200] * 5
        assert rp.proc.wait(15) == 0
    finally:
        rp.stop()


async def test_stream_outliving_grace_is_ended_visibly(model_url: str, tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(simple_policy(model_url)))
    rp = start_process(
        sidecar_cmd("run", "--policy", str(path), "--port", "0", "--admin-port", "0"),
        env={"SIDECAR_DRAIN_GRACE": "500ms"},
    )
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                "http://" + rp.ready["proxy"] + "/v1/chat/completions",
                json={**CHAT, "stream": True},
                headers={"x-demo-fault": "hold_after_first"},
            ) as resp:
                first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
                assert first.startswith(b"data: ")
                os.killpg(rp.pid, signal.SIGTERM)
                rest = await asyncio.wait_for(resp.content.read(), 15)
        assert b"event: error" in rest
        assert b"shutting down" in rest
        assert b"[DONE]" not in rest
        assert rp.proc.wait(15) == 0
    finally:
        rp.stop()


def test_refuses_pure_python_parser_unless_allowed(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(simple_policy("http://127.0.0.1:9")))
    env = {**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"}
    cmd = sidecar_cmd("run", "--policy", str(path), "--port", "0", "--admin-port", "0")
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 2
    assert "C HTTP parser" in refused.stderr
    assert "--allow-pure-python-parser" in refused.stderr
    rp = start_process([*cmd, "--allow-pure-python-parser"], env={"AIOHTTP_NO_EXTENSIONS": "1"})
    rp.stop()
