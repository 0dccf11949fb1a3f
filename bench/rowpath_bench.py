"""µs per row of the row path, compiled and pure Python, on 100,000 typical rows.

One row = cut from its span + parse + JSON body + HMAC-SHA256 signature (one secret) +
the whole request's bytes + its WAL record, in batches of 256 over 256 KiB spans, as a
worker would run it. Also times the signing choices alone. Not collected by pytest:

    .venv/bin/python -m bench.rowpath_bench [--rows N] [--repeat R]
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import tempfile
import time
from collections.abc import Callable

from alertd import chunker
from alertd.config import CsvConfig
from alertd.payload import Payloads, secret_key
from alertd.rowpath import _fast, pure, read_span, request_head

from .gen_csv import generate
from .sink import SAMPLE_SECRET

SPAN = 256 * 1024  # the default workers.chunk_bytes
BATCH = 256


def _spans(path: str) -> tuple[list[tuple[bytes, int]], chunker.CsvLayout]:
    with open(path, "rb") as f:
        buf = f.read()
    header, start = chunker.read_header(buf, True)
    cfg = CsvConfig(message_column="message")
    layout = chunker.layout_for(header, cfg)
    fd = os.open(path, os.O_RDONLY)
    try:
        spans = []
        for s, e in chunker.plan(buf, start, SPAN, layout.max_line_bytes):
            _, data, pos = read_span(fd, s, e, layout.max_line_bytes)
            spans.append((data, pos))
    finally:
        os.close(fd)
    return spans, layout


def run_path(impl: object, spans: list[tuple[bytes, int]], layout: object, secrets: list[str],
             wal: bool = True) -> int:
    """Every row of every span through the row path; the number of good rows."""
    req = impl.Requests(request_head("http://127.0.0.1:8080/hook"), secrets, "alert")
    rows = 0
    for data, pos in spans:
        rb = impl.RowBatcher(data, pos, layout, "j000001", "users.csv")
        while not rb.exhausted:
            b = rb.next(req, time.time(), BATCH)
            rows += len(b)
            if wal:
                impl.encode_wal_rows("j000001", 1, [(off, "delivered", 200, 1, False, uid, None)
                                                    for off, uid in zip(b.offsets, b.uids)],
                                     time.time())
    return rows


def best(fn: Callable[[], int], repeat: int) -> tuple[float, int]:
    """(best seconds of `repeat` runs, what fn returned)."""
    times, n = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - t)
    return min(times), n


def sign_choices(n: int, repeat: int) -> dict[str, float]:
    """µs per signature of a typical ~200-byte signed content, three ways from Python."""
    key = secret_key(SAMPLE_SECRET)
    _, body = Payloads([]).build("j000001:123456", "u1234abcd00000012345", "disk usage 12 pct",
                                 "users.csv", 123456, time.time())
    msg = b"j000001:123456.1795500000." + body
    ipad, opad = Payloads([SAMPLE_SECRET])._macs[0]

    def pads() -> int:  # what payload.py does today: copy the prepared key states
        for _ in range(n):
            inner = ipad.copy()
            inner.update(msg)
            outer = opad.copy()
            outer.update(inner.digest())
            outer.digest()
        return n

    def digest() -> int:  # hmac.digest: one C call (OpenSSL HMAC), key set up every time
        d = hmac.digest
        for _ in range(n):
            d(key, msg, "sha256")
        return n

    def new() -> int:
        for _ in range(n):
            hmac.new(key, msg, hashlib.sha256).digest()
        return n

    return {name: best(fn, repeat)[0] / n * 1e6
            for name, fn in (("hashlib pad copies (payload.py)", pads),
                             ("hmac.digest", digest), ("hmac.new", new))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "rows.csv")
        generate(path, args.rows, seed=3, message=True)
        spans, layout = _spans(path)
    print(f"{args.rows:,} rows (user_id,message; {len(spans)} spans of 256 KiB; batches of "
          f"{BATCH}), best of {args.repeat}, µs per row:")
    results = {}
    for label, secrets, wal in (("parse+payload+sign+request+WAL", [SAMPLE_SECRET], True),
                                ("  without the WAL record", [SAMPLE_SECRET], False),
                                ("  without signing (no secret)", [], False)):
        for name, impl in (("pure", pure), ("compiled", _fast)):
            t, n = best(lambda impl=impl, s=secrets, w=wal: run_path(impl, spans, layout, s, w),
                        args.repeat)
            assert n == args.rows, (n, args.rows)
            results[(label, name)] = t / n * 1e6
        p, c = results[(label, "pure")], results[(label, "compiled")]
        print(f"  {label:34s} pure {p:6.2f}   compiled {c:6.2f}   ({p / c:.1f} x)")
    same = all(a == b for a, b in zip(
        _requests(pure, spans, layout), _requests(_fast, spans, layout)))
    print(f"  requests byte-identical on this file: {same}")
    print("signing alone from Python, µs per signature (the compiled path signs in C, "
          "OpenSSL SHA256 over prepared pad states: the 'without signing' gap above):")
    for name, us in sign_choices(args.rows, args.repeat).items():
        print(f"  {name:34s} {us:6.2f}")
    return 0


def _requests(impl: object, spans: list[tuple[bytes, int]], layout: object) -> list[bytes]:
    req = impl.Requests(request_head("http://127.0.0.1:8080/hook"), [SAMPLE_SECRET], "alert")
    out = []
    for data, pos in spans[:4]:
        out += impl.RowBatcher(data, pos, layout, "j1", "users.csv").next(req, 1795500000.5,
                                                                          10**9).requests
    return out


if __name__ == "__main__":
    raise SystemExit(main())
