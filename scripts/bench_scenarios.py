"""The benchmark's scenarios: the processes they need (`Env`) and what each one measures.

Healthy: the same request to every variant, interleaved round by round (A B C A B C), added
latency against the direct run of the same round, the proxy's CPU milliseconds per request and
RSS; SSE time to first event and gaps between events the model paces like a generating model;
memory with 1,000 held streams; a soak for RSS growth.
Failure: the model hangs, answers 503, flaps, or is overloaded; for each, what the caller saw
(latency, status, `x-sidecar-failure-mode`) and what the model received (`/_demo/stats`).
Every result is a plain JSON-able dict; `scripts.bench_report` turns them into tables and charts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from scripts.bench_load import LoadResult, Request, Sample, percentile, run_open_loop
from scripts.bench_policies import DEADLINE, PolicySet, build_policies
from scripts.bench_procs import (
    Cores,
    Proc,
    core_times,
    free_port,
    haproxy_config,
    python_cmd,
    start,
)

__all__ = [
    "CHAT",
    "SSE",
    "SSE_CHUNK_INTERVAL_MS",
    "Env",
    "Request",
    "Variant",
    "agg",
    "summarize",
    "with_fault",
]

_CHAT_BODY = {
    "model": "demo-model",
    "messages": [{"role": "user", "content": "Say hello"}],
    "logprobs": True,
}
_JSON = (("Content-Type", "application/json"),)
CHAT = Request("POST", "/v1/chat/completions", _JSON, json.dumps(_CHAT_BODY).encode())
SSE = Request(
    "POST", "/v1/chat/completions", _JSON, json.dumps({**_CHAT_BODY, "stream": True}).encode()
)


#: The SSE scenario's pacing: the demo model waits this long before each event after the first
#: (`x-demo-fault: chunk_interval=20ms`, a model generating 50 tokens/s). Sent back to back, the
#: events arrive in one read and the gaps say nothing; paced, the direct run's gap is the model's
#: and the added gap (proxy minus direct, same round) is what the proxy adds to each event.
SSE_CHUNK_INTERVAL_MS = 20


def with_fault(request: Request, spec: str) -> Request:
    return Request(
        request.method, request.path, (*request.headers, ("x-demo-fault", spec)), request.body
    )


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000.0, 3)


def summarize(res: LoadResult) -> dict[str, Any]:
    """Percentiles (ms, from the scheduled send), errors, late sends and generator load."""
    lat = res.latencies()
    n = len(res.samples)
    ok = sum(1 for s in res.samples if s.ok)
    lates = sorted(s.late for s in res.samples)
    kinds = Counter(
        s.error or str(s.status) for s in res.samples if not s.ok
    )  # what a failure looked like
    modes = Counter(s.failure_mode for s in res.samples if s.failure_mode)
    return {
        "n": n,
        "sent": int(res.rate * res.duration),
        "ok": ok,
        "errors": n - ok,
        "error_kinds": dict(kinds),
        "failure_modes": dict(modes),
        "p50": _ms(percentile(lat, 50)),
        "p90": _ms(percentile(lat, 90)),
        "p99": _ms(percentile(lat, 99)),
        "p999": _ms(percentile(lat, 99.9)),
        "max": _ms(lat[-1]) if lat else None,
        "late": res.late_sends,
        "late_p99": _ms(percentile(lates, 99)),
        "late_max": _ms(lates[-1]) if lates else None,
        "generator_cpu": round(res.generator_cpu / res.wall, 3) if res.wall > 0 else None,
    }


def agg(values: Iterable[float | None]) -> dict[str, Any]:
    """Median and spread (min, max) of one figure over rounds."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"median": None, "min": None, "max": None, "values": []}
    return {
        "median": round(statistics.median(vals), 4),
        "min": round(min(vals), 4),
        "max": round(max(vals), 4),
        "values": [round(v, 4) for v in vals],
    }


@dataclass
class Variant:
    key: str
    label: str
    host: str
    port: int
    proc: Proc | None = None  # the proxy under test (None: direct)
    admin: tuple[str, int] | None = None


LABELS = {
    "direct": "direct to the model",
    "haproxy": "HAProxy",
    "floor": "minimal aiohttp proxy (floor)",
    "passthrough": "sidecar, pass-through",
    "all": "sidecar, all features",
    "all_notrace": "sidecar, all features, no trace export",
    "all_trace100": "sidecar, all features, every span exported",
    "naive": 'sidecar, naive "retry 3 times"',
}


class Env:
    """The demo model, OTLP receiver, HAProxy, the floor proxy and sidecars of one benchmark run."""

    def __init__(self, work: Path, cores: Cores, *, haproxy: bool, extra_sidecars: bool) -> None:
        self.work = work
        self.cores = cores
        self.want_haproxy = haproxy
        self.extra_sidecars = extra_sidecars
        self.procs: list[Proc] = []
        self.variants: dict[str, Variant] = {}
        self.notes: list[str] = []
        self.idle_rss: dict[str, int] = {}
        self.policies: PolicySet
        self.model: tuple[str, int]
        self.otlp: tuple[str, int] | None = None
        self.session: aiohttp.ClientSession
        self.fresh_count = 0

    # processes ----------------------------------------------------------------------------------
    def _start(self, name: str, cmd: Sequence[str], **kwargs: Any) -> Proc:
        proc = start(name, cmd, self.work, **kwargs)
        self.procs.append(proc)
        return proc

    def sidecar_env(self, key: str) -> dict[str, str]:
        env = {
            "SIDECAR_STATE_DIR": str(self.work / f"state-{key}"),
            "SIDECAR_DRAIN_GRACE": "1s",
            "OTEL_SDK_DISABLED": "false",
        }
        if key in ("all", "all_trace100", "naive", "overload") and self.otlp is not None:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://{self.otlp[0]}:{self.otlp[1]}"
            env["OTEL_BSP_SCHEDULE_DELAY"] = "1000"
        if key == "all_trace100":
            env["SIDECAR_TRACE_SUCCESS_RATIO"] = "1.0"
        return env

    def start_sidecar(self, key: str, policy: Path, name: str | None = None) -> Variant:
        proc = self._start(
            name or f"sidecar-{key}",
            python_cmd(
                "sidecar", "run", "--policy", str(policy), "--port", "0", "--admin-port", "0"
            ),
            cores=self.cores.proxy,
            env=self.sidecar_env(key),
        )
        host, port = proc.address("proxy")
        return Variant(key, LABELS.get(key, key), host, port, proc, proc.address("admin"))

    async def fresh_sidecar(self, key: str, policy: Path) -> Variant:
        """A new sidecar process (clean breaker, budget and bulkhead) for one failure run."""
        self.fresh_count += 1
        return await asyncio.to_thread(
            self.start_sidecar, key, policy, f"sidecar-{key}-{self.fresh_count}"
        )

    def stop(self, proc: Proc) -> None:
        proc.stop()
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    async def setup(self) -> None:
        self.session = aiohttp.ClientSession()
        demo, otlp = await asyncio.gather(
            asyncio.to_thread(
                self._start,
                "demo-model",
                python_cmd("sidecar", "demo-model", "--port", "0"),
                cores=self.cores.load,
            ),
            asyncio.to_thread(
                self._start, "otlp", python_cmd("scripts.bench_otlp"), cores=self.cores.load
            ),
        )
        self.model = demo.address()
        self.otlp = otlp.address()
        self.variants["direct"] = Variant("direct", LABELS["direct"], *self.model)
        model_url = f"http://{self.model[0]}:{self.model[1]}"
        self.policies = await asyncio.to_thread(build_policies, self.work, model_url)
        starts = [
            asyncio.to_thread(
                self.start_sidecar, "passthrough", self.policies.files["passthrough"]
            ),
            asyncio.to_thread(self.start_sidecar, "all", self.policies.files["all"]),
        ]
        if self.extra_sidecars:
            for key in ("all_notrace", "all_trace100"):
                starts.append(
                    asyncio.to_thread(self.start_sidecar, key, self.policies.files["all"])
                )
        floor, sidecars = await asyncio.gather(
            asyncio.to_thread(self._start_floor, model_url), asyncio.gather(*starts)
        )
        for variant in sidecars:
            self.variants[variant.key] = variant
        if floor is not None:
            self.variants["floor"] = floor
        if self.want_haproxy:
            await asyncio.to_thread(self._start_haproxy)
        await asyncio.sleep(1.0)  # let every process finish its start-up work before idle RSS
        for key, variant in self.variants.items():
            if variant.proc is not None:
                self.idle_rss[key] = variant.proc.stats().rss

    def _start_floor(self, model_url: str, name: str = "floor") -> Variant | None:
        """The minimal aiohttp reverse proxy (`scripts.bench_floor`): what any aiohttp-based
        proxy costs here before doing anything of its own. Optional, like HAProxy."""
        try:
            proc = self._start(
                name,
                python_cmd("scripts.bench_floor", "--upstream", model_url, "--port", "0"),
                cores=self.cores.proxy,
            )
        except (OSError, RuntimeError, TimeoutError) as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            why = " … ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else repr(exc)
            self.notes.append(
                f"The minimal aiohttp proxy (floor) did not start, so its variant is missing: {why}"
            )
            return None
        host, port = proc.address("proxy")
        return Variant("floor", LABELS["floor"], host, port, proc)

    def _start_haproxy(self) -> None:
        exe = shutil.which("haproxy")
        if exe is None:
            self.notes.append("HAProxy is not installed: its variant is missing.")
            return
        for _ in range(3):
            port = free_port()
            cfg = self.work / "haproxy.cfg"
            cfg.write_text(haproxy_config(port, self.model))
            try:
                proc = self._start(
                    "haproxy",
                    [exe, "-db", "-f", str(cfg)],
                    cores=self.cores.proxy,
                    tcp=("127.0.0.1", port),
                    timeout=10,
                )
            except (RuntimeError, TimeoutError) as exc:  # the port was taken meanwhile
                last = exc
                continue
            self.variants["haproxy"] = Variant(
                "haproxy", LABELS["haproxy"], "127.0.0.1", port, proc
            )
            return
        self.notes.append(f"HAProxy did not start: {last}")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.session.close()
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    # the demo model's control plane ---------------------------------------------------------
    async def demo(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        url = f"http://{self.model[0]}:{self.model[1]}{path}"
        async with self.session.request(method, url, json=body) as resp:
            data: dict[str, Any] = await resp.json()
            return data

    async def otlp_stats(self) -> dict[str, Any]:
        if self.otlp is None:
            return {}
        async with self.session.get(f"http://{self.otlp[0]}:{self.otlp[1]}/stats") as resp:
            data: dict[str, Any] = await resp.json()
            return data

    async def reset_breaker(self, variant: Variant) -> None:
        """Close a sidecar's breaker, so one overloaded run does not leak into the next."""
        if variant.admin is None or variant.key == "passthrough":
            return
        url = f"http://{variant.admin[0]}:{variant.admin[1]}/admin/breakers/model"
        async with self.session.post(url, json={"action": "reset"}) as resp:
            await resp.read()

    async def sidecar_requests_metric(self, variant: Variant) -> float | None:
        """Sum of `sidecar_requests_total` on the admin port (proves metrics are on)."""
        if variant.admin is None:
            return None
        url = f"http://{variant.admin[0]}:{variant.admin[1]}/metrics"
        async with self.session.get(url) as resp:
            text = await resp.text()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("sidecar_requests_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return total


# --- healthy -----------------------------------------------------------------------------------


async def _measured(
    env: Env, v: Variant, request: Request, rate: float, duration: float, **kw: Any
) -> tuple[LoadResult, dict[str, Any]]:
    """One measured run: warm-up, then the load, with the proxy's CPU and RSS around it."""
    await env.reset_breaker(v)
    await run_open_loop(v.host, v.port, request, rate=rate, duration=1.0, **kw)
    await env.reset_breaker(v)
    await env.demo("POST", "/_demo/stats/reset")
    before = v.proc.stats() if v.proc else None
    proxy_cpu = min(env.cores.proxy)
    core0 = core_times(proxy_cpu)
    res = await run_open_loop(v.host, v.port, request, rate=rate, duration=duration, **kw)
    core1 = core_times(proxy_cpu)
    after = v.proc.stats() if v.proc else None
    model = await env.demo("GET", "/_demo/stats")
    out = summarize(res)
    out["model_received"] = model["requests"]
    span = max(1e-9, core1.total - core0.total)
    own = (after.cpu - before.cpu) if before is not None and after is not None else 0.0
    # What else ran on the proxy's CPU (other engineers' tests), and host steal: the noise.
    out["proxy_core_others"] = round(max(0.0, (core1.busy - core0.busy - own) / span), 3)
    out["proxy_core_steal"] = round((core1.steal - core0.steal) / span, 3)
    if before is not None and after is not None and out["n"]:
        out["cpu_ms"] = round((after.cpu - before.cpu) * 1000.0 / out["n"], 4)
        out["proxy_cpu_share"] = round((after.cpu - before.cpu) / res.wall, 3)
        out["rss_mb"] = round(after.rss / 2**20, 1)
        out["hwm_mb"] = round(after.hwm / 2**20, 1)
    return res, out


async def healthy(
    env: Env,
    keys: Sequence[str],
    rate: float,
    duration: float,
    rounds: int,
    request: Request = CHAT,
    log: Any = print,
) -> dict[str, Any]:
    """Interleaved rounds at one rate; `added_*` are per-round differences to `direct`."""
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    warm = max(4, int(rate * 0.01) + 4)
    for r in range(rounds):
        for key in keys:
            v = env.variants[key]
            _, out = await _measured(env, v, request, rate, duration, warm_connections=warm)
            runs[key].append(out)
            log(
                f"  {rate:g} rps round {r + 1} {key:>13}: p50 {out['p50']} p99 {out['p99']} ms"
                f" cpu {out.get('cpu_ms')} ms/req errors {out['errors']} late {out['late']}"
            )
    return _fold(runs, keys)


def _fold(runs: dict[str, list[dict[str, Any]]], keys: Sequence[str]) -> dict[str, Any]:
    result: dict[str, Any] = {"rounds": runs, "summary": {}}
    direct = runs.get("direct")
    for key in keys:
        rs = runs[key]
        summary: dict[str, Any] = {}
        for fig in (
            "p50",
            "p90",
            "p99",
            "p999",
            "max",
            "cpu_ms",
            "rss_mb",
            "hwm_mb",
            "proxy_cpu_share",
            "proxy_core_others",
            "proxy_core_steal",
            "generator_cpu",
            "ttfe_p50",
            "ttfe_p99",
            "gap_mean_p50",
            "gap_max_p99",
        ):
            if any(fig in x for x in rs):
                summary[fig] = agg(x.get(fig) for x in rs)
        summary["errors"] = sum(x["errors"] for x in rs)
        summary["n"] = sum(x["n"] for x in rs)
        summary["late"] = sum(x["late"] for x in rs)
        summary["model_received"] = sum(x.get("model_received", 0) for x in rs)
        if direct is not None and key != "direct":
            for fig in ("p50", "p99", "ttfe_p50", "ttfe_p99", "gap_mean_p50"):
                if fig in rs[0] and fig in direct[0]:
                    summary[f"added_{fig}"] = agg(
                        (a[fig] - d[fig])
                        if a.get(fig) is not None and d.get(fig) is not None
                        else None
                        for a, d in zip(rs, direct, strict=False)
                    )
        result["summary"][key] = summary
    return result


async def sse(
    env: Env, keys: Sequence[str], rate: float, duration: float, rounds: int, log: Any = print
) -> dict[str, Any]:
    """Streams: time to first event and the gaps between events, per round and variant. The model
    paces the events `SSE_CHUNK_INTERVAL_MS` apart; time to first event does not include it."""
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    paced = with_fault(SSE, f"chunk_interval={SSE_CHUNK_INTERVAL_MS}ms")
    # A stream stays open for its 7 waits: keep a connection warm for each one open at a time,
    # so no stream pays for a new connection in its time to first event.
    warm = 8 + math.ceil(rate * 8 * SSE_CHUNK_INTERVAL_MS / 1000.0)
    for r in range(rounds):
        for key in keys:
            v = env.variants[key]
            res, out = await _measured(env, v, paced, rate, duration, warm_connections=warm)
            good = [s for s in res.samples if s.ok and s.first_event is not None]
            ttfe = sorted(s.first_event for s in good if s.first_event is not None)
            gaps = sorted(g for s in good if (g := _mean_gap(s)) is not None)
            max_gaps = sorted(s.max_gap for s in good)
            out["ttfe_p50"] = _ms(percentile(ttfe, 50))
            out["ttfe_p99"] = _ms(percentile(ttfe, 99))
            out["gap_mean_p50"] = _ms(percentile(gaps, 50))
            out["gap_max_p99"] = _ms(percentile(max_gaps, 99))
            out["events_per_stream"] = statistics.median([s.events for s in good]) if good else 0
            runs[key].append(out)
            log(
                f"  sse round {r + 1} {key:>13}: ttfe p50 {out['ttfe_p50']} p99 {out['ttfe_p99']}"
                f" gap {out['gap_mean_p50']} ms events {out['events_per_stream']}"
                f" errors {out['errors']}"
            )
    result = _fold(runs, keys)
    result["chunk_interval_ms"] = SSE_CHUNK_INTERVAL_MS
    return result


def _mean_gap(s: Sample) -> float | None:
    """The mean gap between events: first read to last over the events after the first read.

    Events that complete in one read share its time. When the first read carried k events, the
    span from it to the last read covers `events - k` gaps, not `events - 1`: dividing by the
    latter would shrink the gap. None when one read carried every event (no gap was seen)."""
    if s.first_event is None or s.last_event is None or s.events <= s.first_read_events:
        return None
    return (s.last_event - s.first_event) / (s.events - s.first_read_events)


async def open_streams(
    env: Env, keys: Sequence[str], count: int, rounds: int, ramp: float = 100, log: Any = print
) -> dict[str, Any]:
    """RSS of the proxy with `count` streams held open after their first event, opened at
    `ramp` new streams (and connections) per second. Each sidecar is a fresh process, so its
    RSS before the streams is its idle RSS, not what earlier scenarios left behind."""
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    held = with_fault(SSE, "hold_after_first")
    for r in range(rounds):
        for key in keys:
            fresh = key in ("passthrough", "all", "floor")
            if key == "floor":
                env.fresh_count += 1
                model_url = f"http://{env.model[0]}:{env.model[1]}"
                started = await asyncio.to_thread(
                    env._start_floor, model_url, f"floor-{env.fresh_count}"
                )
                if started is None:
                    continue
                v = started
                await asyncio.sleep(1.0)
            elif fresh:
                v = await env.fresh_sidecar(key, env.policies.files[key])
                await asyncio.sleep(1.0)  # start-up work done: the next reading is idle RSS
            else:
                v = env.variants[key]
            try:
                out = await _hold_streams(env, v, held, count, ramp)
            finally:
                if fresh and v.proc is not None:
                    env.stop(v.proc)
            runs[key].append(out)
            log(
                f"  streams round {r + 1} {key:>13}: held {out['held']} ok {out['streams_ok']} "
                f"rss {out.get('rss_mb')} MB (+{out.get('rss_added_mb')}) failed {out['failed']}"
            )
            await asyncio.sleep(0.5)
    summary = {}
    for key in keys:
        rs = runs[key]
        if not rs:  # the floor proxy did not start
            continue
        summary[key] = {
            fig: agg(x.get(fig) for x in rs)
            for fig in ("rss_mb", "rss_added_mb", "per_stream_kb", "idle_rss_mb")
        }
        summary[key]["streams_ok"] = [x["streams_ok"] for x in rs]
        summary[key]["held"] = [x["held"] for x in rs]
        summary[key]["failed"] = _merge(x["failed"] for x in rs)
    return {"count": count, "ramp": ramp, "rounds": runs, "summary": summary}


async def _hold_streams(
    env: Env, v: Variant, held: Request, count: int, ramp: float
) -> dict[str, Any]:
    """Open `count` held streams through `v`, read RSS while they are open, release them."""
    await env.demo("POST", "/_demo/stats/reset")
    before = v.proc.stats() if v.proc else None
    base = (await env.demo("GET", "/_demo/stats"))["in_flight"]
    task = asyncio.create_task(
        run_open_loop(
            v.host,
            v.port,
            held,
            rate=ramp,
            duration=count / ramp,
            timeout=60.0,
            warm_connections=0,
            max_connections=count + 16,
        )
    )
    deadline = time.monotonic() + count / ramp + 20
    held_now = 0
    while time.monotonic() < deadline:
        stats = await env.demo("GET", "/_demo/stats")
        held_now = stats["in_flight"] - base
        if held_now >= count or task.done():
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)  # the first events travel through the proxy
    during = v.proc.stats() if v.proc else None
    demo_rss = next(p for p in env.procs if p.name == "demo-model").stats().rss
    released = await env.demo("POST", "/_demo/release")
    res = await task
    streams_ok = sum(1 for s in res.samples if s.ok and s.events >= 2)
    failed = Counter(
        s.failure_mode or s.error or str(s.status)
        for s in res.samples
        if not (s.ok and s.events >= 2)
    )
    out: dict[str, Any] = {
        "failed": dict(failed),
        "held": held_now,
        "released": released.get("released"),
        "streams_ok": streams_ok,
        "errors": len(res.samples) - streams_ok,
        "n": len(res.samples),
        "late": res.late_sends,
        "demo_rss_mb": round(demo_rss / 2**20, 1),
    }
    if before is not None and during is not None:
        out["idle_rss_mb"] = round(before.rss / 2**20, 1)
        out["rss_mb"] = round(during.rss / 2**20, 1)
        out["rss_added_mb"] = round((during.rss - before.rss) / 2**20, 1)
        out["per_stream_kb"] = round((during.rss - before.rss) / 1024 / count, 1)
    return out


async def soak(env: Env, key: str, rate: float, minutes: float, log: Any = print) -> dict[str, Any]:
    """RSS (and latency) of one sidecar under steady load, in 10-second windows."""
    v = env.variants[key]
    assert v.proc is not None
    points = []
    start = time.monotonic()
    windows = max(1, int(minutes * 6))
    for i in range(windows):
        res = await run_open_loop(
            v.host, v.port, CHAT, rate=rate, duration=10.0, warm_connections=8
        )
        st = v.proc.stats()
        s = summarize(res)
        points.append(
            {
                "t": round(time.monotonic() - start, 1),
                "rss_mb": round(st.rss / 2**20, 2),
                "p50": s["p50"],
                "p99": s["p99"],
                "errors": s["errors"],
                "n": s["n"],
            }
        )
        if i % 6 == 5:
            log(f"  soak {points[-1]['t']:.0f}s rss {points[-1]['rss_mb']} MB p99 {s['p99']} ms")
    warm = points[min(len(points) - 1, 6) :] or points  # after the first minute
    first = statistics.median(p["rss_mb"] for p in warm[:6])
    last = statistics.median(p["rss_mb"] for p in warm[-6:])
    return {
        "key": key,
        "rate": rate,
        "minutes": minutes,
        "points": points,
        "rss_start_mb": first,
        "rss_end_mb": last,
        "growth_mb": round(last - first, 2),
        "requests": sum(p["n"] for p in points),
        "errors": sum(p["errors"] for p in points),
    }


# --- failure -----------------------------------------------------------------------------------


async def _failure_variant(env: Env, key: str, policy: str) -> tuple[Variant, bool]:
    """A fresh sidecar for stateful variants (warmed with a few healthy requests, as a sidecar
    in service would be: the first requests of a new process pay for lazy set-up); the
    long-lived one for the rest."""
    if key in ("all", "naive", "overload"):
        v = await env.fresh_sidecar(key, env.policies.files[policy])
        await run_open_loop(v.host, v.port, CHAT, rate=50, duration=0.5, warm_connections=4)
        return v, True
    return env.variants[key], False


def _service_ms(samples: Iterable[Sample], q: float) -> float | None:
    """Percentile of latency from the *actual* send (the schedule's timer slack left out)."""
    vals = sorted(s.latency - s.late for s in samples if not math.isnan(s.latency))
    return _ms(percentile(vals, q))


async def hang(
    env: Env,
    keys: Sequence[str],
    rounds: int,
    rate: float = 20,
    duration: float = 5,
    log: Any = print,
) -> dict[str, Any]:
    """Every request hangs at the model: how long does the caller wait?"""
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    req = with_fault(CHAT, "hang")
    caller_timeout = 3.0
    for r in range(rounds):
        for key in keys:
            v, fresh = await _failure_variant(env, key, key)
            try:
                await env.demo("POST", "/_demo/stats/reset")
                res = await run_open_loop(
                    v.host,
                    v.port,
                    req,
                    rate=rate,
                    duration=duration,
                    timeout=caller_timeout,
                    warm_connections=0,
                )
                model = await env.demo("GET", "/_demo/stats")
            finally:
                if fresh and v.proc is not None:
                    env.stop(v.proc)
            out = summarize(res)
            out["model_received"] = model["requests"]
            reached = [s for s in res.samples if s.failure_mode != "circuit_open"]
            out["not_failfast_p99"] = _ms(percentile(sorted(s.latency for s in reached), 99))
            runs[key].append(out)
            log(
                f"  hang round {r + 1} {key:>13}: p50 {out['p50']} p99 {out['p99']} max "
                f"{out['max']} ms modes {out['failure_modes']} errors {out['error_kinds']}"
            )
    summary = {}
    for key in keys:
        rs = runs[key]
        summary[key] = {
            fig: agg(x.get(fig) for x in rs) for fig in ("p50", "p99", "max", "not_failfast_p99")
        }
        summary[key]["model_received"] = agg(x["model_received"] / max(1, x["n"]) for x in rs)
        summary[key]["failure_modes"] = _merge(x["failure_modes"] for x in rs)
        summary[key]["error_kinds"] = _merge(x["error_kinds"] for x in rs)
    return {
        "rate": rate,
        "duration": duration,
        "deadline_ms": DEADLINE * 1000,
        "caller_timeout_ms": caller_timeout * 1000,
        "rounds": runs,
        "summary": summary,
    }


def _merge(counters: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counters:
        total.update(c)
    return dict(total)


async def always_503(
    env: Env,
    keys: Sequence[str],
    rounds: int,
    rate: float = 100,
    duration: float = 6,
    log: Any = print,
) -> dict[str, Any]:
    """Every answer is 503: breaker opening, fail-fast latency, upstream attempts per request."""
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    req = with_fault(CHAT, "status=503")
    for r in range(rounds):
        for key in keys:
            v, fresh = await _failure_variant(env, key, key)
            try:
                await env.demo("POST", "/_demo/stats/reset")
                res = await run_open_loop(
                    v.host, v.port, req, rate=rate, duration=duration, warm_connections=8
                )
                model = await env.demo("GET", "/_demo/stats")
            finally:
                if fresh and v.proc is not None:
                    env.stop(v.proc)
            out = summarize(res)
            n = max(1, out["n"])
            out["model_received"] = model["requests"]
            out["attempts_per_request"] = round(model["requests"] / n, 3)
            samples = sorted(res.samples, key=lambda s: s.scheduled)
            start = samples[0].scheduled if samples else 0.0
            # The breaker opened when the first `circuit_open` answer came back; fail-fast
            # latency is that of requests *sent* after it (earlier ones met it on a retry).
            open_answers = [s for s in samples if s.failure_mode == "circuit_open"]
            if open_answers:
                opened_at = min(s.scheduled + s.latency for s in open_answers)
                fast = [s for s in open_answers if s.scheduled >= opened_at]
                out["open_after_ms"] = _ms(opened_at - start)
                out["open_after_requests"] = sum(1 for s in samples if s.scheduled < opened_at)
                out["failfast_n"] = len(fast)
                out["failfast_p50"] = _ms(percentile(sorted(s.latency for s in fast), 50))
                out["failfast_p99"] = _ms(percentile(sorted(s.latency for s in fast), 99))
                out["failfast_service_p99"] = _service_ms(fast, 99)
            rest = [s for s in samples if s.failure_mode != "circuit_open"]
            out["answered_p50"] = _ms(percentile(sorted(s.latency for s in rest), 50))
            out["service_p99"] = _service_ms(samples, 99)
            runs[key].append(out)
            log(
                f"  503 round {r + 1} {key:>13}: attempts/request {out['attempts_per_request']}"
                f" open after {out.get('open_after_ms')} ms / {out.get('open_after_requests')} req"
                f" fail-fast p99 {out.get('failfast_p99')} ms modes {out['failure_modes']}"
            )
    summary = {}
    figs = (
        "attempts_per_request",
        "open_after_ms",
        "open_after_requests",
        "failfast_p50",
        "failfast_p99",
        "failfast_service_p99",
        "answered_p50",
        "p50",
        "p99",
        "service_p99",
    )
    for key in keys:
        rs = runs[key]
        summary[key] = {fig: agg(x.get(fig) for x in rs) for fig in figs}
        summary[key]["failure_modes"] = _merge(x["failure_modes"] for x in rs)
    return {"rate": rate, "duration": duration, "rounds": runs, "summary": summary}


async def flapping(
    env: Env,
    keys: Sequence[str],
    rounds: int,
    rate: float = 50,
    up: float = 10,
    down: float = 10,
    cycles: int = 2,
    log: Any = print,
) -> dict[str, Any]:
    """The model answers 503 for `down` s, then heals for `up` s, `cycles` times; all variants
    run at once against the same schedule. Goodput, and recovery time after each heal."""
    lead = 2.0
    duration = lead + cycles * (down + up)
    req = CHAT
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    timelines: dict[str, list[tuple[float, float]]] = {}
    for r in range(rounds):
        variants: dict[str, Variant] = {}
        fresh: list[Proc] = []
        for key in keys:
            v, is_fresh = await _failure_variant(env, key, key)
            variants[key] = v
            if is_fresh and v.proc is not None:
                fresh.append(v.proc)
        # (just before, just after) each fault was registered: it started somewhere between.
        downs: list[tuple[float, float]] = []
        await env.demo("DELETE", "/_demo/faults")

        async def control(downs: list[tuple[float, float]] = downs) -> None:
            t0 = time.perf_counter()
            for c in range(cycles):
                at = t0 + lead + c * (down + up)
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                before = time.perf_counter()
                await env.demo("POST", "/_demo/faults", {"spec": "status=503", "seconds": down})
                downs.append((before, time.perf_counter()))

        try:
            results = await asyncio.gather(
                control(),
                *(
                    run_open_loop(
                        v.host, v.port, req, rate=rate, duration=duration, warm_connections=8
                    )
                    for v in variants.values()
                ),
            )
        finally:
            for proc in fresh:
                env.stop(proc)
            await env.demo("DELETE", "/_demo/faults")
        for key, res in zip(variants, results[1:], strict=True):
            out = _flap_figures(res, downs, down, up)
            runs[key].append(out)
            if r == 0:
                timelines[key] = _timeline(res, downs[0][0] - lead if downs else 0.0)
            log(
                f"  flap round {r + 1} {key:>13}: goodput up {out['goodput_up']} "
                f"recovery {out['recovery_ms']} ms after-5s {out['success_after_5s']}"
            )
    summary = {}
    for key in keys:
        rs = runs[key]
        recov = [x for out in rs for x in out["recovery_ms"]]
        after5 = [x for out in rs for x in out["success_after_5s"]]
        summary[key] = {
            "goodput": agg(x["goodput"] for x in rs),
            "goodput_up": agg(x["goodput_up"] for x in rs),
            "goodput_down": agg(x["goodput_down"] for x in rs),
            "recovery_ms": agg(recov),
            "success_after_5s": agg(after5),
            "down_p99": agg(x["down_p99"] for x in rs),
        }
    return {
        "rate": rate,
        "up": up,
        "down": down,
        "cycles": cycles,
        "rounds": runs,
        "summary": summary,
        "timelines": timelines,
    }


def _flap_figures(
    res: LoadResult, downs: list[tuple[float, float]], down: float, up: float
) -> dict[str, Any]:
    """Down windows run from just before a fault was registered to `down` seconds after it
    was; a heal is the end of one, so no request is charged to the wrong phase."""
    samples = sorted(res.samples, key=lambda s: s.scheduled)
    n = max(1, len(samples))
    heals = [after + down for _, after in downs]
    starts = [before for before, _ in downs]

    def is_down(s: Sample) -> bool:
        return any(b <= s.scheduled < a + down for b, a in downs)

    in_down = [s for s in samples if is_down(s)]
    in_up = [s for s in samples if not is_down(s)]
    recovery: list[float | None] = []
    after5: list[float | None] = []
    for h in heals:
        nxt = min([d for d in starts if d > h] + [h + up])
        phase = [s for s in samples if h <= s.scheduled < nxt]
        if not phase:
            continue
        rec = None
        for i in range(len(phase)):
            tail = phase[i:]
            if sum(1 for s in tail if s.ok) >= 0.99 * len(tail):
                rec = phase[i].scheduled - h
                break
        recovery.append(_ms(rec) if rec is not None else None)
        late = [s for s in phase if s.scheduled >= h + 5.0]
        after5.append(round(sum(1 for s in late if s.ok) / len(late), 4) if late else None)
    return {
        "n": len(samples),
        "goodput": round(sum(1 for s in samples if s.ok) / n, 4),
        "goodput_up": round(sum(1 for s in in_up if s.ok) / max(1, len(in_up)), 4),
        "goodput_down": round(sum(1 for s in in_down if s.ok) / max(1, len(in_down)), 4),
        "down_p99": _ms(percentile(sorted(s.latency for s in in_down), 99)),
        "recovery_ms": recovery,
        "success_after_5s": after5,
        "failure_modes": dict(Counter(s.failure_mode for s in samples if s.failure_mode)),
    }


def _timeline(res: LoadResult, t0: float, step: float = 0.5) -> list[tuple[float, float]]:
    """Success share per `step`-second bin of scheduled send time."""
    bins: dict[int, list[bool]] = {}
    for s in res.samples:
        bins.setdefault(int((s.scheduled - t0) / step), []).append(s.ok)
    return [(round(k * step, 2), round(sum(v) / len(v), 3)) for k, v in sorted(bins.items())]


async def overload(
    env: Env,
    keys: Sequence[str],
    rounds: int,
    capacity: int = 16,
    latency: float = 0.2,
    duration: float = 6,
    log: Any = print,
) -> dict[str, Any]:
    """Twice the model's concurrency: what reaches the model, what is shed, admitted latency."""
    rate = 2 * capacity / latency
    concurrency = {"max_in_flight": capacity, "queue": capacity, "queue_timeout": "100ms"}
    env.policies.overload(f"http://{env.model[0]}:{env.model[1]}", concurrency)
    req = with_fault(CHAT, f"latency={int(latency * 1000)}ms")
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    for r in range(rounds):
        for key in keys:
            v, fresh = await _failure_variant(env, key, key)
            try:
                await env.demo("POST", "/_demo/stats/reset")
                base = (await env.demo("GET", "/_demo/stats"))["in_flight"]
                res = await run_open_loop(
                    v.host, v.port, req, rate=rate, duration=duration, warm_connections=8
                )
                model = await env.demo("GET", "/_demo/stats")
            finally:
                if fresh and v.proc is not None:
                    env.stop(v.proc)
            out = summarize(res)
            admitted = [s for s in res.samples if s.ok]
            shed = [s for s in res.samples if s.failure_mode == "overloaded"]
            out["model_peak_in_flight"] = model["max_in_flight"] - base
            out["model_received"] = model["requests"]
            out["shed_share"] = round(len(shed) / max(1, out["n"]), 4)
            out["admitted_p50"] = _ms(percentile(sorted(s.latency for s in admitted), 50))
            out["admitted_p99"] = _ms(percentile(sorted(s.latency for s in admitted), 99))
            out["shed_p99"] = _ms(percentile(sorted(s.latency for s in shed), 99))
            runs[key].append(out)
            log(
                f"  overload round {r + 1} {key:>13}: model peak {out['model_peak_in_flight']} "
                f"shed {out['shed_share']} admitted p99 {out['admitted_p99']} ms"
                f" modes {out['failure_modes']}"
            )
    summary = {}
    for key in keys:
        rs = runs[key]
        summary[key] = {
            fig: agg(x.get(fig) for x in rs)
            for fig in (
                "model_peak_in_flight",
                "shed_share",
                "admitted_p50",
                "admitted_p99",
                "shed_p99",
                "p99",
            )
        }
        summary[key]["failure_modes"] = _merge(x["failure_modes"] for x in rs)
        summary[key]["error_kinds"] = _merge(x["error_kinds"] for x in rs)
    return {
        "rate": rate,
        "capacity": capacity,
        "latency_ms": latency * 1000,
        "concurrency": concurrency,
        "duration": duration,
        "rounds": runs,
        "summary": summary,
    }


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram_gb"] = round(int(line.split()[1]) / 2**20, 1)
    info["kernel"] = os.uname().release
    return info
