"""The reference row path: today's per-row functions (chunker.rows/parse, Payloads.build,
the transport's request framing, wal.encode_row), driven batch by batch.

It IS the behaviour the compiled path (_fast.pyx) must match byte for byte; it must never
grow a rule of its own. Same interface as _fast: Requests, RowBatcher, encode_wal_rows.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence

from .. import chunker, wal
from ..payload import Payloads
from ..protocol import CsvLayout
from .span import REJECT_HEAD, Batch, WalRow


class Requests:
    """How a good row becomes request bytes under one config: the request head (see
    span.request_head), the signing secrets and the [alert] message for rows without a
    message column. Build a new one on reload."""

    __slots__ = ("head", "message", "_payloads")

    def __init__(self, head: bytes, secrets: Sequence[str], message: str) -> None:
        self.head = head
        self.message = message
        self._payloads = Payloads(secrets)

    def build(self, job: str, name: str, offset: int, uid: str, msg: str,
              fields: dict[str, str] | None, now: float) -> bytes:
        """The request of one alert sent at `now` (a retry re-signs with its own time)."""
        hdr, body = self._payloads.build(f"{job}:{offset}", uid, msg, name, offset, now, fields)
        # Transport's framing (Pool.post): head, length, the webhook headers, body.
        return b"".join((self.head, str(len(body)).encode(), b"\r\n", hdr, b"\r\n", body))


class RowBatcher:
    """The rows of one span (bytes at file offset `data_offset`, line-aligned), cut,
    parsed and built into requests a batch at a time. `done`: offsets to skip (rows that
    already have an outcome)."""

    __slots__ = ("_rows", "_pos", "_layout", "_job", "_name", "_done")

    def __init__(self, data: bytes, data_offset: int, layout: CsvLayout, job: str, name: str,
                 done: Collection[int] = frozenset()) -> None:
        end = data_offset + len(data)
        self._rows = list(chunker.rows(data, data_offset, data_offset, end,
                                       layout.max_line_bytes)) if data else []
        self._pos = 0
        self._layout, self._job, self._name, self._done = layout, job, name, done

    @property
    def exhausted(self) -> bool:
        """Every line of the span has been through next()."""
        return self._pos >= len(self._rows)

    def next(self, requests: Requests, now: float, max_lines: int = 256) -> Batch:
        """The next `max_lines` lines of the span (fewer at its end), with every good
        row's request signed at `now`."""
        lay, done, job, name = self._layout, self._done, self._job, self._name
        b = Batch()
        stop = min(len(self._rows), self._pos + max(1, max_lines))
        rows, self._pos = self._rows[self._pos:stop], stop
        for off, line in rows:
            if off in done:
                continue
            fields = None
            try:
                if lay.has_fields:
                    uid, msg, fields = chunker.parse_fields(line, lay)
                else:
                    uid, msg = chunker.parse(line, lay)
            except chunker.BadRow as e:
                b.rejects.append((off, e.reason, bytes(line[:REJECT_HEAD])))
                continue
            if msg is None:
                msg = requests.message
            b.offsets.append(off)
            b.uids.append(uid)
            b.msgs.append(msg)
            b.fields.append(fields)
            b.requests.append(requests.build(job, name, off, uid, msg, fields, now))
        return b


def encode_wal_rows(job: str, ck: int, rows: Sequence[WalRow], ts: float) -> bytes:
    """The WAL records of a batch of row outcomes of chunk `ck`, one line each, joined.
    A row: (offset, outcome value, status, attempts, possible duplicate, user id, error
    or None); a reject is (offset, "rejected", 0, 0, False, "", reason)."""
    enc = wal.encode_row
    return b"".join([enc(job, ck, off, out, st, att, dup, uid, ts, err)
                     for off, out, st, att, dup, uid, err in rows])
