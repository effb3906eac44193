"""Every fenced shell block in the README is either run here or marked as not runnable here, with
the reason, by an HTML comment on the line before it:

    <!-- not-run: needs a Docker engine -->        never run (the reason is required)
    <!-- doc-test: background -->                  started, must log its `listening` line, stopped

Unmarked blocks run in bash against a real demo model and sidecar started for this test on free
ports; the documented default addresses (127.0.0.1:8700, :8701, :8080) are rewritten to them.
A block that fails, or an unmarked block this test cannot run, fails the test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.processes import RunningProcess, sidecar_cmd, start_process

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SHELL_LANGS = {"sh", "bash", "shell", "console"}
_FENCE = re.compile(r"^```([A-Za-z0-9_-]*)\s*$")
_MARK = re.compile(r"^<!--\s*(not-run|doc-test)\s*:?\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    line: int
    lang: str
    code: str
    mark: str | None
    reason: str


def shell_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        lang = fence.group(1).lower()
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if lang not in SHELL_LANGS:
            continue
        mark = reason = ""
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0 and (m := _MARK.match(lines[j].strip())):
            mark, reason = m.group(1), m.group(2)
        blocks.append(Block(start + 1, lang, "\n".join(body) + "\n", mark or None, reason))
    return blocks


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    state = tmp_path_factory.mktemp("state")
    model = start_process(sidecar_cmd("demo-model", "--port", "0"))
    sidecar: RunningProcess | None = None
    try:
        sidecar = start_process(
            sidecar_cmd(
                "run",
                "--policy",
                str(REPO / "policies" / "default.yaml"),
                "--upstream",
                "http://" + model.ready["address"],
                "--port",
                "0",
                "--admin-port",
                "0",
            ),
            env={"SIDECAR_STATE_DIR": str(state)},
        )
        yield {
            "8700": sidecar.ready["proxy"].rsplit(":", 1)[1],
            "8701": sidecar.ready["admin"].rsplit(":", 1)[1],
            "8080": model.ready["address"].rsplit(":", 1)[1],
        }
    finally:
        if sidecar is not None:
            sidecar.stop()
        model.stop()


def rewrite(code: str, ports: dict[str, str]) -> str:
    for default, real in ports.items():
        code = re.sub(rf"(127\.0\.0\.1|localhost):{default}\b", rf"127.0.0.1:{real}", code)
        code = re.sub(rf"--port {default}\b", "--port 0", code)
    return code


def test_readme_has_shell_blocks_and_every_mark_has_a_reason() -> None:
    blocks = shell_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "the README has no shell blocks"
    for block in blocks:
        if block.mark == "not-run":
            assert len(block.reason) >= 10, f"README line {block.line}: say why it is not run"
        if block.mark == "doc-test":
            assert block.reason == "background", f"README line {block.line}: unknown doc-test mark"


def test_every_unmarked_shell_block_runs(services: dict[str, str], tmp_path: Path) -> None:
    blocks = shell_blocks(README.read_text(encoding="utf-8"))
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["SIDECAR_STATE_DIR"] = str(tmp_path / "state")
    env["SIDECAR_LOG_FORMAT"] = "json"
    (tmp_path / "policies").symlink_to(REPO / "policies")
    (tmp_path / "examples").symlink_to(REPO / "examples")
    ran = 0
    for block in blocks:
        if block.mark == "not-run":
            continue
        code = rewrite(block.code, services)
        if block.mark == "doc-test":
            # A long-running command: it must come up (log `listening`), then it is stopped.
            bg_env = {**env, "SIDECAR_PORT": "0", "SIDECAR_ADMIN_PORT": "0"}
            rp = start_process(["bash", "-c", code], env=bg_env, cwd=str(tmp_path))
            rp.stop()
            ran += 1
            continue
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (
            f"README block at line {block.line} failed ({result.returncode}):\n{code}\n"
            f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-2000:]}"
        )
        ran += 1
    assert ran >= 3
