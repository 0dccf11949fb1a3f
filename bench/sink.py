"""The benchmark sink: an nginx that answers 200 on 127.0.0.1, and wrk against it.

nginx runs as the current user from a config in a temp dir, in the foreground;
it never reads or writes the system's nginx config, logs or pid file.
"""
from __future__ import annotations

import getpass
import grp
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from alertd.payload import Payloads

# A representative alert, built by alertd's own payload code so wrk sends the
# very bytes (size, headers, signature) alertd sends.
SAMPLE_SECRET = "whsec_YmVuY2gtc2VjcmV0LWZvci1hbGVydGQtYmVuY2htYXJrcw=="
SAMPLE_ROW = ("j000001:1873", "uabcdef0100000012345", "You have a new alert.", "bench.csv", 1873)

_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
{user}
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    # The whole alert fits in memory: nothing is spooled to disk.
    client_body_buffer_size 64k;
    client_max_body_size 1m;
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
    log_format first '$msec $status';
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200; }}
    }}
    # Same sink with an access log: only for the first-request-latency runs, where
    # the log's $msec is the arrival time of each request.
    server {{
        listen 127.0.0.1:{log_port} backlog=4096;
        access_log {dir}/access.log first;
        location / {{ return 200; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode} before listening") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s") from None
            time.sleep(0.05)


def sample_request() -> tuple[dict[str, str], bytes]:
    """(headers, body) of one signed alert, exactly as alertd builds it."""
    alert_id, uid, msg, file, off = SAMPLE_ROW
    head, body = Payloads([SAMPLE_SECRET]).build(alert_id, uid, msg, file, off, time.time())
    headers = {"content-type": "application/json"}
    for line in head.decode().split("\r\n"):
        if line:
            name, _, value = line.partition(": ")
            headers[name] = value
    return headers, body


class Nginx:
    """One foreground nginx; use as a context manager so it always stops."""

    def __init__(self, workdir: Path, workers: int | str = 1) -> None:
        self.dir = workdir / "nginx"
        self.workers = workers
        self.port = 0
        self.log_port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    @property
    def log_url(self) -> str:
        return f"http://127.0.0.1:{self.log_port}/hook"

    @property
    def access_log(self) -> Path:
        return self.dir / "access.log"

    def start(self) -> Nginx:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port, self.log_port = free_port(), free_port()
        # As root, nginx would drop its workers to "nobody"; keep them the current user's.
        user = ""
        if os.geteuid() == 0:
            user = f"user {getpass.getuser()} {grp.getgrgid(os.getegid()).gr_name};"
        conf = self.dir / "nginx.conf"
        conf.write_text(_CONF.format(workers=self.workers, dir=self.dir, user=user,
                                     port=self.port, log_port=self.log_port))
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        # -e: nginx opens its compiled-in error log before reading the config otherwise.
        self.proc = subprocess.Popen([exe, "-p", str(self.dir), "-c", str(conf),
                                      "-e", str(self.dir / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(self.port, 10, self.proc)
            wait_listening(self.log_port, 10, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, master exits
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self.proc = None

    def truncate_log(self) -> None:
        """Empty the access log (nginx keeps appending at the new end: O_APPEND)."""
        if self.access_log.exists():
            os.truncate(self.access_log, 0)

    def first_request_at(self) -> float | None:
        """Epoch seconds (ms resolution) of the first request in the access log, if any."""
        try:
            with open(self.access_log, "rb") as f:
                line = f.readline()
        except FileNotFoundError:
            return None
        if not line.endswith(b"\n"):
            return None
        return float(line.split()[0])

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _lua_str(b: bytes | str) -> str:
    s = b.decode() if isinstance(b, bytes) else b
    # A Lua long bracket takes the bytes verbatim; pick a level the text cannot close.
    eq = "=" * 3
    assert f"]{eq}]" not in s
    return f"[{eq}[{s}]{eq}]"


def write_lua(path: Path) -> Path:
    headers, body = sample_request()
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_str(body)}"]
    # The spaces matter: "[[" would open a Lua long string, and wrk would then drop
    # the whole script and send bare GETs.
    lines += [f"wrk.headers[ {_lua_str(k)} ] = {_lua_str(v)}" for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_ERRORS = re.compile(r"Socket errors:.*")


def run_wrk(url: str, workdir: Path, seconds: float, threads: int = 2,
            connections: int = 128) -> dict[str, object]:
    """wrk POSTing the sample alert to `url`; returns requests/s, wrk's own user+sys CPU
    per request over its run (it is our child: its rusage once reaped), and the raw summary."""
    script = write_lua(workdir / "alert.lua")
    exe = shutil.which("wrk") or "/usr/bin/wrk"
    cmd = [exe, "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s",
           "-s", str(script), url]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    # A broken script is only a line on stderr, and wrk then measures bare GETs.
    if out.returncode != 0 or out.stderr.strip():
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip()}")
    m = _RPS.search(out.stdout)
    if m is None:
        raise RuntimeError(f"no Requests/sec in wrk's output:\n{out.stdout}")
    non2xx = _NON2XX.search(out.stdout)
    errors = _ERRORS.search(out.stdout)
    rps = float(m.group(1))
    return {"requests_per_s": rps, "seconds": seconds, "threads": threads,
            "cpu_us_per_request": round(cpu / max(rps * seconds, 1) * 1e6, 2),
            "connections": connections, "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errors.group(0) if errors else None,
            "body_bytes": len(sample_request()[1]), "output": out.stdout}


class MockSink:
    """`python -m mock_webhook` verifying SAMPLE_SECRET's signatures, as a context manager.

    The bench's second sink: it counts unique ids, duplicates and bad
    signatures, which nginx cannot, at the price of CPU shared with alertd.
    """

    def __init__(self, workdir: Path, engine: str = "fast", *args: str) -> None:
        self.dir = workdir
        self.engine = engine
        self.args = args
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> MockSink:
        import sys

        from tests.procs import ROOT

        self.port = free_port()
        self._log = open(self.dir / f"mock-{self.engine}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "mock_webhook", "--port", str(self.port),
                                      "--secret", SAMPLE_SECRET, "--engine", self.engine, *self.args],
                                     cwd=ROOT, stdout=self._log, stderr=self._log)
        try:
            wait_listening(self.port, 15, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stats(self) -> dict:
        import json
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as r:
            return json.load(r)

    def cpu_seconds(self) -> float:
        import psutil

        assert self.proc is not None
        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def syscalls(self) -> tuple[int, int]:
        """(read, write) system calls so far: per request, they show how reads batch."""
        import psutil

        assert self.proc is not None
        io = psutil.Process(self.proc.pid).io_counters()
        return io.read_count, io.write_count

    def rss_mb(self) -> float:
        import psutil

        assert self.proc is not None
        return round(psutil.Process(self.proc.pid).memory_info().rss / 1e6, 1)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> MockSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
