"""End to end: real `alertd run`, real mock webhook, real files and signals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import datetime

from standardwebhooks.webhooks import Webhook

from bench.gen_csv import generate
from tests.helpers import TIMING, get_stats
from tests.procs import SECRET, poll, write_config


def _secs(s: dict) -> float:
    def t(x: str) -> datetime:
        return datetime.fromisoformat(x.replace("Z", "+00:00"))
    return (t(s["finished_at"]) - t(s["started_at"])).total_seconds()


def test_100k_rows_two_workers_signed_and_exactly_once(tmp_path, mock, alertd):
    record = tmp_path / "received.jsonl"
    port = mock("--secret", SECRET, record=str(record))
    a = alertd(write_config(tmp_path / "alertd.toml", port, webhook={"secrets": [SECRET]}))
    generate(str(a.cfg.paths.inbox_dir / "users.csv"), 100_000, seed=7)
    [s] = a.wait_summaries(1, timeout=180)
    assert (s["rows"], s["delivered"], s["rejected"], s["dead"]) == (100_000, 100_000, 0, 0)
    assert s["file"] == "users.csv" and s["possible_duplicates"] == 0
    stats = get_stats(port)
    assert stats["unique"] == 100_000
    assert stats["duplicates"] == 0
    assert stats["bad_signatures"] == 0
    assert (a.state / "done" / f"{s['job']}--users.csv").exists()
    assert not list((a.state / "spool").iterdir())
    assert a.cli("verify", s["job"]).returncode == 0
    # Every request the mock saw carries a signature the reference library accepts.
    poll(lambda: sum(1 for _ in open(record)) >= 100_000, 10, "the mock's record to flush")
    wh = Webhook(SECRET)
    n = 0
    with open(record) as f:
        for line in f:
            r = json.loads(line)
            wh.verify(r["body"], {"webhook-id": r["id"], "webhook-timestamp": r["timestamp"],
                                  "webhook-signature": r["signature"]})
            body = json.loads(r["body"])
            assert body["type"] == "alert"
            assert r["id"] == f"{s['job']}:{body['data']['offset']}"
            n += 1
    assert n == 100_000


@TIMING
def test_rate_limit_is_shared_by_workers(tmp_path, mock, alertd):
    port = mock("--mode", "ratelimit", "--rate", "2000")
    a = alertd(write_config(tmp_path / "alertd.toml", port, rate={"limit": 2000}))
    generate(str(a.cfg.paths.inbox_dir / "r.csv"), 20_000, seed=3)
    [s] = a.wait_summaries(1, timeout=60)
    assert s["delivered"] == 20_000
    stats = get_stats(port)
    assert stats["by_status"].get("429", 0) == 0, stats
    assert 9.5 <= _secs(s) <= 10.5, s


def test_kill9_of_every_process_mid_job_then_restart(tmp_path, mock, alertd):
    port = mock()
    cfg = write_config(tmp_path / "alertd.toml", port, rate={"limit": 8000})
    a = alertd(cfg)
    generate(str(a.cfg.paths.inbox_dir / "k.csv"), 60_000, seed=11)
    poll(lambda: a.delivered_now() > 15_000, 60, "a good part of the job to be delivered")
    a.kill9()
    assert not a.summaries()
    b = alertd(cfg)
    [s] = b.wait_summaries(1, timeout=120)
    assert (s["rows"], s["delivered"]) == (60_000, 60_000)
    r = b.cli("verify", s["job"])
    assert r.returncode == 0, r.stdout + r.stderr
    stats = get_stats(port)
    assert stats["unique"] == 60_000
    # Only requests in flight (or confirmed but not yet fsynced) at the kill can repeat.
    assert stats["duplicates"] <= 2 * 64 + 2 * 8000 * 0.05 * 2


def test_a_crashed_worker_is_replaced_and_its_chunks_rerun(tmp_path, mock, alertd):
    port = mock()
    a = alertd(write_config(tmp_path / "alertd.toml", port, rate={"limit": 8000}))
    generate(str(a.cfg.paths.inbox_dir / "w.csv"), 40_000, seed=5)
    poll(lambda: a.delivered_now() > 5_000, 60, "delivery to start")
    victim = a.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    [s] = a.wait_summaries(1, timeout=120)
    assert (s["rows"], s["delivered"]) == (40_000, 40_000)
    assert a.cli("verify", s["job"]).returncode == 0
    assert victim not in a.worker_pids()
    assert len(a.worker_pids()) == 2
    assert get_stats(port)["unique"] == 40_000


def test_bad_rows_are_rejected_with_reasons_and_the_rest_delivered(tmp_path, mock, alertd):
    port = mock()
    a = alertd(write_config(tmp_path / "alertd.toml", port))
    data = (b"\xef\xbb\xbfuser_id,message\r\n"
            b"u1,hello\r\n"
            b",no id\r\n"
            b"u3,\"quoted, with comma\"\r\n"
            b"u4,\"unbalanced\r\n"
            b"u5,too,many\r\n"
            b"u\xff6,bad utf8\r\n"
            b"u7,nul\x00byte\r\n"
            b"\r\n"
            b"u9,last without newline")
    a.drop("mixed.csv", data)
    [s] = a.wait_summaries(1, timeout=30)
    assert (s["rows"], s["delivered"], s["rejected"], s["dead"]) == (9, 3, 6, 0)
    rejects = [json.loads(x) for x in (a.state / "rejects" / f"{s['job']}.jsonl").open()]
    reasons = sorted(r["reason"] for r in rejects)
    assert len(reasons) == 6
    assert any("missing user id" in r for r in reasons)
    assert any("quote" in r for r in reasons)
    assert any("columns" in r for r in reasons)
    assert any("UTF-8" in r for r in reasons)
    assert any("NUL" in r for r in reasons)
    assert any("empty" in r for r in reasons)
    assert all(isinstance(r["offset"], int) for r in rejects)
    assert get_stats(port)["unique"] == 3
    assert a.cli("verify", s["job"]).returncode == 0


def test_unreadable_files_fail_with_a_reason_and_the_daemon_goes_on(tmp_path, mock, alertd):
    port = mock()
    a = alertd(write_config(tmp_path / "alertd.toml", port))
    a.drop("image.csv", bytes(range(256)) * 64)
    a.drop("noid.csv", b"name,email\nbob,b@x\n")
    (a.cfg.paths.inbox_dir / "subdir").mkdir()
    poll(lambda: len(list((a.state / "failed").glob("*.reason"))) == 2, 30, "two failed files")
    reasons = {p.name.split("--", 1)[1]: p.read_text() for p in
               (a.state / "failed").glob("*.reason")}
    assert "binary" in reasons["image.csv.reason"]
    assert "user_id" in reasons["noid.csv.reason"]
    a.drop("good.csv", b"user_id\nu1\nu2\n")
    [s] = a.wait_summaries(1, timeout=30)
    assert s["delivered"] == 2
    assert (a.cfg.paths.inbox_dir / "subdir").is_dir()
    assert a.proc.poll() is None


def test_partial_and_hidden_files_wait_for_their_rename(tmp_path, mock, alertd):
    port = mock()
    a = alertd(write_config(tmp_path / "alertd.toml", port))
    inbox = a.cfg.paths.inbox_dir
    (inbox / ".hidden.csv").write_bytes(b"user_id\nh1\n")
    (inbox / "upload.csv.part").write_bytes(b"user_id\np1\n")
    (inbox / "late.csv").write_bytes(b"user_id\nl1\n")  # close-write counts as arrival
    [s] = a.wait_summaries(1, timeout=30)
    assert s["file"] == "late.csv"
    assert (inbox / ".hidden.csv").exists() and (inbox / "upload.csv.part").exists()
    os.rename(inbox / "upload.csv.part", inbox / "upload.csv")
    s2 = a.wait_summaries(2, timeout=30)[1]
    assert s2["file"] == "upload.csv" and s2["delivered"] == 1


def test_files_already_in_the_inbox_are_picked_up_at_start(tmp_path, mock, alertd):
    port = mock()
    a = alertd(write_config(tmp_path / "alertd.toml", port), start=False)
    inbox = a.cfg.paths.inbox_dir
    inbox.mkdir(parents=True)
    for i in range(3):
        (inbox / f"f{i}.csv").write_bytes(b"user_id\n" + b"".join(
            b"f%d-%d\n" % (i, j) for j in range(100)))
    a.start()
    ss = a.wait_summaries(3, timeout=60)
    assert sorted(s["file"] for s in ss) == ["f0.csv", "f1.csv", "f2.csv"]
    assert len({s["job"] for s in ss}) == 3
    assert get_stats(port)["unique"] == 300


def test_retryable_failures_are_retried_and_permanent_ones_dead_lettered(tmp_path, mock, alertd):
    port = mock("--mode", "flaky", "--fail-ratio", "0.3")
    a = alertd(write_config(tmp_path / "alertd.toml", port, retry={"max_attempts": 20}))
    a.drop("flaky.csv", b"user_id\n" + b"".join(b"x%d\n" % i for i in range(2000)))
    [s] = a.wait_summaries(1, timeout=60)
    assert (s["delivered"], s["dead"]) == (2000, 0)
    stats = get_stats(port)
    assert stats["unique"] == 2000 and stats["by_status"]["500"] > 0


def test_4xx_is_dead_lettered_at_once(tmp_path, mock, alertd):
    port = mock("--mode", "gone")
    a = alertd(write_config(tmp_path / "alertd.toml", port))
    a.drop("g.csv", b"user_id,message\nu1,hi\nu2,there\n")
    [s] = a.wait_summaries(1, timeout=30)
    assert (s["delivered"], s["dead"]) == (0, 2)
    dead = [json.loads(x) for x in (a.state / "dlq" / f"{s['job']}.jsonl").open()]
    assert sorted(d["user_id"] for d in dead) == ["u1", "u2"]
    assert all(d["attempts"] == 1 and d["status"] == 410 for d in dead)
    assert {d["id"] for d in dead} == {f"{s['job']}:{d['offset']}" for d in dead}
    assert get_stats(port)["received"] == 2


def test_term_drains_and_a_restart_finishes_the_job(tmp_path, mock, alertd):
    port = mock()
    cfg = write_config(tmp_path / "alertd.toml", port, rate={"limit": 3000})
    a = alertd(cfg)
    generate(str(a.cfg.paths.inbox_dir / "t.csv"), 20_000, seed=2)
    poll(lambda: a.delivered_now() > 3_000, 60, "delivery to start")
    assert a.stop(timeout=15) == 0
    assert not a.summaries()
    b = alertd(cfg)
    [s] = b.wait_summaries(1, timeout=60)
    assert s["delivered"] == 20_000
    assert b.cli("verify", s["job"]).returncode == 0
    stats = get_stats(port)
    assert stats["unique"] == 20_000 and stats["duplicates"] == 0


def test_bad_config_refuses_to_start_with_exit_2(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[webhook]\nurl = "http://127.0.0.1:1/"\n[rate]\nlimit = -5\n')
    p = subprocess.run([sys.executable, "-m", "alertd", "run", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["alertd: config: [rate] limit must be >= 0, got -5"]


def test_pipelined_delivery_is_exactly_once_with_retries(tmp_path, mock, alertd):
    # [workers] pipeline = 8: 64 requests in flight per worker on 8 connections; a flaky
    # receiver answers a share with 500 in the middle of pipelines.
    port = mock("--secret", SECRET, "--mode", "flaky", "--fail-ratio", "0.2")
    a = alertd(write_config(tmp_path / "alertd.toml", port, webhook={"secrets": [SECRET]},
                            workers={"pipeline": 8},
                            retry={"base_delay": 0.01, "max_delay": 0.05, "max_attempts": 20}))
    generate(str(a.cfg.paths.inbox_dir / "p.csv"), 20_000, seed=5)
    [s] = a.wait_summaries(1, timeout=120)
    assert (s["rows"], s["delivered"], s["dead"]) == (20_000, 20_000, 0)
    stats = get_stats(port)
    assert stats["unique"] == 20_000 and stats["bad_signatures"] == 0
    assert stats["by_status"].get("500", 0) > 0  # the pipelines did carry failures
    assert a.cli("verify", s["job"]).returncode == 0
