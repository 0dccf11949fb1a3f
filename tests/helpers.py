"""Process-level test helpers: start/stop the mock webhook, poll with deadlines, post alerts.

Shared by every test that runs real processes on 127.0.0.1; nothing here
sleeps for synchronisation except between polls of a condition.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import pytest

# make test runs two tests at a time (pytest-xdist, --dist loadgroup): tests that measure a
# rate or load the machine with several daemons run one after another in this group, on
# one of the two, so that no two of them share the cores with each other.
TIMING = pytest.mark.xdist_group("timing")

ROOT = Path(__file__).resolve().parent.parent
LISTEN_RE = re.compile(rb"mock_webhook: listening on http://[^:]+:(\d+)/ mode=(\w+)")
T = TypeVar("T")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def start_mock(*args: str, record: str | os.PathLike[str] | None = None,
               timeout: float = 10.0) -> tuple[subprocess.Popen[bytes], int]:
    """Start `python -m mock_webhook --port 0 *args`; return (process, bound port)."""
    cmd = [sys.executable, "-m", "mock_webhook", "--port", "0", *args]
    if record is not None:
        cmd += ["--record", str(record)]
    # stderr is inherited so pytest shows a crashing mock's traceback.
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE)
    assert p.stdout is not None
    fd = p.stdout.fileno()
    os.set_blocking(fd, False)
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                stop_process(p, timeout=2)
                raise AssertionError(f"mock_webhook printed no listening line in {timeout}s: {buf!r}")
            if sel.select(left):
                chunk = os.read(fd, 4096)
                if not chunk:  # EOF: the process died before listening
                    rc = p.wait(timeout=5)
                    raise AssertionError(f"mock_webhook exited with {rc} before listening: {buf!r}")
                buf += chunk
    m = LISTEN_RE.match(buf)
    if m is None:
        stop_process(p, timeout=2)
        raise AssertionError(f"unexpected first line from mock_webhook: {buf!r}")
    return p, int(m.group(1))


def stop_process(p: subprocess.Popen[Any], timeout: float = 10) -> int:
    """SIGTERM, wait up to `timeout`, then SIGKILL; return the exit code (-9 if killed)."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for stream in (p.stdout, p.stderr):
        if stream is not None:
            stream.close()
    return p.returncode


def wait_until(pred: Callable[[], T], timeout: float, interval: float = 0.02,
               what: str = "condition") -> T:
    """Poll `pred` until it returns a truthy value (which is returned) or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def get_stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as resp:
        return json.loads(resp.read())


def post_json(port: int, path: str, obj: Any) -> tuple[int, Any]:
    """POST a JSON body (e.g. to /control); return (status, decoded JSON answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", path, body=json.dumps(obj).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def post_alerts(port: int, alerts: Iterable[tuple[str, bytes, dict[str, str]]],
                path: str = "/hook") -> list[tuple[int, dict[str, str]]]:
    """POST (id, body, extra headers) alerts over one keep-alive connection.

    Returns (status, lower-cased response headers) per alert, in order.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out = []
    try:
        for msg_id, body, extra in alerts:
            headers = {"webhook-id": msg_id, "Content-Type": "application/json", **extra}
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            out.append((resp.status, {k.lower(): v for k, v in resp.getheaders()}))
    finally:
        conn.close()
    return out


def post_alert(port: int, msg_id: str, body: bytes = b"{}",
               headers: dict[str, str] | None = None) -> int:
    """POST one alert; return the status code."""
    return post_alerts(port, [(msg_id, body, headers or {})])[0][0]
