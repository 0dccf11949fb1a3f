"""Intake over HTTP: `POST /v1/files?name=NAME` streams a CSV body to disk and claims it.

Owns the upload's checks (name, priority, back pressure on size, unfinished jobs and free
space) and its temporary file: a private dot directory in the inbox, which the watcher and
the inbox scan skip. The claim itself is claims.py's. It never holds a body in memory,
and a failed or aborted upload leaves no file and no job behind.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import secrets
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from . import names
from .config import Config
from .dispatch import PRIORITIES
from .errors import InputError
from .jobs import SNIFF_BYTES, Job, inspect, reason_of
from .wal import fsync_dir

log = logging.getLogger("alertd.intake")

UPLOAD_PREFIX = ".intake-"  # a dot name: never claimed from the inbox, swept at start
WRITE_BYTES = 256 << 10  # body bytes gathered per write (a read returns what has arrived)
SPACE_EVERY = 16 << 20  # bytes written between two free-space checks
RETRY_AFTER = 5  # seconds, on 429 and 503
BODY_IDLE_TIMEOUT = 60.0  # seconds without a body byte: the client is gone or stuck (408)
NAME_MAX = 255  # bytes, as the filesystem allows


class Refused(Exception):
    """An upload answered with an error status; `error` says which limit or rule."""

    def __init__(self, status: int, error: str, retry_after: int | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.retry_after = retry_after

    def response(self) -> web.Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        resp = web.json_response({"error": self.error}, status=self.status, headers=headers)
        # A body still coming is read and dropped for aiohttp's lingering time, then the
        # connection closes: closing at once could reset it before the client reads this.
        if self.status == 408:
            resp.force_close()  # no keep-alive after a stalled body
        return resp


def check_name(name: str | None) -> str:
    """The file name an upload is claimed under; Refused(400) says what is wrong with it."""
    if name is None:
        raise Refused(400, "name: the query parameter is required (?name=FILE.csv)")
    if not name:
        raise Refused(400, "name: must not be empty")
    if "/" in name or "\0" in name:
        raise Refused(400, "name: must not contain '/' or NUL")
    if name.startswith("."):
        raise Refused(400, "name: must not start with a dot")
    try:
        size = len(os.fsencode(name))
    except UnicodeEncodeError:
        raise Refused(400, "name: not a valid file name") from None
    if size > NAME_MAX:
        raise Refused(400, f"name: longer than {NAME_MAX} bytes ({size})")
    return name


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def upload_prefix(state_dir: Path) -> str:
    """The names of this daemon's upload directories: tagged with its state directory,
    which only one daemon holds (alertd.lock), so a start never sweeps the uploads of
    another daemon that shares the inbox."""
    tag = hashlib.sha256(os.fsencode(state_dir.resolve())).hexdigest()[:8]
    return f"{UPLOAD_PREFIX}{tag}-"


def sweep(inbox: Path, prefix: str) -> None:
    """Remove the upload directories a crashed run left in the inbox."""
    try:
        entries = [e for e in os.scandir(inbox) if e.name.startswith(prefix)]
    except OSError:
        return
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path, ignore_errors=True)
            log.warning("removed %s, left by an upload a previous run did not finish", e.name)


def _create(inbox: Path, prefix: str, name: str) -> tuple[Path, int]:
    """A fresh 0700 directory in the inbox and `name` in it, 0600, opened for writing."""
    while True:
        d = inbox / f"{prefix}{secrets.token_hex(8)}"
        try:
            os.mkdir(d, 0o700)
            break
        except FileExistsError:
            continue
    try:
        fd = os.open(d / name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except BaseException:
        os.rmdir(d)
        raise
    return d, fd


def _write(fd: int, data: bytes, space_of: Path | None) -> int | None:
    """Write all of `data`; the free bytes of `space_of`'s filesystem after, if asked."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return free_bytes(space_of) if space_of is not None else None


def _finish(fd: int, d: Path) -> None:
    os.fsync(fd)
    fsync_dir(d)


def _remove(d: Path, name: str) -> None:
    try:
        os.unlink(d / name)
    except FileNotFoundError:
        pass  # claimed: it is in spool/ now
    try:
        os.rmdir(d)
    except OSError as e:
        log.error("cannot remove upload directory %s: %s", d.name, e.strerror)


@dataclass
class _Progress:
    written: int = 0


class Intake:
    """The POST /v1/files handler. `unfinished()` counts the jobs not yet final; `claim`
    claims a file at a priority and returns the scheduled job (None: not claimed);
    `refusing()` says why the daemon takes no file now (503), or returns a false value."""

    def __init__(self, config: Callable[[], Config], unfinished: Callable[[], int],
                 claim: Callable[[Path, str], Awaitable[Job | None]],
                 refusing: Callable[[], str | bool | None]) -> None:
        self._config = config
        self._unfinished = unfinished
        self._claim = claim
        self._refusing = refusing
        self._uploading = 0  # bodies being received: they count against max_jobs too
        self._prefix = upload_prefix(config().state_dir)
        sweep(config().paths.inbox_dir, self._prefix)

    def _precheck(self, request: web.Request) -> tuple[str, str, int | None]:
        """The checks that need no body: name, priority, the daemon's state, the limits."""
        cfg = self._config()
        name = check_name(request.query.get("name"))
        priority = request.query.get("priority", "normal")
        if priority not in PRIORITIES:
            raise Refused(400, f"priority: must be {', '.join(PRIORITIES)}, got {priority!r}")
        why = self._refusing()
        if why:
            raise Refused(503, why if isinstance(why, str) else "draining: no new files are taken",
                          RETRY_AFTER)
        jobs = self._unfinished() + self._uploading
        if jobs >= cfg.intake.max_jobs:
            raise Refused(429, f"too many unfinished jobs: {jobs} (queued, running, paused or "
                          f"uploading) of [intake] max_jobs {cfg.intake.max_jobs}", RETRY_AFTER)
        length = request.content_length
        if length is not None and length > cfg.intake.max_bytes:
            raise Refused(413, f"body of {length} bytes exceeds [intake] max_bytes "
                          f"{cfg.intake.max_bytes}")
        self._check_space(cfg, free_bytes(cfg.paths.inbox_dir), length or 0)
        return name, priority, length

    @staticmethod
    def _check_space(cfg: Config, free: int, coming: int) -> None:
        if free - coming < cfg.intake.min_free_bytes:
            raise Refused(507, f"not enough space: {free} bytes free, the upload would leave "
                          f"less than [intake] min_free_bytes {cfg.intake.min_free_bytes}")

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: refuse before the client sends a body we would refuse."""
        try:
            self._precheck(request)
        except Refused as r:
            resp = r.response()
            resp.force_close()  # no body follows a refused 100-continue: no keep-alive
            return resp
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's own expect handler: not the body
        return None

    async def handle(self, request: web.Request) -> web.Response:
        try:
            name, priority, length = self._precheck(request)
            self._uploading += 1
            try:
                job, size = await self._receive(request, name, priority, length)
            finally:
                self._uploading -= 1
        except Refused as r:
            return r.response()
        return web.json_response({"job": job.id, "name": name, "bytes": size}, status=201)

    async def _receive(self, request: web.Request, name: str, priority: str,
                       length: int | None) -> tuple[Job, int]:
        cfg = self._config()
        loop = asyncio.get_running_loop()
        inbox = cfg.paths.inbox_dir
        shown = names.escape(name)
        d, fd = await loop.run_in_executor(None, _create, inbox, self._prefix, name)
        got = _Progress()
        try:
            try:
                await self._stream(request, cfg, fd, length, got)
                await loop.run_in_executor(None, _finish, fd, d)
            finally:
                os.close(fd)
            try:
                job = await self._claim(d / name, priority)
            except Exception as e:
                log.error("upload %s: cannot claim it: %s", shown, reason_of(e))
                raise Refused(500, f"cannot claim the file: {reason_of(e)}") from None
            if job is None:
                why = self._refusing()
                if why:
                    raise Refused(503, why if isinstance(why, str) else
                                  "draining: no new files are taken", RETRY_AFTER)
                raise Refused(500, "the file could not be claimed (see failed/)")
        except BaseException as e:  # a refusal, a client gone, a disk error, a cancel
            why = e.error if isinstance(e, Refused) else f"{type(e).__name__}: {e}"
            log.warning("upload %s refused or aborted after %d bytes: %s", shown, got.written,
                        why)
            _remove(d, name)  # at once, not in a thread: this may run while being cancelled
            raise
        _remove(d, name)
        log.info("upload %s: %d bytes, %s at priority %s", shown, got.written, job.id, priority)
        return job, got.written

    async def _stream(self, request: web.Request, cfg: Config, fd: int,
                      length: int | None, got: _Progress) -> None:
        """Copy the body to `fd`, WRITE_BYTES at a time, enforcing the limits as it
        grows (`got` counts what is written). The head is inspected as soon as it is on disk, so a
        file that cannot be a job is refused before the rest of it is sent."""
        loop = asyncio.get_running_loop()
        limit = cfg.intake.max_bytes
        inbox = cfg.paths.inbox_dir
        written, next_space, inspected = 0, SPACE_EVERY, False
        buf = bytearray()
        while True:
            try:
                async with asyncio.timeout(BODY_IDLE_TIMEOUT):
                    data = await request.content.read(WRITE_BYTES)
            except TimeoutError:
                raise Refused(408, f"body: nothing received for {BODY_IDLE_TIMEOUT:g} s") from None
            except Exception as e:  # the client went away, or a broken chunked encoding
                raise Refused(400, f"body: {type(e).__name__}: {e or 'incomplete'}") from None
            buf += data
            if written + len(buf) > limit:
                raise Refused(413, f"body exceeds [intake] max_bytes {limit}")
            if len(buf) < WRITE_BYTES and data:
                continue
            if buf:
                space_now = written + len(buf) >= next_space
                try:
                    free = await loop.run_in_executor(None, _write, fd, bytes(buf),
                                                      inbox if space_now else None)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise Refused(507, f"not enough space: {e.strerror}") from None
                    raise Refused(500, f"cannot write the upload: {e.strerror}") from None
                written += len(buf)
                got.written = written
                buf.clear()
                if free is not None:
                    next_space = written + SPACE_EVERY
                    self._check_space(cfg, free, max(0, (length or 0) - written))
            if not inspected and (written >= SNIFF_BYTES or not data):
                inspected = True
                try:
                    await loop.run_in_executor(None, inspect, fd, cfg.csv)
                except InputError as e:
                    raise Refused(422, f"not a CSV file alertd can read: {e}") from None
            if not data:
                return
