"""The inbox: pyinotify events plus a scan at start, turned into candidate paths.

Only close-write and moved-to count as "a file arrived", so a file still
being written is never claimed; dotfiles and *.tmp / *.part are skipped until
renamed. Events that cannot be read become a rescan, never a lost file. This
module never moves or opens files: the supervisor claims them.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pyinotify

log = logging.getLogger("alertd.watcher")

MASK = pyinotify.IN_CLOSE_WRITE | pyinotify.IN_MOVED_TO
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".swp")


def wanted(name: str) -> bool:
    """A name that may be claimed (not hidden, not a temporary file)."""
    return bool(name) and not name.startswith(".") and not name.endswith(IGNORED_SUFFIXES)


SCAN_QUIET = 5.0  # seconds: a file modified more recently than this is not taken by a scan


def scan(inbox: Path, quiet: float = SCAN_QUIET) -> list[Path]:
    """Regular files already in the inbox, oldest first, except those modified in the
    last `quiet` seconds: a scan cannot tell a finished file from one still being written
    in place (its close-write event, or the next scan, brings it once it is quiet)."""
    return scan_quiet(inbox, quiet)[0]


def scan_quiet(inbox: Path, quiet: float = SCAN_QUIET) -> tuple[list[Path], float | None]:
    """scan(), and in how many seconds the youngest file it left is quiet (None: it left
    none), so that the caller can scan again then rather than at its next rescan."""
    found = []
    now = time.time_ns()
    newest = now - int(quiet * 1e9)
    young: int | None = None
    try:
        entries = list(os.scandir(inbox))
    except OSError as e:
        log.error("cannot scan inbox %s: %s", inbox, e)
        return [], None
    for e in entries:
        try:
            if wanted(e.name) and e.is_file(follow_symlinks=False):
                mtime = e.stat(follow_symlinks=False).st_mtime_ns
                if mtime <= newest:
                    found.append((mtime, e.name))
                else:
                    young = mtime if young is None else max(young, mtime)
        except OSError:
            continue  # vanished between listing and stat
    wait = None if young is None else max(0.0, (young - newest) / 1e9)
    return [inbox / name for _, name in sorted(found)], wait


class _Handler(pyinotify.ProcessEvent):
    def my_init(self, on_path: Callable[[Path], None], on_overflow: Callable[[], None]) -> None:
        self._on_path = on_path
        self._on_overflow = on_overflow

    def process_default(self, event: pyinotify.Event) -> None:
        if event.mask & pyinotify.IN_Q_OVERFLOW:
            self._on_overflow()
        elif not event.dir and wanted(event.name):
            self._on_path(Path(event.pathname))


class InboxWatcher:
    """Calls `on_path` for each file that arrives; `on_overflow` when events were lost
    or could not be read (the caller rescans)."""

    def __init__(self, inbox: Path, on_path: Callable[[Path], None],
                 on_overflow: Callable[[], None]) -> None:
        self.inbox = inbox
        self._on_overflow = on_overflow
        self._wm = pyinotify.WatchManager()
        self._notifier = pyinotify.Notifier(
            self._wm, _Handler(on_path=on_path, on_overflow=on_overflow), timeout=0)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        res = self._wm.add_watch(str(self.inbox), MASK, quiet=False)
        if res.get(str(self.inbox), -1) < 0:
            raise OSError(f"cannot watch {self.inbox}")
        self._loop = loop
        loop.add_reader(self._wm.get_fd(), self._readable)

    def _readable(self) -> None:
        lost = False
        try:
            if self._notifier.check_events(timeout=0):
                self._notifier.read_events()
        except Exception as e:
            # pyinotify decodes names as strict UTF-8: one name that is not (b"bad\xff.csv")
            # raises here, and the events after it in the buffer are gone. A rescan finds them.
            log.warning("inotify: cannot read events (%s: %s); rescanning the inbox",
                        type(e).__name__, e)
            lost = True
        try:
            self._notifier.process_events()  # including those queued before a failure
        except Exception:  # a watcher bug must not kill the supervisor's loop
            log.exception("inotify event handling failed; rescanning the inbox")
            lost = True
        if lost:
            self._on_overflow()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._wm.get_fd())
            self._loop = None
        self._notifier.stop()
