"""A worker process: chunk -> rows -> tokens -> signed POST -> outcome -> ack.

Each worker reads its chunk's bytes from the spool file itself (pread); only
chunk descriptors and acks cross the pipe to the supervisor. It decides when to
send, retry, hold or give up; outcomes.py records what became of each row.
"""
from __future__ import annotations

import asyncio
import heapq
import logging
import os
import random
import time
from collections import deque
from multiprocessing.connection import Connection

from . import chunker, ratelimit, wal
from .breaker import REASON_GONE, Breaker, Gate
from .config import Config
from .outcomes import ChunkState, Recorder
from .payload import Payloads
from .policy import backoff, retry_after_seconds, retryable
from .protocol import Chunk, ChunkFailed, Drain, Outcome, Ready, Reload
from .ratelimit import TokenBudget
from .shm import Shared
from .sidelog import SideLog
from .transport import Pool, TransportError

log = logging.getLogger("alertd.worker")

RESULT_BATCH = 64  # successes reported to the shared breaker at once (one lock, not 64)


class _Alert:
    __slots__ = ("cs", "off", "uid", "msg", "attempts", "dup", "last")

    def __init__(self, cs: ChunkState, off: int, uid: str, msg: str) -> None:
        self.cs = cs
        self.off = off
        self.uid = uid
        self.msg = msg
        self.attempts = 0  # attempts that count toward retry.max_attempts
        self.dup = False  # a request may have reached the receiver without us knowing
        self.last: tuple[int, str] = (0, "")  # last status and error


class Worker:
    def __init__(self, index: int, conn: Connection, cfg: Config, shared: Shared) -> None:
        self.index = index
        self.conn = conn
        self.shared = shared
        self.slot = shared.slot(index)
        self.budget = TokenBudget(shared)
        self.wal = wal.WalWriter(cfg.state_dir / "wal", index, fsync=cfg.wal.fsync,
                                 interval=cfg.wal.fsync_interval,
                                 segment_bytes=cfg.wal.segment_bytes)
        self.side = SideLog(cfg.state_dir)
        self.outcomes = Recorder(index, conn, self.wal, self.side)
        self.pool: Pool | None = None
        self._apply(cfg)
        self._chunks: deque[Chunk] = deque()
        self._cur: ChunkState | None = None
        self._retries: list[tuple[float, int, _Alert]] = []  # (due, tiebreak, alert)
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

    def _apply(self, cfg: Config) -> None:
        self.cfg = cfg
        self.payloads = Payloads(cfg.webhook.secrets)
        self.max_backlog = cfg.workers.concurrency * 4
        if self.pool is None:
            self.pool = Pool(cfg.webhook.url, size=cfg.workers.concurrency,
                             timeout=cfg.webhook.timeout, headers=cfg.webhook.headers)
        else:
            self.pool.reconfigure(cfg.webhook.url, size=cfg.workers.concurrency,
                                  timeout=cfg.webhook.timeout, headers=cfg.webhook.headers)

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.wal.open()
        wal_task = loop.create_task(self.wal.run())
        loop.add_reader(self.conn.fileno(), self._on_readable)
        self.slot.pid = os.getpid()
        self._resize_lanes()
        beat = loop.create_task(self._heartbeat())
        self.conn.send(Ready(self.index, os.getpid()))
        await self._done.wait()
        loop.remove_reader(self.conn.fileno())
        if self.outcomes.acks:
            await asyncio.gather(*self.outcomes.acks, return_exceptions=True)
        beat.cancel()
        self.slot.sent, self.slot.delivered = self._n_sent, self._n_delivered
        await self.wal.close()
        await wal_task
        self.side.close()
        await self.pool.close()

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
        for i in range(self.cfg.workers.concurrency):
            if i not in self._lanes and not self._draining:
                t = loop.create_task(self._lane(i))
                self._lanes[i] = t
                t.add_done_callback(lambda t, i=i: self._lane_done(i, t))
        self._more.set()  # surplus lanes notice and exit

    def _lane_done(self, i: int, t: asyncio.Task[None]) -> None:
        if self._lanes.get(i) is t:
            del self._lanes[i]
        if not t.cancelled() and t.exception() is not None:
            log.error("worker %d: lane failed", self.index, exc_info=t.exception())
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
            await asyncio.sleep(0.1)

    # ------------------------------------------------------------ choosing work

    async def _lane(self, i: int) -> None:
        while not self._draining and i < self.cfg.workers.concurrency:
            a = self._next_alert()
            if a is None:
                await self._idle()
                continue
            await self._attempt(a)

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

    def _next_alert(self) -> _Alert | None:
        if self.wal.error:
            return None  # never send what could not be confirmed: wait for the disk
        now = time.monotonic()
        due = bool(self._retries) and self._retries[0][0] <= now
        if self.breaker.is_open:
            # An outage: no new rows (pending stays bounded), only held retries and probes.
            if due:
                return heapq.heappop(self._retries)[2]
            self._expire_rows()
            return None
        # Retries take at most their budgeted share while new rows are waiting.
        if due and (self._retry_share_ok() or not self._rows_waiting()):
            return heapq.heappop(self._retries)[2]
        if self._draining or len(self._retries) >= self.max_backlog:
            return heapq.heappop(self._retries)[2] if due else None
        a = self._read_row()
        if a is None and due:
            return heapq.heappop(self._retries)[2]
        return a

    def _retry_share_ok(self) -> bool:
        first, retried = self._sent_first, self._sent_retry
        return retried <= self.cfg.retry.budget * (first + retried)

    def _rows_waiting(self) -> bool:
        return self._cur is not None or bool(self._chunks)

    def _read_row(self) -> _Alert | None:
        while True:
            cs = self._cur
            if cs is None:
                if not self._chunks:
                    return None
                cs = self._open_chunk(self._chunks.popleft())
                if cs is None:
                    continue
            for off, line in cs.rows:
                if off in cs.chunk.done:
                    continue
                try:
                    uid, msg = chunker.parse(line, cs.chunk.layout)
                except chunker.BadRow as e:
                    self.outcomes.reject(cs, off, line, e.reason)
                    continue
                cs.outstanding += 1
                self._pending += 1
                return _Alert(cs, off, uid, msg if msg is not None else self.cfg.alert.message)
            cs.parsed = True
            cs.rows = None
            self._cur = None
            self.outcomes.finish_if_done(cs)

    def _expire_rows(self) -> None:
        """While the endpoint is down, rows of jobs older than retry.max_age are dead
        without a send: the job can then complete instead of waiting forever."""
        max_age = self.cfg.retry.max_age
        while (cs := self._cur or (self._chunks[0] if self._chunks else None)) is not None:
            chunk = cs.chunk if isinstance(cs, ChunkState) else cs
            if time.time() - chunk.started_at < max_age:
                return
            a = self._read_row()
            if a is None:
                return
            self._final(a, Outcome.DEAD, 0, f"expired: endpoint down and older than "
                        f"retry.max_age ({max_age:g} s)")

    def _open_chunk(self, chunk: Chunk) -> ChunkState | None:
        try:
            # pread, not mmap: a file truncated under us gives a short read, never SIGBUS.
            fd = os.open(chunk.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:  # a line longer than max_line_bytes is skipped in blocks, never held
                rows = chunker.read_rows(fd, chunk.start, chunk.end, chunk.layout.max_line_bytes)
            finally:
                os.close(fd)
        except OSError as e:
            log.error("worker %d: %s chunk %d unreadable: %s", self.index, chunk.job, chunk.seq, e)
            self.conn.send(ChunkFailed(self.index, chunk.job, chunk.seq, str(e)))
            return None
        cs = ChunkState(chunk, rows)
        self._cur = cs
        return cs

    # ------------------------------------------------------------ sending

    async def _attempt(self, a: _Alert) -> None:
        gate = self.breaker.admit()
        if gate is Gate.HOLD:
            self._hold(a)
            return
        if not self.budget.try_take():
            await self.budget.acquire()
        if a.attempts:
            self._sent_retry += 1
        else:
            self._sent_first += 1
        a.attempts += 1
        chunk = a.cs.chunk
        hdr, body = self.payloads.build(f"{chunk.job}:{a.off}", a.uid, a.msg, chunk.name, a.off,
                                        time.time())
        # Plain ints here; the heartbeat copies them to shared memory (ctypes is slower).
        self._n_sent += 1
        try:
            r = await self.pool.post(hdr, body)
        except TransportError as e:
            if e.sent:
                a.dup = True  # outcome unknown: it may have arrived; same id on the retry
            self._failed(a, gate, 0, f"{e.kind}: {e}")
            return
        status = r.status
        if 200 <= status < 300:
            self._n_delivered += 1
            self._ok += 1
            if gate is Gate.PROBE or self._ok >= RESULT_BATCH:
                self._flush_results()
            self._final(a, Outcome.DELIVERED, status, None)
        elif status == 429:
            # The receiver's rate limit, not a bad message: wait as told, slow down,
            # and do not spend one of the alert's attempts.
            a.attempts -= 1
            after = retry_after_seconds(r.retry_after)
            ratelimit.pause(self.shared, min(after if after is not None else 1.0,
                                             self.cfg.retry.max_delay))
            if self.cfg.rate.adaptive:
                ratelimit.throttled(self.shared)
            self._retry(a, after or 0.0)
        elif status == 410:
            # Permanent for this alert, and the endpoint says it is gone: stop sending.
            self.breaker.trip(REASON_GONE)
            self._final(a, Outcome.DEAD, status, "HTTP 410 Gone (permanent; breaker opened)")
        elif retryable(status):
            self._failed(a, gate, status, f"HTTP {status}",
                         retry_after_seconds(r.retry_after))
        else:
            self._final(a, Outcome.DEAD, status, f"HTTP {status} (permanent)")

    def _flush_results(self) -> None:
        if self._ok:
            ok, self._ok = self._ok, 0
            self.breaker.record(ok, 0)

    def _failed(self, a: _Alert, gate: Gate, status: int, err: str,
                after: float | None = None) -> None:
        """A retryable failure: tell the breaker, then retry or give up."""
        self._flush_results()
        # Only an alert's first failure speaks about the endpoint: at the end of a job the
        # few alerts still retrying may be ones the receiver always refuses, and their
        # repeated failures must dead-letter them, not look like an outage.
        self.breaker.record(0, 1 if a.attempts == 1 else 0)
        a.last = (status, err)
        if gate is Gate.PROBE or self.breaker.is_open:
            # A failed probe, or a failure that opened the breaker: the endpoint is
            # down, which says nothing about this alert. Hold it; no attempt spent.
            a.attempts -= 1
            self._hold(a)
            return
        if after is not None:
            after = min(after, self.cfg.retry.max_delay)
            ratelimit.pause(self.shared, after)
        if a.attempts >= self.cfg.retry.max_attempts:
            self._final(a, Outcome.DEAD, status, err)
            return
        self._retry(a, after or 0.0)

    def _expired(self, a: _Alert) -> bool:
        age = time.time() - a.cs.chunk.started_at
        if age < self.cfg.retry.max_age:
            return False
        status, err = a.last
        self._final(a, Outcome.DEAD, status, f"expired after {age:.0f} s (retry.max_age); "
                    f"last error: {err}")
        return True

    def _hold(self, a: _Alert) -> None:
        """Park an alert until the next probe slot, spending no attempt."""
        if self._expired(a):
            return
        self._push(a, max(self.breaker.probe_due(), time.monotonic()) + random.uniform(0, 0.05))

    def _retry(self, a: _Alert, at_least: float) -> None:
        if self._expired(a):
            return
        self._push(a, time.monotonic() + max(backoff(a.attempts, self.cfg.retry), at_least))

    def _push(self, a: _Alert, due: float) -> None:
        self._tiebreak += 1
        heapq.heappush(self._retries, (due, self._tiebreak, a))
        self._more.set()

    def _final(self, a: _Alert, outcome: Outcome, status: int, err: str | None) -> None:
        self._pending -= 1
        self.outcomes.final(a.cs, a.off, a.uid, a.msg, a.attempts, a.dup, outcome, status, err)


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
