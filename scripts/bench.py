"""The benchmark: what the sidecar costs when the model is healthy and what it keeps when it fails.

    python -m scripts.bench --quick      # make bench-quick: ~1 minute, 200 rps, 4 variants
    python -m scripts.bench              # make bench: every scenario, HAProxy, a 10-minute soak
    python -m scripts.bench --no-soak    # the same without the soak

It starts the demo model, a loopback OTLP receiver, HAProxy (full run), a minimal aiohttp proxy
(`scripts.bench_floor`, the floor) and the sidecar variants (`scripts.bench_policies`), each in its
own process group and pinned to a core, drives them with the open-loop generator
(`scripts.bench_load`), and writes `docs/benchmarks.md` (its own section: a quick run keeps the
full run's section and the other way round) and PNG charts under `docs/`. It reports; it asserts
nothing about speed. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scripts import bench_scenarios as sc
from scripts.bench_procs import REPO, Cores, haproxy_version

__all__ = ["main"]

DOCS = REPO / "docs"
SCENARIOS = ("healthy", "sse", "streams", "hang", "503", "overload", "flapping", "profile", "soak")


def _log(message: str) -> None:
    print(message, flush=True)


def _versions() -> dict[str, str]:
    from importlib import metadata

    import aiohttp

    out = {"python": platform.python_version(), "aiohttp": aiohttp.__version__}
    # The sidecar and the floor proxy run on uvloop when it is installed (`SIDECAR_EVENT_LOOP`).
    try:
        out["uvloop"] = metadata.version("uvloop")
    except metadata.PackageNotFoundError:
        out["uvloop"] = "not installed (asyncio event loop)"
    out["haproxy"] = haproxy_version()
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        out["sidecar"] = version("ai-resilience-sidecar")
        out["opentelemetry-sdk"] = version("opentelemetry-sdk")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            # The benchmark's own outputs (docs/) do not make the measured code dirty.
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        if rev:
            out["commit"] = rev + (" (with uncommitted changes)" if dirty else "")
    return out


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _ensure_haproxy() -> None:
    if shutil.which("haproxy"):
        return
    script = REPO / "scripts" / "ensure-system-deps.sh"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["bash", str(script), "haproxy"], check=False, timeout=600)


def _py_spy() -> str | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return exe if os.path.exists(exe) else None


async def _profile(
    env: sc.Env,
    v: sc.Variant,
    name: str,
    request: sc.Request,
    seconds: float,
    rate: float,
    what: str,
) -> dict[str, Any]:
    """py-spy a sidecar under load: a flame graph for people (`docs/profile-NAME.svg`),
    collapsed stacks for the summary in the report."""
    exe = _py_spy()
    if exe is None:
        return {"error": "py-spy is not installed (pip install py-spy)"}
    assert v.proc is not None
    svg = DOCS / f"profile-{name}.svg"
    raw = env.work / f"profile-{name}.txt"
    out: dict[str, Any] = {"svg": svg.name, "rate": rate, "seconds": seconds, "what": what}
    for fmt, path in (("flamegraph", svg), ("raw", raw)):
        cpu0 = v.proc.stats().cpu
        proc = await asyncio.create_subprocess_exec(
            exe, "record", "--pid", str(v.proc.pid), "--duration", str(int(seconds)),
            "--rate", "200", "--format", fmt, "--output", str(path), "--nonblocking",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        res = await sc.run_open_loop(
            v.host, v.port, request, rate=rate, duration=seconds + 1.0, warm_connections=8
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            return {"error": f"py-spy failed: {err.decode(errors='replace')[-500:]}"}
        out["cpu_ms"] = round((v.proc.stats().cpu - cpu0) * 1000 / max(1, len(res.samples)), 3)
        out["failure_modes"] = sc.summarize(res)["failure_modes"]
    out.update(_collapsed_summary(raw.read_text()))
    return out


async def _profiles(env: sc.Env) -> dict[str, Any]:
    """The healthy path at 200 rps, and the fail-fast path (open breaker, 100% 503)."""
    out = {
        "healthy": await _profile(
            env, env.variants["all"], "all-features", sc.CHAT, 10.0, 200,
            "healthy requests at 200 requests/s",
        )
    }  # fmt: skip
    v, _ = await sc._failure_variant(env, "all", "all")
    try:
        out["failfast"] = await _profile(
            env, v, "fail-fast", sc.with_fault(sc.CHAT, "status=503"), 8.0, 100,
            "every answer 503, so the breaker is open: fail-fast answers at 100 requests/s",
        )  # fmt: skip
    finally:
        if v.proc is not None:
            env.stop(v.proc)
    return out


def _category(frame: str) -> str:
    """`func (path/to/file.py:12)` → the package or sidecar module it belongs to."""
    path = frame[frame.rfind("(") + 1 :].split(":")[0] if "(" in frame else frame
    for marker in ("/sidecar/", "site-packages/", "/lib/python3"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            if marker == "/sidecar/":
                return "sidecar/" + tail.removesuffix(".py")
            if marker == "site-packages/":
                return tail.split("/")[0].removesuffix(".py")
            return "stdlib:" + tail.split("/")[1].removesuffix(".py") if "/" in tail else "stdlib"
    return path or "?"


def _collapsed_summary(text: str) -> dict[str, Any]:
    total = 0
    leaf: collections.Counter[str] = collections.Counter()
    leaf_fn: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        leaf[_category(frames[-1])] += count
        leaf_fn[frames[-1].split(" (")[0] + " (" + _category(frames[-1]) + ")"] += count
        for cat in {_category(f) for f in frames}:
            inclusive[cat] += count
        for fn in {f.split(" (")[0] + " (" + _category(f) + ")" for f in frames}:
            functions[fn] += count
    if not total:
        return {"samples": 0}

    def share(counter: collections.Counter[str], n: int) -> list[tuple[str, float]]:
        # Frames under which everything runs (the entry point, the event loop) say nothing.
        ranked = [(k, round(v / total, 3)) for k, v in counter.most_common()]
        return [(k, v) for k, v in ranked if v < 0.7][:n]

    interesting = collections.Counter(
        {k: v for k, v in functions.items() if "sidecar/" in k or "opentelemetry" in k
         or "structlog" in k or "aiohttp" in k or "prometheus" in k}
    )  # fmt: skip
    return {
        "samples": total,
        "self_by_package": share(leaf, 14),
        "self_functions": share(leaf_fn, 12),
        "inclusive_by_package": share(inclusive, 18),
        "inclusive_functions": share(interesting, 25),
    }


async def _run(args: argparse.Namespace, cores: Cores) -> dict[str, Any]:
    quick = bool(args.quick)
    rounds = args.rounds
    work = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    results: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": sc.machine_info(),
        "versions": _versions(),
        "cores": cores.describe(),
        "command": "make bench-quick" if quick else "make bench",
        "argv": "python -m scripts.bench " + " ".join(sys.argv[1:]),
        "rounds": rounds,
    }
    env = sc.Env(work, cores, haproxy=not quick, extra_sidecars=not quick)
    t_start = time.monotonic()
    try:
        _log(
            "starting the demo model, OTLP receiver, floor proxy, sidecars"
            + ("" if quick else ", HAProxy")
        )
        await env.setup()
        results["policies"] = {k: v.read_text() for k, v in env.policies.files.items()}
        results["dropped"] = env.policies.dropped
        results["idle_rss_mb"] = {k: round(v / 2**20, 1) for k, v in env.idle_rss.items()}

        def present(*keys: str) -> list[str]:
            return [k for k in keys if k in env.variants]

        base = present("direct", "haproxy", "passthrough", "all")
        # The floor proxy only in the healthy runs at 200 rps: next to the CPU target.
        at_200 = present("direct", "haproxy", "floor", "passthrough", "all")
        if quick:
            _log(f"healthy, 200 rps: {', '.join(at_200)}")
            results["healthy"] = {
                "200": await sc.healthy(
                    env,
                    at_200,
                    200,
                    args.duration or 4.0,
                    rounds,
                    log=_log,
                )
            }
        else:
            want = set(args.only.split(",")) if args.only else set(SCENARIOS)

            def on(name: str) -> bool:
                return name in want

            if on("healthy"):
                results["healthy"] = {}
                for rate, keys, duration in (
                    (200, [*at_200, *present("all_notrace", "all_trace100")], 5.0),
                    (50, base, 6.0),
                    (500, base, 5.0),
                ):
                    _log(f"healthy, {rate} rps: {', '.join(keys)}")
                    results["healthy"][str(rate)] = await sc.healthy(
                        env, keys, rate, args.duration or duration, rounds, log=_log
                    )
            if on("sse"):
                _log(f"SSE, 50 rps, events {sc.SSE_CHUNK_INTERVAL_MS} ms apart")
                results["sse"] = await sc.sse(env, base, 50, args.duration or 5.0, rounds, log=_log)
            if on("streams"):
                _log("1,000 open streams (hold_after_first)")
                keys = [*base, *(["floor"] if "floor" in env.variants else [])]
                results["streams"] = await sc.open_streams(env, keys, 1000, rounds, log=_log)
            if on("hang"):
                _log("failure: the model hangs")
                results["hang"] = await sc.hang(env, base, rounds, log=_log)
            if on("503"):
                _log("failure: 100% 503")
                results["always_503"] = await sc.always_503(env, [*base, "naive"], rounds, log=_log)
            if on("overload"):
                _log("failure: overload at 2x the model's concurrency")
                results["overload"] = await sc.overload(
                    env, [k if k != "all" else "overload" for k in base], rounds, log=_log
                )
            if on("flapping"):
                _log("failure: flapping 10 s down / 10 s up")
                results["flapping"] = await sc.flapping(env, base, rounds, log=_log)
            if on("profile") and not args.no_profile:
                _log("profiling the all-features sidecar at 200 rps (py-spy)")
                results["profiles"] = await _profiles(env)
            if on("soak") and not args.no_soak:
                _log(f"soak: all features, 100 rps, {args.soak_minutes:g} minutes")
                results["soak"] = await sc.soak(env, "all", 100, args.soak_minutes, log=_log)
        results["otlp_received"] = await env.otlp_stats()
        results["metrics_requests_all"] = await env.sidecar_requests_metric(env.variants["all"])
        results["notes"] = env.notes
        for key, v in env.variants.items():
            if v.proc is not None:
                results.setdefault("final_rss_mb", {})[key] = round(v.proc.stats().rss / 2**20, 1)
                results.setdefault("final_hwm_mb", {})[key] = round(v.proc.stats().hwm / 2**20, 1)
    finally:
        await env.close()
        results["elapsed_s"] = round(time.monotonic() - t_start, 1)
        shutil.rmtree(work, ignore_errors=True)
    return results


def _on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="the CI smoke run (< 2 minutes)")
    parser.add_argument("--no-soak", action="store_true", help="skip the 10-minute soak")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument("--soak-minutes", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 3)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per measured run")
    parser.add_argument("--output", type=Path, default=DOCS / "benchmarks.md")
    parser.add_argument("--charts", type=Path, default=DOCS, help="where the PNG charts go")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results")
    parser.add_argument(
        "--only",
        default=None,
        help=f"full run: only these scenarios, comma-separated ({','.join(SCENARIOS)}); with "
        "--json naming an earlier full run's file, the new results replace those in it",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="only render the report from raw results written earlier",
    )
    args = parser.parse_args(argv)

    from scripts import bench_report

    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        if not args.quick:
            _ensure_haproxy()
        _raise_fd_limit()
        cores = Cores.detect()
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cores.load)
        signal.signal(signal.SIGTERM, _on_signal)
        results = asyncio.run(_run(args, cores))
        if args.only and args.json and args.json.exists():
            earlier = json.loads(args.json.read_text())
            if earlier.get("mode") == results["mode"]:
                merged = {**earlier, **{k: v for k, v in results.items() if v is not None}}
                merged["argv"] = f"{earlier.get('argv')}; then {results['argv']}"
                merged["elapsed_s"] = (earlier.get("elapsed_s") or 0) + results["elapsed_s"]
                results = merged
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
    bench_report.write(results, args.output, args.charts)
    _log(f"wrote {args.output} in {results.get('elapsed_s')} s of measuring")
    for line in bench_report.headline(results):
        _log("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
