"""The operator CLI against real processes: status (table, --json, --watch), tail (-f,
--json), verify (exit 1 on a duplicate outcome), dlq list, --help and exit codes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.helpers import post_json, start_mock, stop_process
from tests.procs import ROOT, Alertd, poll, write_config

COMMANDS = ["run", "reload", "status", "tail", "check", "verify", "dlq"]


def alertd_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alertd", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("cmd", [None, *COMMANDS])
def test_help_documents_exit_codes(cmd):
    r = alertd_cli(*([cmd] if cmd else []), "--help")
    assert r.returncode == 0
    assert "exit codes:" in r.stdout and "3  the daemon's status API cannot be reached" in r.stdout
    if cmd:
        assert "--config" in r.stdout


def test_usage_and_unreachable_exit_codes(tmp_path):
    assert alertd_cli("frobnicate").returncode == 2
    assert alertd_cli("status", "--config", str(tmp_path / "missing.toml")).returncode == 2
    cfg = write_config(tmp_path / "a.toml", 1)
    r = alertd_cli("status", "--config", str(cfg))
    assert r.returncode == 3 and "cannot reach alertd" in r.stderr
    r = alertd_cli("verify", "j000099", "--config", str(cfg))
    assert r.returncode == 1 and "no job j000099" in r.stderr


@pytest.fixture
def daemon(tmp_path):
    mock, port = start_mock()
    a = Alertd(write_config(tmp_path / "alertd.toml", port))
    try:
        yield a.start(), port
    finally:
        if a.proc is not None and a.proc.poll() is None:
            a.stop()
        stop_process(mock)


def test_status_tail_verify_dlq(daemon):
    a, port = daemon
    a.drop("one.csv", b"user_id\nu1\nu2\n,missing\nu4\n")
    [s] = a.wait_summaries(1, timeout=30)
    job = s["job"]

    r = a.cli("status")
    assert r.returncode == 0, r.stderr
    assert "(no job in progress)" in r.stdout and "WORKER" in r.stdout
    doc = json.loads(a.cli("status", "--json").stdout)
    assert doc["finished"][0]["job"] == job and len(doc["workers"]) == 2

    r = a.cli("tail", "-n", "0")
    rows = [ln for ln in r.stdout.splitlines() if f"{job}:" in ln]
    assert r.returncode == 0 and len(rows) == 4
    assert sum("delivered" in ln for ln in rows) == 3 and sum("rejected" in ln for ln in rows) == 1
    recs = [json.loads(ln) for ln in a.cli("tail", "--json", "-n", "0").stdout.splitlines()]
    assert [r["ts"] for r in recs] == sorted(r["ts"] for r in recs)  # merged in time order
    assert len(a.cli("tail", "--json", "-n", "2").stdout.splitlines()) == 2

    r = a.cli("verify", job)
    assert r.returncode == 0 and f"verify {job}: 4 rows, 4 with exactly one" in r.stdout

    # tail -f follows a new job; Ctrl-C ends it with 0.
    f = subprocess.Popen([sys.executable, "-m", "alertd", "tail", "-f", "-n", "0", "--json",
                          "--config", str(a.cfg_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        poll(lambda: a.cli("tail", "-n", "0").returncode == 0, 5, "tail")  # let -f start
        a.drop("two.csv", b"user_id\nv1\nv2\n")
        [_, s2] = a.wait_summaries(2, timeout=30)
        got = []
        while len([r for r in got if r["out"] == "delivered" and r["job"] == s2["job"]]) < 2:
            got.append(json.loads(f.stdout.readline()))
        assert {r["job"] for r in got} == {job, s2["job"]}  # -n 0: everything, then follow
    finally:
        f.send_signal(signal.SIGINT)
        assert f.wait(10) == 0

    # A dead letter, listed by `dlq list`.
    post_json(port, "/control", {"mode": "gone"})
    a.drop("three.csv", b"user_id\nw1\n")
    [*_, s3] = a.wait_summaries(3, timeout=30)
    r = a.cli("dlq", "list")
    assert r.returncode == 0 and f"{s3['job']}: 1 dead letters" in r.stdout

    # A second final outcome for a row makes verify fail with exit 1.
    assert a.stop() == 0
    wal = a.state / "wal" / "worker-0.wal"
    lines = [ln for ln in wal.read_bytes().splitlines(True) if f'"job":"{job}"'.encode() in ln
             and b'"out":"delivered"' in ln]
    if not lines:
        wal = a.state / "wal" / "worker-1.wal"
        lines = [ln for ln in wal.read_bytes().splitlines(True)
                 if f'"job":"{job}"'.encode() in ln and b'"out":"delivered"' in ln]
    with open(wal, "ab") as fh:
        fh.write(lines[0])
    r = a.cli("verify", job)
    assert r.returncode == 1 and "1 with more than one" in r.stdout and "FAILED" in r.stdout


def test_status_watch_redraws_until_interrupted(daemon):
    a, _ = daemon
    w = subprocess.Popen([sys.executable, "-m", "alertd", "status", "--watch", "--interval",
                          "0.2", "--config", str(a.cfg_path)], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
    try:
        frames = 0
        while frames < 3:
            if w.stdout.readline().startswith("alertd "):
                frames += 1
    finally:
        w.send_signal(signal.SIGINT)
        assert w.wait(10) == 0
    os.kill(a.proc.pid, 0)


def test_inline_secrets_in_a_world_readable_config_are_one_warning_line(tmp_path):
    token = "tok-cli-9e1f7a3b5c"
    cfg = write_config(tmp_path / "a.toml", 1, status={"listen": "127.0.0.1:1", "token": token})
    os.chmod(cfg, 0o644)
    r = alertd_cli("status", "--config", str(cfg))
    assert r.returncode == 3
    warning, unreachable = r.stderr.splitlines()
    assert warning == (f"alertd: config: warning: {cfg} is readable by others (mode 644) and "
                       "holds secrets inline ([status] token): chmod 640 it, or move them out "
                       "(signing secrets to [webhook] secrets_file)")
    assert "cannot reach alertd" in unreachable and token not in r.stderr
    os.chmod(cfg, 0o640)
    assert alertd_cli("status", "--config", str(cfg)).stderr.count("warning") == 0


def test_status_and_jobs_tables_fit_80_columns():
    import time as _time

    from alertd.commands import render, render_jobs
    now = _time.time()
    long = "a-file-name-far-longer-than-any-column-would-hold.csv"
    doc = {"rate": {"limit": 20000, "paused_for": 3.2}, "version": "0.1.0", "pid": 4194304,
           "now": now, "started_at": now - 86400 * 3, "draining": True, "delivery_rate": 123456,
           "breaker": {"state": "open", "reason": "endpoint 127.0.0.1:9 unreachable: connection "
                       "refused; breaker opened after 20 failures"},
           "reload": {"ok": False, "at": now, "error": "config: [rate] limit must be >= 0, " * 3,
                      "succeeded": 12, "failed": 3},
           "jobs": [{"job": "j000042", "file": long, "bytes": 2 * 10**9, "bytes_done": 10**9,
                     "progress": 0.5, "rows": 98_765_432, "planned_all": False,
                     "chunks_in_flight": 2, "rows_estimate": 197_530_864, "delivered": 98_765_432,
                     "rejected": 1_234_567, "dead": 765_432, "rate": 123456.7, "eta_s": 864000,
                     "failed": "file ends at 5, before the planned span " * 3, "state": "paused"}],
           "workers": [{"index": 63, "pid": 4194303, "rss_bytes": 2**34, "cpu_percent": 100.0,
                        "in_flight": 4096, "pending": 16384, "sent": 12_345_678_901_234,
                        "retiring": True, "ready": False, "wal_error": True}]}
    out = render(doc)
    assert max(map(len, out.splitlines())) <= 80, out
    assert "98765432" in out and "paused" in out and "failed: file ends" in out
    jobs = [{"job": "j000042", "file": long, "state": "cancelled", "priority": "normal",
             "rows": 123_456_789, "rows_final": False, "delivered": 98_765_432,
             "rejected": 1_234_567, "dead": 765_432, "cancelled": 24_691_357, "progress": 1.0,
             "reason": "no 'user_id' column in header (columns: " + ", ".join(["c"] * 40) + ")"}]
    out = render_jobs(jobs)
    assert max(map(len, out.splitlines())) <= 80, out
    assert "cancelled" in out and "no 'user_id' column" in out


def test_status_shows_live_counts_and_says_how_many_are_not_durable() -> None:
    import time as _time

    from alertd.commands import render
    now = _time.time()
    job = {"job": "j000007", "file": "a.csv", "bytes": 10**12, "bytes_done": 10**6,
           "progress": 0.0, "rows": 49_936, "planned_all": False, "chunks_in_flight": 2,
           "rows_estimate": 10**11, "delivered": 49_936, "rejected": 0, "dead": 0,
           "live": {"rows": 60_701, "delivered": 60_690, "rejected": 11, "dead": 0,
                    "cancelled": 0, "possible_duplicates": 0},
           "rate": 3000.0, "eta_s": 33.0, "failed": None, "state": "running"}
    doc = {"rate": {"limit": 3000, "paused_for": 0}, "version": "0.1.0", "pid": 1,
           "now": now, "started_at": now - 60, "draining": False, "delivery_rate": 3000,
           "breaker": {"state": "closed"}, "reload": {"ok": None},
           "jobs": [job], "workers": []}
    out = render(doc)
    assert "60690" in out and "49936" not in out, out
    assert "10,765 rows final, not yet durable" in out, out
    job["live"] = {**job["live"], "rows": 10**15}
    assert max(map(len, render(doc).splitlines())) <= 80
    job["live"] = {"rows": 49_936, "delivered": 49_936, "rejected": 0, "dead": 0}
    assert "all durable" in render(doc)
