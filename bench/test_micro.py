"""Micro-benchmarks of the per-row hot path (pytest-benchmark), one function per piece.

Collected only by `pytest bench` (testpaths keeps `make test` on tests/);
`make bench` runs them with --benchmark-only. They time, they do not assert speed.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import time
from pathlib import Path

import pytest
from alertd import chunker, ratelimit
from alertd.config import CsvConfig
from alertd.payload import Payloads
from alertd.shm import Shared
from alertd.wal import WalWriter, encode_row

from .gen_csv import generate
from .sink import SAMPLE_SECRET

SPAN = 256 * 1024  # the default workers.chunk_bytes


@pytest.fixture(scope="module")
def span(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int, int, object]:
    """A line-aligned 256 KiB span of a generated CSV, and its layout."""
    path = tmp_path_factory.mktemp("micro") / "rows.csv"
    generate(str(path), 40_000, seed=3)
    data = path.read_bytes()
    header, start = chunker.read_header(data, True)
    layout = chunker.layout_for(header, CsvConfig())
    _, end = next(chunker.plan(data, start, SPAN))
    return data, start, end, layout


def test_rows_and_parse_256k_span(benchmark, span) -> None:
    data, start, end, layout = span
    parse, rows = chunker.parse, chunker.rows

    def run() -> int:
        n = 0
        for _off, line in rows(data, 0, start, end):
            parse(line, layout)
            n += 1
        return n

    n = benchmark(run)
    benchmark.extra_info["rows_per_call"] = n


def test_rows_only_256k_span(benchmark, span) -> None:
    data, start, end, _ = span
    benchmark.extra_info["rows_per_call"] = benchmark(
        lambda: sum(1 for _ in chunker.rows(data, 0, start, end)))


def test_payload_build_one_secret(benchmark) -> None:
    p = Payloads([SAMPLE_SECRET])
    now = time.time()
    benchmark(p.build, "j000001:1873", "uabcdef0100000012345", "You have a new alert.",
              "bench.csv", 1873, now)


def test_ratelimit_take(benchmark) -> None:
    shared = Shared.create(multiprocessing.get_context("spawn"))
    # A rate so high the bucket never runs dry: this times the lock + arithmetic only.
    ratelimit.configure(shared, 1e12, 1e12)
    benchmark(ratelimit.take, shared, 64)


def test_wal_encode_row(benchmark) -> None:
    benchmark(encode_row, "j000001", 3, 123456789, "delivered", 200, 1, False,
              "uabcdef0100000012345", 1795501073.11)


def test_wal_encode_and_append(benchmark, tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # WalWriter's Event/Lock bind to the current loop
    try:
        w = WalWriter(tmp_path / "wal", 0)
        w.open()
        n = 0

        def run() -> None:
            nonlocal n
            n += 1
            w.append(encode_row("j000001", 3, n, "delivered", 200, 1, False,
                                "uabcdef0100000012345", 1795501073.11))

        benchmark(run)
        # Commit what was appended, as the worker's group commit would (not timed).
        loop.run_until_complete(w.close())
    finally:
        asyncio.set_event_loop(None)
        loop.close()
