"""rowpath: the compiled row path gives the reference's bytes (requests, rejects, WAL
records) for any rows, and the reference is today's framing, signature and records."""
from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import time

import orjson
import pytest
from alertd import chunker, rowpath, wal
from alertd.payload import Payloads
from alertd.protocol import CsvLayout
from alertd.rowpath import _fast as fast  # make install builds it: a missing build fails here
from alertd.rowpath import pure, request_head
from alertd.transport import Pool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook

HEAD = request_head("http://127.0.0.1:9/hook?k=v", [("Authorization", "Bearer t")])
NOW = 1795500000.123456

# Cells from the corners of the rules: quotes, delimiters, CR, Unicode spaces around ids,
# non-BMP, JSON escapes, NUL, bytes that are not UTF-8 (overlong, surrogate, past U+10FFFF,
# truncated).
CELL_TEXT = st.text(st.sampled_from('ab1 _-.:;,|\t"\'\\/\r\x01\x1c\x1f\x7féü€😀\u00a0\u2003\u2028'),
                    max_size=12)
BAD = st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82",
                       b"\x80", b"\x00", b"\xef\xbb\xbf", b"\xf0\x9f\x98"])
SAFE = st.characters(blacklist_categories=("Cs",))


@st.composite
def cells(draw: st.DrawFn, delim: str) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(BAD) + draw(CELL_TEXT).encode()
    text = draw(CELL_TEXT)
    if kind == 1:  # a well-formed quoted cell (the csv path)
        return ('"' + text.replace('"', '""') + '"').encode()
    if kind == 2:
        return ("x" * draw(st.integers(20, 80))).encode()  # long ids and long lines
    if kind < 6:
        text = text.replace('"', "")  # mostly unquoted rows: the compiled fast path
    return text.replace(delim, "").encode() if kind < 8 else text.encode()


@st.composite
def spans(draw: st.DrawFn) -> tuple[bytes, CsvLayout]:
    delim = draw(st.sampled_from([",", ";", "|", "\t"]))
    header = draw(st.booleans())
    ncols = draw(st.integers(1, 4))
    id_index = draw(st.integers(0, ncols - 1))
    msg_index = draw(st.sampled_from([-1] + list(range(ncols))))
    rest = False
    data_columns: tuple[tuple[str, int], ...] = ()
    pick = draw(st.integers(0, 3))
    if pick == 1:  # named columns, possibly past a short row's end without a header
        idx = draw(st.lists(st.integers(0, ncols + 1), max_size=3))
        names = [draw(st.sampled_from(["city", "plan", "é\"x", "3"])) for _ in idx]
        data_columns = tuple(zip(names, idx))  # duplicate names: the dict keeps one
    elif pick == 2 and not header:
        rest = True
    layout = CsvLayout(delimiter=delim.encode(), ncols=ncols if header else 0,
                       id_index=id_index, msg_index=msg_index,
                       max_id_length=draw(st.sampled_from([8, 40, 256])),
                       max_line_bytes=draw(st.sampled_from([0, 24, 60, 65536])),
                       data_columns=data_columns, data_rest=rest)
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        n = draw(st.sampled_from([ncols, ncols, ncols, ncols - 1, ncols + 1, 1, 0]))
        row = delim.encode().join(draw(cells(delim)) for _ in range(max(0, n)))
        lines.append(row)
    crlf = draw(st.sampled_from(["lf", "crlf", "mixed"]))
    out = b""
    for ln in lines:
        eol = {"lf": b"\n", "crlf": b"\r\n"}.get(crlf) or draw(st.sampled_from([b"\n", b"\r\n"]))
        out += ln + eol
    if out and draw(st.booleans()):  # no newline at the end of the file
        out = out[:-1]
    return out, layout


def _secret(key: bytes) -> str:
    return "whsec_" + base64.b64encode(key).decode()


def _starts(data: bytes, base: int) -> list[int]:
    return [base] + [base + i + 1 for i, c in enumerate(data) if c == 10]


def _batches(impl: object, data: bytes, base: int, layout: CsvLayout, name: str, secrets: list[str],
             message: str, now: float, sizes: list[int], done: frozenset[int]) -> list[tuple]:
    req = impl.Requests(HEAD, secrets, message)
    rb = impl.RowBatcher(data, base, layout, "j000042", name, done)
    out = []
    for n in sizes:
        b = rb.next(req, now, n)
        out.append((b.offsets, b.uids, b.msgs, b.fields, b.requests, b.rejects, rb.exhausted))
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(span=spans(), base=st.integers(0, 10**12), name=st.text(SAFE, max_size=20),
       keys=st.lists(st.binary(min_size=1, max_size=100), max_size=3),
       message=st.text(SAFE, max_size=10), now=st.floats(0, 4e9),
       sizes=st.lists(st.integers(0, 5), min_size=1, max_size=6), skip=st.data())
def test_compiled_rows_match_the_reference(span: tuple[bytes, CsvLayout], base: int, name: str,
                                           keys: list[bytes], message: str, now: float,
                                           sizes: list[int], skip: st.DataObject) -> None:
    data, layout = span
    done = frozenset(skip.draw(st.lists(st.sampled_from(_starts(data, base)), max_size=2)))
    secrets = [_secret(k) for k in keys]
    sizes = sizes + [10**6]  # always read to the end
    want = _batches(pure, data, base, layout, name, secrets, message, now, sizes, done)
    assert _batches(fast, data, base, layout, name, secrets, message, now, sizes, done) == want
    assert want[-1][-1] is True


OUTCOMES = st.sampled_from(["delivered", "dead", "rejected", "cancelled", "unknown"])


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 2**62), OUTCOMES, st.integers(0, 599),
                               st.integers(0, 100), st.booleans(), st.text(SAFE, max_size=30),
                               st.none() | st.text(SAFE, max_size=30)), max_size=8),
       ck=st.integers(0, 10**6), ts=st.floats(0, 4e9) | st.integers(0, 2**31),
       job=st.text(SAFE, max_size=10))
def test_compiled_wal_records_match_the_reference(rows: list[tuple], ck: int, ts: float,
                                                  job: str) -> None:
    want = pure.encode_wal_rows(job, ck, rows, ts)
    assert fast.encode_wal_rows(job, ck, rows, ts) == want
    assert [wal.decode(line + b"\n") is not None for line in want.split(b"\n")[:-1]] == \
        [True] * len(rows)


# ------------------------------------------------------------------ fixed cases

LAYOUT = CsvLayout(ncols=2, id_index=0, msg_index=1)
SPAN = (b'u1,hello\r\n"u,2","a ""q"""\r\n\xff,x\r\n,empty\r\n \xc2\xa0u3\xe2\x80\x83 ,m\xc3\xa9\r\n'
        b'u4\r\n\r\nu5,x\x00\r\nlast,no newline')


@pytest.mark.parametrize("impl", [pure, fast], ids=["pure", "compiled"])
def test_fixed_span(impl: object) -> None:
    b = impl.RowBatcher(SPAN, 1000, LAYOUT, "j000007", "users.csv").next(
        impl.Requests(HEAD, [], "default"), NOW)
    assert b.offsets == [1000, 1010, 1040, 1068]
    assert b.uids == ["u1", "u,2", "u3", "last"]  # str.strip() takes U+00A0 and U+2003 too
    assert b.msgs == ["hello", 'a "q"', "mé", "no newline"]
    assert b.rejects == [(1027, "invalid UTF-8", b"\xff,x"), (1032, "missing user id", b",empty"),
                         (1055, "expected 2 columns, got 1", b"u4"), (1059, "empty line", b""),
                         (1061, "NUL byte in row", b"u5,x\x00")]
    body = (b'{"type":"alert","timestamp":"2026-11-24T06:00:00.123Z","data":{"user_id":"u1",'
            b'"message":"hello","file":"users.csv","offset":1000}}')
    assert b.requests[0] == (HEAD + b"%d\r\nwebhook-id: j000007:1000\r\nwebhook-timestamp: "
                             b"1795500000\r\n\r\n" % len(body) + body)


@pytest.mark.parametrize("impl", [pure, fast], ids=["pure", "compiled"])
def test_signed_request_verifies_with_standardwebhooks(impl: object) -> None:
    secrets = [_secret(os.urandom(24)), _secret(os.urandom(80))]
    layout = CsvLayout(ncols=3, id_index=1, msg_index=-1, data_columns=(("city", 2),))
    b = impl.RowBatcher(b'x,user-9,Z\xc3\xbcrich\n', 0, layout, "j000001", "f.csv").next(
        impl.Requests(HEAD, secrets, 'Hi "there"'), time.time())  # receivers check it
    head, _, body = b.requests[0].partition(b"\r\n\r\n")
    headers = dict(line.decode().split(": ", 1) for line in head.split(b"\r\n")[1:])
    assert int(headers["Content-Length"]) == len(body)
    sigs = headers["webhook-signature"].split(" ")
    assert len(sigs) == 2
    for secret, sig in zip(secrets, sigs):
        data = Webhook(secret).verify(body, {**headers, "webhook-signature": sig})["data"]
        assert data == {"user_id": "user-9", "message": 'Hi "there"', "file": "f.csv",
                        "offset": 0, "fields": {"city": "Zürich"}}


@pytest.mark.parametrize("impl", [pure, fast], ids=["pure", "compiled"])
def test_retry_rebuild_matches_batch(impl: object) -> None:
    """Requests.build re-signs one row with a later time: the same bytes as a batch at it."""
    req = impl.Requests(HEAD, [_secret(b"k" * 24)], "m")
    b = impl.RowBatcher(b"u1,x\n", 5, LAYOUT, "j1", "f").next(req, NOW + 7.5)
    assert req.build("j1", "f", 5, "u1", "x", None, NOW + 7.5) == b.requests[0]
    assert req.build("j1", "f", 5, "u1", "x", None, NOW) != b.requests[0]


def test_request_is_what_the_transport_writes() -> None:
    """The reference's request bytes equal what Pool.post sends for the same alert."""
    secret = _secret(b"s" * 32)
    got: list[bytes] = []

    async def main() -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            head = await r.readuntil(b"\r\n\r\n")
            n = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            got.append(head + await r.readexactly(n))
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await w.drain()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        url, headers = f"http://127.0.0.1:{port}/in?a=1", [("X-Tenant", "t1")]
        pool = Pool(url, size=1, timeout=5, headers=headers)
        hdr, body = Payloads([secret]).build("j000003:42", "u", "m", "f.csv", 42, NOW)
        assert (await pool.post(hdr, body)).status == 200
        await pool.close()
        server.close()
        await server.wait_closed()
        req = pure.Requests(request_head(url, headers), [secret], "m")
        assert got == [req.build("j000003", "f.csv", 42, "u", "m", None, NOW)]

    asyncio.run(asyncio.wait_for(main(), 10))


def test_read_span_rejects_a_long_first_line_unread(tmp_path: object) -> None:
    path = tmp_path / "f.csv"
    path.write_bytes(b"y" * 5000 + b"\r\nu1,a\nu2,b\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        lead, data, pos = rowpath.read_span(fd, 0, os.path.getsize(path), 100)
        want = list(chunker.read_rows(fd, 0, os.path.getsize(path), 100))
    finally:
        os.close(fd)
    assert lead == [(0, "line too long: 5000 bytes > max_line_bytes 100", b"y" * 1024)]
    assert want[0][1].reason == lead[0][1]
    assert (data, pos) == (b"u1,a\nu2,b\n", 5002)
    b = fast.RowBatcher(data, pos, LAYOUT, "j1", "f.csv").next(fast.Requests(HEAD, [], "m"), NOW)
    assert [(o, u) for o, u in zip(b.offsets, b.uids)] == [(off, ln.split(b",")[0].decode())
                                                           for off, ln in want[1:]]


def test_wal_record_is_todays() -> None:
    line = fast.encode_wal_rows("j1", 2, [(7, "dead", 500, 3, True, "ü", "HTTP 500")], NOW)
    assert line == wal.encode_row("j1", 2, 7, "dead", 500, 3, True, "ü", NOW, "HTTP 500")
    assert wal.decode(line)["err"] == "HTTP 500"


def test_selection() -> None:
    code = "import alertd.rowpath as r; print(r.IMPL)"
    env = {k: v for k, v in os.environ.items() if k != "ALERTD_PURE_PYTHON"}
    run = [sys.executable, "-c", code]
    assert subprocess.run(run, env=env, capture_output=True, text=True,
                          timeout=30).stdout.strip() == "compiled"
    p = subprocess.run(run, env={**env, "ALERTD_PURE_PYTHON": "1"}, capture_output=True,
                       text=True, timeout=30)
    assert (p.stdout.strip(), p.stderr) == ("pure", "")


def test_body_json_is_orjsons() -> None:
    """A body decodes to the documented object for a row full of escapes."""
    b = fast.RowBatcher('"a\\b\x01\u2028😀",m\n'.encode(), 0, LAYOUT, "j1", "f\n").next(
        fast.Requests(HEAD, [], "m"), NOW)
    body = b.requests[0].partition(b"\r\n\r\n")[2]
    assert orjson.loads(body)["data"]["user_id"] == "a\\b\x01\u2028😀"
