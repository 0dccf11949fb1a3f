"""Signals become Control values on a queue; the supervisor's loop acts on them.

A handler only enqueues (no logging, no allocation beyond the put), as in
gunicorn's arbiter, so a signal can never land in the middle of real work.
"""
from __future__ import annotations

import asyncio
import enum
import signal
from collections.abc import Iterator
from contextlib import contextmanager


class Control(enum.Enum):
    RELOAD = "reload"  # SIGHUP
    DRAIN = "drain"  # SIGTERM / SIGINT


HANDLED = {signal.SIGHUP: Control.RELOAD, signal.SIGTERM: Control.DRAIN,
           signal.SIGINT: Control.DRAIN}


def install(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Control]) -> None:
    for signum, control in HANDLED.items():
        loop.add_signal_handler(signum, queue.put_nowait, control)


@contextmanager
def blocked() -> Iterator[None]:
    """Block the handled signals while spawning children (dramatiq's pattern):
    a signal then waits until the child exists instead of landing half-way."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(HANDLED))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
