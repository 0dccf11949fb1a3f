"""Per-worker write-ahead logs: CRC'd JSON lines, group commit, rotation and replay.

Owns the on-disk record format and the rule that a record is durable only after the fsync
that covers it. Must never block the event loop on disk, drop an appended record on a write
error, or leave a duplicated or torn record behind a retried write.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import mmap
import os
import re
import stat
import time
import zlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from .protocol import Counts

_CRC = b',"crc":'
_CHUNK = b'"out":"chunk"'
FINAL = frozenset(("delivered", "rejected", "dead", "cancelled"))  # a row has exactly one
CONTROL_WAL = 998  # the supervisor's own WAL index: wal/worker-998.wal holds cancel ranges
_NAME = re.compile(r"worker-(\d+)(?:\.(\d+))?\.wal")

_dumps = orjson.dumps
_crc32 = zlib.crc32
_join = b"".join  # measured faster than %-formatting the tail on 3.11


FILE_MODE = 0o640  # WALs hold user IDs: never readable by others, whatever the umask


def open_private(path: Path, flags: int) -> int:
    """os.open(path, flags | O_CREAT) at FILE_MODE or stricter, also when the file already
    existed with a looser mode (made by an older version or by hand)."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & ~FILE_MODE:
        os.fchmod(fd, mode & FILE_MODE)
    return fd

def encode_row(job: str, ck: int, off: int, out: str, status: int, attempts: int, dup: bool,
               uid: str, ts: float, err: str | None = None) -> bytes:
    """One row outcome as a checksummed JSON line (keys in a fixed order for prefix checks)."""
    if err is None:
        rec = _dumps({"job": job, "ck": ck, "off": off, "out": out, "st": status,
                      "att": attempts, "dup": dup, "uid": uid, "ts": ts})
    else:
        rec = _dumps({"job": job, "ck": ck, "off": off, "out": out, "st": status, "err": err,
                      "att": attempts, "dup": dup, "uid": uid, "ts": ts})
    return _join((rec[:-1], _CRC, b"%d" % _crc32(rec), b"}\n"))


def encode_chunk(job: str, ck: int, end: int, counts: Counts, ts: float) -> bytes:
    """The marker that makes chunk `ck` final, with its counts."""
    rec = _dumps({"job": job, "ck": ck, "out": "chunk", "end": end, "rows": counts.rows,
                  "delivered": counts.delivered, "rejected": counts.rejected,
                  "dead": counts.dead, "possible_duplicates": counts.possible_duplicates,
                  "ts": ts})
    return _join((rec[:-1], _CRC, b"%d" % _crc32(rec), b"}\n"))


def encode_cancel(job: str, start: int, end: int, ts: float) -> bytes:
    """Every row offset in [start, end) of `job` that has no other final outcome is
    cancelled: one record per cancelled job, however many rows it never sent."""
    rec = _dumps({"job": job, "ck": -1, "out": "cancelled", "start": start, "end": end,
                  "ts": ts})
    return _join((rec[:-1], _CRC, b"%d" % _crc32(rec), b"}\n"))


def append_durable(wal_dir: Path, index: int, line: bytes) -> None:
    """Append one record to wal/worker-<index>.wal and fsync it (blocking: run it in a
    thread). For rare records written by one process (the supervisor's cancels); a torn
    tail left by a crash is cut first so the record starts on its own line."""
    wal_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    path = wal_dir / f"worker-{index}.wal"
    fd = open_private(path, os.O_RDWR | os.O_APPEND)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                os.ftruncate(fd, mm.rfind(b"\n") + 1)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(wal_dir)


def decode(line: bytes) -> dict | None:
    """The record of one line (without "crc"), or None when it is torn or corrupt."""
    if not line.endswith(b"\n"):
        return None
    i = line.rfind(_CRC)
    if i < 0 or not line.endswith(b"}\n"):
        return None
    try:
        crc = int(line[i + len(_CRC):-2])
    except ValueError:
        return None
    if _crc32(b"}", _crc32(line[:i])) != crc:
        return None
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(rec, dict):
        return None
    rec.pop("crc", None)
    return rec


@dataclass
class ReplayStats:
    """Lines skipped on replay; an operator wants to know a WAL had damage."""

    corrupt: int = 0  # complete line whose checksum or JSON is wrong
    torn: int = 0  # last line of a file without its newline (a crash mid-write)


def _lines(path: Path, stats: ReplayStats | None) -> Iterator[bytes]:
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                if stats is not None:
                    stats.torn += 1
                return
            yield line


def records(path: Path, stats: ReplayStats | None = None) -> Iterator[dict]:
    """Verified records of one WAL file, in order; corrupt and torn lines are skipped and counted."""
    for line in _lines(path, stats):
        rec = decode(line)
        if rec is None:
            if stats is not None:
                stats.corrupt += 1
            continue
        yield rec


def segments(wal_dir: Path) -> list[Path]:
    """All worker WAL files: rotated ones (by worker, by seq), then each worker's current file.
    Those of the whole state dir: its `wal/` and every cluster node's
    (`nodes/<node>/wal/`), whichever of them is given, since a job's rows may have been
    delivered by any node."""
    if wal_dir.parent.parent.name == "nodes":  # state_dir/nodes/<node>/wal
        state = wal_dir.parent.parent.parent
    elif wal_dir.name == "wal":  # state_dir/wal
        state = wal_dir.parent
    else:  # a folder of WAL files on its own
        return _segments_of(wal_dir)
    out = _segments_of(state / "wal")
    try:
        nodes = sorted(os.scandir(state / "nodes"), key=lambda e: e.name)
    except FileNotFoundError:
        return out
    for d in nodes:
        out += _segments_of(Path(d.path) / "wal")
    return out


def _segments_of(wal_dir: Path) -> list[Path]:
    rotated: list[tuple[int, int, Path]] = []
    current: list[tuple[int, Path]] = []
    try:
        entries = list(os.scandir(wal_dir))
    except FileNotFoundError:
        return []
    for e in entries:
        m = _NAME.fullmatch(e.name)
        if m is None or not e.is_file():
            continue
        if m.group(2) is None:
            current.append((int(m.group(1)), Path(e.path)))
        else:
            rotated.append((int(m.group(1)), int(m.group(2)), Path(e.path)))
    return [p for *_, p in sorted(rotated)] + [p for _, p in sorted(current)]


@dataclass
class JobRecovery:
    chunks: dict[int, Counts] = field(default_factory=dict)  # final chunks: ck -> counts
    # Chunks without a marker: ck -> {row offset: (outcome, possible duplicate)}.
    partial: dict[int, dict[int, tuple[str, bool]]] = field(default_factory=dict)


def _job_ck(line: bytes) -> tuple[bytes, int] | None:
    # Cheap read of the fixed `{"job":"<id>","ck":<n>,` prefix, so rows of final chunks are
    # skipped without a JSON parse; None sends the line to the full decode.
    if not line.startswith(b'{"job":"'):
        return None
    j = line.find(b'"', 8)
    if j < 0 or line[j:j + 7] != b'","ck":':
        return None
    c = line.find(b",", j + 7)
    try:
        return line[8:j], int(line[j + 7:c])
    except ValueError:
        return None


def recover(wal_dir: Path, jobs: Collection[str] | None = None,
            stats: ReplayStats | None = None) -> dict[str, JobRecovery]:
    """What the WALs say is already final, per job: two passes, memory bounded by chunks."""
    paths = segments(wal_dir)
    wanted = None if jobs is None else {j.encode() for j in jobs}
    out: dict[str, JobRecovery] = {}
    final: set[tuple[bytes, int]] = set()
    # Pass 1: chunk markers only. Stats are counted in pass 2, which sees every line.
    for path in paths:
        for line in _lines(path, None):
            if line.find(_CHUNK) < 0:  # bytes.find: `in` is several times slower on 3.11
                continue
            key = _job_ck(line)
            if wanted is not None and key is not None and key[0] not in wanted:
                continue
            rec = decode(line)
            if rec is None or rec.get("out") != "chunk":
                continue
            job, ck = rec["job"], rec["ck"]
            if wanted is not None and job.encode() not in wanted:
                continue
            jr = out.setdefault(job, JobRecovery())
            if ck not in jr.chunks:
                jr.chunks[ck] = Counts(rows=rec["rows"], delivered=rec["delivered"],
                                       rejected=rec["rejected"], dead=rec["dead"],
                                       possible_duplicates=rec["possible_duplicates"])
                final.add((job.encode(), ck))
    # Pass 2: row outcomes, kept only for chunks that have no marker.
    for path in paths:
        for line in _lines(path, stats):
            key = _job_ck(line)
            if key is not None and (key in final or (wanted is not None and key[0] not in wanted)):
                continue
            rec = decode(line)
            if rec is None:
                if stats is not None:
                    stats.corrupt += 1
                continue
            if rec.get("out") not in FINAL or "off" not in rec:
                continue  # chunk markers, and records that settle nothing (e.g. replays)
            job, ck = rec["job"], rec["ck"]
            if (job.encode(), ck) in final or (wanted is not None and job.encode() not in wanted):
                continue
            rows = out.setdefault(job, JobRecovery()).partial.setdefault(ck, {})
            rows.setdefault(rec["off"], (rec["out"], bool(rec.get("dup", False))))
    return out


def _describe(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, "error")
    return f"{name}: {e.strerror or e}"


def _own(path: Path, wait: float) -> int:
    """An exclusive flock held as long as the returned fd is open (the process's life)."""
    fd = open_private(path, os.O_RDWR)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise BlockingIOError(errno.EWOULDBLOCK, f"{path} is held by another process") from None
            time.sleep(0.05)  # start-up only: the old owner is exiting


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WalWriter:
    """The WAL of one worker: append in memory, commit (write + fsync) in a thread."""

    def __init__(self, wal_dir: Path, worker: int, *, fsync: str = "interval",
                 interval: float = 0.05, segment_bytes: int = 64 << 20) -> None:
        self.dir = Path(wal_dir)
        self.worker = worker
        self.path = self.dir / f"worker-{worker}.wal"
        self._always = fsync == "always"
        self._interval = interval
        self._segment_bytes = segment_bytes
        self._fd = -1
        self._owner = -1  # fd holding the flock on worker-<k>.lock: one writer per index
        self._size = 0  # bytes of the current file known written and fsynced
        self._seq = 0  # last rotated segment number
        self._buf = bytearray()
        self._appended = 0  # total bytes ever appended
        self._durable = 0  # total bytes ever fsynced
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._wake = asyncio.Event()  # always mode: set by append/sync; any mode: by close
        self._lock = asyncio.Lock()
        self._inflight: asyncio.Future[None] | None = None
        self._renamed = False  # rotation renamed the file but has not opened a new one
        self._closed = False
        self._error: str | None = None

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def pending_bytes(self) -> int:
        return self._appended - self._durable

    def open(self, wait: float = 30.0) -> None:
        """Take this worker index's WAL (waiting up to `wait` s for a previous owner, e.g.
        a worker of a killed supervisor, to exit) and repair a torn tail."""
        self.dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._owner = _own(self.dir / f"worker-{self.worker}.lock", wait)
        for p in segments(self.dir):
            m = _NAME.fullmatch(p.name)
            if m and int(m.group(1)) == self.worker and m.group(2) is not None:
                self._seq = max(self._seq, int(m.group(2)))
        self._fd = open_private(self.path, os.O_WRONLY | os.O_APPEND)
        self._size = self._good_length()
        if self._size != os.fstat(self._fd).st_size:
            # Only this worker writes this file: a torn tail is our own crash, cut it so
            # the next record does not get glued onto it.
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        fsync_dir(self.dir)

    def _good_length(self) -> int:
        if os.fstat(self._fd).st_size == 0:
            return 0
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return mm.rfind(b"\n") + 1  # 0 when there is no complete line at all

    def append(self, line: bytes) -> None:
        self._buf += line
        self._appended += len(line)
        if self._always:
            self._wake.set()

    async def sync(self) -> None:
        """Return once everything appended before this call is written and fsynced; starts
        a commit at once instead of waiting for the interval."""
        target = self._appended
        if self._durable >= target:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        # Someone waits (a chunk ack): commit now rather than at the next interval. Syncs
        # that come while a commit is in flight share the next one (group commit), so a
        # burst of small chunks costs one fsync per commit, not one each.
        self._wake.set()
        await fut

    async def run(self) -> None:
        """The commit loop; returns after close()."""
        while not self._closed:
            if self._error:
                await asyncio.sleep(self._interval)  # a failing disk: retry at a steady pace
            elif self._always:
                if not self._buf:
                    await self._wake.wait()
            else:
                try:
                    await asyncio.wait_for(self._wake.wait(), self._interval)
                except asyncio.TimeoutError:
                    pass
            self._wake.clear()
            if not self._closed:
                await self._commit()

    async def close(self) -> None:
        """Final write + fsync (retried while the disk fails), then stop run()."""
        self._closed = True
        self._wake.set()
        try:
            while not await self._commit():
                await asyncio.sleep(self._interval)
        finally:
            # Cancelled mid-write: the thread still owns the fd; closing it now could let
            # the number be reused and the write land in another file.
            if self._inflight is not None and not self._inflight.done():
                self._inflight.add_done_callback(lambda _: self._close_fd())
            else:
                self._close_fd()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._owner >= 0:  # the index is free for the next writer
            os.close(self._owner)
            self._owner = -1

    async def _commit(self) -> bool:
        async with self._lock:
            if self._inflight is not None and not self._inflight.done():
                await asyncio.wait([self._inflight])  # a cancelled commit's thread
            if not self._buf:
                return True
            # Swap buffers: appends made while the thread writes go to a fresh one.
            batch, self._buf = self._buf, bytearray()
            loop = asyncio.get_running_loop()
            fut = self._inflight = loop.run_in_executor(None, self._write, batch)
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                # Settle the books when the thread ends, so the batch is neither lost
                # nor written twice.
                fut.add_done_callback(lambda f: self._settle(batch, f))
                raise
            except OSError:
                pass
            if not self._settle(batch, fut):
                return False
            if self._size >= self._segment_bytes:
                try:
                    await loop.run_in_executor(None, self._rotate)
                except OSError as e:
                    self._error = _describe(e)  # records are safe; rotation retried next commit
            return True

    def _settle(self, batch: bytearray, fut: asyncio.Future[None]) -> bool:
        e = fut.exception()
        if e is not None:
            self._error = _describe(e) if isinstance(e, OSError) else repr(e)
            self._buf = batch + self._buf  # never drop: retry the whole batch next time
            return False
        self._error = None
        self._durable += len(batch)
        while self._waiters and self._waiters[0][0] <= self._durable:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        return True

    def _write(self, batch: bytearray) -> None:
        # Runs in a thread. Starts from the last fsynced length: a failed earlier attempt
        # may have left part of this batch (or, after a failed fsync, pages we cannot
        # trust), and rewriting from a known-good length neither duplicates nor tears.
        if os.fstat(self._fd).st_size != self._size:
            os.ftruncate(self._fd, self._size)
        view = memoryview(batch)
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        os.fsync(self._fd)
        self._size += len(batch)

    def _rotate(self) -> None:
        # Rename first, with the fd still open: if opening the new file fails, writes go on
        # into the (newest) rotated segment and the open is retried after the next commit.
        if not self._renamed:
            os.rename(self.path, self.dir / f"worker-{self.worker}.{self._seq + 1:06d}.wal")
            self._seq += 1
            self._renamed = True
        fd = open_private(self.path, os.O_WRONLY | os.O_APPEND)
        old, self._fd = self._fd, fd
        self._size = 0
        self._renamed = False
        os.close(old)
        fsync_dir(self.dir)
