"""Reading a spool file: the header, line-aligned spans (pread), and the rows of a span.

Owns the byte-level truth of a row (its exact file offset and its bytes) and the rule for
what a bad row is. Must never scan a whole file up front, hold more than one span's bytes
(nor a line longer than max_line_bytes), or silently drop a line: every line of a span is
yielded, and a bad one raises BadRow.
"""
from __future__ import annotations

import csv
import errno
import mmap
import operator
import os
from collections.abc import Iterator
from itertools import accumulate, chain, count

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
        rest = csv_cfg.data_columns == ("*",)
        data: list[tuple[str, int]] = []
        for c in () if rest else csv_cfg.data_columns:
            if not (c.isascii() and c.isdigit()):
                raise InputError(f"data columns must be column numbers without a header, "
                                 f"got {c!r}")
            data.append((str(int(c)), int(c)))
        return CsvLayout(delimiter=delim.encode(), ncols=0, id_index=int(id_col),
                         msg_index=int(msg_col) if msg_col else -1,
                         max_id_length=csv_cfg.max_id_length,
                         max_line_bytes=csv_cfg.max_line_bytes, data_columns=tuple(data),
                         data_rest=rest)
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
    id_index = names.index(csv_cfg.id_column)
    return CsvLayout(delimiter=delim.encode(), ncols=len(names), id_index=id_index,
                     msg_index=msg_index, max_id_length=csv_cfg.max_id_length,
                     max_line_bytes=csv_cfg.max_line_bytes,
                     data_columns=_data_columns(names, csv_cfg.data_columns, id_index, msg_index))


def _data_columns(names: list[str], wanted: tuple[str, ...], id_index: int,
                  msg_index: int) -> tuple[tuple[str, int], ...]:
    """(name, index) of each column for data.fields; InputError naming a missing column."""
    listing = ", ".join(names)
    if wanted == ("*",):
        picked = [(n, i) for i, n in enumerate(names) if i not in (id_index, msg_index)]
    else:
        for n in wanted:
            if n not in names:
                raise InputError(f"no {n!r} column for [csv] data_columns in header "
                                 f"(columns: {listing})")
        picked = [(n, names.index(n)) for n in wanted]
    for n, _ in picked:
        if names.count(n) > 1:
            # Both cannot be keys of data.fields; sending either would hide the other.
            raise InputError(f"column {n!r} of [csv] data_columns appears {names.count(n)} "
                             f"times in header (columns: {listing})")
    return tuple(picked)


def plan(buf: Buffer, start: int, chunk_bytes: int,
         max_line_bytes: int = CsvConfig.max_line_bytes) -> Iterator[tuple[int, int]]:
    """Lazily yield line-aligned (start, end) spans covering [start, len(buf)) exactly.

    Every span is at most chunk_bytes + max_line_bytes long, or is one single line longer
    than max_line_bytes (read_rows rejects it without holding it). max_line_bytes 0:
    unbounded, the plan of jobs claimed before the bound existed (their WALs name its spans).
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    size = len(buf)
    pos = start
    while pos < size:
        # Searching from pos + chunk_bytes - 1 makes every span but the last at least
        # chunk_bytes long while only ever touching the bytes around each boundary.
        b = pos + chunk_bytes - 1
        if not max_line_bytes:
            nl = buf.find(b"\n", b)
        else:
            nl = buf.find(b"\n", b, b + max_line_bytes + 1)
            if nl < 0 and b + max_line_bytes + 1 < size:
                # No newline within max_line_bytes of b: the line holding byte b is too
                # long. Cut before it, and make it a span of its own.
                line = max(pos, buf.rfind(b"\n", pos, b) + 1)
                if line > pos:
                    yield pos, line
                nl = buf.find(b"\n", b + max_line_bytes + 1)
                pos, end = line, (size if nl < 0 else nl + 1)
                yield pos, end
                pos = end
                continue
        end = size if nl < 0 else nl + 1
        yield pos, end
        pos = end


class FileView:
    """`len()`, `find()` and `rfind()` of b"\\n" over an open file with pread, for plan().

    The supervisor plans over this rather than an mmap: a file truncated under it
    then gives a short read, never a SIGBUS, and no page of the file stays resident.
    """

    BLOCK = 64 * 1024  # the first read: a boundary's newline is usually within a few bytes
    MAX_BLOCK = 1 << 20  # reads grow to this through a long line

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    def __len__(self) -> int:
        return self.size

    def find(self, sub: bytes, pos: int, end: int | None = None) -> int:
        end = self.size if end is None else min(end, self.size)
        block = self.BLOCK
        while pos < end:
            data = os.pread(self.fd, min(block, end - pos), pos)
            if not data:
                return -1  # truncated since we looked: the caller's span ends at size
            i = data.find(sub)
            if i >= 0:
                return pos + i
            pos += len(data)
            block = min(block * 2, self.MAX_BLOCK)
        return -1

    def rfind(self, sub: bytes, start: int, end: int) -> int:
        """The last `sub` (one byte) in [start, end), or -1."""
        while end > start:
            n = min(self.BLOCK, end - start)
            data = os.pread(self.fd, n, end - n)
            i = data.rfind(sub)
            if i >= 0:
                return end - n + i
            end -= n
        return -1


def read_span(fd: int, start: int, end: int) -> bytes:
    """The bytes of [start, end) with pread; OSError if the file is shorter now."""
    data = os.pread(fd, end - start, start)
    if len(data) < end - start:
        raise OSError(errno.EINVAL, f"file ends at {start + len(data)}, before the planned "
                                    f"span [{start}, {end}) (truncated while in use?)")
    return data


def rows(buf: Buffer, base: int, start: int, end: int,
         max_line_bytes: int = 0) -> Iterator[tuple[int, bytes | LongLine]]:
    """Yield (file offset of the line, line without its \\n or \\r\\n) for every line in [start, end).

    With max_line_bytes, a longer line comes as a LongLine (its first bytes and length).
    """
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
        out = [ln[:-1] if ln[-1:] == b"\r" else ln for ln in lines]
    else:
        out = lines
        if lines and lines[-1][-1:] == b"\r" and not data.endswith(sep):
            lines[-1] = lines[-1][:-1]  # a last line "...\r" at EOF with no \n
    if max_line_bytes and len(data) > max_line_bytes and max(map(len, out)) > max_line_bytes:
        # A new list: `offsets` still reads the lengths of the real lines.
        out = [LongLine(ln[:LongLine.HEAD], len(ln), max_line_bytes)
               if len(ln) > max_line_bytes else ln for ln in out]
    return zip(offsets, out)


class LongLine:
    """A line longer than max_line_bytes, in place of its bytes: its first HEAD bytes
    (for rejects/<job>.jsonl) and its length.

    parse() starts by decoding a line; decoding this raises its BadRow, so a long line
    is rejected like any other bad row and the hot path checks nothing extra per row.
    """

    __slots__ = ("head", "length", "limit")
    HEAD = 1024

    def __init__(self, head: bytes, length: int, limit: int) -> None:
        self.head = head
        self.length = length
        self.limit = limit

    @property
    def reason(self) -> str:
        return f"line too long: {self.length} bytes > max_line_bytes {self.limit}"

    def decode(self, *_: object) -> str:
        raise BadRow(self.reason)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: slice) -> bytes:
        return self.head[index]

    def __repr__(self) -> str:
        return f"LongLine({self.head[:16]!r}..., {self.length})"


def read_rows(fd: int, start: int, end: int,
              max_line_bytes: int = 0) -> Iterator[tuple[int, bytes | LongLine]]:
    """The rows of the span [start, end) of an open file, as rows() gives them.

    Reads everything before it returns (a file truncated under us raises OSError
    here, not in the middle of the rows); see read_span_rows for a long first line.
    """
    lead, data, pos = read_span_rows(fd, start, end, max_line_bytes)
    if not data:
        return iter(lead)
    tail = rows(data, pos, pos, end, max_line_bytes)
    return chain(lead, tail) if lead else tail


def read_span_rows(fd: int, start: int, end: int,
                   max_line_bytes: int = 0) -> tuple[list[tuple[int, LongLine]], bytes, int]:
    """The span [start, end) as (the row of a first line longer than max_line_bytes, the
    bytes after it, their file offset); OSError if the file is shorter than the span.

    Such a line is scanned for its end in blocks, never held: with plan()'s spans
    nothing else can be that long, so memory stays within chunk_bytes + max_line_bytes.
    """
    probe = max_line_bytes + 2  # more than a line of max_line_bytes and its \r\n
    if max_line_bytes and end - start > probe:
        head = read_span(fd, start, min(end, start + max(probe, LongLine.HEAD)))
        if b"\n" not in head[:probe]:
            nl = _find_strict(fd, b"\n", start + probe, end)
            stop = end if nl < 0 else nl
            length = stop - start - (read_span(fd, stop - 1, stop) == b"\r")
            long = LongLine(head[:min(LongLine.HEAD, length)], length, max_line_bytes)
            pos = end if nl < 0 else nl + 1
            return [(start, long)], read_span(fd, pos, end) if pos < end else b"", pos
    return [], read_span(fd, start, end), start


def _find_strict(fd: int, sub: bytes, pos: int, end: int) -> int:
    """find() over [pos, end) that raises OSError when the file ends before `end`."""
    while pos < end:
        data = read_span(fd, pos, min(end, pos + FileView.MAX_BLOCK))
        i = data.find(sub)
        if i >= 0:
            return pos + i
        pos += len(data)
    return -1


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


def parse(line: bytes | LongLine, layout: CsvLayout) -> tuple[str, str | None]:
    """(user_id, message from the message column or None); raises BadRow with the reason."""
    if not line:
        raise BadRow("empty line")
    try:
        text = line.decode("utf-8")  # a LongLine raises its BadRow here
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


def parse_fields(line: bytes | LongLine,
                 layout: CsvLayout) -> tuple[str, str | None, dict[str, str]]:
    """parse() and the row's data.fields (column name -> value as in the file, unquoted,
    not stripped); for layouts with data columns only, which pay for it alone."""
    uid, msg = parse(line, layout)  # every rule of a good row stays in parse()
    # parse() accepted the line: it is UTF-8 bytes (never a LongLine), its quotes balance,
    # and it filled _DELIMS. Splitting it again costs only rows that send fields.
    text = line.decode("utf-8")
    delim = _DELIMS[layout.delimiter]
    cells = text.split(delim) if '"' not in text else _split_quoted(text, delim)
    if layout.data_rest:
        skip = (layout.id_index, layout.msg_index)
        return uid, msg, {str(i): v for i, v in enumerate(cells) if i not in skip}
    try:
        return uid, msg, {name: cells[i] for name, i in layout.data_columns}
    except IndexError:  # no header (the count is not checked): the row is too short
        need = max(i for _, i in layout.data_columns) + 1
        raise BadRow(f"expected at least {need} columns, got {len(cells)}") from None
