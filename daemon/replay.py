"""Replay as a job: the dead letters of a finished job become the rows of a job of kind
`replay`, delivered by the same workers, budget, breaker and WAL as any other.

The letters leave dlq/<job>.jsonl by one rename into the spool (the replay job's source
file); a letter that fails again is written back to dlq/<job>.jsonl by the worker with its
first id; one never sent (a cancelled replay) is put back when the replay ends. What the
replay delivered is credited to the original job's summary (delivered, dead, replayed),
once per replay job, before the replay's own summary is written, so a crash in between
credits it on the next start and never twice. Blocking file work: run it in a thread.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import orjson

from . import chunker, wal
from .jobs import Job, JobStore, open_regular, write_atomic
from .letters import MAX_LETTER_BYTES
from .protocol import CsvLayout

LAYOUT = CsvLayout(ncols=0, max_line_bytes=MAX_LETTER_BYTES, letters=True)
_JOB = re.compile(r"^j\d{6,}\Z")


def dlq_file(state_dir: Path, job: str) -> Path:
    return state_dir / "dlq" / f"{job}.jsonl"


def replayable(state_dir: Path) -> list[str]:
    """Finished jobs with dead letters, oldest first."""
    out = []
    for p in (state_dir / "dlq").glob("j*.jsonl"):
        job = p.name[:-len(".jsonl")]
        if _JOB.match(job) and p.stat().st_size and \
                (state_dir / "done" / f"{job}.summary.json").exists():
            out.append(job)
    return sorted(out, key=lambda j: int(j[1:]))


def create(store: JobStore, of: str, chunk_bytes: int) -> Job | None:
    """A replay job over the dead letters of `of` (None: it has none). The manifest is
    written before the letters move, so a crash in between leaves them in the DLQ and an
    orphan manifest that the next start removes."""
    src = dlq_file(store.state_dir, of)
    try:
        size = src.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    name = f"{of}.dlq.jsonl"
    job_id = store.allocate_id(name)
    spool = store.spool / f"{job_id}--{name}"
    job = Job(job_id, name, spool, LAYOUT, chunk_bytes, 0, time.time(), size, kind="replay",
              replay_of=of)
    write_atomic(store.spool / f"{job_id}.json",
                 orjson.dumps({**job.manifest(), "source": str(src)}))
    os.rename(src, spool)
    wal.fsync_dir(src.parent)
    wal.fsync_dir(store.spool)
    job._fd = open_regular(spool)
    job.size = os.fstat(job._fd).st_size
    return job


def credit(store: JobStore, job: Job) -> None:
    """Count what the replay `job` delivered in its original job's summary, once."""
    path = store.done / f"{job.replay_of}.summary.json"
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return  # no summary to credit (removed by hand): the replay's own summary stays
    replays = doc.get("replays", [])
    if job.id in replays:
        return
    n = job.counts.delivered
    doc["delivered"] = doc.get("delivered", 0) + n
    doc["dead"] = max(0, doc.get("dead", 0) - n)
    doc["replayed"] = doc.get("replayed", 0) + n
    doc["replays"] = replays + [job.id]
    write_atomic(path, orjson.dumps(doc, option=orjson.OPT_INDENT_2))


def return_unsent(state_dir: Path, job: Job) -> int:
    """A cancelled replay: put the letters that got no outcome back into the DLQ of the
    original job; returns how many. Reads the WALs for the replay's outcomes (a set of
    offsets, one per letter sent) and its source line by line."""
    sent: set[int] = set()
    for seg in wal.segments(state_dir / "wal"):
        for r in wal.records(seg):
            if r["job"] == job.id and "off" in r and r["out"] in wal.FINAL and \
                    r["out"] != "cancelled":
                sent.add(r["off"])
    back = 0
    fd = open_regular(job.spool)
    out = wal.open_private(dlq_file(state_dir, job.replay_of), os.O_WRONLY | os.O_APPEND)
    try:
        size = os.fstat(fd).st_size
        for start, end in chunker.plan(chunker.FileView(fd, size), 0, 1 << 20,
                                       MAX_LETTER_BYTES):
            for off, line in chunker.read_rows(fd, start, end, MAX_LETTER_BYTES):
                if off not in sent and isinstance(line, bytes) and line.strip():
                    os.write(out, line + b"\n")
                    back += 1
        os.fsync(out)
    finally:
        os.close(fd)
        os.close(out)
    return back
