"""Reading a spool file: the header, line-aligned spans (pread), and the rows of a span.

Owns the byte-level truth of a row (its exact file offset and its bytes) and the rule for
what a bad row is. Must never scan a whole file up front, hold more than one span's bytes,
or silently drop a line: every line of a span is yielded, and a bad one raises BadRow.
"""
from __future__ import annotations

import csv
import errno
import mmap
import operator
import os
from collections.abc import Iterator
from itertools import accumulate, count

from .config import CsvConfig
from .errors import InputError
from .protocol import CsvLayout

BOM = b"\xef\xbb\xbf"
MAX_HEADER = 1 << 20

Buffer = bytes | bytearray | memoryview | mmap.mmap


def read_header(buf: Buffer, header: bool) -> tuple[bytes | None, int]:
    """(header line without BOM/EOL, or None when header=False; offset of the first data byte)."""
    start = len(BOM) if buf[:len(BOM)] == BOM else 0
    if not header:
        return None, start
    nl = buf.find(b"\n", start, start + MAX_HEADER)
    if nl < 0 and len(buf) - start > MAX_HEADER:
        # Never copy a 2 GB newline-free (binary) file to look at its "header".
        raise InputError(f"header line longer than {MAX_HEADER} bytes (binary file?)")
    if nl < 0:  # header-only file without a newline, or an empty file
        line, start = bytes(buf[start:]), len(buf)
    else:
        line, start = bytes(buf[start:nl]), nl + 1
    if line.endswith(b"\r"):
        line = line[:-1]
    return line, start


def _column_names(header_line: bytes, delimiter: str) -> list[str]:
    if b"\0" in header_line:
        raise InputError("binary file")
    try:
        text = header_line.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("header is not UTF-8 text") from None
    # Lenient on purpose: a header like `id, "user_id" ` names its columns well enough.
    try:
        fields = next(csv.reader([text], delimiter=delimiter), [])
    except csv.Error as e:
        raise InputError(f"header is not valid CSV: {e}") from None
    return [f.strip().strip('"').strip() for f in fields]


def layout_for(header_line: bytes | None, csv_cfg: CsvConfig) -> CsvLayout:
    """Resolve the id/message column indexes for a job; raises InputError naming the column."""
    delim = csv_cfg.delimiter
    if header_line is None:
        id_col = "0" if csv_cfg.id_column == "user_id" else csv_cfg.id_column
        if not id_col.isdigit():
            raise InputError(f"id column must be a column number without a header, got {id_col!r}")
        msg_col = csv_cfg.message_column
        if msg_col and not msg_col.isdigit():
            raise InputError(f"message column must be a column number without a header, "
                             f"got {msg_col!r}")
        return CsvLayout(delimiter=delim.encode(), ncols=0, id_index=int(id_col),
                         msg_index=int(msg_col) if msg_col else -1,
                         max_id_length=csv_cfg.max_id_length)
    if not header_line.strip():
        raise InputError(f"no {csv_cfg.id_column!r} column: the header line is empty")
    names = _column_names(header_line, delim)
    listing = ", ".join(names)
    if csv_cfg.id_column not in names:
        raise InputError(f"no {csv_cfg.id_column!r} column in header (columns: {listing})")
    msg_index = -1
    if csv_cfg.message_column:
        if csv_cfg.message_column not in names:
            raise InputError(f"no {csv_cfg.message_column!r} message column in header "
                             f"(columns: {listing})")
        msg_index = names.index(csv_cfg.message_column)
    return CsvLayout(delimiter=delim.encode(), ncols=len(names),
                     id_index=names.index(csv_cfg.id_column), msg_index=msg_index,
                     max_id_length=csv_cfg.max_id_length)


def plan(buf: Buffer, start: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Lazily yield line-aligned (start, end) spans covering [start, len(buf)) exactly."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    size = len(buf)
    pos = start
    while pos < size:
        # Searching from pos + chunk_bytes - 1 makes every span but the last at least
        # chunk_bytes long while only ever touching the bytes around each boundary.
        nl = buf.find(b"\n", pos + chunk_bytes - 1)
        end = size if nl < 0 else nl + 1
        yield pos, end
        pos = end


class FileView:
    """`len()` and `find(b"\n", pos)` over an open file with pread, for plan().

    The supervisor plans over this rather than an mmap: a file truncated under it
    then gives a short read, never a SIGBUS, and no page of the file stays resident.
    """

    BLOCK = 64 * 1024

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    def __len__(self) -> int:
        return self.size

    def find(self, sub: bytes, pos: int) -> int:
        while pos < self.size:
            block = os.pread(self.fd, min(self.BLOCK, self.size - pos), pos)
            if not block:
                return -1  # truncated since we looked: the caller's span ends at size
            i = block.find(sub)
            if i >= 0:
                return pos + i
            pos += len(block)
        return -1


def read_span(fd: int, start: int, end: int) -> bytes:
    """The bytes of [start, end) with pread; OSError if the file is shorter now."""
    data = os.pread(fd, end - start, start)
    if len(data) < end - start:
        raise OSError(errno.EINVAL, f"file ends at {start + len(data)}, before the planned "
                                    f"span [{start}, {end}) (truncated while in use?)")
    return data


def rows(buf: Buffer, base: int, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """Yield (file offset of the line, line without its \\n or \\r\\n) for every line in [start, end)."""
    # One copy of the span, a C-level split and C-level offset sums (no Python frame per
    # row) cost about a third of find()/slice over the mmap; the copy is one span, not the file.
    data = bytes(buf[start - base:end - base])
    if data.count(b"\r\n") == data.count(b"\n") > 0:
        sep, step = b"\r\n", 2  # a CRLF file: the split strips the \r too
    else:
        sep, step = b"\n", 1
    lines = data.split(sep)
    if data.endswith(sep):
        lines.pop()  # the split's empty tail after the last newline is not a line
    offsets = map(operator.add, accumulate(map(len, lines), initial=start), count(0, step))
    # `offsets` reads the unstripped `lines` lazily; line i's offset never depends on line i.
    if step == 1 and data.find(b"\r") >= 0:
        return zip(offsets, [ln[:-1] if ln[-1:] == b"\r" else ln for ln in lines])
    if lines and lines[-1][-1:] == b"\r" and not data.endswith(sep):
        lines[-1] = lines[-1][:-1]  # a last line "...\r" at EOF with no \n
    return zip(offsets, lines)


class BadRow(Exception):
    """A row that cannot be sent; `reason` goes to rejects/<job>.jsonl."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_DELIMS: dict[bytes, str] = {}


def _split_quoted(text: str, delim: str) -> list[str]:
    # An odd number of quotes can never be valid RFC 4180 on one line, whatever csv
    # would make of it (it reads a stray quote in an unquoted field literally).
    if text.count('"') % 2:
        raise BadRow("unbalanced quotes")
    try:
        return next(csv.reader([text], delimiter=delim, strict=True))
    except csv.Error as e:
        raise BadRow(f"bad quoting: {e}") from None


def parse(line: bytes, layout: CsvLayout) -> tuple[str, str | None]:
    """(user_id, message from the message column or None); raises BadRow with the reason."""
    if not line:
        raise BadRow("empty line")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRow("invalid UTF-8") from None
    # Checked on the str: `b"\0" in bytes` costs ten times `"\0" in str` on CPython 3.11.
    if "\0" in text:
        raise BadRow("NUL byte in row")
    try:
        delim = _DELIMS[layout.delimiter]
    except KeyError:
        delim = _DELIMS[layout.delimiter] = layout.delimiter.decode()
    fields = text.split(delim) if '"' not in text else _split_quoted(text, delim)
    n = len(fields)
    if layout.ncols:
        if n != layout.ncols:
            raise BadRow(f"expected {layout.ncols} columns, got {n}")
    elif n <= layout.id_index or n <= layout.msg_index:
        need = max(layout.id_index, layout.msg_index) + 1
        raise BadRow(f"expected at least {need} columns, got {n}")
    uid = fields[layout.id_index].strip()
    if not uid:
        raise BadRow("missing user id")
    size = len(uid) if uid.isascii() else len(uid.encode())
    if size > layout.max_id_length:
        raise BadRow(f"user id longer than {layout.max_id_length} bytes")
    return uid, (fields[layout.msg_index] if layout.msg_index >= 0 else None)
