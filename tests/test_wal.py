from __future__ import annotations

import asyncio
import errno
import os
import time
import zlib
from pathlib import Path

import orjson
import pytest
from alertd import wal
from alertd.protocol import Counts
from alertd.wal import (
    JobRecovery,
    ReplayStats,
    WalWriter,
    decode,
    encode_chunk,
    encode_row,
    records,
    recover,
    segments,
)


def row(off: int, job: str = "j000001", ck: int = 0, out: str = "delivered", dup: bool = False,
        uid: str | None = None, err: str | None = None) -> bytes:
    return encode_row(job, ck, off, out, 200, 1, dup, uid or f"u{off}", 1700000000.5, err)


async def until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# ------------------------------------------------------------------ format

def test_encode_decode_round_trip() -> None:
    line = encode_row("j000001", 3, 12345, "delivered", 200, 1, False, 'u"1\\ é\n', 1.5)
    assert line.startswith(b'{"job":"j000001","ck":3,"off":12345,"out":"delivered","st":200,')
    assert line.endswith(b"}\n") and line.count(b"\n") == 1
    assert decode(line) == {"job": "j000001", "ck": 3, "off": 12345, "out": "delivered",
                            "st": 200, "att": 1, "dup": False, "uid": 'u"1\\ é\n', "ts": 1.5}
    with_err = decode(encode_row("j1", 0, 7, "dead", 503, 5, True, "u", 2.0, err="timeout"))
    assert list(with_err) == ["job", "ck", "off", "out", "st", "err", "att", "dup", "uid", "ts"]
    assert with_err["err"] == "timeout" and with_err["dup"] is True
    c = decode(encode_chunk("j1", 4, 999, Counts(10, 7, 1, 2, 3), 3.0))
    assert c == {"job": "j1", "ck": 4, "out": "chunk", "end": 999, "rows": 10, "delivered": 7,
                 "rejected": 1, "dead": 2, "possible_duplicates": 3, "ts": 3.0}


def test_crc_is_of_the_line_without_crc() -> None:
    line = row(5)
    body, _, crc = line.rstrip(b"}\n").rpartition(b',"crc":')
    assert zlib.crc32(body + b"}") == int(crc)
    assert orjson.loads(line)["crc"] == int(crc)


def test_crc_detects_any_flipped_byte() -> None:
    line = row(5)
    for i in range(len(line) - 1):
        bad = bytearray(line)
        bad[i] ^= 0x01
        assert decode(bytes(bad)) is None, i
    assert decode(line[:-1]) is None  # torn: no newline
    assert decode(b"\n") is None and decode(b"garbage\n") is None


# ------------------------------------------------------------------ replay

def test_records_skips_torn_tail_and_corrupt_lines(tmp_path: Path) -> None:
    p = tmp_path / "worker-0.wal"
    bad = bytearray(row(2))
    bad[20] ^= 0x20
    p.write_bytes(row(1) + bytes(bad) + row(3) + row(4)[:30])
    stats = ReplayStats()
    assert [r["off"] for r in records(p, stats)] == [1, 3]
    assert (stats.corrupt, stats.torn) == (1, 1)


def test_open_truncates_torn_tail(tmp_path: Path) -> None:
    p = tmp_path / "worker-2.wal"
    p.write_bytes(row(1) + row(2) + row(3)[:25])

    async def main() -> None:
        w = WalWriter(tmp_path, 2)
        w.open()
        assert p.read_bytes() == row(1) + row(2)
        task = asyncio.create_task(w.run())
        w.append(row(4))
        await w.sync()
        await w.close()
        await task

    asyncio.run(main())
    assert [r["off"] for r in records(p)] == [1, 2, 4]


def test_open_truncates_a_file_with_no_newline_at_all(tmp_path: Path) -> None:
    p = tmp_path / "worker-0.wal"
    p.write_bytes(b"x" * 200_000)
    WalWriter(tmp_path, 0).open()
    assert p.read_bytes() == b""


def test_recover(tmp_path: Path) -> None:
    w0, w1 = tmp_path / "worker-0.wal", tmp_path / "worker-1.000001.wal"
    corrupt = bytearray(row(40, ck=1))
    corrupt[30] ^= 0x04
    w1.write_bytes(
        row(0, ck=0) + row(10, ck=0)                                  # chunk 0: then final
        + row(30, ck=1, out="dead") + bytes(corrupt)                  # chunk 1: partial
        + row(0, job="j000002") + encode_chunk("j000002", 0, 50, Counts(1, 1), 1.0))
    w0.write_bytes(
        encode_chunk("j000001", 0, 30, Counts(2, 2, 0, 0, 1), 2.0)
        + row(30, ck=1, out="delivered", dup=True)                    # replay: keep the first
        + row(50, ck=1, out="rejected")
        + row(10, ck=0, out="dead")                                   # chunk 0 is final: ignored
        + row(60, ck=1)[:20])                                         # torn
    stats = ReplayStats()
    rec = recover(tmp_path, stats=stats)
    assert set(rec) == {"j000001", "j000002"}
    j1 = rec["j000001"]
    assert j1.chunks == {0: Counts(2, 2, 0, 0, 1)}
    assert j1.partial == {1: {30: ("dead", False), 50: ("rejected", False)}}
    assert rec["j000002"] == JobRecovery(chunks={0: Counts(1, 1)}, partial={})
    assert (stats.corrupt, stats.torn) == (1, 1)
    only = recover(tmp_path, jobs=["j000002"])
    assert list(only) == ["j000002"]
    assert recover(tmp_path / "missing") == {}


def test_segments_order(tmp_path: Path) -> None:
    for name in ["worker-1.wal", "worker-0.000002.wal", "worker-0.wal", "worker-1.000001.wal",
                 "worker-0.000010.wal", "other.txt", "worker-x.wal"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in segments(tmp_path)] == [
        "worker-0.000002.wal", "worker-0.000010.wal", "worker-1.000001.wal",
        "worker-0.wal", "worker-1.wal"]


# ------------------------------------------------------------------ writer

def test_sync_returns_after_data_is_on_disk(tmp_path: Path, monkeypatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (real(fd), synced.append(fd)))

    async def main() -> None:
        w = WalWriter(tmp_path, 0, interval=0.02)
        w.open()
        task = asyncio.create_task(w.run())
        await w.sync()  # nothing pending: immediate
        before = len(synced)
        w.append(row(1))
        w.append(row(2))
        assert w.pending_bytes == len(row(1)) + len(row(2))
        await w.sync()
        assert len(synced) > before and w.pending_bytes == 0 and w.error is None
        assert (tmp_path / "worker-0.wal").read_bytes() == row(1) + row(2)
        await w.close()
        await task

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["interval", "always"])
def test_concurrent_syncs_share_fsyncs(tmp_path: Path, monkeypatch, mode: str) -> None:
    calls = 0
    real = os.fsync

    def counting(fd: int) -> None:
        nonlocal calls
        calls += 1
        time.sleep(0.005)  # a disk that takes a while: callers must pile up
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)

    async def one(w: WalWriter, i: int) -> None:
        w.append(row(i))
        await w.sync()

    async def main() -> None:
        w = WalWriter(tmp_path, 0, fsync=mode, interval=0.02)
        w.open()
        base = calls
        task = asyncio.create_task(w.run())
        await asyncio.gather(*(one(w, i) for i in range(500)))
        used = calls - base
        assert 1 <= used <= 50, used  # 500 callers, a handful of fsyncs
        assert [r["off"] for r in records(w.path)] == list(range(500))
        await w.close()
        await task

    asyncio.run(main())


def test_rotation(tmp_path: Path) -> None:
    n = 3000

    async def main() -> None:
        w = WalWriter(tmp_path, 3, interval=0.001, segment_bytes=4096)
        w.open()
        task = asyncio.create_task(w.run())
        for i in range(n):
            w.append(row(i))
            if i % 50 == 49:
                await w.sync()
        await w.close()
        await task

    asyncio.run(main())
    segs = segments(tmp_path)
    assert len(segs) > 5
    assert segs[-1].name == "worker-3.wal"
    assert [s.name for s in segs[:3]] == [f"worker-3.{i:06d}.wal" for i in (1, 2, 3)]
    assert all(s.stat().st_size < 4096 + 50 * len(row(n)) for s in segs)
    assert [r["off"] for s in segs for r in records(s)] == list(range(n))

    async def reopen() -> None:  # a restart continues the sequence
        w = WalWriter(tmp_path, 3, interval=0.001, segment_bytes=4096)
        w.open()
        for i in range(100):
            w.append(row(n + i))
        await w.close()  # > 4096 bytes: rotates once more
        w = WalWriter(tmp_path, 3, segment_bytes=1)
        w.open()
        w.append(row(n + 100))
        await w.close()

    asyncio.run(reopen())
    segs2 = segments(tmp_path)
    assert segs2[:len(segs) - 1] == segs[:-1] and len(segs2) == len(segs) + 2
    rotated = len(segs) - 1
    assert [s.name for s in segs2[rotated:]] == [
        f"worker-3.{rotated + 1:06d}.wal", f"worker-3.{rotated + 2:06d}.wal", "worker-3.wal"]
    assert [r["off"] for s in segs2 for r in records(s)] == list(range(n + 101))


def test_enospc_keeps_everything_and_recovers(tmp_path: Path, monkeypatch) -> None:
    real_write = os.write
    state = {"fail": False, "partial": 0}

    def flaky_write(fd: int, data) -> int:
        if state["fail"]:
            if state["partial"] == 0:  # a short write first, then the disk is full
                state["partial"] = 1
                return real_write(fd, bytes(data[:37]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", flaky_write)

    async def main() -> None:
        w = WalWriter(tmp_path, 0, interval=0.01)
        w.open()
        task = asyncio.create_task(w.run())
        w.append(row(0))
        await w.sync()
        state["fail"] = True
        for i in range(1, 200):
            w.append(row(i))
        waiter = asyncio.create_task(w.sync())
        await until(lambda: w.error is not None)
        assert w.error.startswith("ENOSPC")
        await asyncio.sleep(0.05)  # several failed retries
        assert not waiter.done()
        assert w.pending_bytes == sum(len(row(i)) for i in range(1, 200))
        w.append(row(200))
        state["fail"] = False
        await asyncio.wait_for(waiter, 5)
        await w.sync()
        assert w.error is None and w.pending_bytes == 0
        await w.close()
        await task

    asyncio.run(main())
    data = (tmp_path / "worker-0.wal").read_bytes()
    assert data == b"".join(row(i) for i in range(201))  # no loss, no duplicate, no tear


def test_close_flushes_without_run(tmp_path: Path) -> None:
    async def main() -> None:
        w = WalWriter(tmp_path, 0, fsync="always")
        w.open()
        w.append(row(1))
        await w.close()

    asyncio.run(main())
    assert [r["off"] for r in records(tmp_path / "worker-0.wal")] == [1]
    assert wal.decode(row(1)) is not None


def test_failed_fsync_rewrites_from_known_good_length(tmp_path: Path, monkeypatch) -> None:
    real = os.fsync
    fails = {"n": 2}

    def eio_fsync(fd: int) -> None:
        if fails["n"] > 0:
            fails["n"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    async def main() -> None:
        w = WalWriter(tmp_path, 0, interval=0.01)
        w.open()
        task = asyncio.create_task(w.run())
        w.append(row(0))
        await w.sync()
        monkeypatch.setattr(os, "fsync", eio_fsync)
        w.append(row(1))
        w.append(row(2))
        await asyncio.wait_for(w.sync(), 5)  # the bytes were written twice over, not appended twice
        assert fails["n"] == 0 and w.error is None
        await w.close()
        await task

    asyncio.run(main())
    assert (tmp_path / "worker-0.wal").read_bytes() == row(0) + row(1) + row(2)


def test_one_writer_per_worker_index(tmp_path: Path) -> None:
    """A worker of a killed supervisor may still be flushing: its successor must wait."""
    first = WalWriter(tmp_path, 0)
    first.open()
    second = WalWriter(tmp_path, 0)
    with pytest.raises(BlockingIOError):
        second.open(wait=0.2)
    other = WalWriter(tmp_path, 1)  # another index is independent
    other.open(wait=0)
    asyncio.run(first.close())
    second.open(wait=0)  # free once the first owner closed
    asyncio.run(second.close())
    asyncio.run(other.close())
