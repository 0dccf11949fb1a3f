"""Jobs on disk and in memory: claim, manifest, lazy chunk plan, counts, summary.

The rule "a job is final when every chunk is final" lives here, in one place.
A job plans its chunks lazily with pread (never a full pre-scan, never an mmap
that a truncation would turn into SIGBUS) and after a restart skips chunks the
WALs prove final. Never talks to workers.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import stat
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import orjson

from . import chunker, names
from .config import CsvConfig
from .errors import InputError
from .protocol import Chunk, Counts, CsvLayout, Outcome
from .wal import JobRecovery, fsync_dir, open_private

log = logging.getLogger("alertd.jobs")

JOB_RE = re.compile(r"^(j\d{6,})--(.+)$")
FINISHED_LISTED = 50  # finished jobs `alertd jobs` lists
_FINISHED_RE = re.compile(r"^j(\d{6,})(\.summary\.json|--.*\.reason)$", re.S)
SNIFF_BYTES = 64 * 1024


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def write_atomic(path: Path, data: bytes) -> None:
    """tmp + fsync + rename + fsync(dir): the file is either old or new after a crash."""
    os.rename(write_tmp(path, data), path)
    fsync_dir(path.parent)


def write_tmp(path: Path, data: bytes) -> Path:
    """The first half of write_atomic: `data` fsynced under a dot name beside `path`;
    returns that name. Renaming it over `path` and fsyncing the folder (once for many
    files) completes the write."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)  # 0640 even over a leftover tmp file
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def looks_binary(head: bytes) -> bool:
    """More than 10% NULs or control bytes in the first 64 KiB: not a text file."""
    if not head:
        return False
    bad = sum(head.count(bytes([c])) for c in range(32) if c not in (9, 10, 13))
    return bad * 10 > len(head)


def open_regular(path: Path) -> int:
    """Open a spool file for reading only if it is a regular file (never follows a symlink,
    never blocks on a FIFO); InputError names what it is instead."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError("not a regular file (a symbolic link); not read") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputError(f"not a regular file ({_KINDS.get(stat.S_IFMT(st.st_mode), 'special')}); "
                         f"not read")
    return fd


def inspect(fd: int, csv: CsvConfig) -> tuple[CsvLayout, int]:
    """The layout of an open CSV file and the offset of its first row; InputError when
    the file cannot be a job (binary, no id column, a header too long)."""
    head = os.pread(fd, SNIFF_BYTES, 0)
    if looks_binary(head):
        raise InputError("binary file (control bytes in the first 64 KiB), not CSV text")
    if csv.header and b"\n" not in head and len(head) == SNIFF_BYTES:
        raise InputError("header line longer than 64 KiB")
    header, start = chunker.read_header(head, csv.header)
    return chunker.layout_for(header, csv), start


def reason_of(e: Exception) -> str:
    """An error as a failed/ reason: an OSError without its path (which may hold a raw name)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


@dataclass
class Job:
    id: str
    name: str  # original file name, escaped (names.escape): manifest, summary, payload
    spool: Path
    layout: CsvLayout
    chunk_bytes: int
    data_start: int
    started_at: float
    size: int = 0
    counts: Counts = field(default_factory=Counts)
    recovery: JobRecovery | None = None
    failed: str | None = None
    cancelled: bool = False  # no further row is handed out; the rest end as `cancelled`
    priority: str = "normal"  # as the dispatcher last had it: kept in the summary
    kind: str = "file"  # or "replay": the rows are the dead letters of job `replay_of`
    replay_of: str | None = None
    control: dict = field(default_factory=dict)  # spool/<job>.control.json as loaded at start
    outstanding: dict[int, int] = field(default_factory=dict)  # seq -> bytes, handed out, not acked
    bytes_done: int = 0  # bytes of chunks whose every row is final
    requeued: deque[Chunk] = field(default_factory=deque)
    planned_all: bool = False
    chunks_done: int = 0
    _plan: Iterator[tuple[int, int]] | None = None
    _fd: int | None = None
    _seq: int = 0
    _plan_pos: int = 0

    @property
    def final(self) -> bool:
        return self.failed is not None or (
            self.planned_all and not self.outstanding and not self.requeued)

    @property
    def bytes_planned(self) -> int:
        """How far planning has got: rows known so far lie before this offset."""
        return self._plan_pos

    def park(self) -> None:
        """Queued behind other jobs: give the descriptor back; open_plan opens the spool
        file again (only alertd writes spool/), so queued jobs cost no descriptor."""
        if self._fd is not None and self._plan is None:
            os.close(self._fd)
            self._fd = None

    def open_plan(self) -> None:
        """Start planning, over the descriptor the claim opened (or a checked new one);
        raises OSError or InputError if the spool file is gone or not a regular file."""
        if self.size <= self.data_start:
            self._close_plan()
            return
        if self._fd is None:
            self._fd = open_regular(self.spool)
        self._plan = chunker.plan(chunker.FileView(self._fd, self.size), self.data_start,
                                  self.chunk_bytes, self.layout.max_line_bytes)
        self._plan_pos = self.data_start

    def next_chunk(self) -> Chunk | None:
        """The next chunk to hand out, or None (nothing now: all planned or waiting)."""
        if self.failed is not None:
            return None
        if self.requeued:
            c = self.requeued.popleft()
            self.outstanding[c.seq] = c.end - c.start
            return c
        while not self.planned_all:
            try:
                start, end = next(self._plan)
            except StopIteration:
                self._close_plan()
                return None
            seq = self._seq
            self._seq += 1
            self._plan_pos = end
            rec = self.recovery
            if rec is not None and seq in rec.chunks:
                self.counts.add(rec.chunks[seq])  # proven final by the WAL
                self.chunks_done += 1
                self.bytes_done += end - start
                continue
            done, prior = frozenset(), Counts()
            if rec is not None and seq in rec.partial:
                done, prior = partial_counts(rec.partial[seq])
            self.outstanding[seq] = end - start
            return Chunk(self.id, str(self.spool), self.name, seq, start, end, self.layout,
                         self.started_at, done, prior)
        return None

    def _close_plan(self) -> None:
        self.planned_all = True
        self._plan = None
        self.recovery = None  # everything it could tell has been used
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def ack(self, seq: int, counts: Counts) -> None:
        if seq in self.outstanding:
            self.bytes_done += self.outstanding.pop(seq)
            self.counts.add(counts)
            self.chunks_done += 1

    def requeue(self, chunk: Chunk) -> None:
        """A worker died holding `chunk`: hand it out again (done rows given by the caller)."""
        self.requeued.append(chunk)

    def fail(self, reason: str) -> None:
        self.failed = reason
        self._close_plan()

    def cancel(self) -> None:
        """Hand out nothing more. Chunks waiting to be re-run keep only the outcomes their
        WAL already has; chunks at workers still come back (their requests in flight end)."""
        self.cancelled = True
        for c in self.requeued:
            self.outstanding.pop(c.seq, None)
            self.counts.add(c.prior)
        self.requeued.clear()
        rec = self.recovery
        if rec is not None:  # what the WAL has for chunks the plan never reached this run
            for seq, counts in rec.chunks.items():
                if seq >= self._seq:  # chunks the plan has not reached yet
                    self.counts.add(counts)
            for seq, rows in rec.partial.items():
                if seq >= self._seq:
                    self.counts.add(partial_counts(rows)[1])
        self._close_plan()

    def settle_cancelled(self, rows: int) -> None:
        """The job's file has `rows` rows: those without a real outcome are cancelled."""
        c = self.counts
        c.cancelled = max(0, rows - c.delivered - c.rejected - c.dead)
        c.rows = c.delivered + c.rejected + c.dead + c.cancelled

    def manifest(self) -> dict:
        lay = self.layout
        return {"job": self.id, "name": self.name, "spool": str(self.spool),
                "started_at": self.started_at, "chunk_bytes": self.chunk_bytes,
                "data_start": self.data_start, "size": self.size,
                "layout": {"delimiter": lay.delimiter.decode(), "ncols": lay.ncols,
                           "id_index": lay.id_index, "msg_index": lay.msg_index,
                           "max_id_length": lay.max_id_length,
                           "max_line_bytes": lay.max_line_bytes,
                           "data_columns": [list(c) for c in lay.data_columns],
                           "data_rest": lay.data_rest, "letters": lay.letters},
                **({"kind": self.kind, "replay_of": self.replay_of}
                   if self.kind != "file" else {})}


def count_rows(path: Path, data_start: int) -> int:
    """Rows of a spool file from `data_start`, as workers and `alertd verify` read them:
    every line is a row (blank, bad or too long ones too), a last line without its newline
    as well. Counts newlines in 1 MiB blocks (about 1 GB/s), so a cancelled job of many
    millions of rows is summed in seconds; blocking: run it in a thread."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        n, pos, last = 0, data_start, b"\n"
        while pos < size:
            block = os.pread(fd, min(1 << 20, size - pos), pos)
            if not block:
                break
            n += block.count(b"\n")
            last = block[-1:]
            pos += len(block)
        return n + (last != b"\n")
    finally:
        os.close(fd)


def partial_counts(rows: dict[int, tuple[str, bool]]) -> tuple[frozenset[int], Counts]:
    c = Counts()
    for out, dup in rows.values():
        c.count(Outcome(out), dup)
    return frozenset(rows), c


def failed_summary(job_id: str, name: str, reason: str, at: float) -> dict:
    """The summary of a file that could not be read at claim (no rows were read)."""
    return {"job": job_id, "file": name, **Counts().as_dict(), "started_at": iso(at),
            "finished_at": iso(at), "duration_s": 0.0, "bytes": 0, "status": "failed",
            "reason": reason}


class JobStore:
    """The state directory's job files: ids, spool, manifests, done/, failed/."""

    def __init__(self, state_dir: Path, keep_sources: bool = True) -> None:
        self.keep_sources = keep_sources  # False: a finished job's file is removed, not kept in done/
        self.state_dir = state_dir
        self.spool = state_dir / "spool"
        self.done = state_dir / "done"
        self.failed = state_dir / "failed"
        for d in (self.spool, self.done, self.failed, state_dir / "wal", state_dir / "dlq",
                  state_dir / "rejects"):
            d.mkdir(parents=True, exist_ok=True)
        self._seq_file = state_dir / "jobseq"
        self._last, self._claiming = self._load_last_id()
        # Files that failed at claim (in a thread): the dispatcher lists them as finished.
        self.claim_failures: deque[dict] = deque(maxlen=FINISHED_LISTED)

    # ------------------------------------------------------------ job control files

    def control_path(self, job_id: str) -> Path:
        return self.spool / f"{job_id}.control.json"

    def write_control(self, job_id: str, state: str, priority: str) -> None:
        """Persist a job's pause/cancel state and priority (blocking: fsyncs)."""
        write_atomic(self.control_path(job_id),
                     orjson.dumps({"job": job_id, "state": state, "priority": priority}))

    def read_control(self, job_id: str) -> dict:
        try:
            doc = orjson.loads(self.control_path(job_id).read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, orjson.JSONDecodeError) as e:
            log.error("%s: control file unreadable (%s): the job runs at normal priority",
                      job_id, e)
            return {}
        return doc if isinstance(doc, dict) else {}

    def load_finished(self, n: int = FINISHED_LISTED) -> list[dict]:
        """The last `n` finished jobs on disk, oldest first: summaries in done/, and files
        that failed at claim (failed/*.reason without a summary). Reads only those `n`
        files, however many jobs have finished. Blocking."""
        found: dict[int, tuple[str, Path]] = {}
        for d, kind in ((self.failed, "reason"), (self.done, "summary")):  # summaries win
            for name in os.listdir(d):
                m = _FINISHED_RE.match(name)
                if m is None or (kind == "summary") != (m.group(2) == ".summary.json"):
                    continue
                had = found.get(int(m.group(1)))
                # A file named x.reason fails as j..--x.reason beside j..--x.reason.reason.
                if had is None or had[0] == "reason" and len(had[1].name) < len(name) or \
                        kind == "summary":
                    found[int(m.group(1))] = (kind, d / name)
        out = []
        for _, (kind, p) in sorted(found.items())[-n:]:
            try:
                if kind == "summary":
                    doc = orjson.loads(p.read_bytes())
                    if isinstance(doc, dict) and "job" in doc:
                        out.append(doc)
                    continue
                text, mtime = p.read_text(errors="replace"), p.stat().st_mtime
            except (OSError, orjson.JSONDecodeError):
                continue
            m = JOB_RE.match(p.name[:-len(".reason")])
            reason, _, rest = text.partition("\n")
            name = rest[len("file: "):].rstrip("\n") if rest.startswith("file: ") else \
                (m.group(2) if m else p.name)
            out.append(failed_summary(p.name.split("--", 1)[0], name, reason, mtime))
        return out

    def _load_last_id(self) -> tuple[int, dict[str, str]]:
        last, claiming = 0, {}
        try:
            text = self._seq_file.read_text().strip() or "0"
            if text.isdigit():  # the format before the name was kept beside the id
                last = int(text)
            else:
                doc = orjson.loads(text)
                last = int(doc["last"])
                if "names" in doc:  # a batch of claims (allocate_ids)
                    claiming = {str(k): str(v) for k, v in doc["names"].items()}
                else:
                    claiming = {f"j{last:06d}": str(doc["name"])}
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            log.error("%s is corrupt; recomputing from existing jobs", self._seq_file)
        for d in (self.spool, self.done, self.failed):
            for name in os.listdir(d):
                m = re.match(r"^j(\d{6,})", name)
                if m:
                    last = max(last, int(m.group(1)))
        return last, claiming

    def refresh_ids(self) -> None:
        """Read the last job id again (a cluster node that takes over the planning: the
        previous planner allocated ids since this store was made)."""
        self._last, self._claiming = self._load_last_id()

    def allocate_id(self, name: str) -> str:
        # Persisted before the claim so an id is never reused, even if done/ is cleaned;
        # with the name it is claimed for, because a crash between the rename and the
        # manifest would otherwise leave only the (maybe shortened) spool name.
        self._last += 1
        write_atomic(self._seq_file, orjson.dumps({"last": self._last, "name": name}))
        return f"j{self._last:06d}"

    def allocate_ids(self, names_: list[str]) -> list[str]:
        """Ids for several claims with one durable write of jobseq, which keeps every
        name (as allocate_id keeps its one)."""
        ids = [f"j{self._last + i + 1:06d}" for i in range(len(names_))]
        self._last += len(names_)
        write_atomic(self._seq_file, orjson.dumps({"last": self._last,
                                                   "names": dict(zip(ids, names_))}))
        return ids

    def claim(self, path: Path, csv: CsvConfig, chunk_bytes: int) -> Job | None:
        """Move `path` into the spool and open it as a job; None if it vanished, is not a
        regular file, or cannot be read (then it is in failed/ with a .reason).

        Blocking (fsyncs): the supervisor runs it in a thread, one claim at a time.
        """
        return self.claim_many([path], csv, chunk_bytes)[0]

    def claim_many(self, paths: list[Path], csv: CsvConfig, chunk_bytes: int) -> list[Job | None]:
        """claim() for each of `paths`, in order, with the fsyncs shared: one write of
        jobseq for all their ids, then the renames, then each manifest fsynced and one
        fsync of spool/ for all of them. A job is returned only once its manifest is
        durable. Blocking: run it in a thread, one batch at a time."""
        out: list[Job | None] = [None] * len(paths)
        todo: list[tuple[int, Path, str]] = []
        for i, path in enumerate(paths):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):  # directories, symlinks, FIFOs... stay, never opened
                todo.append((i, path, names.escape(path.name)))
        if not todo:
            return out
        # One name: allocate_id, as before batches; several: one jobseq write for all.
        ids = [self.allocate_id(todo[0][2])] if len(todo) == 1 else \
            self.allocate_ids([name for _, _, name in todo])
        written: list[tuple[int, Job, Path]] = []
        for (i, path, name), job_id in zip(todo, ids):
            spool = self.spool / names.state_name(job_id, name)
            try:
                os.rename(path, spool)
            except FileNotFoundError:
                continue
            except OSError as e:  # the file stays in the inbox; the next rescan retries it
                log.error("cannot claim %s: %s", name, reason_of(e))
                continue
            # What was renamed may not be what lstat saw (a producer can swap the name in
            # between): only the descriptor opened now, checked to be a regular file, is read.
            fd = None
            try:
                fd = open_regular(spool)
                job = self._inspect(job_id, name, spool, fd, csv, chunk_bytes)
                tmp = write_tmp(self.spool / f"{job_id}.json", orjson.dumps(job.manifest()))
            except Exception as e:  # whatever one file does, the next claims go on
                if fd is not None:
                    os.close(fd)
                self._claim_failed(job_id, name, spool, e)
                continue
            written.append((i, job, tmp))
        done: list[tuple[int, Job]] = []
        for i, job, tmp in written:
            try:
                os.rename(tmp, self.spool / f"{job.id}.json")
            except OSError as e:
                self._claim_failed(job.id, job.name, job.spool, e, job)
                continue
            done.append((i, job))
        if not done:
            return out
        try:
            fsync_dir(self.spool)  # the spool entries and their manifests, all at once
        except OSError as e:
            for _, job in done:
                self._claim_failed(job.id, job.name, job.spool, e, job)
            return out
        for i, job in done:
            log.info("claimed %s as %s (%d bytes)", job.name, job.id, job.size)
            out[i] = job
        return out

    def _claim_failed(self, job_id: str, name: str, spool: Path, e: Exception,
                      job: Job | None = None) -> None:
        if job is not None and job._fd is not None:
            os.close(job._fd)
            job._fd = None
        if not isinstance(e, (InputError, OSError)):
            log.exception("%s (%s): unexpected error while claiming", job_id, name)
        self.move_failed(job_id, name, spool, reason_of(e))
        self.claim_failures.append(failed_summary(job_id, name, reason_of(e), time.time()))

    def _inspect(self, job_id: str, name: str, spool: Path, fd: int, csv: CsvConfig,
                 chunk_bytes: int) -> Job:
        layout, start = inspect(fd, csv)
        size = os.fstat(fd).st_size
        return Job(job_id, name, spool, layout, chunk_bytes, start, time.time(), size, _fd=fd)

    def move_failed(self, job_id: str, name: str, spool: Path, reason: str) -> None:
        dest = self.failed / spool.name
        try:
            os.rename(spool, dest)
        except FileNotFoundError:
            pass
        write_atomic(self.failed / f"{spool.name}.reason", f"{reason}\nfile: {name}\n".encode())
        (self.spool / f"{job_id}.json").unlink(missing_ok=True)
        log.error("%s (%s) failed: %s", job_id, name, reason)

    def load_unfinished(self, csv: CsvConfig, chunk_bytes: int) -> list[Job]:
        """Jobs with a manifest in spool/ (and spool files that crashed before theirs).

        A spool entry that is not a regular file (swapped in during a claim that then
        crashed) goes to failed/ unread; one job's bad state never stops the start.
        """
        jobs = []
        for entry in sorted(os.listdir(self.spool)):
            m = JOB_RE.match(entry)
            if not m:
                continue
            job_id = m.group(1)
            try:
                job = self._load_one(job_id, self.spool / entry, csv, chunk_bytes)
            except Exception as e:  # logged; the files stay for an operator, the start goes on
                log.exception("%s: cannot recover %s: %s", job_id, names.escape(entry), e)
                continue
            if job is not None:
                jobs.append(job)
        self._claiming = {}
        self._drop_orphan_manifests()
        return jobs

    def _drop_orphan_manifests(self) -> None:
        """A replay that crashed before its letters moved left a manifest without a spool
        file; the letters are still in the DLQ, so the manifest goes."""
        spooled = {e.split("--", 1)[0] for e in os.listdir(self.spool) if "--" in e}
        for entry in os.listdir(self.spool):
            m = re.match(r"^(j\d{6,})\.json$", entry)
            if m and m.group(1) not in spooled:
                try:
                    doc = orjson.loads((self.spool / entry).read_bytes())
                except (OSError, orjson.JSONDecodeError):
                    continue
                if isinstance(doc, dict) and doc.get("kind") == "replay":
                    (self.spool / entry).unlink(missing_ok=True)

    def _load_one(self, job_id: str, spool: Path, csv: CsvConfig, chunk_bytes: int) -> Job | None:
        mpath = self.spool / f"{job_id}.json"
        try:
            doc = orjson.loads(mpath.read_bytes())
        except FileNotFoundError:
            doc = None
        except (OSError, orjson.JSONDecodeError) as e:
            log.error("manifest %s unreadable (%s): rebuilding it", mpath, e)
            doc = None
        # The escaped name: the manifest's, else the one jobseq kept for the claim that
        # crashed before writing it, else what the spool name holds.
        name = doc["name"] if doc else self._claiming.get(job_id) or \
            names.escape(spool.name.split("--", 1)[1])
        if (self.done / f"{job_id}.summary.json").exists():
            self._finish_moves(job_id, spool)
            return None
        if doc is None:
            fd = None
            try:
                fd = open_regular(spool)
                job = self._inspect(job_id, name, spool, fd, csv, chunk_bytes)
            except (InputError, OSError) as e:
                if fd is not None:
                    os.close(fd)
                self.move_failed(job_id, name, spool, reason_of(e))
                return None
            write_atomic(mpath, orjson.dumps(job.manifest()))
            return job
        lay = doc["layout"]
        return Job(job_id, name, spool,
                   CsvLayout(lay["delimiter"].encode(), lay["ncols"], lay["id_index"],
                             lay["msg_index"], lay["max_id_length"],
                             lay.get("max_line_bytes", 0),  # 0: planned before the bound
                             # absent: claimed before data_columns, sent without fields
                             tuple((n, i) for n, i in lay.get("data_columns", ())),
                             lay.get("data_rest", False), lay.get("letters", False)),
                   doc["chunk_bytes"], doc["data_start"], doc["started_at"], doc["size"],
                   kind=doc.get("kind", "file"), replay_of=doc.get("replay_of"))

    def finalize(self, job: Job) -> dict:
        """Write the summary, move the file to done/, drop the manifest (in that order,
        so a crash in between is finished by load_unfinished)."""
        return self.finalize_many([job])[0]

    def finalize_many(self, jobs: list[Job]) -> list[dict]:
        """finalize() for several jobs with the fsyncs shared (the three steps below in a
        row). Blocking."""
        staged = self.stage_summaries(jobs)
        self.publish(jobs, staged)
        self.sync_finished(jobs)
        return [summary for summary, _ in staged]

    def stage_summaries(self, jobs: list[Job]) -> list[tuple[dict, Path]]:
        """Step 1 of finishing jobs: each summary written and fsynced under a dot name in
        done/ (blocking: a thread). Returns (summary, its temporary path) per job."""
        now = time.time()
        out = []
        for job in jobs:
            summary = self._summary(job, now)
            out.append((summary, write_tmp(self.done / f"{job.id}.summary.json",
                                           orjson.dumps(summary, option=orjson.OPT_INDENT_2))))
        return out

    def publish(self, jobs: list[Job], staged: list[tuple[dict, Path]]) -> None:
        """Step 2: each summary into place, then its file and manifest into done/ (in that
        order, so a crash in between is finished by load_unfinished). Renames only, a few
        µs each: the event loop runs it, so a summary appears in the same loop turn as
        its job leaves the active list."""
        for job, (_, tmp) in zip(jobs, staged):
            os.rename(tmp, self.done / f"{job.id}.summary.json")
            if not job.failed:
                self._move_done(job.id, job.spool)
            self.control_path(job.id).unlink(missing_ok=True)

    def sync_finished(self, jobs: list[Job]) -> None:
        """Step 3 (blocking): failed jobs' files to failed/ with their reason, then one
        fsync of done/ and of spool/ for all the renames."""
        for job in jobs:
            if job.failed:
                self.move_failed(job.id, job.name, job.spool, job.failed)
        fsync_dir(self.done)
        fsync_dir(self.spool)

    def _summary(self, job: Job, now: float) -> dict:
        c = job.counts
        summary = {"job": job.id, "file": job.name, **c.as_dict(),
                   "started_at": iso(job.started_at), "finished_at": iso(now),
                   "duration_s": round(now - job.started_at, 3), "bytes": job.size,
                   "status": "failed" if job.failed else
                   "cancelled" if job.cancelled else "complete", "priority": job.priority}
        if job.kind != "file":
            summary.update(kind=job.kind, replay_of=job.replay_of)
        if job.failed:
            summary["reason"] = job.failed
        return summary

    def _finish_moves(self, job_id: str, spool: Path) -> None:
        self._move_done(job_id, spool)
        fsync_dir(self.spool)

    def _move_done(self, job_id: str, spool: Path) -> None:
        try:
            if self.keep_sources:
                os.rename(spool, self.done / spool.name)
            else:  # [retention] done_files = 0: the summary and manifest are what stays
                os.unlink(spool)
        except FileNotFoundError:
            pass
        try:  # kept beside the summary: `alertd verify` needs the job's layout
            os.rename(self.spool / f"{job_id}.json", self.done / f"{job_id}.manifest.json")
        except FileNotFoundError:
            pass
