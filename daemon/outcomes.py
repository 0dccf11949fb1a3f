"""Final outcomes inside a worker, and the rule that finalises chunks.

A row's outcome goes to its side file (rejects/ or dlq/) and then to the WAL;
a chunk is final when every row of it is, and is acknowledged to the
supervisor only once those records are durable. Never sends a request.

Row records are encoded a batch at a time (rowpath.encode_wal_rows): they wait in
their chunk's list until WAL_BATCH of them, the end of the loop turn, the chunk's
marker or a WAL sync, whichever comes first; the counts move per row at once.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import orjson

from . import letters, rowpath, wal
from .letters import Letter
from .outbox import Outbox
from .protocol import Chunk, ChunkAck, Counts, Outcome, Progress
from .sidelog import SideLog

MAX_LINE_IN_REJECT = 1024  # bytes of a bad line kept in rejects/<job>.jsonl
WAL_BATCH = 64  # row records of a chunk encoded at once


class ChunkState:
    """A chunk being delivered: its counts so far and how many rows are still open."""

    __slots__ = ("chunk", "counts", "outstanding", "parsed", "rows", "ready", "finished",
                 "wal_rows", "fenced")

    def __init__(self, chunk: Chunk, rows: Iterator[tuple[int, bytes]] | Any) -> None:
        self.chunk = chunk
        self.counts = Counts()
        self.counts.add(chunk.prior)
        self.outstanding = 0  # rows taken for sending and not yet final
        self.parsed = False  # every row of the span has been read
        # The rows: a rowpath.RowBatcher, or (a replay job's letters) an iterator of lines.
        self.rows: Iterator[tuple[int, bytes]] | Any | None = rows
        self.ready: deque[Any] = deque()  # the worker's prepared rows, not yet taken
        self.finished = False
        self.wal_rows: list[rowpath.WalRow] = []  # row records not yet encoded
        self.fenced = False  # another node owns it now: no record, no ack (cluster mode)


class Recorder:
    def __init__(self, index: int, outbox: Outbox, log: wal.WalWriter, side: SideLog) -> None:
        self.index = index
        self.outbox = outbox
        self.wal = log
        self.side = side
        self.acks: set[asyncio.Task[None]] = set()
        self.open: set[ChunkState] = set()  # chunks with counts not yet acked
        self._reported: dict[str, tuple[int, ...]] = {}  # the last Progress sent
        self._dirty: list[ChunkState] = []  # chunks with row records not yet encoded
        self._flush_due = False  # a flush is scheduled for the end of this loop turn
        self._durable: list[ChunkState] = []  # chunks whose records are durable, not yet acked

    def unacked(self) -> dict[str, Counts]:
        """Per job, the counts of this worker's chunks not yet acknowledged."""
        out: dict[str, Counts] = {}
        for cs in self.open:
            c = out.get(cs.chunk.job)
            if c is None:
                c = out[cs.chunk.job] = Counts()
            c.add(cs.counts)
        return out

    def report(self, force: bool = False) -> None:
        """Send a Progress if the unacked counts changed since the last one (or `force`)."""
        counts = self.unacked()
        key = {job: (c.rows, c.delivered, c.rejected, c.dead, c.possible_duplicates,
                     c.cancelled) for job, c in counts.items()}
        if force or key != self._reported:
            self._reported = key
            self._send(Progress(self.index, counts))

    def fence(self, cs: ChunkState) -> None:
        """The chunk is another node's now: its records not yet encoded are dropped (the
        fence comes before any other node may take it, so those already written stand),
        and it will never have a marker or an ack from here."""
        cs.fenced = True
        cs.finished = True
        cs.wal_rows.clear()
        self.open.discard(cs)

    def reject(self, cs: ChunkState, off: int, line: bytes, reason: str) -> None:
        if cs.fenced:
            return
        job, now = cs.chunk.job, time.time()
        text = line[:MAX_LINE_IN_REJECT].decode("utf-8", "replace")
        self.side.write("rejects", job, orjson.dumps(
            {"job": job, "offset": off, "line": text, "reason": reason, "file": cs.chunk.name,
             "ts": now}) + b"\n")
        self._record(cs, (off, Outcome.REJECTED.value, 0, 0, False, "", reason))
        cs.counts.count(Outcome.REJECTED)
        self.open.add(cs)

    def final(self, cs: ChunkState, off: int, uid: str, msg: str, attempts: int, dup: bool,
              outcome: Outcome, status: int, err: str | None,
              fields: dict[str, str] | None = None, letter: Letter | None = None) -> None:
        """The row at `off` ends as `outcome` (delivered or dead). A replayed `letter`
        that fails again goes back to the DLQ of its own job, with its id and offset."""
        if cs.fenced:  # a request that was in flight at the fence: the new owner resends it
            cs.outstanding -= 1
            return
        if outcome is Outcome.DEAD:
            job, now = cs.chunk.job, time.time()
            if letter is None:
                line = letters.entry(job, off, uid, msg, cs.chunk.name, attempts, status, err,
                                     now, fields)
            else:
                line = letters.entry(letter.job, letter.offset, uid, msg, letter.file,
                                     letter.attempts + attempts, status, err, now, fields,
                                     letter.id)
            self.side.write("dlq", letter.job if letter else job, line)  # before its record
        self._record(cs, (off, outcome.value, status, attempts, dup, uid, err))
        cs.counts.count(outcome, dup)
        self.open.add(cs)
        cs.outstanding -= 1
        self.finish_if_done(cs)

    def _record(self, cs: ChunkState, row: rowpath.WalRow) -> None:
        rows = cs.wal_rows
        rows.append(row)
        if len(rows) >= WAL_BATCH:
            self._encode(cs)
        elif len(rows) == 1:
            self._dirty.append(cs)
            if not self._flush_due:
                self._flush_due = True
                asyncio.get_running_loop().call_soon(self.flush)

    def _encode(self, cs: ChunkState) -> None:
        if cs.wal_rows:
            c = cs.chunk
            self.wal.append(rowpath.encode_wal_rows(c.job, c.seq, cs.wal_rows, time.time()))
            cs.wal_rows = []

    def flush(self) -> None:
        """Hand every row record still waiting to the WAL writer (before a sync or close)."""
        self._flush_due = False
        dirty, self._dirty = self._dirty, []
        for cs in dirty:
            self._encode(cs)

    def finish_if_done(self, cs: ChunkState) -> None:
        if cs.parsed and cs.outstanding == 0 and not cs.finished:
            cs.finished = True
            self.open.add(cs)  # a cancelled chunk may have only its prior counts
            c = cs.chunk
            self._encode(cs)  # the marker comes after every record of its rows
            self.wal.append(wal.encode_chunk(c.job, c.seq, c.end, cs.counts, time.time()))
            t = asyncio.get_running_loop().create_task(self._ack(cs))
            self.acks.add(t)
            t.add_done_callback(self.acks.discard)

    async def _ack(self, cs: ChunkState) -> None:
        # Side files first: a durable "dead" WAL record must find its DLQ line.
        await self.side.sync()
        self.flush()
        await self.wal.sync()
        self._durable.append(cs)
        if len(self._durable) > 1:
            return  # the first chunk of this commit sends the acks of all
        # Every chunk the same commit made durable resumes in this loop turn: one turn
        # later they are all here, and go out together, followed by one Progress.
        await asyncio.sleep(0)
        batch, self._durable = self._durable, []
        for d in batch:
            self._send(ChunkAck(self.index, d.chunk.job, d.chunk.seq, d.counts))
        # Those counts are durable now: replace the live report in the same turn, acks first.
        self.open.difference_update(batch)
        self.report(force=True)

    def _send(self, msg: object) -> None:
        self.outbox.send(msg)
