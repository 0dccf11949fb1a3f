"""Arrivals in the inbox -> claimed jobs: one claim at a time, in a thread.

Owns the queue of candidate paths (inotify events and rescans, deduplicated) and the
order of claims; JobStore.claim does the file work. A claim fsyncs and reads the file's
head, so it never runs on the event loop. Never plans or dispatches a job.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .jobs import Job, JobStore, reason_of
from .names import escape
from .watcher import scan

log = logging.getLogger("alertd.claims")


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
        self._queue: asyncio.Queue[Path | _Upload | None] = asyncio.Queue()  # None: rescan
        self._queued: set[Path] = set()
        self._rescan_queued = False
        self._stopped = False

    def arrived(self, path: Path) -> None:
        """A file may have arrived at `path` (inotify, a rescan)."""
        if self._stopped or path.parent != self._config().paths.inbox_dir or path in self._queued:
            return
        self._queued.add(path)
        self._queue.put_nowait(path)

    def rescan(self) -> None:
        """List the inbox (in the thread too) and claim what is there."""
        if not self._rescan_queued and not self._stopped:
            self._rescan_queued = True
            self._queue.put_nowait(None)

    async def claim(self, path: Path, priority: str) -> Job | None:
        """Claim one uploaded file now (in the queue's order) at `priority`; the job has
        joined the schedule when this returns it. None: draining, or the file could not be
        claimed (then it is in failed/). Raises what the claim raised (the file stays)."""
        if self._stopped:
            return None
        upload = _Upload(path, priority, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(upload)
        # Shielded: a client gone mid-claim must not leave a claimed job unscheduled.
        return await asyncio.shield(upload.result)

    def stop(self) -> None:
        """Claim nothing more (a drain); a claim under way still completes."""
        self._stopped = True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            path = await self._queue.get()
            if isinstance(path, _Upload):
                await self._claim_upload(path)
                continue
            if self._stopped:
                continue
            cfg = self._config()
            if path is None:
                self._rescan_queued = False
                for p in await loop.run_in_executor(None, scan, cfg.paths.inbox_dir):
                    self.arrived(p)
                continue
            self._queued.discard(path)  # from now on a new arrival under this name counts
            try:
                job = await loop.run_in_executor(None, self._store.claim, path, cfg.csv,
                                                 cfg.workers.chunk_bytes)
            except Exception as e:  # e.g. jobseq cannot be written: the file stays, retried
                log.error("cannot claim %s: %s", escape(path.name), reason_of(e))
                continue
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
