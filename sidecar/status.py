"""`sidecar status`: one screen of what a running sidecar is doing now, from its admin listener.

Reads `GET /admin/status` (`sidecar.server.status`; bearer `SIDECAR_ADMIN_TOKEN` when set) and
renders it with `rich`: per route the request rate, the shares of success / fallback /
escalated / error, failures by mode, the breaker's state and time to its next probe, the retry
budget left and in-flight requests against the limit; then every breaker and the review backlog.
Rates and counts cover the window the sidecar reports (the last minute while it is polled).

`--watch` redraws every `--interval` (default 2s) until interrupted: in place on a terminal, one
frame after another when the output is a pipe or a file. `--json` prints the document itself.
Exit status: 0 shown, 1 the sidecar could not be reached or refused the token.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rich and aiohttp load when the command runs (`sidecar --help` stays fast)
    import aiohttp
    from rich.console import Console, RenderableType

__all__ = ["add_status_parser", "admin_url", "fetch_status", "run_status"]

DEFAULT_ADMIN_URL = "http://127.0.0.1:8701"


class StatusUnavailable(Exception):
    """The sidecar did not answer, or refused the request."""


def add_status_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="show what a running sidecar is doing now (admin port)")
    p.add_argument(
        "--admin-url",
        help=f"the sidecar's admin listener (env SIDECAR_ADMIN_URL, default {DEFAULT_ADMIN_URL})",
    )
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    p.add_argument("--interval", default="2s", help="refresh interval with --watch (default 2s)")
    p.add_argument("--json", action="store_true", help="print the /admin/status JSON")


def admin_url(value: str | None, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    url = value or env.get("SIDECAR_ADMIN_URL") or DEFAULT_ADMIN_URL
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def admin_headers(env: Mapping[str, str] | None = None) -> dict[str, str]:
    env = os.environ if env is None else env
    token = env.get("SIDECAR_ADMIN_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


async def fetch_status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    import aiohttp

    try:
        async with session.get(
            url + "/admin/status", headers=admin_headers(), allow_redirects=False
        ) as resp:
            body = await resp.text()
            if resp.status != 200:
                try:
                    message = json.loads(body)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = body[:200]
                hint = " (set SIDECAR_ADMIN_TOKEN)" if resp.status in (401, 403) else ""
                raise StatusUnavailable(f"{url}: HTTP {resp.status}: {message}{hint}")
            data: dict[str, Any] = json.loads(body)
            return data
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise StatusUnavailable(f"{url}: {type(exc).__name__}: {exc}") from None


# -- the command ---------------------------------------------------------------------------------


def _console() -> Console:
    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    # A pipe or a file: wide enough that rows do not wrap (COLUMNS still wins).
    width = int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else 200
    return Console(width=width)


async def _watch(url: str, interval: float, as_json: bool, console: Console) -> int:
    import aiohttp
    from rich.live import Live
    from rich.text import Text

    from sidecar.status_screen import render_status

    timeout = aiohttp.ClientTimeout(total=max(2.0, interval * 2))
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def frame() -> RenderableType:
            try:
                status = await fetch_status(session, url)
            except StatusUnavailable as exc:
                return Text(f"sidecar status: {exc} (retrying every {interval:g}s)", style="red")
            if as_json:
                return json.dumps(status)
            return render_status(status, url)

        if console.is_terminal and not as_json:
            # Redrawn in place; ends with Ctrl-C (KeyboardInterrupt, caught by run_status).
            with Live(await frame(), console=console, auto_refresh=False) as screen:
                while True:
                    await asyncio.sleep(interval)
                    screen.update(await frame(), refresh=True)
        while True:
            # A pipe or a file: one frame after another (JSON: one document per line).
            if not as_json:
                console.rule(dt.datetime.now().strftime("%H:%M:%S"))
            shown = await frame()
            if isinstance(shown, str):
                print(shown, flush=True)
            else:
                console.print(shown)
                sys.stdout.flush()
            await asyncio.sleep(interval)


async def _once(url: str, as_json: bool, console: Console) -> int:
    import aiohttp

    from sidecar.status_screen import render_status

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        try:
            status = await fetch_status(session, url)
        except StatusUnavailable as exc:
            print(f"sidecar status: {exc}", file=sys.stderr)
            return 1
    if as_json:
        print(json.dumps(status, indent=2))
    else:
        console.print(render_status(status, url))
    return 0


def run_status(args: argparse.Namespace) -> int:
    from sidecar.policy.units import parse_duration

    url = admin_url(args.admin_url)
    try:
        interval = max(0.1, parse_duration(args.interval))
    except ValueError as exc:
        print(f"sidecar status: --interval: {exc}", file=sys.stderr)
        return 2
    console = _console()
    if not args.watch:
        return asyncio.run(_once(url, args.json, console))
    try:
        return asyncio.run(_watch(url, interval, args.json, console))
    except KeyboardInterrupt:
        return 0
