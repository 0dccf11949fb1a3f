"""What both row paths share: the Batch they return, the request head, and reading a span.

Owns no per-row work: that is pure.py (the reference) or _fast.pyx (compiled), which must
give byte-identical results. Must never read a line longer than max_line_bytes whole.
"""
from __future__ import annotations

from collections.abc import Sequence

from .. import chunker, transport

WalRow = tuple[int, str, int, int, bool, str, "str | None"]  # off, out, st, att, dup, uid, err
Reject = tuple[int, str, bytes]  # (file offset, reason, the line's first REJECT_HEAD bytes)
REJECT_HEAD = chunker.LongLine.HEAD  # as much of a bad line as rejects/<job>.jsonl keeps


class Batch:
    """The rows of one RowBatcher.next() call, in file order, as parallel lists.

    Good rows: offsets, uids, msgs (the [alert] message filled in), fields (data.fields
    dicts, or None per row when the layout has none) and requests (the whole request as
    it goes on the wire). Bad rows: rejects. Rows the chunk already had an outcome for
    (recovery) appear in neither.
    """

    __slots__ = ("offsets", "uids", "msgs", "fields", "requests", "rejects")

    def __init__(self) -> None:
        self.offsets: list[int] = []
        self.uids: list[str] = []
        self.msgs: list[str] = []
        self.fields: list[dict[str, str] | None] = []
        self.requests: list[bytes] = []
        self.rejects: list[Reject] = []

    def __len__(self) -> int:
        return len(self.offsets)


def request_head(url: str, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """The request line and fixed headers up to "Content-Length: ", exactly as the
    transport writes them for this webhook URL and its configured extra headers."""
    return transport.request_head(url, headers)


def read_span(fd: int, start: int, end: int,
              max_line_bytes: int = 0) -> tuple[list[Reject], bytes, int]:
    """The span [start, end) of an open file as (the reject of a first line longer than
    max_line_bytes, which is scanned in blocks and never held; the bytes after it; their
    file offset). Raises OSError when the file is shorter than the span, like read_rows.

    chunker.read_span_rows's rule (one rule for both paths), with the reject spelled out.
    """
    lead, data, pos = chunker.read_span_rows(fd, start, end, max_line_bytes)
    return [(off, long.reason, long.head) for off, long in lead], data, pos
