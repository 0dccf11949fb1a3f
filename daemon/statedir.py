"""The state directory at start: create what is missing, refuse what cannot work, and
undo what this start created when the start is refused.

Modes: `alertd run` sets its umask to UMASK (027) before creating anything, so every
folder it makes is 0750 and every file 0640 or stricter (files are also opened with an
explicit 0640, so the umask is a second line, not the only one). The inbox is the
operator's (a setgid group folder for producers): an existing one is never chmod-ed.
"""
from __future__ import annotations

import fcntl
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config
from .errors import AlertdError, ConfigError

log = logging.getLogger("alertd.statedir")

UMASK = 0o027
DIR_MODE = 0o750
FILE_MODE = 0o640
SUBDIRS = ("spool", "wal", "dlq", "rejects", "done", "failed")


class Busy(AlertdError):
    """Another alertd holds this state directory."""


@dataclass
class Prepared:
    """What this start made (to undo on a refused start) and the state directory's lock."""

    created: list[Path] = field(default_factory=list)  # in creation order
    lock_fd: int = -1

    def undo(self) -> None:
        """Remove what this start created, newest first; a folder that is no longer empty
        (someone dropped a file meanwhile) stays."""
        for p in reversed(self.created):
            try:
                if p.is_dir() and not p.is_symlink():
                    os.rmdir(p)
                else:
                    os.unlink(p)
            except OSError:
                pass
        self.created.clear()


def _make_dir(path: Path, what: str, created: list[Path], parents: bool) -> None:
    try:
        st = os.stat(path)  # follows a symlink: a linked state folder is the operator's choice
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ConfigError(f"config: {what} {path}: {e.strerror}") from None
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"config: {what} {path} exists and is not a folder")
        return
    missing = [path]
    while not missing[-1].parent.exists() and missing[-1].parent != missing[-1]:
        if not parents:
            raise ConfigError(f"config: {what} {path}: its parent folder {path.parent} does "
                              f"not exist (a typo? create it first)")
        missing.append(missing[-1].parent)
    for p in reversed(missing):
        try:
            os.mkdir(p, DIR_MODE)
        except FileExistsError:
            continue  # made by someone else meanwhile: not ours to remove
        except OSError as e:
            raise ConfigError(f"config: {what} {p}: {e.strerror}") from None
        created.append(p)
    if not os.path.isdir(path):
        raise ConfigError(f"config: {what} {path} exists and is not a folder")


def _tighten(path: Path, mask: int = 0o027) -> None:
    """A folder of ours that group members may write or others may enter: 0750 at most
    (it holds user IDs); `mask` 0o026 keeps others' right to pass through (not to list) to
    an inbox inside it. Never called on the inbox. Only a folder this user owns, and
    never a shared sticky one (a state_dir of /tmp must not turn /tmp into 1750): for
    those, a warning says what to do."""
    try:
        st = os.stat(path)
        mode = stat.S_IMODE(st.st_mode)
        if not mode & mask:
            return
        if st.st_uid != os.geteuid() or mode & stat.S_ISVTX:
            log.warning("%s is mode %o: others may read the user IDs in it; chmod %o it",
                        path, mode, mode & ~mask & ~stat.S_ISVTX)
            return
        os.chmod(path, mode & ~mask)
        log.info("tightened %s from %o to %o (it holds user IDs)", path, mode, mode & ~mask)
    except OSError as e:
        log.warning("cannot tighten the mode of %s: %s", path, e.strerror)


def _lock(path: Path, created: list[Path]) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        created.append(path)
    except FileExistsError:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Busy(f"another alertd is already running on {path.parent}") from None
    return fd


def prepare(cfg: Config) -> Prepared:
    """Folders and the lock for `alertd run`; raises ConfigError (exit 2) or Busy (exit 1)
    after removing whatever it created."""
    done = Prepared()
    state, inbox = cfg.state_dir, cfg.paths.inbox_dir
    try:
        _make_dir(state, "[paths] state_dir", done.created, parents=True)
        node = cfg.node_dir  # a cluster node's own corner of the shared state dir
        if node != state:
            _make_dir(state / "nodes", "[paths] state_dir", done.created, parents=False)
            _make_dir(node, "[paths] state_dir", done.created, parents=False)
            _make_dir(cfg.wal_dir, "[paths] state_dir", done.created, parents=False)
        try:
            done.lock_fd = _lock(node / "alertd.lock", done.created)
        except OSError as e:
            raise ConfigError(f"config: [paths] state_dir {state}: {e.strerror}") from None
        # A missing inbox parent is a typo far more often than a wish: say so, do not
        # create a tree nobody will drop files into.
        _make_dir(inbox, "[paths] inbox", done.created, parents=False)
        try:
            same_fs = os.stat(inbox).st_dev == os.stat(state).st_dev
        except OSError as e:
            raise ConfigError(f"config: [paths] inbox {inbox}: {e.strerror}") from None
        if not same_fs:
            # A claim is a rename into spool/: across filesystems it would fail (EXDEV).
            raise ConfigError(f"config: [paths] inbox {inbox} must be on the same filesystem "
                              f"as state_dir {state}")
        for sub in SUBDIRS:
            _make_dir(state / sub, "[paths] state_dir", done.created, parents=False)
        # Producers reach an inbox inside state_dir through it: they may pass, not list.
        _tighten(state, 0o026 if inbox.parent == state else 0o027)
        for p in (state / s for s in SUBDIRS):
            if p != inbox:
                _tighten(p)
    except BaseException:
        done.undo()
        if done.lock_fd >= 0:
            os.close(done.lock_fd)
        raise
    return done
