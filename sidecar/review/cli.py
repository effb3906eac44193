"""`sidecar reviews list|show|claim|resolve`: the review API from a terminal.

(`sidecar reviews export` is the exception: it reads the review store directly and writes
labelled examples as JSON lines; see `sidecar.failures.cli`.)

Talks to a running sidecar's admin listener (`--admin-url`, env `SIDECAR_ADMIN_URL`, default
http://127.0.0.1:8701) with the reviewer token (`--token`, env `SIDECAR_REVIEWER_TOKEN`).
Exit status: 0 done, 1 the API refused (the envelope's message is printed), 3 conflict (already
resolved or claimed by someone else), 4 not found.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

__all__ = ["add_reviews_parser", "run_reviews"]

DEFAULT_ADMIN_URL = "http://127.0.0.1:8701"


def _default_reviewer() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


def add_reviews_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("reviews", help="list, show, claim and resolve human review items")
    p.add_argument(
        "--admin-url", help=f"admin listener (env SIDECAR_ADMIN_URL, {DEFAULT_ADMIN_URL})"
    )
    p.add_argument("--token", help="reviewer token (env SIDECAR_REVIEWER_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    rs = p.add_subparsers(dest="reviews_command", required=True)
    ls = rs.add_parser("list", help="list items, oldest first")
    ls.add_argument("--route")
    ls.add_argument("--status", choices=["pending", "claimed", "resolved"])
    ls.add_argument("--older-than", help="only items at least this old (e.g. 5m)")
    ls.add_argument("--newer-than", help="only items at most this old (e.g. 1h)")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--cursor", help="next_cursor from a previous page")
    show = rs.add_parser("show", help="one item with its request and the model's answer")
    show.add_argument("id")
    claim = rs.add_parser("claim", help="take a lease on an item")
    claim.add_argument("id")
    claim.add_argument("--reviewer", default=_default_reviewer())
    claim.add_argument("--lease", type=float, help="lease in seconds (server default 5m)")
    res = rs.add_parser("resolve", help="decide an item (once)")
    res.add_argument("id")
    res.add_argument("--decision", required=True, choices=["approve", "override", "reject"])
    res.add_argument("--reviewer", default=_default_reviewer())
    res.add_argument("--note")
    res.add_argument("--answer", help="override: the corrected answer as JSON")
    from sidecar.failures.cli import add_reviews_export_parser

    add_reviews_export_parser(rs)  # reads the store directly: labelled examples as JSONL


class _ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _call(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    base = (args.admin_url or os.environ.get("SIDECAR_ADMIN_URL") or DEFAULT_ADMIN_URL).rstrip("/")
    token = args.token or os.environ.get("SIDECAR_REVIEWER_TOKEN")
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            message = json.loads(raw)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = raw.decode("utf-8", "replace")[:500] or exc.reason
        raise _ApiError(exc.code, str(message)) from None
    except urllib.error.URLError as exc:
        raise _ApiError(0, f"cannot reach {base}: {exc.reason}") from None


def _list(args: argparse.Namespace) -> Any:
    params = {
        "route": args.route,
        "status": args.status,
        "older_than": args.older_than,
        "newer_than": args.newer_than,
        "limit": str(args.limit),
        "cursor": args.cursor,
    }
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    page = _call(args, "GET", f"/reviews?{query}")
    if args.json:
        return page
    for item in page["items"]:
        confidence = item["confidence"]
        shown = "-" if confidence is None else f"{confidence:.4f}"
        print(
            f"{item['id']}  {item['status']:<8}  {item['route']:<16}  {shown:>6}  "
            f"{item['reason']:<7}  {item['created_at']}"
            + (f"  {item['decision']}" if item["decision"] else "")
        )
    if page["next_cursor"]:
        print(f"(more: --cursor {page['next_cursor']})")
    return None


def run_reviews(args: argparse.Namespace) -> int:
    command = args.reviews_command
    if command == "export":
        from sidecar.failures.cli import run_reviews_export

        return run_reviews_export(args)
    review_path = "/reviews/" + urllib.parse.quote(getattr(args, "id", "") or "", safe="")
    try:
        if command == "list":
            result = _list(args)
        elif command == "show":
            result = _call(args, "GET", review_path)
        elif command == "claim":
            body: dict[str, Any] = {"reviewer": args.reviewer}
            if args.lease is not None:
                body["lease_seconds"] = args.lease
            result = _call(args, "POST", review_path + "/claim", body)
        else:
            body = {"decision": args.decision, "reviewer": args.reviewer}
            if args.note is not None:
                body["note"] = args.note
            if args.answer is not None:
                try:
                    body["answer"] = json.loads(args.answer)
                except ValueError as exc:
                    print(f"sidecar reviews: --answer is not JSON: {exc}", file=sys.stderr)
                    return 2
            result = _call(args, "POST", review_path + "/resolve", body)
            if not args.json:
                print(f"{result['id']}: {result['status']} ({result['decision']})")
                return 0
    except _ApiError as exc:
        print(f"sidecar reviews: {exc.message}", file=sys.stderr)
        return {409: 3, 404: 4}.get(exc.status, 1)
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0
