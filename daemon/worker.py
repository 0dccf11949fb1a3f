"""A worker process: chunk -> rows -> tokens -> signed POST -> outcome -> ack.

Each worker reads its chunk's bytes from the spool file itself (pread); only
chunk descriptors and acks cross the pipe to the supervisor. policy.py says what
each answer means; the worker schedules it (send, retry, hold, give up), and
outcomes.py records what became of each row. Every row a lane takes is settled.
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

from . import chunker, letters, policy, ratelimit, rowpath, wal
from .breaker import CLOSED, OPEN, REASON_GONE, Breaker, Gate
from .config import Config
from .outcomes import ChunkState, Recorder
from .payload import Payloads
from .policy import Action, Decision
from .protocol import Chunk, ChunkFailed, Drain, Fence, JobControl, Outcome, Ready, Reload
from .ratelimit import TokenBudget
from .shm import Shared
from .sidelog import SideLog
from .transport import Pool, Response, TransportError, webhook_tls

log = logging.getLogger("alertd.worker")

PROGRESS_TICKS = 5  # heartbeat ticks (0.1 s) between live-count reports to the supervisor
RESULT_BATCH = 64  # successes reported to the shared breaker at once (one lock, not 64)
REQUEST_AGE = 1  # whole seconds a prepared request may wait before it is signed again


class _Alert:
    __slots__ = ("cs", "off", "uid", "msg", "fields", "letter", "attempts", "dup", "last",
                 "busy", "req", "req_sec", "requests")

    def __init__(self, cs: ChunkState, off: int, uid: str, msg: str,
                 fields: dict[str, str] | None = None,
                 letter: letters.Letter | None = None) -> None:
        self.cs = cs
        self.off = off
        self.uid = uid
        self.msg = msg
        self.fields = fields  # data.fields ([csv] data_columns); None: no such key
        self.letter = letter  # a replay job's row: sent with the letter's id, file, offset
        self.attempts = 0  # attempts that count toward retry.max_attempts
        self.dup = False  # a request may have reached the receiver without us knowing
        self.last: tuple[int, str] = (0, "")  # last status and error
        self.busy = False  # a lane holds it: not yet final nor scheduled for a retry
        # The first attempt's request, prepared in a batch at int second req_sec under
        # `requests` (one config): sent only while that config is current and it is fresh.
        self.req: bytes | None = None
        self.req_sec = 0
        self.requests: rowpath.Requests | None = None


class _Sender:
    """One lane's run of requests on one connection (transport's on_result and more):
    settles each answer and hands the transport the next row's request, while the worker
    allows one without waiting (see Worker._next_now); else the lane takes over again."""

    __slots__ = ("w", "lane", "out")

    def __init__(self, w: Worker, lane: int) -> None:
        self.w, self.lane = w, lane
        self.out: deque[tuple[_Alert, Gate]] = deque()  # alerts whose requests are out

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

    def unsettled(self) -> list[_Alert]:
        """The alerts still out when a run ended by a bug (none otherwise)."""
        left = [a for a, _ in self.out]
        self.out.clear()
        return left


class Worker:
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
        self.outcomes = Recorder(index, conn, self.wal, self.side)
        self.pool: Pool | None = None
        self._apply(cfg)
        self._chunks: deque[Chunk] = deque()
        self._cur: ChunkState | None = None
        self._paused: set[str] = set()  # jobs whose rows are held
        self._cancelled: set[str] = set()  # jobs whose unsent rows are dropped
        self._fenced: set[tuple[str, int, int]] = set()  # claims another node took over
        self._parked: list[ChunkState] = []  # partly read chunks of paused (or resumed) jobs
        self._held: dict[str, list[_Alert]] = {}  # paused jobs' rows that await a retry
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
        # for the supervisor to read instead (it always does: it never waits on a worker).
        os.set_blocking(self.conn.fileno(), True)
        self.slot.pid = os.getpid()
        log.info("worker %d: row path %s", self.index, rowpath.IMPL)
        self._resize_lanes()
        beat = loop.create_task(self._heartbeat())
        self.conn.send(Ready(self.index, os.getpid()))
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

    def _job_control(self, job: str, action: str) -> None:
        if action == "pause":
            self._paused.add(job)
            held = [e for e in self._retries if e[2].cs.chunk.job == job]
            if held:
                self._retries = [e for e in self._retries if e[2].cs.chunk.job != job]
                heapq.heapify(self._retries)
                self._held.setdefault(job, []).extend(e[2] for e in held)
            if self._cur is not None and self._cur.chunk.job == job:
                self._parked.append(self._cur)
                self._cur = None
        elif action == "resume":
            self._paused.discard(job)
            now = time.monotonic()
            for a in self._held.pop(job, []):
                self._push(a, now)
            self._more.set()
        elif action == "cancel":
            self._cancel(job)

    def _cancel(self, job: str) -> None:
        """Drop the job's rows not yet finally sent: unread rows, held and waiting retries.
        Requests in flight end with their real outcome; each chunk is then acked with the
        outcomes it has (the job's cancel range covers the rest)."""
        self._paused.discard(job)
        self._cancelled.add(job)
        states = [cs for cs in self._parked if cs.chunk.job == job]
        self._parked = [cs for cs in self._parked if cs.chunk.job != job]
        if self._cur is not None and self._cur.chunk.job == job:
            states.append(self._cur)
            self._cur = None
        states += [ChunkState(c, iter(())) for c in self._chunks if c.job == job]
        self._chunks = deque(c for c in self._chunks if c.job != job)
        for cs in states:
            cs.rows = None
            cs.ready.clear()  # prepared, never taken: not sent, like the unread rows
            cs.parsed = True
        waiting = [e[2] for e in self._retries if e[2].cs.chunk.job == job]
        if waiting:
            self._retries = [e for e in self._retries if e[2].cs.chunk.job != job]
            heapq.heapify(self._retries)
        dropped = self._held.pop(job, []) + waiting
        for a in dropped:
            self._drop(a)
        for cs in states:
            self.outcomes.finish_if_done(cs)

    def _fence(self, job: str, seq: int, claim: int) -> None:
        """Another node owns the chunk now: drop what is left of it here, unrecorded."""
        key = (job, seq, claim)

        def ours(cs: ChunkState) -> bool:
            c = cs.chunk
            return (c.job, c.seq, c.claim) == key
        self._fenced.add(key)  # its requests in flight end unrecorded too
        states = [cs for cs in self._parked if ours(cs)]
        self._parked = [cs for cs in self._parked if not ours(cs)]
        if self._cur is not None and ours(self._cur):
            states.append(self._cur)
            self._cur = None
        self._chunks = deque(c for c in self._chunks if (c.job, c.seq, c.claim) != key)
        waiting = [e[2] for e in self._retries if ours(e[2].cs)]
        if waiting:
            self._retries = [e for e in self._retries if not ours(e[2].cs)]
            heapq.heapify(self._retries)
        held = self._held.get(job, [])
        if held:
            waiting += [a for a in held if ours(a.cs)]
            self._held[job] = [a for a in held if not ours(a.cs)]
        for cs in states + [a.cs for a in waiting]:
            cs.rows = None
            cs.ready.clear()
            cs.parsed = True
            self.outcomes.fence(cs)
        for a in waiting:
            self._drop(a)
        log.warning("worker %d: %s chunk %d fenced: this node's claim lapsed, another node "
                    "delivers it", self.index, job, seq)

    def _is_fenced(self, a: _Alert) -> bool:
        """Whether the row's chunk was fenced (a chunk whose rows were all in flight at the
        fence is marked on its first row that comes back)."""
        cs = a.cs
        if not cs.fenced and self._fenced:
            c = cs.chunk
            if (c.job, c.seq, c.claim) in self._fenced:
                self.outcomes.fence(cs)
        return cs.fenced

    def _drop(self, a: _Alert) -> None:
        """A cancelled job's row that will not be sent again: no record of its own."""
        a.busy = False
        self._pending -= 1
        a.cs.outstanding -= 1
        self.outcomes.finish_if_done(a.cs)

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
            if not self._retries and time.monotonic() >= self.breaker.probe_due():
                # Nothing held to probe with (every row of the outage ended dead): a new
                # row is the probe, or the breaker would never close again.
                return self._read_row()
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

    def _next_chunk(self) -> Chunk | ChunkState | None:
        """What _read_row reads next (a parked chunk first), skipping paused jobs."""
        for cs in self._parked:
            if cs.chunk.job not in self._paused:
                return cs
        for c in self._chunks:
            if c.job not in self._paused:
                return c
        return None

    def _read_row(self) -> _Alert | None:
        while True:
            cs = self._cur
            if cs is None:
                nxt = self._next_chunk()
                if nxt is None:
                    return None
                if isinstance(nxt, ChunkState):
                    self._parked.remove(nxt)
                    cs = self._cur = nxt
                else:
                    self._chunks.remove(nxt)
                    cs = self._open_chunk(nxt)
                    if cs is None:
                        continue
            ready = cs.ready
            if ready:
                cs.outstanding += 1
                self._pending += 1
                return ready.popleft()
            rows = cs.rows
            if rows is not None and not cs.chunk.layout.letters:
                if not rows.exhausted:
                    self._prepare(cs, rows)
                    continue
            elif rows is not None:
                for off, line in rows:  # a replay's dead letters: rare, one at a time
                    if off in cs.chunk.done:
                        continue
                    try:
                        return self._letter(cs, off, line)
                    except chunker.BadRow as e:
                        self.outcomes.reject(cs, off, line, e.reason)
            cs.parsed = True
            cs.rows = None
            self._cur = None
            self.outcomes.finish_if_done(cs)

    def _prepare(self, cs: ChunkState, rows: rowpath.RowBatcher) -> None:
        """The chunk's next batch of lines: rejects recorded now, good rows prepared (parsed,
        signed, framed) in cs.ready. They count as taken only when _read_row hands them out,
        so back pressure is unchanged; ready adds at most one batch per chunk."""
        now = time.time()
        req = self.requests
        b = rows.next(req, now, self.batch)
        for off, reason, line in b.rejects:
            self.outcomes.reject(cs, off, line, reason)
        if not b.offsets:
            return
        sec = int(now)
        ready = cs.ready
        for off, uid, msg, fields, data in zip(b.offsets, b.uids, b.msgs, b.fields, b.requests):
            a = _Alert(cs, off, uid, msg, fields)
            a.req, a.req_sec, a.requests = data, sec, req
            ready.append(a)

    def _letter(self, cs: ChunkState, off: int, line: bytes) -> _Alert:
        """A replay job's row: the dead letter on the line (BadRow if it is none)."""
        lt = letters.parse(line)
        cs.outstanding += 1
        self._pending += 1
        return _Alert(cs, off, lt.user_id, lt.message, lt.fields, lt)

    def _expire_rows(self) -> None:
        """While the endpoint is down, rows of jobs older than retry.max_age are dead
        without a send: the job can then complete instead of waiting forever."""
        max_age = self.cfg.retry.max_age
        while (cs := self._cur or self._next_chunk()) is not None:
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
                lay = chunk.layout
                if lay.letters:
                    rows = chunker.read_rows(fd, chunk.start, chunk.end, lay.max_line_bytes)
                else:
                    lead, data, pos = rowpath.read_span(fd, chunk.start, chunk.end,
                                                        lay.max_line_bytes)
                    rows = rowpath.RowBatcher(data, pos, lay, chunk.job, chunk.name, chunk.done)
            finally:
                os.close(fd)
        except OSError as e:
            log.error("worker %d: %s chunk %d unreadable: %s", self.index, chunk.job, chunk.seq, e)
            self.conn.send(ChunkFailed(self.index, chunk.job, chunk.seq, str(e)))
            return None
        cs = ChunkState(chunk, rows)
        if chunk.done:  # recovered rows count as live until the chunk is acked
            self.outcomes.open.add(cs)
        if not lay.letters:
            for off, reason, line in lead:
                if off not in chunk.done:
                    self.outcomes.reject(cs, off, line, reason)
        self._cur = cs
        return cs

    # ------------------------------------------------------------ sending

    def _next_now(self, lane: int) -> _Alert | None:
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

    async def _attempt(self, a: _Alert, sender: _Sender) -> None:
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

    def _request(self, a: _Alert) -> bytes:
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

    def _answered(self, a: _Alert, gate: Gate, r: Response | TransportError) -> None:
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

    def _settle(self, a: _Alert, gate: Gate, status: int, d: Decision) -> None:
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

    def _internal_error(self, a: _Alert, e: Exception) -> None:
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

    def _retry(self, a: _Alert, delay: float) -> None:
        if self._expired(a):
            return
        self._push(a, time.monotonic() + delay)

    def _push(self, a: _Alert, due: float) -> None:
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

    def _final(self, a: _Alert, outcome: Outcome, status: int, err: str | None) -> None:
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
