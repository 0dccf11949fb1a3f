"""Retention: rotated WAL segments and the source files of finished jobs.

A rotated segment goes once every job it names is final and summarised, and `wal.retention`
seconds have passed since it was last written, so that `alertd verify` and `alertd tail`
still see recent jobs; current segments are never removed (their writer owns them). A
finished job's source file leaves done/ `[retention] done_files` seconds after its summary
was written; the summary and manifest stay. Runs in a thread; never raises.
"""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

from .wal import segments

log = logging.getLogger("alertd.retention")

_JOB = re.compile(rb'"job":"(j\d+)"')
_ROTATED = re.compile(r"worker-\d+\.\d+\.wal")
_DONE_SOURCE = re.compile(r"(j\d{6,})--.*", re.S)


class Retention:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._jobs: dict[Path, set[str]] = {}  # a rotated segment never changes: read it once

    def _jobs_in(self, path: Path) -> set[str]:
        jobs = self._jobs.get(path)
        if jobs is None:
            with open(path, "rb") as f:
                jobs = {m.decode() for m in set(_JOB.findall(f.read()))}
            self._jobs[path] = jobs
        return jobs

    def collect(self, keep_seconds: float) -> list[Path]:
        """Remove what may go; returns the removed segments."""
        removed = []
        done = self.state_dir / "done"
        now = time.time()
        for path in segments(self.state_dir / "wal"):
            if not _ROTATED.fullmatch(path.name):
                continue
            try:
                if now - path.stat().st_mtime < keep_seconds:
                    continue
                if all((done / f"{j}.summary.json").exists() for j in self._jobs_in(path)):
                    path.unlink()
                    self._jobs.pop(path, None)
                    removed.append(path)
            except OSError as e:
                log.warning("WAL retention: %s: %s", path, e)
        if removed:
            log.info("WAL retention removed %d segments of finished jobs", len(removed))
        return removed

    def collect_done(self, keep_seconds: float) -> int:
        """Remove source files in done/ whose job summary is older than `keep_seconds`;
        returns how many went."""
        done = self.state_dir / "done"
        now, removed = time.time(), 0
        try:
            names = os.listdir(done)
        except OSError as e:
            log.warning("retention: %s: %s", done, e)
            return 0
        for name in names:
            m = _DONE_SOURCE.fullmatch(name)
            if m is None:
                continue
            try:
                summary = (done / f"{m.group(1)}.summary.json").stat()
                if now - summary.st_mtime >= keep_seconds:
                    os.unlink(done / name)
                    removed += 1
            except FileNotFoundError:
                continue  # no summary yet: a move that a restart finishes
            except OSError as e:
                log.warning("retention: %s: %s", done / name, e)
        if removed:
            log.info("retention removed the source files of %d finished jobs", removed)
        return removed
