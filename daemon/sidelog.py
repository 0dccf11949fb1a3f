"""Per-job JSONL side files a worker appends to: rejects/<job>.jsonl, dlq/<job>.jsonl.

Each line goes out in one O_APPEND write, so several workers can share a file
without tearing lines. fsync happens in a thread, before the WAL records that
point at these lines are acknowledged. A replay takes a finished job's DLQ away by
renaming it into the spool: a descriptor kept open from before must not append to it.
"""
from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from pathlib import Path

from .wal import open_private

MAX_OPEN = 32  # file descriptors kept open; jobs rarely overlap more than this


class SideLog:
    def __init__(self, state_dir: Path) -> None:
        self._state_dir = state_dir
        self._fds: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._dirty: set[int] = set()

    def _fd(self, kind: str, job: str) -> int:
        key = (kind, job)
        fd = self._fds.get(key)
        if fd is not None and kind == "dlq" and not _same_file(fd, self._path(kind, job)):
            self._evict(key)  # renamed away by a replay: append to a new one
            fd = None
        if fd is None:
            path = self._path(kind, job)
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            fd = open_private(path, os.O_WRONLY | os.O_APPEND)  # user IDs: 0640 at most
            self._fds[key] = fd
            if len(self._fds) > MAX_OPEN:
                self._evict(next(iter(self._fds)))
        else:
            self._fds.move_to_end(key)
        return fd

    def _path(self, kind: str, job: str) -> Path:
        return self._state_dir / kind / f"{job}.jsonl"

    def _evict(self, key: tuple[str, str]) -> None:
        old = self._fds.pop(key)
        if old in self._dirty:
            os.fsync(old)
            self._dirty.discard(old)
        os.close(old)

    def write(self, kind: str, job: str, line: bytes) -> None:
        """Append one complete line (ending in b"\\n") to <kind>/<job>.jsonl."""
        fd = self._fd(kind, job)
        os.write(fd, line)
        self._dirty.add(fd)

    async def sync(self) -> None:
        if not self._dirty:
            return
        fds, self._dirty = list(self._dirty), set()
        await asyncio.get_running_loop().run_in_executor(None, _fsync_all, fds)

    def close(self) -> None:
        _fsync_all(list(self._dirty))
        self._dirty.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)


def _fsync_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError:
            pass  # closed meanwhile (evicted): it was fsynced before closing
