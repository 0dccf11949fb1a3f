"""`alertd check FILE`: a dry run reads a file as a job would, reports it, sends nothing."""
from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import psutil
from standardwebhooks.webhooks import Webhook

from tests.helpers import get_stats
from tests.procs import ROOT, SECRET, write_config
from tests.test_hostile import CORPUS, DATA


def _check(cfg, path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alertd", "check", str(path), "--config",
                           str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_check_reports_the_bad_input_corpus_as_a_job_would_and_sends_nothing(tmp_path, mock):
    port = mock()
    cfg = write_config(tmp_path / "a.toml", port, webhook={"secrets": [SECRET]},
                       rate={"limit": 100})
    for name, expected in CORPUS.items():
        r = _check(cfg, DATA / name)
        if isinstance(expected, str):  # the job would fail: exit 1 and the same reason
            assert r.returncode == 1, (name, r.stdout, r.stderr)
            assert "the job would fail" in r.stdout and expected in r.stdout, (name, r.stdout)
            continue
        delivered, rejected, reasons = expected
        assert r.returncode == 0, (name, r.stdout, r.stderr)
        m = re.search(r": (\d+) rows, (\d+) would be sent, (\d+) rejected", r.stdout)
        assert m and tuple(map(int, m.groups())) == (delivered + rejected, delivered, rejected), \
            (name, r.stdout)
        for reason in reasons:
            assert re.search(rf"rejected +\d+  .*{re.escape(reason)}", r.stdout), (name, r.stdout)
            assert re.search(rf"e\.g\. offset \d+: .*{re.escape(reason)}", r.stdout), name
        if delivered:
            assert f"estimated duration: {delivered / 100:.1f} s at 100/s" in r.stdout, r.stdout
            assert "sample alert (nothing was sent):" in r.stdout
    assert get_stats(port)["received"] == 0


def test_the_sample_alert_is_signed_as_the_daemon_would_sign_it(tmp_path):
    cfg = write_config(tmp_path / "a.toml", 9, csv={"message_column": "message"},
                       webhook={"secrets": [SECRET], "headers": {"Authorization": "Bearer xyz"}})
    f = tmp_path / "f.csv"
    f.write_bytes(b"user_id,message\nu1,hello there\nu2,x\n")
    r = _check(cfg, f)
    assert r.returncode == 0, r.stderr
    lines = [ln.strip() for ln in r.stdout.split("sample alert (nothing was sent):", 1)[1]
             .splitlines()]
    head = dict(ln.split(": ", 1) for ln in lines if ": " in ln and not ln.startswith("{"))
    body = next(ln for ln in lines if ln.startswith("{"))
    assert '"user_id":"u1"' in body and '"message":"hello there"' in body
    assert head["Authorization"] == "<set in config>" and "xyz" not in r.stdout
    Webhook(SECRET).verify(body, {k: head[k] for k in
                                  ("webhook-id", "webhook-timestamp", "webhook-signature")})


def test_a_fifo_or_a_missing_file_fails_cleanly(tmp_path):
    import os
    cfg = write_config(tmp_path / "a.toml", 9)
    os.mkfifo(tmp_path / "pipe.csv")
    r = _check(cfg, tmp_path / "pipe.csv", timeout=20)  # never blocks on the FIFO
    assert r.returncode == 1 and "not a regular file" in r.stdout, r.stdout + r.stderr
    r = _check(cfg, tmp_path / "nope.csv")
    assert r.returncode == 1 and "the job would fail" in r.stdout and "Traceback" not in r.stderr


def test_check_of_a_1gb_file_stays_small(tmp_path):
    cfg = write_config(tmp_path / "a.toml", 9, rate={"limit": 5000})
    big = tmp_path / "big.csv"
    row = b"," + b"m" * 1000 + b"\n"  # long rows: 1 GiB in a million of them
    n = (1 << 30) // (len(row) + 8)
    with open(big, "wb") as f:
        f.write(b"user_id,message\n")
        block = b"".join(b"u%06d" % i + row for i in range(1000))
        for _ in range(n // 1000):
            f.write(block)
        f.write(b"x" * 70_000 + b",m\n")  # one line over max_line_bytes, at the end
    size = big.stat().st_size
    p = subprocess.Popen([sys.executable, "-m", "alertd", "check", str(big), "--config", str(cfg)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, psutil.Process(p.pid).memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.05)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = p.communicate(timeout=600)
    stop.set()
    t.join()
    big.unlink()
    print(f"\ncheck of a {size / 2**30:.2f} GiB file: peak RSS {peak / 2**20:.0f} MiB")
    assert p.returncode == 0, err
    assert f"{n // 1000 * 1000 + 1} rows, {n // 1000 * 1000} would be sent, 1 rejected" in out, out
    assert "line too long: 70002 bytes > max_line_bytes 65536" in out, out
    assert peak < 250 << 20
