"""Job dispatch: which chunk goes out next, and what acks, failures and dead workers mean for jobs.

Owns the running and queued jobs and the recently finished summaries. Chunks go out round
robin over the running jobs (strict priority between levels), so a small file dropped behind
large ones is done in seconds; at most MAX_RUNNING jobs hold an open file and a lazy plan,
the rest wait their turn at no cost. It owns each job's control state too (paused,
cancelled, priority): what may change in which state is decided here, in `check`. It hands
out chunk descriptors and takes acks back; it never talks to a worker process itself (the
supervisor does) and never calls a job final before the acks say its outcomes are durable.
Re-running a dead worker's chunks, and counting a cancelled job's rows, happen off the loop.
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

from . import replay, wal
from .config import CsvConfig
from .errors import InputError
from .jobs import FINISHED_LISTED, Job, JobStore, count_rows, partial_counts, reason_of
from .protocol import JOB_ACTIONS, Chunk, Counts

log = logging.getLogger("alertd.dispatch")

FINISHED_KEPT = FINISHED_LISTED  # summaries of the last finished jobs, for status and jobs
MAX_RUNNING = 64  # jobs planned at once: each holds one descriptor and one chunk plan
PRIORITIES = ("high", "normal", "low")  # strict order: a level runs only when those above wait
FINISH_RETRY = 1.0  # seconds between attempts to write summaries that failed
FINISH_BATCH = 256  # summaries written in one thread call (one fsync of done/ and spool/)


class NoSuchJob(Exception):
    """No job with this id is active or among the recently finished ones (404)."""


class NotAllowed(Exception):
    """The job cannot take this action in its state (409); the message says why."""


class Dispatcher:
    def __init__(self, state_dir: Path, store: JobStore) -> None:
        self.wal_dir = state_dir / "wal"
        self.store = store
        self.jobs: dict[str, Job] = {}
        self.finished: list[dict] = []  # since start (status, metrics totals)
        self.earlier: list[dict] = []  # finished before this start, from done/ and failed/
        self.priority: dict[str, str] = {}
        self._running = {p: deque[str]() for p in PRIORITIES}  # round robin: served job at the end
        self._queued = {p: deque[str]() for p in PRIORITIES}  # not yet planned, oldest first
        # Planned to the end, waiting only for acks: out of the rings (a pass over them
        # would ask each in vain) and off their running slot (no descriptor, no plan left).
        # A chunk re-queued for one of them brings it back into its ring.
        self._awaiting: set[str] = set()
        # Paused jobs leave the schedule (and free their running slot); the value says
        # whether the job had an open plan (it keeps it) or goes back to the queue.
        self.paused: dict[str, bool] = {}
        self._closing: set[str] = set()  # cancelled, final: counting rows for the summary
        # Final, summaries being written (in a thread, many at once): still in `jobs`, shown
        # as running, no longer controllable; they leave once their summaries are durable.
        self._finishing: set[str] = set()
        self._to_finish: list[Job] = []
        self._finisher: asyncio.Task[None] | None = None
        self._promoted = 0  # how many jobs have left the queue, to notice it during a pass

    async def recover(self, csv: CsvConfig, chunk_bytes: int) -> None:
        """Take up the jobs a previous run left unfinished, skipping what their WALs prove,
        with their priority, pause and cancel kept."""
        loop = asyncio.get_running_loop()
        t = time.monotonic()
        self.earlier = await loop.run_in_executor(None, self.store.load_finished, FINISHED_KEPT)
        jobs = await loop.run_in_executor(None, self.store.load_unfinished, csv, chunk_bytes)
        if not jobs:
            return
        rec = await loop.run_in_executor(None, wal.recover, self.wal_dir, [j.id for j in jobs])
        for job in jobs:
            job.recovery = rec.get(job.id)
            job.control = await loop.run_in_executor(None, self.store.read_control, job.id)
            prio = job.control.get("priority", "normal")
            self.add(job, prio if prio in PRIORITIES else "normal")
        log.info("recovered %d unfinished jobs from the WALs in %.2f s", len(jobs),
                 time.monotonic() - t)

    def add(self, job: Job, priority: str = "normal") -> None:
        """A claimed (or recovered) job joins the schedule, queued until a running slot
        frees; a recovered one keeps its persisted pause or cancel."""
        self.jobs[job.id] = job
        self.priority[job.id] = priority
        state = job.control.get("state")
        if state == "cancelled":
            job.cancel()  # persisted before it was applied: finish with what the WAL has
            self._finalize_if_final(job)
            return
        if state == "paused":
            self.paused[job.id] = False  # its plan opens when it is resumed
        else:
            self._queued[priority].append(job.id)
            self._promote()
        if self.state(job.id) in ("queued", "paused"):
            job.park()

    def state(self, job_id: str) -> str:
        if job_id in self._closing or (job_id in self.jobs and self.jobs[job_id].cancelled):
            return "cancelled"
        if job_id in self.paused:
            return "paused"
        if job_id in self._finishing or job_id in self._awaiting:
            return "running"  # (finishing: until its summary is durable)
        # The rings hold at most MAX_RUNNING ids, the queues maybe thousands: ask the rings,
        # or a status snapshot of every job costs the square of the jobs queued.
        return "running" if any(job_id in r for r in self._running.values()) else "queued"

    def _promote(self) -> None:
        """Open the plans of queued jobs, higher priority first, while slots are free."""
        while sum(map(len, self._running.values())) < MAX_RUNNING:
            level = next((p for p in PRIORITIES if self._queued[p]), None)
            if level is None:
                return
            job = self.jobs[self._queued[level].popleft()]
            self._running[level].append(job.id)
            self._promoted += 1
            self._open(job)

    def _open(self, job: Job) -> None:
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
            elif job.planned_all and not job.requeued:
                ring.pop()  # only acks are left to come: it waits out of the ring
                self._awaiting.add(job.id)
                self._promote()  # its slot is free
            else:
                idle += 1  # waiting for its plan's next chunk
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
        The chunks stay outstanding in their jobs meanwhile, so no job can finish early.
        A cancelled job's chunks are not re-run: they keep the outcomes the WAL has."""
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
            prior = prior if prior is not None else chunk.prior
            if job.cancelled:
                self.ack(chunk.job, chunk.seq, prior)
                continue
            job.requeue(dataclasses.replace(chunk, done=done | chunk.done, prior=prior))
            if job.id in self._awaiting:  # back into its ring, beyond MAX_RUNNING if need be
                self._awaiting.discard(job.id)
                self._running[self.priority[job.id]].append(job.id)

    # ------------------------------------------------------------ control

    def find(self, job_id: str) -> Job | dict | None:
        """The active job, or the summary of a recently finished one, or None."""
        job = self.jobs.get(job_id)
        if job is not None:
            return job
        return next((s for s in reversed(self.recently_finished()) if s["job"] == job_id), None)

    def recently_finished(self) -> list[dict]:
        """The last FINISHED_KEPT finished jobs, those of earlier runs included, oldest first."""
        self.take_claim_failures()
        if not self.earlier:
            return self.finished
        seen = {s["job"] for s in self.finished}
        return ([s for s in self.earlier if s["job"] not in seen] + self.finished)[-FINISHED_KEPT:]

    def check(self, job_id: str, action: str, priority: str | None = None) -> None:
        """Raise NoSuchJob or NotAllowed (with the reason) unless `action` ("pause",
        "resume", "cancel", "priority") may be applied to the job now."""
        found = self.find(job_id)
        if found is None:
            raise NoSuchJob(f"no such job: {job_id}")
        if action not in (*JOB_ACTIONS, "priority"):
            raise ValueError(f"unknown action {action!r}")
        if action == "priority" and priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}")
        state = found.get("status", "complete") if isinstance(found, dict) else \
            self._final_state(found) if job_id in self._finishing else self.state(job_id)
        if state in ("complete", "failed", "cancelled"):
            verb = {"pause": "paused", "resume": "resumed", "cancel": "cancelled",
                    "priority": "given a priority"}[action]
            again = " (already cancelled)" if state == "cancelled" and action == "cancel" else ""
            raise NotAllowed(f"{job_id} is {state}{again}: a finished job cannot be {verb}")
        if action == "pause" and state == "paused":
            raise NotAllowed(f"{job_id} is already paused")
        if action == "resume" and state != "paused":
            raise NotAllowed(f"{job_id} is {state}, not paused: nothing to resume")

    def control_doc(self, job_id: str, action: str, priority: str | None = None) -> dict:
        """What spool/<job>.control.json holds once `action` is applied."""
        state = {"pause": "paused", "cancel": "cancelled", "resume": "running"}.get(
            action, "paused" if job_id in self.paused else "running")
        return {"state": state, "priority": priority or self.priority[job_id]}

    def apply(self, job_id: str, action: str, priority: str | None = None) -> None:
        """Change the job's schedule (check() passed just before, on the event loop)."""
        job = self.jobs[job_id]
        if action == "pause":
            had_plan = self._detach(job_id)
            self.paused[job_id] = had_plan
        elif action == "resume":
            if self.paused.pop(job_id):
                self._running[self.priority[job_id]].append(job_id)
            else:
                self._queued[self.priority[job_id]].append(job_id)
                self._promote()
        elif action == "cancel":
            self._detach(job_id)
            self.paused.pop(job_id, None)
            job.cancel()
            self._finalize_if_final(job)
        elif action == "priority" and priority != self.priority[job_id]:
            old = self.priority[job_id]
            self.priority[job_id] = priority
            if job_id in self._running[old]:
                self._running[old].remove(job_id)
                self._running[priority].append(job_id)
            elif job_id in self._queued[old]:
                self._queued[old].remove(job_id)
                self._queued[priority].append(job_id)
                self._promote()

    def _detach(self, job_id: str) -> bool:
        """Take the job out of the rings and queues; True if it was running (planned)."""
        prio = self.priority.get(job_id, "normal")
        if job_id in self._awaiting:
            self._awaiting.discard(job_id)
            return True
        if job_id in self._running[prio]:
            self._running[prio].remove(job_id)
            self._promote()  # its slot is free
            return True
        if job_id in self._queued[prio]:
            self._queued[prio].remove(job_id)
        return False

    # ------------------------------------------------------------ finishing

    @staticmethod
    def _final_state(job: Job) -> str:
        return "failed" if job.failed else "cancelled" if job.cancelled else "complete"

    def finishing(self, job_id: str) -> bool:
        """Final, its summary not yet durable: no action applies any more."""
        return job_id in self._finishing

    def _finalize_if_final(self, job: Job) -> None:
        if not job.final or self.jobs.get(job.id) is not job or job.id in self._closing \
                or job.id in self._finishing:
            return
        self._detach(job.id)
        self.paused.pop(job.id, None)
        if job.cancelled and job.failed is None:
            # The rows never handed out may be millions: count them in a thread.
            self._closing.add(job.id)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # unit tests drive the dispatcher without a loop
                self._close_cancelled(job, self._settle_cancelled(job))
                return
            fut = loop.run_in_executor(None, self._settle_cancelled, job)
            fut.add_done_callback(lambda f: self._counted(job, f))
            return
        self._finish(job)

    def _settle_cancelled(self, job: Job) -> int:
        """The rows of a cancelled job (blocking); a cancelled replay first puts the letters
        it never sent back into the DLQ they came from."""
        if job.kind == "replay":
            n = replay.return_unsent(self.store.state_dir, job)
            log.info("%s: %d unsent dead letters back in dlq/%s.jsonl", job.id, n, job.replay_of)
        return count_rows(job.spool, job.data_start)

    def _counted(self, job: Job, fut: asyncio.Future[int]) -> None:
        try:
            rows = fut.result()
        except (OSError, InputError) as e:
            log.error("%s: cannot count the rows of the cancelled job: %s", job.id, reason_of(e))
            rows = 0  # the summary still ends it; `alertd verify` can still check
        self._close_cancelled(job, rows)

    def _close_cancelled(self, job: Job, rows: int) -> None:
        job.settle_cancelled(rows)
        self._closing.discard(job.id)
        self._finish(job)

    def _finish(self, job: Job) -> None:
        """Write the job's summary and move its file: in a thread, together with the other
        jobs that became final meanwhile (one fsync per folder for all of them). Unit tests
        without an event loop finish at once."""
        job.priority = self.priority.get(job.id, job.priority)
        self._finishing.add(job.id)
        self._to_finish.append(job)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            batch, self._to_finish = self._to_finish, []
            staged = self._stage(batch)
            self.store.publish(batch, staged)
            self._finished(batch, [summary for summary, _ in staged])
            self.store.sync_finished(batch)
            return
        if self._finisher is None:
            self._finisher = loop.create_task(self._finish_batches(), name="finish jobs")

    async def _finish_batches(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._to_finish:
                batch = self._to_finish[:FINISH_BATCH]
                del self._to_finish[:FINISH_BATCH]
                try:
                    staged = await loop.run_in_executor(None, self._stage, batch)
                    # On the loop: the summaries appear as their jobs leave the list.
                    self.store.publish(batch, staged)
                except Exception as e:  # e.g. a full disk: the jobs stay final, retried
                    log.error("cannot write the summaries of %d jobs (%s): retrying in %g s",
                              len(batch), reason_of(e), FINISH_RETRY,
                              exc_info=not isinstance(e, OSError))
                    self._to_finish = batch + self._to_finish
                    await asyncio.sleep(FINISH_RETRY)
                    continue
                self._finished(batch, [summary for summary, _ in staged])
                try:
                    await loop.run_in_executor(None, self.store.sync_finished, batch)
                except OSError as e:
                    log.error("cannot fsync done/ and spool/ after %d summaries: %s",
                              len(batch), reason_of(e))
        finally:
            self._finisher = None

    def _stage(self, jobs: list[Job]) -> list[tuple[dict, Path]]:
        # A replay credits its original job before its own summary: a crash in between
        # credits it again.
        for job in jobs:
            if job.kind == "replay":
                replay.credit(self.store, job)
        return self.store.stage_summaries(jobs)

    def _finished(self, jobs: list[Job], summaries: list[dict]) -> None:
        for job, summary in zip(jobs, summaries):
            del self.jobs[job.id]
            self.priority.pop(job.id, None)
            self._finishing.discard(job.id)
            self.finished.append(summary)
            log.info("%s %s: %d rows, %d delivered, %d rejected, %d dead, %d cancelled, "
                     "%d possible duplicates", job.id, summary["status"], summary["rows"],
                     summary["delivered"], summary["rejected"], summary["dead"],
                     summary["cancelled"], summary["possible_duplicates"])
        self.finished = self.finished[-FINISHED_KEPT:]
        self._promote()

    async def settle(self) -> None:
        """Return once every final job's summary is written (before the daemon exits)."""
        while self._finisher is not None:
            await asyncio.shield(self._finisher)

    def take_claim_failures(self) -> None:
        """Files that failed at claim (noted by the store's claim thread) join `finished`."""
        q = self.store.claim_failures
        while q:
            self.finished = (self.finished + [q.popleft()])[-FINISHED_KEPT:]

    # ------------------------------------------------------------ views

    def snapshot(self) -> list[dict[str, Any]]:
        self.take_claim_failures()
        out = []
        for job in self.jobs.values():
            out.append({"job": job.id, "file": job.name, "bytes": job.size,
                        "data_start": job.data_start, "started_at": job.started_at,
                        "bytes_planned": job.bytes_planned, "bytes_done": job.bytes_done,
                        "planned_all": job.planned_all, "chunks_done": job.chunks_done,
                        "chunks_in_flight": len(job.outstanding), **job.counts.as_dict(),
                        "failed": job.failed, "state": self.state(job.id),
                        "priority": self.priority[job.id], "kind": job.kind,
                        "replay_of": job.replay_of})
        return out

    def replaying(self, of: str) -> Job | None:
        """The active replay job of `of`'s dead letters, if there is one."""
        return next((j for j in self.jobs.values() if j.replay_of == of), None)
