"""Job dispatch: which chunk goes out next, and what acks, failures and dead workers mean for jobs.

Owns the running jobs and the recently finished summaries. It hands out chunk descriptors
and takes acks back; it never talks to a worker process itself (the supervisor does) and
never calls a job final before the acks say its outcomes are durable. Re-running a dead
worker's chunks reads the WALs off the event loop.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import wal
from .config import CsvConfig
from .jobs import Job, JobStore, partial_counts
from .protocol import Chunk, Counts

log = logging.getLogger("alertd.dispatch")

FINISHED_KEPT = 50  # summaries of jobs finished since start, for status


class Dispatcher:
    def __init__(self, state_dir: Path, store: JobStore) -> None:
        self.wal_dir = state_dir / "wal"
        self.store = store
        self.jobs: dict[str, Job] = {}
        self.finished: list[dict] = []

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

    def add(self, job: Job) -> None:
        """A claimed (or recovered) job joins the schedule; an empty one finishes at once."""
        job.open_plan()
        self.jobs[job.id] = job
        self._finalize_if_final(job)

    def next_chunk(self) -> Chunk | None:
        """The next chunk to hand out, oldest job first; None when nothing is ready."""
        for job in list(self.jobs.values()):  # finalizing below removes from self.jobs
            c = job.next_chunk()
            if c is not None:
                return c
            self._finalize_if_final(job)
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
        summary = self.store.finalize(job)
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
                        "failed": job.failed})
        return out
