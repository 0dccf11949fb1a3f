"""Properties of the chunker and the row parser, over random files and random chunk sizes.

Hypothesis makes the files: delimiters, quotes, CR/LF and CRLF, BOM, empty and long
lines, invalid UTF-8, NULs. Kept to a few seconds (max_examples below).
"""
from __future__ import annotations

import csv
import io
import os

from alertd.chunker import BOM, BadRow, FileView, LongLine, parse, plan, read_header, read_rows, rows
from alertd.protocol import CsvLayout
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_chunker import reference_rows

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FRAGMENTS = st.sampled_from([b"a", b"u1", b",", b";", b'"', b" ", b"\r", b"\xff", b"\xc3\xa9",
                             b"\x00", b"x" * 40, BOM, b"\t"])
SHORT_LINE = st.lists(FRAGMENTS, max_size=10).map(b"".join)
LONG_LINE = st.integers(60, 2500).map(lambda n: b"y" * n)


@st.composite
def files(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.one_of(SHORT_LINE, SHORT_LINE, LONG_LINE), max_size=30))
    style = draw(st.sampled_from(["lf", "crlf", "mixed"]))
    out = [BOM] if draw(st.booleans()) else []
    for i, ln in enumerate(lines):
        out.append(ln)
        last = i == len(lines) - 1
        if not last or draw(st.booleans()):
            crlf = style == "crlf" or (style == "mixed" and draw(st.booleans()))
            out.append(b"\r\n" if crlf else b"\n")
    return b"".join(out)


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("chunker-props")
    os.write(fd, data)
    return fd


@SETTINGS
@given(data=files(), header=st.booleans(), chunk_bytes=st.integers(1, 90),
       max_line=st.sampled_from([0, 1, 7, 50, 64, 100, 1000]))
def test_every_row_offset_exactly_once_across_the_plan(data: bytes, header: bool, chunk_bytes: int,
                                                       max_line: int) -> None:
    _, start = read_header(data, header)
    expected = reference_rows(data, start)
    fd = _memfd(data)
    try:
        spans = list(plan(FileView(fd, len(data)), start, chunk_bytes, max_line))
        assert spans == list(plan(data, start, chunk_bytes, max_line))  # pread = in memory
        pos = start
        for s, e in spans:  # the spans tile [start, size), each ends a line
            assert s == pos and e > s
            assert data[e - 1:e] == b"\n" or e == len(data)
            inner = data[s:e - 1]
            # bounded, or one single line (which read_rows skips without holding it)
            assert not max_line or e - s <= chunk_bytes + max_line or b"\n" not in inner
            pos = e
        assert pos == max(start, len(data))
        got = [r for s, e in spans for r in read_rows(fd, s, e, max_line)]
        in_memory = [r for s, e in spans for r in rows(data, 0, s, e, max_line)]
    finally:
        os.close(fd)
    assert [o for o, _ in got] == [o for o, _ in expected]
    assert [o for o, _ in in_memory] == [o for o, _ in expected]
    for (off, line), (_, want) in zip(got, expected):
        if max_line and len(want) > max_line:
            assert isinstance(line, LongLine), (off, line)
            assert (line.length, line.head) == (len(want), want[:LongLine.HEAD])
            assert line.reason == f"line too long: {len(want)} bytes > max_line_bytes {max_line}"
        else:
            assert line == want
    for (_, a), (_, b) in zip(got, in_memory):
        assert type(a) is type(b) and len(a) == len(b)


TEXT = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n\x00"),
               max_size=12)
DELIMS = st.sampled_from([",", ";", "\t", "|"])


@settings(max_examples=500, deadline=None)
@given(fields=st.lists(st.one_of(TEXT, st.sampled_from(['"', '""', ' a ', ',', ';', ''])),
                       min_size=1, max_size=6),
       delim=DELIMS, quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]),
       data=st.data())
def test_a_valid_one_line_rfc4180_row_parses_as_the_csv_module_does(
        fields: list[str], delim: str, quoting: int, data: st.DataObject) -> None:
    buf = io.StringIO()
    csv.writer(buf, delimiter=delim, quoting=quoting, lineterminator="\n").writerow(fields)
    line = buf.getvalue()[:-1]
    [want] = list(csv.reader([line], delimiter=delim))
    id_index = data.draw(st.integers(0, len(want) - 1))
    msg_index = data.draw(st.integers(-1, len(want) - 1))
    lay = CsvLayout(delimiter=delim.encode(), ncols=len(want), id_index=id_index,
                    msg_index=msg_index, max_id_length=20)
    uid = want[id_index].strip()
    try:
        got = parse(line.encode(), lay)
    except BadRow as e:
        assert not uid or len(uid.encode()) > 20 or not line, (line, e.reason)
        return
    assert got == (uid, want[msg_index] if msg_index >= 0 else None)


@settings(max_examples=500, deadline=None)
@given(line=st.one_of(SHORT_LINE, st.binary(max_size=80)), ncols=st.integers(0, 4))
def test_any_line_parses_or_is_a_bad_row(line: bytes, ncols: int) -> None:
    lay = CsvLayout(ncols=ncols, id_index=0, msg_index=1 if ncols != 1 else -1)
    try:
        uid, _ = parse(line, lay)
    except BadRow as e:
        assert e.reason
    else:
        assert uid and uid == uid.strip() and "\x00" not in uid


def test_a_long_line_is_a_bad_row_with_its_length() -> None:
    long = LongLine(b"u1,xxxx", 1 << 30, 65536)
    try:
        parse(long, CsvLayout())
    except BadRow as e:
        assert e.reason == "line too long: 1073741824 bytes > max_line_bytes 65536"
    else:
        raise AssertionError("a LongLine parsed")
    assert long[:3] == b"u1," and len(long) == 1 << 30
