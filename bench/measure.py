"""Measuring a running process tree from outside: CPU time, peak RSS, a progress series.

Samplers only read /proc (through psutil) and the status API; they never send
signals or change the processes they watch. Every loop is bounded by stop().
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil


def tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(root_pid: int) -> float:
    """user+sys of `root_pid`, its live descendants and every child it has reaped.

    A worker that exits is reaped by the supervisor, whose children_user/system
    then carry its whole CPU time: nothing is lost when workers come and go.
    """
    try:
        root = psutil.Process(root_pid)
        t = root.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    total = t.user + t.system + t.children_user + t.children_system
    for p in tree(root)[1:]:
        try:
            c = p.cpu_times()
        except psutil.NoSuchProcess:
            continue  # exited between listing and reading: counted once reaped
        total += c.user + c.system
    return total


def cpu_split(root_pid: int) -> dict[str, float]:
    """user and sys seconds of the supervisor alone and of its descendants (live + reaped):
    a high sys share is the kernel's loopback TCP path, not Python."""
    out = {"supervisor_user": 0.0, "supervisor_sys": 0.0, "workers_user": 0.0, "workers_sys": 0.0}
    try:
        root = psutil.Process(root_pid)
        t = root.cpu_times()
    except psutil.NoSuchProcess:
        return out
    out.update(supervisor_user=t.user, supervisor_sys=t.system,
               workers_user=t.children_user, workers_sys=t.children_system)
    for p in tree(root)[1:]:
        try:
            c = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        out["workers_user"] += c.user
        out["workers_sys"] += c.system
    return out


def rss_bytes(root_pid: int) -> int:
    """Resident set of the whole tree (file-backed mmap pages count: they are the point)."""
    try:
        procs = tree(psutil.Process(root_pid))
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


@dataclass
class Sampler:
    """Samples RSS (and optionally a progress counter) of one tree on a thread."""

    root_pid: int
    interval: float = 0.2
    progress: Callable[[], int | None] | None = None
    progress_every: float = 0.5
    peak_rss: int = 0
    rss_series: list[tuple[float, int]] = field(default_factory=list)
    # (seconds since start, counter) pairs, e.g. deliveries so far.
    progress_series: list[tuple[float, int]] = field(default_factory=list)
    t0: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    errors: int = 0

    def start(self) -> Sampler:
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        next_progress = 0.0
        while not self._stop.is_set():
            now = time.monotonic() - self.t0
            rss = rss_bytes(self.root_pid)
            self.peak_rss = max(self.peak_rss, rss)
            self.rss_series.append((round(now, 3), rss))
            if self.progress is not None and now >= next_progress:
                next_progress = now + self.progress_every
                try:
                    value = self.progress()
                except Exception:  # a status API busy or gone must not end the sampling
                    value = None
                    self.errors += 1
                if value is not None:
                    self.progress_series.append((round(time.monotonic() - self.t0, 3), value))
            self._stop.wait(self.interval)

    def stop(self) -> Sampler:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        return self

    def rates(self) -> list[tuple[float, float]]:
        """(mid-point seconds, per-second rate) between consecutive progress samples."""
        out = []
        for (t1, v1), (t2, v2) in zip(self.progress_series, self.progress_series[1:]):
            if t2 > t1:
                out.append((round((t1 + t2) / 2, 3), (v2 - v1) / (t2 - t1)))
        return out


def peak_rss_mb(sampler: Sampler) -> float:
    return round(sampler.peak_rss / 1e6, 1)
