"""`alertd` command line: run, status, tail, verify, dlq.

Maps errors to exit codes (see errors.py); everything else lives in the
modules it calls. Each subcommand takes --config.
"""
from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import sys
import time
from pathlib import Path

import orjson

from . import __version__, commands, config
from .errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, AlertdError, ConfigError


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=os.environ.get("ALERTD_CONFIG",
                                                             config.DEFAULT_CONFIG_PATH),
                   help="TOML config file (default: $ALERTD_CONFIG or %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="alertd", description="Deliver every row of CSV files dropped in a folder as a "
        "signed webhook call.",
        epilog="exit codes: 0 ok, 1 failure found (e.g. verify), 2 bad usage or config, "
        "3 daemon unreachable")
    ap.add_argument("--version", action="version", version=f"alertd {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the daemon in the foreground (what systemd starts)")
    _config_arg(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default=None, choices=["text", "json"],
                   help="text (default; journald priorities under systemd) or json")

    p = sub.add_parser("status", help="show jobs, workers and the rate limiter")
    _config_arg(p)
    p.add_argument("--json", action="store_true", help="print the raw /v1/status JSON")
    p.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")

    p = sub.add_parser("tail", help="print outcomes from all worker WALs, oldest first")
    _config_arg(p)
    p.add_argument("-f", "--follow", action="store_true", help="keep following new outcomes")
    p.add_argument("-n", "--lines", type=int, default=20, help="outcomes to show first (0 = all)")
    p.add_argument("--json", action="store_true", help="print WAL records as JSON lines")

    p = sub.add_parser("verify", help="prove every row of a job has exactly one final outcome")
    _config_arg(p)
    p.add_argument("job", help="job id, e.g. j000042")

    p = sub.add_parser("dlq", help="dead letters: list them")
    _config_arg(p)
    p.add_argument("action", choices=["list"])
    p.add_argument("job", nargs="?", help="only this job")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config.load(args.config)
    except ConfigError as e:
        print(f"alertd: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.cmd == "run":
            return _run(cfg, args)
        if args.cmd == "status":
            return commands.status(cfg, as_json=args.json, watch=args.watch)
        if args.cmd == "tail":
            return commands.tail(cfg, follow=args.follow, lines=args.lines, as_json=args.json)
        if args.cmd == "verify":
            return commands.verify(cfg, args.job)
        if args.cmd == "dlq":
            return commands.dlq_list(cfg, args.job)
    except commands.Unavailable as e:
        print(f"alertd: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except AlertdError as e:
        print(f"alertd: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_CONFIG


def _run(cfg: config.Config, args: argparse.Namespace) -> int:
    import uvloop

    from .logs import setup
    from .supervisor import Supervisor

    if args.log_format:
        os.environ["ALERTD_LOG_FORMAT"] = args.log_format  # workers inherit it
    level = getattr(logging, args.log_level.upper())
    setup(level, "supervisor")
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        lock = open(cfg.state_dir / "alertd.lock", "a")
    except OSError as e:
        print(f"alertd: cannot use state_dir {cfg.state_dir}: {e.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"alertd: another alertd is already running on {cfg.state_dir}", file=sys.stderr)
        return EXIT_FAILURE
    return uvloop.run(Supervisor(cfg, level).run())


def console() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console()
