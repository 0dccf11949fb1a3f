"""Job control with a real `alertd run`: cancel, pause across a restart, priority, and the
/v1/jobs API (404, 409, 400, documents validated against docs/openapi.yaml)."""
from __future__ import annotations

import http.client
import json
import time
from datetime import datetime

from prometheus_client.parser import text_string_to_metric_families

from bench.gen_csv import generate
from tests.helpers import get_stats
from tests.procs import poll, write_config
from tests.test_status import TOKEN, free_port, validate


def _ts(x: str) -> float:
    return datetime.fromisoformat(x.replace("Z", "+00:00")).timestamp()


def _jobs(a) -> list[dict]:
    r = a.cli("jobs", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["jobs"]


def _job_of(a, name: str) -> dict:
    return poll(lambda: next((j for j in _jobs(a) if j["file"] == name), None), 30,
                f"{name} to be listed")


def _quiet_since(port: int, t: float) -> dict:
    """The mock's stats once it has received nothing for 0.5 s (its record of arrival times
    then shows the last request)."""
    last = [get_stats(port)]

    def settled() -> dict | None:
        time.sleep(0.5)  # an observation window, not a synchronisation
        now = get_stats(port)
        same = now["received"] == last[0]["received"]
        last[0] = now
        return now if same else None
    return poll(settled, 30, "the receiver to go quiet")


def test_cancel_stops_sending_within_a_second_and_every_row_is_final(tmp_path, mock, alertd):
    port = mock()
    a = alertd(write_config(tmp_path / "alertd.toml", port, rate={"limit": 2000}))
    big = tmp_path / "big.csv"
    generate(str(big), 200_000, seed=11)
    a.drop_link(big, "big.csv")
    poll(lambda: get_stats(port)["received"] > 3000, 30, "the job to be delivering")
    job = _job_of(a, "big.csv")["job"]
    t_issued = time.time()
    r = a.cli("cancel", job)
    t_answered = time.time()
    assert r.returncode == 0, r.stderr
    assert f"{job} cancelled" in r.stdout
    st = _quiet_since(port, t_answered)
    print(f"\ncancel: last request of the job {st['last_at'] - t_issued:.3f} s after the "
          f"command was issued ({st['last_at'] - t_answered:.3f} s after it answered, "
          f"{t_answered - t_issued:.3f} s for the CLI)")
    assert st["last_at"] < t_answered + 1.0
    [s] = a.wait_summaries(1, timeout=60)
    assert s["status"] == "cancelled" and s["rows"] == 200_000
    assert s["delivered"] + s["rejected"] + s["dead"] + s["cancelled"] == 200_000
    assert s["cancelled"] > 100_000 and s["delivered"] == st["unique"]
    v = a.cli("verify", job)
    assert v.returncode == 0, v.stdout + v.stderr
    assert "cancelled" in v.stdout
    t = a.cli("tail", "-n", "0", "--job", job, "--outcome", "cancelled")
    assert t.returncode == 0 and "rows in [" in t.stdout and len(t.stdout.splitlines()) == 1
    again = a.cli("cancel", job)
    assert again.returncode == 1 and "already cancelled" in again.stderr, again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    unknown = a.cli("cancel", "j999999")
    assert unknown.returncode == 1 and "no such job: j999999" in unknown.stderr
    [listed] = [j for j in _jobs(a) if j["job"] == job]
    assert listed["state"] == "cancelled" and listed["cancelled"] == s["cancelled"]


def test_a_cancel_survives_a_crash_while_requests_are_still_in_flight(tmp_path, mock, alertd):
    port = mock("--mode", "slow", "--latency-ms", "8000")
    cfg = write_config(tmp_path / "alertd.toml", port, rate={"limit": 2000},
                       webhook={"timeout": 30.0})
    a = alertd(cfg)
    generate(str(tmp_path / "k.csv"), 30_000, seed=16)
    a.drop_link(tmp_path / "k.csv", "k.csv")
    poll(lambda: get_stats(port)["received"] > 100, 30, "requests in flight")
    job = _job_of(a, "k.csv")["job"]
    assert a.cli("cancel", job).returncode == 0
    # The answers take 8 s: the job is cancelled but not final when the daemon dies.
    assert {j["job"]: j["state"] for j in _jobs(a)}[job] == "cancelled" and not a.summaries()
    a.kill9()
    b = alertd(cfg)
    [s] = b.wait_summaries(1, timeout=60)
    assert s["status"] == "cancelled" and s["rows"] == 30_000
    assert s["delivered"] + s["rejected"] + s["dead"] + s["cancelled"] == 30_000
    assert b.cli("verify", job).returncode == 0
    assert not list((b.state / "spool").glob("*.control.json"))


def test_pause_holds_the_job_across_a_restart_and_resume_delivers_each_row_once(
        tmp_path, mock, alertd):
    port = mock()
    cfg = write_config(tmp_path / "alertd.toml", port, rate={"limit": 2000})
    a = alertd(cfg)
    generate(str(tmp_path / "p.csv"), 20_000, seed=12)
    a.drop_link(tmp_path / "p.csv", "p.csv")
    poll(lambda: get_stats(port)["received"] > 2000, 30, "the job to be delivering")
    job = _job_of(a, "p.csv")["job"]
    r = a.cli("pause", job)
    t_paused = time.time()
    assert r.returncode == 0 and f"{job} paused" in r.stdout, r.stderr
    assert a.cli("pause", job).returncode == 1  # already paused
    poll(lambda: time.time() > t_paused + 1.0, 5, "the 1 s grace")
    before = get_stats(port)
    poll(lambda: time.time() > t_paused + 5.0, 10, "the pause window")
    after = get_stats(port)
    print(f"\npause: {after['received'] - before['received']} requests from 1 s to 5 s after "
          f"the pause; last request {before['last_at'] - t_paused:.3f} s after it")
    assert after["received"] == before["received"] and before["last_at"] < t_paused + 1.0
    assert {j["job"]: j["state"] for j in _jobs(a)}[job] == "paused"
    assert a.stop() == 0
    b = alertd(cfg)
    assert {j["job"]: j["state"] for j in _jobs(b)}[job] == "paused"
    held = get_stats(port)["received"]
    t = time.time()
    poll(lambda: time.time() > t + 2.0, 5, "a window after the restart")
    assert get_stats(port)["received"] == held and not b.summaries()
    r = b.cli("resume", job)
    assert r.returncode == 0 and f"{job} running" in r.stdout, r.stderr
    [s] = b.wait_summaries(1, timeout=60)
    assert s["status"] == "complete" and s["delivered"] == 20_000 and s["cancelled"] == 0
    st = get_stats(port)
    assert st["unique"] == 20_000 and st["duplicates"] == 0
    assert b.cli("resume", job).returncode == 1  # complete: nothing to resume


def test_rows_awaiting_a_retry_are_held_by_pause_and_ended_by_cancel(tmp_path, mock, alertd):
    port = mock("--mode", "flaky", "--fail-ratio", "0.3")
    a = alertd(write_config(tmp_path / "alertd.toml", port, rate={"limit": 2000},
                            retry={"base_delay": 0.3, "max_delay": 1.0, "max_attempts": 100}))
    generate(str(tmp_path / "f.csv"), 50_000, seed=15)
    a.drop_link(tmp_path / "f.csv", "f.csv")
    poll(lambda: get_stats(port)["by_status"].get("500", 0) > 500, 30, "retries to be due")
    job = _job_of(a, "f.csv")["job"]
    assert a.cli("pause", job).returncode == 0
    t_paused = time.time()
    poll(lambda: time.time() > t_paused + 1.0, 5, "the 1 s grace")
    before = get_stats(port)
    poll(lambda: time.time() > t_paused + 3.0, 5, "the pause window")
    assert get_stats(port)["received"] == before["received"]  # retries held too
    assert before["last_at"] < t_paused + 1.0
    r = a.cli("cancel", job)  # a paused job can be cancelled: its held rows end cancelled
    assert r.returncode == 0, r.stderr
    [s] = a.wait_summaries(1, timeout=60)
    assert s["status"] == "cancelled"
    assert s["delivered"] + s["rejected"] + s["dead"] + s["cancelled"] == s["rows"] == 50_000
    assert s["delivered"] == get_stats(port)["unique"]
    assert get_stats(port)["received"] == before["received"]  # cancel sent nothing more
    v = a.cli("verify", job)
    assert v.returncode == 0, v.stdout


def _req(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {TOKEN}"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_jobs_api_answers_404_409_400_and_matches_the_openapi_file(tmp_path, mock, alertd):
    port = mock()
    sport = free_port()
    a = alertd(write_config(tmp_path / "alertd.toml", port, rate={"limit": 500},
                            status={"listen": f"127.0.0.1:{sport}", "token": TOKEN}))
    (tmp_path / "bad.bin").write_bytes(b"\x00\x01\x02" * 1000)
    a.drop_link(tmp_path / "bad.bin", "bad.bin")  # fails at claim: listed as a failed job
    generate(str(tmp_path / "j.csv"), 20_000, seed=14)
    a.drop_link(tmp_path / "j.csv", "j.csv")
    job = _job_of(a, "j.csv")["job"]
    code, doc = _req(sport, "GET", "/v1/jobs")
    assert code == 200
    validate(doc, "JobList")
    [failed] = [j for j in doc["jobs"] if j["file"] == "bad.bin"]
    assert failed["state"] == "failed" and "binary" in failed["reason"]
    assert _req(sport, "GET", "/v1/jobs/j999999") == (404, {"error": "no such job: j999999"})
    assert _req(sport, "POST", "/v1/jobs/j999999/pause")[0] == 404
    code, doc = _req(sport, "POST", f"/v1/jobs/{job}/pause")
    assert code == 200 and doc["state"] == "paused"
    validate(doc, "JobView")
    code, doc = _req(sport, "POST", f"/v1/jobs/{job}/pause")
    assert code == 409 and "already paused" in doc["error"]
    validate(doc, "Error")
    st = _req(sport, "GET", "/v1/status")[1]
    validate(st, "Status")
    assert [j["state"] for j in st["jobs"] if j["job"] == job] == ["paused"]
    # /metrics counts jobs by state: the active ones and the finished ones status lists.
    conn = http.client.HTTPConnection("127.0.0.1", sport, timeout=5)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    fams = {f.name: f for f in text_string_to_metric_families(conn.getresponse().read().decode())}
    conn.close()
    states = {x.labels["state"]: x.value for x in fams["alertd_jobs"].samples}
    assert states == {"queued": 0, "running": 0, "paused": 1, "complete": 0, "cancelled": 0,
                      "failed": 1}
    for body in (b"", b"{", b'{"priority": "urgent"}', b'["high"]', b'{"priority": "high", "x": 1}'):
        code, doc = _req(sport, "POST", f"/v1/jobs/{job}/priority", body)
        assert code == 400 and "priority" in doc["error"], body
    code, doc = _req(sport, "POST", f"/v1/jobs/{job}/priority", b'{"priority": "low"}')
    assert code == 200 and doc["priority"] == "low" and doc["state"] == "paused"
    assert _req(sport, "POST", f"/v1/jobs/{job}/resume")[1]["state"] == "running"
    code, doc = _req(sport, "POST", f"/v1/jobs/{job}/resume")
    assert code == 409 and "not paused" in doc["error"]
    code, doc = _req(sport, "POST", f"/v1/jobs/{job}/cancel")
    assert code == 200 and doc["state"] == "cancelled"
    [s] = a.wait_summaries(1, timeout=60)
    code, doc = _req(sport, "GET", f"/v1/jobs/{job}")
    assert code == 200 and doc["state"] == "cancelled" and doc["cancelled"] == s["cancelled"]
    validate(doc, "JobView")
    code, doc = _req(sport, "POST", f"/v1/jobs/{job}/cancel")
    assert code == 409 and "already cancelled" in doc["error"]
    validate(_req(sport, "GET", "/v1/jobs")[1], "JobList")
    conn = http.client.HTTPConnection("127.0.0.1", sport, timeout=5)
    conn.request("GET", "/v1/jobs")
    assert conn.getresponse().status == 401  # same auth as the status API
    conn.close()
    # A restart still lists the finished jobs, the failed claim with its reason.
    assert a.stop() == 0
    b = alertd(a.cfg_path)
    listed = {j["file"]: j for j in _jobs(b)}
    assert listed["j.csv"]["state"] == "cancelled" and listed["bad.bin"]["state"] == "failed"
    assert "binary" in listed["bad.bin"]["reason"]
    assert b.cli("cancel", job).returncode == 1
    # verify explains a failed job instead of looking for its rows.
    v = b.cli("verify", listed["bad.bin"]["job"])
    assert v.returncode == 1 and "failed: binary file" in v.stderr, v.stdout + v.stderr


def test_job_commands_without_a_daemon_exit_3_and_bad_usage_exits_2(tmp_path):
    import subprocess
    import sys

    from tests.procs import ROOT
    cfg = write_config(tmp_path / "alertd.toml", 9)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "alertd", *args, "--config", str(cfg)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    for args in (("jobs",), ("pause", "j000001"), ("resume", "j000001"),
                 ("cancel", "j000001"), ("priority", "j000001", "high")):
        r = run(*args)
        assert r.returncode == 3 and "cannot reach alertd" in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    for args in (("pause",), ("priority", "j000001"), ("priority", "j000001", "urgent")):
        assert run(*args).returncode == 2, args
