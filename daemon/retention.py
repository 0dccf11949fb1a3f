"""WAL retention: rotated segments go once every job they name is final and summarised.

Also kept for `wal.retention` seconds after they were last written, so that
`alertd verify` and `alertd tail` still see recent jobs. Current segments are
never removed (their writer owns them). Runs in a thread; never raises.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from .wal import segments

log = logging.getLogger("alertd.retention")

_JOB = re.compile(rb'"job":"(j\d+)"')
_ROTATED = re.compile(r"worker-\d+\.\d+\.wal")


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
