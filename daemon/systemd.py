"""sd_notify over the unix datagram socket named by NOTIFY_SOCKET.

A few lines instead of a dependency. Silent no-op when not run by systemd;
never raises into the caller (a lost status line must not stop delivery).
"""
from __future__ import annotations

import os
import socket
import time


def notify(*lines: str) -> bool:
    """Send e.g. notify("READY=1", "STATUS=...") ; True if a socket took it."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall("\n".join(lines).encode())
        return True
    except OSError:
        return False


def monotonic_usec() -> str:
    """The MONOTONIC_USEC= field systemd wants with RELOADING=1."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), None if not asked."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None
