"""Everything that crosses a process boundary between supervisor and workers.

Only small descriptors travel: a chunk names a byte range of a spool file,
never its rows; an ack carries counts. Imports only config (a Reload message carries
the new Config), so every process can import it.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .config import Config


class Outcome(str, enum.Enum):
    """How a row ended. All four are final; a row has exactly one."""

    DELIVERED = "delivered"
    REJECTED = "rejected"  # bad input: never sent, reason in rejects/<job>.jsonl
    DEAD = "dead"  # gave up sending: details in dlq/<job>.jsonl
    # The job was cancelled before the row was finally sent. Recorded once per job as a
    # range (wal.encode_cancel), never per row: it covers the rows without another outcome.
    CANCELLED = "cancelled"


@dataclass(slots=True)
class Counts:
    """Outcomes of a set of rows (a chunk, a job)."""

    rows: int = 0
    delivered: int = 0
    rejected: int = 0
    dead: int = 0
    possible_duplicates: int = 0
    cancelled: int = 0

    def add(self, other: Counts) -> None:
        self.rows += other.rows
        self.delivered += other.delivered
        self.rejected += other.rejected
        self.dead += other.dead
        self.possible_duplicates += other.possible_duplicates
        self.cancelled += other.cancelled

    def count(self, outcome: Outcome, dup: bool = False) -> None:
        self.rows += 1
        if outcome is Outcome.DELIVERED:
            self.delivered += 1
        elif outcome is Outcome.REJECTED:
            self.rejected += 1
        elif outcome is Outcome.CANCELLED:
            self.cancelled += 1
        else:
            self.dead += 1
        if dup:
            self.possible_duplicates += 1

    def as_dict(self) -> dict[str, int]:
        return {"rows": self.rows, "delivered": self.delivered, "rejected": self.rejected,
                "dead": self.dead, "possible_duplicates": self.possible_duplicates,
                "cancelled": self.cancelled}


@dataclass(frozen=True, slots=True)
class CsvLayout:
    """How to read a job's rows; fixed when the job is claimed (csv config may change later)."""

    delimiter: bytes = b","
    ncols: int = 0  # expected column count; 0 = not checked (no header)
    id_index: int = 0
    msg_index: int = -1  # -1: the message comes from [alert] message
    max_id_length: int = 256
    max_line_bytes: int = 65536  # longer lines are rejected unread; 0 = unbounded (old jobs)
    # [csv] data_columns resolved: (name in data.fields, column index). () = no `fields` key.
    data_columns: tuple[tuple[str, int], ...] = ()
    # No header and data_columns = ["*"]: every column of each row but the id and message
    # ones, named by its number (rows may differ in length: the count is not checked).
    data_rest: bool = False
    # The rows are dead letters (letters.py), not CSV: the layout of a replay job.
    letters: bool = False
    # Whether rows carry data.fields: derived, so the worker tests one attribute per row.
    has_fields: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "has_fields", bool(self.data_columns) or self.data_rest)


@dataclass(frozen=True, slots=True)
class Chunk:
    """A line-aligned byte range [start, end) of a spool file, to be delivered by one worker."""

    job: str
    path: str  # the spool file
    name: str  # the file's original name, sent as data.file
    seq: int  # chunk number within the job, from 0
    start: int
    end: int
    layout: CsvLayout
    started_at: float  # time.time() the job was claimed: alerts age from here (retry.max_age)
    # Recovery: rows of this chunk that already have a final outcome, and their counts.
    done: frozenset[int] = frozenset()
    prior: Counts = field(default_factory=Counts)
    # Cluster mode: this node's claim on the chunk (the stream entry's delivery count). A
    # chunk taken back later is another claim, which an old Fence does not touch.
    claim: int = 0


@dataclass(frozen=True, slots=True)
class ChunkAck:
    """Every row of the chunk is final and its outcomes are durable in the worker's WAL."""

    worker: int
    job: str
    seq: int
    counts: Counts


@dataclass(frozen=True, slots=True)
class Progress:
    """Worker -> supervisor, about twice a second when it changed: per job, the outcomes of
    rows final in this worker's chunks not yet acknowledged (not yet durable). Each one
    replaces the worker's previous report; one follows every ChunkAck at once, so an acked
    chunk is never counted both as durable and as live."""

    worker: int
    counts: dict[str, Counts]


@dataclass(frozen=True, slots=True)
class ChunkFailed:
    """The chunk's file could not be read (truncated, deleted): its job fails with the reason."""

    worker: int
    job: str
    seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class Ready:
    worker: int
    pid: int


@dataclass(frozen=True, slots=True)
class Reload:
    """Supervisor -> worker: apply the new config (webhook, retry, alert, concurrency)."""

    config: Config


@dataclass(frozen=True, slots=True)
class Drain:
    """Supervisor -> worker: take no new chunk, finish in flight (or hurry), flush, exit 0."""

    hurry: bool = False


@dataclass(frozen=True, slots=True)
class Fence:
    """Supervisor -> worker (cluster mode): this node's claim on the chunk lapsed, or may
    have: another node delivers its rows from now on. Write nothing more for it (requests
    in flight end without a record) and never ack it."""

    job: str
    seq: int
    claim: int


JOB_ACTIONS = ("pause", "resume", "cancel")


@dataclass(frozen=True, slots=True)
class JobControl:
    """Supervisor -> worker: hold a job's rows (pause), let them go again (resume), or drop
    the ones not yet finally sent (cancel). Requests in flight always finish."""

    job: str
    action: str  # one of JOB_ACTIONS
