"""Replay is a job of the daemon: same workers, budget and WAL as the job beside it;
detached by Ctrl-C, attached again, resumed after a crash; memory bounded."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import psutil
from alertd.commands import _UnixHTTPConnection
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import TIMING, get_stats, post_json
from tests.procs import ROOT, poll, write_config
from tests.test_status import validate


def rows_csv(n: int, prefix: str) -> bytes:
    return b"user_id\n" + b"".join(b"%s%d\n" % (prefix.encode(), i) for i in range(n))


def _dead_job(a, port: int, n: int, **sections: dict) -> dict:
    """A finished job whose n rows are all dead letters: the receiver fails every id, the
    breaker opens and the rest expire (retry.max_age = 1 s) without being sent. Then the
    config is reloaded with `sections` and retries that give a replay time."""
    post_json(port, "/control", {"mode": "fail", "fail_ratio": 1.0})
    a.drop("dead.csv", rows_csv(n, "d"))
    [s] = a.wait_summaries(1, timeout=60)
    assert s["dead"] == n, s
    write_config(a.cfg_path, port, **sections,
                 retry={"max_attempts": 5, "base_delay": 0.05, "max_age": 600})
    r = a.cli("reload")
    assert r.returncode == 0, r.stdout + r.stderr
    return s


def _req(sock: str, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    conn = _UnixHTTPConnection(sock, 10)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        raw = resp.read().decode()
    finally:
        conn.close()
    return resp.status, (json.loads(raw) if path != "/metrics" else raw)


class PeakRss:
    """The highest summed RSS of a process tree, sampled every 50 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                p = psutil.Process(self.pid)
                rss = sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            self._stop.wait(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


@TIMING
def test_replay_shares_the_budget_detaches_and_resumes_after_a_crash(tmp_path, mock, alertd):
    n, limit = 18_000, 3000
    port = mock()
    cfg = write_config(tmp_path / "a.toml", port, rate={"limit": limit},
                       retry={"max_attempts": 1, "base_delay": 0.01, "max_age": 1.0},
                       workers={"count": 2, "concurrency": 16})
    a = alertd(cfg)
    job = _dead_job(a, port, n, rate={"limit": limit},
                    workers={"count": 2, "concurrency": 16})["job"]
    # The receiver now limits at the configured rate: it answers 429 above it.
    post_json(port, "/reset", {})
    post_json(port, "/control", {"mode": "ratelimit", "rate": limit})
    a.drop("live.csv", rows_csv(40_000, "l"))  # a job at the receiver's limit beside it
    poll(lambda: any(j["live"]["delivered"] for j in a.status()["jobs"]), 30,
         "the live job to send")
    cmd = [sys.executable, "-m", "alertd", "dlq", "replay", job, "--config", str(cfg)]
    cli = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    time.sleep(3)  # the operator watches for 3 s, then presses Ctrl-C
    cli.send_signal(signal.SIGINT)
    out, err = cli.communicate(timeout=30)
    assert cli.returncode == 130 and "goes on in the daemon" in err, out + err
    rj = out.split(":", 1)[0]
    view = json.loads(a.cli("jobs", "--json").stdout)["jobs"]
    [r] = [j for j in view if j["job"] == rj]
    assert (r["kind"], r["replay_of"], r["state"]) == ("replay", job, "running")
    # Run again: it attaches to the replay that goes on, it starts no second one.
    again = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    def replayed() -> int:
        return next((j["live"]["delivered"] for j in a.status()["jobs"] if j["job"] == rj), 0)
    poll(lambda: replayed() > n // 3, 60, "a third of the letters replayed")
    again.send_signal(signal.SIGINT)
    out2, err2 = again.communicate(timeout=30)
    assert f"{rj}: already replaying (attached)" in out2, out2 + err2
    a.kill9()  # a crash mid-replay: the restart resumes the replay job from its WAL
    a.start()
    r = a.cli("dlq", "replay", job, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{rj}: already replaying" in r.stdout and f"{n} delivered" in r.stdout, r.stdout
    summaries = {s["job"]: s for s in a.wait_summaries(3, timeout=120)}
    stats = get_stats(port)
    print(f"replay beside a job at {limit}/s: {stats['by_status']} at the receiver, "
          f"{stats['duplicates']} duplicates after one kill -9")
    assert stats["by_status"].get("429", 0) == 0, stats["by_status"]
    assert stats["unique"] == n + 40_000
    assert stats["duplicates"] <= 600  # the per-kill bound: in flight + one fsync interval
    orig = summaries[job]
    assert (orig["delivered"], orig["dead"], orig["replayed"]) == (n, 0, n)
    assert summaries[rj]["delivered"] == n and summaries[rj]["kind"] == "replay"
    assert not (a.state / "dlq" / f"{job}.jsonl").exists()
    for j in (job, rj):
        v = a.cli("verify", j)
        assert v.returncode == 0, v.stdout + v.stderr


def test_a_replay_of_100k_letters_stays_small_and_shows_in_metrics(tmp_path, mock, alertd):
    n = 100_000
    port = mock()
    cfg = write_config(tmp_path / "a.toml", port,
                       retry={"max_attempts": 1, "base_delay": 0.01, "max_age": 1.0})
    a = alertd(cfg)
    job = _dead_job(a, port, n)["job"]
    post_json(port, "/control", {"mode": "ok"})
    post_json(port, "/reset", {})
    peak = PeakRss(a.pid)
    sock = str(a.state / "alertd.sock")
    # The API starts it (201); the CLI then attaches to it and follows it to the end.
    code, doc = _req(sock, "POST", "/v1/dlq/replay", b'{"job": "%s"}' % job.encode())
    assert code == 201 and doc["jobs"][0]["started"] and doc["jobs"][0]["replay_of"] == job
    validate(doc, "ReplayList")
    cmd = [sys.executable, "-m", "alertd", "dlq", "replay", job, "--config", str(cfg)]
    cli = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    cli_peak = PeakRss(cli.pid)
    t0 = time.monotonic()
    out, err = cli.communicate(timeout=180)
    took = time.monotonic() - t0
    daemon_mb, cli_mb = peak.stop() / 2**20, cli_peak.stop() / 2**20
    print(f"replay of {n} letters: {took:.1f} s ({n / took:.0f}/s), daemon peak RSS "
          f"{daemon_mb:.0f} MB (supervisor + workers), CLI {cli_mb:.0f} MB")
    assert cli.returncode == 0 and "already replaying (attached)" in out, out + err
    assert get_stats(port)["unique"] == n
    assert daemon_mb < 250 and cli_mb < 250
    for body, want in ((b"{}", 200), (b'{"job": "%s"}' % job.encode(), 409),
                       (b'{"job": "j999999"}', 404), (b"[1]", 400)):
        code, doc = _req(sock, "POST", "/v1/dlq/replay", body)
        assert code == want, (body, code, doc)
        validate(doc, "ReplayList" if code == 200 else "Error")
    assert code == 400 and doc["jobs" if code == 200 else "error"]
    fams = {f.name: f for f in text_string_to_metric_families(_req(sock, "GET", "/metrics")[1])}
    value = {f: fams[f].samples[0].value for f in ("alertd_rows_replayed",)}
    assert value == {"alertd_rows_replayed": n}
    delivered = {s.labels["outcome"]: s.value for s in fams["alertd_rows"].samples}
    assert delivered["delivered"] == n and delivered["dead"] == n  # dead when they first failed
    states = {s.labels["state"]: s.value for s in fams["alertd_jobs"].samples}
    assert states["complete"] == 2 and states["running"] == 0


def test_a_cancelled_replay_puts_its_unsent_letters_back(tmp_path, mock, alertd):
    n = 3000
    port = mock()
    a = alertd(write_config(tmp_path / "a.toml", port,
                            retry={"max_attempts": 1, "base_delay": 0.01, "max_age": 1.0}))
    job = _dead_job(a, port, n, rate={"limit": 500})["job"]
    post_json(port, "/control", {"mode": "ok"})
    post_json(port, "/reset", {})
    sock = str(a.state / "alertd.sock")
    code, doc = _req(sock, "POST", "/v1/dlq/replay", b"{}")  # every job with letters
    assert code == 201
    [rj] = [j["job"] for j in doc["jobs"]]
    poll(lambda: get_stats(port)["received"] >= 300, 30, "some letters replayed")
    assert a.cli("pause", rj).returncode == 0  # a replay is paused and cancelled as any job
    assert a.cli("cancel", rj).returncode == 0
    s = {x["job"]: x for x in a.wait_summaries(2, timeout=60)}[rj]
    sent = get_stats(port)["unique"]
    assert s["status"] == "cancelled" and s["delivered"] == sent < n
    back = [json.loads(x) for x in (a.state / "dlq" / f"{job}.jsonl").open()]
    assert len(back) == n - sent  # what was not sent is a dead letter again, with its id
    assert all(x["id"] == f"{job}:{x['offset']}" and x["job"] == job for x in back)
    orig = json.loads((a.state / "done" / f"{job}.summary.json").read_text())
    assert (orig["delivered"], orig["dead"], orig["replayed"]) == (sent, n - sent, sent)
    assert a.cli("verify", rj).returncode == 0
    # The rest can be replayed later: nothing delivered is sent again.
    r = a.cli("dlq", "replay", job, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    stats = get_stats(port)
    assert stats["unique"] == n and stats["duplicates"] == 0
