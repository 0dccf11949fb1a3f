"""Dead letters: the lines of dlq/<job>.jsonl, as workers write them and a replay job reads
them back.

A replay job's rows are these lines. The file is alertd's own, but it is read back as
input all the same: a line that is not a letter alertd could have written (edited by
hand, cut by a full disk) is rejected with the reason, never sent with a forged id.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

from .chunker import BadRow, LongLine

# What a webhook-id may hold (payload.build puts it in a header unquoted): the job:offset
# ids alertd makes, and nothing that could split a header.
_ID = re.compile(r"[A-Za-z0-9:_-]{1,128}\Z")
MAX_LETTER_BYTES = 1 << 20  # a letter holds a row (max_line_bytes) and its JSON escaping


@dataclass(frozen=True, slots=True)
class Letter:
    id: str  # the alert's webhook-id since its first attempt
    job: str  # the job the row belongs to (the replay credits it)
    offset: int  # the row's offset in that job's file, sent as data.offset
    user_id: str
    message: str
    file: str  # the original file name, sent as data.file
    attempts: int  # attempts before this replay
    fields: dict[str, str] | None


def entry(job: str, off: int, uid: str, msg: str, file: str, attempts: int, status: int,
          err: str | None, ts: float, fields: dict[str, str] | None,
          alert_id: str | None = None) -> bytes:
    """One DLQ line. A row of `job` at `off` has the id job:off unless it is given (a
    letter replayed again keeps the id of its first attempt)."""
    doc = {"id": alert_id or f"{job}:{off}", "job": job, "offset": off, "user_id": uid,
           "message": msg, "file": file, "attempts": attempts, "status": status,
           "error": err, "ts": ts}
    if fields is not None:  # a replay sends the same body as the first attempts
        doc["fields"] = fields
    return orjson.dumps(doc) + b"\n"


def parse(line: bytes | LongLine) -> Letter:
    """The letter on one DLQ line; BadRow names what is wrong with it."""
    if isinstance(line, LongLine):
        raise BadRow(f"dead letter longer than {MAX_LETTER_BYTES} bytes")
    if not line.strip():
        raise BadRow("empty line")
    try:
        d = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise BadRow(f"not a dead letter (bad JSON: {e})") from None
    if not isinstance(d, dict):
        raise BadRow("not a dead letter (not a JSON object)")
    try:
        alert_id, job, off = d["id"], d["job"], d["offset"]
        uid, msg, file = d["user_id"], d["message"], d["file"]
    except KeyError as e:
        raise BadRow(f"not a dead letter (no {e.args[0]!r})") from None
    if not isinstance(alert_id, str) or not _ID.match(alert_id):
        raise BadRow("dead letter with a malformed id")
    if not isinstance(job, str) or not isinstance(off, int) or off < 0:
        raise BadRow("dead letter without a valid job and offset")
    if not all(isinstance(v, str) for v in (uid, msg, file)) or not uid:
        raise BadRow("dead letter without a user id, message or file name")
    fields = d.get("fields")
    if fields is not None and not (isinstance(fields, dict) and
                                   all(isinstance(v, str) for v in fields.values())):
        raise BadRow("dead letter with malformed fields")
    attempts = d.get("attempts", 0)
    return Letter(alert_id, job, off, uid, msg, file,
                  attempts if isinstance(attempts, int) and attempts >= 0 else 0, fields)
