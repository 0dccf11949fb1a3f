"""A worker process: chunk -> rows -> tokens -> signed POST -> outcome -> ack.

Each worker reads its chunk's bytes from the spool file itself (pread); only
chunk descriptors and acks cross the pipe to the supervisor. policy.py says what
each answer means; the worker schedules it (send, retry, hold, give up), and
outcomes.py records what became of each row; rowsource.py chooses the next row and
applies job control to the rows held. Every row a lane takes is settled.
A paused job's rows are held here (chunks it holds stay unacked, its retries wait);
a cancelled job's rows not yet finally sent are dropped, left to its cancel range.
"""
from __future__ import annotations

import asyncio
import heapq
import logging
import os
import random
import ssl
import time
from collections import deque
from multiprocessing.connection import Connection
from urllib.parse import urlsplit

from . import policy, ratelimit, rowpath, wal
from .breaker import CLOSED, OPEN, REASON_GONE, Breaker, Gate
from .config import Config
from .outbox import Outbox
from .outcomes import ChunkState, Recorder
from .payload import Payloads
from .policy import Action, Decision
from .protocol import Chunk, Drain, Fence, JobControl, Outcome, Ready, Reload
from .ratelimit import TokenBudget
from .rowsource import Alert, RowSource
from .shm import Shared
from .sidelog import SideLog
from .transport import Pool, Response, TransportError, webhook_tls

log = logging.getLogger("alertd.worker")

PROGRESS_TICKS = 5  # heartbeat ticks (0.1 s) between live-count reports to the supervisor
RESULT_BATCH = 64  # successes reported to the shared breaker at once (one lock, not 64)
REQUEST_AGE = 1  # whole seconds a prepared request may wait before it is signed again


class _Sender:
    """One lane's run of requests on one connection (transport's on_result and more):
    settles each answer and hands the transport the next row's request, while the worker
    allows one without waiting (see Worker._next_now); else the lane takes over again."""

    __slots__ = ("w", "lane", "out")

    def __init__(self, w: Worker, lane: int) -> None:
        self.w, self.lane = w, lane
        self.out: deque[tuple[Alert, Gate]] = deque()  # alerts whose requests are out

    def on_result(self, r: Response | TransportError) -> None:
        a, gate = self.out.popleft()
        try:
            self.w._answered(a, gate, r)
        except Exception as e:  # a bug: the row still gets settled, the run goes on
            self.w._internal_error(a, e)

    def more(self) -> bytes | None:
        w, a = self.w, None
        try:
            a = w._next_now(self.lane)
            if a is None:
                return None
            req = w._request(a)
        except Exception as e:
            if a is not None:
                w._internal_error(a, e)
            else:
                log.exception("worker %d: choosing the next row failed", w.index)
            return None
        self.out.append((a, Gate.SEND))
        return req

    def unsettled(self) -> list[Alert]:
        """The alerts still out when a run ended by a bug (none otherwise)."""
        left = [a for a, _ in self.out]
        self.out.clear()
        return left


class Worker(RowSource):
    def __init__(self, index: int, conn: Connection, cfg: Config, shared: Shared) -> None:
        self.index = index
        self.conn = conn
        self.shared = shared
        self.slot = shared.slot(index)
        self.budget = TokenBudget(shared)
        self.wal = wal.WalWriter(cfg.wal_dir, index, fsync=cfg.wal.fsync,
                                 interval=cfg.wal.fsync_interval,
                                 segment_bytes=cfg.wal.segment_bytes)
        self.side = SideLog(cfg.state_dir)
        self.outbox = Outbox(conn)
        self.outcomes = Recorder(index, self.outbox, self.wal, self.side)
        self.pool: Pool | None = None
        self._apply(cfg)
        self._chunks: deque[Chunk] = deque()
        self._cur: ChunkState | None = None
        self._paused: set[str] = set()  # jobs whose rows are held
        self._cancelled: set[str] = set()  # jobs whose unsent rows are dropped
        self._fenced: set[tuple[str, int, int]] = set()  # claims another node took over
        self._parked: list[ChunkState] = []  # partly read chunks of paused (or resumed) jobs
        self._held: dict[str, list[Alert]] = {}  # paused jobs' rows that await a retry
        self._retries: list[tuple[float, int, Alert]] = []  # (due, tiebreak, alert)
        self._tiebreak = 0
        self._more = asyncio.Event()
        self._lanes: dict[int, asyncio.Task[None]] = {}
        self._pending = 0  # rows read and not yet final, in flight or awaiting retry
        self._draining = False
        self._done = asyncio.Event()
        self.breaker = Breaker(shared)
        self._ok = 0  # successes not yet reported to the breaker
        self._sent_first = 0  # sends of first attempts / of retries, for the retry budget
        self._sent_retry = 0
        self._n_sent = 0  # requests sent, rows delivered: copied to the shm slot by _heartbeat
        self._n_delivered = 0
        self._bugs: set[tuple[str, str, int]] = set()  # internal errors already logged

    def _apply(self, cfg: Config) -> None:
        w = cfg.webhook
        try:
            tls = webhook_tls(w)
        except (OSError, ssl.SSLError) as e:
            if self.pool is None:
                raise
            # config.load read these files moments ago; keep sending with the old ones.
            log.error("worker %d: reload: TLS files unreadable, keeping the running webhook "
                      "config: %s", self.index, e)
            return
        self.cfg = cfg
        self.payloads = Payloads(cfg.webhook.secrets)
        self.max_backlog = cfg.workers.concurrency * 4
        # concurrency requests in flight: on as many connections (lanes), or, pipelined,
        # `pipeline` of them on each of fewer connections.
        self.lanes = -(-cfg.workers.concurrency // cfg.workers.pipeline)
        parts = urlsplit(cfg.webhook.url)
        self.endpoint = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        if self.pool is None:
            self.pool = Pool(w.url, size=self.lanes, timeout=w.timeout, headers=w.headers,
                             ssl_context=tls, pipeline=cfg.workers.pipeline)
        else:
            # A reload re-reads the TLS files: certificates can be rotated with a HUP.
            self.pool.reconfigure(w.url, size=self.lanes, timeout=w.timeout, headers=w.headers,
                                  ssl_context=tls, pipeline=cfg.workers.pipeline)
        # A new object on every reload: requests prepared under the old one are rebuilt.
        self.requests = rowpath.Requests(self.pool.head, w.secrets, cfg.alert.message)
        # Under a rate limit a batch is sent within about a second of being signed.
        limit = int(cfg.rate.limit or 0)
        self.batch = max(16, min(256, limit // 4 or 256))

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.wal.open()
        wal_task = loop.create_task(self.wal.run())
        loop.add_reader(self.conn.fileno(), self._on_readable)
        # uvloop's add_reader made the pipe non-blocking: a send into a full pipe would raise
        # half-way through a message (an ack lost, the stream torn). Blocking, a send waits
        # for the supervisor to read instead, in the outbox's thread (see outbox.py).
        os.set_blocking(self.conn.fileno(), True)
        self.slot.pid = os.getpid()
        log.info("worker %d: row path %s", self.index, rowpath.IMPL)
        self._resize_lanes()
        beat = loop.create_task(self._heartbeat())
        self.outbox.send(Ready(self.index, os.getpid()))
        await self._done.wait()
        loop.remove_reader(self.conn.fileno())
        if self.outcomes.acks:
            await asyncio.gather(*self.outcomes.acks, return_exceptions=True)
        beat.cancel()
        self.outcomes.flush()
        self.slot.sent, self.slot.delivered = self._n_sent, self._n_delivered
        await self.wal.close()
        await wal_task
        self.side.close()
        await self.pool.close()
        await loop.run_in_executor(None, self.outbox.close)  # the last acks reach the pipe

    def _on_readable(self) -> None:
        try:
            while self.conn.poll():
                self._handle(self.conn.recv())
        except (EOFError, OSError):
            # The supervisor is gone: stop at once; its successor re-runs what is unfinished.
            log.error("worker %d: supervisor went away, stopping", self.index)
            self._drain(hurry=True)

    def _handle(self, msg: object) -> None:
        if isinstance(msg, Chunk):
            self._chunks.append(msg)
            self._more.set()
        elif isinstance(msg, Reload):
            self._apply(msg.config)
            self.budget.drop_local()
            self._resize_lanes()
        elif isinstance(msg, Drain):
            self._drain(msg.hurry)
        elif isinstance(msg, JobControl):
            self._job_control(msg.job, msg.action)
        elif isinstance(msg, Fence):
            self._fence(msg.job, msg.seq, msg.claim)

    def _drain(self, hurry: bool) -> None:
        self._draining = True
        self._more.set()
        if hurry:
            for t in self._lanes.values():
                t.cancel()
        if not self._lanes:
            self._done.set()

    def _resize_lanes(self) -> None:
        loop = asyncio.get_running_loop()
        for i in range(self.lanes):
            if i not in self._lanes and not self._draining:
                t = loop.create_task(self._lane(i))
                self._lanes[i] = t
                t.add_done_callback(lambda t, i=i: self._lane_done(i, t))
        self._more.set()  # surplus lanes notice and exit

    def _lane_done(self, i: int, t: asyncio.Task[None]) -> None:
        if self._lanes.get(i) is t:
            del self._lanes[i]
        if not t.cancelled() and t.exception() is not None:
            # _lane catches what an attempt raises; this is a bug outside one: a new lane
            # takes over, so the worker never silently sends less.
            log.error("worker %d: lane %d failed; starting a new one", self.index, i,
                      exc_info=t.exception())
            if not self._draining:
                asyncio.get_running_loop().call_later(0.1, self._resize_lanes)
        if self._draining and not self._lanes:
            self._done.set()

    async def _heartbeat(self) -> None:
        ticks = 0
        while True:
            ticks += 1
            if ticks % 10 == 0:  # the retry budget looks at roughly the last second or two
                self._sent_first //= 2
                self._sent_retry //= 2
            slot = self.slot
            slot.heartbeat = time.monotonic()
            slot.pending = self._pending
            slot.sent = self._n_sent
            slot.delivered = self._n_delivered
            slot.in_flight = self.pool.in_flight
            self.slot.wal_error = 1 if self.wal.error else 0
            self._flush_results()
            if ticks % PROGRESS_TICKS == 0:
                self.outcomes.report()
            await asyncio.sleep(0.1)

    # ------------------------------------------------------------ choosing work

    async def _lane(self, i: int) -> None:
        sender = _Sender(self, i)
        while not self._draining and i < self.lanes:
            a = self._next_alert()
            if a is None:
                await self._idle()
                continue
            a.busy = True
            try:
                await self._attempt(a, sender)
            except Exception as e:  # a bug: the row still gets settled, the lane goes on
                for b in sender.unsettled() or [a]:
                    self._internal_error(b, e)

    async def _idle(self) -> None:
        self._more.clear()
        timeout = None
        if self._retries:
            timeout = max(0.001, self._retries[0][0] - time.monotonic())
        if self.wal.error or self.breaker.is_open:
            timeout = min(timeout or 0.25, 0.25)  # conditions nobody signals: poll them
        try:
            await asyncio.wait_for(self._more.wait(), timeout)
        except TimeoutError:
            pass

    # ------------------------------------------------------------ sending

    def _next_now(self, lane: int) -> Alert | None:
        """The next alert a lane's run may send at once, a token taken for it: none when
        the lane should stop or look again (draining, fewer lanes, WAL trouble, breaker not
        closed, no token or no row)."""
        if self._draining or lane >= self.lanes or self.wal.error:
            return None
        if not self.breaker.is_closed or not self.budget.try_take():
            return None  # a probe or a hold, or tokens to wait for: the lane's slow path
        while (a := self._next_alert()) is not None:
            a.busy = True
            if not (self._fenced and self._is_fenced(a)):
                return a
            self._drop(a)  # another node sends it now
        self.budget.give_back()
        return None

    async def _attempt(self, a: Alert, sender: _Sender) -> None:
        if self._fenced and self._is_fenced(a):
            self._drop(a)  # another node sends it now
            return
        gate = self.breaker.admit()
        if gate is Gate.HOLD:
            self._hold(a)
            return
        if not self.budget.try_take():
            await self.budget.acquire()
            job = a.cs.chunk.job
            if gate is not Gate.PROBE and (job in self._paused or job in self._cancelled
                                           or self._is_fenced(a)):
                self._push(a, time.monotonic())  # paused or cancelled while waiting: not sent
                return
        req = self._request(a)
        sender.out.append((a, gate))
        await self.pool.exchange(req, sender.on_result, sender.more)

    def _request(self, a: Alert) -> bytes:
        """The request of the alert's next attempt, counted as sent."""
        if a.attempts:
            self._sent_retry += 1
        else:
            self._sent_first += 1
        a.attempts += 1
        lt = a.letter
        if lt is None:
            req, a.req = a.req, None  # ~400 bytes a row: kept for its first attempt only
            now = time.time()
            if (req is None or a.requests is not self.requests
                    or int(now) - a.req_sec > REQUEST_AGE):
                # A retry, a reload since, or it waited (paused, breaker, tokens): signed
                # now, so no receiver sees a timestamp older than about a second.
                chunk = a.cs.chunk
                req = self.requests.build(chunk.job, chunk.name, a.off, a.uid, a.msg, a.fields,
                                          now)
        else:  # the same id and body as its first attempts: receivers can dedupe it
            hdr, body = self.payloads.build(lt.id, a.uid, a.msg, lt.file, lt.offset,
                                            time.time(), a.fields)
            req = self.pool.frame(hdr, body)
        # Plain ints here; the heartbeat copies them to shared memory (ctypes is slower).
        self._n_sent += 1
        return req

    def _answered(self, a: Alert, gate: Gate, r: Response | TransportError) -> None:
        """What the attempt's answer means for the alert (see policy.py)."""
        if isinstance(r, TransportError):
            if r.sent:
                a.dup = True  # outcome unknown: it may have arrived; same id on the retry
            self._settle(a, gate, 0, policy.decide(0, a.attempts, self.cfg.retry, None, str(r)))
            return
        status = r.status
        d = policy.decide(status, a.attempts, self.cfg.retry, r.retry_after)
        if d is policy.DELIVERED:  # the hot path
            self._n_delivered += 1
            self._ok += 1
            if gate is Gate.PROBE or self._ok >= RESULT_BATCH:
                self._flush_results()
            self._final(a, Outcome.DELIVERED, status, None)
        else:
            self._settle(a, gate, status, d)

    def _settle(self, a: Alert, gate: Gate, status: int, d: Decision) -> None:
        """Schedule what the policy decided for a failed attempt."""
        if not d.spend:
            a.attempts -= 1
        if d.failure:
            self._flush_results()
            # Only an alert's first failure speaks about the endpoint: at the end of a job
            # the few alerts still retrying may be ones the receiver always refuses, and
            # their repeated failures must dead-letter them, not look like an outage.
            if self.breaker.record(0, 1 if a.attempts == 1 else 0) == OPEN:
                log.warning("endpoint %s unreachable: %s; breaker opened (only probes go out "
                            "until one succeeds)", self.endpoint, d.error)
            if gate is Gate.PROBE or self.breaker.is_open:
                d = policy.while_down(d)  # a failed probe, or this failure opened it
                a.attempts -= 1
        if d.gone and self.breaker.trip(REASON_GONE):
            log.warning("endpoint %s answered 410 Gone; breaker opened", self.endpoint)
        if d.pause:
            ratelimit.pause(self.shared, d.pause)
        if d.throttle and self.cfg.rate.adaptive:
            ratelimit.throttled(self.shared)
        a.last = (status, d.error or "")
        if d.action is Action.HOLD:
            self._hold(a)
        elif d.action is Action.DEAD:
            self._final(a, Outcome.DEAD, status, d.error)
        else:
            self._retry(a, d.delay)

    def _internal_error(self, a: Alert, e: Exception) -> None:
        """An exception while handling an attempt is a bug: log it once with its traceback,
        and settle the row (retried, then dead-lettered) so its chunk still finishes."""
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next  # the frame that raised: one log line per distinct bug
        where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb else ("", 0)
        key = (type(e).__name__, *where)
        if key not in self._bugs:
            self._bugs.add(key)
            log.error("worker %d: internal error while sending %s:%d (a bug; the row is retried "
                      "or dead-lettered, later occurrences are not logged)", self.index,
                      a.cs.chunk.job, a.off, exc_info=e)
        if not a.busy:
            return  # already final or scheduled before the error
        a.dup = True  # the request may have gone out before the error
        d = policy.internal_error(e, max(1, a.attempts), self.cfg.retry)
        a.last = (0, d.error or "")
        if d.action is Action.DEAD:
            self._final(a, Outcome.DEAD, 0, d.error)
        else:
            self._retry(a, d.delay)

    def _flush_results(self) -> None:
        if self._ok:
            ok, self._ok = self._ok, 0
            if self.breaker.record(ok, 0) == CLOSED:
                log.warning("endpoint %s reachable again; breaker closed", self.endpoint)

    def _expired(self, a: Alert) -> bool:
        age = time.time() - a.cs.chunk.started_at
        if age < self.cfg.retry.max_age:
            return False
        status, err = a.last
        self._final(a, Outcome.DEAD, status, f"expired after {age:.0f} s (retry.max_age); "
                    f"last error: {err}")
        return True

    def _hold(self, a: Alert) -> None:
        """Park an alert until the next probe slot, spending no attempt."""
        if self._expired(a):
            return
        self._push(a, max(self.breaker.probe_due(), time.monotonic()) + random.uniform(0, 0.05))

    def _retry(self, a: Alert, delay: float) -> None:
        if self._expired(a):
            return
        self._push(a, time.monotonic() + delay)

    def _push(self, a: Alert, due: float) -> None:
        job = a.cs.chunk.job
        if job in self._cancelled or self._is_fenced(a):
            self._drop(a)
            return
        if job in self._paused:
            a.busy = False
            self._held.setdefault(job, []).append(a)
            return
        a.busy = False
        self._tiebreak += 1
        heapq.heappush(self._retries, (due, self._tiebreak, a))
        self._more.set()

    def _final(self, a: Alert, outcome: Outcome, status: int, err: str | None) -> None:
        a.busy = False
        self._pending -= 1
        self._is_fenced(a)  # then outcomes.final records nothing for it
        self.outcomes.final(a.cs, a.off, a.uid, a.msg, a.attempts, a.dup, outcome, status, err,
                            a.fields, a.letter)


def main(index: int, conn: Connection, cfg: Config, shared: Shared, log_level: int) -> None:
    """Process entry point (spawn context)."""
    import signal

    import uvloop

    from .logs import setup as setup_logging

    setup_logging(log_level, f"worker-{index}")
    # The supervisor decides when workers stop: it sends Drain. A Ctrl-C on the
    # terminal reaches the whole process group, so workers ignore INT and TERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    uvloop.run(Worker(index, conn, cfg, shared).run())
