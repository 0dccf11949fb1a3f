"""`alertd tail`: the newest outcome records of every worker's WAL, merged by time, then follow.

Reads each file backwards from its end in blocks, so the time to show the last N records
does not grow with the size of the WALs; reads files only and never writes.
"""
from __future__ import annotations

import heapq
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from . import wal

BLOCK = 256 << 10
_WORKER = re.compile(r"worker-(\d+)")

Record = dict[str, Any]


def human(r: Record) -> str:
    ts = datetime.fromtimestamp(r["ts"]).strftime("%H:%M:%S.%f")[:-3]
    if r["out"] == "chunk":
        return f"{ts} {r['job']} chunk {r['ck']} final: {r['rows']} rows"
    if "off" not in r:  # a cancel's range record
        return (f"{ts} {r['job']} {r['out']:9} rows in [{r.get('start')}, {r.get('end')}) "
                f"without another outcome")
    extra = f" {r['err']}" if r.get("err") else ""
    return (f"{ts} {r['job']}:{r['off']} {r['out']:9} status {r['st']} attempts {r['att']}"
            f" user {r['uid']}{extra}")


def matcher(job: str | None, outcome: str | None) -> Callable[[Record], bool]:
    return lambda r: (job is None or r.get("job") == job) and (
        outcome is None or r.get("out") == outcome)


def last_records(path: Path, n: int, keep: Callable[[Record], bool],
                 end: int | None = None) -> list[Record]:
    """Up to `n` records of `path` that `keep` accepts, the newest ones, oldest first; only
    bytes before `end` (a line boundary) are read. n = 0 reads the whole file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        pos = os.fstat(fd).st_size if end is None else end
        found: list[Record] = []
        tail = b""  # the start of a line whose beginning lies in an earlier block
        while pos > 0 and (n == 0 or len(found) < n):
            step = min(BLOCK, pos)
            pos -= step
            block = os.pread(fd, step, pos) + tail
            lines = block.split(b"\n")
            tail = lines[0] if pos > 0 else b""
            body = lines[1:] if pos > 0 else lines
            for line in reversed(body):
                r = wal.decode(line + b"\n") if line else None
                if r is not None and keep(r):
                    found.append(r)
                    if n and len(found) >= n:
                        break
        found.reverse()
        return found
    finally:
        os.close(fd)


def complete_size(path: Path) -> tuple[int, int] | None:
    """(inode, offset just past the last complete line) of `path` now, or None if gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        size = st.st_size
        pos = size
        while pos > 0:  # back to the last newline: a torn last line is not ours yet
            step = min(4096, pos)
            chunk = os.pread(fd, step, pos - step)
            i = chunk.rfind(b"\n")
            if i >= 0:
                return st.st_ino, pos - step + i + 1
            pos -= step
        return st.st_ino, 0
    finally:
        os.close(fd)


def newest(wal_dir: Path, n: int, keep: Callable[[Record], bool]) -> tuple[list[Record],
                                                                          dict[int, int]]:
    """The newest `n` accepted records over all workers (0 = all), merged by time, and the
    offsets (by inode) where following must start so nothing is skipped or repeated."""
    by_worker: dict[str, list[Path]] = {}
    for p in wal.segments(wal_dir):  # per worker: rotated by sequence, then the current file
        m = _WORKER.match(p.name)
        by_worker.setdefault(m.group(1) if m else p.name, []).append(p)
    offsets: dict[int, int] = {}
    per_worker: list[list[Record]] = []
    for files in by_worker.values():
        got: list[Record] = []
        for p in reversed(files):  # newest file first
            where = complete_size(p)
            if where is None:
                continue
            offsets[where[0]] = where[1]
            if n == 0 or len(got) < n:
                got = last_records(p, n - len(got) if n else 0, keep, where[1]) + got
        per_worker.append(got)
    merged = list(heapq.merge(*per_worker, key=lambda r: r["ts"]))
    return (merged[-n:] if n else merged), offsets


def _follow_once(wal_dir: Path, offsets: dict[int, int]) -> Iterator[Record]:
    """Complete records past each file's offset (kept by inode: a rotation renames the file,
    same inode, and starts a new one from 0)."""
    for path in wal.segments(wal_dir):
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            continue
        with f:
            ino = os.fstat(f.fileno()).st_ino
            pos = offsets.get(ino, 0)
            f.seek(pos)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a torn last line waits for the next round
                pos += len(line)
                r = wal.decode(line)
                if r is not None:
                    yield r
            offsets[ino] = pos


def run(wal_dir: Path, lines: int = 20, follow: bool = False, as_json: bool = False,
        job: str | None = None, outcome: str | None = None, interval: float = 0.2) -> None:
    fmt = (lambda r: orjson.dumps(r).decode()) if as_json else human
    keep = matcher(job, outcome)
    recent, offsets = newest(wal_dir, lines, keep)
    for r in recent:
        sys.stdout.write(fmt(r) + "\n")
    sys.stdout.flush()
    while follow:
        time.sleep(interval)
        batch = sorted((r for r in _follow_once(wal_dir, offsets) if keep(r)),
                       key=lambda r: r["ts"])
        for r in batch:
            sys.stdout.write(fmt(r) + "\n")
        sys.stdout.flush()
