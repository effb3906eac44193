"""Processes the benchmark runs and what it reads about them: the demo model, sidecars, HAProxy and
a loopback OTLP receiver, each in its own process group, pinned to a core, always stopped.

Logs go to files (not pipes), so reading them costs the generator nothing; the bound address is
read from the JSON `listening` line that `sidecar run --port 0` and `sidecar demo-model --port 0`
print. CPU time and RSS come from `/proc/<pid>/stat` and `/proc/<pid>/status`.
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CLK_TCK",
    "CoreTimes",
    "Cores",
    "Proc",
    "ProcStats",
    "core_times",
    "free_port",
    "haproxy_config",
    "haproxy_version",
    "proc_stats",
    "start",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Cores:
    """Where things run: the generator and the model on `load`, the proxy under test on `proxy`."""

    load: frozenset[int]
    proxy: frozenset[int]

    @classmethod
    def detect(cls) -> Cores:
        available = sorted(os.sched_getaffinity(0))
        if len(available) < 2:
            return cls(frozenset(available), frozenset(available))
        return cls(frozenset({available[0]}), frozenset({available[1]}))

    @property
    def pinned(self) -> bool:
        return self.load != self.proxy

    def describe(self) -> str:
        if not self.pinned:
            return "not pinned (fewer than 2 cores available)"
        return (
            f"generator, demo model and OTLP receiver on CPU {min(self.load)}; "
            f"the proxy under test (sidecar, HAProxy or the floor proxy) on CPU {min(self.proxy)}"
        )


@dataclass(frozen=True)
class ProcStats:
    cpu: float  # seconds (user + system, every thread)
    rss: int  # bytes
    hwm: int  # peak RSS, bytes


def proc_stats(pid: int) -> ProcStats:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15)
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return ProcStats(cpu, rss, hwm)


@dataclass(frozen=True)
class CoreTimes:
    """One CPU's counters from /proc/stat, in seconds."""

    busy: float
    total: float
    steal: float


def core_times(cpu: int) -> CoreTimes:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) / CLK_TCK for x in line.split()[1:]]
                idle = v[3] + v[4]
                total = sum(v[:8])
                return CoreTimes(total - idle, total, v[7])
    return CoreTimes(0.0, 0.0, 0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """A started process: its log file, the parsed `listening` record, and how to stop it."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def address(self, key: str = "address") -> tuple[str, int]:
        host, _, port = str(self.ready[key]).rpartition(":")
        return host.strip("[]"), int(port)

    def stats(self) -> ProcStats:
        return proc_stats(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def records(self) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if isinstance(rec, dict):
                        out.append(rec)
        return out

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it when it does not go in time."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)


def _pin(cmd: Sequence[str], cores: frozenset[int] | None) -> list[str]:
    if cores and shutil.which("taskset"):
        return ["taskset", "-c", ",".join(map(str, sorted(cores))), *cmd]
    return list(cmd)


def _wait_listening(proc: Proc, timeout: float, tcp: tuple[str, int] | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}"
            )
        if tcp is not None:
            with contextlib.suppress(OSError), socket.create_connection(tcp, timeout=0.2):
                proc.ready = {"address": f"{tcp[0]}:{tcp[1]}"}
                return
        else:
            for rec in proc.records():
                if rec.get("event") == "listening":
                    proc.ready = rec
                    return
        time.sleep(0.05)
    raise TimeoutError(f"{proc.name} did not start in {timeout}s:\n{proc.log_tail()}")


def start(
    name: str,
    cmd: Sequence[str],
    log_dir: Path,
    *,
    cores: frozenset[int] | None = None,
    env: dict[str, str] | None = None,
    tcp: tuple[str, int] | None = None,
    timeout: float = 30.0,
) -> Proc:
    """Start `cmd` in its own process group, pinned to `cores`, and wait until it listens
    (its JSON `listening` line, or a TCP connect to `tcp` for programs that print none)."""
    full_env = dict(os.environ)
    full_env.update(PYTHONUNBUFFERED="1", SIDECAR_LOG_FORMAT="json")
    if env:
        full_env.update(env)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            _pin(cmd, cores),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=REPO,
            start_new_session=True,
        )
    proc = Proc(name, popen, log_path)
    try:
        _wait_listening(proc, timeout, tcp)
    except BaseException:
        proc.stop()
        raise
    return proc


def python_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def haproxy_config(listen_port: int, model: tuple[str, int]) -> str:
    """A plain HTTP reverse proxy: one thread, keep-alive both ways, generous timeouts."""
    return f"""\
global
    nbthread 1
    maxconn 8192

defaults
    mode http
    option http-keep-alive
    # Streams: without it HAProxy sends with MSG_MORE and the kernel holds small SSE events back.
    option http-no-delay
    timeout connect 1s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s
    timeout http-request 10s

frontend bench
    bind 127.0.0.1:{listen_port}
    default_backend model

backend model
    http-reuse always
    server demo {model[0]}:{model[1]} maxconn 4096
"""


def haproxy_version() -> str:
    exe = shutil.which("haproxy")
    if exe is None:
        return "not installed"
    out = subprocess.run([exe, "-v"], capture_output=True, text=True, check=False).stdout
    first = out.splitlines()[0] if out else ""
    parts = first.split()
    return parts[2] if len(parts) > 2 else first
