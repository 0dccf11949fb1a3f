"""Coverage-guided fuzzing of the chunker and row parser with atheris (not part of make test).

Checks on any input the same invariants as tests/test_chunker_props.py: the spans of plan()
tile the data and end on a line; read_rows() gives every line start exactly once, a line
longer than max_line_bytes as a LongLine with its true length; parse() either returns a
stripped, non-empty user id or raises BadRow, nothing else.

Run it (atheris ships manylinux wheels, so no compiler is needed):

    .venv/bin/pip install atheris==3.0.0
    .venv/bin/python bench/fuzz_chunker.py -max_total_time=600 -rss_limit_mb=2048 var/fuzz-corpus

libFuzzer flags go after the script name; the optional directory keeps the corpus between
runs (create it first). A crash prints the input and writes crash-<sha1> in the current
directory; replay one with `.venv/bin/python bench/fuzz_chunker.py crash-<sha1>`.
"""
from __future__ import annotations

import os
import sys

import atheris

with atheris.instrument_imports():
    from alertd import chunker
    from alertd.protocol import CsvLayout


def _reference(data: bytes, start: int) -> list[tuple[int, bytes]]:
    out, off = [], start
    while off < len(data):
        nl = data.find(b"\n", off)
        end = len(data) if nl < 0 else nl
        line = data[off:end]
        out.append((off, line[:-1] if line.endswith(b"\r") else line))
        off = end + 1
    return out


def test_one_input(raw: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(raw)
    chunk_bytes = fdp.ConsumeIntInRange(1, 200)
    max_line = fdp.ConsumeIntInRange(0, 300)
    header = fdp.ConsumeBool()
    ncols = fdp.ConsumeIntInRange(0, 5)
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    _, start = chunker.read_header(data, header)
    fd = os.memfd_create("fuzz")
    try:
        os.write(fd, data)
        spans = list(chunker.plan(chunker.FileView(fd, len(data)), start, chunk_bytes, max_line))
        assert spans == list(chunker.plan(data, start, chunk_bytes, max_line))
        pos = start
        for s, e in spans:
            assert s == pos < e and (data[e - 1:e] == b"\n" or e == len(data))
            assert not max_line or e - s <= chunk_bytes + max_line or b"\n" not in data[s:e - 1]
            pos = e
        got = [r for s, e in spans for r in chunker.read_rows(fd, s, e, max_line)]
    finally:
        os.close(fd)
    want = _reference(data, start)
    assert [o for o, _ in got] == [o for o, _ in want]
    lay = CsvLayout(ncols=ncols, id_index=0, msg_index=1 if ncols != 1 else -1)
    for (_, line), (_, ref) in zip(got, want):
        if max_line and len(ref) > max_line:
            assert isinstance(line, chunker.LongLine) and line.length == len(ref)
        else:
            assert line == ref
        try:
            uid, _ = chunker.parse(line, lay)
        except chunker.BadRow:
            continue
        assert uid and uid == uid.strip()


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
