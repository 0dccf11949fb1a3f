"""Hostile producers, end to end: any file name, FIFO/symlink swaps during a claim, a 1 GB
line, and a supervisor task that dies. Real `alertd run`, real files, real signals."""
from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from alertd import names
from alertd.config import CsvConfig
from alertd.errors import ConfigError
from alertd.jobs import JobStore

from tests.helpers import get_stats
from tests.procs import ROOT, poll, write_config

SECRET = b"TOPSECRET-4f9a1c"

# raw name -> its escaped form, written out by hand (not computed by the code under test)
NAMES: dict[bytes, str] = {
    b"bad\xff.csv": "bad\\xff.csv",
    b"new\nline.csv": "new\\x0aline.csv",
    b"tab\tand\rcr.csv": "tab\\x09and\\x0dcr.csv",
    b"with space.csv": "with space.csv",
    b"-rf.csv": "-rf.csv",
    b"--leading-dashes.csv": "--leading-dashes.csv",
    b"back\\slash.csv": "back\\\\slash.csv",
    "r\u00e9sum\u00e9\u2028.csv".encode(): "r\u00e9sum\u00e9\\u2028.csv",
    b"x" * 246 + b".csv": "x" * 246 + ".csv",  # 250 bytes: j000001--<name> would not fit
    b"\xff" * 251 + b".csv": "\\xff" * 251 + ".csv",  # 255 bytes, none of them UTF-8
}


def _drop_raw(inbox: Path, raw: bytes, data: bytes, i: int) -> None:
    d = os.fsencode(inbox)
    tmp = os.path.join(d, b".drop%d.tmp" % i)
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, os.path.join(d, raw))


def _rows_of(i: int) -> bytes:
    return b"user_id\nn%d-a\nn%d-b\n" % (i, i)


def test_escaping_is_printable_and_reversible() -> None:
    for raw, want in NAMES.items():
        got = names.escape(raw)
        assert got == want and got.isprintable(), raw
        assert names.unescape(got) == raw
        state = names.state_name("j000001", got)
        assert len(state.encode()) + len(".reason") + len("..tmp") <= 255, raw
        assert state.startswith("j000001--")


def test_a_crash_between_rename_and_manifest_keeps_the_whole_name(tmp_path):
    """The shortened spool name is all that is left of a claim that crashed before its
    manifest: jobseq kept the escaped name for exactly that claim."""
    raw = b"\xfe" * 200 + b".csv"
    state = tmp_path / "state"
    store = JobStore(state)
    esc = names.escape(raw)
    job_id = store.allocate_id(esc)
    spool = state / "spool" / names.state_name(job_id, esc)
    spool.write_bytes(b"user_id\nu1\n")  # renamed in; then the host died
    [job] = JobStore(state).load_unfinished(CsvConfig(), 4096)
    assert (job.id, job.name, job.size) == (job_id, esc, 11)
    assert json.loads((state / "spool" / f"{job_id}.json").read_text())["name"] == esc
    assert names.unescape(job.name) == raw


def test_any_name_is_claimed_delivered_and_named_the_same_everywhere(tmp_path, mock, alertd):
    record = tmp_path / "received.jsonl"
    port = mock(record=str(record))
    cfg = write_config(tmp_path / "a.toml", port)
    a = alertd(cfg, start=False)
    inbox = a.cfg.paths.inbox_dir
    inbox.mkdir(parents=True)
    raws = list(NAMES)
    for i, raw in enumerate(raws[:4]):  # found by the start-up scan
        _drop_raw(inbox, raw, _rows_of(i), i)
    a.start()
    for i, raw in enumerate(raws[4:], start=4):  # inotify (which cannot decode b"\xff")
        _drop_raw(inbox, raw, _rows_of(i), i)
    by_file = {s["file"]: s for s in a.wait_summaries(len(raws), timeout=60)}
    assert sorted(by_file) == sorted(NAMES.values())
    for esc in NAMES.values():
        s = by_file[esc]
        assert (s["status"], s["rows"], s["delivered"]) == ("complete", 2, 2), s
        manifest = json.loads((a.state / "done" / f"{s['job']}.manifest.json").read_text())
        assert manifest["name"] == esc
        [kept] = [p for p in os.listdir(os.fsencode(a.state / "done"))
                  if p.startswith(s["job"].encode() + b"--")]
        assert len(kept) <= 255 and kept.decode("utf-8").isprintable(), kept
        r = a.cli("verify", s["job"])
        assert r.returncode == 0, r.stdout + r.stderr
    assert os.listdir(os.fsencode(inbox)) == [], "a file was left in the inbox"
    poll(lambda: sum(1 for _ in record.open()) >= 2 * len(raws), 10, "the mock's record")
    files = {json.loads(json.loads(x)["body"])["data"]["file"] for x in record.open()}
    assert files == set(NAMES.values())
    assert get_stats(port)["unique"] == 2 * len(raws)
    # The periodic rescan is alive: a hard link makes no close-write or moved-to event.
    src = tmp_path / "linked.csv"
    src.write_bytes(b"user_id\nlinked1\n")
    os.link(src, inbox / "linked.csv")
    poll(lambda: any(s["file"] == "linked.csv" for s in a.summaries()), 30,
         "the periodic rescan to find a file inotify did not report")
    assert "Traceback" not in a.log(), a.log()
    assert a.stop() == 0
    b = alertd(cfg)  # and a restart finds nothing it cannot read
    assert b.status()["jobs"] == []
    assert not [p for p in (b.state / "spool").iterdir()]
    assert b.stop() == 0


def test_a_dead_supervisor_task_stops_the_daemon_with_exit_1(tmp_path):
    cfg = write_config(tmp_path / "a.toml", 9)
    log = tmp_path / "alertd.log"
    # Fault injection from outside: the housekeeping task raises a second after start.
    code = ("import asyncio, sys\n"
            "import alertd.supervisor as s\n"
            "async def boom(self):\n"
            "    await asyncio.sleep(1)\n"
            "    raise RuntimeError('injected housekeeping failure')\n"
            "s.Supervisor._tick = boom\n"
            "from alertd.cli import main\n"
            "sys.exit(main(['run', '--config', sys.argv[1]]))\n")
    with open(log, "wb") as out:
        p = subprocess.Popen([sys.executable, "-c", code, str(cfg)], cwd=ROOT, stdout=out,
                             stderr=out)
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 30
        while p.poll() is None and time.monotonic() < deadline:
            try:
                children |= {c.pid for c in psutil.Process(p.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.05)
        assert p.poll() is not None, "the daemon lived on without its housekeeping task"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    text = log.read_text()
    assert p.returncode == 1, text
    fatal = [ln for ln in text.splitlines() if "fatal:" in ln]
    assert len(fatal) == 1 and "housekeeping task ended (RuntimeError: injected housekeeping " \
        "failure)" in fatal[0], text
    assert children, "no worker was seen"
    poll(lambda: not any(psutil.pid_exists(c) and psutil.Process(c).status() != "zombie"
                         for c in children), 15, "the workers to exit with the supervisor")


# ------------------------------------------------------------------ claim races


def _secret_file(tmp_path: Path) -> Path:
    secret = tmp_path / "secret.csv"
    secret.write_bytes(b"user_id\n" + SECRET + b"\n")  # would even parse as a row
    secret.chmod(0o600)
    return secret


def _assert_no_secret(where: Path, *texts: str) -> None:
    for root, _dirs, files in os.walk(where, followlinks=False):
        for f in files:
            p = os.path.join(root, f)
            if stat.S_ISREG(os.lstat(p).st_mode):
                with open(p, "rb") as fh:
                    assert SECRET not in fh.read(), p
    for t in texts:
        assert SECRET.decode() not in t


def test_claim_of_a_file_swapped_after_lstat_reads_nothing_and_never_blocks(tmp_path):
    """The race window, held open: lstat sees a regular file, the rename takes a FIFO or
    a symlink to a 0600 file."""
    secret = _secret_file(tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    store = JobStore(tmp_path / "state")
    allocate = store.allocate_id
    for kind in ("fifo", "symlink"):
        target = inbox / f"{kind}.csv"
        target.write_bytes(b"user_id\nu1\n")
        evil = inbox / f".{kind}.tmp"

        def swap(*args: str, evil: Path = evil, target: Path = target, kind: str = kind) -> str:
            os.mkfifo(evil) if kind == "fifo" else os.symlink(secret, evil)
            os.rename(evil, target)
            return allocate(*args)

        store.allocate_id = swap
        result: list = []
        t = threading.Thread(target=lambda r=result, p=target: r.append(
            store.claim(p, CsvConfig(), 4096)), daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), f"the claim blocked on a {kind}"
        assert result == [None]
        [reason] = (tmp_path / "state" / "failed").glob(f"*--{kind}.csv.reason")
        assert "not a regular file" in reason.read_text(), reason.read_text()
    _assert_no_secret(tmp_path / "state")


def test_fifo_and_symlink_swaps_raced_against_a_running_daemon(tmp_path, mock, alertd):
    secret = _secret_file(tmp_path)
    record = tmp_path / "received.jsonl"
    port = mock(record=str(record))
    a = alertd(write_config(tmp_path / "a.toml", port))
    inbox = a.cfg.paths.inbox_dir
    target = inbox / "race.csv"
    rng = random.Random(42)
    caught = lambda: len(list((a.state / "failed").glob("*.reason")))  # noqa: E731
    deadline = time.monotonic() + 30
    i = 0
    while i < 400 and time.monotonic() < deadline and (i < 100 or caught() < 3):
        tmp = inbox / f".r{i}.tmp"
        tmp.write_bytes(b"user_id\nrace%d\n" % i)
        os.rename(tmp, target)
        # Not a wait for anything: a random moment inside the daemon's claim to swap at.
        time.sleep(rng.uniform(0, 0.004))
        evil = inbox / f".e{i}.tmp"
        os.mkfifo(evil) if i % 2 else os.symlink(secret, evil)
        os.rename(evil, target)
        if i % 25 == 0:
            a.status()  # answers within its 2 s timeout, or raises
        i += 1
    swaps = caught()
    poll(lambda: not a.status()["jobs"], 30, "the claimed files to be delivered")
    # The last entry swapped in is a FIFO or a symlink: left alone in the inbox, or, when
    # the swap landed inside a claim of the file before it, moved to failed/ with it.
    left = os.listdir(inbox)
    assert left in ([], ["race.csv"]), left
    assert not left or not stat.S_ISREG(os.lstat(target).st_mode)
    for r in (a.state / "failed").glob("*.reason"):
        assert r.read_text().startswith("not a regular file ("), r.read_text()
    delivered = sum(s["delivered"] for s in a.summaries())
    print(f"claim race: {i} swaps tried, {swaps} caught after the rename, "
          f"{len(a.summaries())} files delivered")
    assert swaps >= 1, "the race was never hit: the test proved nothing"
    assert a.stop(timeout=30) == 0
    poll(lambda: sum(1 for _ in record.open()) >= delivered, 10, "the mock's record")
    _assert_no_secret(a.state, a.log(), record.read_text())


def test_a_fifo_or_symlink_left_in_the_spool_by_a_crash_does_not_block_the_start(tmp_path, mock,
                                                                                  alertd):
    secret = _secret_file(tmp_path)
    port = mock()
    cfg = write_config(tmp_path / "a.toml", port)
    spool = tmp_path / "state" / "spool"
    spool.mkdir(parents=True)
    os.mkfifo(spool / "j000007--fifo.csv")  # a claim renamed these, then the host died
    os.symlink(secret, spool / "j000008--link.csv")
    a = alertd(cfg)
    poll(lambda: len(list((a.state / "failed").glob("*.reason"))) == 2, 30, "both in failed/")
    reasons = {p.name: p.read_text() for p in (a.state / "failed").glob("*.reason")}
    assert "not a regular file (a FIFO)" in reasons["j000007--fifo.csv.reason"]
    assert "not a regular file (a symbolic link)" in reasons["j000008--link.csv.reason"]
    a.drop("after.csv", b"user_id\nafter1\n")
    poll(lambda: any(s["file"] == "after.csv" for s in a.summaries()), 30, "the next job")
    assert a.stop() == 0
    _assert_no_secret(a.state, a.log())


# ------------------------------------------------------------------ long lines


def test_max_line_bytes_is_validated(tmp_path):
    from alertd import config
    for bad in (0, -1, 1.5, "64k", True):
        with pytest.raises(ConfigError, match=r"\[csv\] max_line_bytes must be"):
            config.load(write_config(tmp_path / "c.toml", 9, csv={"max_line_bytes": bad}))
    assert config.load(write_config(tmp_path / "c.toml", 9, csv={"max_line_bytes": 10})) \
        .csv.max_line_bytes == 10
    assert CsvConfig().max_line_bytes == 65536


GIB = 1 << 30
RSS_BOUND = 250 * 2**20


def test_a_1gb_line_is_rejected_without_being_held(tmp_path, mock, alertd):
    port = mock()
    a = alertd(write_config(tmp_path / "a.toml", port))
    head = b"user_id,message\nu1,before\n"
    big = tmp_path / "big.csv"
    with open(big, "wb") as f:  # u2's line: 100 KB of text, then a hole up to 1 GiB
        f.write(head + b"u2," + b"x" * 100_000)
        f.truncate(GIB)
        f.seek(GIB)
        f.write(b"\nu3,after\n")
    line_len = GIB - len(head)
    try:
        pids = a.pids()
        peak = {p: 0 for p in pids}
        os.rename(big, a.cfg.paths.inbox_dir / "big.csv")
        deadline = time.monotonic() + 180
        while not a.summaries():
            assert time.monotonic() < deadline, "the 1 GB line job did not finish"
            for p in pids:
                try:
                    peak[p] = max(peak[p], psutil.Process(p).memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.02)
        [s] = a.summaries()
        print("peak RSS during a 1 GiB line: " + ", ".join(
            f"pid {p} {v / 2**20:.0f} MB" for p, v in peak.items()))
        assert max(peak.values()) <= RSS_BOUND, peak
        assert (s["rows"], s["delivered"], s["rejected"], s["dead"]) == (3, 2, 1, 0), s
        [rj] = [json.loads(x) for x in (a.state / "rejects" / f"{s['job']}.jsonl").open()]
        assert rj["offset"] == len(head)
        assert rj["reason"] == f"line too long: {line_len} bytes > max_line_bytes 65536"
        assert rj["line"].startswith("u2,xxx") and len(rj["line"]) <= 1024
        assert get_stats(port)["unique"] == 2
        r = a.cli("verify", s["job"], timeout=300)
        assert r.returncode == 0 and "3 rows, 3 with exactly one final outcome" in r.stdout, r.stdout
    finally:
        for p in (big, *(a.state / "done").glob("*--big.csv")):
            p.unlink(missing_ok=True)


def test_rows_around_a_long_line_keep_their_offsets(tmp_path, mock, alertd):
    """Long lines of every kind at chunk boundaries: each one row, rejected; the rest sent."""
    port = mock()
    a = alertd(write_config(tmp_path / "a.toml", port, csv={"max_line_bytes": 100},
                            workers={"count": 2, "chunk_bytes": 64}))
    rng = random.Random(7)
    lines, want_rejected = [], 0
    for i in range(400):
        n = rng.choice([0, 0, 0, 1, 2])
        if n:
            lines.append(b"L%d," % i + b"y" * rng.choice([101, 150, 300, 5000]) * n)
            want_rejected += 1
        else:
            lines.append(b"ok%d,m" % i)
    eol = rng.choice([b"\n", b"\r\n"])
    a.drop("mixed_long.csv", b"user_id,message" + eol + eol.join(lines) + eol)
    [s] = a.wait_summaries(1, timeout=60)
    assert (s["rows"], s["rejected"], s["delivered"]) == (400, want_rejected, 400 - want_rejected)
    reasons = [json.loads(x)["reason"] for x in (a.state / "rejects" / f"{s['job']}.jsonl").open()]
    assert all(r.startswith("line too long: ") and r.endswith("> max_line_bytes 100")
               for r in reasons)
    assert a.cli("verify", s["job"]).returncode == 0
    assert get_stats(port)["unique"] == 400 - want_rejected


def test_a_file_written_in_place_slowly_is_claimed_whole(tmp_path, mock, alertd):
    """A producer that writes in place (no rename) for longer than the 10 s rescan: the
    scan leaves a file modified in the last seconds alone; its close-write brings it."""
    port = mock()
    a = alertd(write_config(tmp_path / "a.toml", port))
    path = a.cfg.paths.inbox_dir / "slow.csv"
    with open(path, "wb", buffering=0) as f:
        f.write(b"user_id\n")
        for i in range(13):  # a row a second: past at least one periodic rescan
            f.write(b"slow%d\n" % i)
            time.sleep(1)  # the producer's own pace, not a synchronisation
    [s] = a.wait_summaries(1, timeout=30)
    assert (s["file"], s["rows"], s["delivered"]) == ("slow.csv", 13, 13), s
    assert a.cli("verify", s["job"]).returncode == 0
