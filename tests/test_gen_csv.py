"""Tests of bench/gen_csv.py: format, uniqueness, determinism, atomic arrival.

Throughput is measured by hand (the script prints MB/s), never asserted.
"""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gen_csv
from bench.gen_csv import generate

from .helpers import ROOT


def ids_of(path: Path) -> list[str]:
    lines = path.read_bytes().split(b"\n")
    return [ln.split(b",")[0].decode() for ln in lines[1:-1]]


def test_header_rows_trailing_newline_and_unique_ids(tmp_path: Path) -> None:
    out = tmp_path / "a.csv"
    rows = 250_001  # spans a partial third block
    size = generate(str(out), rows)
    data = out.read_bytes()
    assert size == len(data)
    assert data.startswith(b"user_id\n") and data.endswith(b"\n")
    assert b"\r" not in data
    ids = ids_of(out)
    assert len(ids) == rows
    assert len(set(ids)) == rows
    assert all(8 <= len(i) <= 24 and i.isascii() and i.isprintable() and i.startswith("u")
               for i in (ids[0], ids[99_999], ids[100_000], ids[-1]))
    assert not (tmp_path / "a.csv.tmp").exists()


def test_unique_across_many_block_number_carries(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny blocks make the block number roll over 9->10 and 99->100 cheaply.
    monkeypatch.setattr(gen_csv, "BLOCK_ROWS", 7)
    out = tmp_path / "small.csv"
    generate(str(out), 1000, seed=3, message=True)
    ids = ids_of(out)
    assert len(ids) == len(set(ids)) == 1000
    assert out.read_bytes().endswith(b"\n")


def test_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    def digest(name: str, **kw: object) -> str:
        out = tmp_path / name
        generate(str(out), 120_000, **kw)  # type: ignore[arg-type]
        return hashlib.sha256(out.read_bytes()).hexdigest()

    assert digest("s0a.csv", seed=0) == digest("s0b.csv", seed=0)
    assert digest("m0a.csv", seed=0, message=True) == digest("m0b.csv", seed=0, message=True)
    assert digest("s1.csv", seed=1) != digest("s0a.csv", seed=0)
    assert not set(ids_of(tmp_path / "s0a.csv")) & set(ids_of(tmp_path / "s1.csv"))


def test_message_column_parses_as_plain_csv(tmp_path: Path) -> None:
    out = tmp_path / "m.csv"
    generate(str(out), 1234, seed=7, message=True)
    text = out.read_text(encoding="utf-8")
    assert '"' not in text
    rows = list(csv.reader(text.splitlines()))
    assert rows[0] == ["user_id", "message"]
    assert len(rows) == 1235
    assert all(len(r) == 2 and r[1] for r in rows[1:])
    assert len({r[0] for r in rows[1:]}) == 1234


def test_zero_rows_is_header_only(tmp_path: Path) -> None:
    out = tmp_path / "empty.csv"
    assert generate(str(out), 0) == len(b"user_id\n")
    assert out.read_bytes() == b"user_id\n"


def test_cli_matches_function_and_reports(tmp_path: Path) -> None:
    cli_out, fn_out = tmp_path / "cli.csv", tmp_path / "fn.csv"
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gen_csv.py"), "--rows", "5000", "--out",
         str(cli_out), "--seed", "9", "--message"],
        capture_output=True, text=True, timeout=30, check=True)
    assert res.stderr.startswith("gen_csv: 5000 rows, ") and "MB/s" in res.stderr
    generate(str(fn_out), 5000, seed=9, message=True)
    assert cli_out.read_bytes() == fn_out.read_bytes()
