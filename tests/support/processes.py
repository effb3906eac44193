"""Start real processes for tests: own process group, JSON log lines parsed, always stopped.

`sidecar run` and `sidecar demo-model` log one JSON line with `"event": "listening"` once they are
bound; tests read the bound addresses from it instead of racing for fixed ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RunningProcess", "sidecar_cmd", "start_process"]


def sidecar_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sidecar", *args]


@dataclass
class RunningProcess:
    proc: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)
    ready: dict[str, Any] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def records(self) -> list[dict[str, Any]]:
        out = []
        with self._cond:
            lines = list(self.lines)
        for line in lines:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def wait_for_log(self, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
        """Block until a JSON log record satisfies `predicate` (bounded wait)."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    with contextlib.suppress(ValueError):
                        rec = json.loads(line)
                        if isinstance(rec, dict) and predicate(rec):
                            return rec
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        "log line not seen; output so far:\n" + "\n".join(self.lines[-40:])
                    )
                if self.proc.poll() is not None and seen == len(self.lines):
                    # Give the reader thread a moment to deliver the final lines.
                    self._cond.wait(0.2)
                    if seen == len(self.lines):
                        raise RuntimeError(
                            f"process exited with {self.proc.returncode}; output:\n"
                            + "\n".join(self.lines[-40:])
                        )
                self._cond.wait(min(remaining, 0.5))

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM the process group, then SIGKILL it if it does not exit in time."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)
        # Whatever the process left behind in its group goes too.
        self.signal(signal.SIGKILL)
        return self.proc.returncode


def _reader(rp: RunningProcess) -> None:
    assert rp.proc.stdout is not None
    for raw in iter(rp.proc.stdout.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\n")
        with rp._cond:
            rp.lines.append(line)
            rp._cond.notify_all()
    with rp._cond:
        rp._cond.notify_all()


def start_process(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    ready: Any = None,
    timeout: float = 20.0,
    cwd: str | None = None,
) -> RunningProcess:
    """Start `args` in its own process group; wait for the `listening` log line unless
    `ready=False`. stderr is merged into stdout."""
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    full_env["SIDECAR_LOG_FORMAT"] = "json"
    if env:
        full_env.update(env)
    proc = subprocess.Popen(
        list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=full_env,
        cwd=cwd,
        start_new_session=True,
    )
    rp = RunningProcess(proc)
    threading.Thread(target=_reader, args=(rp,), daemon=True).start()
    if ready is not False:
        predicate = ready or (lambda rec: rec.get("event") == "listening")
        try:
            rp.ready = rp.wait_for_log(predicate, timeout)
        except BaseException:
            rp.stop()
            raise
    return rp


@contextlib.contextmanager
def running(args: Sequence[str], **kwargs: Any) -> Iterator[RunningProcess]:
    rp = start_process(args, **kwargs)
    try:
        yield rp
    finally:
        rp.stop()
