"""`alertd` command line: run, reload, status, tail, check, verify, dlq, jobs, pause,
resume, cancel, priority.

Maps errors to exit codes (see errors.py); everything else lives in the
modules it calls. Each subcommand takes --config.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tomllib
from pathlib import Path

from . import __version__, check, commands, config, statedir
from .errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, AlertdError, ConfigError


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=os.environ.get("ALERTD_CONFIG",
                                                             config.DEFAULT_CONFIG_PATH),
                   help="TOML config file (default: $ALERTD_CONFIG or %(default)s)")


EXIT_CODES = """exit codes:
  0  ok
  1  a failure was found (verify: rows without exactly one final outcome;
     dlq replay: dead letters failed again; run: another alertd holds the
     state directory)
  2  bad command line or configuration (nothing started; stderr names the key)
  3  the daemon's status API cannot be reached"""

JOB_EXIT = ("job control exits 0 when done, 1 when there is no such job or it cannot take\n"
            "the action in its state (one line says which), 2 on bad usage, 3 when the\n"
            "daemon cannot be reached.")
JOB_COMMANDS = [
    ("pause", "hold a job: no new row of it is sent until resumed (kept across restarts)",
     "Within 1 s no new row of the job is sent; requests in flight finish, rows waiting\n"
     "for a retry are held. The job stays paused across a restart until resumed."),
    ("resume", "let a paused job go on", "A paused job is scheduled again."),
    ("cancel", "stop a job: its rows not yet finally sent end as `cancelled`",
     "Within 1 s no new row is sent; requests in flight finish with their real outcome;\n"
     "every other row ends as `cancelled` (one range record in wal/worker-998.wal, not one\n"
     "record per row). The summary counts them and has status \"cancelled\"; `alertd\n"
     "verify` still proves one final outcome per row. Cannot be undone."),
]

CONFIG_HELP = "every command reads --config (default $ALERTD_CONFIG, else " \
    f"{config.DEFAULT_CONFIG_PATH})"


def _sub(sub: argparse._SubParsersAction, name: str, help_: str, description: str,
         extra: str = "") -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=description,
                       epilog=(extra + "\n\n" if extra else "") + EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_arg(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="alertd", description="Deliver every row of CSV files dropped in a folder as a "
        "signed webhook call.", epilog=CONFIG_HELP + "\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"alertd {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = _sub(sub, "run", "run the daemon in the foreground (what systemd starts)",
             "Run the supervisor and its workers in the foreground until TERM/INT.",
             "signals: HUP reloads the config (a bad one is logged and the running one\n"
             "kept); TERM/INT drain (finish requests in flight for up to [shutdown] grace\n"
             "seconds, fsync, exit 0); a second TERM/INT hurries.\n"
             "Under systemd (Type=notify) it reports READY/RELOADING/STOPPING/WATCHDOG.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default=None, choices=["text", "json"],
                   help="text (default; '<N>' journald priorities when JOURNAL_STREAM is set) "
                   "or json (one object per line)")

    p = _sub(sub, "reload", "validate the config, send HUP to the daemon, wait for its result",
             "Load --config exactly as `run` does (a bad file: exit 2 with the error, nothing\n"
             "is sent), send HUP to the daemon whose status API ([status] listen) answers\n"
             "(its pid comes from /v1/status), and wait for that daemon's reload result.\n"
             "Exit 0 once the new config is live, 1 with the daemon's reason when it kept\n"
             "the running config, 3 when no daemon answers. systemd's ExecReload runs it.")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the daemon's result (default %(default)s)")

    p = _sub(sub, "status", "show jobs, workers, rate limiter, breaker, last reload",
             "Ask the running daemon's status API ([status] listen) and print a table:\n"
             "state, progress, counts, rate and ETA per job, then RSS, CPU and requests\n"
             "in flight per worker. Job counts are live (about twice a second from the\n"
             "workers); the footnote says how many are not yet durable (chunk not acked).")
    p.add_argument("--json", action="store_true", help="print the /v1/status JSON document")
    p.add_argument("--watch", action="store_true", help="redraw every --interval seconds "
                   "until Ctrl-C (keeps trying while the daemon restarts)")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="refresh period for --watch (default %(default)s)")

    p = _sub(sub, "tail", "print outcomes from all worker WALs merged in time order",
             "Print the outcome records of every worker's WAL, merged by time:\n"
             "delivered, rejected, dead, and the per-chunk markers. Reads files only:\n"
             "works whether or not the daemon runs.")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new outcomes "
                   "until Ctrl-C")
    p.add_argument("-n", "--lines", type=int, default=20, help="outcomes to show first "
                   "(0 = all; default %(default)s)")
    p.add_argument("--json", action="store_true", help="print WAL records as JSON lines")
    p.add_argument("--job", help="only this job's records (e.g. j000042)")
    p.add_argument("--outcome", help="only records with this outcome (delivered, rejected, dead, "
                   "cancelled, chunk, replayed, ...)")

    p = _sub(sub, "verify", "prove every row of a job has exactly one final outcome",
             "Re-read the job's source file (spool/ or done/) and check that every row\n"
             "has exactly one final outcome (delivered, rejected, dead, or cancelled: inside\n"
             "the range a cancel recorded, with no other outcome) in the WALs.\n"
             "Exit 1 if any row has none or more than one.")
    p.add_argument("job", help="job id, e.g. j000042 (see `alertd status` or done/)")

    p = _sub(sub, "check", "dry run: read a file as a job would, send nothing",
             "Read FILE exactly as a job would (same header rules, planner, row reader and\n"
             "parser) and send nothing: rows, rejected rows by reason (the first few with\n"
             "their offsets), the estimated duration at [rate] limit, and one sample alert\n"
             "rendered with the configured secrets. Needs no daemon; memory stays bounded\n"
             "by one chunk. Exit 1 when the file would fail as a job (binary, no id\n"
             "column, not a regular file), 0 otherwise.")
    p.add_argument("file", help="the CSV file to check")

    p = _sub(sub, "dlq", "dead letters: list them, or replay them with their original ids",
             "list: the dead-letter files (dlq/<job>.jsonl) with their line counts.\n"
             "replay: ask the running daemon to replay the dead letters of a finished job\n"
             "(or of every finished job) as a job of kind `replay`: the same workers, rate\n"
             "budget, retries, breaker and WAL as any job, pause and cancel included, with\n"
             "each alert's original webhook-id. The letters leave the DLQ; those that fail\n"
             "again go back to it. Prints progress until the replay ends; Ctrl-C only\n"
             "detaches (exit 130: the replay goes on), and running it again attaches to it.\n"
             "What the replay delivers counts as delivered in the original job's summary\n"
             "(`replayed` says how many). Exit 1 if any letter failed again or was not sent.")
    p.add_argument("action", choices=["list", "replay"])
    p.add_argument("job", nargs="?", help="only this job")

    p = _sub(sub, "jobs", "list queued, running, paused and recently finished jobs",
             "Ask the running daemon for its jobs: queued, running, paused, then the last 50\n"
             "finished (complete, cancelled, failed with the reason), with state, priority,\n"
             "rows known so far (N+ while running), delivered, rejected, dead, cancelled and\n"
             "progress.")
    p.add_argument("--json", action="store_true", help="print the /v1/jobs JSON document")
    for name, help_, desc in JOB_COMMANDS:
        p = _sub(sub, name, help_, desc, JOB_EXIT)
        p.add_argument("job", help="job id, e.g. j000042 (see `alertd jobs`)")
    p = _sub(sub, "priority", "set a job's priority: high, normal or low",
             "Chunks go out by strict priority (high before normal before low), round robin\n"
             "among the jobs of one level. Kept across restarts.", JOB_EXIT)
    p.add_argument("job", help="job id, e.g. j000042")
    p.add_argument("priority", choices=["high", "normal", "low"])
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        strict = args.cmd in ("run", "reload", "check")
        cfg = config.load(args.config) if strict else _load_for_reading(args.config)
    except ConfigError as e:
        print(f"alertd: {e}{_where_configs_come_from(args.config)}", file=sys.stderr)
        return EXIT_CONFIG
    for w in cfg.warnings:
        print(f"alertd: {w}", file=sys.stderr)
    try:
        if args.cmd == "run":
            return _run(cfg, args)
        if args.cmd == "reload":
            return commands.reload(cfg, timeout=max(0.1, args.timeout))
        if args.cmd == "status":
            return commands.status(cfg, as_json=args.json, watch=args.watch,
                                   interval=max(0.1, args.interval))
        if args.cmd == "tail":
            return commands.tail(cfg, follow=args.follow, lines=args.lines, as_json=args.json,
                                 job=args.job, outcome=args.outcome)
        if args.cmd == "check":
            return check.check(cfg, Path(args.file))
        if args.cmd == "verify":
            return commands.verify(cfg, args.job)
        if args.cmd == "dlq" and args.action == "replay":
            from .dlqcmd import replay
            return replay(cfg, args.job)
        if args.cmd == "dlq":
            return commands.dlq_list(cfg, args.job)
        if args.cmd == "jobs":
            return commands.jobs(cfg, as_json=args.json)
        if args.cmd in ("pause", "resume", "cancel", "priority"):
            return commands.job_action(cfg, args.job, args.cmd, getattr(args, "priority", None))
    except commands.Unavailable as e:
        print(f"alertd: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except AlertdError as e:
        print(f"alertd: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:  # `alertd tail | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return EXIT_CONFIG


def _where_configs_come_from(path: str) -> str:
    """First contact: no config at all. Say how to point at one and where an example is."""
    if os.path.lexists(path):
        return ""
    return ("; point at one with --config FILE or ALERTD_CONFIG=FILE (start from the "
            "example systemd/alertd.toml in the alertd source)")


def _load_for_reading(path: str) -> config.Config:
    """The config for status/tail/verify/dlq, which need only [paths] and [status].

    After a reload that failed, the file on disk is broken while the daemon runs
    on its previous version: that is when an operator runs `alertd status`, so
    a bad value elsewhere is a warning here, not a refusal.
    """
    try:
        return config.load(path)
    except ConfigError as e:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
            base = Path(path).resolve().parent
            cfg = config.from_dict({"paths": raw.get("paths", {}), "status": raw.get("status", {}),
                                    "webhook": {"url": "http://localhost/"}}, base)
        except (OSError, tomllib.TOMLDecodeError, ConfigError, AttributeError):
            raise e from None
        print(f"alertd: warning: {e} (using only [paths] and [status])", file=sys.stderr)
        return cfg


def _run(cfg: config.Config, args: argparse.Namespace) -> int:
    import uvloop

    from .logs import setup
    from .supervisor import Supervisor

    if args.log_format:
        os.environ["ALERTD_LOG_FORMAT"] = args.log_format  # workers inherit it
    level = getattr(logging, args.log_level.upper())
    setup(level, "supervisor")
    # Outcome files hold user IDs: whatever umask the operator's shell has, nothing this
    # daemon (or a worker, which inherits it) creates is readable by others.
    os.umask(statedir.UMASK)
    try:
        prepared = statedir.prepare(cfg)
    except ConfigError as e:
        print(f"alertd: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except statedir.Busy as e:
        print(f"alertd: {e}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        return uvloop.run(Supervisor(cfg, level).run())
    except ConfigError as e:  # refused at start (e.g. the status address is taken)
        prepared.undo()
        print(f"alertd: {e}", file=sys.stderr)
        return EXIT_CONFIG


def console() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console()
