"""`alertd tail` reads WALs from their ends: right records, merged by time, filtered, and a
bounded number of bytes whatever the WALs' size."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time

from alertd import tail, wal

from tests.procs import ROOT


def _write(path, recs) -> None:
    with open(path, "ab") as f:
        f.write(b"".join(recs))


def _rows(worker: int, n: int, t0: float, jobs=("j000001", "j000002")) -> list[bytes]:
    rnd = random.Random(worker)
    out = []
    for i in range(n):
        job = jobs[i % len(jobs)]
        outcome = rnd.choice(["delivered", "delivered", "rejected", "dead"])
        out.append(wal.encode_row(job, i // 50, i * 10 + worker, outcome, 200, 1, False,
                                  f"u{worker}-{i}", t0 + i * 0.001 + worker * 0.0003))
    return out


def _reference(wal_dir, keep):
    recs = [r for p in wal.segments(wal_dir) for r in wal.records(p) if keep(r)]
    return sorted(recs, key=lambda r: r["ts"])


def test_newest_records_match_a_full_scan(tmp_path):
    d = tmp_path / "wal"
    d.mkdir()
    t0 = time.time()
    # Worker 0 has a rotated segment and a current file; worker 1 only a current file with
    # a torn last line, which is not shown.
    rows0 = _rows(0, 3000, t0)
    _write(d / "worker-0.1.wal", rows0[:2000])
    _write(d / "worker-0.wal", rows0[2000:])
    _write(d / "worker-1.wal", _rows(1, 2500, t0))
    with open(d / "worker-1.wal", "ab") as f:
        f.write(b'{"job":"j000001","ck":9,"off":1')
    for n in (1, 3, 1500, 2600, 0):
        for job, outcome in [(None, None), ("j000002", None), (None, "dead"), ("j000001", "rejected")]:
            keep = tail.matcher(job, outcome)
            ref = _reference(d, keep)
            got, _ = tail.newest(d, n, keep)
            assert got == (ref[-n:] if n else ref), (n, job, outcome)


def test_follow_starts_at_the_end_and_misses_nothing(tmp_path):
    d = tmp_path / "wal"
    d.mkdir()
    t0 = time.time()
    _write(d / "worker-0.wal", _rows(0, 100, t0))
    _write(d / "worker-0.wal", [b'{"job":"j000001","ck":1,"off":'])  # torn, completed below
    _, offsets = tail.newest(d, 3, tail.matcher(None, None))
    full = wal.encode_row("j000001", 1, 5, "delivered", 200, 1, False, "late", t0 + 5)
    with open(d / "worker-0.wal", "r+b") as f:  # finish the torn line, as the writer would
        f.truncate(os.path.getsize(d / "worker-0.wal") - len(b'{"job":"j000001","ck":1,"off":'))
        f.seek(0, 2)
        f.write(full)
    got = list(tail._follow_once(d, offsets))
    assert [r["uid"] for r in got] == ["late"]


def test_tail_reads_a_bounded_amount_of_a_large_wal(tmp_path, monkeypatch):
    d = tmp_path / "wal"
    d.mkdir()
    t0 = time.time()
    block = b"".join(_rows(0, 20_000, t0))
    with open(d / "worker-0.wal", "wb") as f:
        while f.tell() < 150 << 20:  # 150 MB of WAL
            f.write(block)
    read = []
    real_pread = os.pread
    monkeypatch.setattr(tail.os, "pread", lambda fd, n, off: read.append(n) or real_pread(fd, n, off))
    got, _ = tail.newest(d, 3, tail.matcher(None, None))
    assert len(got) == 3 and sum(read) <= 2 * tail.BLOCK
    # Through the CLI too (no daemon needed): print the time, as the operator sees it.
    cfg = tmp_path / "alertd.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}"\n[webhook]\nurl = "http://127.0.0.1:9/"\n')
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "alertd", "tail", "-n", "3", "--config", str(cfg)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t
    print(f"\ntail -n 3 on 150 MB of WAL: {took:.2f} s (whole process)")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 3, r.stderr
    r = subprocess.run([sys.executable, "-m", "alertd", "tail", "-n", "2", "--job", "j000002",
                        "--outcome", "dead", "--json", "--config", str(cfg)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all('"job":"j000002"' in x and '"out":"dead"' in x for x in lines)
