"""Fixtures for the end-to-end tests: MLServer for real, from its own virtualenv.

The MLServer virtualenv is made once per session by `examples/fraud-mlserver/setup.sh` (a no-op
when it is already there; at most `SETUP_BUDGET` seconds otherwise), the example's model is
trained once into a temporary model repository, and each MLServer runs `serve.sh` in its own
process group on a free port and is always stopped. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.support.processes import RunningProcess, start_process

FRAUD_EXAMPLE = REPO / "examples" / "fraud-mlserver"
LLM_EXAMPLE = REPO / "examples" / "llm-openai"
#: Creating the MLServer virtualenv from PyPI takes one to two minutes here.
SETUP_BUDGET = 300.0
TRAIN_BUDGET = 180.0
#: MLServer imports a lot (FastAPI, gRPC, pandas): it takes seconds to come up.
START_BUDGET = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_bounded(
    args: Sequence[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command in its own process group; kill the whole group when it overruns."""
    proc = subprocess.Popen(
        list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(args)} took longer than {timeout:.0f}s:\n{out[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(list(args), proc.returncode, out, None)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="session")
def mlserver_venv() -> Path:
    """MLServer's own virtualenv, made by the example's setup.sh (idempotent)."""
    venv = Path(os.environ.get("MLSERVER_VENV", FRAUD_EXAMPLE / ".venv-mlserver"))
    done = run_bounded(
        ["bash", str(FRAUD_EXAMPLE / "setup.sh")], SETUP_BUDGET, env={"MLSERVER_VENV": str(venv)}
    )
    if done.returncode != 0:
        pytest.fail(f"examples/fraud-mlserver/setup.sh failed:\n{done.stdout[-4000:]}")
    return venv


@pytest.fixture(scope="session")
def fraud_root(mlserver_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the example's model repository with the model trained by train.py, plus the
    held-out set and the sample transactions (data/)."""
    root = tmp_path_factory.mktemp("fraud-example")
    shutil.copytree(
        FRAUD_EXAMPLE / "models", root / "models", ignore=shutil.ignore_patterns("*.joblib")
    )
    done = run_bounded(
        [
            str(mlserver_venv / "bin" / "python"),
            str(FRAUD_EXAMPLE / "train.py"),
            "--root",
            str(root),
        ],
        TRAIN_BUDGET,
    )
    if done.returncode != 0:
        pytest.fail(f"train.py failed:\n{done.stdout[-4000:]}")
    return root


@pytest.fixture(scope="session")
def fraud_samples(fraud_root: Path) -> dict[str, list[dict[str, Any]]]:
    samples: dict[str, list[dict[str, Any]]] = json.loads(
        (fraud_root / "data" / "samples.json").read_text()
    )
    return samples


@dataclass
class MLServer:
    """One MLServer started by the example's serve.sh; `kill()` and `start()` again on the same
    port play a crash and a restart."""

    venv: Path
    models: Path
    port: int = field(default_factory=free_port)
    rp: RunningProcess | None = None
    outputs: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MLServer:
        args = [
            "bash",
            str(FRAUD_EXAMPLE / "serve.sh"),
            "--http-port",
            str(self.port),
            "--models",
            str(self.models),
        ]
        self.rp = start_process(args, env={"MLSERVER_VENV": str(self.venv)}, ready=False)
        deadline = time.monotonic() + START_BUDGET
        while True:
            with contextlib.suppress(OSError):
                if http_get(self.url + "/v2/models/fraud/ready")[0] == 200:
                    return self
            if self.rp.proc.poll() is not None:
                raise RuntimeError(
                    f"MLServer exited with {self.rp.proc.returncode}:\n" + "\n".join(self.rp.lines)
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"MLServer not ready after {START_BUDGET:.0f}s:\n" + "\n".join(self.rp.lines)
                )
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, no graceful shutdown."""
        assert self.rp is not None
        self.rp.signal(signal.SIGKILL)
        self.rp.proc.wait(10)
        self.outputs += self.rp.lines

    def stop(self) -> None:
        if self.rp is not None:
            self.rp.stop()
            self.outputs += self.rp.lines


@pytest.fixture
def mlserver_factory(mlserver_venv: Path, fraud_root: Path) -> Iterator[Any]:
    started: list[MLServer] = []

    def factory() -> MLServer:
        server = MLServer(mlserver_venv, fraud_root / "models")
        started.append(server)
        return server.start()

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def mlserver(mlserver_venv: Path, fraud_root: Path) -> Iterator[MLServer]:
    """One MLServer shared by a module's tests that do not stop it."""
    server = MLServer(mlserver_venv, fraud_root / "models").start()
    try:
        yield server
    finally:
        server.stop()


def example_python() -> str:
    """The examples' client scripts run with the sidecar's own interpreter (PyYAML, openai)."""
    return sys.executable
