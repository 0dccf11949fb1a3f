"""The status API (aiohttp): /v1/status, /metrics, /healthz, on a unix socket or loopback TCP.

/v1/status, /metrics and /healthz only read the snapshot the supervisor builds and add
what needs history (rates, ETA, monotonic counters) or the OS (RSS, CPU). The listener
also serves the routes that do change something, under the same auth: intake.py's upload
(POST /v1/files) and jobsapi.py's job control (POST /v1/jobs/{job}/...).
A TCP listener demands the configured bearer token for everything but /healthz.
Each listener is bounded: MAX_CONNECTIONS at once, FIRST_REQUEST_TIMEOUT to send a
request, KEEPALIVE_TIMEOUT idle between requests.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import logging
import math
import os
import socket
import stat
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psutil
from aiohttp import web

from . import __version__, jobsapi, metrics
from .config import Config
from .errors import ConfigError
from .intake import Intake

log = logging.getLogger("alertd.status")

SAMPLE_EVERY = 1.0  # seconds between background samples (rates, counters)
RATE_WINDOW = 10.0  # the daemon-wide delivery rate is averaged over this many seconds
# A job's rate is an exponentially weighted moving average of its live delivered count per
# second, with this time constant: smooth enough that the ETA does not jump with each
# worker report (twice a second) or chunk ack, quick enough to follow a new rate limit.
RATE_TAU = 8.0
RATE_STEP = 0.9  # seconds at least between two updates of a job's average


TOTALS = metrics.OUTCOMES + ("replayed",)


def _totals_of(job: dict[str, Any]) -> dict[str, int]:
    """What a job (summary or snapshot) adds to the outcome totals. A replay job's rows
    are dead letters already counted as dead in their own job: only what it delivered
    counts again, as delivered and as replayed."""
    if job.get("kind") == "replay":
        return {**dict.fromkeys(TOTALS, 0), "delivered": job.get("delivered", 0),
                "replayed": job.get("delivered", 0)}
    return {**{k: job.get(k, 0) for k in metrics.OUTCOMES}, "replayed": 0}


class Sampler:
    """Keeps the history a single snapshot cannot give: rates, ETAs and counters that
    survive worker restarts and finished jobs leaving the snapshot."""

    def __init__(self) -> None:
        self._hist: deque[tuple[float, dict[str, tuple[int, int]], int]] = deque()
        self._procs: dict[int, psutil.Process] = {}
        self._live: dict[int, tuple[int, int]] = {}  # worker pid -> (sent, delivered) last seen
        self._gone_sent = 0  # requests by workers that have exited
        self._gone_delivered = 0
        self._finished: dict[str, dict[str, int]] = {}  # job -> final counts, seen once
        self._finished_order: deque[str] = deque()
        self._retired = dict.fromkeys(TOTALS, 0)  # counts of ids dropped from above
        # job -> [time of the last update, live delivered then, average rate or None,
        # updates averaged]
        self._ewma: dict[str, list[Any]] = {}

    def observe(self, doc: dict[str, Any]) -> None:
        """Fold one raw snapshot into the history (cheap; called every second)."""
        now = time.monotonic()
        seen = {}
        for w in doc["workers"]:
            seen[w["pid"]] = (w["sent"], w["delivered"])
        for pid, (sent, delivered) in self._live.items():
            if pid not in seen:  # its slot is reset for the next worker: keep what it did
                self._gone_sent += sent
                self._gone_delivered += delivered
        self._live = seen
        for s in doc.get("finished", []):
            if s["job"] not in self._finished:
                self._finished[s["job"]] = _totals_of(s)
                self._finished_order.append(s["job"])
        while len(self._finished_order) > 1000:  # bound the ids; their counts stay in the totals
            counts = self._finished.pop(self._finished_order.popleft())
            for k in TOTALS:
                self._retired[k] += counts[k]
        jobs = {j["job"]: (j["delivered"], j["bytes_done"]) for j in doc["jobs"]}
        self._average(now, doc["jobs"])
        self._hist.append((now, jobs, self.total_delivered_live()))
        while len(self._hist) > 2 and now - self._hist[0][0] > RATE_WINDOW:
            self._hist.popleft()

    def _average(self, now: float, jobs: list[dict[str, Any]]) -> None:
        seen = set()
        for j in jobs:
            seen.add(j["job"])
            delivered = j.get("live", j)["delivered"]
            e = self._ewma.get(j["job"])
            if e is None:
                self._ewma[j["job"]] = [now, delivered, None, 0]
                continue
            dt = now - e[0]
            if dt < RATE_STEP:  # a /v1/status request between two samples
                continue
            inst = max(0.0, (delivered - e[1]) / dt)
            if e[2] is None:
                # Start from the first interval that delivered something, not from 0: the
                # ETA would otherwise start far too long and fall for a time constant.
                if inst > 0:
                    e[2], e[3] = inst, 1
            else:
                # The plain mean of the first updates, then the time constant: the first
                # interval (the job starting up) weighs no more than the others.
                e[3] += 1
                alpha = max(1.0 - math.exp(-dt / RATE_TAU), 1.0 / e[3])
                e[2] += alpha * (inst - e[2])
            e[0], e[1] = now, delivered
        for job in [k for k in self._ewma if k not in seen]:
            del self._ewma[job]

    def rate(self, job: str) -> float:
        """A job's delivered rows per second: the moving average (0.0 before there is one)."""
        e = self._ewma.get(job)
        return e[2] if e is not None and e[2] is not None else 0.0

    def total_sent(self) -> int:
        return self._gone_sent + sum(s for s, _ in self._live.values())

    def total_delivered_live(self) -> int:
        return self._gone_delivered + sum(d for _, d in self._live.values())

    def outcome_totals(self, doc: dict[str, Any]) -> dict[str, int]:
        """Rows with a final outcome in jobs this process handled (active: as of the last ack)."""
        totals = dict(self._retired)
        for counts in self._finished.values():
            for k in TOTALS:
                totals[k] += counts[k]
        for j in doc["jobs"]:
            if j["job"] not in self._finished:
                counts = _totals_of(j)
                for k in TOTALS:
                    totals[k] += counts[k]
        return totals

    def enrich(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Add rates, ETAs, RSS/CPU and counters to a raw snapshot (a copy is not needed:
        the supervisor builds a fresh dict per call)."""
        now = time.monotonic()
        first = self._hist[0] if self._hist else None
        span = now - first[0] if first else 0.0
        for j in doc["jobs"]:
            then = first[1].get(j["job"]) if first else None
            brate = 0.0
            if then is not None and span >= 0.5:
                brate = max(0.0, (j["bytes_done"] - then[1]) / span)
            rate = self.rate(j["job"])
            j["rate"] = round(rate, 1)
            data = max(0, j["bytes"] - j.get("data_start", 0))
            done = j["bytes_done"]
            live = j.setdefault("live", {k: j[k] for k in metrics.OUTCOMES + ("rows",)})
            # Rows are counted as chunks are acked; extrapolate the total from the bytes.
            j["rows_estimate"] = (j["rows"] if j["planned_all"] and not j["chunks_in_flight"]
                                  else int(j["rows"] * data / done) if done else None)
            # Pending counts the rows final but not yet acked as done: the ETA is what is
            # left over the rate the job gets now.
            j["pending"] = (max(0, j["rows_estimate"] - live["rows"])
                            if j["rows_estimate"] is not None else None)
            if j["failed"]:
                j["eta_s"] = None
            elif j["pending"] is not None and rate > 0:
                j["eta_s"] = round(j["pending"] / rate, 1)
            else:  # no ack yet (no row estimate) or no rate yet: from the acked bytes, if any
                left = max(0, data - done)
                j["eta_s"] = round(left / brate, 1) if brate > 0 else (0.0 if left == 0 else None)
            j["progress"] = round(done / data, 4) if data else 1.0
        live = self.total_delivered_live()
        doc["delivery_rate"] = round(max(0.0, (live - first[2]) / span), 1) \
            if first and span >= 0.5 else 0.0
        pids = set()
        for w in doc["workers"]:
            pids.add(w["pid"])
            w.update(self._usage(w["pid"]))
        doc["supervisor"] = {"pid": doc["pid"], **self._usage(doc["pid"])}
        for pid in list(self._procs):
            if pid not in pids and pid != doc["pid"]:
                del self._procs[pid]
        doc["totals"] = {**self.outcome_totals(doc), "requests_sent": self.total_sent(),
                         "delivered_live": live}
        doc["version"] = __version__
        doc["now"] = time.time()
        return doc

    def _usage(self, pid: int | None) -> dict[str, Any]:
        if not pid:
            return {"rss_bytes": None, "cpu_percent": None}
        try:
            p = self._procs.get(pid)
            if p is None:
                p = self._procs[pid] = psutil.Process(pid)
                p.cpu_percent(None)  # the first call only starts the measurement
            with p.oneshot():
                return {"rss_bytes": p.memory_info().rss, "cpu_percent": p.cpu_percent(None)}
        except psutil.Error:
            self._procs.pop(pid, None)
            return {"rss_bytes": None, "cpu_percent": None}


MAX_CONNECTIONS = 64  # per listener; past it a new connection gets a 503 and is closed
FIRST_REQUEST_TIMEOUT = 10.0  # seconds a connection may stay open before its first request
KEEPALIVE_TIMEOUT = 30.0  # seconds an idle keep-alive connection is kept
# A request body is buffered up to twice this per connection before reading pauses: 2x
# the upload rate of aiohttp's 64 KiB, and at most 32 MiB over MAX_CONNECTIONS.
READ_BUFSIZE = 256 << 10
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Content-Length: 27\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
         b'{"error": "too many conns"}')


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(_BUSY)  # type: ignore[attr-defined]
        transport.close()


class _Counted(asyncio.Protocol):
    """One accepted connection, handed to aiohttp's handler: counted against the limit
    while open, and closed if no complete request head arrives in FIRST_REQUEST_TIMEOUT
    (aiohttp would keep it for its keep-alive time, and an idle crowd of them would use up
    the supervisor's file descriptors, which claims and WALs need)."""

    def __init__(self, gate: _Gate, inner: asyncio.Protocol) -> None:
        self._gate = gate
        self._inner = inner
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._timer = asyncio.get_running_loop().call_later(
            self._gate.first_request, self._first_request_due, transport)
        self._inner.connection_made(transport)

    def _first_request_due(self, transport: asyncio.BaseTransport) -> None:
        # aiohttp counts request heads it has parsed; no public way to ask
        if not getattr(self._inner, "_request_count", 0):
            transport.close()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._gate.open -= 1
        self._inner.connection_lost(exc)


class _Gate:
    """The protocol factory of a listener: at most `limit` connections at once."""

    def __init__(self, server: web.Server, limit: int, first_request: float) -> None:
        self.server = server
        self.limit = limit
        self.first_request = first_request
        self.open = 0
        self.refused = 0

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.limit:
            self.refused += 1
            return _Refused()
        self.open += 1
        return _Counted(self, self.server())


class StatusServer:
    def __init__(self, cfg: Config, snapshot: Callable[[], dict[str, Any]],
                 intake: Intake | None = None) -> None:
        self._cfg = cfg
        self._snapshot = snapshot
        self._intake = intake
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self._kind, self._addr = cfg.status_address()
        # Hashes compare in constant time whatever the lengths (compare_digest leaks a
        # length mismatch at once).
        self._want = hashlib.sha256(f"Bearer {cfg.status.token}".encode()).digest()
        self.sampler = Sampler()
        self._task: asyncio.Task[None] | None = None
        self.gate: _Gate | None = None
        self.jobs: jobsapi.Controller | None = None  # the supervisor, for /v1/jobs

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth] if self._kind == "tcp" else [])
        app.router.add_get("/v1/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._health)
        if self._intake is not None:
            app.router.add_post("/v1/files", self._intake.handle, expect_handler=self._expect)
        if self.jobs is not None:
            jobsapi.add_routes(app, self.jobs)
        return app

    def _refused(self, request: web.Request) -> web.Response | None:
        """401 unless the request may use the API (TCP: the bearer token)."""
        if self._kind != "tcp" or request.path == "/healthz":
            return None
        # aiohttp keeps undecodable header bytes as surrogates: encode them back, so
        # any malformed value is simply a wrong token (401), never an exception (500).
        got = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if hmac.compare_digest(hashlib.sha256(got).digest(), self._want):
            return None
        return web.json_response({"error": "unauthorized"}, status=401,
                                headers={"WWW-Authenticate": 'Bearer realm="alertd"'})

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        refused = self._refused(request)
        return refused if refused is not None else await handler(request)

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        # aiohttp answers Expect: 100-continue before the middlewares run: check here too.
        assert self._intake is not None
        refused = self._refused(request)
        if refused is None:
            return await self._intake.expect(request)
        refused.force_close()  # no body follows: the connection cannot be reused
        return refused

    def document(self) -> dict[str, Any]:
        doc = self._snapshot()
        self.sampler.observe(doc)
        return self.sampler.enrich(doc)

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.document(), dumps=_dumps)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(self.document()).encode(),
                            headers={"Content-Type": metrics.CONTENT_TYPE})

    async def _health(self, request: web.Request) -> web.Response:
        doc = self._snapshot()
        ok = bool(doc["workers"]) or doc["draining"]
        body = {"ok": ok, "draining": doc["draining"], "workers": len(doc["workers"])}
        cl = doc.get("cluster")
        if cl is not None:  # no Redis, no budget: this node sends nothing new
            body["redis"] = cl["redis"]
            if cl["redis"] != "up":
                body["ok"] = ok = False
                body["error"] = cl["error"]
        return web.json_response(body, status=200 if ok else 503)

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY)
            try:
                self.sampler.observe(self._snapshot())
            except Exception:  # a status glitch must never take the daemon down
                log.exception("status sampler failed")

    def where(self) -> str:
        if self._kind == "unix":
            return str(self._addr)
        host, port = self._addr
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def start(self) -> None:
        """Listen; raises ConfigError (the start is refused) when the address is taken."""
        loop = asyncio.get_running_loop()
        if self._kind == "unix":
            _take_socket_path(self._addr)
        runner = web.AppRunner(self._app(), access_log=None, handle_signals=False,
                               keepalive_timeout=KEEPALIVE_TIMEOUT, read_bufsize=READ_BUFSIZE)
        await runner.setup()
        assert runner.server is not None
        self.gate = _Gate(runner.server, MAX_CONNECTIONS, FIRST_REQUEST_TIMEOUT)
        try:
            if self._kind == "unix":
                self._server = await loop.create_unix_server(self.gate, str(self._addr))
                os.chmod(str(self._addr), 0o660)
            else:
                host, port = self._addr
                self._server = await loop.create_server(self.gate, host, port)
        except OSError as e:
            await runner.cleanup()
            why = "address already in use (another process listens there)" \
                if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise ConfigError(f"config: [status] listen {self.where()}: {why}") from None
        self._runner = runner
        self._task = loop.create_task(self._sample())
        log.info("status API on %s (at most %d connections)", self.where(), MAX_CONNECTIONS)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()  # closes the connections still open
            self._runner = None
        if self._kind == "unix":
            try:
                os.unlink(str(self._addr))
            except FileNotFoundError:
                pass


def _take_socket_path(path: Path) -> None:
    """A socket file left by a crashed run is replaced; one a live process answers on is
    not (taking it over would leave that daemon unreachable): ConfigError."""
    where = f"config: [status] listen {path}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{where} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # nobody listens: stale
    except OSError as e:  # a full backlog or no permission: someone is there
        raise ConfigError(f"{where}: in use ({e.strerror or e}); give this daemon its own "
                          f"[status] listen") from None
    else:
        raise ConfigError(f"{where}: another process (another alertd?) answers on it; give "
                          f"this daemon its own [status] listen")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()
