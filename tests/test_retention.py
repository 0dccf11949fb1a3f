"""WAL retention: rotated segments go only when every job they name is final."""
from __future__ import annotations

import os
import time

from alertd import wal
from alertd.retention import Retention


def write_segment(d, name, jobs):
    lines = b"".join(wal.encode_row(j, 0, i, "delivered", 200, 1, False, "u", 1.0)
                     for i, j in enumerate(jobs))
    (d / "wal" / name).write_bytes(lines)


def test_only_segments_of_finished_jobs_older_than_retention_go(tmp_path):
    (tmp_path / "wal").mkdir()
    (tmp_path / "done").mkdir()
    write_segment(tmp_path, "worker-0.000001.wal", ["j000001"])
    write_segment(tmp_path, "worker-0.000002.wal", ["j000001", "j000002"])
    write_segment(tmp_path, "worker-0.wal", ["j000001"])  # current: never removed
    (tmp_path / "done" / "j000001.summary.json").write_text("{}")
    r = Retention(tmp_path)
    assert r.collect(keep_seconds=3600) == []  # too recent
    old = time.time() - 7200
    for p in (tmp_path / "wal").iterdir():
        os.utime(p, (old, old))
    removed = r.collect(keep_seconds=3600)
    assert [p.name for p in removed] == ["worker-0.000001.wal"]  # j000002 is not final
    (tmp_path / "done" / "j000002.summary.json").write_text("{}")
    assert [p.name for p in r.collect(keep_seconds=3600)] == ["worker-0.000002.wal"]
    assert (tmp_path / "wal" / "worker-0.wal").exists()


def test_done_sources_go_after_done_files_seconds_summaries_stay(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    for j in ("j000001", "j000002"):
        (done / f"{j}.summary.json").write_text("{}")
        (done / f"{j}.manifest.json").write_text("{}")
        (done / f"{j}--users list.csv").write_bytes(b"user_id\nu1\n")
    (done / "j000003--no summary yet.csv").write_bytes(b"user_id\n")  # a move in progress
    old = time.time() - 7200
    os.utime(done / "j000001.summary.json", (old, old))
    r = Retention(tmp_path)
    assert r.collect_done(keep_seconds=3600) == 1
    assert sorted(p.name for p in done.iterdir()) == [
        "j000001.manifest.json", "j000001.summary.json", "j000002--users list.csv",
        "j000002.manifest.json", "j000002.summary.json", "j000003--no summary yet.csv"]
    assert r.collect_done(keep_seconds=0) == 1  # 0: as soon as the summary exists
    assert not (done / "j000002--users list.csv").exists()
    assert (done / "j000003--no summary yet.csv").exists()


def _state_bytes(state) -> int:
    """Bytes of the files under state_dir, WAL segments aside (wal.retention governs them)."""
    total = 0
    for root, dirs, files in os.walk(state):
        dirs[:] = [d for d in dirs if d != "wal"]
        total += sum(os.lstat(os.path.join(root, f)).st_size for f in files)
    return total


def test_twenty_drops_of_a_100mb_file_with_done_files_0_keep_the_disk_flat(tmp_path, mock, alertd):
    from tests.procs import poll, write_config
    port = mock()
    a = alertd(write_config(tmp_path / "a.toml", port, retention={"done_files": 0}))
    # 100 MB in 100 lines over max_line_bytes: each is rejected without being sent, so the
    # test measures the files, not the delivery rate.
    src = tmp_path / "big.csv"
    with open(src, "wb") as f:
        f.write(b"user_id\n" + (b"x" * (1 << 20) + b"\n") * 100)
    sizes = []
    for i in range(20):
        a.drop_link(src, f"big-{i}.csv")
        [*_, s] = a.wait_summaries(i + 1, timeout=60)
        assert s["rows"] == 100 and s["rejected"] == 100, s
        # The summary is written just before the source goes: measure once it has.
        poll(lambda s=s: not list(a.state.glob(f"*/{s['job']}--*")), 10, "the source to go")
        sizes.append(_state_bytes(a.state))
    print(f"\nstate_dir without WALs after each of 20 drops of 100 MB: "
          f"{min(sizes) / 2**20:.1f}-{max(sizes) / 2**20:.1f} MiB")
    assert max(sizes) < 20 << 20, sizes  # one source would be 100 MB: none is kept
    r = a.cli("verify", s["job"])
    assert r.returncode == 1 and "its source file is gone" in r.stderr, r.stdout + r.stderr
