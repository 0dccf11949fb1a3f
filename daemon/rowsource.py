"""A worker's rows: which alert a lane takes next, and what job control does to them.

The part of worker.Worker that reads chunks (pread, the compiled row path in batches,
a replay's dead letters), hands out prepared rows and due retries under the retry
budget and back pressure, and applies pause, resume, cancel and a cluster fence to the
chunks, parked rows and retries it holds. Sending and scheduling what the policy
decides stay in worker.py (a mixin: both work on the same Worker's state).
"""
from __future__ import annotations

import heapq
import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from . import chunker, letters, rowpath
from .outcomes import ChunkState
from .protocol import Chunk, ChunkFailed, Outcome

if TYPE_CHECKING:
    from .breaker import Breaker
    from .config import Config
    from .outbox import Outbox
    from .outcomes import Recorder

log = logging.getLogger("alertd.worker")


class Alert:
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


class RowSource:
    """Choosing work and job control, over the Worker's state (set in Worker.__init__)."""

    # The Worker's state these methods share with its sending half.
    index: int
    outbox: Outbox
    cfg: Config
    wal: Any
    breaker: Breaker
    outcomes: Recorder
    requests: rowpath.Requests
    batch: int
    max_backlog: int
    _chunks: deque[Chunk]
    _cur: ChunkState | None
    _paused: set[str]
    _cancelled: set[str]
    _fenced: set[tuple[str, int, int]]
    _parked: list[ChunkState]
    _held: dict[str, list[Alert]]
    _retries: list[tuple[float, int, Alert]]
    _pending: int
    _draining: bool
    _sent_first: int
    _sent_retry: int

    # Scheduling, in worker.py.
    def _push(self, a: Alert, due: float) -> None:
        raise NotImplementedError

    def _final(self, a: Alert, outcome: Outcome, status: int, err: str | None) -> None:
        raise NotImplementedError

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

    def _is_fenced(self, a: Alert) -> bool:
        """Whether the row's chunk was fenced (a chunk whose rows were all in flight at the
        fence is marked on its first row that comes back)."""
        cs = a.cs
        if not cs.fenced and self._fenced:
            c = cs.chunk
            if (c.job, c.seq, c.claim) in self._fenced:
                self.outcomes.fence(cs)
        return cs.fenced

    def _drop(self, a: Alert) -> None:
        """A cancelled job's row that will not be sent again: no record of its own."""
        a.busy = False
        self._pending -= 1
        a.cs.outstanding -= 1
        self.outcomes.finish_if_done(a.cs)

    def _next_alert(self) -> Alert | None:
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

    def _read_row(self) -> Alert | None:
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
            a = Alert(cs, off, uid, msg, fields)
            a.req, a.req_sec, a.requests = data, sec, req
            ready.append(a)

    def _letter(self, cs: ChunkState, off: int, line: bytes) -> Alert:
        """A replay job's row: the dead letter on the line (BadRow if it is none)."""
        lt = letters.parse(line)
        cs.outstanding += 1
        self._pending += 1
        return Alert(cs, off, lt.user_id, lt.message, lt.fields, lt)

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
            self.outbox.send(ChunkFailed(self.index, chunk.job, chunk.seq, str(e)))
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
