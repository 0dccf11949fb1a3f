"""Job dispatch: which chunk goes out next, and what acks, failures and dead workers mean for jobs.

Owns the running and queued jobs and the recently finished summaries. Chunks go out round
robin over the running jobs (strict priority between levels), so a small file dropped behind
large ones is done in seconds; at most MAX_RUNNING jobs hold an open file and a lazy plan,
the rest wait their turn at no cost. It hands out chunk descriptors and takes acks back;
it never talks to a worker process itself (the supervisor does) and never calls a job
final before the acks say its outcomes are durable. Re-running a dead
worker's chunks reads the WALs off the event loop.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import wal
from .config import CsvConfig
from .errors import InputError
from .jobs import Job, JobStore, partial_counts, reason_of
from .protocol import Chunk, Counts

log = logging.getLogger("alertd.dispatch")

FINISHED_KEPT = 50  # summaries of jobs finished since start, for status
MAX_RUNNING = 64  # jobs planned at once: each holds one descriptor and one chunk plan
PRIORITIES = ("high", "normal", "low")  # strict order: a level runs only when those above wait


class Dispatcher:
    def __init__(self, state_dir: Path, store: JobStore) -> None:
        self.wal_dir = state_dir / "wal"
        self.store = store
        self.jobs: dict[str, Job] = {}
        self.finished: list[dict] = []
        self.priority: dict[str, str] = {}
        self._running = {p: deque[str]() for p in PRIORITIES}  # round robin: served job at the end
        self._queued = {p: deque[str]() for p in PRIORITIES}  # not yet planned, oldest first
        self._promoted = 0  # how many jobs have left the queue, to notice it during a pass

    async def recover(self, csv: CsvConfig, chunk_bytes: int) -> None:
        """Take up the jobs a previous run left unfinished, skipping what their WALs prove."""
        loop = asyncio.get_running_loop()
        t = time.monotonic()
        jobs = await loop.run_in_executor(None, self.store.load_unfinished, csv, chunk_bytes)
        if not jobs:
            return
        rec = await loop.run_in_executor(None, wal.recover, self.wal_dir, [j.id for j in jobs])
        for job in jobs:
            job.recovery = rec.get(job.id)
            self.add(job)
        log.info("recovered %d unfinished jobs from the WALs in %.2f s", len(jobs),
                 time.monotonic() - t)

    def add(self, job: Job, priority: str = "normal") -> None:
        """A claimed (or recovered) job joins the schedule, queued until a running slot frees."""
        self.jobs[job.id] = job
        self.priority[job.id] = priority
        self._queued[priority].append(job.id)
        self._promote()
        if self.state(job.id) == "queued":
            job.park()

    def state(self, job_id: str) -> str:
        return "queued" if any(job_id in q for q in self._queued.values()) else "running"

    def _promote(self) -> None:
        """Open the plans of queued jobs, higher priority first, while slots are free."""
        while sum(map(len, self._running.values())) < MAX_RUNNING:
            level = next((p for p in PRIORITIES if self._queued[p]), None)
            if level is None:
                return
            job = self.jobs[self._queued[level].popleft()]
            self._running[level].append(job.id)
            self._promoted += 1
            try:
                job.open_plan()
            except (OSError, InputError) as e:  # e.g. a spool file swapped or cut since
                job.fail(reason_of(e))
            self._finalize_if_final(job)  # an empty or unreadable file is final at once

    def next_chunk(self) -> Chunk | None:
        """The next chunk to hand out: the highest level with work, round robin inside it;
        None when nothing is ready."""
        while True:
            promoted = self._promoted
            for level in PRIORITIES:
                c = self._serve(self._running[level])
                if c is not None:
                    return c
                if self._promoted != promoted:
                    break  # a job that finished let queued ones in, maybe above: look again
            else:
                return None

    def _serve(self, ring: deque[str]) -> Chunk | None:
        idle = 0
        while idle < len(ring):
            job = self.jobs[ring[0]]
            ring.rotate(-1)  # served or not, it goes to the back of the ring
            c = job.next_chunk()
            if c is not None:
                return c
            if job.final:
                self._finalize_if_final(job)  # leaves the ring
            else:
                idle += 1  # waiting for acks or requeues
        return None

    def ack(self, job_id: str, seq: int, counts: Counts) -> None:
        job = self.jobs.get(job_id)
        if job is not None:
            job.ack(seq, counts)
            self._finalize_if_final(job)

    def chunk_failed(self, job_id: str, seq: int, reason: str) -> None:
        """A worker could not read the chunk's file: the whole job fails with the reason."""
        job = self.jobs.get(job_id)
        if job is not None:
            job.outstanding.pop(seq, None)
            job.fail(reason)
            self._finalize_if_final(job)

    async def requeue(self, chunks: Iterable[Chunk]) -> None:
        """Re-run a dead worker's chunks, skipping rows its WAL already has outcomes for.
        The chunks stay outstanding in their jobs meanwhile, so no job can finish early."""
        held = list(chunks)
        if not held:
            return
        rec = await asyncio.get_running_loop().run_in_executor(
            None, wal.recover, self.wal_dir, {c.job for c in held})
        for chunk in held:
            job = self.jobs.get(chunk.job)
            if job is None:
                continue
            r = rec.get(chunk.job)
            if r is not None and chunk.seq in r.chunks:
                self.ack(chunk.job, chunk.seq, r.chunks[chunk.seq])  # its marker reached the WAL
                continue
            done, prior = partial_counts(r.partial.get(chunk.seq, {})) if r else (frozenset(), None)
            job.requeue(dataclasses.replace(
                chunk, done=done | chunk.done, prior=prior if prior is not None else chunk.prior))

    def _finalize_if_final(self, job: Job) -> None:
        if not job.final or self.jobs.get(job.id) is not job:
            return
        del self.jobs[job.id]
        self._running[self.priority.pop(job.id)].remove(job.id)
        summary = self.store.finalize(job)
        self._promote()
        self.finished = (self.finished + [summary])[-FINISHED_KEPT:]
        log.info("%s %s: %d rows, %d delivered, %d rejected, %d dead, %d possible duplicates",
                 job.id, summary["status"], summary["rows"], summary["delivered"],
                 summary["rejected"], summary["dead"], summary["possible_duplicates"])

    def snapshot(self) -> list[dict[str, Any]]:
        out = []
        for job in self.jobs.values():
            out.append({"job": job.id, "file": job.name, "bytes": job.size,
                        "data_start": job.data_start, "started_at": job.started_at,
                        "bytes_planned": job.bytes_planned, "bytes_done": job.bytes_done,
                        "planned_all": job.planned_all, "chunks_done": job.chunks_done,
                        "chunks_in_flight": len(job.outstanding), **job.counts.as_dict(),
                        "failed": job.failed, "state": self.state(job.id),
                        "priority": self.priority[job.id]})
        return out
