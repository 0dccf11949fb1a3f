"""Command line for the mock webhook: parse flags, pick the engine, serve until SIGTERM/SIGINT.

Owns process concerns only; HTTP lives in fast.py (default) or server.py
(aiohttp), behaviour in core.py.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from .core import MODES, Settings

ENGINES = ("fast", "aiohttp")
# Idle keep-alive connections must not hold up SIGTERM; in-flight requests get this long.
SHUTDOWN_TIMEOUT = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="mock_webhook", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True, help="0 picks a free port")
    ap.add_argument("--mode", choices=MODES, default="ok")
    ap.add_argument("--rate", type=float, default=100.0, help="ratelimit mode: requests/s")
    ap.add_argument("--fail-ratio", type=float, default=None,
                    help="fail/flaky share (default 1.0 for fail, 0.5 for flaky)")
    ap.add_argument("--latency-ms", type=float, default=None,
                    help="delay before answering (default 200 in slow mode, else 0)")
    ap.add_argument("--secret", action="append", default=[],
                    help="whsec_ secret to verify signatures with; repeatable")
    ap.add_argument("--record", default=None, help="append one JSON line per alert here")
    ap.add_argument("--engine", choices=ENGINES, default="fast",
                    help="fast: raw protocols + httptools (default); aiohttp: the aiohttp server")
    args = ap.parse_args(argv)
    if args.rate < 0:
        ap.error(f"--rate must be >= 0, got {args.rate}")
    if args.fail_ratio is not None and not 0 <= args.fail_ratio <= 1:
        ap.error(f"--fail-ratio must be in [0, 1], got {args.fail_ratio}")
    if args.latency_ms is not None and args.latency_ms < 0:
        ap.error(f"--latency-ms must be >= 0, got {args.latency_ms}")
    return args


async def serve_aiohttp(settings: Settings, host: str, port: int) -> None:
    from aiohttp import web

    from .server import Receiver

    receiver = Receiver(settings)
    # The low-level server skips the Application/router layers: the receiver
    # dispatches by path itself, which is measurably faster on the alert path.
    runner = web.ServerRunner(web.Server(receiver.dispatch, access_log=None),
                              shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    await receiver.start()
    try:
        site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
        await site.start()
        bound = runner.addresses[0][1]
        sys.stdout.write(f"mock_webhook: listening on http://{host}:{bound}/ mode={settings.mode}"
                         " engine=aiohttp\n")
        sys.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
        await receiver.stop()  # flushes the record file


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(mode=args.mode, rate=args.rate, fail_ratio=args.fail_ratio,
                        latency_ms=args.latency_ms, secrets=args.secret, record=args.record)
    if args.engine == "fast":
        from .fast import serve
    else:
        serve = serve_aiohttp
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(settings, args.host, args.port))
    else:
        uvloop.run(serve(settings, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
