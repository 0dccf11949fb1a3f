from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
from alertd import chunker
from alertd.chunker import (
    BOM,
    BadRow,
    FileView,
    layout_for,
    parse,
    parse_fields,
    plan,
    read_header,
    read_span,
    rows,
)
from alertd.config import CsvConfig
from alertd.errors import InputError
from alertd.protocol import CsvLayout

FILES: dict[str, bytes] = {
    "lf": b"user_id,msg\nu1,hello\nu2,world\n",
    "crlf": b"user_id,msg\r\nu1,hello\r\nu2,world\r\n",
    "bom": BOM + b"user_id,msg\nu1,a\nu2,b\n",
    "bom_crlf_no_eol": BOM + b"user_id,msg\r\nu1,a\r\nu2,b",
    "no_trailing_newline": b"user_id,msg\nu1,a\nu2,b",
    "empty": b"",
    "header_only": b"user_id,msg\n",
    "header_only_no_eol": b"user_id,msg",
    "long_line": b"user_id,msg\nu1,short\nu2," + b"x" * 300 + b"\nu3,z\n",
    "quoted": b'user_id,msg\n"u,1","say ""hi"", ok"\nu2,"a,b,c"\r\n"u3",plain\n',
    "blank_lines": b"user_id,msg\nu1,a\n\n\r\nu2,b\n\n",
    "utf8": "user_id,msg\nü1,héllo\n😀,x\n".encode(),
    "cr_only_tail": b"user_id,msg\nu1,a\r",
    "crlf_cr_tail": b"user_id,msg\r\nu1,a\r\nu2,b\r",
    "mixed_endings": b"user_id,msg\nu1,a\r\nu2,b\nu3,c\r\n",
    "lone_cr": b"user_id,msg\r\nu\r1,a\r\nu2,b\r\r\n\r\n",
}
CHUNKS = [1, 2, 7, 64, 1 << 20]


def reference_rows(data: bytes, start: int) -> list[tuple[int, bytes]]:
    """The obvious, slow split: walk the bytes, cut at every \\n."""
    out, off = [], start
    while off < len(data):
        nl = data.find(b"\n", off)
        end = len(data) if nl < 0 else nl
        line = data[off:end]
        if line.endswith(b"\r"):
            line = line[:-1]
        out.append((off, line))
        off = end + 1
    return out


@pytest.mark.parametrize("name", sorted(FILES))
@pytest.mark.parametrize("chunk_bytes", CHUNKS)
def test_spans_and_rows_cover_every_row_once(tmp_path: Path, name: str, chunk_bytes: int) -> None:
    data = FILES[name]
    path = tmp_path / "f.csv"
    path.write_bytes(data)
    _, start = read_header(data, True)
    expected = reference_rows(data, start)
    spans = list(plan(data, start, chunk_bytes))
    # Spans tile [start, len) exactly, end on a newline (or EOF), and respect the minimum size.
    pos = start
    for i, (s, e) in enumerate(spans):
        assert s == pos and e > s
        assert data[e - 1:e] == b"\n" or e == len(data)
        if i < len(spans) - 1:
            assert e - s >= chunk_bytes
        pos = e
    assert pos == max(start, len(data)) or (not spans and start >= len(data))
    got_bytes = [r for s, e in spans for r in rows(data, 0, s, e)]
    got_pread = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for s, e in plan(FileView(fd, len(data)), start, chunk_bytes):
            got_pread += list(rows(read_span(fd, s, e), s, s, e))
    finally:
        os.close(fd)
    assert got_bytes == expected
    assert got_pread == expected
    for off, line in got_bytes:  # offsets are the file offsets of each line's first byte
        assert data[off:off + len(line)] == line


def test_plan_over_mmap_is_lazy(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_bytes(b"user_id\n" + b"u\n" * 100_000)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        it = plan(mm, 8, 1000)
        assert next(it) == (8, 1008)  # a generator: only the first boundary was searched
        assert sum(e - s for s, e in it) == len(mm) - 1008


def test_read_header() -> None:
    assert read_header(BOM + b"a,b\r\nx", True) == (b"a,b", 8)
    assert read_header(b"a,b", True) == (b"a,b", 3)
    assert read_header(b"", True) == (b"", 0)
    assert read_header(BOM + b"u1\n", False) == (None, 3)
    assert read_header(b"u1\n", False) == (None, 0)


def test_read_span_and_file_view(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000  # 256,000 bytes: several FileView blocks
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, end in [(0, 10), (1, 2), (4095, 4097), (65_536 + 17, 3 * 65_536 + 5),
                           (len(data) - 3, len(data))]:
            assert read_span(fd, start, end) == data[start:end]
        view = FileView(fd, len(data))
        assert len(view) == len(data)
        for pos in (0, 11, 65_535, 200_000):
            assert view.find(b"\n", pos) == data.find(b"\n", pos)
        assert view.find(b"\n", len(data)) == -1
    finally:
        os.close(fd)


def test_a_truncated_file_gives_an_error_not_sigbus(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_bytes(b"user_id\n" + b"u1\n" * 1000)
    fd = os.open(path, os.O_RDONLY)
    try:
        view = FileView(fd, os.fstat(fd).st_size)
        os.truncate(path, 100)
        assert view.find(b"\n", 200) == -1  # the planner sees EOF, it does not crash
        with pytest.raises(OSError, match="truncated"):
            read_span(fd, 0, 200)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ layout

def test_layout_with_header() -> None:
    lay = layout_for(b'id,"user_id" , note', CsvConfig(message_column="note"))
    assert (lay.ncols, lay.id_index, lay.msg_index, lay.delimiter) == (3, 1, 2, b",")
    lay = layout_for(b"a;user_id", CsvConfig(delimiter=";"))
    assert (lay.ncols, lay.id_index, lay.msg_index, lay.delimiter) == (2, 1, -1, b";")


def test_layout_errors_name_the_column() -> None:
    with pytest.raises(InputError, match=r"no 'user_id' column in header \(columns: a, b\)"):
        layout_for(b"a,b", CsvConfig())
    with pytest.raises(InputError, match="'text'"):
        layout_for(b"user_id,b", CsvConfig(message_column="text"))
    with pytest.raises(InputError, match="header is not UTF-8 text"):
        layout_for(b"user_id,\xff\xfe", CsvConfig())
    with pytest.raises(InputError, match="binary file"):
        layout_for(b"user_id\x00\x01", CsvConfig())
    with pytest.raises(InputError, match="'user_id'"):
        layout_for(b"", CsvConfig())


def test_layout_without_header() -> None:
    lay = layout_for(None, CsvConfig(header=False))
    assert (lay.ncols, lay.id_index, lay.msg_index) == (0, 0, -1)
    lay = layout_for(None, CsvConfig(header=False, id_column="2", message_column="0"))
    assert (lay.id_index, lay.msg_index) == (2, 0)


# ------------------------------------------------------------------ parse

LAY = CsvLayout(delimiter=b",", ncols=3, id_index=1, msg_index=2, max_id_length=256)


@pytest.mark.parametrize("line, reason", [
    (b"", "empty line"),
    (b"a,u\x00,c", "NUL byte in row"),
    (b"a,\xff\xfe,c", "invalid UTF-8"),
    (b'a,"u1,c', "unbalanced quotes"),
    (b'a,u1",c', "unbalanced quotes"),
    (b'a,"u1"x,c', "bad quoting"),
    (b"a,u1", "expected 3 columns, got 2"),
    (b"a,u1,c,d", "expected 3 columns, got 4"),
    (b"a,  ,c", "missing user id"),
    (b'a,"",c', "missing user id"),
    (b"a," + b"x" * 257 + b",c", "user id longer than 256 bytes"),
    ("a," + "é" * 129 + ",c", "user id longer than 256 bytes"),  # 258 bytes, 129 chars
])
def test_parse_rejects(line: bytes | str, reason: str) -> None:
    if isinstance(line, str):
        line = line.encode()
    with pytest.raises(BadRow) as ei:
        parse(line, LAY)
    assert ei.value.reason.startswith(reason)


def test_parse_accepts() -> None:
    assert parse(b"a, u1 ,hello", LAY) == ("u1", "hello")
    assert parse(b"a," + b"x" * 256 + b",c", LAY) == ("x" * 256, "c")
    assert parse('a,ü1,héllo'.encode(), LAY) == ("ü1", "héllo")
    assert parse(b'"a,b","u,1","say ""hi"", ok"', LAY) == ("u,1", 'say "hi", ok')
    assert parse(b'a,"u1",', LAY) == ("u1", "")
    no_msg = CsvLayout(ncols=2, id_index=0)
    assert parse(b"u1,x", no_msg) == ("u1", None)


def test_parse_without_header() -> None:
    lay = layout_for(None, CsvConfig(header=False, id_column="1", message_column="2"))
    assert parse(b"x,u1,m,extra", lay) == ("u1", "m")  # column count is not checked
    with pytest.raises(BadRow, match="at least 3 columns, got 2"):
        parse(b"x,u1", lay)
    lay = layout_for(None, CsvConfig(header=False))
    assert parse(b"u9", lay) == ("u9", None)


def test_parse_other_delimiter() -> None:
    lay = layout_for(b"user_id;msg", CsvConfig(delimiter=";", message_column="msg"))
    assert parse(b"u1;a,b", lay) == ("u1", "a,b")
    assert parse(b'"u;1";"x"', lay) == ("u;1", "x")


def test_end_to_end_file(tmp_path: Path) -> None:
    """Header + layout + plan + rows + parse over a file, as a worker would."""
    data = FILES["quoted"]
    header, start = read_header(data, True)
    lay = layout_for(header, CsvConfig(message_column="msg"))
    got = [(off, parse(line, lay)) for s, e in plan(data, start, 7)
           for off, line in rows(data, 0, s, e)]
    assert [p for _, p in got] == [("u,1", 'say "hi", ok'), ("u2", "a,b,c"), ("u3", "plain")]
    assert [o for o, _ in got] == [12, 35, 47]
    assert chunker.BOM == b"\xef\xbb\xbf"


def test_read_header_refuses_a_huge_first_line() -> None:
    with pytest.raises(InputError, match="binary file"):
        read_header(b"\x01" * (chunker.MAX_HEADER + 10), True)


# ------------------------------------------------------------------ data.fields ([csv] data_columns)

HEAD = b'user_id,"city", plan ,message,note'


def test_layout_names_the_data_columns_in_config_order() -> None:
    lay = layout_for(HEAD, CsvConfig(message_column="message", data_columns=("note", "city")))
    assert lay.data_columns == (("note", 4), ("city", 1)) and not lay.data_rest
    assert lay.has_fields
    # "*": every column but the id and message ones, in file order.
    lay = layout_for(HEAD, CsvConfig(message_column="message", data_columns=("*",)))
    assert lay.data_columns == (("city", 1), ("plan", 2), ("note", 4))
    lay = layout_for(HEAD, CsvConfig(data_columns=("*",)))  # no message column: it is a field
    assert [n for n, _ in lay.data_columns] == ["city", "plan", "message", "note"]
    # Named explicitly, even the id column may be sent as a field (unstripped).
    lay = layout_for(HEAD, CsvConfig(data_columns=("user_id",)))
    assert lay.data_columns == (("user_id", 0),)
    assert parse_fields(b" u1 ,a,b,c,d", lay) == ("u1", None, {"user_id": " u1 "})


def test_no_data_columns_is_the_layout_of_before() -> None:
    for cfg in (CsvConfig(), CsvConfig(data_columns=())):
        lay = layout_for(HEAD, cfg)
        assert lay == CsvLayout(ncols=5, id_index=0) and not lay.has_fields
    lay = layout_for(b"user_id,message", CsvConfig(message_column="message", data_columns=("*",)))
    assert lay.data_columns == () and not lay.has_fields  # nothing else to send: no key


def test_a_missing_data_column_fails_the_file_naming_it() -> None:
    with pytest.raises(InputError, match=r"no 'country' column for \[csv\] data_columns in "
                                         r"header \(columns: user_id, city, plan, message, note\)"):
        layout_for(HEAD, CsvConfig(data_columns=("city", "country")))
    with pytest.raises(InputError, match="'City'"):  # names are case-sensitive, like id_column
        layout_for(HEAD, CsvConfig(data_columns=("City",)))


def test_a_duplicated_data_column_name_fails_the_file() -> None:
    with pytest.raises(InputError, match=r"column 'a' of \[csv\] data_columns appears 2 times"):
        layout_for(b"user_id,a,b,a", CsvConfig(data_columns=("a",)))
    with pytest.raises(InputError, match="'a'"):
        layout_for(b"user_id,a,b,a", CsvConfig(data_columns=("*",)))
    # A duplicate that is not sent does not matter (as before data_columns).
    assert layout_for(b"user_id,a,b,a", CsvConfig(data_columns=("b",))).data_columns == (("b", 2),)


def test_parse_fields_values_as_in_the_file() -> None:
    lay = layout_for(HEAD, CsvConfig(message_column="message", data_columns=("*",)))
    line = b' u1 ,"Z\xc3\xbcrich, CH"," pro ",hi,"say ""hi"""'
    assert parse_fields(line, lay) == ("u1", "hi", {"city": "Zürich, CH", "plan": " pro ",
                                                    "note": 'say "hi"'})
    assert parse_fields(b"u1,,,,", lay) == ("u1", "", {"city": "", "plan": "", "note": ""})
    # The same id and message as parse() gives.
    assert parse_fields(line, lay)[:2] == parse(line, lay)


@pytest.mark.parametrize("line, reason", [
    (b"u1,a,b,c", "expected 5 columns, got 4"),
    (b"u1,a,b,c,d,e", "expected 5 columns, got 6"),
    (b' ,a,b,c,d', "missing user id"),
    (b'u1,"a,b,c,d', "unbalanced quotes"),
    (b'u1,"a"x,b,c,d', "bad quoting"),
    (b"u1,\xff,b,c,d", "invalid UTF-8"),
    (b"u1,\x00,b,c,d", "NUL byte in row"),
    (b"", "empty line"),
])
def test_parse_fields_rejects_what_parse_rejects(line: bytes, reason: str) -> None:
    lay = layout_for(HEAD, CsvConfig(data_columns=("city", "note")))
    for f in (parse, parse_fields):
        with pytest.raises(BadRow) as ei:
            f(line, lay)
        assert ei.value.reason.startswith(reason)


def test_parse_fields_rejects_a_long_line() -> None:
    lay = layout_for(HEAD, CsvConfig(data_columns=("city",), max_line_bytes=10))
    [(_, long)] = list(rows(b"u1," + b"x" * 50 + b",b,c,d\n", 0, 0, 60, 10))
    with pytest.raises(BadRow, match="line too long"):
        parse_fields(long, lay)


def test_data_columns_by_number_without_a_header() -> None:
    cfg = CsvConfig(header=False, id_column="1", message_column="0", data_columns=("3", "2"))
    lay = layout_for(None, cfg)
    assert lay.data_columns == (("3", 3), ("2", 2))
    assert parse_fields(b'm,u1,"two, 2",three,extra', lay) == \
        ("u1", "m", {"3": "three", "2": "two, 2"})
    # The count is not checked without a header, but a data column the row lacks is.
    with pytest.raises(BadRow, match="expected at least 4 columns, got 3"):
        parse_fields(b"m,u1,two", lay)
    with pytest.raises(BadRow, match="expected at least 2 columns, got 1"):
        parse_fields(b"m", lay)
    with pytest.raises(InputError, match="column numbers without a header, got 'city'"):
        layout_for(None, CsvConfig(header=False, data_columns=("city",)))


def test_star_without_a_header_sends_every_other_column_of_the_row() -> None:
    lay = layout_for(None, CsvConfig(header=False, id_column="1", message_column="3",
                                     data_columns=("*",)))
    assert lay.data_rest and lay.data_columns == () and lay.has_fields
    assert parse_fields(b"a,u1,b,m,c", lay) == ("u1", "m", {"0": "a", "2": "b", "4": "c"})
    assert parse_fields(b"a,u1,b,m", lay) == ("u1", "m", {"0": "a", "2": "b"})
    lay = layout_for(None, CsvConfig(header=False, data_columns=("*",)))
    assert parse_fields(b"u1", lay) == ("u1", None, {})
