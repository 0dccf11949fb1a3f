"""Arrivals in the inbox -> claimed jobs: one claim at a time, in a thread.

Owns the queue of candidate paths (inotify events and rescans, deduplicated) and the
order of claims; JobStore.claim does the file work. A claim fsyncs and reads the file's
head, so it never runs on the event loop. Never plans or dispatches a job.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from .config import Config
from .jobs import Job, JobStore, reason_of
from .names import escape
from .watcher import scan

log = logging.getLogger("alertd.claims")


class Claims:
    def __init__(self, store: JobStore, config: Callable[[], Config],
                 on_job: Callable[[Job], None]) -> None:
        self._store = store
        self._config = config  # the current one: a reload may change [csv] or chunk_bytes
        self._on_job = on_job
        self._queue: asyncio.Queue[Path | None] = asyncio.Queue()  # None: rescan
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

    def stop(self) -> None:
        """Claim nothing more (a drain); a claim under way still completes."""
        self._stopped = True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            path = await self._queue.get()
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
                self._on_job(job)
