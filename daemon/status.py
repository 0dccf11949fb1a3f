"""The status API (aiohttp): /v1/status, /metrics, /healthz, on a unix socket or loopback TCP.

It only reads the snapshot the supervisor builds and adds what needs history
(rates, ETA, monotonic counters) or the OS (RSS, CPU); it never changes state.
A TCP listener demands the configured bearer token for everything but /healthz.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
import psutil
from aiohttp import web

from . import __version__, metrics
from .config import Config

log = logging.getLogger("alertd.status")

SAMPLE_EVERY = 1.0  # seconds between background samples (rates, counters)
RATE_WINDOW = 10.0  # rates are averaged over this many seconds: acks arrive per chunk


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
        self._retired = dict.fromkeys(metrics.OUTCOMES, 0)  # counts of ids dropped from above

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
                self._finished[s["job"]] = {k: s.get(k, 0) for k in metrics.OUTCOMES}
                self._finished_order.append(s["job"])
        while len(self._finished_order) > 1000:  # bound the ids; their counts stay in the totals
            counts = self._finished.pop(self._finished_order.popleft())
            for k in metrics.OUTCOMES:
                self._retired[k] += counts[k]
        jobs = {j["job"]: (j["delivered"], j["bytes_done"]) for j in doc["jobs"]}
        self._hist.append((now, jobs, self.total_delivered_live()))
        while len(self._hist) > 2 and now - self._hist[0][0] > RATE_WINDOW:
            self._hist.popleft()

    def total_sent(self) -> int:
        return self._gone_sent + sum(s for s, _ in self._live.values())

    def total_delivered_live(self) -> int:
        return self._gone_delivered + sum(d for _, d in self._live.values())

    def outcome_totals(self, doc: dict[str, Any]) -> dict[str, int]:
        """Rows with a final outcome in jobs this process handled (active: as of the last ack)."""
        totals = dict(self._retired)
        for counts in self._finished.values():
            for k in metrics.OUTCOMES:
                totals[k] += counts[k]
        for j in doc["jobs"]:
            if j["job"] not in self._finished:
                for k in metrics.OUTCOMES:
                    totals[k] += j[k]
        return totals

    def enrich(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Add rates, ETAs, RSS/CPU and counters to a raw snapshot (a copy is not needed:
        the supervisor builds a fresh dict per call)."""
        now = time.monotonic()
        first = self._hist[0] if self._hist else None
        span = now - first[0] if first else 0.0
        for j in doc["jobs"]:
            then = first[1].get(j["job"]) if first else None
            rate = brate = 0.0
            if then is not None and span >= 0.5:
                rate = max(0.0, (j["delivered"] - then[0]) / span)
                brate = max(0.0, (j["bytes_done"] - then[1]) / span)
            j["rate"] = round(rate, 1)
            data = max(0, j["bytes"] - j.get("data_start", 0))
            done = j["bytes_done"]
            left = max(0, data - done)
            if j["failed"]:
                j["eta_s"] = None
            else:
                j["eta_s"] = round(left / brate, 1) if brate > 0 else (0.0 if left == 0 else None)
            # Rows are counted as chunks are acked; extrapolate the total from the bytes.
            j["rows_estimate"] = (j["rows"] if j["planned_all"] and not j["chunks_in_flight"]
                                  else int(j["rows"] * data / done) if done else None)
            j["pending"] = (max(0, j["rows_estimate"] - j["rows"])
                            if j["rows_estimate"] is not None else None)
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


class StatusServer:
    def __init__(self, cfg: Config, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._cfg = cfg
        self._snapshot = snapshot
        self._runner: web.AppRunner | None = None
        self._kind, self._addr = cfg.status_address()
        self.sampler = Sampler()
        self._task: asyncio.Task[None] | None = None

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth] if self._kind == "tcp" else [])
        app.router.add_get("/v1/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._health)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        if request.path != "/healthz":
            want = f"Bearer {self._cfg.status.token}"
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), want.encode()):
                return web.json_response({"error": "unauthorized"}, status=401,
                                         headers={"WWW-Authenticate": 'Bearer realm="alertd"'})
        return await handler(request)

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
        return web.json_response({"ok": ok, "draining": doc["draining"],
                                  "workers": len(doc["workers"])}, status=200 if ok else 503)

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY)
            try:
                self.sampler.observe(self._snapshot())
            except Exception:  # a status glitch must never take the daemon down
                log.exception("status sampler failed")

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        if self._kind == "unix":
            path = str(self._addr)
            try:
                os.unlink(path)  # a stale socket from a crashed run
            except FileNotFoundError:
                pass
            site: web.BaseSite = web.UnixSite(self._runner, path)
        else:
            host, port = self._addr
            site = web.TCPSite(self._runner, host, port)
        await site.start()
        if self._kind == "unix":
            os.chmod(str(self._addr), 0o660)
        self._task = asyncio.get_running_loop().create_task(self._sample())
        log.info("status API on %s", self._addr)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._kind == "unix":
            try:
                os.unlink(str(self._addr))
            except FileNotFoundError:
                pass


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()
