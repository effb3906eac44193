"""The `sidecar` command line: run, validate, schema, demo-model, reviews, failures, calibrate.

Flags beat environment variables, environment variables beat the policy file.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

DEFAULT_POLICY = "policies/default.yaml"


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the sidecar (proxy and admin listeners)")
    p.add_argument("--policy", help=f"policy file (env SIDECAR_POLICY, default {DEFAULT_POLICY})")
    p.add_argument("--upstream", help="URL of the default upstream (env SIDECAR_UPSTREAM_URL)")
    p.add_argument("--host", help="proxy bind address (env SIDECAR_HOST)")
    p.add_argument("--port", type=int, help="proxy port, 0 for any free port (env SIDECAR_PORT)")
    p.add_argument("--admin-host", help="admin bind address (env SIDECAR_ADMIN_HOST)")
    p.add_argument("--admin-port", type=int, help="admin port (env SIDECAR_ADMIN_PORT)")
    p.add_argument("--log-format", choices=["json", "console"], help="log format")
    p.add_argument(
        "--allow-pure-python-parser",
        action="store_true",
        help="start even when aiohttp's C HTTP parser is not available (not recommended)",
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from sidecar.app import RunSettings, run
    from sidecar.policy.loader import Overrides, PolicyError

    env = os.environ
    policy_path = args.policy or env.get("SIDECAR_POLICY") or DEFAULT_POLICY
    try:
        overrides = Overrides.from_env(env).then(
            Overrides(
                upstream_url=args.upstream,
                host=args.host,
                port=args.port,
                admin_host=args.admin_host,
                admin_port=args.admin_port,
            )
        )
    except PolicyError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 2
    try:
        settings = RunSettings.with_env(
            Path(policy_path),
            overrides,
            allow_pure_python_parser=args.allow_pure_python_parser
            or env.get("SIDECAR_ALLOW_PURE_PYTHON_PARSER") == "1",
        )
    except ValueError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 2
    return run(settings)


def _cmd_validate(args: argparse.Namespace) -> int:
    from sidecar.policy.loader import PolicyError, load_policy

    status = 0
    for path in args.files:
        try:
            load_policy(path)
        except PolicyError as exc:
            status = 2
            for line in exc.errors:
                print(f"{path}: {line}")
        else:
            print(f"{path}: ok")
    return status


def _cmd_schema(args: argparse.Namespace) -> int:
    from sidecar.policy.loader import policy_json_schema

    print(policy_json_schema())
    return 0


def _duration(text: str) -> float:
    """An argparse type: `20ms` or `1.5s` in seconds."""
    from sidecar.demo.faults import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_demo_model(args: argparse.Namespace) -> int:
    from sidecar.demo.server import main as demo_main

    return demo_main(args.host, args.port, chunk_interval=args.chunk_interval)


def _cmd_reviews(args: argparse.Namespace) -> int:
    from sidecar.review.cli import run_reviews

    return run_reviews(args)


def _cmd_failures(args: argparse.Namespace) -> int:
    from sidecar.failures.cli import run_failures

    return run_failures(args)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from sidecar.failures.cli import run_calibrate

    return run_calibrate(args)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from sidecar.migrate import run_migrate

    return run_migrate(args)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from sidecar.doctor import run_doctor

    return run_doctor(args)


def _cmd_status(args: argparse.Namespace) -> int:
    from sidecar.status import run_status

    return run_status(args)


def _cmd_inject(args: argparse.Namespace) -> int:
    from sidecar import inject

    return inject.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    v = sub.add_parser("validate", help="validate policy files (exit 0 valid, 2 invalid)")
    v.add_argument("files", nargs="+")
    sub.add_parser("schema", help="print the policy JSON Schema")
    i = sub.add_parser("inject", help="add the sidecar to Kubernetes YAML (file or stdin)")
    from sidecar import inject

    inject.add_arguments(i)
    d = sub.add_parser("demo-model", help="run the fault-injecting demo model server")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8080)
    d.add_argument(
        "--chunk-interval",
        type=_duration,
        default=0.0,
        metavar="DURATION",
        help="wait that long before each SSE event after the first, e.g. 20ms (default: none); "
        "a request's chunk_interval fault overrides it",
    )
    from sidecar.review.cli import add_reviews_parser

    add_reviews_parser(sub)
    from sidecar.migrate import add_migrate_parser

    add_migrate_parser(sub)
    from sidecar.failures.cli import add_calibrate_parser, add_failures_parser

    add_failures_parser(sub)
    add_calibrate_parser(sub)
    from sidecar.doctor import add_doctor_parser
    from sidecar.status import add_status_parser

    add_doctor_parser(sub)
    add_status_parser(sub)
    return parser


_COMMANDS = {
    "run": _cmd_run,
    "validate": _cmd_validate,
    "schema": _cmd_schema,
    "demo-model": _cmd_demo_model,
    "reviews": _cmd_reviews,
    "migrate": _cmd_migrate,
    "failures": _cmd_failures,
    "calibrate": _cmd_calibrate,
    "doctor": _cmd_doctor,
    "status": _cmd_status,
    "inject": _cmd_inject,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sidecar.telemetry.logging import configure_logging

    configure_logging(getattr(args, "log_format", None))
    return _COMMANDS[args.command](args)
