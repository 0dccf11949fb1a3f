"""Arrivals in the inbox -> claimed jobs: one batch of claims at a time, in a thread.

Owns the queue of candidate paths (inotify events and rescans, deduplicated) and the
order of claims; JobStore.claim_many does the file work, for every path that arrived
while the previous batch was being claimed. A claim fsyncs and reads the file's head, so
it never runs on the event loop. Never plans or dispatches a job.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .jobs import Job, JobStore, reason_of
from .names import escape
from .watcher import scan_quiet

log = logging.getLogger("alertd.claims")

MAX_BATCH = 128  # paths claimed in one thread call: bounds jobseq's list of names


@dataclass
class _Upload:
    """A file the status API received, claimed in turn with the inbox's (outside it)."""
    path: Path
    priority: str
    result: asyncio.Future[Job | None]


class Claims:
    def __init__(self, store: JobStore, config: Callable[[], Config],
                 on_job: Callable[[Job, str], None]) -> None:
        self._store = store
        self._config = config  # the current one: a reload may change [csv] or chunk_bytes
        self._on_job = on_job
        self._queue: deque[Path | _Upload | None] = deque()  # None: rescan
        self._more = asyncio.Event()  # set when something is queued
        self._queued: set[Path] = set()
        self._rescan_queued = False
        self._stopped = False
        self._later: asyncio.TimerHandle | None = None  # a rescan once fresh files are quiet

    def arrived(self, path: Path) -> None:
        """A file may have arrived at `path` (inotify, a rescan)."""
        if self._stopped or path.parent != self._config().paths.inbox_dir or path in self._queued:
            return
        self._queued.add(path)
        self._put(path)

    def rescan(self) -> None:
        """List the inbox (in the thread too) and claim what is there."""
        if not self._rescan_queued and not self._stopped:
            self._rescan_queued = True
            self._put(None)

    async def claim(self, path: Path, priority: str) -> Job | None:
        """Claim one uploaded file now (in the queue's order) at `priority`; the job has
        joined the schedule when this returns it. None: draining, or the file could not be
        claimed (then it is in failed/). Raises what the claim raised (the file stays)."""
        if self._stopped:
            return None
        upload = _Upload(path, priority, asyncio.get_running_loop().create_future())
        self._put(upload)
        # Shielded: a client gone mid-claim must not leave a claimed job unscheduled.
        return await asyncio.shield(upload.result)

    def stop(self) -> None:
        """Claim nothing more (a drain); a claim under way still completes."""
        self._stopped = True
        if self._later is not None:
            self._later.cancel()

    def _rescan_later(self) -> None:
        self._later = None
        self.rescan()

    def _put(self, item: Path | _Upload | None) -> None:
        self._queue.append(item)
        self._more.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._more.clear()
                await self._more.wait()
            item = self._queue.popleft()
            if isinstance(item, _Upload):
                await self._claim_upload(item)
                continue
            if self._stopped:
                continue
            cfg = self._config()
            if item is None:
                self._rescan_queued = False
                found, wait = await loop.run_in_executor(None, scan_quiet, cfg.paths.inbox_dir)
                for p in found:
                    self.arrived(p)
                if wait is not None and self._later is None:
                    # Files too fresh for a scan (e.g. renamed in just before a start): look
                    # again once they are quiet, not only at the next periodic rescan.
                    self._later = loop.call_later(wait + 0.05, self._rescan_later)
                continue
            # The paths that arrived meanwhile are claimed with it, in one thread call that
            # shares the fsyncs (JobStore.claim_many); an upload or a rescan waits its turn.
            batch = [item]
            while len(batch) < MAX_BATCH and self._queue and isinstance(self._queue[0], Path):
                batch.append(self._queue.popleft())
            for path in batch:
                self._queued.discard(path)  # from now on a new arrival under this name counts
            try:
                jobs = await loop.run_in_executor(None, self._store.claim_many, batch, cfg.csv,
                                                  cfg.workers.chunk_bytes)
            except Exception as e:  # e.g. jobseq cannot be written: the files stay, retried
                log.error("cannot claim %s%s: %s", escape(batch[0].name),
                          f" and {len(batch) - 1} more" if len(batch) > 1 else "", reason_of(e))
                continue
            for job in jobs:
                if job is not None:
                    self._on_job(job, "normal")

    async def _claim_upload(self, up: _Upload) -> None:
        if self._stopped:
            up.result.set_result(None)
            return
        cfg = self._config()
        try:
            job = await asyncio.get_running_loop().run_in_executor(
                None, self._store.claim, up.path, cfg.csv, cfg.workers.chunk_bytes)
        except Exception as e:
            up.result.set_exception(e)
            return
        if job is not None:
            self._on_job(job, up.priority)
        up.result.set_result(job)
